"""Corrective clicks: IoU after each click, with and without the previous mask fed back.

An annotator clicks an object, looks at the mask, and clicks where it is most wrong: a positive
click on a missed part, an Alt-click (negative) on a spill-over. Label Studio sends every click on
the object so far with each request (``[p1]``, ``[p1, p2]``, ...). This replays such sessions on
the held-out synthetic split through the backend itself (``StableSamBackend.predict``, interactive
context, as Label Studio sends it), once with PREVIOUS_MASK_ITEMS on (the previous click's low-res
logits are the mask prompt, SAM's own interactive loop) and once with it off, same clicks policy:

- click 1: the object pixel farthest from its border;
- click k: in the larger of the two error regions (missed / spilled), the pixel farthest from that
  region's border (the protocol of SAM's interactive evaluation), positive on a miss, negative on
  a spill. The next click depends on the mask each mode predicted, so the two modes' sessions
  diverge after click 1, as two annotators' would.

    python scripts/bench_corrective_clicks.py [--scenes 30] [--clicks 5] [--json]

Prints the mean IoU after each click for both modes and the share of clicks after the first that
made the mask worse; with --json the last line is
{"objects", "clicks", "miou_with", "miou_without", "worse_with", "worse_without", "model"}.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.ml_backend import StableSamBackend
from backend.testing.label_studio_regions import keypoint, recommended_config
from backend.server_settings import BackendSettings
from stable_sam.builders import build_from_settings
from stable_sam.data.synthetic import HELDOUT_SEED, SyntheticScenes
from stable_sam.metrics import mask_iou

MIN_AREA = 150  # objects smaller than this (pixels) are skipped: one click covers them


def farthest_inside(region: np.ndarray) -> Tuple[float, float]:
    """(x, y) of the region pixel farthest from the region's border (SAM's click protocol)."""
    padded = np.pad(region.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x) + 0.5, float(y) + 0.5


def next_click(pred: np.ndarray, gt: np.ndarray) -> Tuple[Tuple[float, float], bool]:
    """Where an annotator clicks next: deep inside the larger error region (missed or spilled);
    the point (x, y) and whether the click is positive."""
    missed, spilled = gt & ~pred, pred & ~gt
    if missed.sum() >= spilled.sum():
        return farthest_inside(missed if missed.any() else gt), True
    return farthest_inside(spilled), False


def session(backend: StableSamBackend, image_path: Path, gt: np.ndarray, task_id: int, clicks: int,
            config: str) -> List[float]:
    """One object's click session through the backend: IoU with ``gt`` after each of ``clicks`` clicks."""
    h, w = gt.shape
    regions: List[dict] = []
    ious: List[float] = []
    pred = np.zeros_like(gt)
    for k in range(clicks):
        (x, y), positive = (farthest_inside(gt), True) if k == 0 else next_click(pred, gt)
        regions.append(keypoint(x, y, (w, h), positive=positive, rid=f"k{k}"))
        task = {"id": task_id, "data": {"image": str(image_path)}, "annotations": [], "predictions": []}
        (out,) = backend.predict([task], context={"result": list(regions)}, label_config=config, project="1.1")
        if out["result"]:
            r = out["result"][0]
            pred = decode_rle(r["value"]["rle"]).reshape(h, w, 4)[:, :, 3] == 255
        else:
            pred = np.zeros_like(gt)
        ious.append(float(mask_iou(pred, gt)))
    return ious


def main() -> None:
    """Run the benchmark (``--help``) and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=30, help="held-out scenes (every object of each is clicked)")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="bench-corrective-"))
    scenes = SyntheticScenes(seed=HELDOUT_SEED)
    base = BackendSettings.from_env()
    settings = {mode: BackendSettings(**{**base.__dict__, "local_files_root": tmp.resolve(), "prefetch_queue": 0,
                                         "previous_mask_items": 256 if mode == "with" else 0})
                for mode in ("with", "without")}
    model = build_from_settings(settings["with"])
    backends = {mode: StableSamBackend(s, model=model) for mode, s in settings.items()}
    config = recommended_config()
    curves: Dict[str, List[List[float]]] = {"with": [], "without": []}
    task_id = 0
    for i in range(args.scenes):
        sc = scenes[i]
        path = tmp / f"scene{i}.png"
        Image.fromarray(sc.image).save(path)
        for gt in sc.masks:
            if gt.sum() < MIN_AREA:
                continue
            task_id += 1
            for mode, backend in backends.items():
                curves[mode].append(session(backend, path, gt, task_id, args.clicks, config))
    n = len(curves["with"])
    miou = {m: [round(100 * float(np.mean([c[k] for c in curves[m]])), 2) for k in range(args.clicks)] for m in curves}
    worse = {m: round(100 * float(np.mean([c[k] < c[k - 1] - 1e-6 for c in curves[m] for k in range(1, args.clicks)])), 1)
             for m in curves}
    print(f"model {model.version}; {n} objects of {args.scenes} held-out scenes, {args.clicks} clicks each")
    print("mIoU after click  " + "  ".join(f"{k + 1:>6}" for k in range(args.clicks)))
    for m in ("with", "without"):
        print(f"{m + ' previous mask':<17}" + "  ".join(f"{v:6.2f}" for v in miou[m]) +
              f"   (clicks that made it worse: {worse[m]} %)")
    if args.json:
        print(json.dumps({"objects": n, "clicks": args.clicks, "miou_with": miou["with"],
                          "miou_without": miou["without"], "worse_with": worse["with"],
                          "worse_without": worse["without"], "model": model.version}))


if __name__ == "__main__":
    main()
