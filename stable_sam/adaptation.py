"""Adapting the plugin to a project's own labels: a held-out split, mIoU before and after, RTS.

``adapt`` splits the labelled images deterministically (by a key such as the task id, so a task
stays held out as the project grows), measures the held-out mIoU of the plugin serving now,
trains one RTS epoch on the rest starting from that plugin (or a fresh one), and measures again,
so a user sees whether adaptation helped. Held-out prompts are what the annotator drew for the
object when the sample has it (``Sample.prompts``), else ``noisy_boxes`` DN-DETR boxes of scale
``noise`` from a fixed seed; masks are predicted the way the backend serves them.

Bad items (an image that cannot be fetched, a corrupt mask) are skipped and listed, not fatal:
one broken task must not stop a project's training.

``run_adaptation`` is the whole workflow without a server: start from the plugin a store scope
serves (or the model's own), ``adapt``, write the new version atomically into the store (and point
the scope at it) or to a file. ``export_dataset`` reads a Label Studio JSON export with the
annotators' prompts. The backend's training job runs the same workflow on a live project's labels
(``backend/training_job.py``); ``scripts/finetune.py`` runs it on an export.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .checkpoint import save_plugin
from .data.dataset import DatasetError, Sample, SegmentationDataset, Subset
from .data.label_studio_export import LabelStudioExport
from .data.label_studio_prompts import annotation_prompts
from .evaluation import prompt_rng
from .metrics import mask_iou
from .model import StableSam, model_version
from .modeling.plugin import PluginConfig, StableSamPlugin
from .plugin_store import PluginStore
from .predictor import PromptError, StableSamPredictor
from .prompts import noisy_box
from .rts import RTSConfig, plugin_version, train_plugin

INIT_MODES = ("current", "fresh")


class AdaptationError(RuntimeError):
    """Nothing to train on (no labelled image, all skipped), or a bad setting."""


@dataclass
class AdaptationConfig:
    """How a project's plugin is adapted: the held-out share, where training starts (``init``), the
    held-out noisy boxes, and the RTS recipe."""
    holdout: float = 0.2  # share of labelled images held out for the before / after figure
    init: str = "current"  # start from the plugin serving now ("current") or a fresh one
    noise: float = 0.4  # DN-DETR scale of the held-out boxes for objects without a drawn prompt
    noisy_boxes: int = 5  # such boxes per object (their IoUs are averaged)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.noisy_boxes < 1:
            raise ValueError("noisy_boxes must be >= 1")


def holdout_split(keys: Sequence[str], fraction: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """(train indices, held-out indices): the ``round(fraction * n)`` keys (at least 1 when there
    are >= 2 and fraction > 0; none with 1) of smallest seeded hash. Deterministic, and a key keeps
    its side as keys are added unless a new one hashes below it."""
    n = len(keys)
    k = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, round(fraction * n)))
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).hexdigest())
    held = sorted(order[:k])
    return [i for i in range(n) if i not in set(held)], held


class Skipping(SegmentationDataset):
    """``base`` with items that raise ``DatasetError`` turned into empty samples (which training
    and evaluation pass over); the reasons are kept in ``skipped``."""

    def __init__(self, base: SegmentationDataset) -> None:
        self.base = base
        self.description = base.description
        self.skipped: Dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.base)

    def key(self, index: int) -> str:
        """The stable key of image ``index`` (the base dataset's, else the index): what the split hashes."""
        return self.base.key(index) if hasattr(self.base, "key") else str(index)

    def __getitem__(self, index: int) -> Sample:
        try:
            return self.base[index]
        except DatasetError as e:
            self.skipped[self.key(index)] = str(e)
            return Sample(np.zeros((1, 1, 3), np.uint8), [], self.key(index))


def heldout_miou(model: StableSam, dataset: SegmentationDataset, plugin: Optional[StableSamPlugin],
                 cfg: AdaptationConfig) -> Dict[str, Any]:
    """Mean per-object IoU (percent) of ``plugin`` on every object of ``dataset``; the same
    prompts for every plugin (seeded by the image's position and the object)."""
    predictor = StableSamPredictor(model, plugin=plugin)
    ious: List[float] = []
    drawn = images = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        if not sample.masks:
            continue
        images += 1
        predictor.set_image(sample.image)
        for j, mask in enumerate(sample.masks):
            given = sample.prompts[j] if sample.prompts else None
            if given is not None:
                try:
                    out = predictor.predict(point_coords=given.points, point_labels=given.labels,
                                            box=given.box)
                    ious.append(float(mask_iou(out.masks[0], mask)))
                    drawn += 1
                    continue
                except PromptError:
                    pass  # a drawn prompt the model refuses: measured with noisy boxes instead
            rng = prompt_rng(cfg.seed, index, j, "noisy_box_0.4")  # the protocol's seeding
            out = predictor.predict(box=np.stack([noisy_box(mask, cfg.noise, rng) for _ in range(cfg.noisy_boxes)]))
            ious.append(float(mask_iou(out.masks, mask).mean()))
    return {"miou": round(100 * float(np.mean(ious)), 2) if ious else None, "images": images,
            "objects": len(ious), "drawn_prompts": drawn, "noisy_box_prompts": len(ious) - drawn,
            "noisy_box": {"scale": cfg.noise, "per_object": cfg.noisy_boxes}}


@dataclass
class AdaptationResult:
    """``adapt``'s answer: the plugin to save and a summary (sizes, before / after mIoU, RTS)."""
    plugin: StableSamPlugin
    summary: Dict[str, Any] = field(default_factory=dict)


def adapt(model: StableSam, dataset: SegmentationDataset, current: StableSamPlugin,
          rts: RTSConfig = RTSConfig(), cfg: AdaptationConfig = AdaptationConfig(),
          plugin_config: Optional[PluginConfig] = None, progress: bool = False,
          log: Callable[[str], None] = print, on_phase: Optional[Callable[[str, Dict[str, Any]], None]] = None,
          on_step: Optional[Callable[[int, int, Optional[float]], None]] = None) -> AdaptationResult:
    """Held-out mIoU of ``current``, one RTS run on the training split, held-out mIoU after.

    ``current`` is the plugin serving now (the start point with ``init="current"``; it is not
    modified). ``on_phase(phase, info)`` reports "evaluating_before", "training",
    "evaluating_after" with the figures known so far. Raises ``AdaptationError`` when there is
    nothing to train on."""
    phase = on_phase or (lambda name, info: None)
    if len(dataset) == 0:
        raise AdaptationError(f"{dataset.description or 'the dataset'}: no labelled image (for Label Studio: no "
                              f"task with a brush annotation) to adapt to")
    data = Skipping(dataset)
    keys = [data.key(i) for i in range(len(data))]
    train_idx, held_idx = holdout_split(keys, cfg.holdout, cfg.seed)
    train, held = Subset(data, train_idx), Subset(data, held_idx)
    start = time.time()
    heldout: Dict[str, Any] = {"keys": [keys[i] for i in held_idx], "fraction": cfg.holdout}
    if not held_idx:
        heldout["note"] = (f"no held-out split with {len(keys)} labelled image (it takes at least 2): "
                           f"no before / after figure" if cfg.holdout > 0 else "no held-out split asked for (holdout 0)")
        log(f"held-out: {heldout['note']}")
    else:
        phase("evaluating_before", {"heldout": heldout})
        before = heldout_miou(model, held, current, cfg)
        heldout.update(miou_before=before["miou"], **{k: v for k, v in before.items() if k != "miou"})
        log(f"held-out ({len(held_idx)} images, {before['objects']} objects): mIoU before {before['miou']}")
    phase("training", {"heldout": heldout, "train_images": len(train_idx)})
    init = copy.deepcopy(current) if cfg.init == "current" else StableSamPlugin(plugin_config or PluginConfig())
    plugin, summary = train_plugin(model, train, rts, init, progress=progress, log=log, on_step=on_step)
    if summary["images"] == 0:
        why = "; ".join(f"{k}: {v}" for k, v in list(data.skipped.items())[:5])
        raise AdaptationError(f"no usable training image among {len(train_idx)} labelled ones"
                              + (f" ({why})" if why else ""))
    if held_idx:
        phase("evaluating_after", {"heldout": heldout})
        after = heldout_miou(model, held, plugin, cfg)
        heldout["miou_after"] = after["miou"]
        log(f"held-out mIoU before {heldout['miou_before']} -> after {heldout['miou_after']}")
    summary.update({"adaptation": {**asdict(cfg), "train_keys": [keys[i] for i in train_idx]},
                    "heldout": heldout, "skipped": dict(data.skipped),
                    "minutes_total": round((time.time() - start) / 60, 3)})
    return AdaptationResult(plugin, summary)


# -- the workflow ----------------------------------------------------------------------------------

def export_dataset(export_file: Path, image_root: Optional[Path] = None) -> LabelStudioExport:
    """A Label Studio JSON export with its images on disk (default: beside the export), each
    mask's prompt rebuilt from its annotation as for a live project (``annotation_prompts``)."""
    return LabelStudioExport(export_file, image_root if image_root is not None else Path(export_file).parent,
                             prompts_for=annotation_prompts)


class Reporter:
    """Where a run reports: log lines, phases, training steps; ``committing()`` wraps the write
    of the new version. This one prints; the backend's job reporter also keeps a status file."""

    def __init__(self, echo: Callable[[str], None] = print) -> None:
        self.echo = echo

    def log(self, message: str) -> None:
        """A line for the job's log."""
        self.echo(message)

    def phase(self, name: str, info: Optional[Dict[str, Any]] = None) -> None:
        """The job entered phase ``name`` (``info``: figures to show with it)."""
        self.echo(f"phase: {name}")

    def step(self, step: int, steps: int, loss: Optional[float]) -> None:
        """RTS finished ``step`` of ``steps`` (``loss`` None when the step had no usable image)."""
        pass

    def committing(self) -> ContextManager[None]:
        """A context in which the new version is written (a job cannot be cancelled inside it)."""
        return contextlib.nullcontext()


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
    with reporter.committing():  # a cancel now waits: the version is written and activated whole
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
