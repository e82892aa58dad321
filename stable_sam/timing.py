"""Timing helpers shared by the benchmark scripts and ``scripts/device_report.py``.

Everything here measures side by side in one process: plain SAM against Stable-SAM on the same
prompts in alternating rounds, the image encoder alone against the pre-annotation job on the same
images. CUDA work is synchronised before every clock read, so GPU figures are what a caller waits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .builders import build_sam
from .data.dataset import Sample, SegmentationDataset, load_image
from .data.synthetic import SyntheticScenes
from .data.synthetic_split import SyntheticSplit
from .embedding_cache import EmbeddingCache
from .model import ImageEmbedding, StableSam
from .modeling.plugin import StableSamPlugin
from .predictor import StableSamPredictor
from .preannotation import OfflineSummary, WorkList, items_from_coco, run_offline
from .prompts import noisy_box

BENCH_SEED = 4242  # generated benchmark scenes: a split of their own, neither training nor held-out


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a clock read covers it; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def default_device(device: torch.device) -> Iterator[None]:
    """Create modules directly on ``device``: ViT-H's 632 M random weights initialise in seconds on
    a GPU instead of tens of seconds on the CPU."""
    if device.type == "cuda":
        with torch.device(device):
            yield
    else:
        yield


def live_plugin(seed: int = 0) -> StableSamPlugin:
    """A plugin with random non-zero weights, so offsets and routing are live (the untrained one is
    an exact no-op whose cost could differ from a trained one's)."""
    with torch.random.fork_rng(devices=[]):  # its own initial weights seeded too, the caller's RNG untouched
        torch.manual_seed(seed)
        plugin = StableSamPlugin()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plugin.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return plugin


def random_model(model_type: str, device: torch.device, plugin: Optional[StableSamPlugin] = None,
                 cache: Optional[EmbeddingCache] = None) -> StableSam:
    """A ``StableSam`` of ``model_type`` with random SAM weights (timing only: masks are meaningless,
    costs are real) and ``plugin`` (default: a live random one)."""
    with default_device(device):
        adapter = build_sam(model_type, None)
    return StableSam(adapter, plugin or live_plugin(), model_type, f"{model_type}-random", device, "bench", cache)


def random_embedding(model: StableSam, h: int, w: int, seed: int = 0) -> ImageEmbedding:
    """Random image features of an H x W image, of the shapes the model's encoder makes (the
    decoder's cost does not depend on their values): timing the decoder without the encoder."""
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn((1, *shape), generator=g).to(model.device) for shape in model.adapter.feature_shapes()]
    return ImageEmbedding(maps[0], (h, w), model.adapter.input_size(h, w), "random", tuple(maps[1:]))


def random_features_predictor(model: StableSam, h: int, w: int) -> StableSamPredictor:
    """A predictor of ``model`` whose image is ``random_embedding``'s features of an H x W image:
    ready to time the decoder without the encoder."""
    predictor = StableSamPredictor(model)
    predictor.set_embedding(random_embedding(model, h, w))
    return predictor


def interactive_prompts(h: int, w: int, many_boxes: int = 16) -> Dict[str, dict]:
    """The prompts of a labeling session on an H x W image, as ``predict`` keyword arguments: one
    click, one box, a box with two clicks (one negative), and ``many_boxes`` boxes in one call
    (key ``many_boxes``)."""
    g = np.random.default_rng(0)
    x0 = g.uniform(0.05, 0.5, many_boxes) * w
    y0 = g.uniform(0.05, 0.5, many_boxes) * h
    boxes = np.stack([x0, y0, x0 + g.uniform(0.1, 0.45, many_boxes) * w, y0 + g.uniform(0.1, 0.45, many_boxes) * h], 1)
    return {
        "click": dict(point_coords=[[0.5 * w, 0.5 * h]], point_labels=[1]),
        "box": dict(box=[0.2 * w, 0.25 * h, 0.7 * w, 0.8 * h]),
        "box_2_clicks": dict(box=[0.2 * w, 0.25 * h, 0.7 * w, 0.8 * h],
                             point_coords=[[0.4 * w, 0.5 * h], [0.6 * w, 0.3 * h]], point_labels=[1, 0]),
        "many_boxes": dict(box=boxes),
    }


def prompt_count(prompt: dict) -> int:
    """How many masks one ``predict`` call with these keyword arguments makes."""
    box = prompt.get("box")
    return 1 if box is None else int(np.asarray(box).reshape(-1, 4).shape[0])


