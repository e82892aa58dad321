"""The region world: synthetic scenes in which every region is a mask target, as in SA-1B.

SAM learnt from SA-1B that a box tightly bounds *some* mask, at every granularity: parts, whole
objects, groups of objects, background regions. A loose box then fits a larger region (a touching
neighbour, the group, the background "stuff" around the object) better than the object, and one
click on a part of a multi-colour object fits the part. The first synthetic world
(``synthetic.py``) annotated whole objects only, so a small SAM trained on it learnt "the object
under the box" and barely failed on casual prompts. Here a scene has:

- **stuff**: the background is split into 2-4 organic regions, each with its own texture; a few
  are low-contrast pairs;
- **objects** of many shape families (``TRAIN_FAMILIES``), some camouflaged (coloured like the
  background under them, textured differently);
- **parts**: two-tone objects (split by a line) and composites (a body with attached parts of
  other colours);
- **groups**: objects placed touching or overlapping an earlier one, some in the same colour;
- **containers**: objects lying on a larger region of another colour (a plate, a sign, a patch of
  ground), 1.35-1.9 times their size; the container with the object on it is a target, as a whole
  object with its parts is in SA-1B. A loose box around the object fits the container well.

``Scene.masks`` are the whole objects (what the benchmark evaluates, as the HQ datasets annotate
whole objects); ``Scene.targets`` are every region above (what pretraining samples, as SAM's
training samples any SA-1B mask). ``UNSEEN_FAMILIES`` never occur in the training split's default
families: ``RegionScenes(..., families=UNSEEN_FAMILIES)`` measures how far the model generalises.
Every scene is a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stable_sam.data.synthetic import Scene, _random_color, _smooth_noise, _texture, scene_shape
from stable_sam.data.synthetic_split import World, register_world

REGIONS_TRAIN_SEED = 7_000_001
REGIONS_HELDOUT_SEED = 7_900_009

TRAIN_FAMILIES = ("ellipse", "polygon", "star", "rectangle", "ring", "stroke", "blob", "cross",
                  "crescent", "two_tone", "composite")
UNSEEN_FAMILIES = ("spiral", "comb", "hourglass")
ALL_FAMILIES = TRAIN_FAMILIES + UNSEEN_FAMILIES

STUFF, OBJECT, PART, GROUP, CONTAINER = "stuff", "object", "part", "group", "container"
CONTAINER_FAMILIES = ("ellipse", "rectangle", "polygon", "blob")


def _canvas(h: int, w: int) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (w, h), 0)
    return img, ImageDraw.Draw(img)


def _rotated(img: Image.Image, angle: float, cx: float, cy: float) -> np.ndarray:
    return np.asarray(img.rotate(angle, center=(cx, cy))) > 127


def _star_points(rng: np.random.Generator, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    n = int(rng.integers(4, 9))
    inner = rng.uniform(0.35, 0.6)
    phase = rng.uniform(0, 2 * math.pi)
    pts = []
    for i in range(2 * n):
        rr = r if i % 2 == 0 else r * inner
        a = phase + i * math.pi / n
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _polygon_points(rng: np.random.Generator, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    n = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = r * rng.uniform(0.55, 1.0, n)
    return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii)]


def _split_by_line(rng: np.random.Generator, mask: np.ndarray, cx: float, cy: float) -> List[np.ndarray]:
    """Two halves of ``mask`` cut by a random line near (cx, cy); both non-empty or none."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    a = rng.uniform(0, math.pi)
    shift = rng.uniform(-0.3, 0.3) * math.sqrt(mask.sum() / math.pi)
    side = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a) > shift
    halves = [mask & side, mask & ~side]
    return halves if all(p.any() for p in halves) else []


