"""A predicted mask as Label Studio's brush result: RLE, label, score and the region details."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from stable_sam.data.label_studio_prompts import PromptGroup
from stable_sam.model import UNTRAINED_PLUGIN
from stable_sam.predictor import ObjectMask


def brush_result(g: PromptGroup, label: str, from_name: str, to_name: str, pred: ObjectMask,
                 size: Tuple[int, int], out_size: Tuple[int, int],
                 plugin_version: Optional[str] = None) -> Dict[str, Any]:
    """One brushlabels result. ``plugin_version`` "init" (the untrained plugin, a no-op: the
    mask is plain SAM's) keeps the DRP routing weights out of the region details text, where
    they would read as if they meant something; ``stable_sam`` still carries them."""
    mask = pred.mask
    if out_size != size:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(out_size, Image.NEAREST)) > 127
    rle = mask2rle(mask.astype(np.uint8) * 255)
    score, stability, alpha = pred.score, pred.stability, pred.alpha
    info = {"predicted_iou": round(score, 4), "stability": round(stability, 4), "prompt": g.prompt.describe(),
            "prompt_ids": list(g.source_ids), "area_px": int(mask.sum())}
    text = f"Stable-SAM: predicted IoU {score:.2f}, stability {stability:.2f}"
    if alpha is not None:
        info.update(alpha_deformed=round(alpha[0], 4), alpha_regular=round(alpha[1], 4))
        if plugin_version == UNTRAINED_PLUGIN:
            text += ", plain SAM (untrained plugin)"
        else:
            text += f", DRP routing deformed {alpha[0]:.2f} / regular {alpha[1]:.2f}"
    text += f" ({g.prompt.describe()})"
    return {
        "id": f"{g.source_ids[0]}_sam"[:64],
        "from_name": from_name, "to_name": to_name, "type": "brushlabels",
        "original_width": out_size[0], "original_height": out_size[1], "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
        "score": round(score, 4),
        "readonly": False,
        "meta": {"text": [text]},
        "stable_sam": info,
    }
