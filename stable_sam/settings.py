"""Model-side configuration from the environment, read in one place.

The backend's settings (``backend/settings.py``) extend these with the Label Studio ones; the
README lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models"
SAM_TINY_CHECKPOINT = REPO_ROOT / "checkpoints" / "sam_tiny.pt"


def _env_path(name: str) -> Optional[Path]:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class ModelSettings:
    model_dir: Path = DEFAULT_MODEL_DIR  # MODEL_DIR: downloads, plugin versions, embedding store
    device: str = "auto"  # DEVICE: auto | cpu | cuda | cuda:N
    sam_model_type: str = "sam_tiny"  # SAM_MODEL_TYPE: sam_tiny | vit_b | vit_l | vit_h
    sam_checkpoint: Optional[Path] = None  # SAM_CHECKPOINT: official weights file (else MODEL_DIR)
    plugin_checkpoint: Optional[Path] = None  # PLUGIN_CHECKPOINT: a plugin file (else no-op plugin)
    embedding_cache_mb: float = 512.0  # EMBEDDING_CACHE_MB: in-memory embedding LRU budget
    embedding_disk_cache: bool = False  # EMBEDDING_DISK_CACHE=1: also keep embeddings under MODEL_DIR
    # PLUGIN_VERSION: serve this plugin version (a name under MODEL_DIR/plugins/, or the default
    # plugin's own version) for every project, whatever each project's current version is: a pin
    # or a rollback. Empty: each project serves its current version (else the default plugin).
    plugin_version: str = ""

    @classmethod
    def from_env(cls) -> "ModelSettings":
        env = os.environ
        return cls(
            model_dir=_env_path("MODEL_DIR") or DEFAULT_MODEL_DIR,
            device=env.get("DEVICE", "auto").strip() or "auto",
            sam_model_type=env.get("SAM_MODEL_TYPE", "").strip() or "sam_tiny",
            sam_checkpoint=_env_path("SAM_CHECKPOINT"),
            plugin_checkpoint=_env_path("PLUGIN_CHECKPOINT"),
            embedding_cache_mb=float(env.get("EMBEDDING_CACHE_MB", "512")),
            embedding_disk_cache=env.get("EMBEDDING_DISK_CACHE", "0").strip().lower() in ("1", "true", "yes"),
            plugin_version=env.get("PLUGIN_VERSION", "").strip(),
        )
