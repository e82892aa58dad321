"""Benchmark: the offline pre-annotation job's throughput against the image encoder's own limit.

A folder of synthetic scenes (PNG or JPEG) with a rough box per object (DN-DETR noise s = 0.2) in a
COCO JSON is generated; then, on the same images and in the same process, each round measures:

- the encoder alone: ``sam.image_encoder`` on each preprocessed image (nothing else timed), giving
  ``encoder_limit_images_per_s`` = 1 / mean encoder seconds per image: no job can beat it;
- the offline job as the CLI runs it (reader thread, encoder thread, decoder + RLE + journal in the
  main thread), from the first read to the COCO JSON written, with an empty embedding cache;
- the same job with no background threads (serial), to show what the overlap buys.

Rounds rotate the order of the three; figures are medians over rounds. ``ratio`` =
images_per_s / encoder_limit_images_per_s (target >= 0.9). The job's stage times (busy seconds of
the read, encode and decode stages, and the decode stage's wait for the encoder) say where the
time goes. The serial and threaded jobs must write byte-identical COCO files (checked).

    python scripts/bench_preannotate.py [--images 40] [--rounds 3] [--threads 1] [--format png] [--json]

Last line with --json: {"images_per_s", "encoder_limit_images_per_s", "ratio", ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from stable_sam.timing import add_folder_args, generated_work, preprocessed_inputs, time_job
from stable_sam.timing import time_encoder as bench_time_encoder
from stable_sam.builders import MODEL_TYPES, build, build_sam, resolve_device
from stable_sam.model import StableSam
from stable_sam.modeling.plugin import StableSamPlugin
from stable_sam.preannotation import WorkList


def time_encoder(model, paths) -> float:
    """Mean seconds of the image encoder's forward per image (images read and preprocessed first),
    under the model's own precision policy."""
    return bench_time_encoder(model, preprocessed_inputs(model, paths), default_policy=True)


def parse_args() -> argparse.Namespace:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_folder_args(ap, images=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of every stage (and of the encoder alone); 0: torch's default")
    ap.add_argument("--model-type", choices=MODEL_TYPES, default="sam_tiny")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--random-weights", action="store_true",
                    help="SAM of --model-type with random weights (timing only: e.g. ViT-B on a GPU without "
                         "its checkpoint; masks are meaningless, costs are real)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    return ap.parse_args()


def load_model(args: argparse.Namespace) -> StableSam:
    """The model ``args`` name: ``--model-type`` with its weights, or random ones (``--random-weights``)."""
    if args.random_weights:
        return StableSam(build_sam(args.model_type, None), StableSamPlugin(), args.model_type,
                         f"{args.model_type}-random", resolve_device(args.device))
    return build(args.model_type, sam_checkpoint=args.checkpoint, device=args.device)


@dataclass
class Rounds:
    """Per round: the encoder's seconds per image, the threaded and serial jobs' images per second,
    the threaded job's stage seconds per image; the last COCO file each job wrote."""

    encoder: List[float] = field(default_factory=list)
    threaded: List[float] = field(default_factory=list)
    serial: List[float] = field(default_factory=list)
    stages: List[Dict[str, float]] = field(default_factory=list)
    outputs: Dict[str, bytes] = field(default_factory=dict)

    def medians(self) -> Tuple[float, float, float]:
        """(encoder seconds per image, threaded and serial job images per second): medians over rounds."""
        return statistics.median(self.encoder), statistics.median(self.threaded), statistics.median(self.serial)


def measure_rounds(model: StableSam, work: WorkList, tmp: Path, rounds: int) -> Rounds:
    """``rounds`` rounds of the encoder alone, the threaded job and the serial job, in an order
    that rotates each round."""
    paths = [it.path for it in work.items]
    r = Rounds()
    for i in range(rounds):
        order = ["encoder", "threaded", "serial"]
        order = order[i % 3:] + order[:i % 3]
        for what in order:
            if what == "encoder":
                r.encoder.append(time_encoder(model, paths))
            else:
                out = tmp / f"{what}.json"
                s = time_job(model, work, out, threaded=what == "threaded")
                (r.threaded if what == "threaded" else r.serial).append(s.images_per_s)
                if what == "threaded":
                    r.stages.append({k: v / s.processed for k, v in s.stage_s.items()})
                r.outputs[what] = out.read_bytes()
    return r


def figures(args: argparse.Namespace, model: StableSam, r: Rounds, boxes: int) -> Dict[str, object]:
    """The medians over rounds and what they imply (the ``--json`` line)."""
    enc_s, ips, ips_serial = r.medians()
    limit = 1.0 / enc_s
    stage_ms = {k: round(1e3 * statistics.median(st[k] for st in r.stages), 2) for k in r.stages[0]}
    return {
        "images_per_s": round(ips, 3), "encoder_limit_images_per_s": round(limit, 3), "ratio": round(ips / limit, 3),
        "serial_images_per_s": round(ips_serial, 3), "serial_ratio": round(ips_serial / limit, 3),
        "encoder_ms": round(1e3 * enc_s, 2), "stage_ms_per_image": stage_ms,
        # what the decode stage (decoder + RLE + journal, main thread) alone allows: the job's other bound
        "decode_stage_limit_images_per_s": round(1e3 / stage_ms["decode_rle_write"], 3),
        "boxes_per_image": round(boxes / args.images, 2), "images": args.images, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "device": str(model.device), "model": model.version,
        "identical_output": r.outputs["threaded"] == r.outputs["serial"],
    }


def print_report(result: Dict[str, object], r: Rounds) -> None:
    """The figures, one line each."""
    enc_s, ips, ips_serial = r.medians()
    limit = 1.0 / enc_s
    print(f"encoder alone:        {1e3 * enc_s:7.2f} ms/image -> limit {limit:6.2f} images/s")
    print(f"offline job, threads: {ips:7.2f} images/s  ratio {result['ratio']:.3f} (target >= 0.9)")
    print(f"offline job, serial:  {ips_serial:7.2f} images/s  ratio {result['serial_ratio']:.3f}")
    print(f"decode stage alone allows {result['decode_stage_limit_images_per_s']:.2f} images/s")
    print("job stages, ms per image (busy time; 'waited_for_encoder' = decode stage idle): "
          + ", ".join(f"{k} {v}" for k, v in result["stage_ms_per_image"].items()))
    print(f"threaded and serial outputs byte-identical: {result['identical_output']}")


def main() -> None:
    """Run the benchmark (``--help``) and print its figures."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp, work, boxes = generated_work(args, "bench-preannotate-")
    model = load_model(args)
    print(f"model {model.version} on {model.device}, {torch.get_num_threads()} torch thread(s) per stage; "
          f"{args.images} {args.format.upper()} images, {boxes} rough boxes ({boxes / args.images:.2f} per image)")

    # warm-up: first-call allocations, lazy inits, the OS file cache
    time_encoder(model, [it.path for it in work.items[:3]])
    time_job(model, dataclasses.replace(work, items=work.items[:3]), tmp / "warm.json", threaded=True)

    r = measure_rounds(model, work, tmp, args.rounds)
    result = figures(args, model, r, boxes)
    print_report(result, r)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
