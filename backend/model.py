"""``StableSamBackend``: the label-studio-ml style model (``predict(tasks, context)``, ``fit``).

One instance per process, shared by all request threads. The Stable-SAM model loads lazily on the
first ``predict`` (never in /setup or /health); ``model_version`` is known before that from the
checkpoint files alone, and is the same string the loaded model reports (``StableSam.version``).

Plugin versions are per project: a project serves the current version of its scope
``project-<id>`` in the plugin store (``MODEL_DIR/plugins/<base model>/project-<id>/``), else the
default plugin (PLUGIN_CHECKPOINT, else the untrained no-op one); PLUGIN_VERSION pins one version
for every project. The shared SAM is never changed per request: each request's predictor gets its
project's plugin. Every request stats the project's pointer file, so when a training job
activates a new version every worker serves it from its next request, without a restart.
``fit`` starts training jobs (``backend/jobs.py``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from stable_sam.build import build_from_settings, model_identity, resolve_sam_checkpoint
from stable_sam.checkpoint import load_plugin
from stable_sam.download import OFFICIAL_CHECKPOINTS, CheckpointError
from stable_sam.model import StableSam
from stable_sam.modeling.plugin import StableSamPlugin
from stable_sam.plugin_store import PluginStore, StoreError
from stable_sam.predictor import PromptError, StableSamPredictor
from stable_sam.prompts import ObjectPrompt

from .bounded_cache import BoundedCache
from .errors import BadInput, ClientGone, clip
from .jobs import JobManager
from .media import ImageLoader
from .metrics import Metrics
from .prefetch import Prefetcher
from .previous_masks import PreviousMasks, prompt_key
from .prompts import (KEYPOINT_CONTROL_TAGS, PROMPT_CONTROL_TAGS, RECTANGLE_CONTROL_TAGS, PromptGroup, Region,
                      group_prompts, parse_regions, result_regions)
from .settings import BackendSettings
from .training import scope_of

log = logging.getLogger(__name__)

TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
COUNTED_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
UNTRAINED_PLUGIN = "init"  # the plugin version of the untrained, no-op plugin (stable_sam/build.py)
NO_PREDICTION: List[Dict[str, Any]] = []  # a task's entry in /predict's results: store nothing for it
MAX_PROJECT_ID = 2**63 - 1  # Label Studio's ids are database integers


def project_id(value: Any) -> Optional[int]:
    """Label Studio's project reference in its forms: ``3``, ``"3.1700000000"`` (/setup, /predict),
    ``{"id": 3, ...}`` (webhooks). None when absent or not a project id."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_PROJECT_ID else None
    if isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        # ASCII digits only: str.isdigit() also takes "²" (int() fails) and "٣" (int() reads 3)
        if head.isascii() and head.isdigit() and len(head) <= 19 and int(head) <= MAX_PROJECT_ID:
            return int(head)
    return None


@dataclass(frozen=True)
class Serving:
    """The plugin version a request uses: its name, its file (None: the default plugin) and why."""

    version: str
    path: Optional[Path]
    source: str  # "default", "pinned" (PLUGIN_VERSION) or the project's scope


@dataclass(frozen=True)
class ParsedConfig:
    interface: LabelInterface
    controls: Dict[str, Any]  # name -> control tag
    brush_by_image: Dict[str, Any]  # Image tag name -> its first BrushLabels control
    image_keys: Dict[str, str]  # Image tag name -> task data key


def parse_label_config(config: Any) -> ParsedConfig:
    """Parse a label config (``StableSamBackend.label_config`` caches them); 4xx when it cannot
    serve brush masks."""
    if config is not None and not isinstance(config, str):
        raise BadInput(f"label_config must be a string (the labeling config's XML), got {type(config).__name__}")
    if not config or not config.strip():
        raise BadInput("no label config: send 'label_config' with /predict or connect through /setup first")
    try:
        li = LabelInterface(config)
    except Exception as e:  # the SDK raises many types for a broken XML
        raise BadInput(f"label config cannot be parsed: {str(e)[:300]}") from None
    controls = {c.name: c for c in (li.controls or [])}
    images = {obj.name: obj for obj in (li.objects or []) if obj.tag == "Image"}
    brush: Dict[str, Any] = {}
    for c in controls.values():
        if c.tag == "BrushLabels":
            for to in c.to_name:
                if to in images:
                    brush.setdefault(to, c)
    if not brush:
        raise BadInput("the label config has no <BrushLabels> control on an <Image>: Stable-SAM answers "
                       "with brush masks; use label_config/recommended.xml")
    keys = {name: obj.value_name for name, obj in images.items() if obj.value_name}
    return ParsedConfig(li, controls, brush, keys)


