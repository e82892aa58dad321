"""Where a model's masks go wrong under each prompt type: the failure profile.

For every object and prompt of the evaluation protocol (``evaluation.protocol_prompts``, the same
seeded prompts as the benchmark), the error of the predicted mask is split into disjoint parts,
each as a share of the object's area:

- ``fn``: object pixels the mask missed;
- ``fp_neighbour``: mask pixels on *other* annotated objects of the image;
- ``fp_band``: other mask pixels within the boundary band around the object (d = the boundary-IoU
  band width, 0.02 of the image diagonal): a loose outline;
- ``fp_far``: the remaining mask pixels, background far from the object: the spill real SAM shows
  under loose boxes.

Each part is pooled over the dataset: its pixels summed over all objects and prompts, divided by
the summed object area times the prompts (percent), so a tiny object that a mask swamps does not
outweigh the rest. mIoU is the protocol's: per object over its prompts, then over objects. The profile also gives
the two ratios that tell a proxy SAM from real SAM (noisy-0.4 / GT-box mIoU, 1-point / 3-point
mIoU; real SAM ViT-L: 0.58 and 0.55) and the share of object area outside the noisy-0.4 boxes.

The negative-click check (``negative_click``): for the first ``NEGATIVE_CLICK_PROMPTS`` prompts of
each object under a noisy-0.4 box and one point, a mask that wrongly includes a region (false
positive of at least ``MIN_SPILL_SHARE`` of the object's area and ``MIN_SPILL_PX`` pixels) gets a
negative click where an annotator would put it: the pixel of the largest false-positive component
farthest from its border (SAM's interactive evaluation). The prompt plus that click, with the first
mask's low-res logits as the mask prompt (SAM's interactive loop, as the backend serves it), is
predicted again; the check counts the cases in which IoU rose.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .data.dataset import SegmentationDataset
from .evaluation import PROMPT_TYPES, Prompts, ProtocolConfig, predict_protocol, protocol_samples
from .metrics import boundary_width, mask_iou
from .model import StableSam
from .modeling.plugin import StableSamPlugin
from .predictor import StableSamPredictor

ERROR_PARTS = ("fn", "fp_neighbour", "fp_band", "fp_far")
NEGATIVE_CLICK_TYPES = ("noisy_box_0.4", "point1")
NEGATIVE_CLICK_PROMPTS = 5
MIN_SPILL_SHARE, MIN_SPILL_PX = 0.02, 16
# The first mask's IoU splits the negative-click cases: a click that trims a fair mask is a
# harder test than one that trims a poor one.
IOU_BEFORE_BINS = {"below 0.3": 0.0, "0.3-0.6": 0.3, "0.6-0.8": 0.6, "0.8 and above": 0.8}  # name: lower edge


def error_pixels(pred: np.ndarray, gt: np.ndarray, others: np.ndarray, band: np.ndarray) -> np.ndarray:
    """N x H x W bool predictions of one H x W object -> N x 4 pixel counts: missed, on other
    objects, in the band around it, far background (``ERROR_PARTS``)."""
    fp = pred & ~gt
    return np.stack([(gt & ~pred).sum(axis=(1, 2)), (fp & others).sum(axis=(1, 2)),
                     (fp & ~others & band).sum(axis=(1, 2)), (fp & ~others & ~band).sum(axis=(1, 2))], axis=1)


def band_around(mask: np.ndarray, d: int) -> np.ndarray:
    """H x W bool: pixels outside ``mask`` within d pixels (chessboard) of it."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * d + 1, 2 * d + 1))
    return (cv2.dilate(mask.astype(np.uint8), kernel) > 0) & ~mask


