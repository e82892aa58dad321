"""Benchmark: the offline pre-annotation job on Ray (1 and 2 workers) next to the single-process job.

The same generated folder as ``bench_preannotate.py`` (synthetic scenes, a rough box per object in
a COCO JSON). In one run, on the same images, each round measures:

- ``single``: the single-machine job as the CLI runs it (reader + encoder threads, decoder in the
  main thread; empty embedding cache), from the first read to the COCO JSON written;
- ``ray_1`` and ``ray_2``: ``run_offline_ray`` on a local Ray cluster started by this script
  (``ray.init(num_cpus=--cpus)``), 1 and 2 workers of 1 CPU each. Steady state: from the first
  shard sent (every worker's model loaded) to the COCO JSON written; start-up (actors started and
  models loaded) is reported on its own, and so is ``ray.init`` (once per run).

Rounds rotate the order; figures are medians. Every job must write byte-identical COCO files
(checked). Torch runs 1 thread per stage everywhere (``--threads``).

    python scripts/bench_ray.py [--images 64] [--rounds 3] [--shard-size 16] [--cpus 2] [--json]

Last line with --json: {"single_images_per_s", "ray_1_images_per_s", "ray_2_images_per_s", ...}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from stable_sam.timing import add_folder_args, generated_work, time_job
from stable_sam.builders import MODEL_TYPES, build
from stable_sam.model import StableSam
from stable_sam.preannotation import WorkList
from stable_sam.preannotation.ray_job import run_offline_ray


def parse_args() -> argparse.Namespace:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_folder_args(ap, images=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per stage, in every job")
    ap.add_argument("--model-type", choices=MODEL_TYPES, default="sam_tiny")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    return ap.parse_args()


@dataclass
class Rounds:
    """Per job (``single``, ``ray_1``, ``ray_2``): images per second of each round; the Ray jobs'
    start-up seconds; the last COCO file each job wrote."""

    runs: Dict[str, List[float]] = field(default_factory=lambda: {"single": [], "ray_1": [], "ray_2": []})
    startup: Dict[str, List[float]] = field(default_factory=lambda: {"ray_1": [], "ray_2": []})
    outputs: Dict[str, bytes] = field(default_factory=dict)

    def medians(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(images per second per job, start-up seconds per Ray job): medians over rounds."""
        return ({k: statistics.median(v) for k, v in self.runs.items()},
                {k: statistics.median(v) for k, v in self.startup.items()})


def measure_rounds(args: argparse.Namespace, model: StableSam, factory: Callable[..., StableSam], work: WorkList,
                   tmp: Path) -> Rounds:
    """``args.rounds`` rounds of the single-process job and the Ray jobs on 1 and 2 workers, in an
    order that rotates each round."""
    r = Rounds()
    for i in range(args.rounds):
        order = list(r.runs)
        order = order[i % 3:] + order[:i % 3]
        for what in order:
            out = tmp / f"{what}.json"
            if what == "single":
                summary = time_job(model, work, out, threaded=True)
            else:
                summary = run_offline_ray(factory, work, out, fresh=True, workers=int(what[-1]), use_gpu=False,
                                          shard_size=args.shard_size, threads=args.threads, progress=False)
                if summary.failed or summary.processed != len(work.items):
                    raise RuntimeError(f"the Ray job failed on {summary.failed}")
                r.startup[what].append(summary.startup_s)
            r.runs[what].append(summary.images_per_s)
            r.outputs[what] = out.read_bytes()
    return r


def figures(args: argparse.Namespace, model: StableSam, r: Rounds, boxes: int, ray_init_s: float) -> Dict[str, object]:
    """The medians over rounds and what they imply (the ``--json`` line)."""
    ips, up = r.medians()
    return {
        "single_images_per_s": round(ips["single"], 3),
        "ray_1_images_per_s": round(ips["ray_1"], 3), "ray_2_images_per_s": round(ips["ray_2"], 3),
        "ray_1_vs_single": round(ips["ray_1"] / ips["single"], 3),
        "ray_2_vs_ray_1": round(ips["ray_2"] / ips["ray_1"], 3),
        "ray_2_vs_single": round(ips["ray_2"] / ips["single"], 3),
        "ray_init_s": round(ray_init_s, 2),
        "ray_1_startup_s": round(up["ray_1"], 2), "ray_2_startup_s": round(up["ray_2"], 2),
        # what a whole run of these images costs, start-up included (ray.init not included)
        "ray_1_end_to_end_images_per_s": round(args.images / (up["ray_1"] + args.images / ips["ray_1"]), 3),
        "ray_2_end_to_end_images_per_s": round(args.images / (up["ray_2"] + args.images / ips["ray_2"]), 3),
        "images": args.images, "boxes_per_image": round(boxes / args.images, 2), "rounds": args.rounds,
        "shard_size": args.shard_size, "cpus": args.cpus, "os_cpus": os.cpu_count(), "threads": args.threads,
        "model": model.version, "identical_output": len(set(r.outputs.values())) == 1,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def print_report(result: Dict[str, object], r: Rounds, ray_init_s: float) -> None:
    """The figures, one line each."""
    ips, up = r.medians()
    print(f"ray.init: {ray_init_s:.2f} s (once)")
    print(f"single process:  {ips['single']:7.2f} images/s")
    for w in (1, 2):
        k = f"ray_{w}"
        print(f"Ray, {w} worker(s): {ips[k]:7.2f} images/s steady state ({ips[k] / ips['single']:.3f} x single), "
              f"start-up {up[k]:.2f} s, {result[k + '_end_to_end_images_per_s']:.2f} images/s with it")
    print(f"2 workers vs 1: {result['ray_2_vs_ray_1']:.3f} x; outputs byte-identical: {result['identical_output']}")


def main() -> None:
    """Run the benchmark (``--help``) and print its figures."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    import ray

    tmp, work, boxes = generated_work(args, "bench-ray-")
    model = build(args.model_type, sam_checkpoint=args.checkpoint, device="cpu")
    factory = functools.partial(build, args.model_type, sam_checkpoint=args.checkpoint)
    print(f"model {model.version} on cpu, {args.threads} torch thread(s) per stage; {args.images} "
          f"{args.format.upper()} images, {boxes} rough boxes ({boxes / args.images:.2f} per image); "
          f"load average {os.getloadavg()[0]:.2f}")

    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t

    # warm-up: first-call allocations, the OS file cache, Ray's worker processes
    time_job(model, work, tmp / "warm.json", threaded=True)
    r = measure_rounds(args, model, factory, work, tmp)
    ray.shutdown()

    result = figures(args, model, r, boxes, ray_init_s)
    print_report(result, r, ray_init_s)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
