"""``python -m research <tool> [args]``: a product tool, or the small SAM's training, with the region
world registered, so that ``regions:heldout`` / ``regions:train`` / ``regions:unseen`` (datasets) and
``--world regions`` (pretraining) are known:

    python -m research benchmark --dataset regions:heldout --plugin ... --json
    python -m research failure_profile --dataset regions:unseen --json
    python -m research finetune --dataset regions:train --images 600 --version regions-e
    python -m research train_small_sam --init checkpoints/sam_tiny.pt --world regions --steps 700

The region-fit oracle and the same-set oracle have their own modules: ``python -m
research.world_oracle``, ``python -m research.run_same_set_oracle``.
"""

from __future__ import annotations

import sys

import research.region_world  # noqa: F401 - registers the "regions" world
from stable_sam_cli import benchmark, failure_profile, finetune
from training import eval_small_sam, train_small_sam

TOOLS = {"benchmark": benchmark.main, "failure_profile": failure_profile.main, "finetune": finetune.main,
         "train_small_sam": train_small_sam.main, "eval_small_sam": eval_small_sam.main}


def main() -> int:
    """Run ``sys.argv[1]``'s tool with the remaining arguments; its exit code."""
    if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
        print(__doc__, file=sys.stderr)
        print(f"tools: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    tool = sys.argv[1]
    sys.argv = [f"research {tool}", *sys.argv[2:]]
    return TOOLS[tool]() or 0


if __name__ == "__main__":
    sys.exit(main())
