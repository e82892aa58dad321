"""COCO instance annotations (polygons, RLE or uncompressed RLE), decoded with pycocotools.

Every non-crowd annotation is one object. Images without one are left out. The size recorded in
the JSON must match the image file, and an annotation that rasterises to nothing is an error
(``skip_empty=True`` drops it instead: real annotation files have a few degenerate polygons).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import List

from .dataset import DatasetError, Sample, SegmentationDataset, check_sample, load_image


class CocoDataset(SegmentationDataset):
    """``annotation_file``: COCO instances JSON; ``image_root``: folder the ``file_name`` s are in."""

    def __init__(self, annotation_file: Path, image_root: Path, skip_empty: bool = False,
                 include_crowd: bool = False) -> None:
        from pycocotools.coco import COCO

        annotation_file, self.image_root = Path(annotation_file), Path(image_root)
        if not annotation_file.is_file():
            raise DatasetError(f"COCO annotation file not found: {annotation_file}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(annotation_file))
        except Exception as e:  # pycocotools raises bare asserts and KeyErrors on bad files
            raise DatasetError(f"{annotation_file} is not a valid COCO instance file: {e!r}") from e
        self.skip_empty, self.include_crowd = skip_empty, include_crowd
        self.image_ids: List[int] = [
            i for i in sorted(self.coco.getImgIds())
            if self.coco.getAnnIds(imgIds=[i], iscrowd=None if include_crowd else False)]
        if not self.image_ids:
            raise DatasetError(f"{annotation_file}: no image has an instance annotation")
        self.description = f"COCO {annotation_file} ({len(self.image_ids)} images)"

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        info = self.coco.loadImgs([self.image_ids[index]])[0]
        path = self.image_root / info["file_name"]
        image = load_image(path)
        h, w = image.shape[:2]
        if (info.get("height"), info.get("width")) != (h, w):
            raise DatasetError(f"{path}: the annotation file says {info.get('width')} x {info.get('height')} "
                               f"(W x H), the image is {w} x {h}")
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[info["id"]],
                                                      iscrowd=None if self.include_crowd else False))
        masks, names = [], []
        for ann in anns:
            try:
                mask = self.coco.annToMask(ann).astype(bool)
            except Exception as e:
                raise DatasetError(f"{path}: annotation {ann.get('id')} cannot be decoded: {e!r}") from e
            if self.skip_empty and not mask.any():
                continue
            masks.append(mask)
            names.append(f"annotation {ann.get('id')}")
        check_sample(image, masks, names, str(path))
        return Sample(image, masks, info["file_name"])
