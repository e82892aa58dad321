"""gunicorn settings, from backend/server_settings.py (HOST, PORT, WORKERS, THREADS, LOG_LEVEL, PRELOAD_MODEL).

gthread workers: /health and /setup answer from another thread while a click is being decoded.
Each worker process loads its own model, lazily; ``preload_app`` stays off on purpose.
/metrics sums all workers' counters through prometheus_client's multi-process mode: the master
gives the workers a ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary one unless set) and removes it
on exit.
"""

import glob
import json
import os
import shutil
import tempfile

import gunicorn.util

from backend import background
from backend.server_settings import BackendSettings

_s = BackendSettings.from_env()

bind = f"{_s.host}:{_s.port}"
workers = _s.workers
threads = _s.threads
worker_class = "gthread"
timeout = 300  # a first /predict may load (or download) a large SAM; Label Studio waits 100 s
graceful_timeout = 30
keepalive = 5
preload_app = False
loglevel = _s.log_level.lower()
accesslog = "-"
errorlog = "-"


def _json_write_error(sock, status_int, reason, mesg):
    """gunicorn's own error answers (414 request line too long, 431 headers too large, 400 bad
    request line...) as the backend's JSON ``{"error", "status"}`` instead of an HTML page; gunicorn
    has no setting for them, so its writer is replaced (the master loads this file before forking)."""
    body = json.dumps({"error": f"{reason}: {mesg}"[:300], "status": int(status_int)}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1", "replace")
    gunicorn.util.write_nonblock(sock, head + body)


gunicorn.util.write_error = _json_write_error


_METRICS_DIR_PREFIX = "stable-sam-metrics-"  # the temporary directories this file makes (and removes)


def on_starting(server):
    """Before any worker forks, so every worker inherits the directory; prometheus_client picks its
    multi-process mode when first imported, so the master must not import it before this. Then
    the line saying what serves and on which device (resolved: "cpu", not "auto"), right after
    gunicorn's own first line; torch is asked without initialising CUDA (a CUDA context made
    before the fork would break the workers')."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        # A directory given from outside may hold a previous run's counts: they would be summed in.
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=_METRICS_DIR_PREFIX)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    from backend.ml_backend import describe_serving  # imports prometheus_client: after the directory is set

    server.log.info("Stable-SAM backend: serving %s", describe_serving(_s))


def child_exit(server, worker):
    """gunicorn hook: a worker exited; its Prometheus multiprocess files are marked dead."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """gunicorn hook: the server stops; the temporary Prometheus folder it made is removed."""
    # Known by its name, not a module global: a HUP reload re-reads this file.
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.dirname(path) == tempfile.gettempdir() and os.path.basename(path).startswith(_METRICS_DIR_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


def post_worker_init(worker):
    """gunicorn hook: with PRELOAD_MODEL, a new worker loads its model in the background."""
    if _s.preload_model:
        backend = worker.wsgi.extensions["stable_sam_backend"]
        background.start(lambda: backend.model, "preload-model")  # joined at exit, as every model thread
