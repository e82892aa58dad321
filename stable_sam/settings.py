"""Model-side configuration from the environment, read in one place.

The backend's settings (``backend/server_settings.py``) extend these with the Label Studio ones;
``docs/configuration.md`` lists them all (a test checks it against both modules).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models"
SAM_TINY_CHECKPOINT = REPO_ROOT / "checkpoints" / "sam_tiny.pt"
SAM_TINY_PLUGIN = REPO_ROOT / "checkpoints" / "plugin_sam_tiny_rts.pt"  # one RTS epoch on the shipped small SAM
NO_PLUGIN = "none"  # PLUGIN_CHECKPOINT=none: plain SAM even where a plugin ships


def _env_path(name: str) -> Optional[Path]:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class ModelSettings:
    """The model's settings, each field's environment variable in its comment (``from_env``)."""
    model_dir: Path = DEFAULT_MODEL_DIR  # MODEL_DIR: downloads, plugin versions, embedding store
    device: str = "auto"  # DEVICE: auto | cpu | cuda | cuda:N
    # SAM_MODEL_TYPE: sam_tiny | vit_b | vit_l | vit_h (segment_anything) | sam2.1_hiera_tiny | sam2.1_hiera_small
    # | sam2.1_hiera_base_plus | sam2.1_hiera_large (Meta's sam2 package)
    sam_model_type: str = "sam_tiny"
    sam_checkpoint: Optional[Path] = None  # SAM_CHECKPOINT: official weights file (else MODEL_DIR)
    plugin_checkpoint: Optional[Path] = None  # PLUGIN_CHECKPOINT: a plugin file
    # PLUGIN_CHECKPOINT unset: serve the plugin shipped for this SAM (the committed small SAM has one;
    # vit_b/l/h and SAM 2.1 have none: plain SAM's masks). PLUGIN_CHECKPOINT=none: no plugin.
    shipped_plugin: bool = False
    embedding_cache_mb: float = 512.0  # EMBEDDING_CACHE_MB: in-memory embedding LRU budget
    embedding_disk_cache: bool = False  # EMBEDDING_DISK_CACHE=1: also keep embeddings under MODEL_DIR
    # PLUGIN_VERSION: serve this plugin version (a name under MODEL_DIR/plugins/, or the default
    # plugin's own version) for every project, whatever each project's current version is: a pin
    # or a rollback. Empty: each project serves its current version (else the default plugin).
    plugin_version: str = ""

    @classmethod
    def from_env(cls) -> "ModelSettings":
        """The settings from the environment (an unset variable: its default)."""
        env = os.environ
        plugin_env = env.get("PLUGIN_CHECKPOINT", "").strip()
        return cls(
            model_dir=_env_path("MODEL_DIR") or DEFAULT_MODEL_DIR,
            device=env.get("DEVICE", "auto").strip() or "auto",
            sam_model_type=env.get("SAM_MODEL_TYPE", "").strip() or "sam_tiny",
            sam_checkpoint=_env_path("SAM_CHECKPOINT"),
            plugin_checkpoint=None if plugin_env.lower() == NO_PLUGIN else _env_path("PLUGIN_CHECKPOINT"),
            shipped_plugin=not plugin_env,
            embedding_cache_mb=float(env.get("EMBEDDING_CACHE_MB", "512")),
            embedding_disk_cache=env.get("EMBEDDING_DISK_CACHE", "0").strip().lower() in ("1", "true", "yes"),
            plugin_version=env.get("PLUGIN_VERSION", "").strip(),
        )

    @property
    def plugin_path(self) -> Optional[Path]:
        """The plugin file that serves: PLUGIN_CHECKPOINT's, else the shipped one for this SAM
        (only the committed small SAM has one), else None (the no-op plugin: plain SAM's masks)."""
        if self.plugin_checkpoint is not None:
            return self.plugin_checkpoint
        if self.shipped_plugin and self.sam_model_type == "sam_tiny" and self.sam_checkpoint is None:
            return SAM_TINY_PLUGIN
        return None

    def plain_sam_notice(self) -> Optional[str]:
        """None when a plugin serves; else what is served and the one command that makes a plugin."""
        if self.plugin_path is not None:
            return None
        return (f"plain SAM masks: no Stable-SAM plugin is configured for {self.sam_model_type}. Make one with one "
                f"RTS epoch on your own labels (python scripts/finetune.py --model-type {self.sam_model_type} "
                f"--label-studio-url URL --project N --store MODEL_DIR --device cuda) or on a public set such as "
                f"HQ-SAM's HQSeg-44K (python scripts/finetune.py --model-type {self.sam_model_type} --dataset "
                f"<images + mask PNGs folder> --device cuda --out plugin.pt), then set PLUGIN_CHECKPOINT")