def outside_box_share(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Share of ``mask``'s area outside each XYXY box (N x 4) -> N."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs + 0.5, ys + 0.5
    inside = ((cx[None] >= boxes[:, :1]) & (cx[None] <= boxes[:, 2:3]) &
              (cy[None] >= boxes[:, 1:2]) & (cy[None] <= boxes[:, 3:4]))
    return 1.0 - inside.mean(axis=1)


def negative_click_point(spill: np.ndarray) -> np.ndarray:
    """(x, y) pixel centre of the largest connected component of the H x W bool ``spill`` that lies
    farthest from the component's border."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(spill.astype(np.uint8), connectivity=8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    dist = cv2.distanceTransform(np.pad(labels == largest, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x + 0.5, y + 0.5])


def negative_clicks(predictor: StableSamPredictor, prompts: Sequence[Prompts], gts: Sequence[np.ndarray],
                    use_plugin: bool) -> List[Tuple[float, float]]:
    """(IoU before, IoU after) of every case where a prediction of ``prompts`` (one ``Prompts`` per
    object ``gts[j]`` of the image set in ``predictor``) spills and gets a negative click."""
    boxed = prompts[0].boxes is not None
    rows = [(j, i) for j, p in enumerate(prompts) for i in range(min(NEGATIVE_CLICK_PROMPTS, len(p)))]
    base = np.stack([(prompts[j].boxes if boxed else prompts[j].points)[i] for j, i in rows])  # N x 4 | N x K x 2
    if boxed:
        first = predictor.predict(box=base, multimask_output=False, use_plugin=use_plugin)
    else:
        first = predictor.predict(point_coords=base, point_labels=np.ones(base.shape[:2]), multimask_output=False,
                                  use_plugin=use_plugin)
    cases, clicks = [], []
    for r, (j, _) in enumerate(rows):
        spill = first.masks[r] & ~gts[j]
        if spill.sum() >= max(MIN_SPILL_PX, MIN_SPILL_SHARE * gts[j].sum()):
            cases.append(r)
            clicks.append(negative_click_point(spill))
    if not cases:
        return []
    neg, n = np.array(clicks)[:, None], len(cases)  # N x 1 x 2
    if boxed:
        points, labels, box = neg, np.zeros((n, 1)), base[cases]
    else:
        points = np.concatenate([base[cases], neg], axis=1)
        labels, box = np.concatenate([np.ones(base[cases].shape[:2]), np.zeros((n, 1))], axis=1), None
    second = predictor.predict(point_coords=points, point_labels=labels, box=box, mask_input=first.low_res_logits[cases],
                               multimask_output=False, use_plugin=use_plugin)
    return [(float(mask_iou(first.masks[r][None], gts[rows[r][0]])[0]),
             float(mask_iou(second.masks[k][None], gts[rows[r][0]])[0])) for k, r in enumerate(cases)]


def click_summary(cases: Sequence[Tuple[float, float]]) -> Dict[str, float]:
    """(IoU before, IoU after) of each negative click -> ``{"cases", "raised_share", "iou_before",
    "iou_after"}``, IoUs and the share of cases whose IoU rose in percent."""
    before, after = np.array(cases, dtype=float).T
    return {"cases": len(cases), "raised_share": round(100 * float((after > before).mean()), 2),
            "iou_before": round(100 * float(before.mean()), 2), "iou_after": round(100 * float(after.mean()), 2)}


def split_by_iou_before(cases: Sequence[Tuple[float, float]]) -> Dict[str, List[Tuple[float, float]]]:
    """``cases`` split by the first mask's IoU: ``{bin name: cases}``, the bins of ``IOU_BEFORE_BINS``."""
    edges = list(IOU_BEFORE_BINS.values()) + [float("inf")]
    return {name: [c for c in cases if lo <= c[0] < hi] for name, lo, hi in zip(IOU_BEFORE_BINS, edges, edges[1:])}


def failure_profile(model: StableSam, dataset: SegmentationDataset, plugin: Optional[StableSamPlugin] = None,
                    cfg: ProtocolConfig = ProtocolConfig(), progress: bool = True) -> Dict[str, object]:
    """The profile of plain SAM (``plugin`` None) or Stable-SAM with ``plugin`` on every object of
    ``dataset``: ``{"types": {P: {"miou", *ERROR_PARTS}}, "noisy04_over_gt", "point1_over_point3",
    "outside_box_share", "negative_click": {"cases", "raised_share", "iou_before", "iou_after", "by_prompt":
    {P: the same four}, "by_iou_before": {bin: the same four}} | None,
    "images", "objects"}``, figures in percent except the ratios."""
    predictor, use_plugin = StableSamPredictor(model, max_batch=128, plugin=plugin), plugin is not None
    ious: Dict[str, List[float]] = {t: [] for t in cfg.prompt_types}
    errors = {t: np.zeros(len(ERROR_PARTS)) for t in cfg.prompt_types}  # pixels, summed
    areas = {t: 0 for t in cfg.prompt_types}  # object pixels x prompts, summed
    outside: List[float] = []
    clicked: Dict[str, List[Tuple[float, float]]] = {t: [] for t in NEGATIVE_CLICK_TYPES}  # (IoU before, after)
    images = objects = 0
    for sample, prompts_of in protocol_samples(dataset, cfg, "failure profile", progress):
        images += 1
        objects += len(sample.masks)
        predictor.set_image(sample.image)
        d = boundary_width(*sample.masks[0].shape, ratio=cfg.boundary_ratio)
        union = np.zeros_like(sample.masks[0])
        for m in sample.masks:
            union |= m
        for t, prompts in prompts_of.items():
            masks, _ = predict_protocol(predictor, prompts, t, use_plugin)
            offsets = np.cumsum([0] + [len(p) for p in prompts])
            for j, gt in enumerate(sample.masks):
                mj = masks[offsets[j]:offsets[j + 1]]
                errors[t] += error_pixels(mj, gt, union & ~gt, band_around(gt, d)).sum(axis=0)
                areas[t] += int(gt.sum()) * len(mj)
                ious[t].append(float(mask_iou(mj, gt).mean()))
                if t == "noisy_box_0.4":
                    outside.append(float(outside_box_share(gt, prompts[j].boxes).mean()))
            if t in NEGATIVE_CLICK_TYPES:
                clicked[t] += negative_clicks(predictor, prompts, sample.masks, use_plugin)
    types = {t: {"miou": round(100 * float(np.mean(ious[t])), 2),
                 **{k: round(100 * float(v) / max(areas[t], 1), 2) for k, v in zip(ERROR_PARTS, errors[t])}}
             for t in cfg.prompt_types}

    def ratio(a: str, b: str) -> Optional[float]:
        if a in types and b in types and types[b]["miou"] > 0:
            return round(types[a]["miou"] / types[b]["miou"], 3)
        return None

    negative = None
    every = [c for t in NEGATIVE_CLICK_TYPES for c in clicked[t]]
    if every:
        negative = {**click_summary(every),
                    "by_prompt": {t: click_summary(clicked[t]) for t in NEGATIVE_CLICK_TYPES if clicked[t]},
                    "by_iou_before": {name: click_summary(cases)
                                      for name, cases in split_by_iou_before(every).items() if cases}}
    return {"types": types, "noisy04_over_gt": ratio("noisy_box_0.4", "gt_box"),
            "point1_over_point3": ratio("point1", "point3"),
            "outside_box_share": round(100 * float(np.mean(outside)), 2) if outside else None,
            "negative_click": negative, "images": images, "objects": objects}


def profile_table(profile: Dict[str, object]) -> str:
    """Markdown: one row per prompt type, mIoU and the error parts (percent of object area)."""
    lines = ["| prompt | mIoU | missed (FN) | FP on neighbours | FP in band | FP far |", "|---|---|---|---|---|---|"]
    for t, row in profile["types"].items():  # type: ignore[union-attr]
        lines.append(f"| {t} | {row['miou']:.1f} | {row['fn']:.1f} | {row['fp_neighbour']:.1f} | "
                     f"{row['fp_band']:.1f} | {row['fp_far']:.1f} |")
    return "\n".join(lines)


__all__ = ["ERROR_PARTS", "IOU_BEFORE_BINS", "PROMPT_TYPES", "band_around", "click_summary", "error_pixels",
           "failure_profile", "negative_click_point", "negative_clicks", "outside_box_share", "profile_table",
           "split_by_iou_before"]
