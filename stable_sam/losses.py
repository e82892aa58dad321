"""Segmentation losses on mask logits."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-mask BCE + Dice. logits, target: N x K x H x W -> N x K.

    ``valid`` (broadcastable to the logits, 1 inside the image, 0 on SAM's padding) restricts
    both terms to real pixels: the BCE is averaged over them and Dice only counts them.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = logits.sigmoid()
    if valid is None:
        bce = bce.mean(dim=(2, 3))
    else:
        valid = valid.to(logits.dtype).expand_as(logits)
        bce = (bce * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)).clamp(min=1)
        prob, target = prob * valid, target * valid
    inter = (prob * target).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1)
    return bce + dice
