"""Dataset loaders on small fixtures made here: folder, COCO, Label Studio export, synthetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stable_sam.data.coco import CocoDataset
from stable_sam.data.dataset import DatasetError
from stable_sam.data.sources import open_dataset
from stable_sam.data.folder import FolderDataset
from stable_sam.data.label_studio_export import LabelStudioExport
from stable_sam.data.synthetic import HELDOUT_SEED, SyntheticScenes
from stable_sam.data.synthetic_split import SyntheticSplit

H, W = 40, 60
# pycocotools 2.0.11 on numpy 2: its own decode path warns, results are right
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _masks():
    a = np.zeros((H, W), bool)
    a[5:20, 10:30] = True
    b = np.zeros((H, W), bool)
    b[25:35, 40:55] = True
    return [a, b]


def _save_mask(mask, path):
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


# ---------------------------------------------------------------- folder

def test_folder_flat_layout(tmp_path):
    img, masks = _image(), _masks()
    Image.fromarray(img).save(tmp_path / "a.png")
    for k, m in enumerate(masks):
        _save_mask(m, tmp_path / f"a_mask_{k}.png")
    Image.fromarray(_image(1)).save(tmp_path / "b.jpg", quality=95)
    _save_mask(masks[0], tmp_path / "b_mask_0.png")
    ds = FolderDataset(tmp_path)
    assert len(ds) == 2
    s = ds[0]
    np.testing.assert_array_equal(s.image, img)
    assert len(s.masks) == 2 and s.name == "a.png"
    for got, want in zip(s.masks, masks):
        np.testing.assert_array_equal(got, want)
    assert len(ds[1].masks) == 1


def test_folder_hq_layout_one_mask_per_image_and_natural_order(tmp_path):
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    for name in ("x2", "x10"):
        Image.fromarray(_image()).save(tmp_path / "im" / f"{name}.jpg")
        _save_mask(_masks()[0], tmp_path / "gt" / f"{name}.png")
    ds = FolderDataset(tmp_path)
    assert [p.name for p in ds.images] == ["x2.jpg", "x10.jpg"]
    assert len(ds[1].masks) == 1 and ds[1].masks[0].sum() == _masks()[0].sum()


def test_folder_rgba_mask_uses_alpha(tmp_path):
    Image.fromarray(_image()).save(tmp_path / "a.png")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = 255                      # white everywhere; only alpha marks the object
    rgba[..., 3] = _masks()[0] * 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a_mask_0.png")
    np.testing.assert_array_equal(FolderDataset(tmp_path)[0].masks[0], _masks()[0])


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        FolderDataset(tmp_path)
    Image.fromarray(_image()).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="have no mask.*a.png"):
        FolderDataset(tmp_path)
    _save_mask(np.zeros((H + 1, W), bool) | True, tmp_path / "a_mask_0.png")
    with pytest.raises(DatasetError, match="a_mask_0.png is 60 x 41"):
        FolderDataset(tmp_path)[0]
    _save_mask(np.zeros((H, W), bool), tmp_path / "a_mask_0.png")
    with pytest.raises(DatasetError, match="a_mask_0.png is empty"):
        FolderDataset(tmp_path)[0]
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image"):
        FolderDataset(tmp_path)[0]


# ---------------------------------------------------------------- COCO

def _coco_fixture(tmp_path, height=H, width=W, extra_ann=None):
    from pycocotools import mask as mask_utils

    Image.fromarray(_image()).save(tmp_path / "img1.png")
    a, b = _masks()
    rle = mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 300.0, "bbox": [10, 5, 20, 15],
         "segmentation": [[10, 5, 30, 5, 30, 20, 10, 20]]},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 150.0, "bbox": [40, 25, 15, 10],
         "segmentation": rle},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 1.0, "bbox": [0, 0, 1, 1],
         "segmentation": [[0, 0, 1, 0, 1, 1, 0, 1]]},
    ] + ([extra_ann] if extra_ann else [])
    data = {"images": [{"id": 1, "file_name": "img1.png", "height": height, "width": width},
                       {"id": 2, "file_name": "unannotated.png", "height": H, "width": W}],
            "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_polygon_and_rle(tmp_path):
    ds = CocoDataset(_coco_fixture(tmp_path), tmp_path)
    assert len(ds) == 1                      # the image without annotations is left out
    s = ds[0]
    assert len(s.masks) == 2                 # the crowd annotation is left out
    a, b = _masks()
    assert (s.masks[0] & a).sum() / (s.masks[0] | a).sum() > 0.85  # rasterised polygon
    np.testing.assert_array_equal(s.masks[1], b)                 # RLE is exact
    assert isinstance(open_dataset(tmp_path / "instances.json"), CocoDataset)


def test_coco_errors(tmp_path):
    with pytest.raises(DatasetError, match="says 61 x 40"):
        CocoDataset(_coco_fixture(tmp_path, width=W + 1), tmp_path)[0]
    degenerate = {"id": 9, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 0.0, "bbox": [5, 5, 0, 0],
                  "segmentation": [[5, 5, 5, 5, 5, 5]]}
    path = _coco_fixture(tmp_path, extra_ann=degenerate)
    with pytest.raises(DatasetError, match="annotation 9 is empty"):
        CocoDataset(path, tmp_path)[0]
    assert len(CocoDataset(path, tmp_path, skip_empty=True)[0].masks) == 2
    with pytest.raises(DatasetError, match="image file not found"):
        CocoDataset(path, tmp_path / "elsewhere")[0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"id": 1}]}))
    with pytest.raises(DatasetError):
        CocoDataset(bad, tmp_path)


# ---------------------------------------------------------------- Label Studio export

def _brush(mask, w=W, h=H, rid="r1"):
    from label_studio_sdk.converter.brush import mask2rle

    return {"id": rid, "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["Object"]}}


def _ls_fixture(tmp_path, results, url="/data/upload/3/ab12cd-scene.png"):
    (tmp_path / "upload" / "3").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image()).save(tmp_path / "upload" / "3" / "ab12cd-scene.png")
    tasks = [
        {"id": 1, "data": {"image": url},
         "annotations": [{"id": 10, "was_cancelled": True, "result": [_brush(_masks()[1], rid="x")]},
                         {"id": 11, "was_cancelled": False, "result": results}]},
        {"id": 2, "data": {"image": url}, "annotations": []},    # unlabelled: left out
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def test_label_studio_export_decodes_brush_rle(tmp_path):
    a, b = _masks()
    path = _ls_fixture(tmp_path, [_brush(a, rid="r1"), _brush(b, rid="r2")])
    ds = LabelStudioExport(path, tmp_path)
    assert len(ds) == 1
    s = ds[0]
    assert s.name == "ab12cd-scene.png"
    np.testing.assert_array_equal(s.masks[0], a)
    np.testing.assert_array_equal(s.masks[1], b)
    assert isinstance(open_dataset(path), LabelStudioExport)
    # local-files URLs and bare names resolve too
    local = LabelStudioExport(_ls_fixture(tmp_path, [_brush(a)], url="/data/local-files/?d=upload/3/ab12cd-scene.png"),
                              tmp_path)
    np.testing.assert_array_equal(local[0].masks[0], a)


def test_label_studio_export_errors(tmp_path):
    a = _masks()[0]
    with pytest.raises(DatasetError, match="decodes to 2400 pixels.*61 x 40"):
        LabelStudioExport(_ls_fixture(tmp_path, [_brush(a, w=W + 1)]), tmp_path)[0]
    with pytest.raises(DatasetError, match="is empty"):
        LabelStudioExport(_ls_fixture(tmp_path, [_brush(np.zeros((H, W), bool))]), tmp_path)[0]
    corrupt = _brush(a)
    corrupt["value"]["rle"] = corrupt["value"]["rle"][:12]
    with pytest.raises(DatasetError, match="corrupt RLE|decodes to"):
        LabelStudioExport(_ls_fixture(tmp_path, [corrupt]), tmp_path)[0]
    with pytest.raises(DatasetError, match="not found; tried"):
        LabelStudioExport(_ls_fixture(tmp_path, [_brush(a)], url="/data/upload/3/missing.png"), tmp_path)[0]
    with pytest.raises(DatasetError, match="no task has a brush"):
        LabelStudioExport(_ls_fixture(tmp_path, []), tmp_path)
    (tmp_path / "notalist.json").write_text("{}")
    with pytest.raises(DatasetError, match="neither a COCO"):
        open_dataset(tmp_path / "notalist.json")


# ---------------------------------------------------------------- synthetic and open_dataset

def test_synthetic_split_is_the_generator(tmp_path):
    ds = open_dataset("synthetic:heldout", limit=2, start=5)
    assert isinstance(ds, SyntheticSplit) and len(ds) == 2
    scene = SyntheticScenes(seed=HELDOUT_SEED)[6]
    np.testing.assert_array_equal(ds[1].image, scene.image)
    assert len(ds[1].masks) == len(scene.masks)
    with pytest.raises(DatasetError, match="needs a number of images"):
        open_dataset("synthetic:heldout")
    with pytest.raises(DatasetError, match="synthetic split must be"):
        open_dataset("synthetic:valid", limit=1)
    with pytest.raises(DatasetError, match="dataset not found"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(IndexError):
        ds[2]


def test_comma_separated_sets_open_one_after_another():
    from stable_sam.data.sources import open_dataset

    photos = Path(__file__).resolve().parents[1] / "examples" / "photos"
    with pytest.raises(DatasetError, match="number of images"):  # generated scenes need a limit
        open_dataset(f"{photos},synthetic:heldout")
    both = open_dataset(f"{photos}, {photos}")
    assert len(both) == 6 and both[4].name == both[1].name == "ccp_0803.jpg"
    assert "+" in both.description
    cut = open_dataset(f"{photos},{photos}", start=2, limit=2)
    assert [cut[i].name for i in range(len(cut))] == ["ccp_0804.jpg", "ccp_0802.jpg"]
    with pytest.raises(IndexError):
        both[6]
