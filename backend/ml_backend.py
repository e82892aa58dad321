"""``StableSamBackend``: the label-studio-ml style model (``predict(tasks, context)``, ``fit``).

One instance per process, shared by all request threads. The Stable-SAM model loads lazily on the
first ``predict`` (never in /setup or /health); ``model_version`` is known before that from the
checkpoint files alone, and is the same string the loaded model reports (``StableSam.version``).

Which plugin version a project serves is ``backend/versions.py``'s: the shared SAM is never
changed per request, each request's predictor gets its project's plugin. Label configs are read by
``backend/label_config.py``, masks become brush or polygon results in ``backend/results.py``; ``fit`` starts
training jobs (``backend/jobs.py``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from stable_sam.builders import build_from_settings, resolve_device
from stable_sam.data.label_studio_prompts import (PromptGroup, Region, RegionError, group_prompts, parse_regions,
                                                  result_regions)
from stable_sam.model import StableSam, model_version
from stable_sam.modeling.plugin import StableSamPlugin
from stable_sam.predictor import ObjectMask, PromptError, StableSamPredictor

from .bounded_cache import BoundedCache
from .errors import BadInput, ClientGone, short_repr
from .jobs import JobManager
from .label_config import ConfigNotReady, ParsedConfig, check_regions, output_label, parse_label_config
from .media import ImageLoader
from .prometheus_metrics import Metrics
from .prefetch import Prefetcher
from .previous_masks import PreviousMasks, prompt_key
from .projects import project_id
from .results import mask_results
from .server_settings import BackendSettings
from .versions import PluginVersions, Serving

log = logging.getLogger(__name__)

TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
COUNTED_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
NO_PREDICTION: List[Dict[str, Any]] = []  # a task's entry in /predict's results: store nothing for it


def describe_serving(s: BackendSettings) -> str:
    """What serves, in one line: SAM, plugin, and the device DEVICE resolves to on this machine
    ("cpu", not "auto"; torch is asked without initialising CUDA when PYTORCH_NVML_BASED_CUDA_CHECK=1,
    as gunicorn's master does before it forks)."""
    sam = str(s.sam_checkpoint) if s.sam_checkpoint else (
        "checkpoints/sam_tiny.pt (the small SAM; set SAM_MODEL_TYPE/SAM_CHECKPOINT for a real SAM)"
        if s.sam_model_type == "sam_tiny" else f"the official {s.sam_model_type} weights in {s.model_dir}")
    plugin = str(s.plugin_path) if s.plugin_path else f"none ({s.plain_sam_notice()})"
    try:
        device = str(resolve_device(s.device))
    except RuntimeError as e:  # DEVICE=cuda without CUDA: the model load fails and says so
        device = f"{s.device} ({e})"
    if s.device.strip().lower() == "auto":
        device += " (DEVICE=auto)"
    return f"SAM {s.sam_model_type} from {sam}; plugin {plugin}; device {device}"


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
        s = self.settings
        self._schemas: BoundedCache[str] = BoundedCache(s.schema_cache_items, s.schema_cache_mb * 2**20)  # project -> text
        self._configs: BoundedCache[ParsedConfig] = BoundedCache(s.schema_cache_items, s.schema_cache_mb * 2**20)
        self.jobs = JobManager(self.settings)
        self.plugin_versions = PluginVersions(self.settings)
        if model is not None:
            self._install(model)
        else:
            self.plugin_versions.start_from_files()

    # -- the model ---------------------------------------------------------------------------------
    def describe_model(self) -> str:
        """What serves, in words (the first log line)."""
        return describe_serving(self.settings)

    def _install(self, model: StableSam) -> None:
        self.metrics.instrument(model.adapter.image_encoder, "encoder")
        self.metrics.instrument(model.adapter.mask_decoder, "decoder")
        self._model = model
        self.plugin_versions.adopt(model)

    @property
    def model_loaded(self) -> bool:
        """Whether the model is loaded (/health never loads it)."""
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
        """The model_version that ``project``'s predictions carry; None while unknown."""
        return self.plugin_versions.model_version(project, wait_s)

    @property
    def version_error(self) -> Optional[str]:
        """Why the model version cannot be given, None when it can."""
        return self.plugin_versions.error

    # -- plugin versions ---------------------------------------------------------------------------
    def serving(self, project: Any = None) -> Serving:
        """The plugin version ``project`` serves now (its pin, else the current one)."""
        return self.plugin_versions.serving(project)

    def plugin_for(self, serving: Serving, model: StableSam) -> Optional[StableSamPlugin]:
        """The loaded plugin of ``serving`` for ``model`` (None: plain SAM)."""
        return self.plugin_versions.plugin_for(serving, model)

    def versions(self, project: Any = None) -> Dict[str, Any]:
        """/versions (``PluginVersions.listing``), with the project's running training jobs."""
        return self.plugin_versions.listing(
            project, lambda pid: [j for j in self.jobs.jobs(pid) if j.get("status") == "running"])

    # -- label-studio-ml interface -----------------------------------------------------------------
    def setup(self, project: Any, schema: Any) -> None:
        """Remember the project's label config (used when /predict comes without one). A config
        that cannot work is a 4xx now, but for one with no image at all (``<View></View>``: the
        project's labeling interface is not set yet), which is kept: /predict explains it."""
        if schema is not None and not isinstance(schema, str):
            raise BadInput(f"schema must be a string (the labeling config's XML), got {type(schema).__name__}")
        if isinstance(schema, str) and schema.strip():
            try:
                self.label_config(schema)
            except ConfigNotReady as e:
                log.info("/setup for project %s: %s", short_repr(project, 40), e.message)
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
        """Point ``project`` at one of its stored versions (``PluginVersions.activate``)."""
        return self.plugin_versions.activate(project, version)

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
        is asked before each task's work: True stops the request (``ClientGone``). ``tasks`` as
        one task object is read as a list of that one task (Label Studio's ML-backend tests send it)."""
        tasks = self._checked_tasks(tasks)
        config = label_config or (self._schemas.get(project_id(project)) if project_id(project) is not None else None)
        cfg = self.label_config(config or "")
        interactive = bool(context)  # null or {}: a batch call
        if interactive:
            regions = self._context_regions(context)
        else:
            prompts_by_task = [result_regions(task) for task in tasks]
            if not any(results for results, _ in prompts_by_task):
                return self._nothing_to_predict(cfg, tasks, prompts_by_task)
        model = self.model
        serving = self.serving(project if project_id(project) is not None else tasks[0].get("project"))
        plugin = self.plugin_for(serving, model)
        if not interactive:
            return self._predict_stored_prompts(model, plugin, serving.version, cfg, tasks, prompts_by_task,
                                                client_gone)
        version = model_version(model.model_id, serving.version)
        pid = project_id(project) if project_id(project) is not None else project_id(tasks[0].get("project"))
        out: List[Any] = []
        for done, task in enumerate(tasks):
            self._stop_if_gone(client_gone, done, len(tasks))
            out.append(self._predict_task(model, plugin, serving.version, cfg, task, regions,
                                          memory_scope=(pid, version)))
        return out

    def _checked_tasks(self, tasks: Any) -> List[Dict[str, Any]]:
        """``tasks`` as a non-empty list of task objects (one task object: a list of it); 400 when
        it is not one, 413 past MAX_TASKS_PER_REQUEST."""
        if isinstance(tasks, dict):
            tasks = [tasks]
        if not isinstance(tasks, list) or not tasks:
            raise BadInput("no tasks: 'tasks' must be a non-empty list (or one task object)")
        limit = self.settings.max_tasks_per_request
        if len(tasks) > limit:
            raise BadInput(f"{len(tasks)} tasks in one request, over MAX_TASKS_PER_REQUEST ({limit}): send them "
                           f"in smaller batches (or pre-annotate with scripts/preannotate.py)", status=413)
        for i, t in enumerate(tasks):
            if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
                raise BadInput(f"tasks[{i}] must be an object with a 'data' object")
        return tasks

    def _context_regions(self, context: Any) -> List[Region]:
        """The prompt regions of an interactive call's ``context`` (400 when it has none)."""
        if not isinstance(context, dict) or "result" not in context:
            raise BadInput("context must be an object with a 'result' list of keypoints / rectangles")
        regions = self._regions(context["result"], "context.result")
        if not regions:
            raise BadInput("context.result has no keypoint or rectangle to prompt with")
        return regions

    def _nothing_to_predict(self, cfg: ParsedConfig, tasks: List[Dict[str, Any]],
                            prompts_by_task: List[Tuple[List[Dict[str, Any]], str]]) -> List[Any]:
        """A batch call whose tasks hold no prompts: no prediction for any; a single task is being
        opened, so its image is prefetched."""
        for task, (_, reason) in zip(tasks, prompts_by_task):
            log.info("task %s: no prediction: %s", short_repr(task.get("id"), 40), reason)
        self.metrics.count("batch_tasks_skipped_total", len(tasks))
        if len(tasks) == 1:
            self.prefetch(cfg, tasks[0])
        return [NO_PREDICTION for _ in tasks]

    def _predict_stored_prompts(self, model: StableSam, plugin: Optional[StableSamPlugin], plugin_version: str,
                                cfg: ParsedConfig, tasks: List[Dict[str, Any]],
                                prompts_by_task: List[Tuple[List[Dict[str, Any]], str]],
                                client_gone: Optional[Callable[[], bool]]) -> List[Any]:
        """A batch call: each task's prediction from its own stored prompts; a task without any, or
        whose prompts or image fail, gets no prediction and a log line."""
        out: List[Any] = []
        for done, (task, (results, source)) in enumerate(zip(tasks, prompts_by_task)):
            self._stop_if_gone(client_gone, done, len(tasks))
            tid = short_repr(task.get("id"), 40)
            if not results:
                log.info("task %s: no prediction: %s", tid, source)
                self.metrics.count("batch_tasks_skipped_total")
                out.append(NO_PREDICTION)
                continue
            try:
                out.append(self._predict_task(model, plugin, plugin_version, cfg, task,
                                              self._regions(results, source)))
                log.info("task %s: prompts from %s", tid, source)
            except BadInput as e:
                log.warning("task %s: no prediction: %s (prompts from %s)", tid, e.message, source)
                self.metrics.count("batch_tasks_failed_total")
                out.append(NO_PREDICTION)
        return out

    def prefetch(self, cfg: ParsedConfig, task: Dict[str, Any]) -> None:
        """Queue the task's images to be fetched and encoded in the background (never blocks)."""
        for to_name in cfg.output_by_image:
            key = cfg.image_keys.get(to_name)
            url = task["data"].get(key) if key else None
            if isinstance(url, str) and url.strip():
                tid = task.get("id")
                self.prefetcher.submit((url.strip(), tid), functools.partial(self._encode_ahead, url.strip(), tid))

    def _encode_ahead(self, url: str, task_id: Any) -> None:
        t = time.perf_counter()
        model = self.model  # the first task opened also loads the model, off the request
        model.embed(*self.images.load(url, task_id))
        log.info("task %s: image prefetched and encoded in %.2f s", short_repr(task_id, 40), time.perf_counter() - t)

    # -- internals ---------------------------------------------------------------------------------
    @staticmethod
    def _stop_if_gone(client_gone: Optional[Callable[[], bool]], done: int, total: int) -> bool:
        """Raises ``ClientGone`` when the client has closed its connection (False otherwise)."""
        if client_gone is not None and client_gone():
            raise ClientGone(f"the client closed the connection: stopped after {done} of {total} tasks")
        return False

    def _regions(self, results: Any, source: str) -> List[Region]:
        """``parse_regions`` (a region it cannot read: 400), refused with 413 past
        MAX_REGIONS_PER_CONTEXT prompt regions (each rectangle is a mask to decode; keypoints grow
        one prompt's attention quadratically)."""
        try:
            regions = parse_regions(results, source)
        except RegionError as e:
            raise BadInput(str(e)) from None
        limit = self.settings.max_regions_per_context
        if len(regions) > limit:
            raise BadInput(f"{source} has {len(regions)} keypoints / rectangles, over MAX_REGIONS_PER_CONTEXT "
                           f"({limit})", status=413)
        return regions

    def _predict_task(self, model: StableSam, plugin: Optional[StableSamPlugin], plugin_version: str,
                      cfg: ParsedConfig, task: Dict[str, Any], regions: Sequence[Region],
                      memory_scope: Optional[Tuple[Any, ...]] = None) -> Dict[str, Any]:
        """``memory_scope`` (interactive clicks: project and model version): previous masks are
        looked up and kept under it, with the task and image (``backend/previous_masks.py``)."""
        check_regions(cfg, regions)
        by_image: Dict[str, List[Region]] = {}
        for r in regions:
            by_image.setdefault(r.to_name, []).append(r)
        results: List[Dict[str, Any]] = []
        for to_name, regs in by_image.items():
            key = cfg.image_keys.get(to_name)
            url = task["data"].get(key) if key else None
            if url is None:
                raise BadInput(f"task {short_repr(task.get('id'), 40)} has no data.{key} for image {to_name!r}")
            image, digest = self.images.load(url, task.get("id"))
            emb = model.embed(image, digest)
            h, w = image.shape[:2]
            groups, notes = group_prompts(regs, w, h)
            for note in notes:
                log.info("task %s: %s", short_repr(task.get("id"), 40), note)
            # The mask is always of the decoded image: a claimed original size is only the client's
            # word (1e9 x 1e9 would be allocated); the file is what the annotator sees.
            claimed = next(((r.original_width, r.original_height) for r in regs
                            if r.original_width and r.original_height), (w, h))
            if claimed != (w, h):
                log.warning("task %s: the regions say image %r is %d x %d, the file decodes to %d x %d: "
                            "mask of the decoded size", short_repr(task.get("id"), 40), to_name, *claimed, w, h)
            control = cfg.output_by_image[to_name]
            labels = [output_label(g, control) for g in groups]
            # the task and image by digest: a key never holds a request's (maybe huge) strings
            scope = None if memory_scope is None else memory_scope + (
                hashlib.sha256(f"{task.get('id')!r}|{url}".encode("utf-8", "replace")).hexdigest(),)
            for g, label, pred in zip(groups, labels, self._decode(model, plugin, emb, groups, scope)):
                results.extend(mask_results(g, label, control, to_name, pred, self.settings, plugin_version))
        score = float(np.mean([r["score"] for r in results])) if results else 0.0
        return {"model_version": model_version(model.model_id, plugin_version), "score": round(score, 4),
                "result": results}

    def _decode(self, model: StableSam, plugin: Optional[StableSamPlugin], emb, groups: List[PromptGroup],
                memory_scope: Optional[Tuple[Any, ...]] = None) -> List[ObjectMask]:
        """Predict every group, batching groups of the same shape (boxes with K points) in one call,
        with ``plugin`` (the project's version; None: the model's default plugin).

        With ``memory_scope`` (an interactive click), a group whose prompts minus the newest point
        were predicted before gets that prediction's low-res logits as its mask prompt (SAM's
        corrective loop), decoded on its own; every group's logits are kept for the next click."""
        if not groups:  # e.g. only negative clicks so far: nothing to segment yet
            return []
        predictor = StableSamPredictor(model, plugin=plugin)
        predictor.set_embedding(emb)
        prompts = [g.prompt for g in groups]
        keys: List[Optional[Tuple[Any, ...]]] = [None] * len(groups)
        previous: List[Optional[np.ndarray]] = [None] * len(groups)
        if memory_scope is not None and self.previous_masks.enabled:
            for i, (g, p) in enumerate(zip(groups, prompts)):
                where = memory_scope + (g.to_name, g.from_name, g.label)
                points, labels = (p.points, p.labels) if p.points is not None else ((), ())
                keys[i] = where + prompt_key(p.box, points, labels)
                if len(points) and (p.box is not None or len(points) > 1):
                    previous[i] = self.previous_masks.get(where + prompt_key(p.box, points[:-1], labels[:-1]))
        fresh = [i for i in range(len(groups)) if previous[i] is None]
        rows: Dict[int, ObjectMask] = {}
        logits: Dict[int, np.ndarray] = {}
        try:
            if fresh:
                out = predictor.predict_objects([prompts[i] for i in fresh])
                for j, i in enumerate(fresh):
                    rows[i], logits[i] = out.row(j), out.low_res_logits[j]
            for i in range(len(groups)):
                if previous[i] is None:
                    continue
                p = prompts[i]
                out = predictor.predict(point_coords=p.points, point_labels=p.labels, box=p.box,
                                        mask_input=previous[i][None, None], multimask_output=False)
                rows[i], logits[i] = out.row(0), out.low_res_logits[0]
                self.metrics.count("corrective_clicks_total")
        except PromptError as e:
            raise BadInput(f"prompt rejected: {e}") from None
        for i, key in enumerate(keys):
            if key is not None:
                self.previous_masks.put(key, logits[i])
        self.metrics.count("masks_total", len(groups))
        return [rows[i] for i in range(len(groups))]
