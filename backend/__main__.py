"""``python -m backend`` / ``stable-sam-serve``: start the backend with gunicorn (the same as ``make run``)."""

import os
import sys
from pathlib import Path


def main() -> None:
    """Replace this process with gunicorn serving ``backend.wsgi:app`` (``backend/gunicorn.conf.py``),
    run from the repository root."""
    root = Path(__file__).resolve().parents[1]
    os.chdir(root)
    conf = str(root / "backend" / "gunicorn.conf.py")
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "-c", conf, "backend.wsgi:app"])


if __name__ == "__main__":
    main()
