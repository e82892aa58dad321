"""RTS: adapt the Stable-SAM plugin to a frozen SAM in one epoch; write a versioned checkpoint.

    python scripts/finetune.py                            # a plugin for the small SAM from synthetic
                                                          # training scenes (never the held-out ones)
    python scripts/finetune.py --model-type vit_l --checkpoint sam_vit_l_0b3195.pth \\
        --dataset coco/instances_train.json --image-root coco/train2017 --device cuda --out plugin_vit_l.pt

Adaptation to a Label Studio project's own labels (what the backend's training job runs): a
deterministic held-out split of the labelled tasks, held-out mIoU before (the plugin serving now)
and after, the annotators' rectangles / keypoints as prompts. The new version goes into a store
(``--store MODEL_DIR``: ``plugins/<base model>/project-N/``, activated unless ``--no-activate``)
or to ``--out``:

    python scripts/finetune.py --label-studio-url http://ls:8080 --project 3 --store models   # key: LABEL_STUDIO_API_KEY
    python scripts/finetune.py --dataset export.json --image-root ls-media --project 3 --store models --no-activate

Only the plugin (DSP + DRP, ~0.08 M parameters) trains; SAM runs frozen under no_grad, each image
is encoded once. The checkpoint is written atomically at the end, with a training summary (data
size, epochs, loss curve, probe loss before / after, time); a failed run writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from stable_sam.adaptation import INIT_MODES, AdaptationConfig, AdaptationError, Reporter, export_dataset, run_adaptation
from stable_sam.builders import MODEL_TYPES, build
from stable_sam.data.dataset import DatasetError, SegmentationDataset
from stable_sam.data.sources import is_generated, json_kind, open_dataset
from stable_sam.distributed import init_from_env
from stable_sam.download import CheckpointError
from stable_sam.modeling.plugin import PluginConfig
from stable_sam.plugin_store import PluginStore, project_scope
from stable_sam.rts import RTSConfig, finetune

ROOT = Path(__file__).resolve().parents[1]
# Scenes of the training seed far beyond those the small SAM was pretrained on (0 .. 23,999).
DEFAULT_TRAIN_START = 100_000
DEFAULT_TRAIN_IMAGES = 600


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=None,
                    help="synthetic:train (default) | a folder of images + mask PNGs | COCO .json | "
                         "Label Studio export .json (adaptation: held-out before / after)")
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
    ap.add_argument("--out", type=Path, default=None,
                    help="the plugin file (default checkpoints/plugin_sam_tiny_rts.pt; adaptation: or --store)")
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
    ap.add_argument("--trainable", default=d.trainable, choices=("all", "offsets", "projection"),
                    help="the part of the plugin that learns (offsets / projection: ablation variants)")
    ap.add_argument("--offset-lr-scale", type=float, default=d.offset_lr_scale,
                    help="learning-rate factor of the offset branch (lower it if the offsets saturate)")
    p = PluginConfig()
    ap.add_argument("--offset-range", type=float, default=p.offset_range, help="offset bound r, grid cells")
    ap.add_argument("--no-resample-pe", action="store_true", help="keep the grid positional encoding")
    ap.add_argument("--no-drp", action="store_true", help="DSP alone with a constant alpha (ablation)")
    ap.add_argument("--amplitude", action="store_true", help="DCNv2-style sigmoid modulation channel")
    ap.add_argument("--router-token", default=p.router_token, choices=("mask", "iou"))
    ap.add_argument("--router-init-gap", type=float, default=p.router_init_gap,
                    help="DRP logit gap regular - deformed at init (0: alpha starts at 0.5 / 0.5; the "
                         "plugin is a no-op at init either way, the deformed features equal the regular ones)")
    a = AdaptationConfig()
    ad = ap.add_argument_group("adaptation to a Label Studio project (a live one, or a JSON export)")
    ad.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL", ""),
                    help="Label Studio as this machine reaches it (default $LABEL_STUDIO_URL); the key is "
                         "$LABEL_STUDIO_API_KEY (a personal access token or a legacy token)")
    ad.add_argument("--project", type=int, default=None,
                    help="the project: its labels (live, unless --dataset names an export) and its store scope")
    ad.add_argument("--store", type=Path, default=None,
                    help="a MODEL_DIR: the new version goes to plugins/<base model>/<scope>/ and is activated")
    ad.add_argument("--scope", default=None, help="store scope (default project-<--project>)")
    ad.add_argument("--no-activate", action="store_true", help="write the version, keep serving the current one")
    ad.add_argument("--plugin", type=Path, default=None,
                    help="the default plugin (as PLUGIN_CHECKPOINT): the start and 'before' when the scope has none")
    ad.add_argument("--holdout", type=float, default=a.holdout, help="share of labelled tasks held out")
    ad.add_argument("--init", default=a.init, choices=INIT_MODES,
                    help="start from the plugin serving now (current) or a fresh one")
    ad.add_argument("--eval-noise", type=float, default=a.noise,
                    help="DN-DETR scale of held-out boxes for objects without a drawn prompt")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the summary) as the last line")
    return ap.parse_args(argv)


def _configs(args: argparse.Namespace):
    """The RTS and plugin settings of the command line (ValueError for bad values)."""
    rts = RTSConfig(epochs=args.epochs, images_per_step=args.images_per_step,
                    prompts_per_object=args.prompts_per_object, lr=args.lr,
                    max_box_noise=args.max_box_noise, max_points=args.max_points,
                    negative_prob=args.negative_prob, seed=args.seed,
                    trainable=args.trainable, offset_lr_scale=args.offset_lr_scale)
    plugin_cfg = PluginConfig(offset_range=args.offset_range, resample_pe=not args.no_resample_pe,
                              use_drp=not args.no_drp, amplitude=args.amplitude, router_token=args.router_token,
                              router_init_gap=args.router_init_gap)
    return rts, plugin_cfg


def _is_label_studio_export(dataset) -> bool:
    path = Path(dataset) if dataset else None
    try:
        return bool(path and path.suffix.lower() == ".json" and path.is_file() and json_kind(path) == "label_studio")
    except DatasetError:
        return False


class LiveProjectError(Exception):
    """The live project cannot be read (the backend's message: Label Studio unreachable, a bad key,
    a label config without a brush control)."""


def live_project_dataset(args: argparse.Namespace) -> SegmentationDataset:
    """A live project's labels, read as the backend's training job reads them (the server layer
    talks to Label Studio; an export needs only the library)."""
    from backend.errors import BadInput
    from backend.server_settings import BackendSettings
    from backend.training_job import project_dataset

    settings = BackendSettings(label_studio_url=args.label_studio_url.rstrip("/"),
                               label_studio_api_key=os.environ.get("LABEL_STUDIO_API_KEY", "").strip())
    try:
        return project_dataset(settings, args.project)
    except BadInput as e:
        raise LiveProjectError(e.message) from None


def adapt_main(args: argparse.Namespace, command: str) -> int:
    """Adaptation to a Label Studio project's labels (a JSON export, or the live project): the
    backend's training job, from the command line."""
    scope = args.scope or (project_scope(args.project) if args.project is not None else None)
    try:
        if args.store is None and args.out is None:
            raise ValueError("adaptation writes a new version: give --store MODEL_DIR (with --project or --scope) "
                             "or --out FILE")
        if args.store is not None and scope is None:
            raise ValueError("--store needs --project (scope project-<N>) or --scope")
        cfg = AdaptationConfig(holdout=args.holdout, init=args.init, noise=args.eval_noise, seed=args.seed)
        rts, plugin_cfg = _configs(args)
        dataset = (export_dataset(Path(args.dataset), args.image_root) if args.dataset is not None
                   else live_project_dataset(args))
        model = build(args.model_type, sam_checkpoint=args.checkpoint, plugin_checkpoint=args.plugin,
                      device=args.device, model_dir=args.model_dir)
        store = PluginStore(args.store, model.model_id) if args.store is not None else None
        result = run_adaptation(model, dataset, Reporter(echo=lambda s: print(s, flush=True)), store=store,
                                scope=scope, out=None if store else args.out, rts=rts, cfg=cfg, plugin_config=plugin_cfg,
                                activate=not args.no_activate, extra_summary={"command": command},
                                progress=not args.no_progress)
    except LiveProjectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DatasetError, CheckpointError, AdaptationError, ValueError, RuntimeError) as e:
        print(f"error: {e} (no plugin written)", file=sys.stderr)
        return 2
    h = result["heldout"]
    if "miou_before" in h:
        print(f"held-out mIoU ({h['images']} images, {h['objects']} objects): before {h['miou_before']} "
              f"({result['previous_version']}), after {h['miou_after']} ({result['version']})")
    else:
        print(f"held-out mIoU: none ({h.get('note')})")
    if args.json:
        print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    """Run RTS and write the plugin (``--help``); the exit code (2: bad input)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = " ".join(["python", "scripts/finetune.py"] + (sys.argv[1:] if argv is None else list(argv)))
    if args.project is not None or args.store is not None or _is_label_studio_export(args.dataset):
        if args.project is not None and args.dataset is None and not args.label_studio_url:
            print("error: --project without --dataset reads the live project: give --label-studio-url "
                  "(or set LABEL_STUDIO_URL)", file=sys.stderr)
            return 2
        return adapt_main(args, command)
    args.dataset = args.dataset or "synthetic:train"
    args.out = args.out or ROOT / "checkpoints" / "plugin_sam_tiny_rts.pt"
    synthetic = is_generated(args.dataset)
    start = args.start if args.start is not None else (DEFAULT_TRAIN_START if synthetic else 0)
    limit = args.images if args.images is not None else (DEFAULT_TRAIN_IMAGES if synthetic else None)
    try:
        group = init_from_env(args.device)  # under torchrun: one process per GPU (or CPU slot)
        rts, plugin_cfg = _configs(args)
        dataset = open_dataset(args.dataset, image_root=args.image_root, masks_dir=args.masks_dir,
                               limit=limit, start=start)
        device = args.device
        if group.world > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
            device = f"cuda:{torch.cuda.current_device()}"
        model = build(args.model_type, sam_checkpoint=args.checkpoint, device=device, model_dir=args.model_dir)
    except (DatasetError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"RTS on {model.version} ({model.device}), data: {dataset.description}"
          + (f", rank {group.rank} of {group.world}" if group.world > 1 else ""))
    try:
        _, version, summary = finetune(model, dataset, args.out, rts, plugin_cfg, version=args.version,
                                       progress=not args.no_progress, extra_summary={"command": command},
                                       log=lambda s: print(s, flush=True))
    except DatasetError as e:
        print(f"error: {e} (no checkpoint written)", file=sys.stderr)
        return 2
    if args.json and group.rank == 0:
        short = {k: v for k, v in summary.items() if k != "loss_curve"}
        print(json.dumps({"version": version, "path": str(args.out), **short}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
