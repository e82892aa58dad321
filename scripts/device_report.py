"""The GPU figures in one prepared run: every cost the product has where it really runs.

    timeout 480 python scripts/device_report.py --json        # on a CUDA device, under 8 minutes
    python scripts/device_report.py --device cpu --quick --json    # every part on tiny sizes (CI)

One process, parts in this order, each under a time cap (a part that reaches its cap stops
measuring, keeps what it has and says ``cut_short``; one that fails says ``error`` and the run goes on):

- ``encoder``: image encoder ms/image of ViT-B / L / H and SAM 2.1 hiera-tiny / small / base+ /
  large (random weights: none can be downloaded here) at 1024 px, fp32 against bf16 autocast in
  alternating rounds, with the peak GPU memory of each and the bf16 embedding's relative error;
- ``decoder``: ms per prompt of plain SAM against Stable-SAM (live random plugin) on the same
  prompts, alternating rounds, medians: a click, a box, a box + 2 clicks, and 16 boxes in one call
  (``many_boxes``; its ms per prompt = call / 16), for the small SAM (committed weights), ViT-B / L / H (their
  decoders are the same shape; the three rows are repeats of one cost on random weights) and SAM 2.1
  (``sam2.1_hiera_tiny``: every SAM 2.1 size has the same decoder, with its high-resolution maps);
- ``app_click``: a cached click through the Flask app (test client, ViT-H) against the bare
  predictor on the same prompt, p50 / p95;
- ``preannotate``: the offline pre-annotation job on generated 1024-px images with a few rough
  boxes each (ViT-B) against the encoder's own limit; encode-ahead with and without the encoder's
  own CUDA stream, and serial;
- ``rts``: one RTS epoch on N generated images (ViT-B): seconds, seconds per image;
- ``decoder_compiled``: ``torch.compile`` of the decoder + plugin (ViT-H), plain against Stable-SAM,
  next to the same model eager in the same part. Last: compiling is the slowest and least certain.

The JSON (``--out``) is written atomically before each part and at the end, so a run cut short
still leaves every finished part's figures. ``--json`` prints it as the last line.

Over 400 lines on purpose: the device machine gets one short prepared command, so the six parts,
their caps and the atomic report live in one file that can be read top to bottom.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch
from PIL import Image

from backend.testing.label_studio_regions import ClickTimer, click_session, recommended_config
from stable_sam.timing import (BENCH_SEED, compare_decoders, generated_folder, generated_samples,
                                     interactive_prompts, live_plugin, percentiles_ms, preprocessed_inputs,
                                     random_features_predictor, random_model, sync, time_encoder, time_job,
                                     time_plugin_parts)
from stable_sam.builders import build, resolve_device
from stable_sam.checkpoint import atomic_write_json
from stable_sam.data.synthetic import SyntheticScenes
from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.model import StableSam
from stable_sam.predictor import StableSamPredictor
from stable_sam.prompts import mask_to_box
from stable_sam.rts import RTSConfig, train_plugin

EXAMPLE = ROOT / "examples" / "scene.png"
PARTS = ("encoder", "decoder", "app_click", "preannotate", "rts", "decoder_compiled")


@dataclass(frozen=True)
class Sizes:
    """How much each part measures, and its time cap in seconds."""

    encoder_archs: Tuple[str, ...] = ("vit_b", "vit_l", "vit_h", "sam2.1_hiera_tiny", "sam2.1_hiera_small",
                                      "sam2.1_hiera_base_plus", "sam2.1_hiera_large")
    encoder_images: int = 8  # timed passes per precision and round
    encoder_rounds: int = 3
    decoder_archs: Tuple[str, ...] = ("vit_h", "sam_tiny", "vit_b", "vit_l", "sam2.1_hiera_tiny")  # the target's first
    decoder_rounds: int = 7
    decoder_calls: int = 10  # passes per round
    plugin_calls: int = 50
    many_boxes: int = 16
    decoder_image_hw: Tuple[int, int] = (768, 1024)
    click_arch: str = "vit_h"
    click_images: int = 4
    clicks: int = 5  # per image; the first one encodes
    click_repeats: int = 3
    click_size: int = 1024
    preannotate_arch: str = "vit_b"
    preannotate_images: int = 24
    preannotate_size: int = 1024
    preannotate_boxes: int = 4
    preannotate_rounds: int = 2
    rts_arch: str = "vit_b"
    rts_images: int = 16
    rts_size: int = 1024
    compile_arch: str = "vit_h"
    compile_backend: str = "inductor"
    compile_kinds: Tuple[str, ...] = ("box", "many_boxes")
    caps: Dict[str, float] = field(default_factory=lambda: {
        "encoder": 90, "decoder": 90, "app_click": 45, "preannotate": 75, "rts": 45,
        "decoder_compiled": 90})
    # The whole run (imports and CUDA start-up come on top, ~20 s): a part that would start with less
    # than half its cap left is skipped, and a part overruns its cap by at most one measurement.
    budget_s: float = 420.0


QUICK = Sizes(
    encoder_archs=("sam_tiny",), encoder_images=2, encoder_rounds=1,
    decoder_archs=("sam_tiny", "sam2.1_hiera_tiny"), decoder_rounds=1, decoder_calls=1, plugin_calls=3, many_boxes=4,
    decoder_image_hw=(192, 256),
    click_arch="sam_tiny", click_images=1, clicks=3, click_repeats=1, click_size=256,
    preannotate_arch="sam_tiny", preannotate_images=2, preannotate_size=256, preannotate_boxes=2,
    preannotate_rounds=1,
    rts_arch="sam_tiny", rts_images=2, rts_size=256,
    compile_arch="sam_tiny", compile_backend="eager", compile_kinds=("box",),
    caps={p: 60 for p in PARTS}, budget_s=300.0,
)


def small_or_random(arch: str, device: torch.device) -> StableSam:
    """The committed small SAM (its real weights cost the same as any) or a random ViT, each with a
    live random plugin."""
    if arch == "sam_tiny":
        model = build("sam_tiny", device=device)
        model.set_plugin(live_plugin(), "bench")
        return model
    return random_model(arch, device)


def free(device: torch.device) -> None:
    """Give back what the last part held, so the next part's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_mib(device: torch.device) -> Optional[float]:
    """The peak GPU memory allocated on ``device`` in MiB (None on CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    """Reset the peak GPU memory statistic of ``device`` (nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class CutShort(Exception):
    """A part reached its time cap; what it measured so far is kept."""


@dataclass
class Part:
    """What a part function gets: the device, the sizes, its deadline; ``results`` is filled as it
    goes, so a part that stops early (cap or error) still reports what it measured."""

    device: torch.device
    sizes: Sizes
    deadline: float
    results: Dict[str, Any] = field(default_factory=dict)
    cut: bool = False

    def over(self) -> bool:
        """True (and noted) once the cap is reached: callers stop starting new measurements."""
        if time.perf_counter() > self.deadline:
            self.cut = True
        return self.cut


# -- the parts -----------------------------------------------------------------------------------

def part_encoder(p: Part) -> None:
    """The ``encoder`` part: image encoder ms per image, fp32 and bf16, peak memory."""
    dev = p.device
    bf16 = torch.bfloat16
    for arch in p.sizes.encoder_archs:
        if p.over():
            return
        free(dev)
        reset_peak(dev)
        model = random_model(arch, dev)
        weights = round(torch.cuda.memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None
        s = model.image_size
        g = torch.Generator().manual_seed(0)
        # Encoder cost does not depend on pixel values: normalised random inputs stand in for images.
        inputs = [torch.randn((1, 3, s, s), generator=g).to(dev) for _ in range(p.sizes.encoder_images)]
        time_encoder(model, inputs[:1])  # warm-up: allocations, kernel selection
        time_encoder(model, inputs[:1], autocast=bf16)
        fp32, half, peaks = [], [], {}
        r: Dict[str, Any] = {"image_px": s, "weights_mib": weights}
        p.results[arch] = r
        for _ in range(p.sizes.encoder_rounds):
            for name, dtype, out in (("fp32", None, fp32), ("bf16", bf16, half)):
                reset_peak(dev)
                out.append(time_encoder(model, inputs, autocast=dtype))
                peaks[name] = max(peaks.get(name) or 0, peak_mib(dev) or 0) or None
            r.update({"fp32_ms": round(1e3 * statistics.median(fp32), 3), "bf16_ms": round(1e3 * statistics.median(half), 3),
                      "bf16_speedup": round(statistics.median(fp32) / statistics.median(half), 3),
                      "peak_mib_fp32": peaks["fp32"], "peak_mib_bf16": peaks["bf16"], "rounds": len(fp32)})
            if p.over():
                break
        with torch.inference_mode():
            ref = model.adapter.encode(inputs[0])[0].float()
            with torch.autocast(dev.type, dtype=bf16):
                low = model.adapter.encode(inputs[0])[0].float()
        r["bf16_rel_err"] = round(float((low - ref).norm() / ref.norm()), 5)
        r["product_policy"] = "bf16 autocast" if dev.type == "cuda" else "fp32"  # StableSam.encoder_autocast
        del model, inputs


def part_decoder(p: Part) -> None:
    """The ``decoder`` part: ms per prompt, plain SAM and Stable-SAM, per prompt kind."""
    dev = p.device
    sz = p.sizes
    for arch in sz.decoder_archs:
        if p.over():
            return
        free(dev)
        model = small_or_random(arch, dev)
        if arch == "sam_tiny":
            image = np.asarray(Image.open(EXAMPLE).convert("RGB"))
            predictor = StableSamPredictor(model)
            predictor.set_image(image)
            h, w = image.shape[:2]
        else:  # the decoder's cost does not depend on the embedding's values
            h, w = sz.decoder_image_hw
            predictor = random_features_predictor(model, h, w)
        r: Dict[str, Any] = {"image_hw": [h, w], "many_boxes": sz.many_boxes, "kinds": {}}
        p.results[arch] = r
        prompts = interactive_prompts(h, w, sz.many_boxes)
        for kind, prompt in prompts.items():
            if p.over():
                break
            r["kinds"][kind] = compare_decoders(predictor, [prompt], sz.decoder_rounds, sz.decoder_calls, p.deadline)
        if not p.over():  # what batching buys: the same boxes, one decoder call each
            one_each = [dict(box=b) for b in prompts["many_boxes"]["box"]]
            r["kinds"]["many_boxes_one_per_call"] = compare_decoders(
                predictor, one_each, sz.decoder_rounds, max(1, sz.decoder_calls // 4), p.deadline)
            r["batching_speedup"] = round(r["kinds"]["many_boxes_one_per_call"]["sam_ms"]
                                          / r["kinds"]["many_boxes"]["sam_ms"], 3)
        r.update(time_plugin_parts(model.plugin, model.adapter.grid_hw, dev, sz.plugin_calls))
        del model, predictor


def part_decoder_compiled(p: Part) -> None:
    """Eager, then ``torch.compile`` of the mask decoder (the plugin runs inside it, from its hook)
    and of the plugin, on the same model and prompts."""
    dev = p.device
    sz = p.sizes
    free(dev)
    model = small_or_random(sz.compile_arch, dev)
    h, w = sz.decoder_image_hw
    predictor = random_features_predictor(model, h, w)
    prompts = {k: v for k, v in interactive_prompts(h, w, sz.many_boxes).items() if k in sz.compile_kinds}
    p.results.update({"arch": sz.compile_arch, "backend": sz.compile_backend, "many_boxes": sz.many_boxes,
                      "eager": {}, "compiled": {}, "compile_s": {}, "max_logit_diff": {}})
    eager_logits = {}
    for kind, prompt in prompts.items():
        p.results["eager"][kind] = compare_decoders(predictor, [prompt], sz.decoder_rounds, sz.decoder_calls)
        eager_logits[kind] = [predictor.predict(use_plugin=use, **prompt).low_res_logits for use in (False, True)]
    from torch._dynamo.utils import counters

    counters.clear()
    model.adapter.mask_decoder.compile(backend=sz.compile_backend, dynamic=False)
    model.plugin.compile(backend=sz.compile_backend, dynamic=False)
    for kind, prompt in prompts.items():
        if p.over():
            return
        t = time.perf_counter()
        # The first calls compile (a graph per path and prompt shape); their outputs must be the
        # eager ones, and the plugin must still change them (a graph that dropped the hook would not).
        compiled_logits = [predictor.predict(use_plugin=use, **prompt).low_res_logits for use in (False, True)]
        sync(dev)
        p.results["compile_s"][kind] = round(time.perf_counter() - t, 2)
        p.results["max_logit_diff"][kind] = {
            "sam": round(float(np.abs(compiled_logits[0] - eager_logits[kind][0]).max()), 5),
            "stable_sam": round(float(np.abs(compiled_logits[1] - eager_logits[kind][1]).max()), 5),
            "plugin_vs_plain": round(float(np.abs(compiled_logits[1] - compiled_logits[0]).max()), 5)}
        p.results["graphs"] = int(counters["stats"]["unique_graphs"])
        p.results["graph_breaks"] = int(sum(counters["graph_break"].values()))
        c = compare_decoders(predictor, [prompt], sz.decoder_rounds, sz.decoder_calls, p.deadline)
        e = p.results["eager"][kind]
        c["speedup_sam"] = round(e["sam_ms"] / c["sam_ms"], 3)
        c["speedup_stable_sam"] = round(e["stable_sam_ms"] / c["stable_sam_ms"], 3)
        p.results["compiled"][kind] = c


def click_scenes(sz: Sizes) -> List[Tuple[np.ndarray, List[np.ndarray]]]:
    """``sz.click_images`` + 1 generated scenes with two objects or more, as (image, masks); the
    first is the warm-up image, outside the timed sessions."""
    scenes = SyntheticScenes(seed=BENCH_SEED + 1, size=sz.click_size)
    images: List[Tuple[np.ndarray, List[np.ndarray]]] = []
    i = 0
    while len(images) < sz.click_images + 1:
        s = scenes[i]
        i += 1
        if len(s.masks) >= 2:
            images.append((s.image, s.masks))
    return images


@dataclass
class ClickTimes:
    """Seconds of the first click of each image (it encodes), of each cached click through the app
    and of the same click on the bare predictor; and the bare masks' runs per row."""

    first: List[float] = field(default_factory=list)
    cached: List[float] = field(default_factory=list)
    direct: List[float] = field(default_factory=list)
    runs: List[float] = field(default_factory=list)


def time_cached_clicks(timer: ClickTimer, times: ClickTimes, k: int, session: List[List[dict]],
                       size: Tuple[int, int], repeats: int) -> None:
    """Each click of ``session`` (image ``k``'s, after its first) ``repeats`` times, through the app
    and bare, added to ``times``."""
    for regions in session:
        for n in range(repeats):
            if n % 2:  # alternate the order, so neither side always runs right after the other
                times.cached.append(timer.post(k, regions))
                times.direct.append(timer.bare(regions, size)[0])
            else:
                d, out = timer.bare(regions, size)
                times.direct.append(d)
                times.cached.append(timer.post(k, regions))
                # runs per mask row: what the brush RLE costs grows with (random weights make
                # ragged masks; a real SAM's masks have a few runs per row)
                times.runs.append(float(np.abs(np.diff(out.masks[0].astype(np.int8), axis=1)).sum()
                                        / out.masks.shape[1]))


def part_app_click(p: Part) -> None:
    """The ``app_click`` part: a cached click through the Flask app against the bare predictor."""
    from backend.app import create_app
    from backend.ml_backend import StableSamBackend
    from backend.server_settings import BackendSettings

    dev = p.device
    sz = p.sizes
    free(dev)
    tmp = Path(tempfile.mkdtemp(prefix="device-report-app-"))
    images = click_scenes(sz)
    for k, (image, _) in enumerate(images):
        Image.fromarray(image).save(tmp / f"img{k}.png")
    settings = BackendSettings.from_env()
    settings = BackendSettings(**{**settings.__dict__, "local_files_root": tmp.resolve(), "model_dir": tmp / "models"})
    model = small_or_random(sz.click_arch, dev)
    backend = StableSamBackend(settings, model=model)
    timer = ClickTimer(create_app(backend=backend).test_client(), StableSamPredictor(model), tmp,
                       recommended_config(), dev)

    times = ClickTimes()
    calls_before = None
    for k, (image, masks) in enumerate(images):
        size = (image.shape[1], image.shape[0])
        session = click_session(masks, [mask_to_box(m) for m in masks], size, sz.clicks)
        first_s = timer.post(k, session[0])
        timer.predictor.set_image(image)  # a cache hit: the backend encoded it
        if k == 0:  # warm-up image: first-call allocations, lazy inits
            for regions in session[1:]:
                timer.post(k, regions)
                timer.bare(regions, size)
            calls_before = model.encoder_calls
            continue
        times.first.append(first_s)
        time_cached_clicks(timer, times, k, session[1:], size, sz.click_repeats)
        p.results.update({
            "arch": sz.click_arch, "images": len(times.first), "clicks": len(times.cached),
            "cached_click": percentiles_ms(times.cached), "predictor": percentiles_ms(times.direct),
            "first_click_encodes": percentiles_ms(times.first),
            "ratio_p50": round(float(np.percentile(times.cached, 50) / np.percentile(times.direct, 50)), 3),
            "encoder_calls": model.encoder_calls - calls_before,
            "mask_runs_per_row": round(float(np.mean(times.runs)), 2),
        })
        if p.over():
            return


def part_preannotate(p: Part) -> None:
    """The ``preannotate`` part: the offline job's images per second against the encoder's limit."""
    dev = p.device
    sz = p.sizes
    free(dev)
    t = time.perf_counter()
    folder = generated_folder(sz.preannotate_images, size=sz.preannotate_size, max_boxes=sz.preannotate_boxes,
                              prefix="device-report-pre-")
    generate_s = time.perf_counter() - t
    model = small_or_random(sz.preannotate_arch, dev)
    paths = [it.path for it in folder.work.items]
    warm = dataclasses.replace(folder.work, items=folder.work.items[:2])
    time_encoder(model, preprocessed_inputs(model, paths[:2]), default_policy=True)
    time_job(model, warm, folder.root / "warm.json", threaded=True)
    variants: Dict[str, List[float]] = {"encoder": [], "encode_ahead_stream": [], "encode_ahead": [], "serial": []}
    stages: List[Dict[str, float]] = []
    outputs: Dict[str, bytes] = {}
    inputs = preprocessed_inputs(model, paths)
    for r in range(sz.preannotate_rounds):
        order = list(variants)
        order = order[r % len(order):] + order[:r % len(order)]
        for what in order:
            if what == "encoder":
                variants[what].append(1.0 / time_encoder(model, inputs, default_policy=True))
                continue
            out = folder.root / f"{what}.json"
            s = time_job(model, folder.work, out, threaded=what != "serial",
                         encoder_stream=what == "encode_ahead_stream")
            variants[what].append(s.images_per_s)
            if what == "encode_ahead_stream":
                stages.append({k: v / s.processed for k, v in s.stage_s.items()})
            outputs[what] = out.read_bytes()
        limit = statistics.median(variants["encoder"])
        p.results.update({
            "arch": sz.preannotate_arch, "images": len(paths), "image_px": sz.preannotate_size,
            "boxes_per_image": round(folder.boxes / len(paths), 2), "generate_s": round(generate_s, 3),
            "encoder_limit_images_per_s": round(limit, 3),
            **{f"{k}_images_per_s": round(statistics.median(v), 3) for k, v in variants.items() if k != "encoder"},
            **{f"{k}_ratio": round(statistics.median(v) / limit, 3) for k, v in variants.items() if k != "encoder"},
            "stage_ms_per_image": {k: round(1e3 * statistics.median(st[k] for st in stages), 2) for k in stages[0]},
            "identical_output": len(set(outputs.values())) == 1, "rounds": r + 1,
        })
        if p.over():
            return


def part_rts(p: Part) -> None:
    """The ``rts`` part: one RTS epoch, seconds per image."""
    dev = p.device
    sz = p.sizes
    free(dev)
    t = time.perf_counter()
    data = generated_samples(sz.rts_images, sz.rts_size)
    generate_s = time.perf_counter() - t
    model = small_or_random(sz.rts_arch, dev)
    model.cache = EmbeddingCache(max_mb=4096)  # each image is encoded once, as in the backend's job
    cfg = RTSConfig(probe_images=0)  # the epoch alone: no probe loss before and after
    steps_done = [0]

    def on_step(step: int, steps: int, loss: Optional[float]) -> None:
        steps_done[0] = step
        if p.over():
            raise CutShort()

    sync(dev)
    t = time.perf_counter()
    try:
        _, summary = train_plugin(model, data, cfg, progress=False, log=lambda s: None, on_step=on_step)
        images = summary["images"]
    except CutShort:
        images = steps_done[0] * cfg.images_per_step
    sync(dev)
    seconds = time.perf_counter() - t
    p.results.update({"arch": sz.rts_arch, "images": images, "image_px": sz.rts_size, "seconds": round(seconds, 3),
                      "s_per_image": round(seconds / max(images, 1), 4), "generate_s": round(generate_s, 3),
                      "prompts_per_object": cfg.prompts_per_object, "images_per_step": cfg.images_per_step})


PART_FUNCTIONS: Dict[str, Callable[[Part], None]] = {
    "encoder": part_encoder, "decoder": part_decoder, "app_click": part_app_click, "preannotate": part_preannotate,
    "rts": part_rts, "decoder_compiled": part_decoder_compiled,
}


# -- the run -------------------------------------------------------------------------------------

def device_info(device: torch.device) -> Dict[str, Any]:
    """The device, torch and Python versions (and the GPU's name and memory)."""
    info: Dict[str, Any] = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                     "bf16_supported": torch.cuda.is_bf16_supported(),
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def run_report(device: torch.device, sizes: Sizes, out: Path, parts: Tuple[str, ...] = PARTS,
               quick: bool = False) -> Dict[str, Any]:
    """Run ``parts`` in order; the report is written to ``out`` before each part and at the end."""
    start = time.perf_counter()
    report: Dict[str, Any] = {
        "report": "device_report", "quick": quick, "device": device_info(device),
        "started_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "budget_s": sizes.budget_s, "running": None, "complete": False,
        "sizes": {k: v for k, v in dataclasses.asdict(sizes).items()}, "parts": {},
    }
    for name in parts:
        cap = float(sizes.caps[name])
        left = sizes.budget_s - (time.perf_counter() - start)
        if left < cap / 2:
            report["parts"][name] = {"status": "skipped", "reason": f"{left:.0f} s of the run's budget left, cap {cap:.0f} s"}
            continue
        report["running"] = name
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        atomic_write_json(report, out)
        t = time.perf_counter()
        part = Part(device, sizes, deadline=t + min(cap, left))
        entry: Dict[str, Any] = {"cap_s": cap}
        try:
            PART_FUNCTIONS[name](part)
            entry["status"] = "cut_short" if part.cut else "ok"
        except Exception as e:  # a failed part must not cost the rest of a scarce GPU run
            entry.update({"status": "error", "error": f"{e.__class__.__name__}: {e}",
                          "traceback": traceback.format_exc(limit=6)})
        entry["seconds"] = round(time.perf_counter() - t, 2)
        entry["results"] = part.results
        report["parts"][name] = entry
        print(f"[{name}] {entry['status']} in {entry['seconds']:.1f} s", file=sys.stderr, flush=True)
    report["running"] = None
    report["targets"] = targets(report)
    report["complete"] = True
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    atomic_write_json(report, out)
    return report


def targets(report: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The issue's targets on a GPU, read off the figures: value, target and whether it is met
    (None where the run did not measure it, e.g. a quick run without ViT-H)."""
    parts = {k: v.get("results") or {} for k, v in report["parts"].items()}
    dec = parts.get("decoder", {}).get("vit_h", {}).get("kinds", {})
    ratios = {k: v["ratio"] for k, v in dec.items() if k != "many_boxes_one_per_call"}
    app = parts.get("app_click", {})
    app = app if app.get("arch") == "vit_h" else {}
    pre = parts.get("preannotate", {})
    pre = pre if pre.get("arch") == "vit_b" and "encode_ahead_stream_ratio" in pre else {}

    def entry(value: Any, target: str, met: Optional[bool]) -> Dict[str, Any]:
        return {"value": value, "target": target, "met": met}

    return {
        "decoder_ratio_vit_h": entry(ratios or None, "Stable-SAM / SAM <= 1.05 for every prompt kind",
                                     all(r <= 1.05 for r in ratios.values()) if ratios else None),
        "app_click_ratio_vit_h": entry(app.get("ratio_p50"), "cached click p50 <= 1.3 x the bare predictor",
                                       app["ratio_p50"] <= 1.3 if app else None),
        "app_click_p50_ms_vit_h": entry(app.get("cached_click", {}).get("p50_ms"), "<= 30 ms",
                                        app["cached_click"]["p50_ms"] <= 30 if app else None),
        "preannotate_ratio_vit_b": entry(pre.get("encode_ahead_stream_ratio"), ">= 0.9 x the encoder's own limit",
                                         max(pre["encode_ahead_stream_ratio"], pre["encode_ahead_ratio"]) >= 0.9
                                         if pre else None),
    }


# -- the table -----------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(report: Dict[str, Any]) -> str:
    """The report as Markdown tables, one per part."""
    d = report["device"]
    lines = [f"device: {d.get('name')} ({d['type']}), torch {d['torch']}, quick={report['quick']}, "
             f"elapsed {report.get('elapsed_s')} s"]
    for name, t in (report.get("targets") or {}).items():
        lines.append(f"target {name}: {t['target']}; value {t['value']}; met {t['met']}")
    for name, entry in report["parts"].items():
        lines.append("")
        lines.append(f"## {name}: {entry['status']}" + (f" ({entry.get('seconds')} s)" if "seconds" in entry else ""))
        if entry["status"] in ("error", "skipped"):
            lines.append(entry.get("error") or entry.get("reason", ""))
        r = entry.get("results") or {}
        if name == "encoder":
            lines += ["| arch | fp32 ms/image | bf16 ms/image | speedup | peak MiB fp32 / bf16 | bf16 rel. error |",
                      "|---|---|---|---|---|---|"]
            for arch, a in r.items():
                lines.append(f"| {arch} | {_fmt(a.get('fp32_ms'))} | {_fmt(a.get('bf16_ms'))} | {_fmt(a.get('bf16_speedup'))} | "
                             f"{_fmt(a.get('peak_mib_fp32'))} / {_fmt(a.get('peak_mib_bf16'))} | {_fmt(a.get('bf16_rel_err'))} |")
        elif name in ("decoder", "decoder_compiled"):
            lines += ["| model | prompt | plain SAM ms/prompt | Stable-SAM ms/prompt | ratio |", "|---|---|---|---|---|"]
            rows = ([(arch, a.get("kinds", {})) for arch, a in r.items()] if name == "decoder"
                    else [(f"{r.get('arch')} {mode}", r.get(mode, {})) for mode in ("eager", "compiled")])
            for label, kinds in rows:
                for kind, k in kinds.items():
                    lines.append(f"| {label} | {kind} | {_fmt(k['sam_ms'])} | {_fmt(k['stable_sam_ms'])} | {k['ratio']:.3f} |")
        elif name == "app_click" and r:
            lines.append(f"{r['arch']}: cached click p50 {_fmt(r['cached_click']['p50_ms'])} / p95 "
                         f"{_fmt(r['cached_click']['p95_ms'])} ms; bare predictor p50 {_fmt(r['predictor']['p50_ms'])} / "
                         f"p95 {_fmt(r['predictor']['p95_ms'])} ms; ratio (p50) {r['ratio_p50']}; "
                         f"encoder calls {r['encoder_calls']} for {r['images']} images")
        elif r:
            lines.append(json.dumps({k: v for k, v in r.items()}))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the report (``--help``): each part in turn, the JSON written after each."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N, cpu")
    ap.add_argument("--quick", action="store_true", help="every part on tiny sizes (CI; the figures mean nothing)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "device_report.json")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="the whole run's time budget (default 420; quick 300)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile part")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = QUICK if args.quick else Sizes()
    if args.budget_s is not None:
        sizes = dataclasses.replace(sizes, budget_s=args.budget_s)
    parts = tuple(x for x in args.parts.split(",") if x)
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if args.no_compile:
        parts = tuple(x for x in parts if x != "decoder_compiled")
    if device.type != "cuda" and not args.quick:
        print("warning: not a CUDA device and not --quick: the full sizes take long on a CPU", file=sys.stderr)
    report = run_report(device, sizes, args.out, parts, quick=args.quick)
    print(table(report))
    print(f"written to {args.out}")
    if args.json:
        print(json.dumps(report))
    return report


def console() -> None:
    """The console script ``stable-sam-device-report`` (``main`` returns the report, not an exit status)."""
    main()


if __name__ == "__main__":
    main()
