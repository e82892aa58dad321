"""Plugin versions on disk, per base model and per scope, and the pointer to the one that serves.

Layout under ``root`` (``MODEL_DIR``)::

    plugins/<base model id>/<scope>/<version>.pt     a plugin checkpoint (``save_plugin``), with its summary
    plugins/<base model id>/<scope>/current.json     {"version": ..., "activated": ..., "previous": ...}

A scope is an opaque name (the Label Studio backend uses ``project-<id>``): versions of one scope
never change what another scope serves. Every file is written atomically (temporary file + rename),
so a reader sees the old pointer or the new one, and a version file is complete or absent. Plugins
live under their base model's id because a plugin is trained for one frozen SAM.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .checkpoint import TEMP_SUFFIX, PluginCheckpoint, atomic_write_json, load_plugin, save_plugin
from .download import CheckpointError
from .modeling.plugin import StableSamPlugin

POINTER = "current.json"
# Names become file and directory names: no separators, no leading dot (temporary files have one).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")  # \Z: "$" would also take a trailing newline


def project_scope(project: int) -> str:
    """The scope of a Label Studio project's versions: ``project-<id>``."""
    return f"project-{int(project)}"


class StoreError(CheckpointError):
    """A bad scope or version name, an unknown version, or a version that already exists."""


def check_name(name: str, what: str) -> str:
    """``name`` when it is a valid scope or version name (letters, digits, . _ + -, at most 128,
    no .pt / .json ending); else ``StoreError`` naming ``what`` and a shortened ``name``."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith((".pt", ".json")):
        shown = repr(name) if len(repr(name)) <= 100 else repr(name)[:97] + "..."  # never echo a name whole
        raise StoreError(f"{what} {shown} is not a valid name (letters, digits, . _ + -, at most 128)")
    return name


@dataclass
class VersionInfo:
    """One stored version: its name, scope, file, creation time and training summary."""

    version: str
    scope: str
    path: Path
    created: str = ""
    summary: Dict[str, Any] = field(default_factory=dict)


class PluginStore:
    """The plugin versions of one base model under ``root/plugins/<base_id>``."""

    def __init__(self, root: Union[str, Path], base_id: str) -> None:
        self.base_id = check_name(base_id, "base model id")
        self.dir = Path(root) / "plugins" / base_id
        self._info_lock = threading.Lock()
        self._info: Dict[Path, Tuple[Tuple[int, int], str, Dict[str, Any]]] = {}

    # -- names and files ---------------------------------------------------------------------------
    def scope_dir(self, scope: str) -> Path:
        """The folder of ``scope``'s versions."""
        return self.dir / check_name(scope, "scope")

    def path(self, scope: str, version: str) -> Path:
        """The checkpoint file of ``version`` in ``scope``."""
        return self.scope_dir(scope) / f"{check_name(version, 'version')}.pt"

    def scopes(self) -> List[str]:
        """Every scope with a folder, sorted."""
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, scope: str) -> List[VersionInfo]:
        """The scope's versions, oldest first, with their summaries (read once per file)."""
        d = self.scope_dir(scope)
        if not d.is_dir():
            return []
        out = []
        for p in d.glob("*.pt"):
            if not _NAME.match(p.stem):
                continue
            try:
                created, summary = self._read_info(p)
            except CheckpointError:
                continue  # not a plugin file: not a version
            out.append(VersionInfo(p.stem, scope, p, created, summary))
        return sorted(out, key=lambda v: (v.created, v.version))

    def _read_info(self, path: Path) -> Tuple[str, Dict[str, Any]]:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        with self._info_lock:
            hit = self._info.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        ckpt = load_plugin(path)
        with self._info_lock:
            self._info[path] = (stamp, ckpt.created, ckpt.summary)
        return ckpt.created, ckpt.summary

    def find(self, version: str) -> Optional[Tuple[str, Path]]:
        """(scope, file) of ``version`` in any scope, or None."""
        check_name(version, "version")
        for scope in self.scopes():
            p = self.dir / scope / f"{version}.pt"
            if p.is_file():
                return scope, p
        return None

    def all_versions(self) -> List[str]:
        """Every version of every scope, sorted."""
        return sorted({v.version for s in self.scopes() for v in self.versions(s)})

    # -- writing -----------------------------------------------------------------------------------
    def save(self, scope: str, plugin: StableSamPlugin, version: str, base_model: Dict[str, str],
             summary: Optional[Dict[str, Any]] = None) -> Path:
        """Write a new version (atomically); an existing version is never overwritten."""
        path = self.path(scope, version)
        if path.exists():
            raise StoreError(f"plugin version {version} already exists in {path.parent}")
        return save_plugin(plugin, path, version, base_model, summary)

    def load(self, scope: str, version: str, model_type: Optional[str] = None) -> PluginCheckpoint:
        """``version`` of ``scope`` as a ``PluginCheckpoint`` (checked against ``model_type`` when given)."""
        return load_plugin(self.path(scope, version), model_type=model_type)

    # -- the pointer -------------------------------------------------------------------------------
    def pointer_stamp(self, scope: str) -> Optional[Tuple[int, int, int]]:
        """Changes whenever the pointer is rewritten (a rename gives a new inode): a cheap check
        that lets every process notice a switch without reading the file."""
        try:
            st = (self.scope_dir(scope) / POINTER).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def current(self, scope: str) -> Optional[str]:
        """The version the scope serves, or None (no pointer yet, or an unreadable one)."""
        try:
            data = json.loads((self.scope_dir(scope) / POINTER).read_text())
        except (FileNotFoundError, ValueError):
            return None
        version = data.get("version") if isinstance(data, dict) else None
        return version if isinstance(version, str) and _NAME.match(version) else None

    def activate(self, scope: str, version: str) -> None:
        """Point the scope at ``version`` (which must exist), atomically."""
        path = self.path(scope, version)
        if not path.is_file():
            known = [v.version for v in self.versions(scope)]
            raise StoreError(f"no plugin version {version} in {path.parent} (versions: {known or 'none'})")
        atomic_write_json({"version": version, "previous": self.current(scope),
                           "activated": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                          self.scope_dir(scope) / POINTER)

    def clean_temp(self, scope: str) -> List[Path]:
        """Remove temporary files that a killed writer left in the scope (call it only when no
        writer of this scope runs)."""
        d = self.scope_dir(scope)
        removed = []
        for p in d.glob(f".*{TEMP_SUFFIX}") if d.is_dir() else []:
            try:
                os.unlink(p)
                removed.append(p)
            except FileNotFoundError:
                pass
        return removed
