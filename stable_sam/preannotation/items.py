"""The work list of an offline pre-annotation job: which images, in which order, with which prompts.

Three inputs, each read into ``WorkItem`` s in a deterministic order (the order decides the output's
annotation ids, so it must not depend on a file system's listing order or on a CSV's row order):

- a COCO JSON with boxes (``bbox`` XYWH per annotation; crowd annotations are skipped): images in
  ascending image id, objects in ascending annotation id; image ids and categories are kept;
- a CSV of boxes and / or points, header required (see ``items_from_csv``): images sorted by file
  name and numbered 1..N in that order, objects in order of first appearance;
- a bare folder of images (top level, sorted by name, numbered 1..N): no prompts, every image is
  segmented automatically.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..data.folder import IMAGE_SUFFIXES
from ..prompts import ObjectPrompt

DEFAULT_LABEL = "object"


class InputError(ValueError):
    """Unusable job input (missing file, bad JSON / CSV, a box outside its image); says which."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object to segment: its prompt (pixels of the image file), its category and where it came
    from (the COCO annotation id, or the CSV line / object name)."""

    prompt: ObjectPrompt
    category_id: int
    source_id: Union[int, str]

    def to_json(self) -> Dict[str, Any]:
        """The prompt as JSON: ``box`` (XYXY pixels) and / or ``points`` with ``labels``."""
        p = self.prompt
        out: Dict[str, Any] = {}
        if p.box is not None:
            out["box"] = [float(v) for v in p.box]
        if p.points is not None:
            out["points"] = [[float(x), float(y)] for x, y in p.points]
            out["point_labels"] = [int(v) for v in p.labels]
        return out


@dataclass(frozen=True)
class WorkItem:
    """One image. ``file_name`` is relative to the image root (as COCO writes it); ``width`` and
    ``height`` are what the input says (None: taken from the file); ``objects`` may be empty
    (automatic mode)."""

    image_id: int
    file_name: str
    path: Path
    width: Optional[int]
    height: Optional[int]
    objects: Tuple[ObjectSpec, ...]

    def to_json(self) -> Dict[str, Any]:
        """The image and its object prompts as JSON (the job's work list file)."""
        return {"image_id": self.image_id, "file_name": self.file_name, "width": self.width, "height": self.height,
                "objects": [dict(o.to_json(), category_id=o.category_id, source_id=o.source_id)
                            for o in self.objects]}


@dataclass(frozen=True)
class WorkList:
    """The items in output order, the COCO categories, and what they were read from."""

    items: Tuple[WorkItem, ...]
    categories: Tuple[Dict[str, Any], ...]
    source: str

    def fingerprint(self) -> str:
        """SHA-256 of everything that decides the output (ids, names, prompts, categories)."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.categories), sort_keys=True).encode())
        for item in self.items:
            h.update(json.dumps(item.to_json(), sort_keys=True).encode())
        return h.hexdigest()

    def category_for(self, name: str) -> Tuple[int, "WorkList"]:
        """The id of category ``name`` (added with the next free id when missing) and the work list
        with it: automatic masks need a category too."""
        for c in self.categories:
            if c.get("name") == name:
                return int(c["id"]), self
        new_id = max((int(c["id"]) for c in self.categories), default=0) + 1
        return new_id, WorkList(self.items, self.categories + ({"id": new_id, "name": name},), self.source)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"COCO file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not readable JSON: {e}") from None


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise InputError(f"{what} must be finite, got {value!r}")
    return out


def _check_root(image_root: Path) -> Path:
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise InputError(f"image folder not found: {image_root}")
    return image_root


def items_from_coco(path: Path, image_root: Path) -> WorkList:
    """A COCO JSON whose annotations carry boxes (``bbox`` = x, y, w, h in pixels)."""
    path, image_root = Path(path), _check_root(image_root)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: not a COCO file (expected an object with an 'images' list)")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise InputError(f"{path}: 'annotations' must be a list")
    images: Dict[int, Dict[str, Any]] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise InputError(f"{path}: images[{i}] needs an integer 'id' and a 'file_name'")
        if im["id"] in images:
            raise InputError(f"{path}: image id {im['id']} appears twice")
        images[im["id"]] = im
    categories = data.get("categories") or []
    if not isinstance(categories, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), int)
                                                   for c in categories):
        raise InputError(f"{path}: 'categories' must be a list of objects with an integer 'id'")
    known = {c["id"] for c in categories}
    by_image: Dict[int, List[Tuple[int, ObjectSpec]]] = {}
    for i, a in enumerate(anns):
        where = f"{path}: annotations[{i}] (id {a.get('id') if isinstance(a, dict) else '?'})"
        if not isinstance(a, dict) or not isinstance(a.get("id"), int):
            raise InputError(f"{where}: needs an integer 'id'")
        if a.get("iscrowd"):
            continue  # a crowd region is many objects: no single mask to prompt for
        if a.get("image_id") not in images:
            raise InputError(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise InputError(f"{where}: 'bbox' must be [x, y, width, height]")
        x, y, w, h = (_finite(v, f"{where}: bbox") for v in bbox)
        if w <= 0 or h <= 0:
            raise InputError(f"{where}: bbox {bbox} has zero or negative size")
        cat = a.get("category_id", 1)
        if categories and cat not in known:
            raise InputError(f"{where}: category_id {cat!r} is not in 'categories'")
        spec = ObjectSpec(ObjectPrompt(box=(x, y, x + w, y + h)), int(cat), a["id"])
        by_image.setdefault(a["image_id"], []).append((a["id"], spec))
    if not categories:
        categories = [{"id": c, "name": str(c)} for c in sorted({s.category_id for v in by_image.values()
                                                                  for _, s in v})]
    items = []
    for image_id in sorted(images):
        im = images[image_id]
        objects = tuple(s for _, s in sorted(by_image.get(image_id, []), key=lambda t: t[0]))
        size = [im.get(k) for k in ("width", "height")]
        width, height = (int(v) for v in size) if all(isinstance(v, int) and v > 0 for v in size) else (None, None)
        items.append(WorkItem(image_id, im["file_name"], image_root / im["file_name"], width, height, objects))
    return WorkList(tuple(items), tuple(categories), f"COCO {path}")


@dataclass
class _CsvObject:
    """An object being gathered from CSV rows."""

    label: str
    source: str
    box: Optional[Tuple[float, float, float, float]] = None
    points: List[Tuple[float, float]] = field(default_factory=list)
    point_labels: List[int] = field(default_factory=list)


CSV_COLUMNS = ("image", "object", "label", "x0", "y0", "x1", "y1", "x", "y", "positive")


def items_from_csv(path: Path, image_root: Path) -> WorkList:
    """A CSV with a header. Columns: ``image`` (file name under the image root, required), a box
    ``x0,y0,x1,y1`` and / or a point ``x,y`` (pixels), ``positive`` (1 / 0, default 1), ``label``
    (category name, default "object") and ``object`` (rows of one image with the same ``object``
    value make one prompt, e.g. a box and its points; without it every row is its own object)."""
    path, image_root = Path(path), _check_root(image_root)
    if not path.is_file():
        raise InputError(f"CSV file not found: {path}")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [(reader.line_num, {k.strip(): (v or "").strip() for k, v in r.items() if k is not None})
                    for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path} is not a readable CSV: {e}") from None
    if "image" not in header:
        raise InputError(f"{path}: the header must name an 'image' column (got {header}); "
                         f"columns understood: {', '.join(CSV_COLUMNS)}")
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        raise InputError(f"{path}: unknown columns {unknown}; columns understood: {', '.join(CSV_COLUMNS)}")
    objects: Dict[str, Dict[str, _CsvObject]] = {}  # image -> object key -> object
    labels_seen = set()
    for line, row in rows:
        where = f"{path} line {line}"
        image = row.get("image", "")
        if not image:
            raise InputError(f"{where}: empty 'image'")
        has_box = any(row.get(k) for k in ("x0", "y0", "x1", "y1"))
        has_point = any(row.get(k) for k in ("x", "y"))
        if not has_box and not has_point:
            raise InputError(f"{where}: give a box (x0, y0, x1, y1) or a point (x, y)")
        key = row.get("object") or f"line {line}"
        label = row.get("label") or DEFAULT_LABEL
        obj = objects.setdefault(image, {}).setdefault(key, _CsvObject(label, key))
        if obj.label != label:
            raise InputError(f"{where}: object {key!r} of {image} has labels {obj.label!r} and {label!r}")
        labels_seen.add(label)
        if has_box:
            box = tuple(_finite(row.get(k), f"{where}: {k}") for k in ("x0", "y0", "x1", "y1"))
            if box[2] <= box[0] or box[3] <= box[1]:
                raise InputError(f"{where}: box {list(box)} has zero or negative size (need x0 < x1, y0 < y1)")
            if obj.box is not None:
                raise InputError(f"{where}: object {key!r} of {image} has a second box")
            obj.box = box
        if has_point:
            obj.points.append((_finite(row.get("x"), f"{where}: x"), _finite(row.get("y"), f"{where}: y")))
            positive = row.get("positive", "") or "1"
            if positive not in ("0", "1"):
                raise InputError(f"{where}: 'positive' must be 1 or 0, got {positive!r}")
            obj.point_labels.append(int(positive))
    if not objects:
        raise InputError(f"{path}: no rows")
    names = sorted(labels_seen)
    categories = tuple({"id": i + 1, "name": n} for i, n in enumerate(names))
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    items = []
    for image_id, image in enumerate(sorted(objects), start=1):
        specs = []
        for o in objects[image].values():
            if o.box is None and not any(o.point_labels):
                raise InputError(f"{path}: object {o.source!r} of {image} has only negative points: add a positive "
                                 f"point or a box")
            specs.append(ObjectSpec(ObjectPrompt(o.box, o.points or None, o.point_labels or None), cat_id[o.label],
                                    o.source))
        items.append(WorkItem(image_id, image, image_root / image, None, None, tuple(specs)))
    return WorkList(tuple(items), categories, f"CSV {path}")


def items_from_folder(image_root: Path, label: str = DEFAULT_LABEL) -> WorkList:
    """Every image at the top of ``image_root`` (sorted by name), without prompts."""
    image_root = _check_root(image_root)
    files = sorted(p.name for p in image_root.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and "_mask_" not in p.stem)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_root}")
    items = tuple(WorkItem(i, name, image_root / name, None, None, ()) for i, name in enumerate(files, start=1))
    return WorkList(items, ({"id": 1, "name": label},), f"folder {image_root}")


def check_prompt(spec: ObjectSpec, width: int, height: int, where: str, tolerance: float = 1.0) -> ObjectPrompt:
    """The prompt clamped to the image when it overshoots by at most ``tolerance`` pixels (rounding
    in other tools' boxes); ``InputError`` naming the object when it lies further outside."""
    p = spec.prompt

    def fit(v: float, hi: int, what: str) -> float:
        if v < -tolerance or v > hi + tolerance:
            raise InputError(f"{where}: {what} of object {spec.source_id} lies outside the {width} x {height} image "
                             f"(prompt {json.dumps(spec.to_json())})")
        return min(max(v, 0.0), float(hi))

    box = None
    if p.box is not None:
        x0, y0, x1, y1 = p.box
        box = (fit(x0, width, "the box"), fit(y0, height, "the box"), fit(x1, width, "the box"),
               fit(y1, height, "the box"))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise InputError(f"{where}: the box of object {spec.source_id} has no area inside the image")
    points = None if p.points is None else [(fit(x, width, "a point"), fit(y, height, "a point")) for x, y in p.points]
    return ObjectPrompt(box, points, p.labels)

