"""Offline batch pre-annotation on real masks of the committed small SAM: COCO / CSV in, COCO RLE
(read back through pycocotools) and PNG masks out; restarts, determinism, automatic masks, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from backend_helpers import centroid, drawn_scene, iou, loosen
from stable_sam.data.dataset import load_mask_png
from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.modeling.plugin import StableSamPlugin
from stable_sam.predictor import PromptError, StableSamPredictor
from stable_sam.prompts import ObjectPrompt
from stable_sam.preannotation import (AutoConfig, InputError, annotate_image, automatic_masks, items_from_coco,
                                      items_from_csv, items_from_folder, run_offline)
from stable_sam.preannotation.journal import Journal
from stable_sam.preannotation.offline import journal_path
from stable_sam.preannotation.readahead import ReadAhead
from test_rts import one_thread  # noqa: F401 - its autouse fixture: one torch thread in this module, restored after

ROOT = Path(__file__).resolve().parents[1]
# The small SAM on the drawn scenes measures box IoU 0.91-0.95 (see test_backend_e2e.py).
BOX_IOU = 0.8


@pytest.fixture(scope="module")
def scenes():
    return [drawn_scene(40 + i) for i in range(3)]


def write_coco_input(folder: Path, scenes, frac: float = 0.1) -> Path:
    """Images + a COCO file whose annotations carry the ground truth (RLE) and a rough box."""
    images, anns = [], []
    for i, sc in enumerate(scenes):
        name = f"scene{i}.png"
        Image.fromarray(sc.image).save(folder / name)
        w, h = sc.size
        images.append({"id": 10 + i, "file_name": name, "width": w, "height": h})  # ids need not start at 1
        for k, (m, box) in enumerate(zip(sc.masks, sc.boxes)):
            x0, y0, x1, y1 = loosen(box, sc.size, frac)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": 100 + 10 * i + k, "image_id": 10 + i, "category_id": 3 + k, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(m.sum()),
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    path = folder / "input.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 3, "name": "ellipse"}, {"id": 4, "name": "polygon"}]}))
    return path


def test_offline_coco_round_trip_through_pycocotools(tmp_path, tiny_model, scenes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path = write_coco_input(tmp_path, scenes)
    work = items_from_coco(gt_path, tmp_path)
    out, png = tmp_path / "out" / "masks.json", tmp_path / "out" / "png"
    summary = run_offline(tiny_model, work, out, png_dir=png, progress=False)
    assert (summary.processed, summary.failed, summary.objects) == (3, [], 6)

    coco = COCO(str(out))  # pycocotools reads the output as an instance file ...
    data = json.loads(out.read_text())
    assert [im["id"] for im in data["images"]] == [10, 11, 12]
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4, 5, 6]  # from the input order
    assert data["categories"] == json.loads(gt_path.read_text())["categories"]
    for i, sc in enumerate(scenes):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[10 + i]))
        assert [a["stable_sam"]["source_id"] for a in anns] == [100 + 10 * i, 101 + 10 * i]
        assert [a["category_id"] for a in anns] == [3, 4]
        for k, (ann, gt) in enumerate(zip(anns, sc.masks)):
            mask = coco.annToMask(ann).astype(bool)
            assert iou(mask, gt) >= BOX_IOU, (i, k, iou(mask, gt))
            assert ann["area"] == int(mask.sum())
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 < ann["score"] <= 1.5 and 0 <= ann["stable_sam"]["stability"] <= 1
            assert len(ann["stable_sam"]["alpha"]) == 2
            # the PNG masks hold the same pixels, in the layout the folder dataset reads
            assert np.array_equal(load_mask_png(png / f"scene{i}_mask_{k}.png"), mask)

    # ... and as detections against the ground truth: COCO's own segm evaluation
    gt = COCO(str(gt_path))
    dets = gt.loadRes([dict(a, id=n + 1) for n, a in enumerate(data["annotations"])])
    ev = COCOeval(gt, dets, iouType="segm")
    ev.params.useCats = 1
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[1] > 0.95  # AP at IoU 0.5


def test_restart_resumes_and_output_is_deterministic(tmp_path, tiny_model, scenes):
    gt_path = write_coco_input(tmp_path, scenes)
    work = items_from_coco(gt_path, tmp_path)
    ref = tmp_path / "ref" / "masks.json"
    run_offline(tiny_model, work, ref, read_ahead=0, progress=False)  # serial, in one go

    out = tmp_path / "run" / "masks.json"
    first = run_offline(tiny_model, work, out, limit=1, progress=False)
    assert (first.processed, first.already_done) == (1, 0)
    assert [im["id"] for im in json.loads(out.read_text())["images"]] == [10]  # partial output, valid COCO
    # a kill in the middle of a journal write leaves a torn line: dropped on restart
    with open(journal_path(out), "a") as f:
        f.write('{"image_id": 11, "file_na')
    cache, tiny_model.cache = tiny_model.cache, EmbeddingCache()  # nothing encoded before counts
    try:
        encoder_calls = tiny_model.encoder_calls
        second = run_offline(tiny_model, work, out, progress=False)
        assert tiny_model.encoder_calls - encoder_calls == 2  # the finished image is not encoded again
    finally:
        tiny_model.cache = cache
    assert (second.processed, second.already_done, second.failed) == (2, 1, [])
    assert out.read_bytes() == ref.read_bytes()  # threaded + resumed == serial in one go, byte for byte
    third = run_offline(tiny_model, work, out, progress=False)
    assert third.processed == 0 and third.already_done == 3
    assert out.read_bytes() == ref.read_bytes()

    # a journal of other inputs is refused, not mixed in
    other = items_from_coco(write_coco_input(tmp_path, scenes[:2]), tmp_path)
    with pytest.raises(InputError, match="another run"):
        run_offline(tiny_model, other, out, progress=False)
    assert run_offline(tiny_model, other, out, fresh=True, progress=False).processed == 2


def test_csv_boxes_points_and_mixed_objects(tmp_path, tiny_model, scenes):
    sc = scenes[0]
    Image.fromarray(sc.image).save(tmp_path / "a.png")
    Image.fromarray(scenes[1].image).save(tmp_path / "b.png")
    (bx0, by0, bx1, by1), (px, py) = loosen(sc.boxes[0], sc.size), centroid(sc.masks[1])
    cx, cy = centroid(scenes[1].masks[0])
    nx, ny = bx0 + 1.5, by0 + 1.5  # a corner of the ellipse's loose box: background, a trimming click
    assert not sc.masks[0][int(ny), int(nx)]
    rows = ["image,object,label,x0,y0,x1,y1,x,y,positive",
            f"b.png,,ellipse,,,,,{cx},{cy},",  # a lone click
            f"a.png,e,ellipse,{bx0},{by0},{bx1},{by1},,,",  # a box ...
            f"a.png,e,ellipse,,,,,{nx},{ny},0",  # ... and a negative click: one object
            f"a.png,,polygon,,,,,{px},{py},1"]
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    work = items_from_csv(tmp_path / "p.csv", tmp_path)
    assert [it.file_name for it in work.items] == ["a.png", "b.png"]  # sorted, not row order
    assert [c["name"] for c in work.categories] == ["ellipse", "polygon"]
    out = tmp_path / "out.json"
    summary = run_offline(tiny_model, work, out, progress=False)
    assert summary.failed == [] and summary.objects == 3
    data = json.loads(out.read_text())
    masks = [mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
             for a in data["annotations"]]
    a_ellipse, a_polygon, b_ellipse = masks
    assert iou(a_ellipse.astype(bool), sc.masks[0]) >= BOX_IOU
    assert iou(a_polygon.astype(bool), sc.masks[1]) >= BOX_IOU
    assert iou(b_ellipse.astype(bool), scenes[1].masks[0]) >= BOX_IOU
    prompts = [a["stable_sam"]["prompt"] for a in data["annotations"]]
    assert prompts[0]["point_labels"] == [0] and "box" in prompts[0]
    assert [a["stable_sam"]["source_id"] for a in data["annotations"]] == ["e", "line 5", "line 2"]


def test_predict_objects_batches_mixed_shapes_like_single_calls(tiny_model, scenes):
    sc = scenes[2]
    predictor = StableSamPredictor(tiny_model)
    predictor.set_image(sc.image)
    box0, box1 = loosen(sc.boxes[0], sc.size), loosen(sc.boxes[1], sc.size)
    c0, c1 = centroid(sc.masks[0]), centroid(sc.masks[1])
    prompts = [ObjectPrompt(box=box0), ObjectPrompt(points=(c1,), labels=(1,)),
               ObjectPrompt(box=box1, points=(c1, c0), labels=(1, 0)), ObjectPrompt(box=box1)]
    calls = []
    hook = tiny_model.sam.mask_decoder.register_forward_hook(lambda m, i, o: calls.append(o[0].shape[0]))
    try:
        out = predictor.predict_objects(prompts)
    finally:
        hook.remove()
    assert sorted(calls) == [1, 1, 2]  # one decoder call per shape: the two bare boxes together
    assert out.masks.shape == (4,) + sc.image.shape[:2] and out.alpha.shape == (4, 2)
    singles = [predictor.predict(box=box0), predictor.predict(point_coords=[c1], point_labels=[1]),
               predictor.predict(box=box1, point_coords=[[c1, c0]], point_labels=[[1, 0]]), predictor.predict(box=box1)]
    for k, single in enumerate(singles):
        assert iou(out.masks[k], single.masks[0]) > 0.995, k
        assert abs(out.scores[k] - single.scores[0]) < 1e-4
    assert iou(out.masks[0], sc.masks[0]) >= BOX_IOU and iou(out.masks[1], sc.masks[1]) >= BOX_IOU
    with pytest.raises(ValueError, match="needs a box or points"):
        ObjectPrompt()
    with pytest.raises(PromptError, match="outside"):
        predictor.predict_objects([ObjectPrompt(box=(0, 0, sc.size[0] + 50, 10))])


@pytest.mark.slow  # the automatic mask generator: seconds on CPU
def test_automatic_masks_run_through_the_plugin_and_the_embedding_cache(tmp_path, tiny_model, scenes):
    sc = scenes[0]
    tiny_model.embed(sc.image)
    calls_before = tiny_model.encoder_calls
    plugin = StableSamPlugin()
    routed = []
    hook = plugin.register_forward_hook(lambda m, i, o: routed.append(o[2].shape[0]))
    try:
        found = automatic_masks(tiny_model, sc.image, AutoConfig.for_model("sam_tiny", points_per_side=8), plugin)
    finally:
        hook.remove()
    assert tiny_model.encoder_calls == calls_before  # the embedding came from the cache
    assert sum(routed) == 8 * 8  # every grid prompt went through the plugin
    for gt in sc.masks:  # each drawn object is among the automatic masks
        assert max(iou(f.mask, gt) for f in found) >= BOX_IOU
    assert all(0.8 < f.predicted_iou and f.stability >= 0.9 for f in found)

    # the offline job on a bare folder: automatic masks only, category "object"
    Image.fromarray(sc.image).save(tmp_path / "only.png")
    out = tmp_path / "auto.json"
    summary = run_offline(tiny_model, items_from_folder(tmp_path), out, auto=AutoConfig.for_model(
        "sam_tiny", points_per_side=8), progress=False)
    data = json.loads(out.read_text())
    assert summary.objects == len(found) and data["categories"] == [{"id": 1, "name": "object"}]
    assert all("auto_point" in a["stable_sam"]["prompt"] for a in data["annotations"])


def test_bad_images_and_prompts_are_reported_and_the_rest_is_done(tmp_path, tiny_model, scenes):
    path = write_coco_input(tmp_path, scenes)
    data = json.loads(path.read_text())
    data["images"].append({"id": 50, "file_name": "missing.png", "width": 10, "height": 10})
    data["annotations"].append({"id": 900, "image_id": 50, "category_id": 3, "bbox": [1, 1, 5, 5]})
    data["annotations"].append({"id": 901, "image_id": 11, "category_id": 3, "bbox": [200, 10, 120, 40]})
    path.write_text(json.dumps(data))
    out = tmp_path / "out.json"
    summary = run_offline(tiny_model, items_from_coco(path, tmp_path), out, progress=False)
    assert summary.processed == 2
    failures = dict(summary.failed)
    assert "not found" in failures["missing.png"]
    assert "object 901" in failures["scene1.png"] and "outside the 240 x 180 image" in failures["scene1.png"]
    assert [im["id"] for im in json.loads(out.read_text())["images"]] == [10, 12]

    for text, words in (("{not json", "not readable JSON"), ('{"images": 3}', "not a COCO file"),
                        ('{"images": [], "annotations": [{"id": 1, "image_id": 7, "bbox": [0, 0, 1, 1]}]}',
                         "image_id 7")):
        path.write_text(text)
        with pytest.raises(InputError, match=words):
            items_from_coco(path, tmp_path)
    with pytest.raises(InputError, match="not found"):
        items_from_coco(tmp_path / "nope.json", tmp_path)
    for rows, words in (("file,x,y\na.png,1,2", "'image' column"), ("image,x0,y0,x1,y1\na.png,5,5,2,9", "zero or"),
                        ("image,x,y,positive\na.png,1,2,0", "only negative"), ("image,x,y\na.png,nan,2", "finite")):
        (tmp_path / "p.csv").write_text(rows + "\n")
        with pytest.raises(InputError, match=words):
            items_from_csv(tmp_path / "p.csv", tmp_path)


@pytest.mark.slow  # runs the pre-annotation CLI in subprocesses
def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "preannotate.py"), "offline", "--images",
                        str(tmp_path), "--coco", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "COCO file not found" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_read_ahead_keeps_order_hands_over_errors_and_stops():
    def slow_square(x):
        if x == 3:
            raise ValueError("three")
        time.sleep(0.001 * (x % 3))
        return x * x

    stage = ReadAhead(range(8), slow_square, depth=2)
    got = [(i, r, str(e) if e else None) for i, r, e in stage]
    assert got == [(i, None if i == 3 else i * i, "three" if i == 3 else None) for i in range(8)]

    def broken_source():
        yield 1
        raise ConnectionError("server gone")

    with pytest.raises(ConnectionError, match="server gone"):
        list(ReadAhead(broken_source(), lambda x: x, depth=2))

    # a consumer that stops early (--limit) stops the chain's threads too
    upstream = ReadAhead(iter(range(10 ** 6)), lambda x: x, depth=2)
    downstream = ReadAhead(upstream, lambda t: t[1], depth=2)
    for _ in zip(range(3), downstream):
        pass
    downstream.close()
    assert not downstream._thread.is_alive() and not upstream._thread.is_alive()
    assert not any(t.name == "read-ahead" and t.is_alive() for t in threading.enumerate())


def test_annotate_image_is_pure(tiny_model, scenes, tmp_path):
    """Same model, image and prompts: the same record, byte for byte, with or without a given embedding."""
    work = items_from_coco(write_coco_input(tmp_path, scenes), tmp_path)
    item, image = work.items[1], scenes[1].image
    a = annotate_image(tiny_model, item, image).record
    b = annotate_image(tiny_model, item, image, embedding=tiny_model.embed(image)).record
    assert json.dumps(a) == json.dumps(b)
    assert json.loads(json.dumps(a)) == a  # plain JSON
    journal = Journal(tmp_path / "j.jsonl", "k")
    journal.append(a)
    journal.close()
    assert Journal(tmp_path / "j.jsonl", "k").records == {a["image_id"]: a}


def test_encode_ahead_only_where_it_has_hardware_of_its_own(monkeypatch):
    """A GPU encoder leaves the CPU free: encode ahead. On CPU, only when the encoder's and the
    decoder's torch threads fit the cores (else they split the same cores and lose)."""
    from stable_sam.preannotation.offline import encode_ahead_helps

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert encode_ahead_helps(torch.device("cpu"))
        torch.set_num_threads(5)
        assert not encode_ahead_helps(torch.device("cpu"))
        assert encode_ahead_helps(torch.device("cuda", 0))
    finally:
        torch.set_num_threads(before)
