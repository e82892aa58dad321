"""Train the project's small SAM from scratch on synthetic scenes (CPU is fine, ~1 h).

The committed checkpoint ``checkpoints/sam_tiny.pt`` was made by the command in README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stable_sam.modeling.sam_tiny import build_sam_tiny  # noqa: E402
from stable_sam.pretrain import PretrainConfig, pretrain_sam  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for f in fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/sam_tiny.pt"))
    parser.add_argument("--init", type=Path, default=None, help="continue from these small-SAM weights")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    summary = pretrain_sam(build_sam_tiny(args.init), cfg, args.out, log=lambda s: print(s, flush=True))
    summary_path = args.out.with_suffix(".json")
    summary_path.write_text(json.dumps({"command": " ".join(sys.argv), **summary}, indent=2))
    print(json.dumps(summary["history"][-1]))


if __name__ == "__main__":
    main()
