"""Helpers shared by the backend tests, the end-to-end test and the benchmark: drawn test
images with known object masks, Label Studio-shaped regions and RLE decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from backend.testing.drawn_scene import DrawnScene, drawn_scene  # noqa: F401 - re-exported
from backend.testing.label_studio_regions import centroid, keypoint, loosen, rectangle  # noqa: F401 - re-exported
from stable_sam.metrics import mask_iou

ROOT = Path(__file__).resolve().parents[1]
# The small SAM trained on synthetic scenes only: what the tests serve (conftest sets SAM_CHECKPOINT
# to it); the shipped photo-trained one is tested in test_shipped_model.py.
SYNTHETIC_SAM = ROOT / "checkpoints" / "sam_tiny_synthetic.pt"
RECOMMENDED_CONFIG = (ROOT / "label_config" / "recommended.xml").read_text()
MULTICLASS_CONFIG = (ROOT / "label_config" / "multiclass.xml").read_text()


def result_mask(result: dict) -> np.ndarray:
    """Decode a brushlabels result to an H x W bool mask (asserting the 0/255 encoding)."""
    h, w = result["original_height"], result["original_width"]
    alpha = decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3]
    assert set(np.unique(alpha).tolist()) <= {0, 255}, "brush RLE must encode a 0/255 mask"
    return alpha == 255


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(mask_iou(a, b))


def brush_result(mask: np.ndarray, rid: str = "b1", label: str = "Object") -> dict:
    """A brushlabels result of ``mask`` as Label Studio stores it (0/255 RLE)."""
    from label_studio_sdk.converter.brush import mask2rle

    h, w = mask.shape
    return {"id": rid, "from_name": "tag", "to_name": "image", "type": "brushlabels", "origin": "manual",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}}
