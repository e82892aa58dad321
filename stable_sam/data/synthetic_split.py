"""The synthetic generator as a ``SegmentationDataset``: a seed and a range of scene indices."""

from __future__ import annotations

from typing import Sequence

from .dataset import DatasetError, Sample, SegmentationDataset
from .regions import REGIONS_HELDOUT_SEED, REGIONS_TRAIN_SEED, TRAIN_FAMILIES, UNSEEN_FAMILIES, RegionScenes
from .synthetic import HELDOUT_SEED, TRAIN_SEED, Scene, SyntheticScenes

SPLITS = {"train": TRAIN_SEED, "heldout": HELDOUT_SEED}
REGION_SPLITS = {"train": REGIONS_TRAIN_SEED, "heldout": REGIONS_HELDOUT_SEED}
WORLDS = ("synthetic", "regions")


def world_scenes(world: str, split: str, offset: int = 0, size: int = 256) -> Sequence[Scene]:
    """The scene generator of a synthetic ``world`` ("synthetic": objects only; "regions": every
    region a target) for ``split`` ("train" / "heldout"; "unseen": held-out seed, shape families
    never trained on), its seed moved by ``offset`` (a training run's own stream of scenes)."""
    if world == "synthetic":
        return SyntheticScenes(seed=SPLITS[split] + offset, size=size)
    if world == "regions":
        if split == "unseen":
            return RegionScenes(seed=REGIONS_HELDOUT_SEED + offset, size=size, families=UNSEEN_FAMILIES)
        return RegionScenes(seed=REGION_SPLITS[split] + offset, size=size)
    raise ValueError(f"unknown synthetic world {world!r}; expected one of {WORLDS}")


def parse_synthetic_seed(text: str, world: str = "synthetic") -> int:
    """``train`` / ``heldout`` / an integer seed (``unseen`` for the region world: see ``world_scenes``)."""
    splits = SPLITS if world == "synthetic" else {**REGION_SPLITS, "unseen": REGIONS_HELDOUT_SEED}
    if text in splits:
        return splits[text]
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{world} split must be one of {sorted(splits)} or an integer seed, got {text!r}") from None


class SyntheticSplit(SegmentationDataset):
    """Scenes ``start .. start + count - 1`` of a synthetic world's generator (``world``:
    "synthetic" or "regions"; ``unseen``: the region world's held-out shape families). A scene
    whose objects all fell under ``min_area`` comes back with no masks; training and evaluation
    skip it."""

    def __init__(self, seed: int, start: int = 0, count: int = 100, size: int = 256, world: str = "synthetic",
                 unseen: bool = False) -> None:
        if count < 1 or start < 0:
            raise DatasetError(f"synthetic split needs start >= 0 and count >= 1, got {start}, {count}")
        if world == "synthetic":
            self.scenes: Sequence[Scene] = SyntheticScenes(seed=seed, size=size)
            splits = SPLITS
        elif world == "regions":
            families = UNSEEN_FAMILIES if unseen else TRAIN_FAMILIES
            self.scenes = RegionScenes(seed=seed, size=size, families=families)
            splits = {**REGION_SPLITS, **({"unseen": REGIONS_HELDOUT_SEED} if unseen else {})}
            splits = {k: v for k, v in splits.items() if (k == "unseen") == unseen}
        else:
            raise DatasetError(f"unknown synthetic world {world!r}; expected one of {WORLDS}")
        self.seed, self.start, self.count = seed, start, count
        name = next((k for k, v in splits.items() if v == seed), f"seed {seed}")
        self.description = f"{world} {name} scenes {start}..{start + count - 1}"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        scene = self.scenes[self.start + index]
        return Sample(scene.image, scene.masks, f"{self.description.split(' scenes')[0]}[{self.start + index}]")
