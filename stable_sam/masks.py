"""What is done to a predicted mask before it leaves: clean it, or turn it into polygons.

- ``clean_mask``: SAM's own post-processing (``segment_anything.utils.amg.remove_small_regions``,
  as its automatic mask generator runs it): holes, then islands, smaller than an area in pixels
  are removed. An object whose pieces are all below the area keeps its largest.
- ``mask_polygons``: one polygon per connected piece (8-connected, as OpenCV traces them) in
  image pixels, simplified with Douglas-Peucker (``cv2.approxPolyDP``) at a tolerance in pixels.
  Holes are dropped: a polygon is the piece's outer boundary. The boundary is traced along pixel
  edges, not pixel centres (a mask pixel (x, y) covers [x, x+1] x [y, y+1]), so at tolerance 0 the
  polygon's area is the piece's pixel count with its holes filled: what Label Studio's and
  pycocotools' readers of a polygon compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import cv2
import numpy as np
from segment_anything.utils.amg import remove_small_regions

# corner (i, j) of a crop holds a 1 when any of the pixels (i-1 .. i, j-1 .. j) is in the piece
_CORNER_KERNEL = np.ones((2, 2), np.uint8)


def clean_mask(mask: np.ndarray, min_region_px: int) -> np.ndarray:
    """``mask`` (H x W bool) without holes and islands under ``min_region_px`` pixels (0: as is)."""
    if min_region_px <= 0 or not mask.any():
        return mask
    mask, _ = remove_small_regions(mask, min_region_px, mode="holes")
    mask, _ = remove_small_regions(mask, min_region_px, mode="islands")
    return mask


@dataclass(frozen=True)
class PolygonOptions:
    """``tolerance_px``: Douglas-Peucker tolerance; pieces under ``min_area_px`` pixels are dropped
    (the largest piece always stays); ``largest_only``: the largest piece alone."""

    tolerance_px: float = 1.0
    min_area_px: int = 16
    largest_only: bool = False


def mask_polygons(mask: np.ndarray, options: PolygonOptions = PolygonOptions()) -> List[np.ndarray]:
    """H x W bool -> polygons (each K x 2 float, x y in pixels along pixel edges, K >= 3), largest
    piece first; [] for an empty mask. A piece too small for the tolerance keeps its exact outline."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return []
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = [int(k) + 1 for k in np.argsort(-areas, kind="stable")]
    keep = order[:1] if options.largest_only else (
        [k for k in order if stats[k, cv2.CC_STAT_AREA] >= options.min_area_px] or order[:1])
    polygons = []
    for k in keep:
        x, y, w, h = (int(v) for v in stats[k, :4])
        # The piece at twice its size in a crop with an empty border, then its corner grid: grid
        # point (i, j) is the image point (x + (j - 1) / 2, y + (i - 1) / 2) and holds a 1 when a
        # pixel of the piece touches it, so the grid's traced outline runs along the piece's pixel
        # edges (at the original size a 1-pixel notch would close: its four corners all touch
        # the piece).
        crop = np.zeros((2 * h + 2, 2 * w + 2), np.uint8)
        crop[1:-1, 1:-1] = np.kron(labels[y:y + h, x:x + w] == k, np.ones((2, 2), np.uint8))
        grid = cv2.dilate(crop, _CORNER_KERNEL, anchor=(1, 1), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        contours, _ = cv2.findContours(grid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        outline = _through_concave_corners(max(contours, key=len).reshape(-1, 2), grid).reshape(-1, 1, 2)
        simple = cv2.approxPolyDP(outline, 2 * options.tolerance_px, True)
        if len(simple) < 3:  # a piece a few pixels across: its exact outline, corners only
            simple = cv2.approxPolyDP(outline, 0.0, True)
        polygons.append((simple.reshape(-1, 2).astype(np.float64) - 1) / 2 + (x, y))
    return polygons


def _through_concave_corners(outline: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """OpenCV traces a border 8-connected: where the outline steps diagonally it cuts a concave
    corner of ``grid`` (half a pixel of area each). Put the corner back: after each diagonal step,
    the one of its two axis-aligned midpoints that lies in ``grid``."""
    step = np.roll(outline, -1, axis=0) - outline
    diagonal = np.flatnonzero((step[:, 0] != 0) & (step[:, 1] != 0))
    if not len(diagonal):
        return outline
    start, d = outline[diagonal], step[diagonal]
    across = start + d * (1, 0)  # x first
    down = start + d * (0, 1)  # y first
    in_grid = grid[across[:, 1], across[:, 0]] > 0
    corner = np.where(in_grid[:, None], across, down)
    usable = in_grid | (grid[down[:, 1], down[:, 0]] > 0)
    return np.insert(outline, diagonal[usable] + 1, corner[usable], axis=0)


def polygons_mask(polygons: List[np.ndarray], height: int, width: int) -> np.ndarray:
    """Polygons (pixel-edge coordinates, as ``mask_polygons`` gives) -> H x W bool, rasterised by
    pycocotools as a reader of a COCO polygon would (their union)."""
    from pycocotools import mask as mask_utils

    if not polygons:
        return np.zeros((height, width), bool)
    rles = mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polygons], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
