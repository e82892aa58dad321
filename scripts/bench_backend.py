"""Benchmark: a click session through the real Flask app against the bare predictor.

Several images, several clicks each, sent as Label Studio sends them (the region list grows with
every click: keypoints, a negative one, then a rough rectangle). For every click after an image's
first (the embedding is cached: decoder only), the same prompt is also timed on a bare
``StableSamPredictor`` whose image is already set, side by side in the same loop.

    python scripts/bench_backend.py [--images 6] [--clicks 5] [--repeats 3] [--size 640x480] [--json]

Last line with --json: {"cached_click_ms", "predictor_ms", "ratio", "encoder_calls", "images"}
(medians; ratio = cached_click_ms / predictor_ms, target <= 1.3; encoder_calls target: one per image).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import List, Tuple

from PIL import Image

from backend.app import create_app
from backend.ml_backend import StableSamBackend
from backend.server_settings import BackendSettings
from backend.testing.drawn_scene import drawn_scene
from backend.testing.label_studio_regions import ClickTimer, click_session, recommended_config
from stable_sam.builders import build_from_settings
from stable_sam.predictor import StableSamPredictor

RECOMMENDED_CONFIG = recommended_config()


def parse_args() -> argparse.Namespace:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--clicks", type=int, default=5, help="clicks per image (the first one encodes)")
    ap.add_argument("--repeats", type=int, default=3, help="times each cached click is sent (and timed bare)")
    ap.add_argument("--size", default="640x480", help="image W x H")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    return ap.parse_args()


def time_sessions(timer: ClickTimer, scenes: list, clicks: int,
                  repeats: int) -> Tuple[List[float], List[float], List[float]]:
    """A click session per scene: (first clicks through the app, cached clicks through the app, the
    same cached clicks on the bare predictor), seconds each."""
    first, cached, direct = [], [], []
    for i, sc in enumerate(scenes):
        session = click_session(sc.masks, sc.boxes, sc.size, clicks)
        first.append(timer.post(i, session[0]))
        timer.predictor.set_image(sc.image)  # cache hit: the backend already encoded it
        for regions in session[1:]:
            for n in range(repeats):
                if n % 2:  # alternate the order, so neither side always runs right after the other
                    cached.append(timer.post(i, regions))
                    direct.append(timer.bare(regions, sc.size)[0])
                else:
                    direct.append(timer.bare(regions, sc.size)[0])
                    cached.append(timer.post(i, regions))
    return first, cached, direct


def main() -> None:
    """Run the benchmark (``--help``) and print its figures."""
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    width, height = (int(v) for v in args.size.lower().split("x"))

    tmp = Path(tempfile.mkdtemp(prefix="bench-backend-"))
    scenes = [drawn_scene(100 + i, width, height) for i in range(args.images)]
    for i, sc in enumerate(scenes):
        Image.fromarray(sc.image).save(tmp / f"img{i}.png")
    settings = BackendSettings.from_env()
    settings = BackendSettings(**{**settings.__dict__, "local_files_root": tmp.resolve()})
    model = build_from_settings(settings)
    print(f"model {model.version} on {model.device}; {args.images} images {width}x{height}, {args.clicks} clicks each")
    backend = StableSamBackend(settings, model=model)
    timer = ClickTimer(create_app(backend=backend).test_client(), StableSamPredictor(model), tmp, RECOMMENDED_CONFIG)

    # warm-up on an image outside the session (first-call allocations, lazy inits)
    warm = drawn_scene(99, width, height)
    timer.predictor.set_image(warm.image)
    for regions in click_session(warm.masks, warm.boxes, warm.size, 3):
        timer.bare(regions, warm.size)
    calls_before = model.encoder_calls
    first, cached, direct = time_sessions(timer, scenes, args.clicks, args.repeats)
    encoder_calls = model.encoder_calls - calls_before
    cached_ms = 1e3 * statistics.median(cached)
    direct_ms = 1e3 * statistics.median(direct)
    out = {"cached_click_ms": round(cached_ms, 2), "predictor_ms": round(direct_ms, 2),
           "ratio": round(cached_ms / direct_ms, 3), "encoder_calls": encoder_calls, "images": args.images}
    print(f"first click (encodes): median {1e3 * statistics.median(first):.1f} ms")
    print(f"cached click through /predict: median {cached_ms:.1f} ms over {len(cached)} clicks")
    print(f"bare predictor, same prompts:  median {direct_ms:.1f} ms")
    print(f"ratio {out['ratio']} (target <= 1.3); encoder calls {encoder_calls} for {args.images} images")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
