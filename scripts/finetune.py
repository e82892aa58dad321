"""RTS: adapt the Stable-SAM plugin to a frozen SAM in one epoch; write a versioned checkpoint.

    python scripts/finetune.py                            # the README plugin: small SAM, synthetic
                                                          # training scenes (never the held-out ones)
    python scripts/finetune.py --model-type vit_l --checkpoint sam_vit_l_0b3195.pth \\
        --dataset coco/instances_train.json --image-root coco/train2017 --device cuda --out plugin_vit_l.pt

Only the plugin (DSP + DRP, ~0.08 M parameters) trains; SAM runs frozen under no_grad, each image
is encoded once. The checkpoint is written atomically at the end, with a training summary (data
size, epochs, loss curve, probe loss before / after, time); a failed run writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stable_sam.build import MODEL_TYPES, build  # noqa: E402
from stable_sam.data.dataset import DatasetError, open_dataset  # noqa: E402
from stable_sam.download import CheckpointError  # noqa: E402
from stable_sam.modeling.plugin import PluginConfig  # noqa: E402
from stable_sam.rts import RTSConfig, finetune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Scenes of the training seed far beyond those the small SAM was pretrained on (0 .. 23,999).
DEFAULT_TRAIN_START = 100_000
DEFAULT_TRAIN_IMAGES = 600


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic:train",
                    help="synthetic:train | a folder of images + mask PNGs | COCO .json | Label Studio export .json")
    ap.add_argument("--image-root", type=Path, default=None)
    ap.add_argument("--masks-dir", type=Path, default=None)
    ap.add_argument("--start", type=int, default=None,
                    help=f"first image index (default {DEFAULT_TRAIN_START} for synthetic, else 0)")
    ap.add_argument("--images", type=int, default=None,
                    help=f"number of images (default: all; {DEFAULT_TRAIN_IMAGES} for synthetic)")
    ap.add_argument("--model-type", default="sam_tiny", choices=MODEL_TYPES)
    ap.add_argument("--checkpoint", type=Path, default=None, help="SAM weights (default: committed small SAM)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: on a shared CPU, threads that contend are many "
                         "times slower (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "plugin_sam_tiny_rts.pt")
    ap.add_argument("--version", default=None, help="plugin version string (default rts-<time>-<hash>)")
    d = RTSConfig()
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--images-per-step", type=int, default=d.images_per_step)
    ap.add_argument("--prompts-per-object", type=int, default=d.prompts_per_object)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--max-box-noise", type=float, default=d.max_box_noise)
    ap.add_argument("--max-points", type=int, default=d.max_points)
    ap.add_argument("--negative-prob", type=float, default=d.negative_prob)
    ap.add_argument("--seed", type=int, default=d.seed)
    p = PluginConfig()
    ap.add_argument("--offset-range", type=float, default=p.offset_range, help="offset bound r, grid cells")
    ap.add_argument("--no-resample-pe", action="store_true", help="keep the grid positional encoding")
    ap.add_argument("--no-drp", action="store_true", help="DSP alone with a constant alpha (ablation)")
    ap.add_argument("--amplitude", action="store_true", help="DCNv2-style sigmoid modulation channel")
    ap.add_argument("--router-token", default=p.router_token, choices=("mask", "iou"))
    ap.add_argument("--router-init-gap", type=float, default=p.router_init_gap,
                    help="DRP logit gap regular - deformed at init (0: alpha starts at 0.5 / 0.5; the "
                         "plugin is a no-op at init either way, the deformed features equal the regular ones)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the summary) as the last line")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    synthetic = args.dataset.startswith("synthetic:")
    start = args.start if args.start is not None else (DEFAULT_TRAIN_START if synthetic else 0)
    limit = args.images if args.images is not None else (DEFAULT_TRAIN_IMAGES if synthetic else None)
    try:
        rts = RTSConfig(epochs=args.epochs, images_per_step=args.images_per_step,
                        prompts_per_object=args.prompts_per_object, lr=args.lr,
                        max_box_noise=args.max_box_noise, max_points=args.max_points,
                        negative_prob=args.negative_prob, seed=args.seed)
        plugin_cfg = PluginConfig(offset_range=args.offset_range, resample_pe=not args.no_resample_pe,
                                  use_drp=not args.no_drp, amplitude=args.amplitude, router_token=args.router_token,
                                  router_init_gap=args.router_init_gap)
        dataset = open_dataset(args.dataset, image_root=args.image_root, masks_dir=args.masks_dir,
                               limit=limit, start=start)
        model = build(args.model_type, sam_checkpoint=args.checkpoint, device=args.device, model_dir=args.model_dir)
    except (DatasetError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"RTS on {model.version} ({model.device}), data: {dataset.description}")
    command = " ".join(["python", "scripts/finetune.py"] + (sys.argv[1:] if argv is None else list(argv)))
    try:
        _, version, summary = finetune(model, dataset, args.out, rts, plugin_cfg, version=args.version,
                                       progress=not args.no_progress, extra_summary={"command": command},
                                       log=lambda s: print(s, flush=True))
    except DatasetError as e:
        print(f"error: {e} (no checkpoint written)", file=sys.stderr)
        return 2
    if args.json:
        short = {k: v for k, v in summary.items() if k != "loss_curve"}
        print(json.dumps({"version": version, "path": str(args.out), **short}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
