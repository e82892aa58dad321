"""Label Studio regions as the labeling screen sends them (keypoints, rectangles) and the growing
region list of an annotator's click session: what the benchmarks and tests send to ``/predict``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from stable_sam.predictor import StableSamPredictor
from stable_sam.timing import sync

LABEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "label_config"


def recommended_config() -> str:
    """The recommended labeling config (``label_config/recommended.xml``)."""
    return (LABEL_CONFIG_DIR / "recommended.xml").read_text()


def centroid(mask: np.ndarray) -> Tuple[float, float]:
    """A point (x, y) well inside an H x W bool mask (its mean, else the mask pixel nearest to it)."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    if mask[int(cy), int(cx)]:
        return float(cx) + 0.5, float(cy) + 0.5
    i = np.argmin((xs - cx) ** 2 + (ys - cy) ** 2)
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


def keypoint(x: float, y: float, size: Tuple[int, int], positive: bool = True, rid: str = "kp1",
             label: str = "Object", from_name: str = "kp", style: str = "is_positive") -> dict:
    """A keypointlabels region at pixel (x, y) of a W x H (``size``) image; ``style`` says how a
    negative click is marked: ``is_positive`` (Label Studio's smart keypoint) or ``value.positive``."""
    w, h = size
    item = {"id": rid, "from_name": from_name, "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": 100.0 * x / w, "y": 100.0 * y / h, "width": 0.6, "keypointlabels": [label]}}
    if style == "is_positive":
        item["is_positive"] = positive
    elif not positive:
        item["value"]["positive"] = False
    return item


def rectangle(box, size: Tuple[int, int], rid: str = "r1", label: str = "Object", from_name: str = "rect",
              rotation: float = 0.0) -> dict:
    """A rectanglelabels region of pixel box (x0, y0, x1, y1) on a W x H (``size``) image."""
    w, h = size
    x0, y0, x1, y1 = box
    return {"id": rid, "from_name": from_name, "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": 100.0 * x0 / w, "y": 100.0 * y0 / h, "width": 100.0 * (x1 - x0) / w,
                      "height": 100.0 * (y1 - y0) / h, "rotation": rotation, "rectanglelabels": [label]}}


def loosen(box, size: Tuple[int, int], frac: float = 0.1) -> Tuple[float, float, float, float]:
    """A rough box: each side pushed out by ``frac`` of the box side, clamped to the W x H image."""
    w, h = size
    x0, y0, x1, y1 = box
    dx, dy = frac * (x1 - x0), frac * (y1 - y0)
    return (max(0, x0 - dx), max(0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy))


def click_session(masks: Sequence[np.ndarray], boxes: Sequence[Tuple[int, int, int, int]], size: Tuple[int, int],
                  clicks: int) -> List[List[dict]]:
    """The growing region lists of one annotator session on a W x H image with two or more objects
    (H x W bool ``masks``, tight XYXY ``boxes``): a click on the first object, a second click, an
    Alt-click on the second object (not that one), a rough rectangle, then more clicks inside."""
    m0, m1 = masks[0], masks[1]
    ys, xs = np.nonzero(m0)
    rng = np.random.default_rng(0)
    steps = [keypoint(*centroid(m0), size, rid="k0")]
    k = 1
    while len(steps) < clicks:
        if len(steps) == 2:
            steps.append(keypoint(*centroid(m1), size, positive=False, rid=f"k{k}"))
        elif len(steps) == 3:
            steps.append(rectangle(loosen(boxes[0], size), size, rid="r0"))
        else:
            i = rng.integers(len(xs))
            steps.append(keypoint(xs[i] + 0.5, ys[i] + 0.5, size, rid=f"k{k}"))
        k += 1
    return [steps[: i + 1] for i in range(clicks)]


def predict_payload(task_id: int, image: str, regions: List[dict], label_config: str, project: str = "1.1") -> dict:
    """A ``/predict`` request body as Label Studio sends it for an interactive prompt."""
    return {"tasks": [{"id": task_id, "data": {"image": image}, "annotations": [], "predictions": []}],
            "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": {"result": regions}}}


def predict_regions(predictor, regions: List[dict], size: Tuple[int, int]):
    """What the bare ``StableSamPredictor`` (image already set) makes of one object's regions, the
    prompt parsed as the backend parses it: the baseline a click through the app is compared with."""
    from stable_sam.data.label_studio_prompts import group_prompts, parse_regions  # the backend's own parsing

    groups, _ = group_prompts(parse_regions(regions), size[0], size[1])
    (g,) = groups
    return predictor.predict_objects([g.prompt])


class ClickTimer:
    """One click's regions timed through the Flask app's ``/predict`` (``post``) and on the bare
    predictor (``bare``), seconds each, the device synchronised before each clock read. Image
    ``k`` is ``folder / f"img{k}.png"``."""

    def __init__(self, client: Any, predictor: StableSamPredictor, folder: Path, label_config: str,
                 device: Optional[torch.device] = None) -> None:
        self.client, self.predictor, self.folder, self.label_config = client, predictor, folder, label_config
        self.device = device or torch.device("cpu")

    def post(self, k: int, regions: List[dict]) -> float:
        """Seconds of ``/predict`` on image ``k`` with ``regions`` as the click context."""
        t = time.perf_counter()
        r = self.client.post("/predict", json=predict_payload(k, str(self.folder / f"img{k}.png"), regions,
                                                              self.label_config))
        sync(self.device)
        dt_s = time.perf_counter() - t
        if r.status_code != 200:
            raise RuntimeError(f"/predict answered {r.status_code}: {r.get_data(as_text=True)[:300]}")
        return dt_s

    def bare(self, regions: List[dict], size: Tuple[int, int]) -> Tuple[float, Any]:
        """(seconds, the prediction) of the bare predictor, its image already set, on ``regions``
        of an image of ``size`` (W, H)."""
        t = time.perf_counter()
        out = predict_regions(self.predictor, regions, size)
        sync(self.device)
        return time.perf_counter() - t, out
