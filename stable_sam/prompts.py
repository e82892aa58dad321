"""Prompt generators: boxes and points drawn from ground-truth masks, seeded and reproducible.

Coordinates are pixels, x before y; boxes are XYXY. Two families live here:
- SAM's own training prompts (``sam_jittered_box``, ``sample_points``, ``error_point``), used to
  pretrain the small SAM the way SAM was trained;
- the evaluation protocol's noisy prompts (``noisy_box``: DN-DETR noise of scale s), which are
  what Stable-SAM is made robust to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np


@dataclass
class ObjectPrompt:
    """The prompt of one object, in original-image pixels: a box (4, XYXY), points (K x 2, x y)
    with labels (K: 1 positive, 0 negative), or both. ``source``: where it came from (e.g. the
    Label Studio region ids). Arrays are float64 / int64 whatever was passed in."""

    box: Optional[np.ndarray] = None
    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.box is None and self.points is None:
            raise ValueError("an object prompt needs a box or points")
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        if self.points is not None:
            self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
            self.labels = np.asarray(self.labels if self.labels is not None else np.ones(len(self.points)),
                                     dtype=np.int64).reshape(-1)
            if len(self.labels) != len(self.points):
                raise ValueError(f"{len(self.points)} points need as many labels, got {len(self.labels)}")
            if len(self.points) == 0:
                self.points = self.labels = None
                if self.box is None:
                    raise ValueError("an object prompt needs a box or points")

    @property
    def shape(self) -> Tuple[bool, int]:
        """(has a box, number of points): prompts of one shape share a decoder call."""
        return self.box is not None, 0 if self.points is None else len(self.points)

    def describe(self) -> str:
        """What the prompt is made of, e.g. "box + 2 positive points + 1 negative" (the text a
        brush result's region details show)."""
        parts = ["box"] if self.box is not None else []
        if self.points is not None:
            pos = int(self.labels.sum())
            parts += [f"{pos} positive point{'s' if pos > 1 else ''}"] if pos else []
            parts += [f"{len(self.labels) - pos} negative"] if len(self.labels) > pos else []
        return " + ".join(parts)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box (float32, inclusive pixel edges: x1 = last column + 1) of a non-empty H x W mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask is empty: no box can be derived from it")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def clamp_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clamp an XYXY box to the image and keep it at least one pixel wide and high."""
    x0, y0, x1, y1 = box
    x0, x1 = np.clip([x0, x1], 0, width)
    y0, y1 = np.clip([y0, y1], 0, height)
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    if x1 - x0 < 1:
        x1 = min(width, x0 + 1)
        x0 = x1 - 1
    if y1 - y0 < 1:
        y1 = min(height, y0 + 1)
        y0 = y1 - 1
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def sam_jittered_box(mask: np.ndarray, rng: np.random.Generator, max_px: float = 20.0) -> np.ndarray:
    """SAM's training box: each coordinate moved by N(0, 10% of the box side), at most ``max_px``
    (SAM: 20 px on its 1024-px input)."""
    box = mask_to_box(mask)
    w, h = box[2] - box[0], box[3] - box[1]
    noise = rng.normal(0.0, 0.1, 4) * np.array([w, h, w, h])
    noise = np.clip(noise, -max_px, max_px)
    return clamp_box(box + noise, *mask.shape)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two XYXY boxes."""
    iw = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    ih = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    inter = iw * ih
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def noisy_box(mask: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """DN-DETR box noise of scale s: (cx, cy, w, h) += U(-1, 1) * (w/2, h/2, w, h) * s, clamped."""
    x0, y0, x1, y1 = mask_to_box(mask)
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2
    d = rng.uniform(-1.0, 1.0, 4) * np.array([w / 2, h / 2, w, h]) * scale
    cx, cy, w, h = cx + d[0], cy + d[1], max(w + d[2], 1.0), max(h + d[3], 1.0)
    return clamp_box(np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), *mask.shape)


def sample_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k points (k x 2, x y, pixel centres) drawn uniformly from the mask's pixels."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask is empty: no point can be drawn inside it")
    idx = rng.integers(0, len(xs), size=k)
    return np.stack([xs[idx] + 0.5, ys[idx] + 0.5], axis=1).astype(np.float32)


def error_point(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
    """SAM's corrective click: a point in the error region, positive (1) on a miss, negative (0) on a
    false alarm, drawn from whichever error is larger. With no error, a positive point in the mask."""
    fn, fp = gt & ~pred, pred & ~gt
    region, label = (fn, 1) if fn.sum() >= fp.sum() else (fp, 0)
    if not region.any():
        region, label = gt, 1
    return sample_points(region, 1, rng)[0], label


def negative_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k points (k x 2, x y) on background near the object: inside its tight box where the box has
    background, else anywhere off the mask. The clicks an annotator makes to trim a spill-over."""
    x0, y0, x1, y1 = mask_to_box(mask).astype(int)
    near = np.zeros_like(mask)
    near[y0:y1, x0:x1] = True
    region = near & ~mask
    if not region.any():
        region = ~mask
    if not region.any():
        raise ValueError("mask covers the whole image: no negative point can be drawn")
    return sample_points(region, k, rng)
