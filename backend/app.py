"""The Flask app: label-studio-ml 2.x's routes and JSON, served by our own small app.

    GET  /health, GET /   {"status": "UP", "model_class": ..., ...}      (no auth; never loads)
    POST /setup            {"model_version": ...}                           (never loads the model)
    POST /predict          {"results": [{"model_version", "score", "result"}, ...]}
    POST /webhook          annotation events / START_TRAINING (starts a training job, answers at once)
    POST /train            the same for Label Studio's older training call ({"project": "<id>.<ts>", ...})
    GET  /versions         {"versions": [...], "current", "details", "jobs", ...}   (?project=<id>)
    POST /versions/activate {"project": <id>, "version": ...}: a project back to one of its versions
    GET  /train/status     a training job's status (?project=<id>, or /train/status/<job id>)
    POST /train/cancel     stop a running job ({"project": <id>} or {"job_id": ...})
    GET  /metrics          Prometheus text (?format=json: JSON)

Bad input is a 4xx ``{"error": message}``; anything unexpected a 500 ``{"error": ...}`` without a
traceback (that goes to the log).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import socket
import time
from typing import Any, Callable, Dict, Optional

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .errors import BadInput, ClientGone, short_repr
from .ml_backend import TRAIN_EVENTS, StableSamBackend
from .projects import project_id
from .server_settings import BackendSettings

log = logging.getLogger(__name__)

PUBLIC_ROUTES = ("/health",)
MESSAGE_CHARS = 2000  # a backstop: messages quote what was sent through ``short_repr`` already


def _error(message: str, status: int) -> Response:
    resp = jsonify({"error": message[:MESSAGE_CHARS], "status": status})
    resp.status_code = status
    return resp


def _parse_json(raw: bytes) -> Any:
    """The body's JSON; BadInput (400) when it is not JSON or is nested past Python's recursion
    limit (json raises RecursionError there, not ValueError)."""
    try:
        return current_app.json.loads(raw)
    except RecursionError:
        raise BadInput(f"JSON body nested too deeply ({len(raw)} bytes): expected a JSON object") from None
    except ValueError as e:  # also bad UTF-8 and integers over Python's 4,300 digits
        raise BadInput(f"malformed JSON body ({len(raw)} bytes: {short_repr(str(e), 100)}): expected a JSON object") from None


def _body_bytes() -> bytes:
    raw = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # A chunked body (no Content-Length) is cut at the limit by werkzeug, not refused: a body that
    # reaches the limit is over it.
    if limit and len(raw) >= limit:
        raise RequestEntityTooLarge()
    return raw


def _json_body() -> Dict[str, Any]:
    raw = _body_bytes()
    if not raw.strip():
        raise BadInput("empty request body: expected a JSON object")
    data = _parse_json(raw)
    if not isinstance(data, dict):
        raise BadInput(f"the JSON body must be an object, got {type(data).__name__}")
    return data


def _optional_json_body() -> Dict[str, Any]:
    """The body's JSON object for routes where it is optional: {} when there is none."""
    raw = _body_bytes()
    data = _parse_json(raw) if raw.strip() else {}
    return data if isinstance(data, dict) else {}


def _client_gone_check() -> Optional[Callable[[], bool]]:
    """A cheap test of whether the client has closed its connection (gunicorn and werkzeug's
    server put the socket in the environ; None elsewhere, e.g. Flask's test client)."""
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    if sock is None:
        return None

    def gone() -> bool:
        try:  # the body has been read: an orderly close reads as b"", a live client as no data
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionError:
            return True
        except (OSError, ValueError):  # e.g. a TLS socket refuses recv flags: assume connected
            return False

    return gone


def _check_auth(settings: BackendSettings) -> bool:
    """Basic auth, both fields compared in constant time (no early exit on the user name)."""
    header = request.headers.get("Authorization", "")
    user, password = "", ""
    if header[:6].lower() == "basic ":
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            user, password = "", ""
    def same(given: str, expected: str) -> bool:  # digests first: equal lengths, nothing leaks the length
        return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())

    return same(user, settings.basic_auth_user) & same(password, settings.basic_auth_pass)


def _backend() -> StableSamBackend:
    """The app's ``StableSamBackend`` (one per app: ``create_app``)."""
    return current_app.extensions["stable_sam_backend"]


def _settings() -> BackendSettings:
    """The app's settings (``create_app``'s, which may differ from its backend's in tests)."""
    return current_app.extensions["stable_sam_settings"]


