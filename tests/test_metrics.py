"""Metric functions against hand-computed cases: IoU, boundary IoU, stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stable_sam.metrics import (binary_iou, boundary_iou, boundary_width, mask_boundary, mask_iou,
                                pairwise_iou, stability)


def _square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_hand_computed():
    gt = _square(10, 10, 2, 8, 2, 8)          # 6 x 6 = 36 pixels
    shifted = _square(10, 10, 2, 8, 3, 9)     # overlap 6 x 5 = 30, union 42
    assert mask_iou(shifted, gt) == pytest.approx(30 / 42)
    assert mask_iou(gt, gt) == 1.0
    assert mask_iou(np.zeros_like(gt), gt) == 0.0
    assert mask_iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0  # empty union: agreement
    batch = mask_iou(np.stack([gt, shifted, ~gt]), gt)
    np.testing.assert_allclose(batch, [1.0, 30 / 42, 0.0])


def test_binary_iou_torch_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 12, 9)) > 0.5, rng.random((5, 12, 9)) > 0.4
    expect = [mask_iou(a[i], b[i]) for i in range(5)]
    np.testing.assert_allclose(binary_iou(torch.as_tensor(a), torch.as_tensor(b)).numpy(), expect, rtol=1e-6)


def test_boundary_width_is_two_percent_of_the_diagonal_at_least_one():
    assert boundary_width(300, 400) == 10       # diagonal 500
    assert boundary_width(10, 10) == 1          # 0.28 rounds to 0, floor of 1
    assert boundary_width(256, 256) == 7        # 0.02 * 362.04 = 7.24


def test_boundary_band_hand_computed():
    gt = _square(10, 10, 2, 8, 2, 8)
    band = mask_boundary(gt, 1)
    assert band.sum() == 36 - 16                 # 6 x 6 minus its 4 x 4 interior
    assert not band[3:7, 3:7].any()
    # The image border counts as background: a full mask has a band along the border.
    full = np.ones((10, 10), bool)
    assert mask_boundary(full, 1).sum() == 100 - 64
    assert mask_boundary(full, 2).sum() == 100 - 36
    # d wider than the object: the whole object is band.
    assert mask_boundary(gt, 5).sum() == 36


def test_boundary_iou_hand_computed():
    gt = _square(10, 10, 2, 8, 2, 8)
    shifted = _square(10, 10, 2, 8, 3, 9)
    # Rings of 20 pixels each; they share rows 2 and 7 at columns 3..7: 10 pixels; union 30.
    assert boundary_iou(shifted, gt) == pytest.approx(10 / 30)
    assert boundary_iou(gt, gt) == 1.0
    assert boundary_iou(np.zeros_like(gt), gt) == 0.0
    np.testing.assert_allclose(boundary_iou(np.stack([gt, shifted]), gt), [1.0, 1 / 3])


def test_boundary_iou_punishes_boundary_errors_more_than_iou():
    # A large square with a ragged edge: IoU barely moves, boundary IoU drops.
    gt = _square(200, 200, 20, 180, 20, 180)
    ragged = gt.copy()
    ragged[20:180:2, 20:24] = False
    assert mask_iou(ragged, gt) > 0.98
    assert boundary_iou(ragged, gt) < 0.8


def test_stability_is_mean_pairwise_iou():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 1, 1, 0]], bool)
    c = np.array([[0, 0, 1, 1]], bool)
    masks = np.stack([a, b, c])
    # IoU(a, b) = 2/3, IoU(a, c) = 0, IoU(b, c) = 1/4
    np.testing.assert_allclose(pairwise_iou(masks), [[1, 2 / 3, 0], [2 / 3, 1, 1 / 4], [0, 1 / 4, 1]])
    assert stability(masks) == pytest.approx((2 / 3 + 0 + 1 / 4) / 3)
    assert stability(np.stack([a, a, a])) == 1.0
    assert stability(np.zeros((3, 1, 4), bool)) == 1.0
    with pytest.raises(ValueError):
        stability(masks[:1])


def test_boundary_matches_the_reference_iterated_erosion():
    """The reference (Boundary IoU / HQ-SAM): zero-pad by 1, erode d times with 3 x 3, unpad."""
    import cv2

    rng = np.random.default_rng(0)
    for trial in range(20):
        h, w = rng.integers(5, 60, 2)
        mask = rng.random((h, w)) > rng.uniform(0.2, 0.8)
        if trial % 3 == 0:
            mask[:] = False
            mask[rng.integers(0, h):, rng.integers(0, w):] = True   # touches the image border
        d = int(rng.integers(1, 6))
        padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        ref = mask & (cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1] == 0)
        np.testing.assert_array_equal(mask_boundary(mask, d), ref)
