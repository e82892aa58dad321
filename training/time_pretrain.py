"""The small SAM's pretraining step, timed: steps per second at the recipe's batch size on a device,
and the CPU time to draw its scenes (what a GPU training run's ``--data-workers`` must keep up with).

    python -m training.time_pretrain --device cuda            # 20 steps at batch size 8
    python -m training.time_pretrain --device cpu --steps 2 --batch-size 2 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from segment_anything.modeling import Sam

from stable_sam.builders import resolve_device
from stable_sam.data.synthetic import TRAIN_SEED, SyntheticScenes
from stable_sam.modeling.sam_tiny import build_sam_tiny
from training.pretrain import PretrainConfig, batch_scenes, train_step
from stable_sam.settings import SAM_TINY_CHECKPOINT
from stable_sam.timing import sync


@dataclass
class TrainStepTimes:
    """Seconds of each timed pretraining step: making its scenes (CPU) and the model's step."""

    scenes_s: List[float]
    model_s: List[float]


def time_pretrain_steps(sam: Sam, cfg: PretrainConfig, steps: int, warmup: int = 1,
                        deadline: Optional[float] = None) -> TrainStepTimes:
    """The small SAM's pretraining step as ``pretrain_sam`` runs it (encoder, every prompt round,
    backward, clipping, AdamW) at ``cfg.batch_size`` on generated training scenes; ``warmup`` steps
    first, untimed. Stops early after ``deadline`` (a ``time.perf_counter`` value)."""
    scenes = SyntheticScenes(seed=TRAIN_SEED + cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(sam.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sam.train()
    times = TrainStepTimes([], [])
    device = sam.device
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        chosen = batch_scenes(scenes, step, cfg)
        t1 = time.perf_counter()
        train_step(sam, opt, chosen, cfg, rng)
        sync(device)
        t2 = time.perf_counter()
        if step >= warmup:
            times.scenes_s.append(t1 - t0)
            times.model_s.append(t2 - t1)
            if deadline is not None and t2 > deadline:
                break
    sam.eval()
    return times


def main(argv=None) -> None:
    """Time ``--steps`` pretraining steps of the committed small SAM and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size, help="default: the recipe's")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    sam = build_sam_tiny(SAM_TINY_CHECKPOINT).to(resolve_device(args.device))
    cfg = dataclasses.replace(PretrainConfig(), batch_size=args.batch_size)
    times = time_pretrain_steps(sam, cfg, args.steps, warmup=1)
    model_s, scenes_s = statistics.mean(times.model_s), statistics.mean(times.scenes_s)
    out = {"device": str(sam.device), "batch_size": cfg.batch_size, "steps": len(times.model_s),
           "steps_per_s": round(1.0 / model_s, 3), "ms_per_step": round(1e3 * model_s, 2),
           "scene_generation_ms_per_step": round(1e3 * scenes_s, 2),
           "steps_per_s_with_generation": round(1.0 / (model_s + scenes_s), 3)}
    print(f"{out['steps_per_s']} steps/s on {out['device']} at batch size {cfg.batch_size} "
          f"({out['scene_generation_ms_per_step']} ms per step to draw the scenes)")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
