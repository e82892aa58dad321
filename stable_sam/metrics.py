"""Mask quality metrics of the evaluation protocol: IoU, boundary IoU, stability.

Boundary IoU (Cheng et al. 2021, as HQ-SAM and Stable-SAM evaluate): the boundary band of a mask
is the mask minus its erosion by d pixels, d = max(1, round(0.02 * image diagonal)), where the
image border counts as background; the score is the IoU of the two bands. Stability is the mean
pairwise IoU of the masks one object gets under several random prompts of one type. An empty
union (both masks empty) scores 1: the prediction agrees with the ground truth.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two dims; an empty union counts as IoU 1."""
    inter = (pred & target).sum(dim=(-2, -1)).float()
    union = (pred | target).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of N x H x W (or H x W) bool predictions against one H x W bool mask -> N (or scalar)."""
    pred = np.asarray(pred, dtype=bool)
    inter = np.logical_and(pred, gt).sum(axis=(-2, -1))
    union = np.logical_or(pred, gt).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def boundary_width(height: int, width: int, ratio: float = 0.02) -> int:
    """The band width d = max(1, round(ratio * diagonal)) in pixels."""
    return max(1, int(round(ratio * math.hypot(height, width))))


def mask_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """H x W bool -> the pixels of ``mask`` within d pixels (chessboard) of background or border.

    The reference code erodes a 1-pixel zero-padded mask d times with a 3 x 3 kernel; one erosion
    with a (2d+1) square is the same set and far faster, and so is working on the mask's bounding
    box plus a 1-pixel margin (everything outside it is background already).
    """
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = np.zeros_like(mask, dtype=bool)
    if len(rows) == 0:
        return out
    y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, h)
    x0, x1 = max(cols[0] - 1, 0), min(cols[-1] + 2, w)
    crop = mask[y0:y1, x0:x1]
    padded = cv2.copyMakeBorder(crop.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * d + 1, 2 * d + 1))
    eroded = cv2.erode(padded, kernel)[1:-1, 1:-1]
    out[y0:y1, x0:x1] = crop & (eroded == 0)
    return out


def boundary_iou(pred: np.ndarray, gt: np.ndarray, ratio: float = 0.02) -> np.ndarray:
    """Boundary IoU of N x H x W (or H x W) bool predictions against one H x W bool mask."""
    pred = np.asarray(pred, dtype=bool)
    d = boundary_width(*gt.shape, ratio=ratio)
    gt_band = mask_boundary(gt, d)
    preds = pred.reshape(-1, *gt.shape)
    out = np.array([mask_iou(mask_boundary(p, d), gt_band) for p in preds], dtype=np.float64)
    return out.reshape(pred.shape[:-2])


def pairwise_iou(masks: np.ndarray) -> np.ndarray:
    """N x H x W bool -> N x N IoU matrix (an empty union counts as 1)."""
    flat = np.asarray(masks, dtype=bool).reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(axis=1)
    union = area[:, None] + area[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def stability(masks: np.ndarray) -> float:
    """Mean IoU over all unordered pairs of N >= 2 masks (N x H x W bool)."""
    n = len(masks)
    if n < 2:
        raise ValueError(f"stability needs at least 2 masks, got {n}")
    iou = pairwise_iou(masks)
    return float(iou[np.triu_indices(n, k=1)].mean())
