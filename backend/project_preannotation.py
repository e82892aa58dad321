"""Batch pre-annotation of a Label Studio project: every task's rough rectangles / keypoints ->
brush masks (or polygons, for a config with PolygonLabels), uploaded as predictions of the model's version.

The translation is the backend's own: each task goes through ``StableSamBackend.predict`` with the
task's stored regions as the prompt context (so a task's problems come back as a ``BadInput``
message instead of an empty prediction), which decodes all prompts of an image in one decoder call
per prompt shape and builds the brush results. Tasks without prompts can get SAM's automatic masks.

- Resumable: a task that already has a prediction of this model version is skipped, so a second
  run uploads nothing new and a stopped run picks up where it was.
- A background thread lists the tasks page by page, downloads and decodes the next images and runs
  the encoder on them, so the main thread (decoder, RLE, upload) does not wait on Label Studio.
- One task's failure (image unreachable, bad region, upload refused) is recorded and reported at
  the end; the run goes on.

The per-task work (``TaskAnnotator``: plan, predict, upload) is the same on a Ray cluster, where
each worker runs it on shards of the task list (``backend.project_preannotation_ray``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from stable_sam.data.label_studio_prompts import PROMPT_SOURCES, PromptGroup, result_regions
from stable_sam.model import model_version
from stable_sam.preannotation.automatic import AutoConfig, automatic_masks
from stable_sam.preannotation.readahead import ReadAhead
from stable_sam.predictor import ObjectMask
from stable_sam.prompts import ObjectPrompt

from .errors import BadInput
from .label_config import ParsedConfig, parse_label_config
from .label_studio import LabelStudioUnavailable, project_tasks
from .ml_backend import StableSamBackend
from .results import mask_results
from .server_settings import BackendSettings

log = logging.getLogger(__name__)

SOURCES = {"any": PROMPT_SOURCES, "annotations": ("annotations",), "predictions": ("predictions",)}


@dataclass
class _Plan:
    """What the read-ahead thread decided for a task: ``status`` done | no-prompts | todo."""

    status: str
    results: List[Dict[str, Any]] = field(default_factory=list)
    source: str = ""
    image: Optional[np.ndarray] = None


@dataclass
class LabelStudioSummary:
    """Counts by outcome, the failures (task id, message), and the rate of images pre-annotated."""

    model_version: str
    uploaded: int = 0  # predictions created
    would_upload: int = 0  # dry run: predictions that would have been created
    masks: int = 0
    skipped_done: int = 0  # already had a prediction of this model version
    no_prompts: int = 0  # nothing to prompt with (and no automatic mode)
    empty: int = 0  # processed, but no mask came out (nothing uploaded)
    processed: int = 0
    # a prediction of this version turned up right before the upload (a retried Ray shard): not sent again
    already_uploaded: int = 0
    seconds: float = 0.0
    failed: List[Tuple[Any, str]] = field(default_factory=list)

    COUNTS: ClassVar[Tuple[str, ...]] = ("uploaded", "would_upload", "masks", "skipped_done", "no_prompts",
                                         "empty", "processed", "already_uploaded")

    def add(self, other: "LabelStudioSummary") -> None:
        """Add ``other``'s counts and failures (the Ray driver sums its shards' summaries)."""
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed.extend(other.failed)

    @property
    def images_per_s(self) -> float:
        """Tasks processed per second of the run."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> Dict[str, Any]:
        """The summary as printed by ``--json``."""
        return {"model_version": self.model_version, "processed": self.processed, "uploaded": self.uploaded,
                "would_upload": self.would_upload, "masks": self.masks, "skipped_done": self.skipped_done,
                "no_prompts": self.no_prompts, "empty": self.empty, "already_uploaded": self.already_uploaded,
                "failed": len(self.failed),
                "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 3),
                "failures": [{"task": t, "error": e} for t, e in self.failed]}


def _auto_target(cfg: ParsedConfig, label: Optional[str]) -> Tuple[str, Any, str]:
    """(image tag name, its mask control (PolygonLabels, else BrushLabels), the label automatic
    masks get)."""
    to_name, control = next(iter(cfg.output_by_image.items()))
    labels = list(control.labels or [])
    if label is not None:
        if label not in labels:
            raise BadInput(f"--auto-label {label!r} is not a label of {control.tag} control {control.name!r} "
                           f"({labels})")
        return to_name, control, label
    if len(labels) != 1:
        raise BadInput(f"{control.tag} control {control.name!r} has labels {labels}: name the one automatic masks "
                       f"get (--auto-label)")
    return to_name, control, labels[0]


