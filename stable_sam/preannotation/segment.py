"""The per-image step of a pre-annotation job: (model, work item, image) -> masks and a JSON record.

``annotate_image`` is a pure function of its inputs: the same model (weights, plugin, device) and
image give the same record, byte for byte once serialised, whichever worker runs it and whenever.
The record holds what the final COCO file needs (pycocotools RLE with ``counts`` as text, area,
bbox, scores rounded to 4 decimals) and nothing that depends on the run (no times, no paths).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..masks import clean_mask
from ..model import ImageEmbedding, StableSam
from ..modeling.plugin import StableSamPlugin
from ..predictor import StableSamPredictor
from .automatic import AutoConfig, automatic_masks
from .items import InputError, WorkItem, check_prompt


def encode_masks(masks: Sequence[np.ndarray]) -> List[Dict[str, Any]]:
    """N H x W bool masks -> N ``{"segmentation": {"size": [H, W], "counts": str}, "area": int,
    "bbox": [x, y, w, h]}``: COCO RLE, area and box, by pycocotools in one call each."""
    if len(masks) == 0:
        return []
    stack = np.asfortranarray(np.stack(masks, axis=-1).astype(np.uint8))  # H x W x N, column-major
    rles = mask_utils.encode(stack)
    areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
    return [{"segmentation": {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")},
             "area": int(a), "bbox": [float(v) for v in b]} for r, a, b in zip(rles, areas, boxes)]


@dataclass
class ImageResult:
    """``masks``: one H x W bool per object (for PNGs or Label Studio); ``record``: the JSON record."""

    masks: List[np.ndarray]
    record: Dict[str, Any]


def annotate_image(model: StableSam, item: WorkItem, image: np.ndarray, auto: Optional[AutoConfig] = None,
                   auto_category_id: int = 1, plugin: Optional[StableSamPlugin] = None,
                   embedding: Optional[ImageEmbedding] = None, min_region_px: int = 0) -> ImageResult:
    """Segment every object of ``item`` on ``image`` (H x W x 3 uint8, EXIF-oriented): all prompts
    in one decoder call per prompt shape. Without prompts and with ``auto``, SAM's automatic masks
    (category ``auto_category_id``); without either, no objects. ``embedding``: the image's,
    when a read-ahead stage encoded it already. ``min_region_px``: islands and holes under that
    many pixels are removed from every mask (``stable_sam.masks.clean_mask``; 0: off). Raises
    ``InputError`` for a size that differs from the input's or a prompt outside the image."""
    h, w = image.shape[:2]
    where = f"image {item.file_name} (id {item.image_id})"
    if item.width is not None and (item.width, item.height) != (w, h):
        raise InputError(f"{where}: the input says {item.width} x {item.height} (W x H), the file is {w} x {h}")
    objects: List[Dict[str, Any]] = []
    masks: List[np.ndarray] = []
    if item.objects:
        prompts = [check_prompt(o, w, h, where) for o in item.objects]
        predictor = StableSamPredictor(model, plugin=plugin)
        if embedding is not None:
            predictor.set_embedding(embedding)
        else:
            predictor.set_image(image)
        pred = predictor.predict_objects(prompts)
        masks = list(pred.masks)
        for k, spec in enumerate(item.objects):
            objects.append({"index": k, "source_id": spec.source_id, "category_id": spec.category_id,
                            "prompt": spec.to_json(), "score": round(float(pred.scores[k]), 4),
                            "stability": round(float(pred.stability[k]), 4),
                            "alpha": [round(float(a), 4) for a in pred.alpha[k]] if pred.alpha is not None else None})
    elif auto is not None:
        found = automatic_masks(model, image, auto, plugin)
        masks = [a.mask for a in found]
        for k, a in enumerate(found):
            objects.append({"index": k, "source_id": None, "category_id": auto_category_id,
                            "prompt": {"auto_point": [round(v, 2) for v in a.point]},
                            "score": round(a.predicted_iou, 4), "stability": round(a.stability, 4), "alpha": None})
    masks = [clean_mask(m, min_region_px) for m in masks]
    for obj, encoded in zip(objects, encode_masks(masks)):
        obj.update(encoded)
    record = {"image_id": item.image_id, "file_name": item.file_name, "width": w, "height": h, "objects": objects}
    return ImageResult(masks, record)
