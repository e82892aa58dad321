"""Per-image records -> the job's outputs: one COCO JSON (merged deterministically, written
atomically) and, optionally, one PNG per mask.

The merge follows the work list's order, never the order images finished in: images in input
order, objects in their order within an image, annotation ids 1..N along that order. So any set of
workers that produced the same records writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
from PIL import Image

from ..checkpoint import atomic_write
from .items import WorkList


def build_coco(work: WorkList, records: Mapping[int, Dict[str, Any]], info: Dict[str, Any]) -> Dict[str, Any]:
    """The COCO instances dict of every item that has a record. Each annotation keeps the standard
    fields (RLE ``segmentation``, ``area``, ``bbox``, ``iscrowd`` 0, ``score``) and, under
    ``stable_sam``, the prompt it came from, the input's id for it, the stability and DRP weights."""
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    for item in work.items:
        rec = records.get(item.image_id)
        if rec is None:
            continue
        images.append({"id": item.image_id, "file_name": item.file_name, "width": rec["width"],
                       "height": rec["height"]})
        for obj in rec["objects"]:
            annotations.append({
                "id": len(annotations) + 1, "image_id": item.image_id, "category_id": obj["category_id"],
                "segmentation": obj["segmentation"], "area": obj["area"], "bbox": obj["bbox"], "iscrowd": 0,
                "score": obj["score"],
                "stable_sam": {"source_id": obj["source_id"], "prompt": obj["prompt"], "predicted_iou": obj["score"],
                               "stability": obj["stability"], "alpha": obj["alpha"]},
            })
    return {"info": info, "images": images, "annotations": annotations, "categories": list(work.categories)}


def mask_png_paths(png_dir: Path, file_name: str, count: int) -> List[Path]:
    """``png_dir/<dir of file_name>/<stem>_mask_<k>.png``: the layout ``stable_sam.data.folder`` reads."""
    rel = PurePosixPath(file_name.replace("\\", "/"))
    folder = Path(png_dir).joinpath(*rel.parent.parts) if rel.parent.parts else Path(png_dir)
    return [folder / f"{rel.stem}_mask_{k}.png" for k in range(count)]


def write_mask_pngs(png_dir: Path, file_name: str, masks: Sequence[np.ndarray]) -> List[Path]:
    """One 8-bit PNG per mask (0 / 255), each written atomically. PNG level 1: masks compress well
    at any level, and level 6 costs several times the time on large images."""
    paths = mask_png_paths(png_dir, file_name, len(masks))
    for path, mask in zip(paths, masks):
        # a unique temporary name: a retried Ray shard may write the same mask at the same time
        atomic_write(path, lambda f, m=mask: Image.fromarray(np.asarray(m, dtype=np.uint8) * 255).save(
            f, format="PNG", compress_level=1))
    return paths
