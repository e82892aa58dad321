"""One interface over every annotated-image source: ``len(ds)``, ``ds[i] -> Sample``.

A sample is an RGB image and the masks of its annotated objects, all at the image's size and all
non-empty. Loaders check that on the way in and raise ``DatasetError`` naming the file at fault,
so training and benchmarks never meet a mismatched or empty mask halfway through a run.
``stable_sam.data.sources.open_dataset(spec)`` picks the loader from a path (folder, COCO JSON,
Label Studio JSON export) or a ``synthetic:<split>`` spec (the loaders import this module, never
the other way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..prompts import ObjectPrompt  # noqa: F401 - re-exported: a Sample's prompts


class DatasetError(ValueError):
    """Bad dataset input (missing file, unreadable image, size mismatch, empty mask); says which."""


@dataclass
class Sample:
    """image: H x W x 3 uint8 RGB; masks: one H x W bool per object, each non-empty; name: where
    it came from (file name or generator index), used in messages and figures. ``prompts``: when
    the source has them (an annotator's boxes / clicks), one per mask, None for a mask without."""

    image: np.ndarray
    masks: List[np.ndarray]
    name: str
    prompts: Optional[List[Optional[ObjectPrompt]]] = None


class SegmentationDataset:
    """Base class of the loaders: a sized, indexable collection of ``Sample``."""

    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def load_image(path: Path) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB, EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def load_mask_png(path: Path) -> np.ndarray:
    """A mask image as H x W bool: grey level > 127 (alpha for images with transparency)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"mask file not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            band = im.getchannel("A") if im.mode in ("RGBA", "LA") else im.convert("L")
            return np.asarray(band) > 127
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}") from e


def check_sample(image: np.ndarray, masks: Sequence[np.ndarray], names: Sequence[str], where: str) -> None:
    """Raise ``DatasetError`` unless every mask is non-empty and the image's size."""
    h, w = image.shape[:2]
    if not masks:
        raise DatasetError(f"{where}: no object masks")
    for m, name in zip(masks, names):
        if m.shape != (h, w):
            raise DatasetError(f"{where}: mask {name} is {m.shape[1]} x {m.shape[0]} (W x H) "
                               f"but the image is {w} x {h}")
        if not m.any():
            raise DatasetError(f"{where}: mask {name} is empty")


class Concat(SegmentationDataset):
    """The samples of several datasets, one after another."""

    def __init__(self, parts: Sequence[SegmentationDataset]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.description = " + ".join(p.description for p in self.parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]


class Subset(SegmentationDataset):
    """The samples of ``base`` at ``indices``."""

    def __init__(self, base: SegmentationDataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)
        self.description = f"{base.description} [{len(self.indices)} of {len(base)}]"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        return self.base[self.indices[index]]
