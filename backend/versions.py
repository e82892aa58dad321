"""Which plugin version each project serves, and the loaded plugins.

A project serves the current version of its scope ``project-<id>`` in the plugin store
(``MODEL_DIR/plugins/<base model>/project-<id>/``), else the default plugin (PLUGIN_CHECKPOINT,
else the untrained no-op one); PLUGIN_VERSION pins one version for every project. Every lookup
stats the project's pointer file, so when a training job activates a new version every worker
serves it from its next request, without a restart. The base model id and the default version
are known from the checkpoint files alone (a background thread at start), before the model loads.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from stable_sam.builders import model_identity, resolve_sam_checkpoint
from stable_sam.checkpoint import load_plugin
from stable_sam.download import OFFICIAL_CHECKPOINTS, CheckpointError
from stable_sam.model import UNTRAINED_PLUGIN, StableSam, model_version
from stable_sam.modeling.plugin import StableSamPlugin
from stable_sam.plugin_store import PluginStore, StoreError, project_scope

from . import background
from .bounded_cache import BoundedCache
from .errors import BadInput
from .projects import project_id
from .server_settings import BackendSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Serving:
    """The plugin version a request uses: its name, its file (None: the default plugin) and why."""

    version: str
    path: Optional[Path]
    source: str  # "default", "pinned" (PLUGIN_VERSION) or the project's scope


class PluginVersions:
    """The base model id, the default and pinned versions, each project's pointer and the plugin
    LRU (PLUGIN_CACHE_ITEMS / _MB); shared by every request thread."""

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self.error: Optional[str] = None  # why no version can be served (reported by /setup, /health)
        self.ready = threading.Event()  # set once the base model id is known, or known unknowable
        self.store: Optional[PluginStore] = None
        self.base: Optional[str] = None  # base model id, e.g. sam_tiny-c867453b268e
        self.default_version: Optional[str] = None  # the default plugin's version
        self.pin: Optional[Serving] = None  # PLUGIN_VERSION
        self._lock = threading.Lock()
        self._pointers: Dict[str, Tuple[Any, Optional[str]]] = {}  # scope -> (pointer stamp, version)
        # file -> (mtime, plugin)
        self.plugins: BoundedCache[Tuple[int, StableSamPlugin]] = BoundedCache(
            settings.plugin_cache_items, settings.plugin_cache_mb * 2**20)

    # -- the base model ----------------------------------------------------------------------------
    def start_from_files(self) -> None:
        """Read the base model id and default version from the files, in the background."""
        # joined at exit: torch.load runs in it (backend/background.py says why that matters)
        background.start(self._from_files, "model-version")

    def _from_files(self) -> None:
        s = self.settings
        try:
            try:
                ckpt = resolve_sam_checkpoint(s.sam_model_type, s.sam_checkpoint, s.model_dir, download=False)
                base = model_identity(s.sam_model_type, ckpt)
            except CheckpointError:
                if s.sam_checkpoint is None and s.sam_model_type in OFFICIAL_CHECKPOINTS:  # downloaded at load
                    base = f"{s.sam_model_type}-{OFFICIAL_CHECKPOINTS[s.sam_model_type].identity}"
                else:
                    raise
            plugin = (load_plugin(s.plugin_path, model_type=s.sam_model_type).version if s.plugin_path
                      else UNTRAINED_PLUGIN)
            self._set_base(base, plugin, s.sam_model_type)
        except Exception as e:  # reported by /setup and /health; predict reports the load error
            self.error = f"{e.__class__.__name__}: {e}"
            log.error("cannot determine the model version: %s", self.error)
        finally:
            self.ready.set()

    def _set_base(self, base: str, default_version: str, model_type: str) -> None:
        """The base model id and default plugin version are known: open the plugin store and
        resolve PLUGIN_VERSION (an unknown one is an error that /health and /setup report)."""
        store = PluginStore(self.settings.model_dir, base)
        pin = self.settings.plugin_version
        serving_pin = None
        if pin and pin != default_version:
            found = store.find(pin)
            if found is None:
                known = store.all_versions()
                raise StoreError(f"PLUGIN_VERSION={pin}: no such plugin version of base model {base} under "
                                 f"{store.dir} (versions there: {', '.join(known[-20:]) or 'none'}; "
                                 f"{default_version}: the default plugin)")
            load_plugin(found[1], model_type=model_type)  # a broken file fails now, not per request
            serving_pin = Serving(pin, found[1], "pinned")
        elif pin:
            serving_pin = Serving(pin, None, "pinned")
        self.store, self.base, self.default_version, self.pin = store, base, default_version, serving_pin
        if serving_pin:
            log.info("PLUGIN_VERSION=%s: every project serves %s", pin, model_version(base, pin))

    def adopt(self, model: StableSam) -> None:
        """The model has loaded: its own id and default version are the truth from now on."""
        announced = model_version(self.base, self.default_version) if self.base else None
        if announced and announced != model.version:
            log.warning("model_version announced as %s, but the loaded model is %s", announced, model.version)
        if self.base != model.model_id or self.default_version != model.plugin_version:
            try:
                self._set_base(model.model_id, model.plugin_version, model.model_type)
                self.error = None
            except Exception as e:  # an unknown PLUGIN_VERSION: reported, and predict refuses
                self.error = f"{e.__class__.__name__}: {e}"
                log.error("%s", self.error)
        self.ready.set()

    # -- per project -------------------------------------------------------------------------------
    def model_version(self, project: Any = None, wait_s: float = 2.5) -> Optional[str]:
        """The model_version that ``project``'s predictions carry (without a project: the default
        plugin's, or the pinned one's); None while unknown. Never loads the model."""
        if not self.ready.wait(wait_s) or self.base is None or self.error:
            return None
        return model_version(self.base, self.serving(project).version)

    def serving(self, project: Any = None) -> Serving:
        """The plugin version ``project`` serves now: PLUGIN_VERSION, else the project's current
        version, else the default. A stat of the pointer file per call picks up a new version."""
        if self.error:
            raise BadInput(f"model unavailable: {self.error}", status=503)
        if self.base is None:
            raise BadInput("model unavailable: the model version is still being computed; retry", status=503)
        if self.pin is not None:
            return self.pin
        default = Serving(self.default_version, None, "default")
        pid = project_id(project)
        if pid is None:
            return default
        scope = project_scope(pid)
        stamp = self.store.pointer_stamp(scope)
        with self._lock:
            cached = self._pointers.get(scope)
        if cached is not None and cached[0] == stamp:
            version = cached[1]
        else:
            version = self.store.current(scope) if stamp is not None else None
            with self._lock:
                self._pointers[scope] = (stamp, version)
            if version is not None:
                log.info("project %s serves plugin version %s", pid, version)
        if version is None:
            return default
        path = self.store.path(scope, version)
        if not path.is_file():
            log.error("project %s: current version %s has no file %s; serving the default plugin", pid, version, path)
            return default
        return Serving(version, path, scope)

    def plugin_for(self, serving: Serving, model: StableSam) -> Optional[StableSamPlugin]:
        """The loaded plugin of ``serving`` (None: the model's own default plugin), cached."""
        if serving.path is None:
            return None
        try:
            mtime = serving.path.stat().st_mtime_ns
        except FileNotFoundError:
            raise BadInput(f"plugin version {serving.version} disappeared from {serving.path.parent}", status=503) from None
        with self._lock:  # one thread loads a version, the others wait for it
            hit = self.plugins.get(serving.path, valid=lambda item: item[0] == mtime)
            if hit is not None:
                return hit[1]
            try:
                plugin = load_plugin(serving.path, model_type=model.model_type).plugin.to(model.device).eval()
            except CheckpointError as e:
                raise BadInput(f"plugin version {serving.version} cannot be loaded: {e}", status=503) from None
            nbytes = sum(t.numel() * t.element_size() for t in plugin.state_dict().values())
            self.plugins.put(serving.path, (mtime, plugin), nbytes)
            return plugin

    def listing(self, project: Any, running_jobs: Callable[[Optional[int]], List[Dict[str, Any]]]) -> Dict[str, Any]:
        """/versions: every model_version (``versions``, what Label Studio reads), the project's
        current one, the default and the pin, per-version training summaries and running jobs."""
        pid = project_id(project)
        if not self.ready.wait(2.5) or self.base is None:
            return {"versions": [], "error": self.error or "the model version is still being computed"}
        default = model_version(self.base, self.default_version)
        scopes = [project_scope(pid)] if pid is not None else self.store.scopes()
        details = []
        for scope in scopes:
            current = self.store.current(scope)
            for v in self.store.versions(scope):
                s = v.summary
                details.append({"version": v.version, "model_version": model_version(self.base, v.version),
                                "scope": scope, "created": v.created, "current": v.version == current,
                                "previous_version": s.get("previous_version"), "job_id": s.get("job_id"),
                                "images": s.get("images"), "objects": s.get("objects"),
                                "minutes": s.get("minutes_total", s.get("minutes")),
                                "heldout": {k: s.get("heldout", {}).get(k) for k in
                                            ("miou_before", "miou_after", "images", "objects", "note")
                                            if k in s.get("heldout", {})}})
        names = list(dict.fromkeys([default] + [d["model_version"] for d in details]))
        out: Dict[str, Any] = {"versions": names, "default": default,
                               "pinned": self.pin.version if self.pin else None, "project": pid}
        if self.error:
            out["error"] = self.error
        else:
            out["model_version"] = self.model_version(pid, 0)
        if pid is not None:
            out["current"] = self.store.current(project_scope(pid))
        out["details"] = details
        out["jobs"] = running_jobs(pid)
        return out

    def activate(self, project: Any, version: Any) -> Dict[str, Any]:
        """Point ``project`` at one of its stored versions (a per-project rollback); every worker
        serves it from its next request."""
        pid = project_id(project)
        if pid is None or not isinstance(version, str) or not version:
            raise BadInput("give {\"project\": <id>, \"version\": <a version of that project>}")
        self.serving()  # 503 while the store is unknown
        try:
            self.store.activate(project_scope(pid), version)
        except StoreError as e:
            raise BadInput(str(e), status=404) from None
        log.info("project %s: version %s activated by request", pid, version)
        out = {"project": pid, "current": version, "model_version": self.model_version(pid, 0)}
        if self.pin is not None:
            out["pinned"] = self.pin.version  # the pin still wins until PLUGIN_VERSION is unset
        return out
