"""What the polygon output and the mask clean-up cost and change, on real held-out photos.

    python scripts/bench_polygons.py                 # docs/benchmarks.md's figures: the committed small
                                                     # SAM and plugin, 8 images each of ccp-heldout and
                                                     # camvid-val, 4 prompts per object and type
    python scripts/bench_polygons.py --json          # ... and one JSON object as the last line
    python scripts/bench_polygons.py --checkpoint new_sam_tiny.pt --plugin new_plugin.pt --images 20

The masks are the benchmark protocol's (``stable_sam.evaluation``: GT box, noisy boxes s = 0.2 /
0.4, 1 and 3 points, seeded prompts, single-mask decoding) from the model and plugin given. Then:

- **Polygons**: each mask (cleaned at the backend's default MASK_MIN_REGION_PX) becomes polygons as
  the backend writes them (``stable_sam.masks.mask_polygons``: one per piece of at least
  POLYGON_MIN_AREA_PX, holes dropped) at each ``--tolerances`` value; the union of the polygons is
  rasterised by pycocotools (as a reader of Label Studio's COCO export would) and compared with the
  mask (IoU), with vertices per object and milliseconds per object (the conversion alone).
- **Clean masks**: each mask is cleaned at every ``--clean-areas`` value (islands and holes under
  that many pixels removed, ``stable_sam.masks.clean_mask``) and its IoU with the ground truth is
  compared with the raw mask's: mIoU per prompt type, and the change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from backend.server_settings import BackendSettings
from stable_sam.builders import MODEL_TYPES, build
from stable_sam.checkpoint import PluginCheckpoint, load_plugin
from stable_sam.data.dataset import DatasetError, SegmentationDataset
from stable_sam.data.sources import open_dataset
from stable_sam.download import CheckpointError
from stable_sam.evaluation import PROMPT_TYPES, TYPE_LABELS, ProtocolConfig, predict_protocol, protocol_samples
from stable_sam.masks import PolygonOptions, clean_mask, mask_polygons, polygons_mask
from stable_sam.metrics import mask_iou
from stable_sam.model import StableSam
from stable_sam.predictor import StableSamPredictor

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLUGIN = ROOT / "checkpoints" / "plugin_sam_tiny_rts.pt"
REAL = ROOT.parent / "shared" / "data" / "real"
DEFAULT_DATASETS = [REAL / "ccp-heldout", REAL / "camvid-val"]
DEFAULTS = BackendSettings()


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append", type=Path, default=None,
                    help="a folder of images + mask PNGs (repeatable; default: ../shared/data/real/ccp-heldout "
                         "and camvid-val)")
    ap.add_argument("--images", type=int, default=8, help="images per dataset (the first ones)")
    ap.add_argument("--prompts", type=int, default=4, help="seeded prompts per object and random prompt type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", default=",".join(PROMPT_TYPES), help=f"comma-separated, from {PROMPT_TYPES}")
    ap.add_argument("--model-type", default="sam_tiny", choices=MODEL_TYPES)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="SAM weights (default: the committed small SAM, or the official file for vit_*)")
    ap.add_argument("--model-dir", type=Path, default=None, help="where official SAM weights are kept")
    ap.add_argument("--plugin", default=str(DEFAULT_PLUGIN), help="Stable-SAM plugin checkpoint, or 'none' (plain SAM)")
    ap.add_argument("--tolerances", default=f"0,0.5,{DEFAULTS.polygon_tolerance_px:g},2",
                    help=f"POLYGON_TOLERANCE_PX values (default {DEFAULTS.polygon_tolerance_px:g} among them)")
    ap.add_argument("--clean-areas", default="0,16,64,256", help="MASK_MIN_REGION_PX values")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_polygons.json")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return ap.parse_args(argv)


def _numbers(text: str, kind=float) -> List:
    return [kind(v) for v in text.split(",") if v.strip()]


@dataclass
class Inputs:
    """What a run measures: the tolerances, clean-up areas (0, the raw mask, first), protocol,
    datasets, model and plugin (None: plain SAM) that ``args`` name."""

    tolerances: List[float]
    areas: List[int]
    cfg: ProtocolConfig
    sets: List[SegmentationDataset]
    model: StableSam
    plugin: Optional[PluginCheckpoint]


def load_inputs(args: argparse.Namespace) -> Inputs:
    """The inputs ``args`` name. Raises ``DatasetError``, ``CheckpointError``, ``ValueError`` or
    ``RuntimeError`` on bad input."""
    tolerances, areas = _numbers(args.tolerances), _numbers(args.clean_areas, int)
    if 0 not in areas:
        areas = [0] + areas
    cfg = ProtocolConfig(prompts_per_object=args.prompts, seed=args.seed,
                         prompt_types=tuple(t.strip() for t in args.types.split(",") if t.strip()))
    sets = [open_dataset(d, limit=args.images) for d in args.dataset or DEFAULT_DATASETS]
    model = build(args.model_type, sam_checkpoint=args.checkpoint, device=args.device, model_dir=args.model_dir)
    plugin = None if args.plugin.lower() == "none" else load_plugin(Path(args.plugin), model_type=args.model_type)
    return Inputs(tolerances, areas, cfg, sets, model, plugin)


@dataclass
class Measurements:
    """What the masks gave: per prompt type and clean-up area, each object's mean IoU with the
    ground truth (``gt_iou``); per tolerance, each mask's polygon IoU, vertices, pieces and ms
    (``poly``); the ms of each clean-up at the default area (``clean_ms``)."""

    gt_iou: Dict[str, Dict[int, List[float]]]
    poly: Dict[float, Dict[str, List[float]]]
    clean_ms: List[float] = field(default_factory=list)
    images: int = 0
    objects: int = 0
    seconds: float = 0.0


def measure_object(masks: Sequence[np.ndarray], gt: np.ndarray, image_hw: Tuple[int, int], inputs: Inputs,
                   options: Dict[float, PolygonOptions], m: Measurements) -> Dict[int, List[float]]:
    """One object's masks (one per prompt): each cleaned at every area and compared with ``gt``
    (the IoUs per area, returned), and, cleaned as the backend serves it, turned into polygons at
    every tolerance (added to ``m.poly``)."""
    default_area = DEFAULTS.mask_min_region_px
    h, w = image_hw
    ious: Dict[int, List[float]] = {a: [] for a in inputs.areas}
    for mask in masks:
        for a in inputs.areas:
            t0 = time.perf_counter()
            cleaned = clean_mask(mask, a)
            if a == default_area and a:
                m.clean_ms.append(1000 * (time.perf_counter() - t0))
            ious[a].append(float(mask_iou(cleaned, gt)))
        served = clean_mask(mask, default_area)
        for tol, opt in options.items():
            t0 = time.perf_counter()
            polygons = mask_polygons(served, opt)
            m.poly[tol]["ms"].append(1000 * (time.perf_counter() - t0))
            m.poly[tol]["iou"].append(float(mask_iou(polygons_mask(polygons, h, w), served)))
            m.poly[tol]["vertices"].append(sum(len(p) for p in polygons))
            m.poly[tol]["pieces"].append(len(polygons))
    return ious


def measure(inputs: Inputs, progress: bool) -> Measurements:
    """The protocol's masks on every image of every dataset, measured by ``measure_object``."""
    cfg, areas = inputs.cfg, inputs.areas
    predictor = StableSamPredictor(inputs.model, max_batch=128, plugin=inputs.plugin.plugin if inputs.plugin else None)
    options = {t: PolygonOptions(t, DEFAULTS.polygon_min_area_px, DEFAULTS.polygon_largest_only)
               for t in inputs.tolerances}
    m = Measurements(gt_iou={t: {a: [] for a in areas} for t in cfg.prompt_types},
                     poly={t: {"iou": [], "vertices": [], "pieces": [], "ms": []} for t in inputs.tolerances})
    start = time.perf_counter()
    for ds in inputs.sets:
        for sample, prompts_of in protocol_samples(ds, cfg, Path(ds.description).name[:20], progress):
            m.images += 1
            m.objects += len(sample.masks)
            predictor.set_embedding(inputs.model.embed(sample.image))
            for t, prompts in prompts_of.items():
                masks, _ = predict_protocol(predictor, prompts, t, use_plugin=inputs.plugin is not None)
                bounds = np.cumsum([0] + [len(p) for p in prompts])
                for j, gt in enumerate(sample.masks):
                    ious = measure_object(masks[bounds[j]:bounds[j + 1]], gt, sample.image.shape[:2], inputs,
                                          options, m)
                    for a in areas:
                        m.gt_iou[t][a].append(float(np.mean(ious[a])))
    m.seconds = time.perf_counter() - start
    return m


