"""Per-prompt decoder cost of Stable-SAM against plain SAM, side by side on the same prompts.

    python scripts/bench_decoder.py [--rounds 7] [--json]

Times ``StableSamPredictor.predict`` (prompt encoder, mask decoder, masks at the original image
size, stability score) with the image already embedded, so each call is what one click costs.
Plain SAM is the same predictor with ``use_plugin=False``. Models: the committed small SAM on
the shipped example image, and the ViT-B architecture with random weights (its decoder is the
real SAM decoder; the embedding is random since encoder values do not change decoder cost) on a
1024 x 768 image. The plugin has random non-zero weights, so offsets and routing are live.
Rounds alternate plain / Stable-SAM and the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from stable_sam.build import build, build_sam, resolve_device  # noqa: E402
from stable_sam.model import ImageEmbedding, StableSam  # noqa: E402
from stable_sam.modeling.plugin import StableSamPlugin  # noqa: E402
from stable_sam.predictor import StableSamPredictor  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "scene.png"


def live_plugin(seed: int = 0) -> StableSamPlugin:
    plugin = StableSamPlugin()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plugin.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return plugin


def prompts_for(h: int, w: int):
    """One click, one box, a box with two clicks: the interactive prompts of a labeling session."""
    return [
        dict(point_coords=[[0.5 * w, 0.5 * h]], point_labels=[1]),
        dict(box=[0.2 * w, 0.25 * h, 0.7 * w, 0.8 * h]),
        dict(box=[0.2 * w, 0.25 * h, 0.7 * w, 0.8 * h], point_coords=[[0.4 * w, 0.5 * h], [0.6 * w, 0.3 * h]],
             point_labels=[1, 0]),
    ]


def time_predictor(predictor: StableSamPredictor, prompts, use_plugin: bool, calls: int) -> tuple:
    """Mean wall-clock and process-CPU milliseconds per predict() call over ``calls`` passes."""
    sync = torch.cuda.synchronize if predictor.model.device.type == "cuda" else (lambda: None)
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        for p in prompts:
            predictor.predict(use_plugin=use_plugin, **p)
    sync()
    n = calls * len(prompts)
    return (time.perf_counter() - start) * 1000 / n, (time.process_time() - cpu) * 1000 / n


def compare(predictor: StableSamPredictor, prompts, rounds: int, calls: int) -> dict:
    """Alternating rounds; medians. CPU time is reported too: on a shared machine it is the steadier
    measure of what the plugin costs, wall-clock is what a user waits."""
    for use in (False, True):  # warm-up both paths
        time_predictor(predictor, prompts, use, 2)
    sam, stable = [], []
    for _ in range(rounds):
        sam.append(time_predictor(predictor, prompts, False, calls))
        stable.append(time_predictor(predictor, prompts, True, calls))
    s, t = statistics.median(w for w, _ in sam), statistics.median(w for w, _ in stable)
    sc, tc = statistics.median(c for _, c in sam), statistics.median(c for _, c in stable)
    return {"sam_ms": round(s, 3), "stable_sam_ms": round(t, 3), "ratio": round(t / s, 4),
            "sam_cpu_ms": round(sc, 3), "stable_sam_cpu_ms": round(tc, 3), "cpu_ratio": round(tc / sc, 4)}


def time_plugin_parts(plugin: StableSamPlugin, grid_hw: tuple, device: torch.device, calls: int) -> dict:
    """Milliseconds per call of the plugin alone (one prompt on one grid) and of its C->C 1x1
    projection alone: the projection is what the method mandates over the whole grid for every
    prompt, so 1 + projection / plain SAM is a floor under the ratio whatever the rest costs."""
    n, c = grid_hw[0] * grid_hw[1], plugin.config.dim
    g = torch.Generator().manual_seed(1)
    x, pe = (torch.randn((1, n, c), generator=g).to(device) for _ in range(2))
    token = torch.randn((1, c), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def per_call(fn) -> float:
        with torch.inference_mode():
            for _ in range(3):
                fn()
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
        return (time.perf_counter() - start) * 1000 / calls

    return {"plugin_ms": round(per_call(lambda: plugin(token, x, pe, grid_hw)), 3),
            "projection_ms": round(per_call(lambda: plugin.dsp.proj(x)), 3)}


def main() -> None:
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
    results["small"] = compare(predictor, prompts_for(*image.shape[:2]), args.rounds, calls=20)
    results["small"].update(time_plugin_parts(small.plugin, small.sam.prompt_encoder.image_embedding_size,
                                              device, calls=200))

    vit_b = StableSam(build_sam("vit_b", None), live_plugin(), "vit_b", "vit_b-random", device)
    predictor = StableSamPredictor(vit_b)
    h, w = 768, 1024
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn((1, 256, 64, 64), generator=g).to(device)
    predictor.set_embedding(ImageEmbedding(embedding, (h, w), (768, 1024), "random"))
    results["vit_b"] = compare(predictor, prompts_for(h, w), args.rounds, calls=2 if device.type == "cpu" else 20)
    results["vit_b"].update(time_plugin_parts(vit_b.plugin, (64, 64), device, calls=20))
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