def time_predictor(predictor: StableSamPredictor, prompts: Sequence[dict], use_plugin: bool,
                   calls: int) -> Tuple[float, float]:
    """Mean wall-clock and process-CPU milliseconds per prompt (a call of N boxes counts N) over
    ``calls`` passes through ``prompts``."""
    device = predictor.model.device
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        for p in prompts:
            predictor.predict(use_plugin=use_plugin, **p)
    sync(device)
    n = calls * sum(prompt_count(p) for p in prompts)
    return (time.perf_counter() - start) * 1000 / n, (time.process_time() - cpu) * 1000 / n


def compare_decoders(predictor: StableSamPredictor, prompts: Sequence[dict], rounds: int, calls: int,
                     deadline: Optional[float] = None) -> Dict[str, float]:
    """Plain SAM against Stable-SAM on the same prompts: alternating rounds, medians. CPU time is
    reported too: on a shared machine it is the steadier measure of what the plugin costs,
    wall-clock is what a user waits. ``deadline`` (a ``time.perf_counter`` value): no new round
    starts after it (one round always runs)."""
    for use in (False, True):  # warm-up both paths
        time_predictor(predictor, prompts, use, 2)
    sam, stable = [], []
    for _ in range(rounds):
        sam.append(time_predictor(predictor, prompts, False, calls))
        stable.append(time_predictor(predictor, prompts, True, calls))
        if deadline is not None and time.perf_counter() > deadline:
            break
    s, t = statistics.median(w for w, _ in sam), statistics.median(w for w, _ in stable)
    sc, tc = statistics.median(c for _, c in sam), statistics.median(c for _, c in stable)
    return {"sam_ms": round(s, 3), "stable_sam_ms": round(t, 3), "ratio": round(t / s, 4),
            "sam_cpu_ms": round(sc, 3), "stable_sam_cpu_ms": round(tc, 3), "cpu_ratio": round(tc / sc, 4),
            "rounds": len(sam)}


def time_plugin_parts(plugin: StableSamPlugin, grid_hw: Tuple[int, int], device: torch.device,
                      calls: int) -> Dict[str, float]:
    """Milliseconds per call of the plugin alone (one prompt on one grid) and of its C->C 1x1
    projection alone: the projection is what the method mandates over the whole grid for every
    prompt, so 1 + projection / plain SAM is a floor under the ratio whatever the rest costs."""
    n, c = grid_hw[0] * grid_hw[1], plugin.config.dim
    g = torch.Generator().manual_seed(1)
    x, pe = (torch.randn((1, n, c), generator=g).to(device) for _ in range(2))
    token = torch.randn((1, c), generator=g).to(device)

    def per_call(fn: Callable[[], object]) -> float:
        with torch.inference_mode():
            for _ in range(3):
                fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
        return (time.perf_counter() - start) * 1000 / calls

    return {"plugin_ms": round(per_call(lambda: plugin(token, x, pe, grid_hw)), 3),
            "projection_ms": round(per_call(lambda: plugin.dsp.proj(x)), 3)}


def time_encoder(model: StableSam, inputs: Sequence[torch.Tensor], autocast: Optional[torch.dtype] = None,
                 default_policy: bool = False) -> float:
    """Mean seconds of the image encoder (the adapter's ``encode``: SAM 2's includes its feature
    preparation) per input (each 1 x 3 x S x S, preprocessed).
    ``default_policy``: under the model's own ``encoder_autocast`` (what the product runs); else
    under ``autocast`` (a dtype) or none (fp32)."""
    total = 0.0
    with torch.inference_mode():
        for x in inputs:
            if default_policy:
                ctx = model.encoder_autocast()
            elif autocast is not None:
                ctx = torch.autocast(model.device.type, dtype=autocast)
            else:
                ctx = contextlib.nullcontext()
            sync(model.device)
            t = time.perf_counter()
            with ctx:
                model.adapter.encode(x)
            sync(model.device)
            total += time.perf_counter() - t
    return total / len(inputs)


def percentiles_ms(seconds: Sequence[float]) -> Dict[str, float]:
    """p50 / p95 / mean in milliseconds of a list of durations in seconds."""
    a = 1e3 * np.asarray(seconds, dtype=np.float64)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "mean_ms": round(float(a.mean()), 3), "n": int(a.size)}


