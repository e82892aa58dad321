"""Adapting the plugin to a Label Studio project's labels: the training job and the CLI's engine.

``python -m backend.training --project N --job-id ID`` is what the server starts for
START_TRAINING (``backend/jobs.py``), with the server's settings in its environment;
``scripts/finetune.py --label-studio-url ... --project N`` and ``--dataset export.json`` run the
same ``run_adaptation``. A run: fetch the project's annotated tasks (label-studio-sdk), decode
each brush mask, rebuild the annotator's prompts from the same annotation's rectangles and
keypoints (``annotation_prompts``), measure the held-out mIoU of the plugin serving now, train one
RTS epoch on the plugin only, measure again, write the new version atomically under
``MODEL_DIR/plugins/<base model>/project-N/`` with its summary and point the project at it.

A job reports through an atomic status JSON (``MODEL_DIR/jobs/<job id>.json``): phase
(starting, fetching, evaluating_before, training step k of n with its loss, evaluating_after,
saving, done / failed / cancelled), pid, times, held-out mIoU before / after, the new version or
the error. SIGTERM cancels it (nothing is written, unless it already commits the new version).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import numpy as np

from stable_sam.adaptation import AdaptationConfig, AdaptationError, adapt
from stable_sam.checkpoint import atomic_write_json, save_plugin
from stable_sam.data.dataset import DatasetError, ObjectPrompt, SegmentationDataset
from stable_sam.data.label_studio_export import LabelStudioExport, LabelStudioTasks
from stable_sam.download import CheckpointError
from stable_sam.model import StableSam, model_version
from stable_sam.modeling.plugin import PluginConfig, StableSamPlugin
from stable_sam.plugin_store import PluginStore, project_scope
from stable_sam.prompts import mask_to_box
from stable_sam.rts import RTSConfig, plugin_version

from .errors import BadInput
from .job_files import LOCK_FD_ENV, job_status_path, utc_now
from .prompts import PromptGroup, group_prompts, parse_regions

log = logging.getLogger(__name__)

JOB_NICE = 10  # a job yields the CPU to the server's interactive clicks
STATUS_EVERY_S = 1.0  # training-step updates of the status file, at most this often


# -- the annotator's prompts -----------------------------------------------------------------------

def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def annotation_prompts(results: List[Dict[str, Any]], brush: List[Dict[str, Any]],
                       masks: List[np.ndarray]) -> List[Optional[ObjectPrompt]]:
    """One prompt (or None) per brush mask, rebuilt from the annotation's rectangles / keypoints.

    Regions are grouped as the backend groups them for /predict (a keypoint inside a rectangle
    refines it). A group is matched to a mask by the backend's own link first (its brush results
    have id ``<first prompt id>_sam``), else by geometry: a rectangle goes to the mask whose tight
    box it overlaps most (IoU, each mask and rectangle used once); a free positive keypoint to the
    smallest mask containing it; a free negative keypoint to the mask of the nearest positive one.
    """
    out: List[Optional[ObjectPrompt]] = [None] * len(masks)
    if not masks:
        return out
    h, w = masks[0].shape
    try:
        groups, _ = group_prompts(parse_regions(results, "annotation"), w, h)
    except BadInput as e:  # a malformed region: the masks still train, with RTS prompts only
        log.info("annotation prompts ignored: %s", e.message)
        return out
    link = {str(r.get("id", ""))[:-4]: k for k, r in enumerate(brush) if str(r.get("id", "")).endswith("_sam")}
    boxes = [mask_to_box(m).tolist() for m in masks]
    points: Dict[int, List[Tuple[Tuple[float, float], int, str]]] = {}
    chosen: Dict[int, PromptGroup] = {}

    rects = [g for g in groups if g.box is not None]
    pairs = []
    for gi, g in enumerate(rects):
        if g.source_ids[0] in link:
            pairs.append((2.0, gi, link[g.source_ids[0]]))  # above any IoU: the backend's own link
        else:
            pairs += [(_box_iou(g.box, b), gi, k) for k, b in enumerate(boxes)]
    used = set()
    for score, gi, k in sorted(pairs, key=lambda p: -p[0]):
        if score > 0 and gi not in used and k not in chosen:
            used.add(gi)
            chosen[k] = rects[gi]

    free = next((g for g in groups if g.box is None), None)
    if free is not None:
        items = list(zip(free.source_ids, free.points, free.point_labels))
        matched: List[Tuple[Tuple[float, float], int]] = []
        for rid, (x, y), label in items:
            if not label:
                continue
            k = link.get(rid)
            if k is None:
                xi, yi = min(int(x), w - 1), min(int(y), h - 1)
                holders = [k for k, m in enumerate(masks) if m[yi, xi]]
                k = min(holders, key=lambda k: masks[k].sum()) if holders else None
            if k is not None:
                points.setdefault(k, []).append(((x, y), 1, rid))
                matched.append(((x, y), k))
        for rid, (x, y), label in items:
            if label or not matched:
                continue
            _, k = min(matched, key=lambda m: (m[0][0] - x) ** 2 + (m[0][1] - y) ** 2)
            points.setdefault(k, []).append(((x, y), 0, rid))

    for k in range(len(masks)):
        g = chosen.get(k)
        pts = ([(p, lab, rid) for p, lab, rid in zip(g.points, g.point_labels, g.source_ids[1:])] if g else [])
        pts += points.get(k, [])
        if g is None and not any(lab for _, lab, _ in pts):
            continue  # negatives alone are no prompt
        out[k] = ObjectPrompt(box=None if g is None else np.array(g.box),
                              points=np.array([p for p, _, _ in pts]) if pts else None,
                              labels=np.array([lab for _, lab, _ in pts]) if pts else None,
                              source=",".join(([g.source_ids[0]] if g else []) + [rid for _, _, rid in pts]))
    return out


# -- data sources ----------------------------------------------------------------------------------

def project_dataset(settings, project: int) -> LabelStudioTasks:
    """The annotated tasks of a live project, images read through the backend's ``ImageLoader``
    (uploads, local files, cloud storage) with LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY."""
    from .label_studio import connect, project_tasks
    from .media import ImageLoader
    from .label_config import parse_label_config

    client = connect(settings.label_studio_url, settings.label_studio_api_key)
    image_key = None
    config = getattr(client.projects.get(id=project), "label_config", None)
    if config:
        cfg = parse_label_config(config)  # 4xx-style message when the config has no brush control
        image_key = cfg.image_keys.get(next(iter(cfg.brush_by_image)))
    tasks = list(project_tasks(client, project, only_annotated=True))
    loader = ImageLoader(settings)

    def read(task: Dict[str, Any], url: str) -> Tuple[np.ndarray, str]:
        try:
            image, _ = loader.load(url, task.get("id"))
        except BadInput as e:
            raise DatasetError(f"task {task.get('id')}: {e.message}") from None
        return image, f"task {task.get('id')}"

    return LabelStudioTasks(tasks, read, f"Label Studio project {project} at {settings.label_studio_url}",
                            image_key=image_key, prompts_for=annotation_prompts)


def export_dataset(export_file: Path, image_root: Optional[Path]) -> LabelStudioExport:
    """A Label Studio JSON export with its images on disk, prompts rebuilt like a live project's."""
    return LabelStudioExport(export_file, image_root if image_root is not None else Path(export_file).parent,
                             prompts_for=annotation_prompts)