def _auto_prediction(model, plugin, version: str, image: np.ndarray, config: AutoConfig,
                     target: Tuple[str, Any, str], settings: BackendSettings) -> Dict[str, Any]:
    """SAM's automatic masks (through ``plugin``; None: the model's own) as brush or polygon
    results, written by the backend's own result writer."""
    to_name, control, label = target
    results = []
    for k, found in enumerate(automatic_masks(model, image, config, plugin)):
        group = PromptGroup(to_name, ObjectPrompt(points=[found.point]), label=label, source_ids=[f"auto{k}"])
        pred = ObjectMask(found.mask, found.predicted_iou, found.stability)
        where = f"automatic: grid point {found.point[0]:.0f}, {found.point[1]:.0f}"
        for res in mask_results(group, label, control, to_name, pred, settings):
            res["stable_sam"]["prompt"] = where
            res["meta"]["text"] = [f"Stable-SAM: predicted IoU {found.predicted_iou:.2f}, "
                                   f"stability {found.stability:.2f} ({where})"]
            results.append(res)
    score = float(np.mean([r["score"] for r in results])) if results else 0.0
    return {"model_version": version, "score": round(score, 4), "result": results}


def _error_text(e: Exception) -> str:
    if isinstance(e, BadInput):
        return e.message
    code = getattr(e, "status_code", None)  # label-studio-sdk's ApiError
    if code is not None:
        return f"Label Studio answered HTTP {code}: {str(getattr(e, 'body', ''))[:300]}"
    return f"{e.__class__.__name__}: {str(e)[:300]}"


def project_config(client, project: int, auto: Optional[AutoConfig] = None,
                   auto_label: Optional[str] = None) -> Tuple[str, ParsedConfig, Optional[Tuple[str, Any, str]]]:
    """``project``'s label config (text and parsed) and, with ``auto``, the target of automatic
    masks. Raises ``LabelStudioUnavailable`` when the project cannot be read, ``BadInput`` when
    ``auto_label`` does not fit its brush control."""
    try:
        label_config = client.projects.get(id=project).label_config
    except Exception as e:  # the SDK's ApiError (404, 403) or a transport error
        raise LabelStudioUnavailable(f"cannot read project {project}: {_error_text(e)}") from None
    cfg = parse_label_config(label_config)
    return label_config, cfg, _auto_target(cfg, auto_label) if auto is not None else None


def list_tasks(client, project: int, view: Optional[int] = None) -> Iterator[Dict[str, Any]]:
    """The tasks of ``project`` (or of its tab ``view``), page by page; a failure stops the whole
    run as ``LabelStudioUnavailable`` (a message, no traceback)."""
    try:
        yield from project_tasks(client, project, view)
    except Exception as e:
        raise LabelStudioUnavailable(f"listing the tasks of project {project}"
                                     f"{f' view {view}' if view else ''} failed: {_error_text(e)}") from None


def classify(task: Dict[str, Any], version: str, sources: Sequence[str], auto: Optional[AutoConfig]) -> _Plan:
    """done (a prediction of ``version`` is there), no-prompts, or todo (with its prompt regions),
    from the listed task alone: no request, no image."""
    if any(isinstance(p, dict) and p.get("model_version") == version for p in task.get("predictions") or []):
        return _Plan("done")
    results, where = result_regions(task, sources)
    if not results and auto is None:
        return _Plan("no-prompts", source=where)
    return _Plan("todo", results, where)


