"""The failure profile (stable_sam/mask_errors.py, scripts/failure_profile.py): where masks go wrong
under each prompt type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stable_sam.data.sources import open_dataset
from stable_sam.mask_errors import (band_around, click_summary, error_pixels, negative_click_point, negative_clicks,
                                    outside_box_share, split_by_iou_before)

ROOT = Path(__file__).resolve().parents[1]


def test_error_parts_split_every_wrong_pixel_once():
    gt = np.zeros((20, 20), bool)
    gt[5:10, 5:10] = True                                  # 25 px
    other = np.zeros_like(gt)
    other[5:10, 12:15] = True
    pred = np.zeros((1, 20, 20), bool)
    pred[0, 5:10, 5:8] = True                              # 15 of the object: 10 missed
    pred[0, 5:10, 12:14] = True                            # 10 on the neighbour
    pred[0, 10, 5:10] = True                               # 5 in the band (d = 1)
    pred[0, 18:20, 0:5] = True                             # 10 far away
    fn, neigh, band, far = error_pixels(pred, gt, other, band_around(gt, 1))[0]
    assert (fn, neigh, band, far) == (10, 10, 5, 10)
    assert error_pixels(gt[None], gt, other, band_around(gt, 1)).sum() == 0
    boxes = np.array([[5, 5, 10, 10], [5, 5, 7.5, 10]], np.float32)
    assert np.allclose(outside_box_share(gt, boxes), [0.0, 0.4])


def test_a_negative_click_goes_deep_inside_the_largest_spill():
    spill = np.zeros((30, 40), bool)
    spill[2:5, 2:5] = True                                 # small component
    spill[10:21, 20:31] = True                             # largest: 11 x 11, centre pixel (25, 15)
    assert negative_click_point(spill).tolist() == [25.5, 15.5]
    spill[:] = False
    spill[0:3, 0:9] = True                                 # on the image border: still inside, off the edge
    x, y = negative_click_point(spill)
    assert spill[int(y), int(x)] and int(y) == 1


def test_click_summary_counts_the_cases_whose_iou_rose_and_bins_them_by_the_first_iou():
    cases = [(0.2, 0.5), (0.7, 0.6), (0.9, 0.95), (0.65, 0.65)]
    assert click_summary(cases) == {"cases": 4, "raised_share": 50.0, "iou_before": 61.25, "iou_after": 67.5}
    assert split_by_iou_before(cases) == {"below 0.3": [(0.2, 0.5)], "0.3-0.6": [],
                                          "0.6-0.8": [(0.7, 0.6), (0.65, 0.65)], "0.8 and above": [(0.9, 0.95)]}


def test_negative_clicks_score_only_spilling_masks(tiny_model):
    from stable_sam.evaluation import Prompts
    from stable_sam.predictor import StableSamPredictor

    sample = open_dataset("synthetic:heldout", limit=1, start=1000)[0]
    predictor = StableSamPredictor(tiny_model)
    predictor.set_image(sample.image)
    whole = np.array([[0, 0, sample.image.shape[1], sample.image.shape[0]]], np.float64)  # spills everywhere
    prompts = [Prompts(boxes=np.repeat(whole, 2, axis=0)) for _ in sample.masks]
    cases = negative_clicks(predictor, prompts, sample.masks, use_plugin=False)
    assert 0 < len(cases) <= 2 * len(sample.masks)
    assert all(0 <= a < 1 and 0 <= b <= 1 for a, b in cases)  # a spilling mask's IoU is below 1


@pytest.mark.slow  # runs scripts/failure_profile.py in a subprocess
def test_failure_profile_script_json_contract(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "failure_profile.py"), "--images", "1", "--prompts", "2",
           "--threads", "1", "--no-progress", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(last) >= {"types", "noisy04_over_gt", "point1_over_point3", "outside_box_share", "negative_click"}
    neg = last["negative_click"]
    summary = {"cases", "raised_share", "iou_before", "iou_after"}
    assert neg is None or (set(neg) == summary | {"by_prompt", "by_iou_before"} and neg["cases"] >= 1
                           and 0 <= neg["raised_share"] <= 100)
    if neg is not None:  # each split partitions the cases
        for by in ("by_prompt", "by_iou_before"):
            assert all(set(row) == summary for row in neg[by].values())
            assert sum(row["cases"] for row in neg[by].values()) == neg["cases"]
        assert set(neg["by_prompt"]) <= {"noisy_box_0.4", "point1"}
    assert list(last["types"]) == ["gt_box", "noisy_box_0.2", "noisy_box_0.4", "point1", "point3"]
    for row in last["types"].values():
        assert set(row) == {"miou", "fn", "fp_neighbour", "fp_band", "fp_far"}
        assert 0 <= row["miou"] <= 100 and all(row[k] >= 0 for k in row)
    assert "world_oracle" not in last  # the region-fit oracle is research (research/world_oracle.py)
    types = last["types"]
    assert last["noisy04_over_gt"] == pytest.approx(types["noisy_box_0.4"]["miou"] / types["gt_box"]["miou"], abs=1e-3)
    bad = subprocess.run(cmd[:2] + ["--dataset", "synthetic:nowhere"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert bad.returncode == 2 and "synthetic split" in bad.stderr and "Traceback" not in bad.stderr
