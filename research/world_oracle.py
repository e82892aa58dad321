"""How far a world's *structure* alone can make a SAM fail: the region-fit oracle.

The region world exists so that a loose box fits some other region (a part, a group, a container,
the background) better than the object, and one click is ambiguous between nested regions, as in
SA-1B. This oracle measures how often that happens, with no network: it answers each of the
protocol's prompts the way a model that has learnt exactly "a prompt selects one of the scene's
regions" would, choosing among the scene's pretraining targets (``Scene.targets``):

- a box: the target whose tight box has the highest box IoU with the prompt box;
- one point: SAM's ambiguity with no preference, the mean IoU over the targets containing it;
- three points: the smallest target containing all three.

Its mIoU ratios (noisy-0.4 / GT box, 1 point / 3 points) are what region choice alone can cost on
that world. A trained model also fails in ways the oracle cannot (cutting the object at a box edge,
filling a loose box with background, blurred outlines), so the oracle is not a bound on a model's
ratio; it tells whether the world gives the failure the room the method needs.

    python -m research.world_oracle                              # regions:heldout, 60 images, 20 prompts
    python -m research.world_oracle --dataset regions:unseen --json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import numpy as np

import research.region_world  # noqa: F401 - registers the "regions" world
from stable_sam.data.dataset import DatasetError
from stable_sam.data.sources import open_dataset
from stable_sam.data.synthetic_split import SyntheticSplit
from stable_sam.evaluation import ProtocolConfig, prompt_rng, protocol_prompts
from stable_sam.metrics import mask_iou
from stable_sam.prompts import box_iou, mask_to_box

ORACLE_TYPES = ("gt_box", "noisy_box_0.2", "noisy_box_0.4", "point1", "point3")


def region_fit(target_boxes: List[np.ndarray], box: np.ndarray) -> int:
    """Index of the target whose tight box (XYXY, one per target) best fits ``box``."""
    return int(np.argmax([box_iou(box, tb) for tb in target_boxes]))


def containing(targets: List[np.ndarray], points: np.ndarray) -> List[np.ndarray]:
    """The targets (H x W bool) that contain every point of ``points`` (K x 2, x y pixel centres)."""
    xy = np.floor(points).astype(int)
    return [t for t in targets if all(t[y, x] for x, y in xy)]


def region_fit_oracle(split: SyntheticSplit, cfg: ProtocolConfig) -> Dict[str, object]:
    """The oracle on every scene of a region-world split, with the benchmark's seeded prompts.

    Returns ``{"types": {P: miou}, "noisy04_over_gt", "point1_over_point3",
    "noisy04_other_region_share"}`` (mIoU in %, shares in %); types outside ``ORACLE_TYPES`` or
    not in ``cfg`` are left out."""
    types = [t for t in ORACLE_TYPES if t in cfg.prompt_types]
    ious: Dict[str, List[float]] = {t: [] for t in types}
    other, noisy = 0, 0
    for index in range(len(split)):
        scene = split.scenes[split.start + index]
        if not scene.masks:
            continue
        if not scene.targets:
            raise ValueError(f"{split.description} has no region targets: the oracle needs the region world")
        target_boxes = [mask_to_box(t) for t in scene.targets]
        for j, mask in enumerate(scene.masks):
            for t in types:
                prompts = protocol_prompts(mask, t, cfg.prompts_per_object, prompt_rng(cfg.seed, index, j, t))
                if prompts.boxes is not None:
                    for box in prompts.boxes:
                        picked = scene.targets[region_fit(target_boxes, box)]
                        ious[t].append(float(mask_iou(picked, mask)))
                        if t == "noisy_box_0.4":
                            noisy += 1
                            other += not np.array_equal(picked, mask)
                    continue
                for points in prompts.points:
                    regions = containing(scene.targets, points)
                    if not regions:
                        ious[t].append(0.0)
                    elif t == "point3":
                        ious[t].append(float(mask_iou(min(regions, key=lambda r: int(r.sum())), mask)))
                    else:
                        ious[t].append(float(np.mean([float(mask_iou(r, mask)) for r in regions])))
    miou = {t: round(100 * float(np.mean(v)), 1) for t, v in ious.items() if v}

    def ratio(a: str, b: str):
        return round(miou[a] / miou[b], 3) if a in miou and miou.get(b) else None

    return {"types": miou, "noisy04_over_gt": ratio("noisy_box_0.4", "gt_box"),
            "point1_over_point3": ratio("point1", "point3"),
            "noisy04_other_region_share": round(100 * other / noisy, 1) if noisy else None}


def main(argv=None) -> int:
    """Print the region-fit oracle of a region-world split (``--json``: one JSON object last)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="regions:heldout", help="regions:heldout | regions:unseen | regions:<seed>")
    ap.add_argument("--start", type=int, default=1000, help="first scene (the benchmark's held-out scenes start at 1000)")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=20, help="random prompts per object and type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    try:
        split = open_dataset(args.dataset, limit=args.images, start=args.start)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not isinstance(split, SyntheticSplit) or not str(args.dataset).startswith("regions:"):
        print(f"error: {args.dataset} is not a region-world split (regions:heldout, regions:unseen)", file=sys.stderr)
        return 2
    oracle = region_fit_oracle(split, ProtocolConfig(prompts_per_object=args.prompts, seed=args.seed))
    print(f"region-fit oracle on {split.description} (a model that picks the region a prompt fits best; no "
          f"network): mIoU {oracle['types']}; noisy-0.4 / GT box {oracle['noisy04_over_gt']}, 1 point / 3 points "
          f"{oracle['point1_over_point3']}; {oracle['noisy04_other_region_share']} % of noisy-0.4 boxes fit "
          f"another region best")
    if args.json:
        print(json.dumps(oracle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
