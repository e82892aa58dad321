"""The evaluation protocol of HQ-SAM / Stable-SAM: noisy boxes and random clicks, side by side.

Prompt types (``PROMPT_TYPES``): the tight GT box; DN-DETR noisy boxes of scale 0.2 and 0.4; 1 and
3 positive points drawn uniformly inside the GT mask. Each object gets ``prompts_per_object`` (20)
prompts of each random type from a generator seeded by (seed, image, object, type), so every model
sees exactly the same prompts, whatever the order or the set of models. The GT box is one fixed
prompt (its 20 copies would give 20 identical masks: stability 100 by construction).

Every prompt is decoded in single-mask mode, as the paper evaluates. ``point1_multimask`` (an
extra type, outside the paper's protocol) is what the predictor serves for a lone click: SAM's
three candidates, the best by predicted IoU.

Metrics per object and type: IoU and boundary IoU averaged over its prompts, and stability, the
mean pairwise IoU of its masks over the prompts. mIoU / mBIoU / stability average over objects.
The models are plain SAM (no plugin) and any number of plugins, run on one shared frozen SAM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from .data.dataset import Sample, SegmentationDataset
from .metrics import boundary_iou, mask_iou, stability
from .model import StableSam
from .modeling.plugin import StableSamPlugin
from .predictor import StableSamPredictor
from .prompts import mask_to_box, noisy_box, sample_points

PROMPT_TYPES = ("gt_box", "noisy_box_0.2", "noisy_box_0.4", "point1", "point3")
EXTRA_TYPES = ("point1_multimask",)
ALL_TYPES = PROMPT_TYPES + EXTRA_TYPES
_TYPE_IDS = {t: i for i, t in enumerate(ALL_TYPES)}
NOISY_TYPES = ("noisy_box_0.2", "noisy_box_0.4", "point1", "point3")


@dataclass
class Prompts:
    """n prompts for one object, original-image pixels: boxes n x 4 or points n x K x 2."""

    boxes: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.boxes if self.boxes is not None else self.points)


def protocol_prompts(mask: np.ndarray, prompt_type: str, n: int, rng: np.random.Generator) -> Prompts:
    """The protocol's prompts of one type for one H x W bool mask (``gt_box``: one prompt)."""
    if prompt_type == "gt_box":
        return Prompts(boxes=mask_to_box(mask)[None])
    if prompt_type.startswith("noisy_box_"):
        scale = float(prompt_type.rsplit("_", 1)[1])
        return Prompts(boxes=np.stack([noisy_box(mask, scale, rng) for _ in range(n)]))
    if prompt_type in ("point1", "point3", "point1_multimask"):
        k = 3 if prompt_type == "point3" else 1
        return Prompts(points=np.stack([sample_points(mask, k, rng) for _ in range(n)]))
    raise ValueError(f"unknown prompt type {prompt_type!r}; expected one of {ALL_TYPES}")


def prompt_rng(seed: int, image_index: int, object_index: int, prompt_type: str) -> np.random.Generator:
    """The generator of one object's prompts of one type: seeded by (seed, image, object, type), so
    every model and every run draws the same prompts."""
    return np.random.default_rng([seed, image_index, object_index, _TYPE_IDS[prompt_type]])


def protocol_samples(dataset: SegmentationDataset, cfg: "ProtocolConfig", desc: str,
                     progress: bool = True) -> Iterator[Tuple[Sample, Dict[str, List[Prompts]]]]:
    """Every image of ``dataset`` that has objects: the sample, and per prompt type of
    ``cfg`` the protocol's prompts of each object (the same seeded prompts for every model)."""
    for index in tqdm(range(len(dataset)), desc=desc, unit="image", disable=not progress, dynamic_ncols=True):
        sample = dataset[index]
        if sample.masks:
            yield sample, {t: [protocol_prompts(m, t, cfg.prompts_per_object, prompt_rng(cfg.seed, index, j, t))
                               for j, m in enumerate(sample.masks)] for t in cfg.prompt_types}


@dataclass
class ProtocolConfig:
    """The evaluation protocol: prompts per object and type, their seed, the boundary band (share of
    the image diagonal) of boundary IoU, the prompt types, and the figure's cases."""
    prompts_per_object: int = 20
    seed: int = 0
    boundary_ratio: float = 0.02
    prompt_types: Tuple[str, ...] = PROMPT_TYPES
    figure_cases: int = 4  # per figure type: the first object of the first images, first prompt
    figure_types: Tuple[str, ...] = ("noisy_box_0.4", "point1")

    def __post_init__(self) -> None:
        unknown = [t for t in self.prompt_types if t not in ALL_TYPES]
        if unknown:
            raise ValueError(f"unknown prompt types {unknown}; expected some of {ALL_TYPES}")
        if self.prompts_per_object < 2:
            raise ValueError("prompts_per_object must be >= 2 (stability is a pairwise IoU)")


