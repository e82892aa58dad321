"""The warm-up + cosine learning-rate schedule of SAM pretraining and plugin training (RTS).

A ``LambdaLR`` over one factor function, not torch's LinearLR + CosineAnnealingLR in a SequentialLR:
CosineAnnealingLR takes one absolute ``eta_min`` for every parameter group, so a group with another
lr (RTS's offset branch at ``offset_lr_scale`` x lr) would decay to the other group's floor, not
``min_lr_ratio`` of its own (tests/test_rts.py checks each group's rate step by step). A
SequentialLR's state would also not load the LambdaLR state of a pretraining run saved to resume.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Step ``step``'s factor on each group's lr: (step + 1) / warmup_steps during the warm-up, then
    a cosine from 1 down to ``min_lr_ratio`` at ``total`` steps (held there after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup_steps: int,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine on every parameter group of ``opt``, relative to its own lr."""
    # A plain function (a lambda), so the scheduler's state_dict stores no lambda state: the same
    # state a saved pretraining run holds.
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine_factor(s, total, warmup_steps, min_lr_ratio))
