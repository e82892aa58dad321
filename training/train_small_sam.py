"""Train the project's small SAM, from scratch or continuing from a checkpoint (``--init``), on
synthetic scenes (``--world synthetic``) or photographs (``--world photos --photos DIR[,DIR...]``).

The committed checkpoints (``checkpoints/sam_tiny.pt``, the photo model, and
``checkpoints/sam_tiny_synthetic.pt``) were made by the commands in docs/small-sam.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from stable_sam.builders import resolve_device
from stable_sam.modeling.sam_tiny import SAM_TINY_IMAGE_SIZE, SAM_TINY_PATCH_SIZE, build_sam_tiny
from training.pretrain import PretrainConfig, pretrain_sam, refine_patch_grid


def main() -> None:
    """Train (or resume) a small SAM with ``PretrainConfig``'s knobs as flags; write the weights and
    the summary JSON beside them."""
    parser = argparse.ArgumentParser(description=__doc__)
    for f in fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/sam_tiny.pt"))
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from these small-SAM weights (adapted when --image-size differs)")
    parser.add_argument("--init-coarse", type=Path, default=None,
                        help="start from the weights of a small SAM with a coarser patch (progressive resizing)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help=f"encoder patch in px (default: --init's, else {SAM_TINY_PATCH_SIZE})")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"encoder input in px (default: --init's, else {SAM_TINY_IMAGE_SIZE})")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--data-workers", type=int, default=0,
                        help="processes drawing the training scenes ahead (0: in the training loop); "
                             "the same scenes either way. On a GPU, about the machine's cores minus one")
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh even if a training state from an earlier run lies beside --out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    if args.init:
        init = build_sam_tiny(args.init)
        sam = build_sam_tiny(patch_size=args.patch_size or init.image_encoder.patch_embed.proj.kernel_size[0],
                             image_size=args.image_size or init.image_encoder.img_size)
        sam.load_state_dict(refine_patch_grid(init.state_dict(), sam))
    else:
        sam = build_sam_tiny(patch_size=args.patch_size, image_size=args.image_size)
    if args.init_coarse:
        sam.load_state_dict(refine_patch_grid(torch.load(args.init_coarse, map_location="cpu", weights_only=True), sam))
    sam = sam.to(resolve_device(args.device))
    summary = pretrain_sam(sam, cfg, args.out, log=lambda s: print(s, flush=True), resume=not args.no_resume,
                           data_workers=args.data_workers)
    summary_path = args.out.with_suffix(".json")
    summary_path.write_text(json.dumps({"command": " ".join(sys.argv), **summary}, indent=2))
    print(json.dumps(summary["history"][-1]))


if __name__ == "__main__":
    main()
