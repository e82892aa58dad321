"""training/ (how the shipped small SAM is trained): the timed pretraining step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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


def test_packed_photos_unpack_to_the_same_folder_dataset(tmp_path):
    """The GPU run's data copy: masks byte-equal, photos re-encoded at the same size."""
    import tarfile

    import numpy as np

    from stable_sam.data.folder import FolderDataset
    from training.pack_photos import pack_photos

    source = Path(__file__).resolve().parents[1] / "examples" / "photos"
    counts = pack_photos([source], tmp_path / "photos.tar.gz", quality=80)
    with tarfile.open(tmp_path / "photos.tar.gz") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    original, packed = FolderDataset(source), FolderDataset(tmp_path / "out" / "photos")
    assert len(packed) == len(original) == counts["images"] > 0
    assert counts["image_bytes_after"] < counts["image_bytes_before"]
    for a, b in zip(original, packed):
        assert a.name == b.name and len(a.masks) == len(b.masks)
        assert all(np.array_equal(ma, mb) for ma, mb in zip(a.masks, b.masks))
        assert a.image.shape == b.image.shape
        assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 8
