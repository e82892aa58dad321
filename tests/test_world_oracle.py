"""The region-fit oracle: what choosing among a world's regions alone costs (research/world_oracle.py)."""

import numpy as np
import pytest

from stable_sam.data.sources import open_dataset
from stable_sam.evaluation import ProtocolConfig
from stable_sam.prompts import box_iou, mask_to_box
from research.world_oracle import containing, region_fit, region_fit_oracle


def square(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_a_box_picks_the_region_it_fits_and_points_the_regions_that_hold_them():
    obj = square(64, 64, 20, 20, 36, 36)
    container = square(64, 64, 12, 12, 44, 44)  # the object lies on it
    part = square(64, 64, 20, 20, 28, 36)
    targets = [obj, container, part]
    boxes = [mask_to_box(t) for t in targets]
    assert region_fit(boxes, mask_to_box(obj)) == 0
    assert region_fit(boxes, np.array([11.0, 13, 45, 43])) == 1  # a loose box fits the container
    assert region_fit(boxes, np.array([19.0, 19, 29, 37])) == 2  # a cut box fits the part
    assert box_iou(np.array([0, 0, 2, 2]), np.array([1, 0, 3, 2])) == pytest.approx(1 / 3)
    on_part = np.array([[22.5, 30.5]])
    assert [t is part for t in containing(targets, on_part)] == [False, False, True]
    spread = np.array([[22.5, 30.5], [33.5, 22.5], [30.5, 30.5]])
    assert {id(t) for t in containing(targets, spread)} == {id(obj), id(container)}


def test_the_oracle_on_the_region_world():
    split = open_dataset("regions:heldout", limit=3, start=1000)
    cfg = ProtocolConfig(prompts_per_object=4)
    out = region_fit_oracle(split, cfg)
    assert list(out["types"]) == ["gt_box", "noisy_box_0.2", "noisy_box_0.4", "point1", "point3"]
    assert all(0 <= v <= 100 for v in out["types"].values())
    # A tight box fits its own object best unless another region shares its box exactly.
    assert out["types"]["gt_box"] >= 95
    assert out["noisy04_over_gt"] == pytest.approx(out["types"]["noisy_box_0.4"] / out["types"]["gt_box"], abs=1e-3)
    assert 0 <= out["noisy04_other_region_share"] <= 100
    assert region_fit_oracle(split, cfg) == out  # seeded: the benchmark's prompts


def test_the_oracle_needs_region_targets():
    with pytest.raises(ValueError, match="region world"):
        region_fit_oracle(open_dataset("synthetic:heldout", limit=2, start=1000), ProtocolConfig(prompts_per_object=2))
