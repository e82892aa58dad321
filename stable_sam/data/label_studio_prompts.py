"""Label Studio regions -> SAM prompts: the backend's clicks and boxes, and an annotation's own.

Label Studio sends smart keypoints and rectangles as results in percent (0-100) of the image's
``original_width`` x ``original_height``. Here they are validated, converted to pixels of the image
the model sees (clamped to it there, once), and grouped into prompts, one mask each:

- every rectangle is its own prompt (a rotated one by its axis-aligned bounding box);
- a keypoint inside a rectangle refines that rectangle (the smallest one holding it);
- keypoints outside every rectangle together make one more prompt, when one of them is positive.

A keypoint is positive unless ``is_positive`` is false (smart regions, Alt-click) or
``value.positive`` is false (newer frontends). A region that cannot be read is a ``RegionError``
that says which and why (the backend answers it with a 400).

``annotation_prompts`` rebuilds, for an annotation's brush masks, the prompts the annotator drew:
what adaptation trains and measures with.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..short_repr import short_repr
from ..prompts import ObjectPrompt, box_iou, mask_to_box

log = logging.getLogger(__name__)

KEYPOINT_TYPES = ("keypointlabels", "keypoint")
RECTANGLE_TYPES = ("rectanglelabels", "rectangle")
PROMPT_TYPES = KEYPOINT_TYPES + RECTANGLE_TYPES
KEYPOINT_CONTROL_TAGS = ("KeyPointLabels", "KeyPoint")
RECTANGLE_CONTROL_TAGS = ("RectangleLabels", "Rectangle")
PROMPT_CONTROL_TAGS = KEYPOINT_CONTROL_TAGS + RECTANGLE_CONTROL_TAGS
# A claimed image side above this is refused: it keeps every size computation a finite float.
MAX_IMAGE_SIDE = 2**31 - 1
REGION_ID_CHARS = 100  # a longer region id is cut (Label Studio's are about 10 characters)
# Label Studio's frontend can report an edge a hair beyond 100 %; more than this is an error.
PERCENT_TOLERANCE = 0.01


class RegionError(ValueError):
    """A region that cannot be read as a keypoint or rectangle prompt; the message says why."""


@dataclass
class Region:
    """One keypoint or rectangle from Label Studio, coordinates still in percent: x and y in
    0..100; a rectangle's far edges (x + width, y + height) and a rotated one's corners may lie
    outside, ``group_prompts`` clamps them to the image in pixels."""

    id: str
    kind: str  # "keypoint" | "rectangle"
    from_name: str
    to_name: str
    label: Optional[str]
    positive: bool
    x: float
    y: float
    width: float = 0.0
    height: float = 0.0
    rotation: float = 0.0
    original_width: Optional[int] = None
    original_height: Optional[int] = None

    def box_percent(self, size: Optional[Tuple[int, int]] = None) -> Tuple[float, float, float, float]:
        """Axis-aligned x0, y0, x1, y1 in percent, not clipped to the image; rotation (degrees,
        about the top-left corner, as Label Studio draws it) is replaced by the bounding box of the
        rotated corners, rotated in pixels of ``size`` (the decoded image), else of the claimed
        original size."""
        if not self.rotation:
            return self.x, self.y, self.x + self.width, self.y + self.height
        # Rotate in pixel space when the size is known: percent axes are not isotropic.
        w0, h0 = size or (self.original_width or 100, self.original_height or 100)
        sx, sy = w0 / 100.0, h0 / 100.0
        a = math.radians(self.rotation)
        ca, sa = math.cos(a), math.sin(a)
        w, h = self.width * sx, self.height * sy
        xs, ys = [], []
        for dx, dy in ((0, 0), (w, 0), (w, h), (0, h)):
            xs.append(self.x + (dx * ca - dy * sa) / sx)
            ys.append(self.y + (dx * sa + dy * ca) / sy)
        return min(xs), min(ys), max(xs), max(ys)


@dataclass
class PromptGroup:
    """One mask to predict: its prompt in pixels of a W x H image, and what Label Studio needs
    around it: the image (``to_name``), the label, the regions it came from (``source_ids``: the
    rectangle's first, then the points' in the prompt's order) and the control that sent them."""

    to_name: str
    prompt: ObjectPrompt
    label: Optional[str] = None
    source_ids: List[str] = field(default_factory=list)
    from_name: str = ""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or value is None:
        raise RegionError(f"{what} must be a number, got {short_repr(value)}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
        raise RegionError(f"{what} must be a number (a finite float), got {short_repr(value)}") from None
    if not math.isfinite(out):
        raise RegionError(f"{what} is {short_repr(value)}: coordinates must be finite numbers in 0..100 (percent)")
    return out


def _percent(value: Any, what: str) -> float:
    """A position (x or y) in 0..100; the frontend's hair past an edge (``PERCENT_TOLERANCE``) is
    read as the edge, so a rectangle keeps its width and height."""
    out = _number(value, what)
    if out < -PERCENT_TOLERANCE or out > 100 + PERCENT_TOLERANCE:
        raise RegionError(f"{what} = {out} is outside 0..100: Label Studio coordinates are percent of the image")
    return min(max(out, 0.0), 100.0)


def _size(value: Any, what: str) -> Optional[int]:
    if value is None:
        return None
    out = _number(value, what)
    if out < 1 or out != int(out) or out > MAX_IMAGE_SIDE:
        raise RegionError(f"{what} = {short_repr(value)} must be a whole number of pixels in 1..{MAX_IMAGE_SIDE}")
    return int(out)


def parse_region(item: Any, index: int) -> Optional[Region]:
    """A result dict -> Region, or None when it is not a keypoint / rectangle (ignored)."""
    if not isinstance(item, dict):
        raise RegionError(f"context.result[{index}] must be an object, got {type(item).__name__}")
    rtype = item.get("type")
    rtype = rtype.lower() if isinstance(rtype, str) else ""
    if rtype not in PROMPT_TYPES:
        return None
    rid = item.get("id")
    usable = isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool) and rid.bit_length() <= 64)
    rid = str(rid)[:REGION_ID_CHARS] if usable and rid else f"r{index}"
    where = f"context.result[{index}] ({rtype} {rid[:40]})"
    value = item.get("value")
    if not isinstance(value, dict):
        raise RegionError(f"{where}: 'value' must be an object")
    from_name, to_name = item.get("from_name"), item.get("to_name")
    if not isinstance(from_name, str) or not from_name or not isinstance(to_name, str) or not to_name:
        raise RegionError(f"{where}: 'from_name' and 'to_name' are required strings")
    labels = value.get(rtype) if rtype.endswith("labels") else None
    if labels is not None and not (isinstance(labels, list) and all(isinstance(v, str) for v in labels)):
        raise RegionError(f"{where}: value.{rtype} must be a list of label strings")
    positive = not (item.get("is_positive") is False or value.get("positive") is False)
    kind = "keypoint" if rtype in KEYPOINT_TYPES else "rectangle"
    region = Region(
        id=rid, kind=kind, from_name=from_name, to_name=to_name,
        label=labels[0] if labels else None, positive=positive,
        x=_percent(value.get("x"), f"{where}: x"), y=_percent(value.get("y"), f"{where}: y"),
        original_width=_size(item.get("original_width"), f"{where}: original_width"),
        original_height=_size(item.get("original_height"), f"{where}: original_height"),
    )
    if kind == "rectangle":
        region.width = _number(value.get("width"), f"{where}: width")
        region.height = _number(value.get("height"), f"{where}: height")
        region.rotation = _number(value.get("rotation", 0) or 0, f"{where}: rotation")
        if region.width <= 0 or region.height <= 0:
            raise RegionError(f"{where}: zero-size rectangle (width {region.width}, height {region.height} percent)")
        if region.rotation % 360 == 0:
            region.rotation = 0.0
            for what, edge in (("x + width", region.x + region.width), ("y + height", region.y + region.height)):
                if edge > 100 + PERCENT_TOLERANCE:
                    raise RegionError(f"{where}: {what} = {edge:g} is outside 0..100 (percent of the image)")
        x0, y0, x1, y1 = region.box_percent()
        if min(x1, 100.0) - max(x0, 0.0) <= 0 or min(y1, 100.0) - max(y0, 0.0) <= 0:
            raise RegionError(f"{where}: rectangle lies outside the image")
    return region