def polygon_figures(m: Measurements) -> Dict[str, Dict[str, float]]:
    """Per tolerance: polygon vs mask IoU (mean, 5th percentile), vertices, pieces and ms per object."""
    return {f"{tol:g}": {"iou_mean": round(float(np.mean(v["iou"])), 4),
                         "iou_p05": round(float(np.percentile(v["iou"], 5)), 4),
                         "vertices_per_object": round(float(np.mean(v["vertices"])), 1),
                         "vertices_median": float(np.median(v["vertices"])),
                         "pieces_per_object": round(float(np.mean(v["pieces"])), 2),
                         "ms_per_object": round(float(np.mean(v["ms"])), 3)}
            for tol, v in m.poly.items()}


def clean_figures(m: Measurements) -> Dict[str, Dict[str, float]]:
    """Per prompt type and clean-up area: mIoU with the ground truth, in percent."""
    return {t: {str(a): round(100 * float(np.mean(v)), 2) for a, v in by_area.items()}
            for t, by_area in m.gt_iou.items()}


def print_report(args: argparse.Namespace, inputs: Inputs, m: Measurements, polygons_out: dict,
                 clean_out: dict) -> None:
    """The two tables: polygons per tolerance, clean masks per prompt type and area."""
    areas, default_area = inputs.areas, DEFAULTS.mask_min_region_px
    print(f"\n{m.images} images, {m.objects} objects, {args.prompts} prompts per object and random type, "
          f"{sum(len(v) for v in m.gt_iou[inputs.cfg.prompt_types[0]].values()) // len(areas)} object-type rows, "
          f"{m.seconds:.0f} s\n")
    print(f"Polygons (min area {DEFAULTS.polygon_min_area_px} px, masks cleaned at {default_area} px), "
          f"rasterised by pycocotools vs the mask:\n")
    print("| tolerance (px) | IoU polygon vs mask | 5th percentile | vertices per object (mean / median) "
          "| polygons per object | ms per object |")
    print("|---|---|---|---|---|---|")
    for tol, row in polygons_out.items():
        mark = " (default)" if float(tol) == DEFAULTS.polygon_tolerance_px else ""
        print(f"| {tol}{mark} | {row['iou_mean']:.4f} | {row['iou_p05']:.4f} | {row['vertices_per_object']:.1f} / "
              f"{row['vertices_median']:g} | {row['pieces_per_object']:.2f} | {row['ms_per_object']:.2f} |")
    print("\nClean masks: mIoU with the ground truth after removing islands and holes under N px "
          "(change vs raw):\n")
    print("| prompt | raw | " + " | ".join(f"{a} px" for a in areas if a) + " |")
    print("|---|---|" + "---|" * (len(areas) - 1))
    for t, row in clean_out.items():
        cells = [f"{row[str(a)]:.2f} ({row[str(a)] - row['0']:+.2f})" for a in areas if a]
        print(f"| {TYPE_LABELS.get(t, t)} | {row['0']:.2f} | " + " | ".join(cells) + " |")
    if m.clean_ms:
        print(f"\nclean-up at {default_area} px: {np.mean(m.clean_ms):.2f} ms per mask")


