"""Helpers shared by the backend tests, the end-to-end test and the benchmark: drawn test
images with known object masks, Label Studio-shaped regions and RLE decoding."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image, ImageDraw, ImageFilter

from backend.regions import centroid, keypoint, loosen, rectangle  # noqa: F401 - re-exported
from stable_sam.metrics import mask_iou

ROOT = Path(__file__).resolve().parents[1]
RECOMMENDED_CONFIG = (ROOT / "label_config" / "recommended.xml").read_text()
MULTICLASS_CONFIG = (ROOT / "label_config" / "multiclass.xml").read_text()


@dataclass
class DrawnScene:
    image: np.ndarray  # H x W x 3 uint8
    masks: List[np.ndarray]  # H x W bool, one per object
    boxes: List[Tuple[int, int, int, int]]  # tight XYXY

    @property
    def size(self) -> Tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    def png(self) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="PNG")
        return buf.getvalue()


def drawn_scene(seed: int = 0, width: int = 240, height: int = 180) -> DrawnScene:
    """A muted, lightly textured background with two clear objects: an ellipse and a polygon."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(40, 90, size=3)
    bg = base[None, None, :] + 12 * np.sin(xx[..., None] / rng.uniform(9, 15) + rng.uniform(0, 6)) \
        + rng.normal(0, 4, (height, width, 3))
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    masks, boxes = [], []
    colors = [(230, 60, 50), (60, 200, 230), (240, 220, 60), (80, 220, 90)]
    rng.shuffle(colors)
    # ellipse in the left half, polygon in the right half: never overlapping
    ex0, ey0 = int(rng.integers(10, width // 4)), int(rng.integers(10, height // 3))
    ex1, ey1 = ex0 + int(rng.integers(width // 5, width // 3)), ey0 + int(rng.integers(height // 3, height // 2))
    cx, cy = int(rng.integers(width * 0.65, width * 0.8)), int(rng.integers(height * 0.35, height * 0.65))
    r = int(rng.integers(min(width, height) // 7, min(width, height) // 5))
    angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
    poly = [(cx + r * np.cos(a) * rng.uniform(0.8, 1.0), cy + r * np.sin(a) * rng.uniform(0.8, 1.0)) for a in angles]
    for shape, color in (("ellipse", colors[0]), ("polygon", colors[1])):
        m = Image.new("L", (width, height), 0)
        d = ImageDraw.Draw(m)
        if shape == "ellipse":
            d.ellipse([ex0, ey0, ex1, ey1], fill=255)
        else:
            d.polygon(poly, fill=255)
        canvas.paste(Image.new("RGB", (width, height), color), mask=m)
        mask = np.asarray(m) > 127
        ys, xs = np.nonzero(mask)
        masks.append(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return DrawnScene(np.asarray(canvas).copy(), masks, boxes)


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
