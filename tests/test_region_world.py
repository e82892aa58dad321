"""The region world (research/): scenes in which every region is a mask target, as in SA-1B."""

from __future__ import annotations

import numpy as np
import pytest

from stable_sam.data.sources import open_dataset
from research.region_world import (ALL_FAMILIES, CONTAINER, GROUP, OBJECT, PART, STUFF, TRAIN_FAMILIES, UNSEEN_FAMILIES,
                                     RegionScenes, draw_family)
from stable_sam.data.synthetic_split import world_scenes


def test_scenes_are_a_pure_function_of_seed_and_index():
    a, b = RegionScenes(seed=5)[3], RegionScenes(seed=5)[3]
    assert np.array_equal(a.image, b.image) and len(a.targets) == len(b.targets)
    assert all(np.array_equal(x, y) for x, y in zip(a.targets, b.targets))
    c = RegionScenes(seed=6)[3]
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)


def test_every_granularity_is_a_target_and_objects_are_what_is_evaluated():
    scenes = RegionScenes(seed=11)
    kinds = set()
    for i in range(30):
        s = scenes[i]
        kinds.update(s.target_kinds)
        assert len(s.targets) == len(s.target_kinds)
        objects = [t for t, k in zip(s.targets, s.target_kinds) if k == OBJECT]
        assert len(objects) == len(s.masks) and all(np.array_equal(a, b) for a, b in zip(objects, s.masks))
        for t, k in zip(s.targets, s.target_kinds):
            assert t.shape == s.image.shape[:2] and t.any()
            if k == PART:  # a part lies inside one annotated object and is smaller than it
                assert any((t & ~m).sum() == 0 and t.sum() < m.sum() for m in s.masks)
            if k == STUFF:  # background: no object pixel
                assert not any((t & m).any() for m in s.masks)
            if k == GROUP:  # the union of two or more objects
                inside = [m for m in s.masks if (m & t).sum() == m.sum()]
                assert len(inside) >= 2
            if k == CONTAINER:  # a larger region with an annotated object lying on it
                on_it = [m for m in s.masks if (m & ~t).sum() == 0]
                assert on_it and all(m.sum() < t.sum() for m in on_it)
        assert s.training_targets is s.targets
    assert kinds == {OBJECT, PART, GROUP, STUFF, CONTAINER}


def test_every_family_draws_a_shape_and_unseen_families_stay_out_of_training():
    rng = np.random.default_rng(0)
    for family in ALL_FAMILIES:
        mask, parts = draw_family(rng, family, 128, 128, 64.0, 64.0, 30.0)
        assert 50 < mask.sum() < 128 * 128, family
        assert all((p & ~mask).sum() == 0 for p in parts)
    assert not set(UNSEEN_FAMILIES) & set(TRAIN_FAMILIES)
    unseen = world_scenes("regions", "unseen")
    assert set(k for i in range(10) for k in unseen[i].kinds) <= set(UNSEEN_FAMILIES)
    trained = world_scenes("regions", "train")
    assert set(k for i in range(10) for k in trained[i].kinds) <= set(TRAIN_FAMILIES)
    with pytest.raises(ValueError, match="unknown shape families"):
        RegionScenes(families=("ellipse", "dragon"))


def test_dataset_specs_name_both_worlds():
    assert open_dataset("regions:heldout", limit=2).description == "regions heldout scenes 0..1"
    assert open_dataset("regions:unseen", limit=1, start=4).description == "regions unseen scenes 4..4"
    assert open_dataset("synthetic:heldout", limit=1).description == "synthetic heldout scenes 0..0"


def test_a_touching_object_only_picks_from_objects_actually_drawn():
    # Scene 529 of this seed draws an empty shape before a touching one: indexing the touched
    # object by the loop counter ran past the list (the crash that stopped a training run).
    from research.region_world import REGIONS_TRAIN_SEED

    scene = RegionScenes(seed=REGIONS_TRAIN_SEED + 1)[529]
    assert scene.masks and len(scene.targets) >= len(scene.masks)
