"""The dataset a command-line argument names: ``open_dataset(spec)`` picks the loader from a path
(folder, COCO JSON, Label Studio JSON export) or a ``synthetic:<split>`` spec. Kept apart from
``dataset.py`` (the interface), which every loader imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from .coco import CocoDataset
from .dataset import Concat, DatasetError, SegmentationDataset, Subset
from .folder import FolderDataset
from .label_studio_export import LabelStudioExport
from .synthetic_split import WORLDS, SyntheticSplit, parse_synthetic_seed


def json_kind(path: Path) -> str:
    """"coco" or "label_studio": what a .json annotation file is, told by its content
    (``DatasetError`` for neither)."""
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


def is_generated(spec: Union[str, Path]) -> bool:
    """Whether ``spec`` names generated scenes (``<world>:<split>`` of a registered world, e.g.
    ``synthetic:heldout``): endless, so a command picks a default start and number of images for
    them."""
    world, _, split = str(spec).partition(":")
    return bool(split) and world in WORLDS


def open_dataset(spec: Union[str, Path], image_root: Optional[Path] = None,
                 masks_dir: Optional[Path] = None, limit: Optional[int] = None,
                 start: int = 0) -> SegmentationDataset:
    """The dataset a CLI argument names.

    - ``synthetic:heldout`` / ``synthetic:train`` / ``synthetic:<seed>``: generated scenes of the
      objects-only world, or ``<world>:<split>`` of another registered world (``research/``
      registers ``regions``; ``synthetic_split.register_world``) (``start`` and ``limit`` pick the
      indices; ``limit`` is required, the generators are endless);
    - a folder: images with per-object mask PNGs (``FolderDataset``; ``masks_dir`` optional);
    - a ``.json`` file: COCO instances or a Label Studio export, told apart by content; image
      paths resolve against ``image_root`` (default: the JSON file's folder);
    - several of these separated by commas: their samples one after another.
    """
    text = str(spec)
    if "," in text:  # several sets, one after another; start and limit count over all of them
        parts = [open_dataset(part.strip(), image_root=image_root, masks_dir=masks_dir)
                 for part in text.split(",") if part.strip()]
        ds = Concat(parts)
        if start or limit is not None:
            ds = Subset(ds, range(start, min(len(ds), start + limit) if limit is not None else len(ds)))
        return ds
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