# -- reporting -------------------------------------------------------------------------------------

class Cancelled(Exception):
    """SIGTERM reached a job before it committed its new version."""


class Reporter:
    """Where a run reports: log lines, and for a server job its status file (atomic writes)."""

    def __init__(self, status_path: Optional[Path] = None, echo: Callable[[str], None] = print) -> None:
        self.status_path = status_path
        self.echo = echo
        self.state: Dict[str, Any] = {}
        if status_path is not None and status_path.is_file():
            try:
                self.state = json.loads(status_path.read_text())
            except ValueError:
                self.state = {}
        self._last_write = 0.0
        self._committing = False

    def update(self, throttle: bool = False, **fields: Any) -> None:
        self.state.update(fields, updated=utc_now())
        if self.status_path is None:
            return
        now = time.monotonic()
        if throttle and now - self._last_write < STATUS_EVERY_S:
            return
        self._last_write = now
        atomic_write_json(self.state, self.status_path)

    def log(self, message: str) -> None:
        self.echo(message)

    def phase(self, name: str, info: Optional[Dict[str, Any]] = None) -> None:
        self.update(phase=name, **(info or {}))
        self.echo(f"phase: {name}")

    def step(self, step: int, steps: int, loss: Optional[float]) -> None:
        self.update(throttle=step < steps, phase="training", step=step, steps=steps,
                    **({"loss": loss} if loss is not None else {}))

    # cancellation: a SIGTERM raises Cancelled until the new version starts being committed;
    # from then on the run finishes (a half-done commit would be worse than a late cancel)
    def on_sigterm(self, signum, frame) -> None:
        if not self._committing:
            raise Cancelled("cancelled (SIGTERM) before the new version was written")
        self.echo("SIGTERM while committing the new version: finishing")

    def committing(self) -> ContextManager[None]:
        self._committing = True
        return contextlib.nullcontext()


# -- the run ---------------------------------------------------------------------------------------

def starting_plugin(model: StableSam, store: Optional[PluginStore], scope: Optional[str]
                    ) -> Tuple[StableSamPlugin, str]:
    """The plugin the scope serves now (its current version, else the model's default one)."""
    current = store.current(scope) if store is not None and scope else None
    if current is not None:
        return store.load(scope, current, model_type=model.model_type).plugin.to(model.device), current
    return model.plugin, model.plugin_version


