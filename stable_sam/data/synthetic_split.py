"""The synthetic generator as a ``SegmentationDataset``: a seed and a range of scene indices."""

from __future__ import annotations

from .dataset import DatasetError, Sample, SegmentationDataset
from .synthetic import HELDOUT_SEED, TRAIN_SEED, SyntheticScenes

SPLITS = {"train": TRAIN_SEED, "heldout": HELDOUT_SEED}


def parse_synthetic_seed(text: str) -> int:
    """``train`` / ``heldout`` / an integer seed."""
    if text in SPLITS:
        return SPLITS[text]
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"synthetic split must be one of {sorted(SPLITS)} or an integer seed, got {text!r}") from None


class SyntheticSplit(SegmentationDataset):
    """Scenes ``start .. start + count - 1`` of ``SyntheticScenes(seed)``. A scene whose objects
    all fell under ``min_area`` comes back with no masks; training and evaluation skip it."""

    def __init__(self, seed: int, start: int = 0, count: int = 100, size: int = 256) -> None:
        if count < 1 or start < 0:
            raise DatasetError(f"synthetic split needs start >= 0 and count >= 1, got {start}, {count}")
        self.scenes = SyntheticScenes(seed=seed, size=size)
        self.seed, self.start, self.count = seed, start, count
        name = next((k for k, v in SPLITS.items() if v == seed), f"seed {seed}")
        self.description = f"synthetic {name} scenes {start}..{start + count - 1}"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        scene = self.scenes[self.start + index]
        return Sample(scene.image, scene.masks, f"synthetic[{self.seed}][{self.start + index}]")
