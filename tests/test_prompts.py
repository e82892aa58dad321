"""Prompt generators: the protocol's statistics, determinism, and RTS's mixed prompts."""

from __future__ import annotations

import numpy as np
import pytest

from stable_sam.evaluation import PROMPT_TYPES, protocol_prompts, prompt_rng
from stable_sam.prompts import mask_to_box, negative_points, noisy_box, sample_points
from stable_sam.rts import RTSConfig, draw_prompt


def _mask(h=200, w=300, box=(100, 60, 180, 140)):
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize("scale", [0.2, 0.4])
def test_noisy_box_follows_dn_detr_noise(scale):
    mask = _mask()  # 80 x 80 box in the middle: no clamping at these scales
    x0, y0, x1, y1 = mask_to_box(mask)
    w, h, cx, cy = x1 - x0, y1 - y0, (x0 + x1) / 2, (y0 + y1) / 2
    rng = np.random.default_rng(0)
    boxes = np.stack([noisy_box(mask, scale, rng) for _ in range(4000)])
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # (cx, cy, w, h) += U(-1, 1) * (w/2, h/2, w, h) * s: each normalised term is U(-1, 1).
    terms = [((boxes[:, 0] + boxes[:, 2]) / 2 - cx) / (w / 2 * scale),
             ((boxes[:, 1] + boxes[:, 3]) / 2 - cy) / (h / 2 * scale),
             (bw - w) / (w * scale), (bh - h) / (h * scale)]
    for t in terms:
        assert t.min() >= -1 - 1e-4 and t.max() <= 1 + 1e-4
        assert abs(t.mean()) < 0.05
        assert t.std() == pytest.approx(1 / np.sqrt(3), abs=0.03)   # std of U(-1, 1)
        assert t.min() < -0.95 and t.max() > 0.95


def test_noisy_box_is_clamped_to_the_image():
    mask = _mask(box=(0, 0, 40, 30))
    rng = np.random.default_rng(1)
    for _ in range(500):
        b = noisy_box(mask, 0.4, rng)
        assert b[0] >= 0 and b[1] >= 0 and b[2] <= 300 and b[3] <= 200
        assert b[2] - b[0] >= 1 and b[3] - b[1] >= 1


def test_points_are_uniform_inside_the_mask():
    mask = np.zeros((100, 100), bool)
    mask[0:10, 0:10] = True      # 100 pixels
    mask[50:80, 50:60] = True    # 300 pixels
    pts = sample_points(mask, 8000, np.random.default_rng(0))
    xs, ys = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert mask[ys, xs].all()
    assert np.mean(xs < 10) == pytest.approx(0.25, abs=0.02)   # share of the area
    assert np.all(pts % 1 == 0.5)                              # pixel centres


def test_negative_points_lie_off_the_mask_near_the_object():
    mask = np.zeros((100, 100), bool)
    mask[20:60, 20:60] = True
    mask[30:50, 30:50] = False   # a ring: background inside its box
    pts = negative_points(mask, 200, np.random.default_rng(0))
    xs, ys = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert not mask[ys, xs].any()
    assert ((xs >= 20) & (xs < 60) & (ys >= 20) & (ys < 60)).all()
    full_box = _mask(box=(10, 10, 50, 50))  # a rectangle fills its box: negatives go elsewhere
    pts = negative_points(full_box, 50, np.random.default_rng(0))
    assert not full_box[pts[:, 1].astype(int), pts[:, 0].astype(int)].any()


def test_protocol_prompts_shapes_and_validity():
    mask = _mask()
    for t in PROMPT_TYPES:
        p = protocol_prompts(mask, t, 20, prompt_rng(0, 3, 1, t))
        if t == "gt_box":
            assert len(p) == 1 and p.points is None
            np.testing.assert_array_equal(p.boxes[0], [100, 60, 180, 140])
        elif t.startswith("noisy_box"):
            assert p.boxes.shape == (20, 4) and p.points is None
            assert len(np.unique(p.boxes, axis=0)) == 20
        else:
            k = 3 if t == "point3" else 1
            assert p.points.shape == (20, k, 2) and p.boxes is None
            assert mask[p.points[..., 1].astype(int), p.points[..., 0].astype(int)].all()


def test_protocol_prompts_are_seeded_per_image_object_and_type():
    mask = _mask()

    def draw(seed, image, obj, t):
        p = protocol_prompts(mask, t, 20, prompt_rng(seed, image, obj, t))
        return p.boxes if p.boxes is not None else p.points

    for t in ("noisy_box_0.4", "point3"):
        np.testing.assert_array_equal(draw(0, 5, 2, t), draw(0, 5, 2, t))  # reproducible, any order
        assert not np.array_equal(draw(0, 5, 2, t), draw(1, 5, 2, t))
        assert not np.array_equal(draw(0, 5, 2, t), draw(0, 6, 2, t))
        assert not np.array_equal(draw(0, 5, 2, t), draw(0, 5, 3, t))
    with pytest.raises(ValueError):
        protocol_prompts(mask, "lasso", 20, np.random.default_rng(0))


def test_rts_prompt_mix_is_equal_and_seeded():
    mask = _mask()
    cfg = RTSConfig(max_box_noise=0.5, max_points=3)
    rng = np.random.default_rng(0)
    prompts = [draw_prompt(mask, cfg, rng) for _ in range(3000)]
    kinds = [p.kind for p in prompts]
    for k in ("gt_box", "noisy_box", "points"):
        assert kinds.count(k) / len(kinds) == pytest.approx(1 / 3, abs=0.03)
    ks = [len(p.points) for p in prompts if p.kind == "points"]
    assert set(ks) == {1, 2, 3}
    assert all(p.labels.tolist() == [1] * len(p.points) for p in prompts if p.kind == "points")
    gt = mask_to_box(mask)
    noisy = np.stack([p.box for p in prompts if p.kind == "noisy_box"])
    w = gt[2] - gt[0]
    # Scale drawn up to 0.5: width changes stay within 0.5 * w.
    assert np.abs((noisy[:, 2] - noisy[:, 0]) - w).max() <= 0.5 * w + 1e-3
    again = [draw_prompt(mask, cfg, np.random.default_rng(0)) for _ in range(1)]
    assert again[0].kind == prompts[0].kind
    with_neg = RTSConfig(negative_prob=1.0, mix=(0, 0, 1))
    p = draw_prompt(mask, with_neg, np.random.default_rng(3))
    assert p.labels[-1] == 0 and not mask[int(p.points[-1, 1]), int(p.points[-1, 0])]
