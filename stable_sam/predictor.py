"""``StableSamPredictor``: SAM's predictor interface with the Stable-SAM plugin.

Set an image once, then prompt it any number of times; every prompt after the first costs one
decoder call. Many boxes are decoded in one batched call, each giving its own mask::

    predictor = StableSamPredictor(model)
    predictor.set_image(image)                      # H x W x 3 uint8 RGB
    out = predictor.predict(box=np.array([[10, 20, 120, 140], [200, 40, 260, 90]]))
    out.masks                                       # 2 x H x W bool
    out.alpha                                       # 2 x 2: DRP weights (deformed, regular)

A predictor holds the one image it was set to; the model and its embedding cache behind it are
shared and thread-safe, so a server makes one predictor per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from segment_anything.utils.amg import calculate_stability_score

from .model import ImageEmbedding, StableSam
from .modeling.plugin import StableSamPlugin
from .prompts import ObjectPrompt


class PromptError(ValueError):
    """A prompt that cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class ObjectMask:
    """One prompt's mask and the model's own figures for it (a row of a ``Prediction``)."""

    mask: np.ndarray  # H x W bool
    score: float  # predicted IoU
    stability: float
    alpha: Optional[Tuple[float, float]] = None  # DRP weights (deformed, regular); None for plain SAM


@dataclass
class Prediction:
    """One mask per prompt, N prompts. Masks at the original image size."""

    masks: np.ndarray  # N x H x W bool
    scores: np.ndarray  # N, predicted IoU
    stability: np.ndarray  # N, IoU of the mask thresholded at logit +1 and -1
    low_res_logits: np.ndarray  # N x 1 x h x w, feed back as ``mask_input``
    alpha: Optional[np.ndarray]  # N x 2 DRP weights (deformed, regular); None for plain SAM
    multimask: bool  # whether SAM's three candidates were made and the best picked

    def row(self, i: int) -> ObjectMask:
        """Prompt ``i``'s mask, with its figures as Python floats."""
        alpha = None if self.alpha is None else (float(self.alpha[i][0]), float(self.alpha[i][1]))
        return ObjectMask(self.masks[i], float(self.scores[i]), float(self.stability[i]), alpha)


