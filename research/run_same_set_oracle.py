"""The same-set oracle: the Stable-SAM plugin against fine-tuning SAM's own token-to-image
attention of the same decoder layer, both trained and evaluated on one small set (see
``research/same_set_oracle.py``). Tells whether the plugin's design or the data limits what it gains.

    python -m research.run_same_set_oracle                           # 10 region-world training images, 5 epochs
    python -m research.run_same_set_oracle --checkpoint runs/x.pt --images 20 --epochs 3 --json
    python -m research.run_same_set_oracle --variant offsets --variant projection --offset-lr-scale 0.1
    python -m research.run_same_set_oracle --images 600 --start 100000 --epochs 1 \
        --eval-dataset regions:heldout --eval-start 1000 --eval-images 40   # held out: RTS's setting
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import research.region_world  # noqa: F401 - registers the "regions" world
from research.same_set_oracle import attention_finetuned, attention_module, fit_plugin
from stable_sam.builders import build
from stable_sam.data.dataset import DatasetError
from stable_sam.data.sources import open_dataset
from stable_sam.download import CheckpointError
from stable_sam.evaluation import PROMPT_TYPES, ProtocolConfig, evaluate, variants_table
from stable_sam.rts import TRAINABLE_PARTS, RTSConfig


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="regions:train", help="any dataset the benchmark reads")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--checkpoint", type=Path, default=None, help="small-SAM weights (default: the shipped ones)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=RTSConfig.lr)
    ap.add_argument("--offset-lr-scale", type=float, default=1.0)
    ap.add_argument("--variant", action="append", default=[], choices=[p for p in TRAINABLE_PARTS if p != "all"],
                    help="also train a plugin with only this part learning")
    ap.add_argument("--prompts", type=int, default=10, help="evaluation prompts per object and type")
    ap.add_argument("--eval-dataset", default=None,
                    help="evaluate on this dataset instead (default: the training images: the same-set oracle)")
    ap.add_argument("--eval-start", type=int, default=0)
    ap.add_argument("--eval-images", type=int, default=None, help="(with --eval-dataset) number of images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Train and evaluate the plugin and the attention fine-tune; the exit code (2: bad input)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dataset = open_dataset(args.dataset, limit=args.images, start=args.start)
        eval_set = (open_dataset(args.eval_dataset, limit=args.eval_images, start=args.eval_start)
                    if args.eval_dataset else dataset)
        model = build("sam_tiny", sam_checkpoint=args.checkpoint, device="cpu")
        cfg = RTSConfig(epochs=args.epochs, lr=args.lr, offset_lr_scale=args.offset_lr_scale, probe_images=0)
    except (DatasetError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    protocol = ProtocolConfig(prompts_per_object=args.prompts, figure_cases=0)
    start = time.time()
    plugins = {"sam": None}
    plugins["plugin"], _ = fit_plugin(model, dataset, cfg)
    for part in args.variant:
        plugins[f"plugin ({part} only)"], _ = fit_plugin(model, dataset, RTSConfig(**{**cfg.__dict__, "trainable": part}))
    summary = evaluate(model, eval_set, plugins, protocol, progress=False).summary()
    attention_params = sum(p.numel() for p in attention_module(model).parameters())
    with attention_finetuned(model, dataset, cfg):
        summary["attention fine-tune"] = evaluate(model, eval_set, {"sam": None}, protocol, progress=False).summary()["sam"]
    where = ("evaluated on the same images" if eval_set is dataset
             else f"evaluated on {eval_set.description}")
    print(f"trained on {dataset.description}, {where}; {args.epochs} epochs, lr {args.lr}; "
          f"{time.time() - start:.0f} s\n")
    print(variants_table(summary))
    print(f"\nattention fine-tune: {attention_params} parameters (SAM's layer-2 token-to-image attention)")

    def gaps(name: str):
        r = summary[name]
        return {"gt_minus_noisy04": round(r["gt_box"]["miou"] - r["noisy_box_0.4"]["miou"], 2),
                "point3_minus_point1": round(r["point3"]["miou"] - r["point1"]["miou"], 2)}

    for name in summary:
        print(f"  {name}: GT box - noisy 0.4 = {gaps(name)['gt_minus_noisy04']}, "
              f"3 points - 1 point = {gaps(name)['point3_minus_point1']}")
    if args.json:
        print(json.dumps({name: {**{t: summary[name][t]["miou"] for t in PROMPT_TYPES}, **gaps(name)}
                          for name in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
