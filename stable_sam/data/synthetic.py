"""Synthetic scenes with several annotated objects per image.

The scenes are made so that casual prompts are genuinely ambiguous: objects have parts of another
colour (a click on a part may mean the part or the whole), thin curved structures (a loose box
holds mostly background), holes (rings), overlapping objects and textured, cluttered backgrounds
with unannotated distractor shapes. Every scene is a pure function of ``(seed, index)``, so a split
is just a seed: the training split and the held-out split never share an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TRAIN_SEED = 0
HELDOUT_SEED = 1_000_003

OBJECT_KINDS = ("ellipse", "polygon", "rectangle", "ring", "curve", "composite")


@dataclass
class Scene:
    """One synthetic image and the masks of its annotated objects.

    image: H x W x 3 uint8. masks: list of H x W bool, visible part only (occlusion applied),
    each non-empty: the annotated objects. kinds: the object kind of each mask. targets: every
    region pretraining may ask for (H x W bool each; empty: the objects are the only targets), with
    target_kinds naming their granularity (``research/region_world.py``).
    """

    image: np.ndarray
    masks: List[np.ndarray]
    kinds: List[str]
    targets: List[np.ndarray] = field(default_factory=list)
    target_kinds: List[str] = field(default_factory=list)

    @property
    def training_targets(self) -> List[np.ndarray]:
        """What pretraining prompts for: every region when the world has them, else the objects."""
        return self.targets or self.masks


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1], H x W, with about ``cells`` blobs per side."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, strength: float) -> np.ndarray:
    """A colour field H x W x 3 around ``base``: noise, stripes or flat."""
    kind = rng.integers(0, 3)
    if kind == 0:
        field = _smooth_noise(rng, h, w, int(rng.integers(2, 24)))[..., None] - 0.5
        return base + strength * 2.0 * field * rng.uniform(0.5, 1.0, size=3)
    if kind == 1:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, 24)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        return base + strength * 0.5 * wave[..., None] * np.array([1.0, 1.0, 1.0], np.float32)
    return np.broadcast_to(base, (h, w, 3)).astype(np.float32)


def _polygon_points(rng: np.random.Generator, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    n = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    star = rng.random() < 0.3
    radii = r * rng.uniform(0.5, 1.0, n)
    if star:
        radii[::2] *= 0.45
    return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii)]


def _draw_shape(rng: np.random.Generator, kind: str, h: int, w: int) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Rasterise one object. Returns its mask and, for composites, the masks of its parts."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    side = min(h, w)
    r = rng.uniform(0.08, 0.28) * side
    cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
    parts: List[np.ndarray] = []
    if kind == "ellipse":
        rx, ry = r, r * rng.uniform(0.4, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        canvas = canvas.rotate(rng.uniform(0, 180), center=(cx, cy))
    elif kind == "polygon":
        draw.polygon(_polygon_points(rng, cx, cy, r), fill=255)
    elif kind == "rectangle":
        rx, ry = r, r * rng.uniform(0.3, 1.0)
        draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        canvas = canvas.rotate(rng.uniform(0, 90), center=(cx, cy))
    elif kind == "ring":
        rx, ry = r, r * rng.uniform(0.6, 1.0)
        hole = rng.uniform(0.35, 0.7)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        draw.ellipse([cx - rx * hole, cy - ry * hole, cx + rx * hole, cy + ry * hole], fill=0)
    elif kind == "curve":
        n = int(rng.integers(3, 6))
        pts = [(cx, cy)]
        heading = rng.uniform(0, 2 * math.pi)
        for _ in range(n):
            heading += rng.uniform(-1.2, 1.2)
            step = r * rng.uniform(0.5, 1.0)
            x, y = pts[-1]
            pts.append((float(np.clip(x + step * math.cos(heading), 0, w - 1)),
                        float(np.clip(y + step * math.sin(heading), 0, h - 1))))
        draw.line(pts, fill=255, width=int(rng.integers(3, 8)), joint="curve")
    elif kind == "composite":
        # A body with one or two attached parts of another colour: a click on a part is ambiguous.
        rx, ry = r, r * rng.uniform(0.5, 0.9)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        for _ in range(int(rng.integers(1, 3))):
            part = Image.new("L", (w, h), 0)
            pd = ImageDraw.Draw(part)
            a = rng.uniform(0, 2 * math.pi)
            pr = r * rng.uniform(0.3, 0.55)
            px, py = cx + rx * 0.9 * math.cos(a), cy + ry * 0.9 * math.sin(a)
            if rng.random() < 0.5:
                pd.ellipse([px - pr, py - pr, px + pr, py + pr], fill=255)
            else:
                pd.polygon(_polygon_points(rng, px, py, pr), fill=255)
            parts.append(np.asarray(part) > 127)
            canvas = Image.fromarray(np.maximum(np.asarray(canvas), np.asarray(part)))
    else:
        raise ValueError(f"unknown object kind {kind!r}; expected one of {OBJECT_KINDS}")
    return np.asarray(canvas) > 127, parts


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = _texture(rng, h, w, _random_color(rng), rng.uniform(20, 90))
    img = img + 60.0 * (_smooth_noise(rng, h, w, 3)[..., None] - 0.5)
    # Unannotated clutter: small shapes and strokes that a loose prompt may grab.
    clutter = Image.new("RGB", (w, h), 0)
    cmask = Image.new("L", (w, h), 0)
    dc, dm = ImageDraw.Draw(clutter), ImageDraw.Draw(cmask)
    for _ in range(int(rng.integers(0, 14))):
        color = tuple(int(c) for c in _random_color(rng))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        s = rng.uniform(2, 0.06 * min(h, w))
        if rng.random() < 0.5:
            box = [x - s, y - s, x + s, y + s]
            dc.ellipse(box, fill=color)
            dm.ellipse(box, fill=255)
        else:
            end = (x + rng.uniform(-30, 30), y + rng.uniform(-30, 30))
            width = int(rng.integers(1, 4))
            dc.line([(x, y), end], fill=color, width=width)
            dm.line([(x, y), end], fill=255, width=width)
    cm = np.asarray(cmask)[..., None] > 127
    return np.where(cm, np.asarray(clutter, np.float32), img)


def scene_shape(rng: np.random.Generator, size: int) -> Tuple[int, int]:
    """(H, W) of a scene ``size`` px on the long side: 30 % landscape or portrait, the short side
    in [5/8 size, size), so that the padding SAM applies is exercised."""
    if rng.random() < 0.3:
        short = int(rng.integers(size * 5 // 8, size))
        return (short, size) if rng.random() < 0.5 else (size, short)
    return size, size


class SyntheticScenes:
    """Deterministic generator: ``scenes[i]`` is the same scene for the same seed, every time.

    Images are ``size`` pixels on the long side; a share of them are landscape or portrait so that
    the padding SAM applies is exercised.
    """

    def __init__(self, seed: int = TRAIN_SEED, size: int = 256, min_objects: int = 2,
                 max_objects: int = 6, min_area: int = 80, kinds: Sequence[str] = OBJECT_KINDS,
                 length: int = 1_000_000) -> None:
        self.seed, self.size = seed, size
        self.min_objects, self.max_objects, self.min_area = min_objects, max_objects, min_area
        self.kinds = tuple(kinds)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        h, w = scene_shape(rng, self.size)
        image = _background(rng, h, w)
        masks: List[np.ndarray] = []
        kinds: List[str] = []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            mask, parts = _draw_shape(rng, kind, h, w)
            body = _texture(rng, h, w, _random_color(rng), rng.uniform(0, 50))
            image = np.where(mask[..., None], body, image)
            for part in parts:
                image = np.where(part[..., None], _texture(rng, h, w, _random_color(rng), 30), image)
            masks = [m & ~mask for m in masks]  # later objects occlude earlier ones
            masks.append(mask)
            kinds.append(kind)
        keep = [i for i, m in enumerate(masks) if m.sum() >= self.min_area]
        image = np.clip(image + rng.normal(0, rng.uniform(0, 8), image.shape), 0, 255).astype(np.uint8)
        if rng.random() < 0.3:
            image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))))
        return Scene(image=image, masks=[masks[i] for i in keep], kinds=[kinds[i] for i in keep])