@dataclass
class Case:
    """One object and one prompt, kept for the picture: masks per model name."""

    image: np.ndarray
    gt: np.ndarray
    name: str
    prompt_type: str
    box: Optional[np.ndarray]
    points: Optional[np.ndarray]
    masks: Dict[str, np.ndarray] = field(default_factory=dict)
    ious: Dict[str, float] = field(default_factory=dict)


class OffsetMeter:
    """Statistics of the DSP offsets a plugin produced during an evaluation, gathered by a forward
    hook on its ``dsp``: the mean offset length in grid cells and the share of offset components
    within 5 % of the tanh bound (offsets stuck at the bound stopped learning)."""

    def __init__(self, plugin: StableSamPlugin) -> None:
        self.bound = plugin.dsp.offset_range
        self.length_sum = 0.0
        self.at_bound = 0
        self.count = 0
        self._handle = plugin.dsp.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        offsets = output[2].detach().float()  # B x H x W x 2, grid cells
        self.length_sum += float(offsets.norm(dim=-1).sum())
        self.at_bound += int((offsets.abs() >= 0.95 * self.bound).sum())
        self.count += offsets.shape[0] * offsets.shape[1] * offsets.shape[2]

    def close(self) -> None:
        """Remove the hook from the plugin."""
        self._handle.remove()

    def summary(self) -> Dict[str, float]:
        """The mean offset length in feature cells and the share of offset components within 5 % of the tanh bound."""
        n = max(self.count, 1)
        return {"mean_cells": round(self.length_sum / n, 4), "at_bound_share": round(self.at_bound / (2 * n), 4)}


@dataclass
class BenchmarkResult:
    """Per model, per prompt type: per-object lists of IoU, boundary IoU, stability, mean alpha_1;
    per plugin, its offset statistics (``OffsetMeter.summary``)."""

    per_object: Dict[str, Dict[str, Dict[str, List[float]]]]
    cases: List[Case]
    images: int
    objects: int
    seconds: float
    config: ProtocolConfig
    offsets: Dict[str, Dict[str, float]] = field(default_factory=dict)
    areas: List[int] = field(default_factory=list)  # each object's mask area in pixels, in per_object's order

    def by_size(self) -> Dict[str, Dict[str, Dict[str, Dict[str, float]]]]:
        """model -> prompt type -> COCO size bucket (small < 32^2 px, medium < 96^2, large) ->
        {"miou" in percent, "objects"}; a bucket without objects is left out."""
        areas = np.asarray(self.areas)
        buckets = {"small": areas < 32 ** 2, "medium": (areas >= 32 ** 2) & (areas < 96 ** 2), "large": areas >= 96 ** 2}
        out: Dict[str, Dict[str, Dict[str, Dict[str, float]]]] = {}
        for model, types in self.per_object.items():
            out[model] = {}
            for t, m in types.items():
                iou = np.asarray(m["iou"])
                out[model][t] = {name: {"miou": round(100 * float(iou[sel].mean()), 2), "objects": int(sel.sum())}
                                 for name, sel in buckets.items() if sel.any() and len(iou) == len(areas)}
        return out

    def alpha(self, model: str) -> Optional[Dict[str, float]]:
        """Mean alpha_1 (the deformed path's weight) per prompt type; None for plain SAM."""
        types = self.per_object[model]
        if not any(m["alpha"] for m in types.values()):
            return None
        return {t: round(float(np.mean(m["alpha"])), 4) for t, m in types.items() if m["alpha"]}

    def summary(self) -> Dict[str, Dict[str, Dict[str, float]]]:
        """model -> prompt type -> {"miou", "mbiou", "stability"} in percent (+ "alpha_deformed")."""
        out: Dict[str, Dict[str, Dict[str, float]]] = {}
        for model, types in self.per_object.items():
            out[model] = {}
            for t, m in types.items():
                row = {k: round(100 * float(np.mean(m[src])), 2)
                       for k, src in (("miou", "iou"), ("mbiou", "biou"), ("stability", "stability"))}
                if m["alpha"]:
                    row["alpha_deformed"] = round(float(np.mean(m["alpha"])), 4)
                out[model][t] = row
        return out


