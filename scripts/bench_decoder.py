"""Per-prompt decoder cost of Stable-SAM against plain SAM, side by side on the same prompts.

    python scripts/bench_decoder.py [--rounds 7] [--json]

Times ``StableSamPredictor.predict`` (prompt encoder, mask decoder, masks at the original image
size, stability score) with the image already embedded, so each call is what one click costs.
Plain SAM is the same predictor with ``use_plugin=False``. Models: the committed small SAM on
the shipped example image, and, with random weights on a 1024 x 768 image, the ViT-B architecture
and SAM 2.1 hiera-tiny (``sam2.1_hiera_tiny``; every SAM 2.1 size has the same decoder): their
decoders are the real ones, the image features random since their values do not change the
decoder's cost (SAM 2's include its two high-resolution maps). The plugin has random non-zero
weights, so offsets and routing are live. Rounds alternate plain / Stable-SAM and the medians are
compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stable_sam.timing import (compare_decoders, interactive_prompts, live_plugin, random_features_predictor,
                               time_plugin_parts)
from stable_sam.builders import build, build_sam, resolve_device
from stable_sam.model import StableSam
from stable_sam.predictor import StableSamPredictor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "scene.png"


def session_prompts(h: int, w: int):
    """One click, one box, a box with two clicks: the interactive prompts of a labeling session."""
    return [p for k, p in interactive_prompts(h, w).items() if k in ("click", "box", "box_2_clicks")]


def main() -> None:
    """Run the benchmark (``--help``) and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = {}

    small = build("sam_tiny", device=device)
    small.set_plugin(live_plugin(), "bench")
    predictor = StableSamPredictor(small)
    image = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    predictor.set_image(image)
    results["small"] = compare_decoders(predictor, session_prompts(*image.shape[:2]), args.rounds, calls=20)
    results["small"].update(time_plugin_parts(small.plugin, small.adapter.grid_hw,
                                              device, calls=200))

    h, w = 768, 1024
    for name in ("vit_b", "sam2.1_hiera_tiny"):
        model = StableSam(build_sam(name, None), live_plugin(), name, f"{name}-random", device)
        predictor = random_features_predictor(model, h, w)
        results[name] = compare_decoders(predictor, session_prompts(h, w), args.rounds,
                                         calls=2 if device.type == "cpu" else 20)
        results[name].update(time_plugin_parts(model.plugin, model.adapter.grid_hw, device, calls=20))
    for r in results.values():
        r["ratio_floor_projection"] = round(1 + r["projection_ms"] / r["sam_ms"], 4)

    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print("| model | plain SAM ms/prompt | Stable-SAM ms/prompt | ratio | CPU ms plain / Stable | CPU ratio "
          "| plugin alone ms | its C->C projection ms | ratio floor from the projection |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['sam_ms']:.2f} | {r['stable_sam_ms']:.2f} | {r['ratio']:.3f} | "
              f"{r['sam_cpu_ms']:.2f} / {r['stable_sam_cpu_ms']:.2f} | {r['cpu_ratio']:.3f} | "
              f"{r['plugin_ms']:.2f} | {r['projection_ms']:.2f} | {r['ratio_floor_projection']:.3f} |")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
