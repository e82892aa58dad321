"""Polygon output and clean masks (issue 24): the geometry of ``stable_sam.masks``, the backend's
one result writer (``backend/results.py``) for brush and polygon controls, its settings, and the
pre-annotation paths that go through it.

A polygon is checked by rasterising it the way readers of Label Studio's COCO export do
(pycocotools), against the mask it was made from."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
from PIL import Image

from backend.app import create_app
from backend.label_config import parse_label_config
from backend.ml_backend import StableSamBackend
from backend.results import mask_results
from backend.server_settings import BackendSettings, SettingsError
from backend_helpers import RECOMMENDED_CONFIG, ROOT, centroid, drawn_scene, iou, keypoint, loosen, rectangle, result_mask
from stable_sam.data.label_studio_prompts import PromptGroup
from stable_sam.masks import PolygonOptions, clean_mask, mask_polygons, polygons_mask
from stable_sam.predictor import ObjectMask
from stable_sam.prompts import ObjectPrompt

POLYGON_CONFIG = (ROOT / "label_config" / "polygon.xml").read_text()
EXACT = PolygonOptions(tolerance_px=0.0, min_area_px=0)


def _blobs(seed: int, size: int = 96) -> np.ndarray:
    """Smooth random blobs: several pieces, curved and diagonal edges, some holes."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.random((size, size)), (0, 0), 4) > 0.5


