"""Held-out quality of a base SAM (plugin off): mIoU for a GT box, 1 point and 3 points.

    python -m training.eval_small_sam [--images 200] [--json]

Defaults: the committed small SAM on the held-out synthetic split (never trained on). GT box and
3 points use SAM's single-mask output; 1 point uses three candidates and keeps the best by
predicted IoU. Points are drawn uniformly inside each object's mask with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stable_sam.builders import build
from stable_sam.data.synthetic import HELDOUT_SEED, SyntheticScenes
from stable_sam.metrics import binary_iou
from stable_sam.predictor import StableSamPredictor
from stable_sam.prompts import mask_to_box, sample_points


def main() -> None:
    """Print the held-out mIoU of a base SAM (``--help``; ``--json``: one JSON object last)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", default="sam_tiny")
    ap.add_argument("--checkpoint", type=Path, default=None, help="SAM weights (default: the committed small SAM)")
    ap.add_argument("--images", type=int, default=200, help="held-out images to evaluate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the point prompts")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()

    model = build(args.model_type, sam_checkpoint=args.checkpoint, device=args.device)
    predictor = StableSamPredictor(model)
    scenes = SyntheticScenes(seed=HELDOUT_SEED)
    rng = np.random.default_rng(args.seed)
    ious = {"gt_box": [], "point1": [], "point3": []}
    groups = []  # per object: its kind, and "small" under 500 px
    start = time.time()
    for i in tqdm(range(args.images), desc="held-out images", disable=args.json):
        scene = scenes[i]
        if not scene.masks:
            continue
        predictor.set_image(scene.image)
        gt = torch.as_tensor(np.stack(scene.masks))
        groups += [(k, int(m.sum()) < 500) for k, m in zip(scene.kinds, scene.masks)]
        prompts = {
            "gt_box": dict(box=np.stack([mask_to_box(m) for m in scene.masks])),
            "point1": dict(point_coords=np.stack([sample_points(m, 1, rng) for m in scene.masks]),
                           point_labels=np.ones((len(gt), 1)), multimask_output=True),
            "point3": dict(point_coords=np.stack([sample_points(m, 3, rng) for m in scene.masks]),
                           point_labels=np.ones((len(gt), 3)), multimask_output=False),
        }
        for name, kwargs in prompts.items():
            out = predictor.predict(use_plugin=False, **kwargs)
            ious[name] += binary_iou(torch.as_tensor(out.masks), gt).tolist()
    result = {f"{k}_miou": round(100 * float(np.mean(v)), 2) for k, v in ious.items()}
    print(f"{model.version}: {args.images} held-out images, {len(ious['gt_box'])} objects, "
          f"{time.time() - start:.0f} s")
    print("| prompt | mIoU (%) |\n|---|---|")
    for k, v in result.items():
        print(f"| {k[:-5]} | {v:.1f} |")
    box = np.array(ious["gt_box"])
    print("\nGT-box mIoU (%) by object kind and size:")
    for name, keep in [(k, [g[0] == k for g in groups]) for k in sorted({g[0] for g in groups})] + [
            ("under 500 px", [g[1] for g in groups]), ("500 px and over", [not g[1] for g in groups])]:
        keep = np.array(keep)
        print(f"  {name:16s} {100 * box[keep].mean():5.1f}  ({keep.sum()} objects)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