def evaluate(model: StableSam, dataset: SegmentationDataset, plugins: Mapping[str, Optional[StableSamPlugin]],
             cfg: ProtocolConfig = ProtocolConfig(), progress: bool = True) -> BenchmarkResult:
    """Run the protocol for every entry of ``plugins`` (name -> plugin, None = plain SAM) on every
    object of ``dataset``, all models on the same prompts; each image is encoded once."""
    start = time.time()
    predictors = {name: StableSamPredictor(model, max_batch=128, plugin=p) for name, p in plugins.items()}
    per_object = {name: {t: {"iou": [], "biou": [], "stability": [], "alpha": []} for t in cfg.prompt_types}
                  for name in plugins}
    cases: List[Case] = []
    images = objects = 0
    areas: List[int] = []
    meters = {name: OffsetMeter(p) for name, p in plugins.items() if p is not None}
    try:
        for sample, prompts_of in protocol_samples(dataset, cfg, "benchmark", progress):
            images += 1
            objects += len(sample.masks)
            areas += [int(m.sum()) for m in sample.masks]
            embedding = model.embed(sample.image)
            for predictor in predictors.values():
                predictor.set_embedding(embedding)
            for t, prompts in prompts_of.items():
                counts = [len(p) for p in prompts]
                new_cases = []  # the first object of each of the first images: no picking
                if t in cfg.figure_types and sum(c.prompt_type == t for c in cases) < cfg.figure_cases:
                    new_cases = [Case(sample.image, sample.masks[0], sample.name, t,
                                      None if prompts[0].boxes is None else prompts[0].boxes[0],
                                      None if prompts[0].points is None else prompts[0].points[0])]
                for name, plugin in plugins.items():
                    masks, alpha = predict_protocol(predictors[name], prompts, t, use_plugin=plugin is not None)
                    offsets = np.cumsum([0] + counts)
                    for j, gt in enumerate(sample.masks):
                        mj = masks[offsets[j]:offsets[j + 1]]
                        stats = per_object[name][t]
                        stats["iou"].append(float(mask_iou(mj, gt).mean()))
                        stats["biou"].append(float(boundary_iou(mj, gt, cfg.boundary_ratio).mean()))
                        stats["stability"].append(stability(mj) if len(mj) > 1 else 1.0)
                        if alpha is not None:
                            stats["alpha"].append(float(alpha[offsets[j]:offsets[j + 1], 0].mean()))
                    for j, case in enumerate(new_cases):
                        case.masks[name] = masks[offsets[j]]
                        case.ious[name] = float(mask_iou(masks[offsets[j]], case.gt))
                cases += new_cases
    finally:
        for meter in meters.values():
            meter.close()
    return BenchmarkResult(per_object, cases, images, objects, time.time() - start, cfg,
                           {name: m.summary() for name, m in meters.items()}, areas)


