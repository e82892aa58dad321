"""A predicted mask as Label Studio results: a brush mask (RLE) or polygons, with the label, score
and the region details. ``mask_results`` is the one writer the backend's answers and its
pre-annotation use: it cleans the mask (MASK_MIN_REGION_PX) and writes it for the control the
label config pairs with the image (``ParsedConfig.output_by_image``: PolygonLabels, else BrushLabels)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from stable_sam.data.label_studio_prompts import PromptGroup
from stable_sam.masks import PolygonOptions, clean_mask, mask_polygons
from stable_sam.model import UNTRAINED_PLUGIN
from stable_sam.predictor import ObjectMask

from .server_settings import BackendSettings

POLYGON_DECIMALS = 4  # percent: 1e-4 % of a 100,000-pixel side is 0.1 pixel


def _details(g: PromptGroup, pred: ObjectMask, area_px: int,
             plugin_version: Optional[str]) -> Tuple[Dict[str, Any], str]:
    """The ``stable_sam`` details and the region's ``meta`` text. ``plugin_version`` "init" (the
    untrained plugin, a no-op: the mask is plain SAM's) keeps the DRP routing weights out of the
    text, where they would read as if they meant something; ``stable_sam`` still carries them."""
    score, stability, alpha = pred.score, pred.stability, pred.alpha
    info = {"predicted_iou": round(score, 4), "stability": round(stability, 4), "prompt": g.prompt.describe(),
            "prompt_ids": list(g.source_ids), "area_px": area_px}
    text = f"Stable-SAM: predicted IoU {score:.2f}, stability {stability:.2f}"
    if alpha is not None:
        info.update(alpha_deformed=round(alpha[0], 4), alpha_regular=round(alpha[1], 4))
        if plugin_version == UNTRAINED_PLUGIN:
            text += ", plain SAM (untrained plugin)"
        else:
            text += f", DRP routing deformed {alpha[0]:.2f} / regular {alpha[1]:.2f}"
    text += f" ({g.prompt.describe()})"
    return info, text


def brush_result(g: PromptGroup, label: str, from_name: str, to_name: str, pred: ObjectMask,
                 size: Tuple[int, int], out_size: Tuple[int, int],
                 plugin_version: Optional[str] = None) -> Dict[str, Any]:
    """One brushlabels result of ``pred.mask`` as it is."""
    mask = pred.mask
    if out_size != size:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(out_size, Image.NEAREST)) > 127
    rle = mask2rle(mask.astype(np.uint8) * 255)
    info, text = _details(g, pred, int(mask.sum()), plugin_version)
    return {
        "id": f"{g.source_ids[0]}_sam"[:64],
        "from_name": from_name, "to_name": to_name, "type": "brushlabels",
        "original_width": out_size[0], "original_height": out_size[1], "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
        "score": round(pred.score, 4),
        "readonly": False,
        "meta": {"text": [text]},
        "stable_sam": info,
    }


def polygon_results(g: PromptGroup, label: str, from_name: str, to_name: str, pred: ObjectMask,
                    options: PolygonOptions, plugin_version: Optional[str] = None) -> List[Dict[str, Any]]:
    """``pred.mask`` as polygonlabels results, one per polygon of ``mask_polygons`` (largest
    first; none for an empty mask), points in percent of the mask's size."""
    h, w = pred.mask.shape
    polygons = mask_polygons(pred.mask, options)
    info, text = _details(g, pred, int(pred.mask.sum()), plugin_version)
    out = []
    for k, poly in enumerate(polygons):
        points = np.round(poly / (w, h) * 100.0, POLYGON_DECIMALS).tolist()
        piece = "" if len(polygons) == 1 else f", piece {k + 1} of {len(polygons)}"
        out.append({
            "id": (f"{g.source_ids[0]}_sam" if k == 0 else f"{g.source_ids[0]}_sam{k}")[:64],
            "from_name": from_name, "to_name": to_name, "type": "polygonlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"points": points, "closed": True, "polygonlabels": [label]},
            "score": round(pred.score, 4),
            "readonly": False,
            "meta": {"text": [text + piece]},
            "stable_sam": dict(info, polygon=k, polygons=len(polygons), vertices=len(points)),
        })
    return out


def polygon_options(settings: BackendSettings) -> PolygonOptions:
    """The polygon settings (POLYGON_TOLERANCE_PX, ...) as ``PolygonOptions``."""
    return PolygonOptions(settings.polygon_tolerance_px, settings.polygon_min_area_px, settings.polygon_largest_only)


def mask_results(g: PromptGroup, label: str, control: Any, to_name: str, pred: ObjectMask,
                 settings: BackendSettings, plugin_version: Optional[str] = None) -> List[Dict[str, Any]]:
    """The results of one predicted mask for ``control`` (the image's PolygonLabels or BrushLabels
    control): the mask cleaned of islands and holes under MASK_MIN_REGION_PX pixels, then written
    as polygons or as one brush mask."""
    mask = clean_mask(pred.mask, settings.mask_min_region_px)
    if mask is not pred.mask:
        pred = dataclasses.replace(pred, mask=mask)
    if control.tag == "PolygonLabels":
        return polygon_results(g, label, control.name, to_name, pred, polygon_options(settings), plugin_version)
    size = (mask.shape[1], mask.shape[0])
    return [brush_result(g, label, control.name, to_name, pred, size, size, plugin_version)]
