"""Refuse every socket connection outside this machine's loopback: for the tests and the soak script.

The tests and ``scripts/soak.py`` send private and link-local addresses (``10.0.0.1``,
``169.254.169.254``, ``192.168.0.1``) to check that the backend's SSRF guard refuses them. If that
guard regressed, the backend would connect there (a cloud's metadata service, another host on
the network). ``install()`` makes that impossible in the process it runs in: a connection to an
IPv4 / IPv6 address outside 127.0.0.0/8 and ::1 raises ``OutsideLoopback`` before any packet is
sent, and is recorded in ``refused`` (code under test may turn the error into a 4xx answer; the
tests fail from the record). Unix sockets and other families are not touched.

It patches ``socket.socket.connect`` / ``connect_ex``: ``socket.create_connection``, urllib3 /
requests, http.client and asyncio all connect through them. Not covered: sockets made in C
(Ray's gRPC core, ...) and other processes, unless they install it too (``python -m
backend.testing.loopback_guard ...`` runs a command with it: the soak's backend). Not used by the product;
like ``local_server.py``, test support.
"""

from __future__ import annotations

import ipaddress
import runpy
import socket
import sys
import threading
from typing import Any, List, Optional

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

refused: List[str] = []  # "host:port" of every connection refused, in order
_lock = threading.Lock()
_original: Optional[tuple] = None


class OutsideLoopback(ConnectionRefusedError):
    """A connection to an address outside loopback, refused before it was tried. An OSError, so
    callers handle it as they handle an unreachable host."""


def is_loopback(address: str) -> bool:
    """Whether ``address`` (IPv4, IPv6, an IPv4-mapped IPv6) is in 127.0.0.0/8 or ::1."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in LOOPBACK)


def _check(sock: socket.socket, address: Any) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return  # Unix sockets and the like: never leave the machine
    host, port = address[0], address[1]
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
        addresses = [str(host)]
    except ValueError:  # a host name: every address it resolves to must be loopback
        try:
            addresses = [info[4][0] for info in socket.getaddrinfo(host, port, sock.family, sock.type)]
        except OSError:
            return  # cannot resolve: connect() fails the same way, without a connection
    if addresses and all(is_loopback(a) for a in addresses):
        return
    where = f"{host}:{port}"
    with _lock:
        refused.append(where)
    print(f"loopback_guard: refused a connection to {where} (outside 127.0.0.0/8 and ::1)", file=sys.stderr,
          flush=True)
    raise OutsideLoopback(f"connection to {where} refused: outside loopback (backend/testing/loopback_guard.py)")


def install() -> None:
    """Patch ``socket.socket`` (idempotent); forked children inherit it."""
    global _original
    if _original is not None:
        return
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded_connect(self, address):
        _check(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        _check(self, address)
        return connect_ex(self, address)

    _original = (connect, connect_ex)
    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex


def uninstall() -> None:
    """Put the original ``socket.connect`` / ``connect_ex`` back."""
    global _original
    if _original is not None:
        socket.socket.connect, socket.socket.connect_ex = _original
        _original = None


def main() -> None:
    """``python -m backend.testing.loopback_guard -m module args...``: run ``module`` as ``python -m`` would,
    with the guard installed (gunicorn's workers are forked from it, so they have it too)."""
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: python -m backend.testing.loopback_guard -m MODULE [ARGS...]")
    install()
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
