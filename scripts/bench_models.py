"""The model table's figures: per SAM model type, parameters, encoder cost, memory and decoder cost.

    python scripts/bench_models.py [--types vit_b,sam2.1_hiera_tiny] [--threads 1] [--json]

Each type runs in a fresh process (so its peak memory is its own) with random weights (costs are
real, masks meaningless; no official weights can be downloaded here, the committed small SAM's are
used for ``sam_tiny``): parameters (all, and those an image's path uses: encoder, prompt encoder,
mask decoder; SAM 2's video memory modules are not), the state dict's size (what an fp32
checkpoint file holds), the image encoder's ms per image at the
model's native input size (the median of ``--images`` after a warm-up), the features one image
keeps in the embedding cache (MiB), the process's peak resident memory after building and after
encoding, and the decoder's ms per prompt (one box; plain SAM against Stable-SAM with a live
random plugin, alternating rounds, medians).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from stable_sam.timing import compare_decoders, live_plugin, random_features_predictor, time_encoder
from stable_sam.builders import MODEL_TYPES, build, build_sam, resolve_device
from stable_sam.embedding_cache import features_nbytes
from stable_sam.model import StableSam

DEFAULT_TYPES = ("sam_tiny", "vit_b", "sam2.1_hiera_tiny", "sam2.1_hiera_small")


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def measure(model_type: str, device: torch.device, images: int, rounds: int) -> Dict[str, Any]:
    """The figures of one model type, in this process."""
    if model_type == "sam_tiny":
        model = build("sam_tiny", device=device)
        model.set_plugin(live_plugin(), "bench")
    else:
        torch.manual_seed(0)
        model = StableSam(build_sam(model_type, None), live_plugin(), model_type, f"{model_type}-random", device)
    a = model.adapter
    r: Dict[str, Any] = {"family": a.family, "input_px": a.image_size,
                         "params_m": round(sum(p.numel() for p in model.sam.parameters()) / 1e6, 2),
                         "image_path_params_m": round(sum(p.numel() for m in (a.image_encoder, a.prompt_encoder,
                                                                                a.mask_decoder)
                                                          for p in m.parameters()) / 1e6, 2),
                         "state_dict_mb": round(sum(t.numel() * t.element_size()
                                                    for t in model.sam.state_dict().values()) / 1e6, 1),
                         "rss_built_mib": peak_rss_mib()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 3, a.image_size, a.image_size), generator=g).to(device)  # cost does not depend on pixels
    time_encoder(model, [x])  # warm-up
    cpu = time.process_time()
    r["encoder_ms"] = round(1e3 * statistics.median(time_encoder(model, [x]) for _ in range(images)), 1)
    # CPU time is the steadier figure on a shared machine (with one thread: the encoder's own work)
    r["encoder_cpu_ms"] = round(1e3 * (time.process_time() - cpu) / images, 1)
    with torch.inference_mode():
        r["cache_mib_per_image"] = round(features_nbytes(a.encode(x)) / 2**20, 2)
    r["rss_encoded_mib"] = peak_rss_mib()
    predictor = random_features_predictor(model, h=768, w=1024)
    box = dict(box=np.array([200.0, 150.0, 620.0, 560.0]))
    r["decoder"] = compare_decoders(predictor, [box], rounds, calls=5)
    return r


def main() -> None:
    """Run the benchmark (``--help``) and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES), help=f"comma-separated, of {', '.join(MODEL_TYPES)}")
    ap.add_argument("--images", type=int, default=3, help="timed encoder passes per type")
    ap.add_argument("--rounds", type=int, default=5, help="decoder rounds (plain / Stable-SAM alternating)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one type, print JSON
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.one:
        print(json.dumps(measure(args.one, device, args.images, args.rounds)))
        return
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = sorted(set(types) - set(MODEL_TYPES))
    if unknown:
        ap.error(f"unknown model types {unknown}; known: {', '.join(MODEL_TYPES)}")
    results: Dict[str, Any] = {}
    for t in types:
        start = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", t, "--images", str(args.images),
               "--rounds", str(args.rounds), "--threads", str(args.threads), "--device", str(device)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{t}: {done.stderr[-2000:]}")
        results[t] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{t}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"device: {device}, torch threads: {args.threads or torch.get_num_threads()}")
    print("| model | family | input px | params M (image path) | state dict MB | encoder ms/image (CPU ms) | cache MiB/image "
          "| peak RSS MiB built / encoded | decoder ms/box plain / Stable-SAM | ratio (CPU time) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t, r in results.items():
        d = r["decoder"]
        print(f"| {t} | {r['family']} | {r['input_px']} | {r['params_m']} ({r['image_path_params_m']}) | {r['state_dict_mb']} | "
              f"{r['encoder_ms']:.0f} ({r['encoder_cpu_ms']:.0f}) | {r['cache_mib_per_image']} | {r['rss_built_mib']:.0f} / {r['rss_encoded_mib']:.0f} | "
              f"{d['sam_ms']:.1f} / {d['stable_sam_ms']:.1f} | {d['ratio']:.3f} ({d['cpu_ratio']:.3f}) |")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
