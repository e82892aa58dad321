"""Segment a shipped photo with one click and one loose box per object; save the picture.

    python scripts/demo.py [--image examples/photos/images/ccp_0803.jpg] [--out runs/demo.png] [--json]

The model is what the backend serves (``build_from_settings``: the same environment variables).
An image in a folder dataset (``images/`` beside ``masks/<stem>_mask_<k>.png``) is prompted on its
annotated objects: the largest few that do not contain another (parts, not the whole person), a
click at each one's innermost pixel, and its box grown by 10 % of its size on every side. Any other
image gets one box around its middle half. Left: the clicks and their masks; right: the boxes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

import cv2
import numpy as np
from PIL import Image, ImageDraw

from stable_sam.builders import build_from_settings
from stable_sam.data.dataset import load_image, load_mask_png
from stable_sam.metrics import mask_iou
from stable_sam.modeling.plugin import count_trainable
from stable_sam.predictor import StableSamPredictor
from stable_sam.prompts import mask_to_box

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COLOURS = np.array([[30, 144, 255], [255, 165, 0], [50, 205, 50], [220, 20, 60], [148, 0, 211]])


def object_masks(image_path: Path, count: int) -> List[np.ndarray]:
    """The ``count`` largest annotated objects of a folder-dataset image that contain no other
    annotated object (so parts, not the whole they belong to); none for a lone image."""
    masks = [load_mask_png(p) for p in sorted(image_path.parent.parent.glob(f"masks/{image_path.stem}_mask_*.png"))]
    parts = [m for m in masks if not any(o is not m and (o & m).sum() > 0.9 * o.sum() for o in masks)]
    return sorted(parts, key=lambda m: -int(m.sum()))[:count]


def innermost_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the mask pixel farthest from its boundary: where an annotator clicks."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x + 0.5, y + 0.5], np.float32)


def loose_box(mask: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """The H x W bool mask's XYXY box grown by ``margin`` of its width / height on each side, clamped."""
    x0, y0, x1, y1 = mask_to_box(mask)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    h, w = mask.shape
    return np.array([max(0, x0 - dx), max(0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)], np.float32)


def overlay(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray = None, points: np.ndarray = None) -> Image.Image:
    """``image`` (H x W x 3 uint8) with N masks (N x H x W bool) tinted, and their N x 4 boxes or
    N x 2 clicks drawn in the same colours."""
    out = image.astype(np.float32)
    for m, c in zip(masks, COLOURS):
        out[m] = 0.45 * out[m] + 0.55 * c
    pic = Image.fromarray(out.astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for i, c in enumerate(COLOURS[:len(masks)]):
        colour = tuple(int(v) for v in c)
        if boxes is not None:
            draw.rectangle(boxes[i].tolist(), outline=colour, width=2)
        if points is not None:
            x, y = points[i]
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour, outline=(255, 255, 255), width=2)
    return pic


def main() -> None:
    """Build what the backend serves, prompt the image, print each object's figures, save the picture."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=EXAMPLES / "photos" / "images" / "ccp_0803.jpg")
    ap.add_argument("--objects", type=int, default=4, help="objects prompted (folder-dataset images)")
    ap.add_argument("--out", type=Path, default=Path("runs/demo.png"))
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()

    model = build_from_settings()
    print(f"model: {model.version} on {model.device}; plugin: {count_trainable(model.plugin):,} trainable parameters")
    image = load_image(args.image)
    predictor = StableSamPredictor(model)
    predictor.set_image(image)
    gts = object_masks(args.image, args.objects)
    h, w = image.shape[:2]
    if gts:
        boxes = np.stack([loose_box(g) for g in gts])
        points = np.stack([innermost_point(g) for g in gts])
    else:
        boxes, points = np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]], np.float32), None
    by_box = predictor.predict(box=boxes)
    panels = [overlay(image, by_box.masks, boxes=boxes)]
    rows = []
    by_click = None
    if points is not None:  # one click each, SAM's three candidates, the best by predicted IoU (as served)
        by_click = [predictor.predict(point_coords=p[None, None], point_labels=np.ones((1, 1)), multimask_output=True)
                    for p in points]
        click_masks = np.stack([o.masks[int(np.argmax(o.scores))] for o in by_click])
        panels.insert(0, overlay(image, click_masks, points=points))
    for i, m in enumerate(by_box.masks):
        row = {"object": i, "area": int(m.sum()), "box_predicted_iou": round(float(by_box.scores[i]), 3)}
        if gts:
            row["box_iou"] = round(float(mask_iou(m, gts[i])), 3)
            row["click_iou"] = round(float(mask_iou(click_masks[i], gts[i])), 3)
        rows.append(row)
        print("  ".join(f"{k} {v}" for k, v in row.items()))
    pic = Image.new("RGB", (w * len(panels) + 8 * (len(panels) - 1), h), "white")
    for i, p in enumerate(panels):
        pic.paste(p, (i * (w + 8), 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(args.out)
    print(f"picture written to {args.out}")
    if args.json:
        print(json.dumps({"model": model.version, "objects": rows}))


if __name__ == "__main__":
    main()
