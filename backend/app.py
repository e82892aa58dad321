"""The Flask app: label-studio-ml 2.x's routes and JSON, served by our own small app.

    GET  /health, GET /   {"status": "UP", "model_class": ..., ...}      (no auth; never loads)
    POST /setup            {"model_version": ...}                           (never loads the model)
    POST /predict          {"results": [{"model_version", "score", "result"}, ...]}
    POST /webhook          annotation events / START_TRAINING
    GET  /versions         {"versions": [...]}
    GET  /metrics          Prometheus text (?format=json: JSON)

Bad input is a 4xx ``{"error": message}``; anything unexpected a 500 ``{"error": ...}`` without a
traceback (that goes to the log).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from typing import Any, Dict, Optional

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .errors import BadInput
from .model import TRAIN_EVENTS, NotImplementedYet, StableSamBackend
from .settings import BackendSettings

log = logging.getLogger(__name__)

PUBLIC_ROUTES = ("/health",)


def _error(message: str, status: int) -> Response:
    resp = jsonify({"error": message, "status": status})
    resp.status_code = status
    return resp


def _json_body() -> Dict[str, Any]:
    data = request.get_json(silent=True, force=True)
    if data is None:
        raw = request.get_data(cache=True)
        if not raw:
            raise BadInput("empty request body: expected a JSON object")
        raise BadInput(f"malformed JSON body ({len(raw)} bytes): expected a JSON object")
    if not isinstance(data, dict):
        raise BadInput(f"the JSON body must be an object, got {type(data).__name__}")
    return data


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


def create_app(settings: Optional[BackendSettings] = None, backend: Optional[StableSamBackend] = None) -> Flask:
    """The app factory. ``backend`` lets tests share a loaded model; else one is made from
    ``settings`` (default: the environment) and loads its model on the first /predict."""
    settings = settings or (backend.settings if backend is not None else BackendSettings.from_env())
    backend = backend or StableSamBackend(settings)
    app = Flask("stable_sam_backend")
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_request_mb * 2**20)
    app.json.sort_keys = False
    app.extensions["stable_sam_backend"] = backend
    metrics = backend.metrics
    when = "loading in the background" if settings.preload_model else "loads on the first /predict"
    log.info("Stable-SAM backend: serving %s (model %s)", backend.describe_model(), when)

    @app.before_request
    def _before():
        g.t0 = time.perf_counter()
        if settings.auth_enabled and request.path not in PUBLIC_ROUTES and not _check_auth(settings):
            resp = _error("authentication required: this backend uses basic auth (BASIC_AUTH_USER / "
                          "BASIC_AUTH_PASS); set it in the model's connection settings in Label Studio", 401)
            resp.headers["WWW-Authenticate"] = 'Basic realm="stable-sam-backend"'
            return resp
        return None

    @app.after_request
    def _after(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.count("requests_total", route=route, status=resp.status_code)
        if resp.status_code >= 400:
            metrics.count("errors_total", route=route, status=resp.status_code)
        metrics.count("request_seconds_total", time.perf_counter() - g.get("t0", time.perf_counter()), route=route)
        return resp

    @app.errorhandler(BadInput)
    def _bad_input(e: BadInput):
        log.warning("%s %s -> %d: %s", request.method, request.path, e.status, e.message)
        return _error(e.message, e.status)

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        if e.code == 413:
            return _error(f"request body over MAX_REQUEST_MB ({settings.max_request_mb:g} MB)", 413)
        return _error(f"{e.name}: {e.description}", e.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return _error(f"internal error ({e.__class__.__name__}); see the backend log", 500)

    def _health():
        version = backend.model_version(0)
        body = {"status": "UP", "model_class": "StableSamBackend", "model_loaded": backend.model_loaded,
                "model_version": version}
        if backend.version_error:
            body["model_error"] = backend.version_error
        return jsonify(body)

    app.add_url_rule("/health", "health", _health, methods=["GET"])
    app.add_url_rule("/", "index", _health, methods=["GET"])

    @app.post("/setup")
    def setup():
        data = _json_body()
        backend.setup(data.get("project"), data.get("schema"))
        version = backend.model_version(2.5)
        if version is None:
            msg = backend.version_error or "the model version is still being computed; retry"
            return _error(f"model not available: {msg}", 503)
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict():
        data = _json_body()
        tasks = data.get("tasks")
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        context = params.get("context", data.get("context"))
        kind = "interactive" if context else "batch"
        t = time.perf_counter()
        results = backend.predict(tasks, context=context, label_config=data.get("label_config"),
                                  project=data.get("project"))
        metrics.count("predict_seconds_total", time.perf_counter() - t, kind=kind)
        metrics.count("predict_calls_total", kind=kind)
        return jsonify({"results": results})

    @app.post("/webhook")
    def webhook():
        data = _json_body()
        action = data.get("action")
        if not isinstance(action, str) or not action:
            raise BadInput("webhook body needs an 'action'")
        if action not in TRAIN_EVENTS:
            return jsonify({"status": "Unknown event", "action": action}), 200
        metrics.count("webhook_events_total", action=action)
        try:
            result = backend.fit(action, data)
        except NotImplementedYet as e:
            log.info("webhook %s: %s", action, e)
            if action == "START_TRAINING":
                return _error(str(e), 422)
            return jsonify({"status": "ignored", "reason": str(e)}), 200
        return jsonify(result or {}), 201

    @app.get("/versions")
    def versions():
        version = backend.model_version(2.5)
        return jsonify({"versions": [version] if version else []})

    @app.get("/metrics")
    def metrics_route():
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
        if request.args.get("format") == "json":
            return jsonify(metrics.snapshot({**extra, "model_version": backend.model_version(0)}))
        return Response(metrics.prometheus(extra), mimetype="text/plain; version=0.0.4")

    return app
