"""A drawn test image with known object masks: a muted, lightly textured background with two clear
objects (an ellipse and a polygon). The backend tests, ``scripts/bench_backend.py`` and
``scripts/soak.py`` send it to ``/predict``."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass
class DrawnScene:
    """A drawn image and its objects' masks and tight boxes."""
    image: np.ndarray  # H x W x 3 uint8
    masks: List[np.ndarray]  # H x W bool, one per object
    boxes: List[Tuple[int, int, int, int]]  # tight XYXY

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height)."""
        return self.image.shape[1], self.image.shape[0]

    def png(self) -> bytes:
        """The image as PNG bytes."""
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
