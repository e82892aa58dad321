"""Logging for the backend processes: one format, level from LOG_LEVEL."""

from __future__ import annotations

import logging


def configure_logging(level: str = "INFO") -> None:
    """One log format for the backend's processes (a handler added unless the root logger has one), at ``level``."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
