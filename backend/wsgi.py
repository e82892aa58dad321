"""gunicorn entry point: ``gunicorn -c backend/gunicorn.conf.py backend.wsgi:app``.

The app is made when a worker imports this module; the model loads on the first /predict (or, with
PRELOAD_MODEL=1, in a background thread as the worker starts). Never run gunicorn with
``--preload``: a model loaded before the fork would be shared copy-on-write (and CUDA breaks).
"""

from backend.logs import configure_logging
from backend.server_settings import BackendSettings

settings = BackendSettings.from_env()
configure_logging(settings.log_level)

from backend.app import create_app  # noqa: E402

app = create_app(settings)
