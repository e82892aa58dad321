"""gunicorn settings, from backend/settings.py (HOST, PORT, WORKERS, THREADS, LOG_LEVEL, PRELOAD_MODEL).

gthread workers: /health and /setup answer from another thread while a click is being decoded.
Each worker process loads its own model, lazily; ``preload_app`` stays off on purpose.
"""

import threading

from backend.settings import BackendSettings

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


def post_worker_init(worker):
    if _s.preload_model:
        backend = worker.wsgi.extensions["stable_sam_backend"]
        threading.Thread(target=lambda: backend.model, name="preload-model", daemon=True).start()
