"""Label Studio tasks whose annotations are brush masks (RLE, decoded by label-studio-sdk).

Each task is one image; each ``brushlabels`` result of its annotation is one object. The annotation
used is the one marked ground truth, else the first that was not cancelled that has brush results;
tasks without brush results are left out. ``LabelStudioTasks`` takes the task dicts (a JSON export,
or a live project's tasks in the same shape) and a callable that reads a task's image;
``LabelStudioExport`` is a JSON export file with its images on disk. Image URLs as Label Studio
writes them (``/data/upload/3/ab12-x.png``, ``/data/local-files/?d=dir/x.png``, plain paths) are
resolved against ``image_root``: the path after ``/data/``, the ``d`` path of local files, then
the bare file name.

The annotator's prompts (rectangles, keypoints) can come with the masks: ``prompts_for`` maps an
annotation's results and its decoded masks to one ``ObjectPrompt`` (or None) per mask. Reading
Label Studio's region format is the backend's business, so it is passed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from .dataset import DatasetError, ObjectPrompt, Sample, SegmentationDataset, check_sample, load_image

# task dict, image URL -> (H x W x 3 uint8 image, a name for messages)
ImageReader = Callable[[Dict[str, Any], str], Tuple[np.ndarray, str]]
# annotation results, its brush results, their decoded masks -> one prompt or None per mask
PromptBuilder = Callable[[List[Dict[str, Any]], List[Dict[str, Any]], List[np.ndarray]],
                         List[Optional[ObjectPrompt]]]


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


class LabelStudioTasks(SegmentationDataset):
    """Task dicts (``data``, ``annotations``) with brush annotations; images via ``read_image``."""

    def __init__(self, tasks: Sequence[Dict[str, Any]], read_image: ImageReader, description: str = "",
                 image_key: Optional[str] = None, prompts_for: Optional[PromptBuilder] = None) -> None:
        self.read_image, self.image_key, self.prompts_for = read_image, image_key, prompts_for
        self.items: List[Dict[str, Any]] = []
        for n, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise DatasetError(f"{description or 'tasks'}: task #{n} has no 'data' object")
            ann = self._annotation(task)
            if ann is not None:
                self.items.append({"task": task, "annotation": ann})
        self.description = f"{description or 'Label Studio tasks'} ({len(self.items)} tasks)"

    @staticmethod
    def _annotation(task: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The annotation whose brush masks are used: ground truth first, else the first one that
        was not cancelled and has brush results."""
        anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        anns.sort(key=lambda a: not a.get("ground_truth", False))  # stable: ground truth first
        for ann in anns:
            if any(isinstance(r, dict) and r.get("type") == "brushlabels" for r in ann.get("result") or []):
                return ann
        return None

    def key(self, index: int) -> str:
        """A stable identity of item ``index`` (the task id), e.g. for a held-out split."""
        task = self.items[index]["task"]
        return str(task.get("id", index))

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

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        task, ann = self.items[index]["task"], self.items[index]["annotation"]
        results = [r for r in ann.get("result") or [] if isinstance(r, dict)]
        brush = [r for r in results if r.get("type") == "brushlabels"]
        image, name = self.read_image(task, self._image_url(task))
        where = f"task {task.get('id')} ({name})"
        for r in brush:
            if r.get("image_rotation", 0):
                raise DatasetError(f"{where}: rotated images (image_rotation={r['image_rotation']}) are not supported")
        masks = [decode_brush(r, where) for r in brush]
        check_sample(image, masks, [f"result {r.get('id')}" for r in brush], where)
        prompts = self.prompts_for(results, brush, masks) if self.prompts_for is not None else None
        return Sample(image, masks, name, prompts)


class LabelStudioExport(LabelStudioTasks):
    """``export_file``: the JSON export (a list of tasks); ``image_root``: where its images are."""

    def __init__(self, export_file: Path, image_root: Path, image_key: Optional[str] = None,
                 prompts_for: Optional[PromptBuilder] = None) -> None:
        export_file, self.image_root = Path(export_file), Path(image_root)
        if not export_file.is_file():
            raise DatasetError(f"Label Studio export not found: {export_file}")
        try:
            tasks = json.loads(export_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{export_file} is not readable JSON: {e}") from e
        if not isinstance(tasks, list):
            raise DatasetError(f"{export_file}: a Label Studio JSON export is a list of tasks")
        super().__init__(tasks, self._read_file, f"Label Studio export {export_file}", image_key, prompts_for)
        if not self.items:
            raise DatasetError(f"{export_file}: no task has a brush (brushlabels) annotation")

    def _read_file(self, task: Dict[str, Any], url: str) -> Tuple[np.ndarray, str]:
        path = self.resolve_image(url)
        return load_image(path), path.name

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