def _filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every hole filled (each 8-connected piece's outer boundary, filled)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out.astype(bool)


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# --------------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize("seed", range(4))
def test_exact_polygons_follow_pixel_edges(seed):
    """At tolerance 0 each polygon is the piece's outline along pixel edges: its area is the
    piece's pixel count with holes filled, and pycocotools rasterises it back to that piece."""
    mask = _blobs(seed)
    polygons = mask_polygons(mask, EXACT)
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    assert len(polygons) == count - 1 >= 2
    filled = _filled(mask)
    assert abs(sum(_shoelace(p) for p in polygons) - filled.sum()) <= 2  # a pinch point can cost a pixel
    raster = polygons_mask(polygons, *mask.shape)
    assert (raster != filled).sum() <= 2
    areas = [_shoelace(p) for p in polygons]
    assert areas == sorted(areas, reverse=True)  # largest first


def test_simple_shapes_exactly():
    square = np.zeros((10, 12), bool)
    square[2:5, 3:8] = True
    (poly,) = mask_polygons(square, EXACT)
    assert sorted(map(tuple, poly.tolist())) == [(3, 2), (3, 5), (8, 2), (8, 5)]
    pixel = np.zeros((5, 5), bool)
    pixel[4, 4] = True  # at the image's corner, and smaller than any tolerance: still a polygon
    (poly,) = mask_polygons(pixel, PolygonOptions(tolerance_px=3.0))
    assert _shoelace(poly) == 1.0 and poly.min() == 4 and poly.max() == 5
    assert mask_polygons(np.zeros((5, 5), bool)) == []


def test_tolerance_trades_vertices_for_accuracy():
    mask = np.zeros((200, 200), np.uint8)
    cv2.ellipse(mask, (100, 90), (70, 40), 30, 0, 360, 1, thickness=cv2.FILLED)
    mask = mask.astype(bool)
    vertices, ious = [], []
    for tol in (0.0, 0.5, 1.0, 2.0, 4.0):
        (poly,) = mask_polygons(mask, PolygonOptions(tolerance_px=tol))
        vertices.append(len(poly))
        ious.append(iou(polygons_mask([poly], *mask.shape), mask))
    assert vertices == sorted(vertices, reverse=True) and vertices[0] > 4 * vertices[2]
    assert ious[0] == 1.0 and ious[2] >= 0.98 and ious[-1] >= 0.9


def test_pieces_min_area_largest_only_and_holes():
    mask = np.zeros((60, 80), bool)
    mask[5:35, 5:45] = True  # 1200 px, with a hole
    mask[15:20, 15:20] = False
    mask[40:50, 60:70] = True  # 100 px
    mask[55:57, 2:4] = True  # 4 px
    areas = lambda polys: sorted(round(_shoelace(p)) for p in polys)
    assert areas(mask_polygons(mask, PolygonOptions(0.0, min_area_px=0))) == [4, 100, 1200]  # hole filled
    assert areas(mask_polygons(mask, PolygonOptions(0.0, min_area_px=50))) == [100, 1200]
    assert areas(mask_polygons(mask, PolygonOptions(0.0, min_area_px=5000))) == [1200]  # the largest always
    assert areas(mask_polygons(mask, PolygonOptions(0.0, min_area_px=0, largest_only=True))) == [1200]


def test_clean_mask_removes_small_islands_and_holes_only():
    mask = np.zeros((60, 60), bool)
    mask[10:40, 10:40] = True
    mask[20:22, 20:22] = False  # a 4-px hole
    mask[25:31, 25:31] = False  # a 36-px hole
    mask[50, 50] = True  # a 1-px island
    mask[45:52, 2:9] = True  # a 49-px island
    out = clean_mask(mask, 10)
    assert out[20:22, 20:22].all() and not out[50, 50]  # small hole filled, small island gone
    assert not out[25:31, 25:31].any() and out[45:52, 2:9].all()  # large ones kept
    assert (out ^ mask).sum() == 4 + 1
    assert clean_mask(mask, 0) is mask
    specks = np.zeros((20, 20), bool)
    specks[2, 2] = True
    specks[10:12, 10:12] = True
    assert clean_mask(specks, 100).sum() == 4  # all pieces below the area: the largest stays


# --------------------------------------------------------------------------------------------------
# the result writer


def _group(rid="k1"):
    return PromptGroup("image", ObjectPrompt(points=[[10.0, 10.0]]), label="Object", source_ids=[rid], from_name="kp")


def _two_pieces_with_specks() -> np.ndarray:
    mask = np.zeros((80, 100), bool)
    mask[10:50, 10:50] = True
    mask[30:33, 30:33] = False  # a 9-px hole
    mask[60:75, 70:95] = True  # a 375-px piece
    mask[5, 90] = True  # a 1-px speck
    return mask


def test_polygon_results_in_label_studio_form():
    cfg = parse_label_config(POLYGON_CONFIG)
    control = cfg.output_by_image["image"]
    assert control.tag == "PolygonLabels"
    mask = _two_pieces_with_specks()
    pred = ObjectMask(mask, 0.9, 0.95, (0.1, 0.9))
    raw = BackendSettings(mask_min_region_px=0)
    results = mask_results(_group(), "Object", control, "image", pred, replace(raw, polygon_min_area_px=16))
    assert [r["id"] for r in results] == ["k1_sam", "k1_sam1"]  # the speck is under POLYGON_MIN_AREA_PX
    for r in results:
        assert r["type"] == "polygonlabels" and r["from_name"] == "poly" and r["to_name"] == "image"
        assert (r["original_width"], r["original_height"]) == (100, 80)
        assert r["value"]["polygonlabels"] == ["Object"] and r["value"]["closed"] is True
        pts = np.asarray(r["value"]["points"])
        assert pts.shape[1] == 2 and len(pts) >= 3 and pts.min() >= 0 and pts.max() <= 100
        assert r["score"] == 0.9 and "predicted IoU 0.90" in r["meta"]["text"][0]
        assert r["stable_sam"]["area_px"] == int(mask.sum())
    back = polygons_mask([np.asarray(r["value"]["points"]) / 100 * (100, 80) for r in results], 80, 100)
    assert iou(back, _filled(mask) & ~(np.arange(100)[None, :] == 90)) >= 0.97
    one = mask_results(_group(), "Object", control, "image", pred, replace(raw, polygon_largest_only=True))
    assert len(one) == 1 and one[0]["id"] == "k1_sam"
    assert mask_results(_group(), "Object", control, "image", replace(pred, mask=np.zeros_like(mask)),
                        BackendSettings()) == []


def test_clean_masks_apply_to_brush_and_polygon_results():
    mask = _two_pieces_with_specks()
    pred = ObjectMask(mask, 0.9, 0.95)
    clean = BackendSettings(mask_min_region_px=20, polygon_min_area_px=0)
    brush_control = parse_label_config(RECOMMENDED_CONFIG).output_by_image["image"]
    (brush,) = mask_results(_group(), "Object", brush_control, "image", pred, clean)
    assert brush["type"] == "brushlabels"
    assert (result_mask(brush) == clean_mask(mask, 20)).all()
    assert result_mask(brush)[30:33, 30:33].all() and not result_mask(brush)[5, 90]
    (raw,) = mask_results(_group(), "Object", brush_control, "image", pred, BackendSettings(mask_min_region_px=0))
    assert (result_mask(raw) == mask).all()  # 0: off
    poly_control = parse_label_config(POLYGON_CONFIG).output_by_image["image"]
    assert len(mask_results(_group(), "Object", poly_control, "image", pred, clean)) == 2  # the speck is gone
    assert len(mask_results(_group(), "Object", poly_control, "image", pred, replace(clean, mask_min_region_px=0))) == 3


@pytest.mark.parametrize("name,value,words", [
    ("POLYGON_TOLERANCE_PX", "25", "<= 20"), ("POLYGON_TOLERANCE_PX", "-1", ">= 0"),
    ("POLYGON_TOLERANCE_PX", "nan", ">= 0"), ("POLYGON_TOLERANCE_PX", "fine", "not a number"),
    ("POLYGON_MIN_AREA_PX", "-5", ">= 0"), ("MASK_MIN_REGION_PX", "-1", ">= 0"),
    ("MASK_MIN_REGION_PX", "1e12", "<="), ("POLYGON_LARGEST_ONLY", "maybe", "expected")])
def test_settings_out_of_range_are_refused_by_name(monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name) as e:
        BackendSettings.from_env()
    assert words in str(e.value)


def test_settings_read_from_the_environment(monkeypatch):
    for name, value in (("POLYGON_TOLERANCE_PX", "0.5"), ("POLYGON_MIN_AREA_PX", "4"), ("MASK_MIN_REGION_PX", "30"),
                        ("POLYGON_LARGEST_ONLY", "1")):
        monkeypatch.setenv(name, value)
    s = BackendSettings.from_env()
    assert (s.polygon_tolerance_px, s.polygon_min_area_px, s.mask_min_region_px, s.polygon_largest_only) == \
        (0.5, 4, 30, True)
    assert s.to_env()["POLYGON_TOLERANCE_PX"] == "0.5" and s.to_env()["POLYGON_LARGEST_ONLY"] == "1"


# --------------------------------------------------------------------------------------------------
# through the backend, with the small SAM


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("poly-media")
    sc = drawn_scene(3)
    Image.fromarray(sc.image).save(d / "scene.png")
    return sc, d


def _body(path, regions, config):
    return {"tasks": [{"id": 7, "data": {"image": str(path)}}], "project": "5.1700000000", "label_config": config,
            "params": {"context": {"result": regions}}}


def test_polygon_config_answers_polygons_of_the_brush_mask(scene_file, tiny_model):
    sc, d = scene_file
    backend = StableSamBackend(BackendSettings(local_files_root=d, model_dir=d / "models"), model=tiny_model)
    client = create_app(backend=backend).test_client()
    for regions in ([keypoint(*centroid(sc.masks[0]), sc.size)], [rectangle(loosen(sc.boxes[1], sc.size), sc.size)]):
        obj = sc.masks[0] if regions[0]["type"] == "keypointlabels" else sc.masks[1]
        r = client.post("/predict", json=_body(d / "scene.png", regions, RECOMMENDED_CONFIG))
        (brush,) = r.get_json()["results"][0]["result"]
        r = client.post("/predict", json=_body(d / "scene.png", regions, POLYGON_CONFIG))
        assert r.status_code == 200, r.get_json()
        polys = r.get_json()["results"][0]["result"]
        assert polys and all(p["type"] == "polygonlabels" and p["value"]["polygonlabels"] == ["Object"] for p in polys)
        w, h = sc.size
        raster = polygons_mask([np.asarray(p["value"]["points"]) / 100 * (w, h) for p in polys], h, w)
        assert iou(raster, result_mask(brush)) >= 0.95  # the polygon is the brush mask, simplified
        assert iou(raster, obj) >= 0.8
        assert polys[0]["stable_sam"]["area_px"] == brush["stable_sam"]["area_px"]


def test_clean_masks_in_interactive_answers(scene_file, tiny_model, monkeypatch):
    """The backend's answers go through MASK_MIN_REGION_PX: a decoded mask with a speck and a
    pinhole comes back without them, as brush and as polygons."""
    sc, d = scene_file
    speckled = sc.masks[0].copy()
    y, x = (int(v) for v in np.argwhere(sc.masks[0]).mean(axis=0))
    speckled[y, x] = False  # a pinhole
    free = np.argwhere(~sc.masks[0] & ~sc.masks[1])[0]
    speckled[free[0], free[1]] = True  # a speck on the background
    settings = BackendSettings(local_files_root=d, model_dir=d / "models", mask_min_region_px=8)
    backend = StableSamBackend(settings, model=tiny_model)
    monkeypatch.setattr(StableSamBackend, "_decode",
                        lambda self, model, plugin, emb, groups, scope=None: [ObjectMask(speckled, 0.9, 0.9)] * len(groups))
    client = create_app(backend=backend).test_client()
    regions = [keypoint(x, y, sc.size)]
    (brush,) = client.post("/predict", json=_body(d / "scene.png", regions, RECOMMENDED_CONFIG)).get_json()["results"][0]["result"]
    assert (result_mask(brush) == sc.masks[0]).all()
    polys = client.post("/predict", json=_body(d / "scene.png", regions, POLYGON_CONFIG)).get_json()["results"][0]["result"]
    assert len(polys) == 1 and polys[0]["stable_sam"]["area_px"] == int(sc.masks[0].sum())


def test_offline_preannotation_cleans_masks(tiny_model, scene_file):
    from stable_sam.preannotation import annotate_image
    from stable_sam.preannotation.items import ObjectSpec, WorkItem

    sc, d = scene_file
    box = loosen(sc.boxes[0], sc.size)
    item = WorkItem(image_id=1, file_name="scene.png", path=d / "scene.png", width=sc.size[0], height=sc.size[1],
                    objects=(ObjectSpec(ObjectPrompt(box=list(box)), category_id=1, source_id=1),))
    raw = annotate_image(tiny_model, item, sc.image)
    cleaned = annotate_image(tiny_model, item, sc.image, min_region_px=10**6)
    # every island goes but the largest piece, every hole is filled
    assert (cleaned.masks[0] == clean_mask(raw.masks[0], 10**6)).all()
    assert cleaned.record["objects"][0]["area"] == int(cleaned.masks[0].sum())