def parse_regions(results: Any, source: str = "context.result") -> List[Region]:
    """The prompt regions (keypoints, rectangles) of a list of Label Studio results; other result
    types are skipped. ``RegionError`` (naming ``source``) for a list or region it cannot read."""
    if not isinstance(results, list):
        raise RegionError(f"{source} must be a list of regions, got {type(results).__name__}")
    return [r for r in (parse_region(item, i) for i, item in enumerate(results)) if r is not None]


def _pixels(percent: float, scale: float, side: int) -> float:
    """Percent -> pixels, clamped to the image: where Label Studio's coordinates enter pixel space,
    the one clamp (an edge at 100 % can land a float's hair past the last pixel)."""
    return min(max(percent * scale, 0.0), float(side))


def group_prompts(regions: Sequence[Region], width: int, height: int) -> Tuple[List[PromptGroup], List[str]]:
    """Regions of one image -> (prompt groups in pixels of a ``width`` x ``height`` image, notes on
    regions that give no mask). Groups come in rectangle order, then the free keypoints."""
    sx, sy = width / 100.0, height / 100.0

    def point(r: Region) -> Tuple[float, float]:
        return _pixels(r.x, sx, width), _pixels(r.y, sy, height)

    notes: List[str] = []
    rects: List[Tuple[Region, Tuple[float, float, float, float]]] = []
    for r in regions:
        if r.kind != "rectangle":
            continue
        x0, y0, x1, y1 = r.box_percent((width, height))
        if not r.positive:
            notes.append(f"rectangle {r.id} is marked negative: ignored")
            continue
        rects.append((r, (_pixels(x0, sx, width), _pixels(y0, sy, height),
                          _pixels(x1, sx, width), _pixels(y1, sy, height))))
    inside: List[List[Region]] = [[] for _ in rects]
    free: List[Region] = []
    for r in regions:
        if r.kind != "keypoint":
            continue
        px, py = point(r)
        holders = [i for i, (_, b) in enumerate(rects) if b[0] <= px <= b[2] and b[1] <= py <= b[3]]
        if holders:
            i = min(holders, key=lambda i: (rects[i][1][2] - rects[i][1][0]) * (rects[i][1][3] - rects[i][1][1]))
            inside[i].append(r)
        else:
            free.append(r)
    groups = [PromptGroup(r.to_name, ObjectPrompt(box=box, points=[point(k) for k in keys] or None,
                                                  labels=[int(k.positive) for k in keys] or None),
                          label=r.label, source_ids=[r.id] + [k.id for k in keys], from_name=r.from_name)
              for (r, box), keys in zip(rects, inside)]
    if free:
        positives = [r for r in free if r.positive]
        if positives:
            groups.append(PromptGroup(
                free[0].to_name, ObjectPrompt(points=[point(r) for r in free], labels=[int(r.positive) for r in free]),
                label=next((r.label for r in reversed(positives) if r.label), None),
                source_ids=[r.id for r in free], from_name=positives[-1].from_name))
        else:
            notes.append(f"{len(free)} negative keypoint(s) outside any rectangle and no positive one: "
                         f"add a positive keypoint on the object")
    return groups, notes


