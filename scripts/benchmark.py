"""The paper's benchmark: plain SAM and Stable-SAM on the same seeded prompts, side by side.

    python scripts/benchmark.py                      # docs/benchmarks.md table: committed small SAM and
                                                     # plugin, held-out synthetic scenes
    python scripts/benchmark.py --json               # ... and one JSON object as the last line
    python scripts/benchmark.py --model-type vit_l --checkpoint sam_vit_l_0b3195.pth \\
        --plugin my_plugin.pt --dataset DIS5K/DIS-VD --device cuda      # real SAM, HQ data

Prompt types: GT box, noisy box s=0.2 / 0.4, 1 point, 3 points; 20 seeded prompts per object and
type; mIoU, mBIoU (band 0.02 of the diagonal), stability. ``--variant NAME=PLUGIN.pt`` adds rows
(ablations). Writes a JSON file and a PNG of a few cases (image + prompt, SAM, Stable-SAM).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from stable_sam.builders import MODEL_TYPES, build
from stable_sam.checkpoint import PluginCheckpoint, load_plugin
from stable_sam.data.dataset import DatasetError, SegmentationDataset
from stable_sam.data.sources import is_generated, open_dataset
from stable_sam.download import CheckpointError
from stable_sam.evaluation import (ALL_TYPES, PROMPT_TYPES, BenchmarkResult, ProtocolConfig, evaluate,
                                   side_by_side_table, size_table, targets_report, variants_table)
from stable_sam.figures import comparison_figure
from stable_sam.model import StableSam
from stable_sam.modeling.plugin import StableSamPlugin, count_trainable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLUGIN = ROOT / "checkpoints" / "plugin_sam_tiny_rts.pt"
DEFAULT_HELDOUT_IMAGES = 40
# Held-out scenes from 1000 on: the small SAM's pretraining monitored 0..47 of the held-out seed.
DEFAULT_SYNTHETIC_START = 1000


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic:heldout",
                    help="synthetic:heldout | regions:heldout | regions:unseen | a folder of images + mask PNGs | "
                         "a COCO instances .json | a Label Studio JSON export")
    ap.add_argument("--image-root", type=Path, default=None, help="where the images of a .json dataset are")
    ap.add_argument("--masks-dir", type=Path, default=None, help="mask folder of a folder dataset")
    ap.add_argument("--start", type=int, default=None,
                    help=f"first image index (default {DEFAULT_SYNTHETIC_START} for synthetic, else 0)")
    ap.add_argument("--images", type=int, default=None,
                    help=f"number of images (default: all; {DEFAULT_HELDOUT_IMAGES} for synthetic)")
    ap.add_argument("--model-type", default="sam_tiny", choices=MODEL_TYPES)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="SAM weights (default: the committed small SAM, or the official file for vit_*)")
    ap.add_argument("--model-dir", type=Path, default=None, help="where official SAM weights are kept")
    ap.add_argument("--plugin", type=Path, default=DEFAULT_PLUGIN, help="Stable-SAM plugin checkpoint")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PLUGIN.pt",
                    help="another plugin evaluated on the same prompts (a row of the ablation table)")
    ap.add_argument("--prompts", type=int, default=20, help="random prompts per object and type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", default=",".join(PROMPT_TYPES), help=f"comma-separated, from {ALL_TYPES}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: on a shared CPU, threads that contend are many "
                         "times slower (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark.json")
    ap.add_argument("--figure", type=Path, default=ROOT / "runs" / "benchmark.png")
    ap.add_argument("--cases", type=int, default=3, help="cases per figure prompt type")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return ap.parse_args(argv)


@dataclass
class Inputs:
    """What a run evaluates: the protocol, the dataset, the model, and the plugins by row name
    (``sam``: none, ``stable_sam``: ``--plugin``, then the ``--variant`` ones) with their versions."""

    cfg: ProtocolConfig
    dataset: SegmentationDataset
    model: StableSam
    main_plugin: PluginCheckpoint
    plugins: Dict[str, Optional[StableSamPlugin]]
    versions: Dict[str, str]


def load_inputs(args: argparse.Namespace, variants: Dict[str, str]) -> Inputs:
    """The protocol, dataset, model and plugins ``args`` name. Raises ``DatasetError``,
    ``CheckpointError``, ``ValueError`` or ``RuntimeError`` on bad input."""
    cfg = ProtocolConfig(prompts_per_object=args.prompts, seed=args.seed,
                         prompt_types=tuple(t.strip() for t in args.types.split(",") if t.strip()),
                         figure_cases=args.cases)
    synthetic = is_generated(args.dataset)
    limit = args.images if args.images is not None else (DEFAULT_HELDOUT_IMAGES if synthetic else None)
    start = args.start if args.start is not None else (DEFAULT_SYNTHETIC_START if synthetic else 0)
    dataset = open_dataset(args.dataset, image_root=args.image_root, masks_dir=args.masks_dir,
                           limit=limit, start=start)
    model = build(args.model_type, sam_checkpoint=args.checkpoint, device=args.device,
                  model_dir=args.model_dir)
    main_plugin = load_plugin(args.plugin, model_type=args.model_type)
    plugins: Dict[str, Optional[StableSamPlugin]] = {"sam": None, "stable_sam": main_plugin.plugin}
    versions = {"stable_sam": main_plugin.version}
    for name, path in variants.items():
        loaded = load_plugin(Path(path), model_type=args.model_type)
        plugins[name], versions[name] = loaded.plugin, loaded.version
    return Inputs(cfg, dataset, model, main_plugin, plugins, versions)


def print_report(result: BenchmarkResult, inputs: Inputs, summary: dict, by_size: dict,
                 targets: List[dict]) -> None:
    """The tables: side by side, by object size, the variants, alpha_1 and offsets, the targets."""
    print(f"\n{result.images} images, {result.objects} objects, {inputs.cfg.prompts_per_object} prompts per object "
          f"and type, {result.seconds:.0f} s\n")
    print(side_by_side_table(summary))
    print("\nmIoU by object size (COCO: small < 32^2 px, medium < 96^2, large):\n" + size_table(by_size))
    if len(inputs.plugins) > 2:
        labels = {"sam": "SAM (no plugin)", "stable_sam": "Stable-SAM (default)"}
        print("\n" + variants_table(summary, labels))
    print("\nmean alpha_1 (the deformed path's weight) per prompt type:")
    for name in inputs.plugins:
        alpha = result.alpha(name)
        if alpha is not None:
            print(f"  {name}: " + ", ".join(f"{t} {a:.4f}" for t, a in alpha.items()))
    for name, stats in result.offsets.items():
        print(f"  {name} offsets: mean {stats['mean_cells']:.3f} cells, {100 * stats['at_bound_share']:.1f} % "
              f"of components at the bound")
    print("\ntargets:")
    for t in targets:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']} vs {t['reference']}")


def report_json(args: argparse.Namespace, argv: Optional[Sequence[str]], inputs: Inputs, variants: Dict[str, str],
                result: BenchmarkResult, summary: dict, by_size: dict, params: int,
                targets: List[dict]) -> Dict[str, object]:
    """The ``--out`` file: the command, model, dataset, protocol, plugins and every figure."""
    cfg = inputs.cfg
    return {
        "command": " ".join(["python", "scripts/benchmark.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "model": inputs.model.version, "model_type": args.model_type, "device": str(inputs.model.device),
        "dataset": inputs.dataset.description, "images": result.images, "objects": result.objects,
        "protocol": {"prompts_per_object": cfg.prompts_per_object, "seed": cfg.seed,
                     "boundary_ratio": cfg.boundary_ratio, "prompt_types": list(cfg.prompt_types),
                     "decoding": "single mask (point1_multimask: best of SAM's 3 by predicted IoU)"},
        "plugins": {name: {"version": inputs.versions.get(name),
                           "path": str(args.plugin if name == "stable_sam" else variants.get(name)),
                           "config": p.config.to_dict()} for name, p in inputs.plugins.items() if p is not None},
        "plugin_params": params, "results": summary, "targets": targets, "seconds": round(result.seconds, 1),
        "alpha": {name: result.alpha(name) for name in inputs.plugins}, "offsets": result.offsets, "by_size": by_size,
    }


def write_outputs(args: argparse.Namespace, report: Dict[str, object], result: BenchmarkResult,
                  cfg: ProtocolConfig) -> None:
    """Write the JSON report to ``--out`` and, when there are cases, the figure to ``--figure``."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nresults written to {args.out}")
    if result.cases:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        cases = sorted(result.cases, key=lambda c: cfg.figure_types.index(c.prompt_type))
        comparison_figure(cases, [("sam", "SAM"), ("stable_sam", "Stable-SAM")]).save(args.figure)
        print(f"figure written to {args.figure}")