def draw_family(rng: np.random.Generator, family: str, h: int, w: int, cx: float, cy: float,
                r: float) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Rasterise one object of ``family`` centred near (cx, cy) with radius ~r: its H x W bool mask
    and the masks of its differently coloured parts (empty for single-colour families)."""
    img, d = _canvas(h, w)
    parts: List[np.ndarray] = []
    if family in ("ellipse", "two_tone"):
        ry = r * rng.uniform(0.4, 1.0)
        d.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=255)
        mask = _rotated(img, rng.uniform(0, 180), cx, cy)
        if family == "two_tone":
            parts = _split_by_line(rng, mask, cx, cy)
    elif family == "polygon":
        d.polygon(_polygon_points(rng, cx, cy, r), fill=255)
        mask = np.asarray(img) > 127
    elif family == "star":
        d.polygon(_star_points(rng, cx, cy, r), fill=255)
        mask = np.asarray(img) > 127
    elif family == "rectangle":
        ry = r * rng.uniform(0.3, 1.0)
        d.rectangle([cx - r, cy - ry, cx + r, cy + ry], fill=255)
        mask = _rotated(img, rng.uniform(0, 90), cx, cy)
    elif family == "ring":
        ry = r * rng.uniform(0.6, 1.0)
        hole = rng.uniform(0.35, 0.7)
        ox, oy = rng.uniform(-0.15, 0.15, 2) * r
        d.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=255)
        d.ellipse([cx + ox - r * hole, cy + oy - ry * hole, cx + ox + r * hole, cy + oy + ry * hole], fill=0)
        mask = np.asarray(img) > 127
    elif family == "stroke":
        pts = [(cx, cy)]
        heading = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(3, 7))):
            heading += rng.uniform(-1.2, 1.2)
            step = r * rng.uniform(0.5, 1.0)
            x, y = pts[-1]
            pts.append((float(np.clip(x + step * math.cos(heading), 0, w - 1)),
                        float(np.clip(y + step * math.sin(heading), 0, h - 1))))
        d.line(pts, fill=255, width=int(rng.integers(3, 9)), joint="curve")
        mask = np.asarray(img) > 127
    elif family == "blob":
        cells = int(rng.integers(3, 7))
        field = _smooth_noise(rng, h, w, max(2, int(cells * min(h, w) / (2.5 * r))))
        yy, xx = np.mgrid[0:h, 0:w]
        falloff = 1.0 - ((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)
        mask = (0.6 * falloff + 0.8 * (field - 0.5)) > 0.15
    elif family == "cross":
        t = r * rng.uniform(0.2, 0.4)
        if rng.random() < 0.5:  # plus
            d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
            d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
        else:  # L
            d.rectangle([cx - r, cy + r - 2 * t, cx + r, cy + r], fill=255)
            d.rectangle([cx - r, cy - r, cx - r + 2 * t, cy + r], fill=255)
        mask = _rotated(img, rng.uniform(0, 90), cx, cy)
    elif family == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        a = rng.uniform(0, 2 * math.pi)
        off = r * rng.uniform(0.35, 0.7)
        rr = r * rng.uniform(0.8, 1.0)
        ox, oy = cx + off * math.cos(a), cy + off * math.sin(a)
        d.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=0)
        mask = np.asarray(img) > 127
    elif family == "composite":
        ry = r * rng.uniform(0.5, 0.9)
        d.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=255)
        mask = np.asarray(img) > 127
        for _ in range(int(rng.integers(1, 4))):
            part_img, pd = _canvas(h, w)
            a = rng.uniform(0, 2 * math.pi)
            pr = r * rng.uniform(0.3, 0.55)
            px, py = cx + r * 0.9 * math.cos(a), cy + ry * 0.9 * math.sin(a)
            if rng.random() < 0.5:
                pd.ellipse([px - pr, py - pr, px + pr, py + pr], fill=255)
            else:
                pd.polygon(_polygon_points(rng, px, py, pr), fill=255)
            part = np.asarray(part_img) > 127
            parts.append(part)
            mask = mask | part
        # The body is a part too: what is left of the ellipse.
        body = mask & ~np.logical_or.reduce(parts)
        parts = [body] + [p & ~np.logical_or.reduce(parts[i + 1:] or [np.zeros_like(p)])
                          for i, p in enumerate(parts)]
    elif family == "spiral":
        turns = rng.uniform(1.2, 2.2)
        n = 60
        t = np.linspace(0, turns * 2 * math.pi, n)
        rad = r * (0.15 + 0.85 * t / t[-1])
        phase = rng.uniform(0, 2 * math.pi)
        pts = [(float(cx + q * math.cos(a + phase)), float(cy + q * math.sin(a + phase))) for a, q in zip(t, rad)]
        d.line(pts, fill=255, width=int(rng.integers(3, 8)), joint="curve")
        mask = np.asarray(img) > 127
    elif family == "comb":
        t = r * rng.uniform(0.15, 0.3)
        d.rectangle([cx - r, cy - r, cx + r, cy - r + 2 * t], fill=255)
        teeth = int(rng.integers(3, 7))
        for i in range(teeth):
            x = cx - r + (2 * r - t) * i / (teeth - 1)
            d.rectangle([x, cy - r, x + t, cy + r], fill=255)
        mask = _rotated(img, rng.uniform(0, 180), cx, cy)
    elif family == "hourglass":
        d.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx, cy)], fill=255)
        d.polygon([(cx - r * 0.8, cy + r), (cx + r * 0.8, cy + r), (cx, cy)], fill=255)
        d.ellipse([cx - r * 0.12, cy - r * 0.12, cx + r * 0.12, cy + r * 0.12], fill=255)
        mask = _rotated(img, rng.uniform(0, 180), cx, cy)
    else:
        raise ValueError(f"unknown shape family {family!r}; expected one of {ALL_FAMILIES}")
    parts = [p & mask for p in parts if (p & mask).any()]
    return mask, parts if len(parts) >= 2 else []


def _stuff(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Background split into organic regions. Returns the H x W x 3 float image and the H x W
    region label map (0..K-1)."""
    k = int(rng.integers(2, 5))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fields = []
    for _ in range(k):
        a = rng.uniform(0, 2 * math.pi)
        ramp = ((xx * math.cos(a) + yy * math.sin(a)) / max(h, w))
        fields.append(_smooth_noise(rng, h, w, int(rng.integers(2, 4))) + rng.uniform(0.3, 0.9) * ramp)
    labels = np.argmax(np.stack(fields), axis=0)
    image = np.zeros((h, w, 3), np.float32)
    base = _random_color(rng)
    for i in range(k):
        # Some regions are a low-contrast variation of the previous one: a boundary a box must find.
        base = np.clip(base + rng.normal(0, 20, 3), 0, 255) if rng.random() < 0.3 else _random_color(rng)
        tex = _texture(rng, h, w, base, rng.uniform(10, 60))
        image = np.where((labels == i)[..., None], tex, image)
    return image, labels