PROMPT_SOURCES = ("annotations", "predictions")


def result_regions(task: Dict[str, Any], sources: Sequence[str] = PROMPT_SOURCES) -> Tuple[List[Dict[str, Any]], str]:
    """For a batch call (no context): the prompt regions stored with the task, from its newest
    non-cancelled annotation that has any, else its newest prediction that has any. ``sources``
    narrows or reorders where to look (``("predictions",)``: a model's rough boxes only).
    Returns (results, where they came from) or ([], reason)."""
    unknown = [s for s in sources if s not in PROMPT_SOURCES]
    if unknown or not sources:
        raise ValueError(f"prompt sources must be some of {PROMPT_SOURCES}, got {list(sources)}")

    def newest_first(items: Any) -> List[Dict[str, Any]]:
        items = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
        return sorted(items, key=lambda i: (str(i.get("updated_at") or i.get("created_at") or ""),
                                            i.get("id") if isinstance(i.get("id"), int) else 0), reverse=True)

    for kind in sources:
        for item in newest_first(task.get(kind)):
            if item.get("was_cancelled"):
                continue
            result = item.get("result")
            if isinstance(result, list) and any(isinstance(r, dict) and str(r.get("type", "")).lower()
                                                in PROMPT_TYPES for r in result):
                return result, f"{kind[:-1]} {short_repr(item.get('id', '?'), 40)}"
    return [], f"the task has no keypoint or rectangle in its {' or '.join(sources)}"


