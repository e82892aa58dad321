"""``backend.label_studio.connect`` against a fake Label Studio served under a path prefix: a
legacy token, a personal access token exchanged once and reused, and an expired one refused clearly."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List

import jwt
import pytest

from backend.label_studio import LabelStudioUnavailable, connect

_KEY = "test-signing-key-0123456789abcdef0123456789"
REFRESH = jwt.encode({"token_type": "refresh", "exp": 4102444800}, _KEY, algorithm="HS256")
EXPIRED = jwt.encode({"token_type": "refresh", "exp": 1000000000}, _KEY, algorithm="HS256")
ACCESS = jwt.encode({"token_type": "access", "exp": 4102444800}, _KEY, algorithm="HS256")
LEGACY = "legacy-token-123"


class _LabelStudio(BaseHTTPRequestHandler):
    seen: List[str] = []

    def log_message(self, *args):
        pass

    def _send(self, code: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.seen.append(f"POST {self.path}")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/ls/api/token/refresh/" and body.get("refresh") == REFRESH:
            return self._send(200, {"access": ACCESS})
        self._send(404 if self.path != "/ls/api/token/refresh/" else 401, {"detail": "no"})

    def do_GET(self):
        self.seen.append(f"GET {self.path}")
        if not self.path.startswith("/ls/api/current-user/whoami"):
            return self._send(404, {"detail": "not found"})
        if self.headers.get("Authorization") not in (f"Token {LEGACY}", f"Bearer {ACCESS}"):
            return self._send(401, {"detail": "Authentication credentials were not provided."})
        self._send(200, {"id": 1, "username": "annotator", "email": "a@example.com"})


@pytest.fixture(scope="module")
def label_studio():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ls"
    server.shutdown()


def test_legacy_token_is_sent_as_is(label_studio):
    _LabelStudio.seen.clear()
    connect(label_studio, LEGACY, timeout=5)
    assert _LabelStudio.seen == ["GET /ls/api/current-user/whoami"]


@pytest.mark.parametrize("slash", ["", "/"])
def test_personal_access_token_is_exchanged_under_the_path_prefix_once(label_studio, slash):
    _LabelStudio.seen.clear()
    client = connect(label_studio + slash, REFRESH, timeout=5)
    client.users.whoami()
    assert _LabelStudio.seen == ["POST /ls/api/token/refresh/"] + ["GET /ls/api/current-user/whoami"] * 2


def test_expired_or_refused_token_is_a_clear_error(label_studio):
    with pytest.raises(LabelStudioUnavailable, match="HTTP 401: check LABEL_STUDIO_API_KEY"):
        connect(label_studio, EXPIRED, timeout=5)
    other = jwt.encode({"token_type": "refresh", "exp": 4102444800}, "another-key-0123456789abcdef0123456789",
                       algorithm="HS256")
    with pytest.raises(LabelStudioUnavailable, match="HTTP 401: check LABEL_STUDIO_API_KEY"):
        connect(label_studio, other, timeout=5)
