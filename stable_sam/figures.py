"""Pictures of benchmark cases: the image with its prompt, then each model's mask, side by side."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .evaluation import TYPE_LABELS, Case

_MASK_COLOR = np.array([255, 0, 220], np.float32)  # magenta: rare in photos and in the scenes
_GT_COLOR = (255, 220, 0)
_PROMPT_COLOR = (255, 40, 40)
_CAPTION_H = 16


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _tile(case: Case, mask: np.ndarray | None, caption: str, size: int) -> Image.Image:
    img = case.image.astype(np.float32)
    if mask is not None:
        img[mask] = 0.4 * img[mask] + 0.6 * _MASK_COLOR
    img = img.astype(np.uint8)
    if mask is not None:
        img[_outline(mask)] = _MASK_COLOR.astype(np.uint8)
    img[_outline(case.gt)] = _GT_COLOR
    pic = Image.fromarray(img)
    scale = size / max(pic.size)
    pic = pic.resize((max(1, round(pic.width * scale)), max(1, round(pic.height * scale))), Image.NEAREST)
    draw = ImageDraw.Draw(pic)
    if case.box is not None:
        draw.rectangle([float(v) * scale for v in case.box], outline=_PROMPT_COLOR, width=2)
    if case.points is not None:
        for x, y in case.points:
            x, y = x * scale, y * scale
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=_PROMPT_COLOR, outline=(255, 255, 255))
    out = Image.new("RGB", (size, size + _CAPTION_H), (255, 255, 255))
    out.paste(pic, (0, _CAPTION_H))
    ImageDraw.Draw(out).text((2, 2), caption, fill=(0, 0, 0))
    return out


def comparison_figure(cases: Sequence[Case], models: Sequence[Tuple[str, str]], size: int = 256) -> Image.Image:
    """One row per case: image + GT outline (yellow) + prompt (red), then one tile per
    ``(model name, label)`` with its mask (magenta) and IoU."""
    if not cases:
        raise ValueError("no cases to draw")
    rows: List[List[Image.Image]] = []
    for case in cases:
        row = [_tile(case, None, f"{case.name} {TYPE_LABELS.get(case.prompt_type, case.prompt_type)}", size)]
        for name, label in models:
            row.append(_tile(case, case.masks.get(name), f"{label}: IoU {100 * case.ious.get(name, 0):.1f}", size))
        rows.append(row)
    h = size + _CAPTION_H
    sheet = Image.new("RGB", (len(rows[0]) * (size + 4), len(rows) * (h + 4)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * (size + 4), r * (h + 4)))
    return sheet