# -- an annotation's own prompts -------------------------------------------------------------------

def _points(g: PromptGroup) -> List[Tuple[str, Tuple[float, float], int]]:
    """(region id, (x, y), label) of each of a group's points, in the prompt's order."""
    p = g.prompt
    if p.points is None:
        return []
    ids = g.source_ids[len(g.source_ids) - len(p.points):]  # a rectangle's id comes first
    return [(rid, (x, y), lab) for rid, (x, y), lab in zip(ids, p.points.tolist(), p.labels.tolist())]


def annotation_prompts(results: List[Dict[str, Any]], brush: List[Dict[str, Any]],
                       masks: List[np.ndarray]) -> List[Optional[ObjectPrompt]]:
    """One prompt (or None) per brush mask, rebuilt from the annotation's rectangles / keypoints.

    Regions are grouped as the backend groups them for /predict (a keypoint inside a rectangle
    refines it). A group is matched to a mask by the backend's own link first (its brush results
    have id ``<first prompt id>_sam``), else by geometry: a rectangle goes to the mask whose tight
    box it overlaps most (IoU, each mask and rectangle used once); a free positive keypoint to the
    smallest mask containing it; a free negative keypoint to the mask of the nearest positive one.
    """
    out: List[Optional[ObjectPrompt]] = [None] * len(masks)
    if not masks:
        return out
    h, w = masks[0].shape
    try:
        groups, _ = group_prompts(parse_regions(results, "annotation"), w, h)
    except RegionError as e:  # a malformed region: the masks still train, with RTS prompts only
        log.info("annotation prompts ignored: %s", e)
        return out
    link = {str(r.get("id", ""))[:-4]: k for k, r in enumerate(brush) if str(r.get("id", "")).endswith("_sam")}
    boxes = [mask_to_box(m).tolist() for m in masks]
    points: Dict[int, List[Tuple[Tuple[float, float], int, str]]] = {}
    chosen: Dict[int, PromptGroup] = {}

    rects = [g for g in groups if g.prompt.box is not None]
    pairs = []
    for gi, g in enumerate(rects):
        if g.source_ids[0] in link:
            pairs.append((2.0, gi, link[g.source_ids[0]]))  # above any IoU: the backend's own link
        else:
            pairs += [(box_iou(g.prompt.box, b), gi, k) for k, b in enumerate(boxes)]
    used = set()
    for score, gi, k in sorted(pairs, key=lambda p: -p[0]):
        if score > 0 and gi not in used and k not in chosen:
            used.add(gi)
            chosen[k] = rects[gi]

    free = next((g for g in groups if g.prompt.box is None), None)
    if free is not None:
        items = _points(free)
        matched: List[Tuple[Tuple[float, float], int]] = []
        for rid, (x, y), label in items:
            if not label:
                continue
            k = link.get(rid)
            if k is None:
                xi, yi = min(int(x), w - 1), min(int(y), h - 1)
                holders = [k for k, m in enumerate(masks) if m[yi, xi]]
                k = min(holders, key=lambda k: masks[k].sum()) if holders else None
            if k is not None:
                points.setdefault(k, []).append(((x, y), 1, rid))
                matched.append(((x, y), k))
        for rid, (x, y), label in items:
            if label or not matched:
                continue
            _, k = min(matched, key=lambda m: (m[0][0] - x) ** 2 + (m[0][1] - y) ** 2)
            points.setdefault(k, []).append(((x, y), 0, rid))

    for k in range(len(masks)):
        g = chosen.get(k)
        pts = [(p, lab, rid) for rid, p, lab in _points(g)] if g else []
        pts += points.get(k, [])
        if g is None and not any(lab for _, lab, _ in pts):
            continue  # negatives alone are no prompt
        out[k] = ObjectPrompt(box=None if g is None else g.prompt.box,
                              points=np.array([p for p, _, _ in pts]) if pts else None,
                              labels=np.array([lab for _, lab, _ in pts]) if pts else None,
                              source=",".join(([g.source_ids[0]] if g else []) + [rid for _, _, rid in pts]))
    return out