def main(argv=None) -> int:
    """Run the benchmark (``--help``) and print its figures."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        inputs = load_inputs(args)
    except (DatasetError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, plugin = inputs.model, inputs.plugin
    print(f"model {model.version} on {model.device}; plugin {plugin.version if plugin else 'none (plain SAM)'}; "
          f"datasets {', '.join(d.description for d in inputs.sets)}", file=sys.stderr)
    m = measure(inputs, not args.no_progress)
    polygons_out, clean_out = polygon_figures(m), clean_figures(m)
    print_report(args, inputs, m, polygons_out, clean_out)

    report = {
        "command": " ".join(["python", "scripts/bench_polygons.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "model": model.version, "plugin": plugin.version if plugin else None, "device": str(model.device),
        "datasets": [d.description for d in inputs.sets], "images": m.images, "objects": m.objects,
        "prompts_per_object": args.prompts, "prompt_types": list(inputs.cfg.prompt_types),
        "defaults": {"POLYGON_TOLERANCE_PX": DEFAULTS.polygon_tolerance_px,
                     "POLYGON_MIN_AREA_PX": DEFAULTS.polygon_min_area_px,
                     "MASK_MIN_REGION_PX": DEFAULTS.mask_min_region_px},
        "polygons": polygons_out, "clean_miou": clean_out, "seconds": round(m.seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nresults written to {args.out}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
