"""A Label Studio JSON export whose annotations are brush masks (RLE, decoded by label-studio-sdk).

Each task is one image; each ``brushlabels`` result of its annotation is one object. The annotation
used is the one marked ground truth, else the first that was not cancelled; tasks without brush
results are left out. Image URLs as Label Studio writes them (``/data/upload/3/ab12-x.png``,
``/data/local-files/?d=dir/x.png``, plain paths) are resolved against ``image_root``: the path
after ``/data/``, the ``d`` path of local files, then the bare file name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from .dataset import DatasetError, Sample, SegmentationDataset, check_sample, load_image


def decode_brush(result: Dict[str, Any], where: str) -> np.ndarray:
    """A ``brushlabels`` result -> H x W bool (RGBA RLE; the alpha channel is the mask)."""
    from label_studio_sdk.converter.brush import decode_rle

    value = result.get("value", {})
    w, h = result.get("original_width"), result.get("original_height")
    if not isinstance(w, int) or not isinstance(h, int) or w < 1 or h < 1:
        raise DatasetError(f"{where}: brush result {result.get('id')} lacks original_width/original_height")
    if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
        raise DatasetError(f"{where}: brush result {result.get('id')} has no RLE mask")
    try:
        flat = decode_rle(value["rle"])
    except Exception as e:  # a truncated bit stream raises IndexError deep inside the decoder
        raise DatasetError(f"{where}: brush result {result.get('id')} has a corrupt RLE: {e!r}") from e
    if flat.size != h * w * 4:
        raise DatasetError(f"{where}: brush result {result.get('id')} decodes to {flat.size // 4} pixels, "
                           f"but original_width x original_height is {w} x {h} = {w * h}")
    return flat.reshape(h, w, 4)[:, :, 3] > 127


class LabelStudioExport(SegmentationDataset):
    """``export_file``: the JSON export (a list of tasks); ``image_root``: where its images are."""

    def __init__(self, export_file: Path, image_root: Path, image_key: Optional[str] = None) -> None:
        export_file, self.image_root = Path(export_file), Path(image_root)
        if not export_file.is_file():
            raise DatasetError(f"Label Studio export not found: {export_file}")
        try:
            tasks = json.loads(export_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{export_file} is not readable JSON: {e}") from e
        if not isinstance(tasks, list):
            raise DatasetError(f"{export_file}: a Label Studio JSON export is a list of tasks")
        self.image_key = image_key
        self.items: List[Dict[str, Any]] = []
        for n, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise DatasetError(f"{export_file}: task #{n} has no 'data' object")
            results = self._brush_results(task)
            if results:
                self.items.append({"task": task, "results": results})
        if not self.items:
            raise DatasetError(f"{export_file}: no task has a brush (brushlabels) annotation")
        self.description = f"Label Studio export {export_file} ({len(self.items)} tasks)"

    @staticmethod
    def _brush_results(task: Dict[str, Any]) -> List[Dict[str, Any]]:
        anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        anns.sort(key=lambda a: not a.get("ground_truth", False))  # stable: ground truth first
        for ann in anns:
            res = [r for r in ann.get("result") or [] if r.get("type") == "brushlabels"]
            if res:
                return res
        return []

    def _image_url(self, task: Dict[str, Any]) -> str:
        data = task["data"]
        if self.image_key is not None:
            key = self.image_key
        elif "image" in data:
            key = "image"
        else:
            strings = [k for k, v in data.items() if isinstance(v, str)]
            if len(strings) != 1:
                raise DatasetError(f"task {task.get('id')}: cannot tell which data field is the image "
                                   f"({sorted(data)}); pass image_key")
            key = strings[0]
        if not isinstance(data.get(key), str):
            raise DatasetError(f"task {task.get('id')}: data field {key!r} is not an image URL")
        return data[key]

    def resolve_image(self, url: str) -> Path:
        """The local file of an image URL from the export; ``DatasetError`` listing what was tried."""
        parsed = urlparse(url)
        path = unquote(parsed.path)
        candidates = []
        if "d" in parse_qs(parsed.query):
            candidates.append(self.image_root / unquote(parse_qs(parsed.query)["d"][0]).lstrip("/"))
        if "/data/" in path:
            candidates.append(self.image_root / path.split("/data/", 1)[1])
        if not parsed.scheme and Path(path).is_absolute():
            candidates.append(Path(path))
        candidates.append(self.image_root / Path(path).name)
        for c in candidates:
            if c.is_file():
                return c
        raise DatasetError(f"image {url!r} not found; tried {', '.join(str(c) for c in candidates)}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        task, results = self.items[index]["task"], self.items[index]["results"]
        path = self.resolve_image(self._image_url(task))
        where = f"task {task.get('id')} ({path.name})"
        image = load_image(path)
        for r in results:
            if r.get("image_rotation", 0):
                raise DatasetError(f"{where}: rotated images (image_rotation={r['image_rotation']}) are not supported")
        masks = [decode_brush(r, where) for r in results]
        check_sample(image, masks, [f"result {r.get('id')}" for r in results], where)
        return Sample(image, masks, path.name)