def _output_label(group: PromptGroup, brush) -> str:
    labels = list(brush.labels or [])
    if group.label is not None and group.label in labels:
        return group.label
    if group.label is not None:
        folded = {v.casefold(): v for v in labels}
        if group.label.casefold() in folded:
            return folded[group.label.casefold()]
    if group.label is None and len(labels) == 1:
        return labels[0]
    if group.label is None:
        raise BadInput(f"the prompt ({clip(', '.join(group.source_ids))}) has no label and brush control "
                       f"'{brush.name}' has several ({clip(labels, 300)}): use labelled keypoints / rectangles")
    raise BadInput(f"label {clip(group.label)} of {clip(group.source_from_name)} is not a label of brush control "
                   f"'{brush.name}' ({clip(labels, 300)}): give both controls the same labels")


class StableSamBackend:
    """The backend's model object: ``setup``, ``predict(tasks, context)`` and ``fit(event, data)``."""

    def __init__(self, settings: Optional[BackendSettings] = None, model: Optional[StableSam] = None,
                 model_factory: Optional[Callable[[], StableSam]] = None) -> None:
        self.settings = settings or BackendSettings.from_env()
        self.metrics = Metrics()
        self.images = ImageLoader(self.settings)
        self.prefetcher = Prefetcher(self.settings.prefetch_queue, self.metrics)
        self.previous_masks = PreviousMasks(self.settings.previous_mask_items, self.settings.previous_mask_ttl_s)
        self._factory = model_factory or (lambda: build_from_settings(self.settings))
        self._model: Optional[StableSam] = None
        self._model_lock = threading.Lock()
        self._load_error: Optional[str] = None
        self._version_error: Optional[str] = None
        self._version_ready = threading.Event()
        s = self.settings
        self._schemas: BoundedCache[str] = BoundedCache(s.schema_cache_items, s.schema_cache_mb * 2**20)  # project -> text
        self._configs: BoundedCache[ParsedConfig] = BoundedCache(s.schema_cache_items, s.schema_cache_mb * 2**20)
        self.jobs = JobManager(self.settings)
        self.store: Optional[PluginStore] = None
        self._base: Optional[str] = None  # base model id, e.g. sam_tiny-c867453b268e
        self._default_version: Optional[str] = None  # the default plugin's version
        self._pin: Optional[Serving] = None  # PLUGIN_VERSION
        self._serve_lock = threading.Lock()
        self._pointers: Dict[str, Tuple[Any, Optional[str]]] = {}  # scope -> (pointer stamp, version)
        # file -> (mtime, plugin)
        self._plugins: BoundedCache[Tuple[int, StableSamPlugin]] = BoundedCache(s.plugin_cache_items,
                                                                                s.plugin_cache_mb * 2**20)
        if model is not None:
            self._install(model)
        else:
            threading.Thread(target=self._compute_version, name="model-version", daemon=True).start()

    # -- the model ---------------------------------------------------------------------------------
    def describe_model(self) -> str:
        s = self.settings
        sam = str(s.sam_checkpoint) if s.sam_checkpoint else (
            "checkpoints/sam_tiny.pt (the small SAM; set SAM_MODEL_TYPE/SAM_CHECKPOINT for a real SAM)"
            if s.sam_model_type == "sam_tiny" else f"the official {s.sam_model_type} weights in {s.model_dir}")
        plugin = str(s.plugin_path) if s.plugin_path else f"none ({s.plain_sam_notice()})"
        return f"SAM {s.sam_model_type} from {sam}; plugin {plugin}; device {s.device}"

    def _compute_version(self) -> None:
        """model_version from the files only: ``<type>-<sha prefix>+plugin-<version>``."""
        s = self.settings
        try:
            try:
                ckpt = resolve_sam_checkpoint(s.sam_model_type, s.sam_checkpoint, s.model_dir, download=False)
                base = model_identity(s.sam_model_type, ckpt)
            except CheckpointError:
                if s.sam_checkpoint is None and s.sam_model_type in OFFICIAL_CHECKPOINTS:  # downloaded at load
                    base = f"{s.sam_model_type}-{OFFICIAL_CHECKPOINTS[s.sam_model_type].sha256[:12]}"
                else:
                    raise
            plugin = load_plugin(s.plugin_path, model_type=s.sam_model_type).version if s.plugin_path else "init"
            self._set_base(base, plugin, s.sam_model_type)
        except Exception as e:  # reported by /setup and /health; predict reports the load error
            self._version_error = f"{e.__class__.__name__}: {e}"
            log.error("cannot determine the model version: %s", self._version_error)
        finally:
            self._version_ready.set()

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
        self.store, self._base, self._default_version, self._pin = store, base, default_version, serving_pin
        if serving_pin:
            log.info("PLUGIN_VERSION=%s: every project serves %s+plugin-%s", pin, base, pin)

    def _install(self, model: StableSam) -> None:
        sam = model.sam
        self.metrics.instrument(sam.image_encoder, "encoder")
        self.metrics.instrument(sam.mask_decoder, "decoder")
        announced = f"{self._base}+plugin-{self._default_version}" if self._base else None
        if announced and announced != model.version:
            log.warning("model_version announced as %s, but the loaded model is %s", announced, model.version)
        self._model = model
        if self._base != model.model_id or self._default_version != model.plugin_version:
            try:
                self._set_base(model.model_id, model.plugin_version, model.model_type)
                self._version_error = None
            except Exception as e:  # an unknown PLUGIN_VERSION: reported, and predict refuses
                self._version_error = f"{e.__class__.__name__}: {e}"
                log.error("%s", self._version_error)
        self._version_ready.set()

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> StableSam:
        """The Stable-SAM model, loaded on first use (once per process, whatever the threads)."""
        if self._model is not None:
            return self._model
        with self._model_lock:
            if self._model is None:
                if self.settings.torch_threads:
                    torch.set_num_threads(self.settings.torch_threads)
                log.info("loading model: %s", self.describe_model())
                t = time.perf_counter()
                try:
                    model = self._factory()
                except Exception as e:
                    self._load_error = f"{e.__class__.__name__}: {e}"
                    log.exception("model load failed: %s", self._load_error)
                    raise BadInput(f"model unavailable: {self._load_error}", status=503) from None
                self._install(model)
                log.info("model loaded in %.1f s: serving %s on %s", time.perf_counter() - t, model.version,
                         model.device)
        return self._model

    def model_version(self, project: Any = None, wait_s: float = 2.5) -> Optional[str]:
        """The model_version that ``project``'s predictions carry (without a project: the default
        plugin's, or the pinned one's); None while unknown. Never loads the model."""
        if not self._version_ready.wait(wait_s) or self._base is None or self._version_error:
            return None
        return f"{self._base}+plugin-{self.serving(project).version}"

    @property
    def version_error(self) -> Optional[str]:
        return self._version_error

    # -- plugin versions ---------------------------------------------------------------------------
    def serving(self, project: Any = None) -> Serving:
        """The plugin version ``project`` serves now: PLUGIN_VERSION, else the project's current
        version, else the default. A stat of the pointer file per call picks up a new version."""
        if self._version_error:
            raise BadInput(f"model unavailable: {self._version_error}", status=503)
        if self._base is None:
            raise BadInput("model unavailable: the model version is still being computed; retry", status=503)
        if self._pin is not None:
            return self._pin
        default = Serving(self._default_version, None, "default")
        pid = project_id(project)
        if pid is None:
            return default
        scope = scope_of(pid)
        stamp = self.store.pointer_stamp(scope)
        with self._serve_lock:
            cached = self._pointers.get(scope)
        if cached is not None and cached[0] == stamp:
            version = cached[1]
        else:
            version = self.store.current(scope) if stamp is not None else None
            with self._serve_lock:
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
        with self._serve_lock:  # one thread loads a version, the others wait for it
            hit = self._plugins.get(serving.path, valid=lambda item: item[0] == mtime)
            if hit is not None:
                return hit[1]
            try:
                plugin = load_plugin(serving.path, model_type=model.model_type).plugin.to(model.device).eval()
            except CheckpointError as e:
                raise BadInput(f"plugin version {serving.version} cannot be loaded: {e}", status=503) from None
            nbytes = sum(t.numel() * t.element_size() for t in plugin.state_dict().values())
            self._plugins.put(serving.path, (mtime, plugin), nbytes)
            return plugin

    def versions(self, project: Any = None) -> Dict[str, Any]:
        """/versions: every model_version (``versions``, what Label Studio reads), the project's
        current one, the default and the pin, per-version training summaries and running jobs."""
        pid = project_id(project)
        if not self._version_ready.wait(2.5) or self._base is None:
            return {"versions": [], "error": self._version_error or "the model version is still being computed"}
        default = f"{self._base}+plugin-{self._default_version}"
        scopes = [scope_of(pid)] if pid is not None else self.store.scopes()
        details = []
        for scope in scopes:
            current = self.store.current(scope)
            for v in self.store.versions(scope):
                s = v.summary
                details.append({"version": v.version, "model_version": f"{self._base}+plugin-{v.version}",
                                "scope": scope, "created": v.created, "current": v.version == current,
                                "previous_version": s.get("previous_version"), "job_id": s.get("job_id"),
                                "images": s.get("images"), "objects": s.get("objects"),
                                "minutes": s.get("minutes_total", s.get("minutes")),
                                "heldout": {k: s.get("heldout", {}).get(k) for k in
                                            ("miou_before", "miou_after", "images", "objects", "note")
                                            if k in s.get("heldout", {})}})
        names = list(dict.fromkeys([default] + [d["model_version"] for d in details]))
        out: Dict[str, Any] = {"versions": names, "default": default,
                               "pinned": self._pin.version if self._pin else None, "project": pid}
        if self._version_error:
            out["error"] = self._version_error
        else:
            out["model_version"] = self.model_version(pid, 0)
        if pid is not None:
            out["current"] = self.store.current(scope_of(pid))
        out["details"] = details
        out["jobs"] = [j for j in self.jobs.jobs(pid) if j.get("status") == "running"]
        return out

    # -- label-studio-ml interface -----------------------------------------------------------------
    def setup(self, project: Any, schema: Any) -> None:
        """Remember the project's label config (used when /predict comes without one)."""
        if schema is not None and not isinstance(schema, str):
            raise BadInput(f"schema must be a string (the labeling config's XML), got {type(schema).__name__}")
        if isinstance(schema, str) and schema.strip():
            self.label_config(schema)  # 4xx now for a config that cannot work
            pid = project_id(project)
            if pid is not None:
                self._schemas.put(pid, schema, len(schema))

    def label_config(self, config: Any) -> ParsedConfig:
        """``parse_label_config``, cached by the config's text (SCHEMA_CACHE_ITEMS / _MB)."""
        if not isinstance(config, str):
            return parse_label_config(config)  # the 4xx saying what is wrong
        key = hashlib.sha256(config.encode("utf-8", "surrogatepass")).digest()
        return self._configs.get_or_put(key, lambda: (parse_label_config(config), len(config)))

    def activate(self, project: Any, version: Any) -> Dict[str, Any]:
        """Point ``project`` at one of its stored versions (a per-project rollback); every worker
        serves it from its next request."""
        pid = project_id(project)
        if pid is None or not isinstance(version, str) or not version:
            raise BadInput("give {\"project\": <id>, \"version\": <a version of that project>}")
        self.serving()  # 503 while the store is unknown
        try:
            self.store.activate(scope_of(pid), version)
        except StoreError as e:
            raise BadInput(str(e), status=404) from None
        log.info("project %s: version %s activated by request", pid, version)
        out = {"project": pid, "current": version, "model_version": self.model_version(pid, 0)}
        if self._pin is not None:
            out["pinned"] = self._pin.version  # the pin still wins until PLUGIN_VERSION is unset
        return out

    def fit(self, event: str, data: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        """Plugin adaptation from annotations, in a background job (never in the request).

        START_TRAINING starts a job for ``data["project"]["id"]`` (or answers that one runs);
        ANNOTATION_CREATED / _UPDATED count towards TRAIN_EVERY_N. Returns at once with
        ``{"status": "started" | "running" | "counted" | "ignored", ...}``."""
        project = project_id(data.get("project"))
        if project is None and isinstance(data.get("task"), dict):
            project = project_id(data["task"].get("project"))
        if event == "START_TRAINING":
            if project is None:
                raise BadInput("START_TRAINING needs the project: data.project.id (Label Studio sends it)")
            return self.jobs.start(project, trigger=event)
        if event in COUNTED_EVENTS:
            if project is None:
                return {"status": "ignored", "reason": f"{event} without a project id"}
            return self.jobs.count_annotation(project)
        return {"status": "ignored", "reason": f"{event} does not start training"}

    def predict(self, tasks: Sequence[Dict[str, Any]], context: Optional[Dict[str, Any]] = None,
                label_config: Optional[str] = None, project: Any = None,
                client_gone: Optional[Callable[[], bool]] = None, **kwargs) -> List[Dict[str, Any]]:
        """One entry per task, in the order of ``tasks``: a prediction ``{"model_version", "score",
        "result"}``, or ``[]`` (no prediction).

        With ``context`` (an interactive click), its ``result`` regions are the prompts and any
        problem is a 4xx. Without (a batch, or Label Studio opening a task), each task's own
        annotations / predictions give the prompts; a task without any, or whose image fails, gets
        ``[]`` and a log line. Label Studio pairs ``results`` with ``tasks`` by position and takes
        each entry as one prediction or a list of them, so ``[]`` stores nothing for that task
        (an empty prediction would show as an extra, empty prediction tab on every task). A single
        task without prompts is a task being opened: its image is queued for background encoding
        (``backend/prefetch.py``) and the answer does not wait for the model. ``client_gone()``
        is asked before each task's work: True stops the request (``ClientGone``)."""
        if not isinstance(tasks, list) or not tasks:
            raise BadInput("no tasks: 'tasks' must be a non-empty list")
        limit = self.settings.max_tasks_per_request
        if len(tasks) > limit:
            raise BadInput(f"{len(tasks)} tasks in one request, over MAX_TASKS_PER_REQUEST ({limit}): send them "
                           f"in smaller batches (or pre-annotate with scripts/preannotate.py)", status=413)
        for i, t in enumerate(tasks):
            if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
                raise BadInput(f"tasks[{i}] must be an object with a 'data' object")
        config = label_config or (self._schemas.get(project_id(project)) if project_id(project) is not None else None)
        cfg = self.label_config(config or "")
        interactive = bool(context)  # null or {}: a batch call
        if interactive:
            if not isinstance(context, dict) or "result" not in context:
                raise BadInput("context must be an object with a 'result' list of keypoints / rectangles")
            regions = self._regions(context["result"], "context.result")
            if not regions:
                raise BadInput("context.result has no keypoint or rectangle to prompt with")
        else:
            prompts_by_task = [result_regions(task) for task in tasks]
            if not any(results for results, _ in prompts_by_task):
                for task, (_, reason) in zip(tasks, prompts_by_task):
                    log.info("task %s: no prediction: %s", clip(task.get("id"), 40), reason)
                self.metrics.count("batch_tasks_skipped_total", len(tasks))
                if len(tasks) == 1:
                    self.prefetch(cfg, tasks[0])
                return [NO_PREDICTION for _ in tasks]
        model = self.model
        serving = self.serving(project if project_id(project) is not None else tasks[0].get("project"))
        plugin = self.plugin_for(serving, model)
        version = f"{model.model_id}+plugin-{serving.version}"
        out: List[Any] = []
        if interactive:
            pid = project_id(project) if project_id(project) is not None else project_id(tasks[0].get("project"))
            for done, task in enumerate(tasks):
                self._stop_if_gone(client_gone, done, len(tasks))
                out.append(self._predict_task(model, plugin, version, cfg, task, regions, memory_scope=(pid, version)))
            return out
        for done, (task, (results, source)) in enumerate(zip(tasks, prompts_by_task)):
            self._stop_if_gone(client_gone, done, len(tasks))
            tid = clip(task.get("id"), 40)
            if not results:
                log.info("task %s: no prediction: %s", tid, source)
                self.metrics.count("batch_tasks_skipped_total")
                out.append(NO_PREDICTION)
                continue
            try:
                out.append(self._predict_task(model, plugin, version, cfg, task, self._regions(results, source)))
                log.info("task %s: prompts from %s", tid, source)
            except BadInput as e:
                log.warning("task %s: no prediction: %s (prompts from %s)", tid, e.message, source)
                self.metrics.count("batch_tasks_failed_total")
                out.append(NO_PREDICTION)
        return out

    def prefetch(self, cfg: ParsedConfig, task: Dict[str, Any]) -> None:
        """Queue the task's images to be fetched and encoded in the background (never blocks)."""
        for to_name in cfg.brush_by_image:
            key = cfg.image_keys.get(to_name)
            url = task["data"].get(key) if key else None
            if isinstance(url, str) and url.strip():
                tid = task.get("id")
                self.prefetcher.submit((url.strip(), tid), functools.partial(self._encode_ahead, url.strip(), tid))

    def _encode_ahead(self, url: str, task_id: Any) -> None:
        t = time.perf_counter()
        model = self.model  # the first task opened also loads the model, off the request
        self.images.load(url, task_id, on_loaded=lambda im: self._embed(model, im))
        log.info("task %s: image prefetched and encoded in %.2f s", clip(task_id, 40), time.perf_counter() - t)

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _stop_if_gone(client_gone: Optional[Callable[[], bool]], done: int, total: int) -> bool:
        """Raises ``ClientGone`` when the client has closed its connection (False otherwise)."""
        if client_gone is not None and client_gone():
            raise ClientGone(f"the client closed the connection: stopped after {done} of {total} tasks")
        return False

    def _regions(self, results: Any, source: str) -> List[Region]:
        """``parse_regions``, refused with 413 past MAX_REGIONS_PER_CONTEXT prompt regions (each
        rectangle is a mask to decode; keypoints grow one prompt's attention quadratically)."""
        regions = parse_regions(results, source)
        limit = self.settings.max_regions_per_context
        if len(regions) > limit:
            raise BadInput(f"{source} has {len(regions)} keypoints / rectangles, over MAX_REGIONS_PER_CONTEXT "
                           f"({limit})", status=413)
        return regions

    def _check_regions(self, cfg: ParsedConfig, regions: Sequence[Region]) -> None:
        for r in regions:
            control = cfg.controls.get(r.from_name)
            rid = clip(r.id, 40)
            if control is None:
                raise BadInput(f"unknown from_name {clip(r.from_name)} (region {rid}): the label config's controls "
                               f"are {clip(sorted(cfg.controls), 300)}")
            if control.tag not in PROMPT_CONTROL_TAGS:
                raise BadInput(f"from_name {clip(r.from_name)} (region {rid}) is a <{control.tag}>, not a keypoint "
                               f"or rectangle control")
            expected = KEYPOINT_CONTROL_TAGS if r.kind == "keypoint" else RECTANGLE_CONTROL_TAGS
            if control.tag not in expected:
                raise BadInput(f"region {rid} is a {r.kind}, but its from_name {clip(r.from_name)} is a "
                               f"<{control.tag}>: send it with a {' / '.join(expected)} control")
            if r.to_name not in control.to_name:
                raise BadInput(f"to_name {clip(r.to_name)} (region {rid}) is not an object of control "
                               f"{clip(r.from_name)} (it labels {clip(control.to_name, 300)})")
            if r.to_name not in cfg.brush_by_image:
                raise BadInput(f"no <BrushLabels> control in the label config is paired with image {clip(r.to_name)}")

    def _embed(self, model: StableSam, image: np.ndarray) -> Dict[str, Any]:
        return {"embedding": model.embed(image), "model_id": model.model_id}

    def _predict_task(self, model: StableSam, plugin: Optional[StableSamPlugin], version: str, cfg: ParsedConfig,
                      task: Dict[str, Any], regions: Sequence[Region],
                      memory_scope: Optional[Tuple[Any, ...]] = None) -> Dict[str, Any]:
        """``memory_scope`` (interactive clicks: project and model version): previous masks are
        looked up and kept under it, with the task and image (``backend/previous_masks.py``)."""
        self._check_regions(cfg, regions)
        by_image: Dict[str, List[Region]] = {}
        for r in regions:
            by_image.setdefault(r.to_name, []).append(r)
        results: List[Dict[str, Any]] = []
        for to_name, regs in by_image.items():
            key = cfg.image_keys.get(to_name)
            url = task["data"].get(key) if key else None
            if url is None:
                raise BadInput(f"task {clip(task.get('id'), 40)} has no data.{key} for image {to_name!r}")
            image, extra = self.images.load(url, task.get("id"), on_loaded=lambda im: self._embed(model, im))
            emb = extra.get("embedding") if extra.get("model_id") == model.model_id else None
            if emb is None:
                emb = model.embed(image)
            h, w = image.shape[:2]
            groups, notes = group_prompts(regs, w, h)
            for note in notes:
                log.info("task %s: %s", clip(task.get("id"), 40), note)
            # The mask is always of the decoded image: a claimed original size is only the client's
            # word (1e9 x 1e9 would be allocated); the file is what the annotator sees.
            claimed = next(((r.original_width, r.original_height) for r in regs
                            if r.original_width and r.original_height), (w, h))
            if claimed != (w, h):
                log.warning("task %s: the regions say image %r is %d x %d, the file decodes to %d x %d: "
                            "mask of the decoded size", clip(task.get("id"), 40), to_name, *claimed, w, h)
            brush = cfg.brush_by_image[to_name]
            labels = [_output_label(g, brush) for g in groups]
            # the task and image by digest: a key never holds a request's (maybe huge) strings
            scope = None if memory_scope is None else memory_scope + (
                hashlib.sha256(f"{task.get('id')!r}|{url}".encode("utf-8", "replace")).hexdigest(),)
            for g, label, pred in zip(groups, labels, self._decode(model, plugin, emb, groups, w, h, scope)):
                results.append(self.brush_result(g, label, brush.name, to_name, pred, (w, h), (w, h),
                                                 plugin_version=version.rsplit("+plugin-", 1)[-1]))
        score = float(np.mean([r["score"] for r in results])) if results else 0.0
        return {"model_version": version, "score": round(score, 4), "result": results}

    def _decode(self, model: StableSam, plugin: Optional[StableSamPlugin], emb, groups: List[PromptGroup],
                w: int, h: int, memory_scope: Optional[Tuple[Any, ...]] = None):
        """Predict every group, batching groups of the same shape (boxes with K points) in one call,
        with ``plugin`` (the project's version; None: the model's default plugin).

        With ``memory_scope`` (an interactive click), a group whose prompts minus the newest point
        were predicted before gets that prediction's low-res logits as its mask prompt (SAM's
        corrective loop), decoded on its own; every group's logits are kept for the next click."""
        if not groups:  # e.g. only negative clicks so far: nothing to segment yet
            return []
        predictor = StableSamPredictor(model, plugin=plugin)
        predictor.set_embedding(emb)
        prompts = [ObjectPrompt(box=None if g.box is None else
                                [min(max(g.box[0], 0), w), min(max(g.box[1], 0), h),
                                 min(max(g.box[2], 0), w), min(max(g.box[3], 0), h)],
                                points=g.points or None, labels=g.point_labels or None) for g in groups]
        keys: List[Optional[Tuple[Any, ...]]] = [None] * len(groups)
        previous: List[Optional[np.ndarray]] = [None] * len(groups)
        if memory_scope is not None and self.previous_masks.enabled:
            for i, (g, p) in enumerate(zip(groups, prompts)):
                where = memory_scope + (g.to_name, g.source_from_name, g.label)
                keys[i] = where + prompt_key(p.box, g.points, g.point_labels)
                if g.points and (p.box is not None or len(g.points) > 1):
                    previous[i] = self.previous_masks.get(
                        where + prompt_key(p.box, g.points[:-1], g.point_labels[:-1]))
        fresh = [i for i in range(len(groups)) if previous[i] is None]
        rows: Dict[int, Tuple[np.ndarray, float, float, Optional[List[float]], np.ndarray]] = {}
        try:
            if fresh:
                out = predictor.predict_objects([prompts[i] for i in fresh])
                for j, i in enumerate(fresh):
                    rows[i] = (out.masks[j], float(out.scores[j]), float(out.stability[j]),
                               out.alpha[j].tolist() if out.alpha is not None else None, out.low_res_logits[j])
            for i in range(len(groups)):
                if previous[i] is None:
                    continue
                p = prompts[i]
                out = predictor.predict(point_coords=p.points, point_labels=p.labels, box=p.box,
                                        mask_input=previous[i][None, None], multimask_output=False)
                rows[i] = (out.masks[0], float(out.scores[0]), float(out.stability[0]),
                           out.alpha[0].tolist() if out.alpha is not None else None, out.low_res_logits[0])
                self.metrics.count("corrective_clicks_total")
        except PromptError as e:
            raise BadInput(f"prompt rejected: {e}") from None
        for i, key in enumerate(keys):
            if key is not None:
                self.previous_masks.put(key, rows[i][4])
        preds = [{"mask": rows[i][0], "score": rows[i][1], "stability": rows[i][2], "alpha": rows[i][3]}
                 for i in range(len(groups))]
        self.metrics.count("masks_total", len(groups))
        return preds

    @staticmethod
    def brush_result(g: PromptGroup, label: str, from_name: str, to_name: str, pred: Dict[str, Any],
                      size: Tuple[int, int], out_size: Tuple[int, int],
                      plugin_version: Optional[str] = None) -> Dict[str, Any]:
        """One brushlabels result. ``plugin_version`` "init" (the untrained plugin, a no-op: the
        mask is plain SAM's) keeps the DRP routing weights out of the region details text, where
        they would read as if they meant something; ``stable_sam`` still carries them."""
        mask = pred["mask"]
        if out_size != size:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(out_size, Image.NEAREST)) > 127
        rle = mask2rle(mask.astype(np.uint8) * 255)
        score, stability, alpha = pred["score"], pred["stability"], pred["alpha"]
        info = {"predicted_iou": round(score, 4), "stability": round(stability, 4), "prompt": g.describe(),
                "prompt_ids": list(g.source_ids), "area_px": int(mask.sum())}
        text = f"Stable-SAM: predicted IoU {score:.2f}, stability {stability:.2f}"
        if alpha is not None:
            info.update(alpha_deformed=round(alpha[0], 4), alpha_regular=round(alpha[1], 4))
            if plugin_version == UNTRAINED_PLUGIN:
                text += ", plain SAM (untrained plugin)"
            else:
                text += f", DRP routing deformed {alpha[0]:.2f} / regular {alpha[1]:.2f}"
        text += f" ({g.describe()})"
        return {
            "id": f"{g.source_ids[0]}_sam"[:64],
            "from_name": from_name, "to_name": to_name, "type": "brushlabels",
            "original_width": out_size[0], "original_height": out_size[1], "image_rotation": 0,
            "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
            "score": round(score, 4),
            "readonly": False,
            "meta": {"text": [text]},
            "stable_sam": info,
        }