class RegionScenes:
    """Deterministic generator of region-world scenes: ``scenes[i]`` is the same for the same seed.

    ``size`` px on the long side (a share landscape or portrait); ``families``: the shape families
    objects are drawn from; ``camouflage``: the share of objects coloured like the background under
    them (+ N(0, 22) per channel); ``touching``: the share placed touching or overlapping an
    earlier object; ``same_colour``: the share of those in that object's colour (+ N(0, 6));
    ``contained``: the share of the other objects drawn on a container.
    """

    def __init__(self, seed: int = REGIONS_TRAIN_SEED, size: int = 256, min_objects: int = 2,
                 max_objects: int = 6, min_area: int = 80, families: Sequence[str] = TRAIN_FAMILIES,
                 camouflage: float = 0.2, touching: float = 0.5, same_colour: float = 0.2,
                 contained: float = 0.4, length: int = 1_000_000) -> None:
        unknown = set(families) - set(ALL_FAMILIES)
        if unknown:
            raise ValueError(f"unknown shape families {sorted(unknown)}; expected some of {ALL_FAMILIES}")
        self.seed, self.size = seed, size
        self.min_objects, self.max_objects, self.min_area = min_objects, max_objects, min_area
        self.families = tuple(families)
        self.camouflage, self.touching, self.same_colour = camouflage, touching, same_colour
        self.contained = contained
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        h, w = scene_shape(rng, self.size)
        image, stuff_labels = _stuff(rng, h, w)
        side = min(h, w)
        objects: List[np.ndarray] = []
        parts: List[List[np.ndarray]] = []
        families: List[str] = []
        group: List[int] = []
        colours: List[np.ndarray] = []
        containers: List[np.ndarray] = []  # each with the object on it
        for i in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            family = self.families[int(rng.integers(len(self.families)))]
            r = rng.uniform(0.08, 0.26) * side
            touch = bool(objects) and rng.random() < self.touching
            if touch:
                j = int(rng.integers(len(objects)))
                ys, xs = np.nonzero(objects[j]) if objects[j].any() else (np.array([h // 2]), np.array([w // 2]))
                k = int(rng.integers(len(xs)))
                # Centre one radius out from a pixel of object j, towards outside its centroid.
                ang = math.atan2(ys[k] - ys.mean(), xs[k] - xs.mean()) + rng.uniform(-0.5, 0.5)
                cx, cy = xs[k] + 0.8 * r * math.cos(ang), ys[k] + 0.8 * r * math.sin(ang)
                cx, cy = float(np.clip(cx, 0, w - 1)), float(np.clip(cy, 0, h - 1))
            else:
                cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
            container = None
            if not touch and rng.random() < self.contained:
                rc = r * rng.uniform(1.35, 1.9)
                ox, oy = rng.uniform(-0.15, 0.15, 2) * rc
                family_c = CONTAINER_FAMILIES[int(rng.integers(len(CONTAINER_FAMILIES)))]
                container, _ = draw_family(rng, family_c, h, w, cx + ox, cy + oy, rc)
                image = np.where(container[..., None],
                                 _texture(rng, h, w, _random_color(rng), rng.uniform(0, 45)), image)
            mask, obj_parts = draw_family(rng, family, h, w, cx, cy, r)
            if not mask.any():
                continue
            if touch and rng.random() < self.same_colour:
                colour = colours[j] + rng.normal(0, 6, 3)  # a same-colour touching neighbour
            elif rng.random() < self.camouflage:
                colour = image[mask].mean(axis=0) + rng.normal(0, 22, 3)
            else:
                colour = _random_color(rng)
            image = np.where(mask[..., None], _texture(rng, h, w, colour, rng.uniform(0, 45)), image)
            for p in obj_parts[1:]:  # the first part keeps the object's colour
                image = np.where(p[..., None], _texture(rng, h, w, _random_color(rng), rng.uniform(0, 30)), image)
            # Later objects (and containers) occlude earlier ones, their parts and containers.
            cover = mask if container is None else mask | container
            objects = [m & ~cover for m in objects]
            parts = [[p & ~cover for p in ps] for ps in parts]
            containers = [c & ~cover for c in containers]
            if container is not None:
                containers.append(cover)
            objects.append(mask)
            parts.append(obj_parts)
            families.append(family)
            colours.append(colour)
            group.append(group[j] if touch else len(group))
        image = np.clip(image + rng.normal(0, rng.uniform(0, 6), image.shape), 0, 255).astype(np.uint8)
        if rng.random() < 0.25:
            image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0))))

        keep = [i for i, m in enumerate(objects) if m.sum() >= self.min_area]
        targets: List[np.ndarray] = []
        target_kinds: List[str] = []
        for i in keep:
            targets.append(objects[i])
            target_kinds.append(OBJECT)
            for p in parts[i]:
                if p.sum() >= self.min_area // 2 and p.sum() < 0.95 * objects[i].sum():
                    targets.append(p)
                    target_kinds.append(PART)
        for g in sorted(set(group)):
            members = [i for i in keep if group[i] == g]
            if len(members) >= 2:
                targets.append(np.logical_or.reduce([objects[i] for i in members]))
                target_kinds.append(GROUP)
        for c in containers:
            if c.sum() >= 2 * self.min_area:
                targets.append(c)
                target_kinds.append(CONTAINER)
        covered = np.logical_or.reduce(objects + containers) if objects else np.zeros((h, w), bool)
        for s in range(int(stuff_labels.max()) + 1):
            region = (stuff_labels == s) & ~covered
            if region.sum() >= 4 * self.min_area:
                targets.append(region)
                target_kinds.append(STUFF)
        return Scene(image=image, masks=[objects[i] for i in keep], kinds=[families[i] for i in keep],
                     targets=targets, target_kinds=target_kinds)


# ``regions:<split>`` in dataset specs, ``--world regions`` in pretraining: known once this module is imported
register_world("regions", World(
    lambda seed, size, unseen: RegionScenes(seed=seed, size=size, families=UNSEEN_FAMILIES if unseen else TRAIN_FAMILIES),
    {"train": REGIONS_TRAIN_SEED, "heldout": REGIONS_HELDOUT_SEED}, unseen_seed=REGIONS_HELDOUT_SEED))
