"""A folder of images with one mask PNG per object.

Layouts understood (``S`` is an image's file stem):

- flat: ``root/S.jpg`` with ``root/S_mask_0.png``, ``root/S_mask_1.png``, ... (like ``examples/``);
- split: images in ``root/images/`` (or ``root/im/``), masks in ``root/masks/`` (or ``root/gt/``,
  or ``masks_dir``) named ``S_mask_<k>.png``, or ``S.png`` for one object per image, which is the
  layout of the HQ-SAM benchmark sets (DIS-VD ``im/`` + ``gt/``, COIFT, HR-SOD, ThinObject-5K).

A mask pixel is foreground when its grey level (or alpha) is above 127.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

from .dataset import DatasetError, Sample, SegmentationDataset, check_sample, load_image, load_mask_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_MASK_NAME = re.compile(r"^(?P<stem>.+)_mask_(?P<k>\d+)$")


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


class FolderDataset(SegmentationDataset):
    """Images and per-object mask PNGs; every image must have at least one mask file."""

    def __init__(self, root: Path, masks_dir: Optional[Path] = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder not found: {root}")
        image_dir = next((root / d for d in ("images", "im") if (root / d).is_dir()), root)
        if masks_dir is None:
            masks_dir = next((root / d for d in ("masks", "gt") if (root / d).is_dir()), image_dir)
        masks_dir = Path(masks_dir)
        if not masks_dir.is_dir():
            raise DatasetError(f"mask folder not found: {masks_dir}")
        separate = masks_dir.resolve() != image_dir.resolve()
        mask_files: Dict[str, List[Path]] = {}
        for p in sorted(masks_dir.iterdir(), key=_natural_key):
            if p.suffix.lower() != ".png":
                continue
            m = _MASK_NAME.match(p.stem)
            if m:
                mask_files.setdefault(m.group("stem"), []).append(p)
            elif separate:
                mask_files.setdefault(p.stem, []).append(p)
        images = [p for p in sorted(image_dir.iterdir(), key=_natural_key)
                  if p.suffix.lower() in IMAGE_SUFFIXES and not _MASK_NAME.match(p.stem)]
        if not images:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        missing = [p.name for p in images if p.stem not in mask_files]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) in {image_dir} have no mask in {masks_dir} "
                               f"(expected <stem>_mask_<k>.png{' or <stem>.png' if separate else ''}): "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.images = images
        self.mask_files = [mask_files[p.stem] for p in images]
        self.description = f"folder {root} ({len(images)} images)"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        path = self.images[index]
        image = load_image(path)
        masks = [load_mask_png(p) for p in self.mask_files[index]]
        check_sample(image, masks, [p.name for p in self.mask_files[index]], str(path))
        return Sample(image, masks, path.name)
