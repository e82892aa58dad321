"""A synthetic generator as a ``SegmentationDataset``: a seed and a range of scene indices.

The package knows one world, "synthetic" (objects only, ``synthetic.py``): the held-out scenes the
benchmark reads by default, and what the small SAM was trained on. Another generator can be named
in dataset specs (``<world>:<split>``) and by pretraining once it is registered with
``register_world`` (the region world of ``research/`` registers itself this way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

from .dataset import DatasetError, Sample, SegmentationDataset
from .synthetic import HELDOUT_SEED, TRAIN_SEED, Scene, SyntheticScenes

SPLITS = {"train": TRAIN_SEED, "heldout": HELDOUT_SEED}


@dataclass(frozen=True)
class World:
    """A named scene generator.

    Attributes:
        scenes: ``scenes(seed, size, unseen)`` -> the endless scenes of ``seed``, ``size`` px on the
            long side (``unseen``: the world's held-out shape families, where it has them).
        splits: split name ("train", "heldout") -> seed.
        unseen_seed: the seed of the "unseen" split (held-out shape families); None: no such split.
    """

    scenes: Callable[[int, int, bool], Sequence[Scene]]
    splits: Dict[str, int]
    unseen_seed: Optional[int] = None


WORLDS: Dict[str, World] = {
    "synthetic": World(lambda seed, size, unseen: SyntheticScenes(seed=seed, size=size), SPLITS),
}


def register_world(name: str, world: World) -> None:
    """Make ``name`` a world that ``world_scenes``, ``SyntheticSplit`` and dataset specs
    (``name:<split>``) know."""
    WORLDS[name] = world


def _world(name: str, error: type = ValueError) -> World:
    if name not in WORLDS:
        raise error(f"unknown synthetic world {name!r}; expected one of {tuple(WORLDS)}")
    return WORLDS[name]


def world_scenes(world: str, split: str, offset: int = 0, size: int = 256) -> Sequence[Scene]:
    """The scene generator of a registered ``world`` ("synthetic": objects only) for ``split``
    ("train" / "heldout"; "unseen": the held-out seed with shape families never trained on, where
    the world has them), its seed moved by ``offset`` (a training run's own stream of scenes)."""
    w = _world(world)
    if split == "unseen" and w.unseen_seed is not None:
        return w.scenes(w.unseen_seed + offset, size, True)
    return w.scenes(w.splits[split] + offset, size, False)


def _named_splits(w: World) -> Dict[str, int]:
    return {**w.splits, **({"unseen": w.unseen_seed} if w.unseen_seed is not None else {})}


def parse_synthetic_seed(text: str, world: str = "synthetic") -> int:
    """``train`` / ``heldout`` / an integer seed (``unseen`` where the world has it: see ``world_scenes``)."""
    splits = _named_splits(_world(world, DatasetError))
    if text in splits:
        return splits[text]
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{world} split must be one of {sorted(splits)} or an integer seed, got {text!r}") from None


class SyntheticSplit(SegmentationDataset):
    """Scenes ``start .. start + count - 1`` of a registered world's generator (``world``:
    "synthetic" by default; ``unseen``: the world's held-out shape families). A scene whose
    objects all fell under ``min_area`` comes back with no masks; training and evaluation skip it."""

    def __init__(self, seed: int, start: int = 0, count: int = 100, size: int = 256, world: str = "synthetic",
                 unseen: bool = False) -> None:
        if count < 1 or start < 0:
            raise DatasetError(f"synthetic split needs start >= 0 and count >= 1, got {start}, {count}")
        w = _world(world, DatasetError)
        self.scenes: Sequence[Scene] = w.scenes(seed, size, unseen)
        splits = _named_splits(w) if unseen else dict(w.splits)
        if w.unseen_seed is not None:
            splits = {k: v for k, v in splits.items() if (k == "unseen") == unseen}
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
