"""Where the masks go wrong, per prompt type: missed object area, false positives on neighbouring
objects, in the boundary band and far in the background (shares of object area), plus the ratios
noisy-0.4 / GT box and 1 point / 3 points that tell whether a SAM fails like real SAM.

    python scripts/failure_profile.py                    # shipped small SAM, held-out synthetic scenes
    python scripts/failure_profile.py --json             # ... and one JSON object as the last line
    python scripts/failure_profile.py --plugin checkpoints/plugin_sam_tiny_rts.pt   # with a plugin
    python scripts/failure_profile.py --model-type vit_l --checkpoint sam_vit_l_0b3195.pth \\
        --dataset DIS5K/DIS-VD --device cuda                          # real SAM on real data

Reads every dataset the benchmark reads (``--dataset``) with the benchmark's seeded prompts. The
region world and its region-fit oracle are research (``research/README.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from stable_sam.builders import MODEL_TYPES, build
from stable_sam.checkpoint import load_plugin
from stable_sam.data.dataset import DatasetError
from stable_sam.data.sources import is_generated, open_dataset
from stable_sam.download import CheckpointError
from stable_sam.evaluation import ALL_TYPES, PROMPT_TYPES, ProtocolConfig
from stable_sam.mask_errors import failure_profile, profile_table

DEFAULT_DATASET = "synthetic:heldout"
DEFAULT_IMAGES = 60
# Held-out scenes from 1000 on, as the benchmark: pretraining monitors the first 48.
DEFAULT_SYNTHETIC_START = 1000


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=DEFAULT_DATASET,
                    help="synthetic:heldout | a folder of images + mask "
                         "PNGs | a COCO instances .json | a Label Studio JSON export")
    ap.add_argument("--image-root", type=Path, default=None)
    ap.add_argument("--masks-dir", type=Path, default=None)
    ap.add_argument("--start", type=int, default=None,
                    help=f"first image index (default {DEFAULT_SYNTHETIC_START} for generated scenes, else 0)")
    ap.add_argument("--images", type=int, default=None,
                    help=f"number of images (default: all; {DEFAULT_IMAGES} for generated scenes)")
    ap.add_argument("--model-type", default="sam_tiny", choices=MODEL_TYPES)
    ap.add_argument("--checkpoint", type=Path, default=None, help="SAM weights (default: the shipped ones)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--plugin", type=Path, default=None, help="profile Stable-SAM with this plugin (default: plain SAM)")
    ap.add_argument("--prompts", type=int, default=20, help="random prompts per object and type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", default=",".join(PROMPT_TYPES), help=f"comma-separated, from {ALL_TYPES}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Print the failure profile (``--help``); the exit code (2: bad input)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = ProtocolConfig(prompts_per_object=args.prompts, seed=args.seed,
                             prompt_types=tuple(t.strip() for t in args.types.split(",") if t.strip()))
        generated = is_generated(args.dataset)
        limit = args.images if args.images is not None else (DEFAULT_IMAGES if generated else None)
        start = args.start if args.start is not None else (DEFAULT_SYNTHETIC_START if generated else 0)
        dataset = open_dataset(args.dataset, image_root=args.image_root, masks_dir=args.masks_dir,
                               limit=limit, start=start)
        model = build(args.model_type, sam_checkpoint=args.checkpoint, device=args.device, model_dir=args.model_dir)
        plugin = load_plugin(args.plugin, model_type=args.model_type).plugin if args.plugin else None
    except (DatasetError, CheckpointError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {model.version}; dataset {dataset.description}; "
          f"{'plugin ' + str(args.plugin) if plugin is not None else 'plain SAM (no plugin)'}")
    profile = failure_profile(model, dataset, plugin, cfg, progress=not args.no_progress)
    print(f"\n{profile['images']} images, {profile['objects']} objects; error parts in % of object area\n")
    print(profile_table(profile))
    print(f"\nnoisy-0.4 / GT box mIoU: {profile['noisy04_over_gt']} (real SAM ViT-L: 0.58)")
    print(f"1 point / 3 points mIoU: {profile['point1_over_point3']} (real SAM ViT-L: 0.55)")
    print(f"object area outside the noisy-0.4 boxes: {profile['outside_box_share']} %")
    neg = profile["negative_click"]
    if neg:
        print(f"a negative click on a wrongly included region raised IoU in {neg['raised_share']} % of "
              f"{neg['cases']} cases (mean IoU {neg['iou_before']} -> {neg['iou_after']})")
        for by in ("by_prompt", "by_iou_before"):
            print(f"  {by.replace('_', ' ')}: " + "; ".join(
                f"{name} {row['raised_share']} % of {row['cases']}" for name, row in neg[by].items()))
    if args.json:
        out = {k: profile[k] for k in ("types", "noisy04_over_gt", "point1_over_point3",
                                       "outside_box_share", "negative_click", "images", "objects")}
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
