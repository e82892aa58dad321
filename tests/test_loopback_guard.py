"""The tests' network guard (backend/testing/loopback_guard.py, installed by conftest.py for every test):
a connection outside 127.0.0.0/8 and ::1 is refused before any packet leaves, and recorded so that
the test fails even when the code under test turns the error into an answer."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from backend.testing import loopback_guard
from backend.app import create_app
from backend.guarded_fetch import AddressGuard
from backend.ml_backend import StableSamBackend
from backend.server_settings import BackendSettings
from backend_helpers import RECOMMENDED_CONFIG, centroid, drawn_scene, keypoint

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("10.0.0.1", "169.254.169.254", "192.168.0.1", "8.8.8.8", "0.0.0.0", "::ffff:10.0.0.1", "2001:db8::1")


@pytest.fixture
def expect_refused():
    """The test's own refused connections: checked by the test, then taken off the record that
    ``loopback_only`` (conftest) fails a test on."""
    before = len(loopback_guard.refused)
    seen: list = []
    yield seen
    seen.extend(loopback_guard.refused[before:])
    del loopback_guard.refused[before:]


def test_connections_outside_loopback_are_refused_and_recorded(expect_refused):
    for host in OUTSIDE:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            with pytest.raises(loopback_guard.OutsideLoopback):
                s.connect((host, 9))
        with socket.socket(family, socket.SOCK_STREAM) as s:
            with pytest.raises(loopback_guard.OutsideLoopback):
                s.connect_ex((host, 9))
    with pytest.raises(loopback_guard.OutsideLoopback):
        socket.create_connection(("169.254.169.254", 80), timeout=5)
    with pytest.raises(requests.ConnectionError, match="outside loopback"):
        requests.get("http://192.168.0.1:9/x.png", timeout=5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a UDP "connection" too
        with pytest.raises(loopback_guard.OutsideLoopback):
            s.connect(("10.0.0.1", 53))
    assert len(loopback_guard.refused) >= 2 * len(OUTSIDE) + 3


def test_loopback_and_unix_sockets_still_work(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept()[0].sendall(b"hi"), daemon=True).start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.recv(2) == b"hi"
    server.close()
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "::ffff:127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                assert s.connect_ex((host, port)) != 0  # closed now: refused by the kernel, not the guard
        except OSError as e:  # e.g. no IPv6 on this machine
            assert not isinstance(e, loopback_guard.OutsideLoopback), e
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            conn, _ = listener.accept()
            c.sendall(b"unix")
            assert conn.recv(4) == b"unix"
            conn.close()


def test_an_ssrf_guard_regression_sends_nothing_and_is_caught(tmp_path, tiny_model, monkeypatch, expect_refused):
    """What the guard is for: with the SSRF guard broken (every address allowed), the backend tries
    10.0.0.1; the connection is refused here, before a packet leaves, and is on the record."""
    monkeypatch.setattr(AddressGuard, "refusal", lambda self, host, address: None)
    settings = BackendSettings(local_files_root=tmp_path, model_dir=tmp_path / "models", fetch_deadline_s=5.0)
    c = create_app(backend=StableSamBackend(settings, model=tiny_model)).test_client()
    sc = drawn_scene(3)
    r = c.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "http://10.0.0.1/x.png"}}],
                                 "label_config": RECOMMENDED_CONFIG,
                                 "params": {"context": {"result": [keypoint(*centroid(sc.masks[0]), sc.size)]}}})
    assert r.status_code == 422  # the backend saw an unreachable host: alone, this answer would pass for "refused"
    assert loopback_guard.refused[-1] == "10.0.0.1:80"


def test_the_guard_can_wrap_a_subprocess():
    """``python -m backend.testing.loopback_guard -m MODULE``: how the soak script starts its backend."""
    code = "import socket; socket.create_connection(('10.0.0.1', 80), timeout=5)"
    run = subprocess.run([sys.executable, "-m", "backend.testing.loopback_guard", "-m", "timeit", "-n", "1", code],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "OutsideLoopback" in run.stderr and "refused a connection to 10.0.0.1:80" in run.stderr