def _project_arg(data: Optional[Dict[str, Any]] = None) -> Optional[int]:
    """The project of ``?project=<id>`` (else ``data["project"]``), as an int; None when absent."""
    raw = request.args.get("project")
    if raw is None and data:
        raw = data.get("project")
    if raw is None:
        return None
    pid = project_id(raw)
    if pid is None:
        raise BadInput(f"project={short_repr(raw)} is not a Label Studio project id")
    return pid


def _started_or_ok(result: Dict[str, Any]):
    """A training call's answer: 201 when it started a job, else 200."""
    return jsonify(result), 201 if result.get("status") == "started" else 200


# --------------------------------------------------------------------------------------------------
# the routes (one blueprint; its request hooks and error handlers cover the whole app)

api = Blueprint("stable_sam", __name__)


@api.before_app_request
def _before():
    """Start the request's clock; refuse it (401) without basic auth when auth is on."""
    g.t0 = time.perf_counter()
    settings = _settings()
    if settings.auth_enabled and request.path not in PUBLIC_ROUTES and not _check_auth(settings):
        resp = _error("authentication required: this backend uses basic auth (BASIC_AUTH_USER / "
                      "BASIC_AUTH_PASS); set it in the model's connection settings in Label Studio", 401)
        resp.headers["WWW-Authenticate"] = 'Basic realm="stable-sam-backend"'
        return resp
    return None


@api.after_app_request
def _after(resp: Response) -> Response:
    """Count the request, its errors and its time per route."""
    metrics = _backend().metrics
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.count("requests_total", route=route, status=resp.status_code)
    if resp.status_code >= 400:
        metrics.count("errors_total", route=route, status=resp.status_code)
    metrics.count("request_seconds_total", time.perf_counter() - g.get("t0", time.perf_counter()), route=route)
    return resp


@api.app_errorhandler(BadInput)
def _bad_input(e: BadInput):
    if isinstance(e, ClientGone):
        log.info("%s %s: %s", request.method, request.path[:100], e.message)
    else:
        log.warning("%s %s -> %d: %s", request.method, request.path[:100], e.status, e.message[:MESSAGE_CHARS])
    return _error(e.message, e.status)


@api.app_errorhandler(RecursionError)
def _too_deep(e: RecursionError):
    # JSON nested within Python's parser limit can still be too deep for code walking it
    log.warning("%s %s -> 400: input nested too deeply", request.method, request.path[:100])
    return _error("input nested too deeply", 400)


@api.app_errorhandler(HTTPException)
def _http(e: HTTPException):
    if e.code == 413:
        return _error(f"request body over MAX_REQUEST_MB ({_settings().max_request_mb:g} MB)", 413)
    return _error(f"{e.name}: {e.description}", e.code or 500)


@api.app_errorhandler(Exception)
def _unexpected(e: Exception):
    log.exception("%s %s failed", request.method, request.path[:100])
    return _error(f"internal error ({e.__class__.__name__}); see the backend log", 500)


@api.get("/health", endpoint="health")
@api.get("/", endpoint="index")
def health():
    """Liveness: never loads the model; says which version serves and what the plugin is."""
    backend = _backend()
    body = {"status": "UP", "model_class": "StableSamBackend", "model_loaded": backend.model_loaded,
            "model_version": backend.model_version(wait_s=0)}
    if backend.version_error:
        body["model_error"] = backend.version_error
    notice = backend.settings.plain_sam_notice()
    if notice:
        body["plugin"] = notice
    return jsonify(body)


@api.post("/setup")
def setup():
    """Label Studio connects a project: its label config is checked; the model is not loaded."""
    backend = _backend()
    data = _json_body()
    backend.setup(data.get("project"), data.get("schema"))
    version = backend.model_version(data.get("project"), 2.5)  # what this project's predictions carry
    if version is None:
        msg = backend.version_error or "the model version is still being computed; retry"
        return _error(f"model not available: {msg}", 503)
    return jsonify({"model_version": version})


@api.post("/predict")
def predict():
    """Masks for a click session (``params.context``) or for tasks' stored prompts (batch)."""
    backend = _backend()
    data = _json_body()
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    context = params.get("context", data.get("context"))
    kind = "interactive" if context else "batch"
    t = time.perf_counter()
    results = backend.predict(data.get("tasks"), context=context, label_config=data.get("label_config"),
                              project=data.get("project"), client_gone=_client_gone_check())
    backend.metrics.count("predict_seconds_total", time.perf_counter() - t, kind=kind)
    backend.metrics.count("predict_calls_total", kind=kind)
    return jsonify({"results": results})