def _as_float_array(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise PromptError(f"{name} must be numeric: {e}") from e
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{name} contains NaN or infinite values: {arr.tolist()}")
    return arr


class StableSamPredictor:
    """Shaped like ``segment_anything.SamPredictor``; ``use_plugin=False`` gives plain SAM.

    ``plugin``: the plugin this predictor runs instead of the model's own (e.g. one project's
    adapted version); the shared model is not touched, so predictors of different plugins can run
    side by side in threads."""

    def __init__(self, model: StableSam, max_batch: int = 64, plugin: Optional[StableSamPlugin] = None) -> None:
        """
        Args:
            model: the SAM (with its own plugin) that encodes and decodes.
            max_batch: prompts per decoder call; more are decoded in chunks.
            plugin: run this plugin instead of ``model.plugin`` (the model is not changed).
        """
        self.model = model
        self.max_batch = max_batch
        self.plugin = plugin
        self.image: Optional[ImageEmbedding] = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> ImageEmbedding:
        """Encode (or fetch from the cache) an image; later ``predict`` calls prompt it.

        Args:
            image: H x W x 3 uint8.
            image_format: "RGB" or "BGR" (channels reversed first).

        Returns:
            The image's ``ImageEmbedding`` (features, input and original size).

        Raises:
            PromptError: the image is not H x W x 3 uint8, is empty, or the format is unknown.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise PromptError(f"image must be H x W x 3, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise PromptError(f"image must be uint8, got {image.dtype}")
        if min(image.shape[:2]) < 1:
            raise PromptError(f"image is empty: shape {image.shape}")
        if image_format not in ("RGB", "BGR"):
            raise PromptError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format == "BGR":
            image = image[..., ::-1]
        self.image = self.model.embed(np.ascontiguousarray(image))
        return self.image

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Prompt an image encoded before (``set_image``'s or ``model.embed``'s result)."""
        self.image = embedding

    def _validate(self, point_coords, point_labels, box, mask_input):
        """Check shapes and ranges; return (points N x K x 2 | None, labels N x K | None, boxes N x 4 | None, masks, N)."""
        if self.image is None:
            raise PromptError("no image set: call set_image() first")
        h, w = self.image.original_size
        points = labels = boxes = None
        if box is not None:
            boxes = _as_float_array(box, "box")
            if boxes.ndim == 1:
                boxes = boxes[None]
            if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
                raise PromptError(f"box must be 4 numbers x0 y0 x1 y1 or an N x 4 array, got shape {boxes.shape}")
            for b in boxes:
                if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
                    raise PromptError(f"box {b.tolist()} lies outside the {w} x {h} image")
                if b[2] <= b[0] or b[3] <= b[1]:
                    raise PromptError(f"box {b.tolist()} has zero or negative size (need x0 < x1 and y0 < y1)")
        if (point_coords is None) != (point_labels is None):
            raise PromptError("point_coords and point_labels go together: give both or neither")
        if point_coords is not None:
            points = _as_float_array(point_coords, "point_coords")
            labels = _as_float_array(point_labels, "point_labels")
            if points.ndim == 2:
                points, labels = points[None], labels[None] if labels.ndim == 1 else labels
            if points.ndim != 3 or points.shape[2] != 2 or points.shape[1] == 0:
                raise PromptError(f"point_coords must be K x 2 (or N x K x 2 with N boxes), got shape {points.shape}")
            if labels.shape != points.shape[:2]:
                raise PromptError(f"point_labels shape {labels.shape} does not match point_coords {points.shape}")
            if not np.isin(labels, (0, 1)).all():
                raise PromptError(f"point_labels must be 1 (positive) or 0 (negative), got {np.unique(labels).tolist()}")
            bad = (points[..., 0] < 0) | (points[..., 0] > w) | (points[..., 1] < 0) | (points[..., 1] > h)
            if bad.any():
                raise PromptError(f"points {points[bad].tolist()} lie outside the {w} x {h} image")
            if boxes is not None and len(points) != len(boxes):
                raise PromptError(f"{len(boxes)} boxes need one point set each (N x K x 2), got {len(points)}")
        if points is None and boxes is None:
            raise PromptError("empty prompt: give at least one point or one box")
        n = len(boxes) if boxes is not None else len(points)
        masks = None
        if mask_input is not None:
            masks = _as_float_array(mask_input, "mask_input")
            side = self.model.adapter.low_res_side
            if masks.ndim == 3:
                masks = masks[:, None]
            if masks.shape != (n, 1, side, side):
                raise PromptError(f"mask_input must be {n} x 1 x {side} x {side} low-res logits, got {masks.shape}")
        return points, labels, boxes, masks, n

    @torch.inference_mode()
    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output: Optional[bool] = None, use_plugin: bool = True) -> Prediction:
        """Predict one mask per prompt, coordinates in original-image pixels (x, y).

        Args:
            point_coords: K x 2 for one prompt, or N x K x 2 with N boxes.
            point_labels: K (or N x K): 1 positive, 0 negative.
            box: 4 or N x 4, XYXY.
            mask_input: N x 1 x h x w low-res logits of a previous prediction (h = w =
                ``model.adapter.low_res_side``).
            multimask_output: None asks SAM for three candidates only when the prompt is a
                single point (ambiguous) and keeps the best by predicted IoU.
            use_plugin: False gives plain SAM's masks.

        Returns:
            A ``Prediction`` of N rows (masks N x H x W bool at the original size).

        Raises:
            PromptError: no image set, or a prompt of the wrong shape, outside the image or empty.
        """
        points, labels, boxes, masks, n = self._validate(point_coords, point_labels, box, mask_input)
        if multimask_output is None:
            multimask_output = n == 1 and boxes is None and masks is None and points.shape[1] == 1
        parts = [self._predict_batch(points, labels, boxes, masks, s, min(n, s + self.max_batch),
                                     multimask_output, use_plugin) for s in range(0, n, self.max_batch)]
        return Prediction(
            masks=np.concatenate([p[0] for p in parts]),
            scores=np.concatenate([p[1] for p in parts]),
            stability=np.concatenate([p[2] for p in parts]),
            low_res_logits=np.concatenate([p[3] for p in parts]),
            alpha=np.concatenate([p[4] for p in parts]) if use_plugin else None,
            multimask=multimask_output,
        )

    def predict_objects(self, prompts: Sequence[ObjectPrompt], use_plugin: bool = True) -> Prediction:
        """One mask per object prompt, prompts of any mix of shapes, rows in the order given
        (``Prediction`` of ``len(prompts)`` rows; ``use_plugin=False``: plain SAM).

        Prompts of one shape (box or not, K points) go through the decoder together: one call per
        shape, not per object. A lone positive point without a box is ambiguous and keeps the best of
        SAM's three candidates, as ``predict`` does; every other shape is decoded single-mask, so an
        object gets the same mask here as when it is predicted alone. ``multimask`` of the result is
        True when any shape was decoded multimask."""
        if not prompts:
            raise PromptError("no object prompts: give at least one")
        buckets: Dict[Tuple[bool, int], List[int]] = {}
        for i, p in enumerate(prompts):
            buckets.setdefault(p.shape, []).append(i)
        parts: Dict[Tuple[bool, int], Prediction] = {}
        for (has_box, k), idx in buckets.items():
            boxes = np.array([prompts[i].box for i in idx], dtype=np.float64) if has_box else None
            points = labels = None
            if k:
                points = np.array([prompts[i].points for i in idx], dtype=np.float64)  # N x K x 2
                labels = np.array([prompts[i].labels for i in idx], dtype=np.float64)
            parts[(has_box, k)] = self.predict(point_coords=points, point_labels=labels, box=boxes,
                                               multimask_output=not has_box and k == 1, use_plugin=use_plugin)
        # Scatter each shape's rows back to the prompts' order.
        first = next(iter(parts.values()))
        n = len(prompts)
        out = Prediction(
            masks=np.empty((n,) + first.masks.shape[1:], dtype=bool),
            scores=np.empty(n, dtype=first.scores.dtype),
            stability=np.empty(n, dtype=first.stability.dtype),
            low_res_logits=np.empty((n,) + first.low_res_logits.shape[1:], dtype=first.low_res_logits.dtype),
            alpha=np.empty((n, 2), dtype=first.alpha.dtype) if first.alpha is not None else None,
            multimask=any(p.multimask for p in parts.values()),
        )
        for key, idx in buckets.items():
            part = parts[key]
            out.masks[idx], out.scores[idx], out.stability[idx] = part.masks, part.scores, part.stability
            out.low_res_logits[idx] = part.low_res_logits
            if out.alpha is not None:
                out.alpha[idx] = part.alpha
        return out

    def _predict_batch(self, points, labels, boxes, masks, start: int, stop: int, multimask: bool,
                       use_plugin: bool) -> Tuple[np.ndarray, ...]:
        model, image, dev = self.model, self.image, self.model.device
        adapter = model.adapter
        sl = slice(start, stop)
        pt = bx = mk = None
        if points is not None:
            pt = (adapter.points_to_input(points[sl], image.original_size, dev),
                  torch.as_tensor(labels[sl], dtype=torch.int64, device=dev))
        if boxes is not None:
            bx = adapter.boxes_to_input(boxes[sl], image.original_size, dev)
        if masks is not None:
            mk = torch.as_tensor(masks[sl], dtype=torch.float32, device=dev)
        plugin = (self.plugin or model.plugin) if use_plugin else None
        low, iou, alpha = model.decode(image.features, pt, bx, mk, multimask, plugin)
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=dev)
        low, iou = low[rows, best][:, None], iou[rows, best]
        logits = adapter.postprocess(low, image.input_size, image.original_size)[:, 0]
        thr = adapter.mask_threshold
        stability = calculate_stability_score(logits, thr, 1.0)
        if adapter.feedback_clamp is not None:  # SAM 2 hands back its low-res logits clamped
            low = low.clamp(-adapter.feedback_clamp, adapter.feedback_clamp)
        return ((logits > thr).cpu().numpy(), iou.float().cpu().numpy(), stability.float().cpu().numpy(),
                low.float().cpu().numpy(), alpha.float().cpu().numpy() if alpha is not None else None)