@dataclass
class GeneratedFolder:
    """A temporary folder of generated scenes (``<root>/images``) with a rough box per object."""

    root: Path
    work: WorkList
    boxes: int


def make_folder(folder: Path, n: int, fmt: str = "png", noise: float = 0.2, size: int = 256,
                max_boxes: int = 100) -> int:
    """n synthetic scenes as image files + ``boxes.json`` (one rough box per object, at most
    ``max_boxes`` per image); returns the number of boxes."""
    scenes = SyntheticScenes(seed=BENCH_SEED, size=size)
    rng = np.random.default_rng(BENCH_SEED)
    images, anns = [], []
    for i in range(n):
        s = scenes[i]
        name = f"scene{i:04d}.{'jpg' if fmt == 'jpeg' else 'png'}"
        Image.fromarray(s.image).save(folder / name, **({"quality": 92} if fmt == "jpeg" else {}))
        h, w = s.image.shape[:2]
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for m in s.masks[:max_boxes]:
            x0, y0, x1, y1 = (float(v) for v in noisy_box(m, noise, rng))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    (folder / "boxes.json").write_text(json.dumps(coco))
    return len(anns)


def generated_folder(images: int, fmt: str = "png", noise: float = 0.2, size: int = 256, max_boxes: int = 100,
                     prefix: str = "bench-") -> GeneratedFolder:
    """A new temporary folder with ``images`` generated scenes of long side ``size`` and its work list."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    folder = root / "images"
    folder.mkdir()
    boxes = make_folder(folder, images, fmt, noise, size, max_boxes)
    return GeneratedFolder(root, items_from_coco(folder / "boxes.json", folder), boxes)


def add_folder_args(ap: argparse.ArgumentParser, images: int) -> None:
    """The generated folder's options (``generated_work``), shared by ``scripts/bench_preannotate.py``
    and ``scripts/bench_ray.py``."""
    ap.add_argument("--images", type=int, default=images)
    ap.add_argument("--format", choices=("png", "jpeg"), default="png")
    ap.add_argument("--noise", type=float, default=0.2, help="box noise scale s of the rough boxes")
    ap.add_argument("--max-boxes", type=int, default=100,
                    help="boxes per image at most (default: one per object, 2-6); the decoder runs once per box")
    ap.add_argument("--size", type=int, default=256, help="long side of the generated images")


def generated_work(args: argparse.Namespace, prefix: str) -> Tuple[Path, WorkList, int]:
    """A new temporary folder with the scenes ``args`` ask for: (the folder, its work list, the
    number of boxes); the images are in ``<folder>/images``."""
    g = generated_folder(args.images, args.format, args.noise, args.size, args.max_boxes, prefix)
    return g.root, g.work, g.boxes


def preprocessed_inputs(model: StableSam, paths: Sequence[Path]) -> List[torch.Tensor]:
    """The images at ``paths`` read and preprocessed for the encoder (1 x 3 x S x S each)."""
    return [model.preprocess(load_image(p))[0] for p in paths]


def time_job(model: StableSam, work: WorkList, out: Path, threaded: bool,
             encode_ahead: Optional[bool] = None, encoder_stream: bool = False) -> OfflineSummary:
    """One offline pre-annotation run from an empty embedding cache (every image is encoded, as in
    a fresh run). ``threaded=False``: no background threads (the serial baseline)."""
    model.cache = EmbeddingCache(max_mb=1024)
    summary = run_offline(model, work, out, read_ahead=4 if threaded else 0,
                          encode_ahead=(True if encode_ahead is None else encode_ahead) if threaded else False,
                          fresh=True, progress=False, encoder_stream=encoder_stream)
    if summary.failed or summary.processed != len(work.items):
        raise RuntimeError(f"the job failed on {summary.failed}")
    return summary


class InMemoryDataset(SegmentationDataset):
    """Samples made beforehand (e.g. generated scenes), so a timed epoch does not time making them."""

    def __init__(self, samples: Sequence[Sample], description: str = "in-memory samples") -> None:
        self.samples = list(samples)
        self.description = description

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def generated_samples(count: int, size: int, seed: int = BENCH_SEED) -> InMemoryDataset:
    """``count`` generated scenes of long side ``size`` that have objects, as a dataset."""
    split = SyntheticSplit(seed, 0, count, size)
    return InMemoryDataset([split[i] for i in range(count)], f"{split.description} at {size} px")