@api.post("/webhook")
def webhook():
    """Label Studio's events: the training ones start (or count toward) a training job."""
    backend = _backend()
    data = _json_body()
    action = data.get("action")
    if not isinstance(action, str) or not action:
        raise BadInput("webhook body needs an 'action'")
    if action not in TRAIN_EVENTS:
        return jsonify({"status": "Unknown event", "action": action[:100]}), 200
    backend.metrics.count("webhook_events_total", action=action)
    result = backend.fit(action, data)
    log.info("webhook %s: %s", action, {k: v for k, v in result.items() if k in ("status", "job_id", "project",
                                                                                "count", "reason")})
    return _started_or_ok(result)


@api.post("/train")
def train():
    """Label Studio's older training call: a training job for ``project``."""
    data = _json_body()
    if project_id(data.get("project")) is None:
        raise BadInput("/train needs 'project' (the Label Studio project id)")
    return _started_or_ok(_backend().fit("START_TRAINING", {"project": data["project"]}))


@api.get("/versions")
def versions():
    """The plugin versions (of ``?project=``, else the default) and the training jobs."""
    # Label Studio sends GET /versions with no query (its JSON body is dropped by GET)
    return jsonify(_backend().versions(_project_arg(_optional_json_body())))


@api.post("/versions/activate")
def versions_activate():
    """Point a project back to one of its versions."""
    data = _json_body()
    return jsonify(_backend().activate(data.get("project"), data.get("version")))


@api.get("/train/status")
@api.get("/train/status/<job_id>")
def train_status(job_id: Optional[str] = None):
    """A training job's status (by id or project), or every job."""
    project = _project_arg()
    if job_id is None and project is None:
        return jsonify({"jobs": _backend().jobs.jobs()})
    return jsonify(_backend().jobs.status(job_id, project))


@api.post("/train/cancel")
def train_cancel():
    """Stop a running training job (by ``job_id`` or ``project``)."""
    data = _optional_json_body()
    job_id = request.args.get("job_id") or data.get("job_id")
    project = _project_arg(data)
    if job_id is None and project is None:
        raise BadInput("give the job to cancel: {\"project\": <id>} or {\"job_id\": ...}")
    return jsonify(_backend().jobs.cancel(job_id, project))


def _cache_figures(backend: StableSamBackend) -> Dict[str, float]:
    """The image and embedding caches' counters (the latter once the model is loaded)."""
    extra: Dict[str, float] = {"model_loaded": float(backend.model_loaded),
                               "image_cache_hits_total": backend.images.hits,
                               "image_cache_misses_total": backend.images.misses}
    if backend.model_loaded:
        model = backend.model
        stats = model.cache.stats()
        extra.update({"embedding_cache_hits_total": stats["hits"],
                      "embedding_cache_misses_total": stats["misses"],
                      "embedding_cache_disk_hits_total": stats["disk_hits"],
                      "embedding_cache_entries": stats["entries"], "embedding_cache_mb": round(stats["mb"], 3),
                      "model_encoder_calls_total": model.encoder_calls})
    return extra


@api.get("/metrics", endpoint="metrics_route")
def metrics():
    """Prometheus text, or JSON with ``?format=json``."""
    backend = _backend()
    extra = _cache_figures(backend)
    if request.args.get("format") == "json":
        return jsonify(backend.metrics.snapshot({**extra, "model_version": backend.model_version(wait_s=0)}))
    return Response(backend.metrics.prometheus(extra), mimetype="text/plain; version=0.0.4")


def create_app(settings: Optional[BackendSettings] = None, backend: Optional[StableSamBackend] = None) -> Flask:
    """The app factory: the routes of ``api`` over one ``StableSamBackend``.

    Args:
        settings: the server's settings (default: ``backend``'s, else the environment).
        backend: a backend to serve (tests share a loaded model this way); default: a new one made
            from ``settings``, which loads its model on the first /predict.

    Returns:
        The Flask app (WSGI: ``backend.wsgi:app`` under gunicorn).
    """
    settings = settings or (backend.settings if backend is not None else BackendSettings.from_env())
    backend = backend or StableSamBackend(settings)
    app = Flask("stable_sam_backend")
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_request_mb * 2**20)
    app.json.sort_keys = False
    app.extensions["stable_sam_backend"] = backend
    app.extensions["stable_sam_settings"] = settings
    app.register_blueprint(api)
    when = "loading in the background" if settings.preload_model else "loads on the first /predict"
    log.info("Stable-SAM backend: serving %s (model %s)", backend.describe_model(), when)
    return app