class TaskAnnotator:
    """A project's per-task work, the same in the single-machine job and in every Ray worker:
    ``plan`` (classify a task, read its image and run the encoder: the read-ahead stage) and
    ``annotate`` (decode through ``StableSamBackend.predict``, upload). ``recheck``: ask Label
    Studio right before each upload whether the task got a prediction of this version meanwhile
    (a Ray shard sent again after its worker died may have uploaded part of it already)."""

    def __init__(self, client, backend: StableSamBackend, project: int, source: str = "any",
                 auto: Optional[AutoConfig] = None, auto_label: Optional[str] = None, dry_run: bool = False,
                 recheck: bool = False, read_ahead: int = 4) -> None:
        if source not in SOURCES:
            raise BadInput(f"source must be one of {sorted(SOURCES)}, got {source!r}")
        if backend.settings.image_cache_items <= read_ahead:
            log.warning("IMAGE_CACHE_ITEMS (%d) <= read-ahead (%d): images read ahead may be fetched twice",
                        backend.settings.image_cache_items, read_ahead)
        self.client, self.backend, self.project, self.auto = client, backend, project, auto
        self.dry_run, self.recheck, self.read_ahead = dry_run, recheck, read_ahead
        self.sources: Sequence[str] = SOURCES[source]
        self.label_config, self.cfg, self.target = project_config(client, project, auto, auto_label)
        self.model = backend.model
        # The project's plugin version (the backend serves each project its own adapted plugin): the
        # version its predictions carry, so tasks done by it are skipped, and the plugin automatic
        # masks run through.
        serving = backend.serving(project)
        self.version = model_version(self.model.model_id, serving.version)
        self.plugin = backend.plugin_for(serving, self.model) if auto is not None else None

    def _image(self, task: Dict[str, Any], results: List[Dict[str, Any]]) -> np.ndarray:
        cfg = self.cfg
        names = [r.get("to_name") for r in results if isinstance(r, dict)] + list(cfg.output_by_image)
        to_name = next((n for n in names if n in cfg.image_keys), None)
        if to_name is None:
            raise BadInput(f"the label config's mask images {list(cfg.output_by_image)} have no data key")
        url = task["data"].get(cfg.image_keys[to_name])
        # encoded here, ahead of predict() (as for an interactive click), which finds the image in the
        # URL cache and its embedding in the model's
        image, digest = self.backend.images.load(url, task.get("id"))
        self.model.embed(image, digest)
        return image

    def plan(self, task: Dict[str, Any]) -> _Plan:
        """What to do with ``task``: done, no prompts, or todo (then with its image read)."""
        p = classify(task, self.version, self.sources, self.auto)
        if p.status == "todo":
            p.image = self._image(task, p.results)
        return p

    def _has_prediction(self, task_id: Any) -> bool:
        return any(p.model_version == self.version for p in self.client.predictions.list(task=task_id))

    def annotate(self, task: Dict[str, Any], p: _Plan, summary: LabelStudioSummary) -> None:
        """Predict a planned task and upload the prediction; the outcome is counted in ``summary``.
        Raises what went wrong (the caller records it)."""
        if p.results:
            pred = self.backend.predict([task], context={"result": p.results}, label_config=self.label_config,
                                        project=self.project)[0]
        else:
            pred = _auto_prediction(self.model, self.plugin, self.version, p.image, self.auto, self.target,
                                    self.backend.settings)
        if not pred["result"]:
            summary.empty += 1
        elif self.dry_run:
            summary.would_upload += 1
        elif self.recheck and self._has_prediction(task.get("id")):
            summary.already_uploaded += 1
            return
        else:
            self.client.predictions.create(task=task.get("id"), result=pred["result"], score=pred["score"],
                                           model_version=pred["model_version"])
            summary.uploaded += 1
        summary.masks += len(pred["result"])

    def run(self, tasks: Iterable[Dict[str, Any]], summary: LabelStudioSummary, limit: Optional[int] = None,
            bar: Optional[tqdm] = None) -> None:
        """Plan ``tasks`` ``read_ahead`` ahead in a background thread and annotate those to do, at
        most ``limit``; counts and failures go into ``summary``. One task's failure never stops
        the run; a failure to list the tasks does."""
        stage = ReadAhead(tasks, self.plan, depth=self.read_ahead, name="preannotate-tasks")
        try:
            for task, p, error in stage:
                tid = task.get("id")
                if error is None and p.status == "done":
                    summary.skipped_done += 1
                elif error is None and p.status == "no-prompts":
                    summary.no_prompts += 1
                    log.info("task %s: %s", tid, p.source)
                else:
                    if limit is not None and summary.processed >= limit:
                        break
                    summary.processed += 1
                    try:
                        if error is not None:
                            raise error
                        self.annotate(task, p, summary)
                    except Exception as e:  # one task never stops the run; all are reported at the end
                        if not isinstance(e, BadInput):
                            log.warning("task %s failed", tid, exc_info=True)
                        where = f" (prompts from {p.source})" if p is not None and p.source else ""
                        summary.failed.append((tid, _error_text(e) + where))
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    bar.set_postfix(skipped=summary.skipped_done, no_prompts=summary.no_prompts,
                                    failed=len(summary.failed), refresh=False)
        finally:
            stage.close()


def run_label_studio(client, backend: StableSamBackend, project: int, view: Optional[int] = None,
                     source: str = "any", auto: Optional[AutoConfig] = None, auto_label: Optional[str] = None,
                     limit: Optional[int] = None, dry_run: bool = False, read_ahead: int = 4,
                     progress: bool = True) -> LabelStudioSummary:
    """Pre-annotate ``project`` (or its Data Manager tab ``view``) through ``client`` (an SDK client,
    see ``backend.label_studio.connect``). ``source``: where prompts come from: ``any`` (newest
    annotation with prompts, else newest prediction with prompts), ``annotations`` or
    ``predictions``. ``auto``: tasks without prompts get SAM's automatic masks. ``limit``: at most
    that many tasks pre-annotated (skipped tasks do not count). ``dry_run``: compute, upload nothing.
    Raises ``LabelStudioUnavailable`` when the project cannot be read."""
    annotator = TaskAnnotator(client, backend, project, source, auto, auto_label, dry_run, read_ahead=read_ahead)
    summary = LabelStudioSummary(annotator.version)
    start = time.perf_counter()
    try:
        with tqdm(unit="img", desc="pre-annotating", disable=not progress) as bar:
            annotator.run(list_tasks(client, project, view), summary, limit, bar)
    finally:
        summary.seconds = time.perf_counter() - start
    return summary
