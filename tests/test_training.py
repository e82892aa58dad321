"""training/ (how the shipped small SAM is trained): the timed pretraining step."""

from __future__ import annotations

import dataclasses

import torch

from stable_sam.modeling.sam_tiny import build_sam_tiny
from training.pretrain import PretrainConfig
from stable_sam.settings import SAM_TINY_CHECKPOINT
from training.time_pretrain import time_pretrain_steps


def test_the_timed_pretraining_step_counts_only_the_steps_after_the_warmup():
    torch.manual_seed(0)
    sam = build_sam_tiny(SAM_TINY_CHECKPOINT)
    cfg = dataclasses.replace(PretrainConfig(), batch_size=1)
    times = time_pretrain_steps(sam, cfg, steps=2, warmup=1)
    assert len(times.model_s) == len(times.scenes_s) == 2
    assert all(t > 0 for t in times.model_s) and not sam.training