def predict_protocol(predictor: StableSamPredictor, prompts: Sequence[Prompts], prompt_type: str,
                     use_plugin: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """All objects' prompts of one type in batched decoder calls, with the predictor's plugin or
    plain SAM -> masks N x H x W, alpha N x 2 (None for plain SAM)."""
    multimask = prompt_type == "point1_multimask"
    if prompts[0].boxes is not None:
        out = predictor.predict(box=np.concatenate([p.boxes for p in prompts]), multimask_output=multimask,
                                use_plugin=use_plugin)
    else:
        pts = np.concatenate([p.points for p in prompts])
        out = predictor.predict(point_coords=pts, point_labels=np.ones(pts.shape[:2]), multimask_output=multimask,
                                use_plugin=use_plugin)
    return out.masks, out.alpha


TYPE_LABELS = {"gt_box": "GT box", "noisy_box_0.2": "noisy box s=0.2", "noisy_box_0.4": "noisy box s=0.4",
               "point1": "1 point", "point3": "3 points",
               "point1_multimask": "1 point, best of 3 (not in the paper's protocol)"}


def side_by_side_table(summary: Dict[str, Dict[str, Dict[str, float]]], base: str = "sam",
                       ours: str = "stable_sam") -> str:
    """Markdown: one row per prompt type, SAM and Stable-SAM mIoU / mBIoU / stability."""
    lines = ["| prompt | SAM mIoU | SAM mBIoU | SAM stability | Stable-SAM mIoU | Stable-SAM mBIoU | Stable-SAM stability |",
             "|---|---|---|---|---|---|---|"]
    for t, a in summary[base].items():
        b = summary[ours][t]
        lines.append(f"| {TYPE_LABELS.get(t, t)} | {a['miou']:.1f} | {a['mbiou']:.1f} | {a['stability']:.1f} | "
                     f"{b['miou']:.1f} | {b['mbiou']:.1f} | {b['stability']:.1f} |")
    return "\n".join(lines)


def size_table(by_size: Dict[str, Dict[str, Dict[str, Dict[str, float]]]]) -> str:
    """Markdown: mIoU per model and prompt type, by COCO object size (objects in brackets)."""
    lines = ["| model | prompt | small | medium | large |", "|---|---|---|---|---|"]
    for model, types in by_size.items():
        for t, buckets in types.items():
            cells = [f"{buckets[b]['miou']:.1f} ({buckets[b]['objects']})" if b in buckets else "-"
                     for b in ("small", "medium", "large")]
            lines.append(f"| {model} | {TYPE_LABELS.get(t, t)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variants_table(summary: Dict[str, Dict[str, Dict[str, float]]], labels: Optional[Mapping[str, str]] = None) -> str:
    """Markdown: one row per model, mIoU per prompt type and the mean stability over noisy types."""
    types = list(next(iter(summary.values())).keys())
    noisy = [t for t in types if t in NOISY_TYPES or t in EXTRA_TYPES]
    head = "| model | " + " | ".join(f"{TYPE_LABELS.get(t, t)} mIoU" for t in types) + " | stability (noisy types) |"
    lines = [head, "|---" * (len(types) + 2) + "|"]
    for name, rows in summary.items():
        stab = np.mean([rows[t]["stability"] for t in noisy]) if noisy else float("nan")
        label = labels.get(name, name) if labels else name
        lines.append(f"| {label} | " + " | ".join(f"{rows[t]['miou']:.1f}" for t in types) + f" | {stab:.1f} |")
    return "\n".join(lines)


def targets_report(summary: Dict[str, Dict[str, Dict[str, float]]], plugin_params: int,
                   alpha: Optional[Mapping[str, float]] = None, base: str = "sam",
                   ours: str = "stable_sam") -> List[Dict[str, Any]]:
    """The plugin's targets (the paper reaches them on real SAM), each with the two figures
    compared and whether it is met: it recovers half of plain SAM's GT box -> noisy-0.4 gap and
    of its 3 points -> 1 point gap, keeps GT-box quality, is 5 points more stable on every noisy
    prompt type, routes noisy boxes to the deformed path more than GT boxes, has <= 0.1 M
    parameters."""
    a, b = summary[base], summary[ours]
    out = []

    def add(name: str, left: float, right: float, ok: bool) -> None:
        out.append({"target": name, "value": round(float(left), 4), "reference": round(float(right), 4),
                    "met": bool(ok)})

    def recovered(good: str, casual: str) -> None:
        if good in a and casual in a and casual in b:
            gap = a[good]["miou"] - a[casual]["miou"]
            share = (b[casual]["miou"] - a[casual]["miou"]) / gap if gap > 0 else float("nan")
            add(f"share of SAM's {good} -> {casual} mIoU gap recovered >= 0.5 (gap {gap:.1f} points)",
                share, 0.5, gap > 0 and share >= 0.5)

    recovered("gt_box", "noisy_box_0.4")
    recovered("point3", "point1")
    if "gt_box" in b:
        add("Stable-SAM GT box mIoU >= SAM GT box mIoU - 0.5", b["gt_box"]["miou"], a["gt_box"]["miou"] - 0.5,
            b["gt_box"]["miou"] >= a["gt_box"]["miou"] - 0.5)
    for t in NOISY_TYPES:
        if t in b:
            add(f"Stable-SAM stability >= SAM stability + 5, {t}", b[t]["stability"], a[t]["stability"] + 5,
                b[t]["stability"] >= a[t]["stability"] + 5)
    if alpha and "noisy_box_0.4" in alpha and "gt_box" in alpha:
        add("mean alpha_1 on noisy-0.4 boxes > on GT boxes", alpha["noisy_box_0.4"], alpha["gt_box"],
            alpha["noisy_box_0.4"] > alpha["gt_box"])
    add("trainable parameters <= 0.1 M", plugin_params, 100_000, plugin_params <= 100_000)
    return out
