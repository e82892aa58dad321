"""Checkpoint files, written atomically: a crash mid-write never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional, Union

import torch

from .download import CheckpointError
from .modeling.plugin import PluginConfig, StableSamPlugin

# Temporary files of atomic writes end so; a process killed mid-write can leave one behind.
TEMP_SUFFIX = ".tmp"


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename it over ``path``:
    readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the file is readable like any saved file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: Union[str, Path], compact: bool = False) -> Path:
    """``obj`` as a JSON file written atomically; the argument order of ``json.dump`` and
    ``torch.save``. Indented for the small files people read (status files, version pointers);
    ``compact`` for large outputs (a COCO file of thousands of masks)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=1)
    return atomic_write(path, lambda f: f.write(text.encode()))


PLUGIN_FORMAT = "stable-sam-plugin"
PLUGIN_FORMAT_VERSION = 1


@dataclass
class PluginCheckpoint:
    """A plugin file: weights, config, the base model it was trained on, version and summary."""

    plugin: StableSamPlugin
    version: str
    base_model: Dict[str, str]
    summary: Dict[str, Any] = field(default_factory=dict)
    created: str = ""


def save_plugin(plugin: StableSamPlugin, path: Union[str, Path], version: str,
                base_model: Dict[str, str], summary: Optional[Dict[str, Any]] = None) -> Path:
    """Write a plugin checkpoint atomically (CPU tensors; a few hundred KB).

    Args:
        plugin: the plugin whose config and weights are saved.
        path: the file to write.
        version: the plugin's version name (what ``model_version`` shows).
        base_model: the SAM it was trained on (``{"model_type": ..., "model_id": ...}``).
        summary: its training summary (JSON-serialisable).

    Returns:
        ``path``.
    """
    payload = {
        "format": PLUGIN_FORMAT,
        "format_version": PLUGIN_FORMAT_VERSION,
        "version": version,
        "config": plugin.config.to_dict(),
        "base_model": dict(base_model),
        "summary": summary or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "state_dict": {k: v.detach().cpu() for k, v in plugin.state_dict().items()},
    }
    return atomic_torch_save(payload, path)


def load_plugin(path: Union[str, Path], model_type: Optional[str] = None) -> PluginCheckpoint:
    """Read a plugin checkpoint.

    Args:
        path: a file ``save_plugin`` wrote.
        model_type: refuse a plugin trained on another base model type (None: any).

    Returns:
        A ``PluginCheckpoint``: the plugin (eval mode), its version, base model, summary, time made.

    Raises:
        CheckpointError: the file is missing, unreadable, not a plugin, or for another model type.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"plugin checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"plugin checkpoint {path} is unreadable: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != PLUGIN_FORMAT:
        raise CheckpointError(f"{path} is not a Stable-SAM plugin checkpoint")
    base = payload.get("base_model", {})
    if model_type is not None and base.get("model_type") != model_type:
        raise CheckpointError(f"plugin {path} was trained on base model {base.get('model_type')!r}, "
                              f"but the model serving is {model_type!r}")
    plugin = StableSamPlugin(PluginConfig.from_dict(payload["config"]))
    plugin.load_state_dict(payload["state_dict"])
    plugin.eval()
    return PluginCheckpoint(plugin, str(payload["version"]), base, payload.get("summary", {}),
                            payload.get("created", ""))