def json_line(result: BenchmarkResult, inputs: Inputs, summary: dict, by_size: dict,
              params: int) -> Dict[str, object]:
    """The ``--json`` last line: mIoU, mBIoU, stability and alpha_1 per row and prompt type."""
    def figures(name: str) -> Dict[str, object]:
        rows = {t: {k: v for k, v in r.items() if k in ("miou", "mbiou", "stability")}
                for t, r in summary[name].items()}
        return {**rows, "alpha": result.alpha(name)}

    return {**{name: figures(name) for name in inputs.plugins},
            "offsets": result.offsets.get("stable_sam"), "plugin_params": params, "by_size": by_size}


def main(argv=None) -> int:
    """Run the benchmark (``--help``); the exit code (2: bad input)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        variants = dict(v.split("=", 1) for v in args.variant)
    except ValueError:
        print(f"error: --variant takes NAME=PLUGIN.pt, got {args.variant}", file=sys.stderr)
        return 2
    if not args.plugin.is_file() and args.plugin == DEFAULT_PLUGIN:
        print(f"error: no plugin at {args.plugin}; train one with scripts/finetune.py "
              f"or pass --plugin", file=sys.stderr)
        return 2
    try:
        inputs = load_inputs(args, variants)
    except (DatasetError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"model {inputs.model.version} on {inputs.model.device}; dataset {inputs.dataset.description}; plugin "
          f"{inputs.main_plugin.version} ({args.plugin})")
    try:
        result = evaluate(inputs.model, inputs.dataset, inputs.plugins, inputs.cfg, progress=not args.no_progress)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = result.summary()
    params = count_trainable(inputs.main_plugin.plugin)
    by_size = result.by_size()
    targets = targets_report(summary, params, result.alpha("stable_sam"))
    print_report(result, inputs, summary, by_size, targets)
    write_outputs(args, report_json(args, argv, inputs, variants, result, summary, by_size, params, targets),
                  result, inputs.cfg)
    if args.json:
        print(json.dumps(json_line(result, inputs, summary, by_size, params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
