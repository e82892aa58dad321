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
"""

from __future__ import annotations

from typing import Dict, List, Optional

import cv2
import numpy as np
from tqdm import tqdm

from .data.dataset import SegmentationDataset
from .evaluation import PROMPT_TYPES, ProtocolConfig, prompt_rng, protocol_prompts, predict_protocol
from .metrics import boundary_width, mask_iou
from .model import StableSam
from .modeling.plugin import StableSamPlugin
from .predictor import StableSamPredictor

ERROR_PARTS = ("fn", "fp_neighbour", "fp_band", "fp_far")


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


def failure_profile(model: StableSam, dataset: SegmentationDataset, plugin: Optional[StableSamPlugin] = None,
                    cfg: ProtocolConfig = ProtocolConfig(), progress: bool = True) -> Dict[str, object]:
    """The profile of plain SAM (``plugin`` None) or Stable-SAM with ``plugin`` on every object of
    ``dataset``: ``{"types": {P: {"miou", *ERROR_PARTS}}, "noisy04_over_gt", "point1_over_point3",
    "outside_box_share", "images", "objects"}``, figures in percent except the ratios."""
    predictor = StableSamPredictor(model, max_batch=128)
    saved_plugin, saved_version = model.plugin, model.plugin_version
    ious: Dict[str, List[float]] = {t: [] for t in cfg.prompt_types}
    errors = {t: np.zeros(len(ERROR_PARTS)) for t in cfg.prompt_types}  # pixels, summed
    areas = {t: 0 for t in cfg.prompt_types}  # object pixels x prompts, summed
    outside: List[float] = []
    images = objects = 0
    try:
        for index in tqdm(range(len(dataset)), desc="failure profile", unit="image", disable=not progress,
                          dynamic_ncols=True):
            sample = dataset[index]
            if not sample.masks:
                continue
            images += 1
            objects += len(sample.masks)
            predictor.set_image(sample.image)
            d = boundary_width(*sample.masks[0].shape, ratio=cfg.boundary_ratio)
            union = np.zeros_like(sample.masks[0])
            for m in sample.masks:
                union |= m
            for t in cfg.prompt_types:
                prompts = [protocol_prompts(m, t, cfg.prompts_per_object, prompt_rng(cfg.seed, index, j, t))
                           for j, m in enumerate(sample.masks)]
                masks, _ = predict_protocol(model, predictor, prompts, t, plugin)
                offsets = np.cumsum([0] + [len(p) for p in prompts])
                for j, gt in enumerate(sample.masks):
                    mj = masks[offsets[j]:offsets[j + 1]]
                    errors[t] += error_pixels(mj, gt, union & ~gt, band_around(gt, d)).sum(axis=0)
                    areas[t] += int(gt.sum()) * len(mj)
                    ious[t].append(float(mask_iou(mj, gt).mean()))
                    if t == "noisy_box_0.4":
                        outside.append(float(outside_box_share(gt, prompts[j].boxes).mean()))
    finally:
        model.set_plugin(saved_plugin, saved_version)
    types = {t: {"miou": round(100 * float(np.mean(ious[t])), 2),
                 **{k: round(100 * float(v) / max(areas[t], 1), 2) for k, v in zip(ERROR_PARTS, errors[t])}}
             for t in cfg.prompt_types}

    def ratio(a: str, b: str) -> Optional[float]:
        if a in types and b in types and types[b]["miou"] > 0:
            return round(types[a]["miou"] / types[b]["miou"], 3)
        return None

    return {"types": types, "noisy04_over_gt": ratio("noisy_box_0.4", "gt_box"),
            "point1_over_point3": ratio("point1", "point3"),
            "outside_box_share": round(100 * float(np.mean(outside)), 2) if outside else None,
            "images": images, "objects": objects}


def profile_table(profile: Dict[str, object]) -> str:
    """Markdown: one row per prompt type, mIoU and the error parts (percent of object area)."""
    lines = ["| prompt | mIoU | missed (FN) | FP on neighbours | FP in band | FP far |", "|---|---|---|---|---|---|"]
    for t, row in profile["types"].items():  # type: ignore[union-attr]
        lines.append(f"| {t} | {row['miou']:.1f} | {row['fn']:.1f} | {row['fp_neighbour']:.1f} | "
                     f"{row['fp_band']:.1f} | {row['fp_far']:.1f} |")
    return "\n".join(lines)


__all__ = ["ERROR_PARTS", "PROMPT_TYPES", "band_around", "error_pixels", "failure_profile", "outside_box_share",
           "profile_table"]
