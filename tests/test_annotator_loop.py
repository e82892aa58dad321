"""The annotator's loop in the backend: no prediction for a task without prompts, the background
prefetch when a task is opened, and the previous mask fed back with a corrective click.

Flask test client + the committed small SAM; the browser test (test_browser_e2e.py) checks the
same through Label Studio's labeling screen.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from backend.app import create_app
from backend.ml_backend import StableSamBackend
from backend.prefetch import Prefetcher
from backend.previous_masks import PreviousMasks, prompt_key
from backend.server_settings import BackendSettings
from backend_helpers import RECOMMENDED_CONFIG, centroid, drawn_scene, iou, keypoint, result_mask
from stable_sam.builders import build


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop-media")
    scenes = [drawn_scene(40 + i) for i in range(3)]
    for i, sc in enumerate(scenes):
        Image.fromarray(sc.image).save(d / f"scene{i}.png")
    return d, scenes


def _settings(root, tmp_path, **kw) -> BackendSettings:
    return BackendSettings(local_files_root=root, model_dir=tmp_path / "models", **kw)


def _opened(image, task_id=1, project="1.1700000000"):
    """What Label Studio sends when an annotator opens a task: no context, no prompts."""
    return {"tasks": [{"id": task_id, "data": {"image": str(image)}, "annotations": [], "predictions": [],
                       "drafts": []}],
            "project": project, "label_config": RECOMMENDED_CONFIG,
            "params": {"login": None, "password": None, "context": None}}


def _click(image, regions, task_id=1, project="1.1700000000"):
    return {"tasks": [{"id": task_id, "data": {"image": str(image)}, "annotations": [], "predictions": []}],
            "project": project, "label_config": RECOMMENDED_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": regions}}}


def _wait(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_opening_a_task_answers_no_prediction_at_once_and_encodes_in_the_background(images, tmp_path):
    root, scenes = images
    loads = []

    def factory():
        loads.append(time.monotonic())
        return build("sam_tiny", device="cpu")

    backend = StableSamBackend(_settings(root, tmp_path), model_factory=factory)
    c = create_app(backend=backend).test_client()
    r = c.post("/predict", json=_opened(root / "scene0.png"))
    # one entry per task, [] = no prediction (Label Studio stores nothing), before the model loads
    assert r.status_code == 200 and r.get_json() == {"results": [[]]}
    _wait(lambda: backend.metrics.get("prefetch_done_total") == 1)
    assert len(loads) == 1 and backend.model.encoder_calls == 1
    # the first click on that task is decoder-only: the embedding was prefetched
    sc = scenes[0]
    r = c.post("/predict", json=_click(root / "scene0.png", [keypoint(*centroid(sc.masks[0]), sc.size)]))
    assert r.status_code == 200
    assert iou(result_mask(r.get_json()["results"][0]["result"][0]), sc.masks[0]) >= 0.8
    assert backend.model.encoder_calls == 1 and backend.images.hits >= 1
    # a batch (several tasks) is not prefetched: only a task being opened is
    batch = _opened(root / "scene1.png")
    batch["tasks"].append(dict(batch["tasks"][0], id=2, data={"image": str(root / "scene2.png")}))
    r = c.post("/predict", json=batch)
    assert r.get_json() == {"results": [[], []]}
    assert backend.metrics.get("prefetch_queued_total") == 1
    # a broken image is logged by the prefetch, never raised into a request
    r = c.post("/predict", json=_opened(root / "missing.png", task_id=9))
    assert r.status_code == 200 and r.get_json() == {"results": [[]]}
    _wait(lambda: backend.metrics.get("prefetch_failed_total") == 1)


def test_prefetch_off_and_the_queue_bound(images, tmp_path):
    root, _ = images
    backend = StableSamBackend(_settings(root, tmp_path, prefetch_queue=0), model=build("sam_tiny", device="cpu"))
    c = create_app(backend=backend).test_client()
    assert c.post("/predict", json=_opened(root / "scene0.png")).get_json() == {"results": [[]]}
    # nothing queued and no worker thread started: nothing can encode later either
    assert backend.prefetcher._worker is None and backend.prefetcher.pending() == 0
    assert backend.model.encoder_calls == 0 and backend.metrics.get("prefetch_queued_total") == 0

    # a busy worker: the queue holds max_queued jobs, more are dropped at once, never waited for
    prefetcher = Prefetcher(2, backend.metrics, name="test-prefetch")
    release, ran = threading.Event(), []
    assert prefetcher.submit("a", lambda: (release.wait(10), ran.append("a")))
    _wait(lambda: prefetcher._queue.qsize() == 0)  # the worker holds "a"
    assert prefetcher.submit("b", lambda: ran.append("b"))
    assert not prefetcher.submit("b", lambda: ran.append("b again"))  # already waiting
    assert prefetcher.submit("c", lambda: ran.append("c"))
    assert not prefetcher.submit("d", lambda: ran.append("d"))  # full
    # it did not wait for room: the worker still holds "a" (room comes only after "a" has run)
    assert ran == [] and prefetcher._queue.qsize() == 2
    release.set()
    _wait(lambda: prefetcher.pending() == 0)
    assert ran == ["a", "b", "c"]
    assert backend.metrics.get("prefetch_dropped_total") == 1 and backend.metrics.get("prefetch_duplicate_total") == 1


def test_previous_masks_are_bounded_and_expire():
    now = [0.0]
    pm = PreviousMasks(max_items=3, ttl_s=10.0, clock=lambda: now[0])
    logits = np.full((1, 8, 8), 2.5, dtype=np.float32)
    for i in range(5):
        pm.put(("p", i), logits)
    assert len(pm) == 3 and pm.get(("p", 0)) is None and pm.get(("p", 4)).shape == (8, 8)
    assert pm.get(("p", 4)).dtype == np.float32 and float(pm.get(("p", 4))[0, 0]) == 2.5
    now[0] = 11.0
    assert pm.get(("p", 4)) is None  # expired
    pm.put(("q", 0), logits)
    assert len(pm) == 1  # the other expired entries went with the put
    off = PreviousMasks(max_items=0, ttl_s=10.0)
    off.put("k", logits)
    assert off.get("k") is None and len(off) == 0
    # keys round away float noise from the percent -> pixel conversion
    assert prompt_key(None, [(10.000001, 20.0)], [1]) == prompt_key(None, [(10.0, 19.999999)], [1])


def test_a_corrective_click_refines_the_previous_mask_within_its_project(images, tmp_path):
    root, scenes = images
    sc = scenes[1]
    obj = sc.masks[0]
    x0, y0, x1, y1 = sc.boxes[0]
    first = keypoint(*centroid(obj), sc.size, rid="k1")
    neg = keypoint(min(x1 + 4, sc.size[0] - 1), (y0 + y1) / 2, sc.size, positive=False, rid="k2")
    model = build("sam_tiny", device="cpu")
    backend = StableSamBackend(_settings(root, tmp_path), model=model)
    c = create_app(backend=backend).test_client()
    image = root / "scene1.png"

    def mask(payload):
        r = c.post("/predict", json=payload)
        assert r.status_code == 200, r.get_json()
        return result_mask(r.get_json()["results"][0]["result"][0])

    mask(_click(image, [first]))
    assert backend.metrics.get("corrective_clicks_total") == 0
    refined = mask(_click(image, [first, neg]))
    assert backend.metrics.get("corrective_clicks_total") == 1  # the first click's mask was the prompt
    assert iou(refined, obj) >= 0.8 and not refined[int(neg["value"]["y"] * sc.size[1] / 100),
                                                     int(neg["value"]["x"] * sc.size[0] / 100)]
    # another project (or task) sending the same clicks never sees this project's state
    mask(_click(image, [first, neg], project="2.1700000000"))
    mask(_click(image, [first, neg], task_id=7))
    assert backend.metrics.get("corrective_clicks_total") == 1
    # the same clicks without the memory: decoded from the points alone
    plain = StableSamBackend(_settings(root, tmp_path, previous_mask_items=0), model=model)
    pc = create_app(backend=plain).test_client()
    for regions in ([first], [first, neg]):
        r = pc.post("/predict", json=_click(image, regions))
        assert r.status_code == 200
    assert plain.metrics.get("corrective_clicks_total") == 0


def test_region_details_show_routing_weights_only_for_a_trained_plugin():
    from stable_sam.data.label_studio_prompts import PromptGroup
    from stable_sam.predictor import ObjectMask
    from stable_sam.prompts import ObjectPrompt
    from backend.results import brush_result

    g = PromptGroup("image", ObjectPrompt(points=[(5.0, 5.0)], labels=[1]), label="Object", source_ids=["k1"],
                    from_name="kp")
    pred = ObjectMask(np.ones((4, 4), bool), 0.9, 0.8, (0.3, 0.7))
    text = {v: brush_result(g, "Object", "tag", "image", pred, (4, 4), (4, 4),
                            plugin_version=v)["meta"]["text"][0] for v in ("init", "v0003")}
    assert "plain SAM (untrained plugin)" in text["init"] and "DRP" not in text["init"]
    assert "DRP routing deformed 0.30 / regular 0.70" in text["v0003"]


def test_corrective_click_benchmark_prints_its_figures(monkeypatch, capsys):
    """scripts/bench_corrective_clicks.py (the figures in docs/benchmarks.md) on one held-out scene."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_corrective_clicks.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--scenes", "1", "--clicks", "3", "--json"])
    runpy.run_path(str(script), run_name="__main__")
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["objects"] >= 1 and last["clicks"] == 3
    assert len(last["miou_with"]) == len(last["miou_without"]) == 3
    assert last["miou_with"][0] == last["miou_without"][0]  # the first click has no previous mask
    assert all(0.0 <= v <= 100.0 for v in last["miou_with"] + last["miou_without"])
