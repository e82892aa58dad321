"""One interface over every annotated-image source: ``len(ds)``, ``ds[i] -> Sample``.

A sample is an RGB image and the masks of its annotated objects, all at the image's size and all
non-empty. Loaders check that on the way in and raise ``DatasetError`` naming the file at fault,
so training and benchmarks never meet a mismatched or empty mask halfway through a run.
``open_dataset(spec)`` picks the loader from a path (folder, COCO JSON, Label Studio JSON export)
or a ``synthetic:<split>`` spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

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


def json_kind(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not readable JSON: {e}") from e
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, list):
        return "label_studio"
    raise DatasetError(f"{path}: neither a COCO instance file (dict with 'images' and 'annotations') "
                       f"nor a Label Studio JSON export (a list of tasks)")


def open_dataset(spec: Union[str, Path], image_root: Optional[Path] = None,
                 masks_dir: Optional[Path] = None, limit: Optional[int] = None,
                 start: int = 0) -> SegmentationDataset:
    """The dataset a CLI argument names.

    - ``synthetic:heldout`` / ``synthetic:train`` / ``synthetic:<seed>``: generated scenes of the
      objects-only world, ``regions:heldout`` / ``regions:train`` / ``regions:unseen`` (held-out
      shape families) / ``regions:<seed>``: of the region world (``start`` and ``limit`` pick the
      indices; ``limit`` is required, the generators are endless);
    - a folder: images with per-object mask PNGs (``FolderDataset``; ``masks_dir`` optional);
    - a ``.json`` file: COCO instances or a Label Studio export, told apart by content; image
      paths resolve against ``image_root`` (default: the JSON file's folder).
    """
    from .coco import CocoDataset
    from .folder import FolderDataset
    from .label_studio_export import LabelStudioExport
    from .synthetic_split import WORLDS, SyntheticSplit, parse_synthetic_seed

    text = str(spec)
    world, _, split = text.partition(":")
    if split and world in WORLDS:
        if limit is None:
            raise DatasetError("a synthetic dataset needs a number of images (limit)")
        return SyntheticSplit(parse_synthetic_seed(split, world), start=start, count=limit, world=world,
                              unseen=split == "unseen")
    path = Path(spec)
    if path.is_dir():
        ds: SegmentationDataset = FolderDataset(path, masks_dir=masks_dir)
    elif path.is_file() and path.suffix.lower() == ".json":
        root = image_root if image_root is not None else path.parent
        ds = CocoDataset(path, root) if json_kind(path) == "coco" else LabelStudioExport(path, root)
    elif not path.exists():
        raise DatasetError(f"dataset not found: {path} (a folder, a .json file or synthetic:heldout)")
    else:
        raise DatasetError(f"{path}: expected a folder or a .json annotation file")
    if start or limit is not None:
        ds = Subset(ds, range(start, min(len(ds), start + limit) if limit is not None else len(ds)))
    return ds


class Subset(SegmentationDataset):
    """The samples of ``base`` at ``indices``."""

    def __init__(self, base: SegmentationDataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)
        self.description = f"{base.description} [{len(self.indices)} of {len(base)}]"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        return self.base[self.indices[index]]