def run_adaptation(model: StableSam, dataset: SegmentationDataset, reporter: Reporter, *,
                   store: Optional[PluginStore] = None, scope: Optional[str] = None, out: Optional[Path] = None,
                   rts: RTSConfig = RTSConfig(), cfg: AdaptationConfig = AdaptationConfig(), activate: bool = True,
                   plugin_config: Optional[PluginConfig] = None, extra_summary: Optional[Dict[str, Any]] = None,
                   progress: bool = False) -> Dict[str, Any]:
    """Adapt, then write the new version: into ``store`` under ``scope`` (activated unless
    ``activate`` is False) or to the file ``out``. Returns what a status / --json shows."""
    if (store is None) == (out is None):
        raise ValueError("give a store (and scope) or an output file")
    current, current_version = starting_plugin(model, store, scope)
    reporter.log(f"adapting {current_version} ({cfg.init} start) on {model.version} ({model.device}); "
                 f"data: {dataset.description}")
    result = adapt(model, dataset, current, rts, cfg, plugin_config, progress=progress, log=reporter.log,
                   on_phase=reporter.phase, on_step=reporter.step)
    version = plugin_version(result.plugin)
    summary = {**result.summary, "previous_version": current_version, "scope": scope,
               "source": dataset.description, **(extra_summary or {})}
    reporter.phase("saving", {"step": summary["steps"], "steps": summary["steps"]})
    base = {"model_type": model.model_type, "model_id": model.model_id}
    with reporter.committing():  # a SIGTERM now waits: the version is written and activated whole
        if store is not None:
            path = store.save(scope, result.plugin, version, base, summary)
            if activate:
                store.activate(scope, version)
        else:
            path = save_plugin(result.plugin, out, version, base, summary)
    reporter.log(f"plugin {version} written to {path}" + (" and activated" if store is not None and activate else ""))
    return {"version": version, "model_version": model_version(model.model_id, version), "path": str(path),
            "activated": bool(store is not None and activate), "previous_version": current_version,
            "heldout": summary["heldout"], "images": summary["images"], "objects": summary["objects"],
            "prompt_kinds": summary["prompt_kinds"], "skipped": summary["skipped"], "minutes": summary["minutes_total"]}


def release_job_lock() -> None:
    """Release the project's job lock once the final status is written: the interpreter's exit can
    take a while, and a new START_TRAINING must not be told that this job still runs."""
    fd = os.environ.get(LOCK_FD_ENV, "")
    if fd.isdigit():
        with contextlib.suppress(OSError):
            fcntl.flock(int(fd), fcntl.LOCK_UN)
            os.close(int(fd))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """A server training job: settings from the environment (the server passes its own)."""
    try:
        return _job(argv)
    finally:
        release_job_lock()


def _job(argv: Optional[Sequence[str]]) -> int:
    ap = argparse.ArgumentParser(description="Stable-SAM training job for one Label Studio project "
                                             "(started by the backend on START_TRAINING)")
    ap.add_argument("--project", type=int, required=True)
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--export", type=Path, default=None,
                    help="read the labels from this Label Studio JSON export instead of the live project")
    ap.add_argument("--image-root", type=Path, default=None)
    args = ap.parse_args(argv)

    from stable_sam.build import build_from_settings

    from .logs import configure_logging
    from .settings import BackendSettings

    settings = BackendSettings.from_env()
    configure_logging(settings.log_level)
    reporter = Reporter(job_status_path(settings.model_dir, args.job_id), echo=lambda s: print(s, flush=True))
    signal.signal(signal.SIGTERM, reporter.on_sigterm)
    reporter.update(status="running", phase="fetching", pid=os.getpid())
    try:
        os.nice(JOB_NICE)
    except OSError:
        pass
    try:
        import torch

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        dataset = (export_dataset(args.export, args.image_root) if args.export is not None
                   else project_dataset(settings, args.project))
        reporter.update(tasks=len(dataset))
        model = build_from_settings(settings)
        store = PluginStore(settings.model_dir, model.model_id)
        scope = project_scope(args.project)
        reporter.update(store_dir=str(store.scope_dir(scope)), base_model=model.model_id)
        cfg = AdaptationConfig(holdout=settings.train_holdout, init=settings.train_init)
        result = run_adaptation(model, dataset, reporter, store=store, scope=scope, cfg=cfg,
                                extra_summary={"job_id": args.job_id, "project": args.project})
    except Cancelled as e:
        reporter.update(status="cancelled", phase="cancelled", error=str(e), finished=utc_now())
        return 3
    except (AdaptationError, DatasetError, BadInput, CheckpointError, ValueError) as e:
        msg = e.message if isinstance(e, BadInput) else str(e)
        reporter.update(status="failed", phase="failed", error=msg, finished=utc_now())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except BaseException as e:  # noqa: BLE001 - reported in the status, traceback to the job log
        traceback.print_exc()
        reporter.update(status="failed", phase="failed", error=f"{e.__class__.__name__}: {str(e)[:500]}",
                        finished=utc_now())
        return 1
    reporter.update(status="done", phase="done", finished=utc_now(), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
