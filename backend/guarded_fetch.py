"""Downloads that SSRF protection guards, cut at a deadline and a byte limit.

Every http(s) connection of a download (redirects too) resolves its host itself, checks every
address, and connects to the checked one (no second DNS answer to swap in): an address that is not
public (loopback, private, link-local, ...) is refused before any connection is tried, unless the
host is LABEL_STUDIO_URL's or in SSRF_ALLOWED_HOSTS (``AddressGuard``), so a closed port and an
open one answer alike. A download that has not finished by FETCH_DEADLINE_S has its sockets shut
down (``Download``).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import threading
import time
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .errors import BadInput, ImageTooLarge, ImageUnavailable, short_repr
from .server_settings import BackendSettings


class AddressRefused(BadInput):
    """An image URL that leads to an address SSRF protection does not let the backend reach."""

    status = 403


class AddressGuard:
    """Which addresses image downloads may connect to: public ones, and others only for Label
    Studio's own host and SSRF_ALLOWED_HOSTS (host names, IP addresses, CIDR networks)."""

    def __init__(self, settings: BackendSettings) -> None:
        self.enabled = settings.ssrf_protection
        self.names: set = set()
        self.networks: List[Any] = []
        for item in settings.ssrf_allowed_hosts:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.names.add(item.lower().rstrip("."))
        ls_host = urlparse(settings.label_studio_url).hostname if settings.label_studio_url else None
        if ls_host:
            self.names.add(ls_host.lower().rstrip("."))

    def refusal(self, host: str, address: str) -> Optional[str]:
        """None when ``host`` (connected at ``address``) may be read, else why not."""
        if not self.enabled:
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_global and not ip.is_multicast:
            return None
        name = host.lower().strip("[]").rstrip(".")
        if name in self.names or any(ip in net for net in self.networks):
            return None
        kind = ("a loopback" if ip.is_loopback else "a link-local" if ip.is_link_local
                else "a private" if ip.is_private else "a non-public")
        return (f"{short_repr(host, 60)} is at {ip}, {kind} address: refused by SSRF protection; allow it with "
                f"SSRF_ALLOWED_HOSTS={host if len(host) <= 60 else ip} (host names, IPs or CIDR networks, "
                f"comma-separated) or turn the protection off with SSRF_PROTECTION=0")


_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="resolve")


class Download:
    """One image download: every connection it opens is checked against the guard, and all of
    them are shut down when FETCH_DEADLINE_S passes (a read blocked on a trickling server then
    fails at once)."""

    def __init__(self, guard: AddressGuard, deadline_s: float) -> None:
        self.guard, self.deadline_s = guard, deadline_s
        self.deadline = time.monotonic() + deadline_s
        self.expired = False
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left before the deadline (0 once past it)."""
        return max(self.deadline - time.monotonic(), 0.0)

    def address(self, host: str, port: int) -> str:
        """The address to connect to for ``host``: every address it resolves to is checked (one
        refused address refuses the host). The lookup is bounded by the deadline too: it runs on a
        small pool (a hung resolver keeps a pool thread, not the request's)."""
        lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=self.remaining())  # gaierror: unreachable
        except concurrent.futures.TimeoutError:
            raise self.timeout_error() from None
        addresses = [info[4][0] for info in infos]
        for address in addresses:
            why = self.guard.refusal(host, address)
            if why is not None:
                raise AddressRefused(f"image host {why}")
        if self.expired:
            raise self.timeout_error()
        return addresses[0]

    def register(self, sock: socket.socket) -> None:
        """Track ``sock`` so the deadline can close it; ``ImageUnavailable`` when already past it."""
        with self._lock:
            if self.expired:
                raise self.timeout_error()
            self._sockets.append(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def timeout_error(self) -> ImageUnavailable:
        """The error a download past FETCH_DEADLINE_S ends with."""
        return ImageUnavailable(f"the image download did not finish within FETCH_DEADLINE_S ({self.deadline_s:g} s)")

    def close(self) -> None:
        """Cancel the deadline's timer (the download is over)."""
        self._timer.cancel()


def _guarded_pools(download: Download) -> Dict[str, type]:
    """urllib3 pool classes whose connections go to the address ``download.address`` checked and
    are registered with ``download`` (TLS still verifies the host name: only the address is
    pinned)."""

    def guarded(base: type) -> type:
        class Guarded(base):
            def _new_conn(self):
                name = self._dns_host
                pinned = download.address(self.host, self.port)
                self._dns_host = pinned  # what urllib3 connects to; restored before TLS reads self.host
                try:
                    sock = super()._new_conn()
                finally:
                    self._dns_host = name
                try:
                    download.register(sock)
                except BaseException:
                    sock.close()
                    raise
                return sock
        return Guarded

    http_conn, https_conn = guarded(HTTPConnection), guarded(HTTPSConnection)
    return {"http": type("GuardedPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedTLSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})}


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, download: Download) -> None:
        self._download = download  # before HTTPAdapter.__init__, which makes the pool manager
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _guarded_pools(self._download)


class LimitedSession(requests.Session):
    """A session for one download: GETs with a per-read timeout, at most ``max_bytes`` of body,
    connections checked and cut at the deadline by ``download``."""

    def __init__(self, timeout: float, max_bytes: int, download: Download) -> None:
        super().__init__()
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.download = download
        adapter = _GuardedAdapter(download)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def get(self, url, **kwargs):  # noqa: D401 - requests' signature
        """``requests``' GET, streamed and read whole within the download's deadline; an answer whose
        Content-Length or body passes MAX_IMAGE_MB is ``ImageTooLarge``."""
        kwargs.setdefault("timeout", max(min(self.timeout, self.download.remaining()), 0.001))
        kwargs["stream"] = True
        r = super().get(url, **kwargs)
        if r.ok:
            length = r.headers.get("Content-Length", "").strip()
            if length.isascii() and length.isdigit() and int(length) > self.max_bytes:
                r.close()
                raise ImageTooLarge(f"image at {short_url(url)} is {int(length) / 2**20:.1f} MB, over MAX_IMAGE_MB "
                                    f"({self.max_bytes / 2**20:g} MB)")
            buf = bytearray()
            for chunk in r.iter_content(1 << 16):
                buf += chunk
                if len(buf) > self.max_bytes:
                    r.close()
                    raise ImageTooLarge(f"image at {short_url(url)} is over MAX_IMAGE_MB ({self.max_bytes / 2**20:g} MB)")
                if self.download.expired:
                    r.close()
                    raise self.download.timeout_error()
            r._content = bytes(buf)
            r._content_consumed = True
        return r


def short_url(url: str, n: int = 100) -> str:
    """``url`` cut to ``n`` characters, control characters escaped (a NUL or a newline must not
    reach the log as is)."""
    head = url if len(url) <= n else url[: n - 3]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    return head if len(url) <= n else head + "..."
