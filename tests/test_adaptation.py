"""Adaptation from collected labels: the plugin store, prompts rebuilt from annotations, datasets
from task dicts, RTS with annotated prompts, the held-out split, per-project serving, training
jobs (lock, status, cancel, kill, TRAIN_EVERY_N) and webhook -> job -> new version.

The real Label Studio round trip is tests/test_adaptation_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.app import create_app
from backend.jobs import JobManager
from backend.ml_backend import StableSamBackend
from backend.projects import project_id
from backend.server_settings import BackendSettings, SettingsError
from backend_helpers import (SYNTHETIC_SAM, RECOMMENDED_CONFIG, brush_result, centroid, drawn_scene, iou, keypoint, loosen, rectangle,
                             result_mask)
from stable_sam.adaptation import AdaptationConfig, AdaptationError, adapt, holdout_split
from stable_sam.checkpoint import load_plugin
from stable_sam.data.dataset import ObjectPrompt, Sample, SegmentationDataset
from stable_sam.data.label_studio_export import LabelStudioTasks
from stable_sam.data.label_studio_prompts import annotation_prompts
from stable_sam.modeling.plugin import StableSamPlugin
from stable_sam.plugin_store import PluginStore, StoreError
from stable_sam.predictor import StableSamPredictor
from stable_sam.rts import ANNOTATED, RTSConfig, _prepare, draw_prompt
from test_rts import one_thread  # noqa: F401 - its autouse fixture: one torch thread in this module too

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model_type": "sam_tiny", "model_id": "x"}


def _changed_plugin(value: float = 0.5) -> StableSamPlugin:
    """A plugin that visibly changes masks: deformed features, routed in."""
    p = StableSamPlugin()
    with torch.no_grad():
        p.dsp.offset.bias.fill_(value)
        p.drp.out.bias.copy_(torch.tensor([3.0, -3.0]))
    return p.eval()


# ------------------------------------------------------------------------------------------ store

def test_store_versions_pointer_and_atomicity(tmp_path, monkeypatch):
    store = PluginStore(tmp_path, "sam_tiny-abc")
    assert store.current("project-1") is None and store.pointer_stamp("project-1") is None
    p1 = store.save("project-1", StableSamPlugin(), "v1", BASE, {"images": 3})
    assert p1 == tmp_path / "plugins" / "sam_tiny-abc" / "project-1" / "v1.pt"
    store.activate("project-1", "v1")
    stamp = store.pointer_stamp("project-1")
    assert store.current("project-1") == "v1" and stamp is not None
    store.save("project-1", _changed_plugin(), "v2", BASE, {"images": 4})
    store.activate("project-1", "v2")
    assert store.current("project-1") == "v2" and store.pointer_stamp("project-1") != stamp
    assert json.loads((p1.parent / "current.json").read_text())["previous"] == "v1"
    assert [(v.version, v.summary["images"]) for v in store.versions("project-1")] == [("v1", 3), ("v2", 4)]
    assert store.current("project-2") is None and store.versions("project-2") == []  # scopes are separate
    assert store.find("v2") == ("project-1", p1.parent / "v2.pt") and store.find("v9") is None
    with pytest.raises(StoreError, match="already exists"):
        store.save("project-1", StableSamPlugin(), "v1", BASE)
    with pytest.raises(StoreError, match="no plugin version v9.*v1"):
        store.activate("project-1", "v9")
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(StoreError, match="not a valid name"):
            store.path("project-1", bad)
    # a write that dies half-way leaves neither a version nor a changed pointer
    import stable_sam.checkpoint as ck

    def dies(obj, f):
        f.write(b"half a checkpoint")
        raise MemoryError("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", dies)
    with pytest.raises(MemoryError):
        store.save("project-1", StableSamPlugin(), "v3", BASE)
    monkeypatch.undo()
    assert sorted(p.name for p in p1.parent.iterdir()) == ["current.json", "v1.pt", "v2.pt"]
    # what a SIGKILLed writer leaves (a hidden temporary) is no version, and is cleaned up
    (p1.parent / ".v3.pt.abcd.tmp").write_bytes(b"partial")
    assert [v.version for v in store.versions("project-1")] == ["v1", "v2"]
    assert store.clean_temp("project-1") == [p1.parent / ".v3.pt.abcd.tmp"]
    assert store.current("project-1") == "v2"


# ------------------------------------------------------------------------------------------ prompts

def test_annotation_prompts_match_masks():
    sc = drawn_scene(3)
    size = sc.size
    m0, m1 = sc.masks
    brush = [brush_result(m0, "b0"), brush_result(m1, "b1")]
    # rectangles listed in the other order; a keypoint inside rectangle r1 refines it
    regions = [rectangle(loosen(sc.boxes[1], size), size, rid="r1"), rectangle(loosen(sc.boxes[0], size), size, rid="r0"),
               keypoint(*centroid(m1), size, rid="k-in")]
    p = annotation_prompts(regions + brush, brush, [m0, m1])
    assert p[0].source == "r0" and p[0].points is None
    assert p[0].box == pytest.approx(np.array(loosen(sc.boxes[0], size)), abs=1e-3)
    assert p[1].source == "r1,k-in" and p[1].labels.tolist() == [1]
    # free keypoints: a positive goes to the mask holding it; a negative to its nearest positive's mask
    outside = next((x + 0.5, y + 0.5) for y in range(size[1]) for x in range(size[0]) if not (m0[y, x] or m1[y, x]))
    free = [keypoint(*centroid(m1), size, rid="k1"), keypoint(*outside, size, rid="n1", positive=False)]
    p = annotation_prompts(free + brush, brush, [m0, m1])
    assert p[0] is None and p[1].box is None
    assert p[1].labels.tolist() == [1, 0] and p[1].source == "k1,n1"
    # the backend's own link (<first prompt id>_sam) wins over geometry
    linked = [brush_result(m0, "r1_sam"), brush_result(m1, "b1")]
    p = annotation_prompts([rectangle(loosen(sc.boxes[1], size), size, rid="r1")] + linked, linked, [m0, m1])
    assert p[0].source == "r1" and p[1] is None
    # negatives alone are no prompt; a malformed region drops the prompts, not the masks
    assert annotation_prompts([keypoint(*outside, size, rid="n", positive=False)] + brush, brush, [m0, m1]) == [None, None]
    bad = rectangle((10, 10, 20, 20), size, rid="z")
    bad["value"]["width"] = 0
    assert annotation_prompts([bad] + brush, brush, [m0, m1]) == [None, None]


def test_dataset_from_task_dicts_with_brush_rle_and_prompts():
    scenes = [drawn_scene(21), drawn_scene(22)]
    tasks = []
    for i, sc in enumerate(scenes):
        results = [brush_result(m, f"b{k}") for k, m in enumerate(sc.masks)]
        results.append(rectangle(loosen(sc.boxes[0], sc.size), sc.size, rid="r0"))
        tasks.append({"id": 40 + i, "data": {"img": f"/data/upload/1/s{i}.png"},
                      "annotations": [{"id": 1, "was_cancelled": True, "result": [brush_result(sc.masks[1], "x")]},
                                      {"id": 2, "result": results}]})
    tasks.append({"id": 99, "data": {"img": "/data/upload/1/none.png"}, "annotations": []})  # unlabelled: left out
    reads = []

    def read(task, url):
        reads.append(url)
        return scenes[task["id"] - 40].image, f"task {task['id']}"

    ds = LabelStudioTasks(tasks, read, "live project 1", prompts_for=annotation_prompts)
    assert len(ds) == 2 and [ds.key(i) for i in range(2)] == ["40", "41"]
    s = ds[1]
    assert reads == ["/data/upload/1/s1.png"] and s.name == "task 41"
    for got, want in zip(s.masks, scenes[1].masks):
        np.testing.assert_array_equal(got, want)
    assert s.prompts[0].box is not None and s.prompts[1] is None
    assert LabelStudioTasks(tasks, read)[0].prompts is None  # without a prompt builder: masks only


# ------------------------------------------------------------------------------------------ RTS

def test_rts_uses_annotated_prompts_and_is_unchanged_without(tiny_model):
    sc = drawn_scene(5)
    cfg = RTSConfig(prompts_per_object=3)
    plain = Sample(sc.image, sc.masks, "s")
    step = _prepare(tiny_model, [plain], cfg, np.random.default_rng(7))
    rng = np.random.default_rng(7)  # exactly the draws RTS always made: the committed plugin stays reproducible
    expected = [draw_prompt(m, cfg, rng, 0, j) for j, m in enumerate(sc.masks) for _ in range(3)]
    assert [(p.kind, p.obj) for p in step.prompts] == [(p.kind, p.obj) for p in expected]
    for a, b in zip(step.prompts, expected):
        for x, y in ((a.box, b.box), (a.points, b.points)):
            assert (x is None and y is None) or np.array_equal(x, y)
    drawn = ObjectPrompt(box=np.array(loosen(sc.boxes[0], sc.size)), source="r0")
    step = _prepare(tiny_model, [Sample(sc.image, sc.masks, "s", [drawn, None])], cfg, np.random.default_rng(7))
    per_obj = [[p for p in step.prompts if p.obj == j] for j in range(2)]
    assert [len(x) for x in per_obj] == [3, 3]
    assert per_obj[0][0].kind == ANNOTATED and np.array_equal(per_obj[0][0].box, drawn.box)
    assert all(p.kind != ANNOTATED for p in per_obj[0][1:] + per_obj[1])


def test_holdout_split_is_deterministic_and_stable():
    keys = [str(i) for i in range(10)]
    train, held = holdout_split(keys, 0.2)
    assert len(held) == 2 and sorted(train + held) == list(range(10))
    assert holdout_split(keys, 0.2) == (train, held)
    assert holdout_split(["a"], 0.2) == ([0], [])            # one task: nothing to hold out
    assert len(holdout_split(["a", "b"], 0.2)[1]) == 1       # two: one
    assert holdout_split(keys, 0.0)[1] == []
    # a held-out task stays held out when tasks are added (unless a new one hashes below it)
    grown = keys + [str(i) for i in range(10, 13)]
    held_keys = {keys[i] for i in held}
    assert held_keys & {grown[i] for i in holdout_split(grown, 0.2)[1]}


def test_adapt_reports_before_and_after_on_drawn_prompts(tiny_model):
    scenes = [drawn_scene(30 + i) for i in range(5)]
    samples = [Sample(sc.image, sc.masks, f"s{i}", [ObjectPrompt(box=np.array(loosen(b, sc.size))) for b in sc.boxes])
               for i, sc in enumerate(scenes)]

    class DS(LabelStudioTasks):
        def __init__(self):
            self.description = "drawn"

        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i]

        def key(self, i):
            return f"t{i}"

    current = StableSamPlugin()
    snapshot = {k: v.clone() for k, v in current.state_dict().items()}
    phases = []
    res = adapt(tiny_model, DS(), current, RTSConfig(probe_images=0), AdaptationConfig(holdout=0.2),
                log=lambda s: None, on_phase=lambda name, info: phases.append(name))
    h = res.summary["heldout"]
    assert phases == ["evaluating_before", "training", "evaluating_after"]
    assert h["images"] == 1 and h["objects"] == 2 and h["drawn_prompts"] == 2
    assert 50 < h["miou_before"] <= 100 and 50 < h["miou_after"] <= 100
    assert res.summary["images"] == 4 and res.summary["prompt_kinds"][ANNOTATED] == 8
    assert all(torch.equal(v, snapshot[k]) for k, v in current.state_dict().items())  # the serving plugin: untouched
    assert any(not torch.equal(v, snapshot[k]) for k, v in res.plugin.state_dict().items())


def test_adapt_with_one_labelled_image_and_with_none(tiny_model):
    sc = drawn_scene(40)

    class One(SegmentationDataset):  # no key(): items are keyed by position
        def __init__(self, n):
            self.n, self.description = n, "tiny project"

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Sample(sc.image, sc.masks, "s0")

    res = adapt(tiny_model, One(1), StableSamPlugin(), RTSConfig(probe_images=0), log=lambda s: None)
    assert res.summary["images"] == 1 and "miou_before" not in res.summary["heldout"]
    assert "it takes at least 2" in res.summary["heldout"]["note"]
    with pytest.raises(AdaptationError, match="tiny project: no labelled image"):
        adapt(tiny_model, One(0), StableSamPlugin(), log=lambda s: None)


# ------------------------------------------------------------------------------------------ serving

@pytest.fixture()
def media(tmp_path):
    scenes = [drawn_scene(50 + i) for i in range(4)]
    for i, sc in enumerate(scenes):
        Image.fromarray(sc.image).save(tmp_path / f"s{i}.png")
    return tmp_path, scenes


def _settings(tmp_path, media_dir, **kw):
    return BackendSettings(sam_checkpoint=SYNTHETIC_SAM, model_dir=tmp_path / "models", local_files_root=media_dir, label_studio_url="http://ls.invalid",
                           label_studio_api_key="key", **kw)


def _body(path, regions, project):
    return {"tasks": [{"id": 1, "data": {"image": str(path)}}], "project": project, "label_config": RECOMMENDED_CONFIG,
            "params": {"context": {"result": regions}}}


def test_projects_serve_their_own_version_and_switch_without_restart(tmp_path, media, tiny_model):
    media_dir, scenes = media
    settings = _settings(tmp_path, media_dir)
    backend = StableSamBackend(settings, model=tiny_model)
    c = create_app(backend=backend).test_client()
    default = tiny_model.version
    store = PluginStore(settings.model_dir, tiny_model.model_id)
    changed = _changed_plugin()
    store.save("project-5", changed, "rts-a", BASE)
    store.activate("project-5", "rts-a")
    v5 = f"{tiny_model.model_id}+plugin-rts-a"
    assert c.post("/setup", json={"project": "5.1700000000", "schema": RECOMMENDED_CONFIG}).get_json()["model_version"] == v5
    assert c.post("/setup", json={"project": "6.1700000000", "schema": RECOMMENDED_CONFIG}).get_json()["model_version"] == default
    sc = scenes[0]
    region = [keypoint(*centroid(sc.masks[0]), sc.size)]
    r5 = c.post("/predict", json=_body(media_dir / "s0.png", region, "5.1700000000")).get_json()["results"][0]
    r6 = c.post("/predict", json=_body(media_dir / "s0.png", region, "6.1700000000")).get_json()["results"][0]
    assert r5["model_version"] == v5 and r6["model_version"] == default
    # each project's masks are its plugin's: the same as a predictor given that plugin directly
    pred = StableSamPredictor(tiny_model, plugin=changed)
    pred.set_image(sc.image)
    want = pred.predict(point_coords=[centroid(sc.masks[0])], point_labels=[1]).masks[0]
    assert np.array_equal(result_mask(r5["result"][0]), want)
    assert r5["result"][0]["stable_sam"]["alpha_deformed"] > 0.9 > r6["result"][0]["stable_sam"]["alpha_deformed"]
    assert tiny_model.plugin_version == "init"  # the shared model was never touched
    # a new version activated on disk (by another process) serves from the next request on
    store.save("project-5", StableSamPlugin(), "rts-b", BASE)
    store.activate("project-5", "rts-b")
    r = c.post("/predict", json=_body(media_dir / "s0.png", region, "5.1700000000")).get_json()["results"][0]
    assert r["model_version"] == f"{tiny_model.model_id}+plugin-rts-b"
    assert np.array_equal(result_mask(r["result"][0]), result_mask(r6["result"][0]))  # the no-op plugin again
    v = c.get("/versions", query_string={"project": 5}).get_json()
    assert v["current"] == "rts-b" and v["model_version"] == f"{tiny_model.model_id}+plugin-rts-b"
    assert v["versions"] == [default, v5, f"{tiny_model.model_id}+plugin-rts-b"]
    assert [d["current"] for d in v["details"]] == [False, True]
    assert c.get("/versions").get_json()["versions"] == v["versions"]  # Label Studio's call: no project
    # a per-project rollback through the API; unknown versions and other projects' are refused
    r = c.post("/versions/activate", json={"project": 5, "version": "rts-a"})
    assert r.status_code == 200 and r.get_json()["model_version"] == v5
    assert c.post("/setup", json={"project": "5.1"}).get_json()["model_version"] == v5
    r = c.post("/versions/activate", json={"project": 6, "version": "rts-a"})
    assert r.status_code == 404 and "no plugin version rts-a" in r.get_json()["error"]
    assert c.post("/versions/activate", json={"project": 5}).status_code == 400


def test_plugin_version_pins_every_project_and_an_unknown_one_is_reported(tmp_path, media, tiny_model):
    media_dir, scenes = media
    settings = _settings(tmp_path, media_dir)
    store = PluginStore(settings.model_dir, tiny_model.model_id)
    store.save("project-1", _changed_plugin(), "rts-old", BASE)
    store.save("project-1", StableSamPlugin(), "rts-new", BASE)
    store.activate("project-1", "rts-new")
    pinned = BackendSettings(**{**settings.__dict__, "plugin_version": "rts-old"})
    c = create_app(backend=StableSamBackend(pinned, model=tiny_model)).test_client()
    want = f"{tiny_model.model_id}+plugin-rts-old"
    for project in ("1.1", "2.1"):
        assert c.post("/setup", json={"project": project}).get_json()["model_version"] == want
    sc = scenes[1]
    r = c.post("/predict", json=_body(media_dir / "s1.png", [rectangle(loosen(sc.boxes[0], sc.size), sc.size)], "1.1"))
    assert r.get_json()["results"][0]["model_version"] == want
    assert c.get("/versions").get_json()["pinned"] == "rts-old"
    # rollback to the default plugin by its own version name
    init = BackendSettings(**{**settings.__dict__, "plugin_version": "init"})
    c = create_app(backend=StableSamBackend(init, model=tiny_model)).test_client()
    assert c.post("/setup", json={"project": "1.1"}).get_json()["model_version"] == tiny_model.version
    # an unknown version: /health says why, /setup and /predict answer 503, never a traceback
    bad = BackendSettings(**{**settings.__dict__, "plugin_version": "rts-nope"})
    c = create_app(backend=StableSamBackend(bad, model=tiny_model)).test_client()
    health = c.get("/health").get_json()
    assert "PLUGIN_VERSION=rts-nope" in health["model_error"] and "rts-new" in health["model_error"]
    r = c.post("/setup", json={"project": "1.1"})
    assert r.status_code == 503 and "PLUGIN_VERSION=rts-nope" in r.get_json()["error"]
    r = c.post("/predict", json=_body(media_dir / "s1.png", [rectangle(loosen(sc.boxes[0], sc.size), sc.size)], "1.1"))
    assert r.status_code == 503 and "PLUGIN_VERSION" in r.get_json()["error"]
    # the same from the environment, without a loaded model: reported at startup, no SAM load
    backend = StableSamBackend(bad, model_factory=lambda: pytest.fail("must not load"))
    assert backend.model_version(wait_s=10) is None and "PLUGIN_VERSION=rts-nope" in backend.version_error


def test_settings_and_project_ids(monkeypatch):
    assert [project_id(v) for v in (3, "3.1700000000", {"id": 4}, "x", None, True, -1)] == [3, 3, 4, None, None, None, None]
    monkeypatch.setenv("TRAIN_EVERY_N", "5")
    monkeypatch.setenv("TRAIN_INIT", "fresh")
    monkeypatch.setenv("PLUGIN_VERSION", " rts-1 ")
    s = BackendSettings.from_env()
    assert (s.train_every_n, s.train_init, s.train_holdout, s.plugin_version) == (5, "fresh", 0.2, "rts-1")
    monkeypatch.setenv("TRAIN_INIT", "warm")
    with pytest.raises(SettingsError, match="TRAIN_INIT"):
        BackendSettings.from_env()
    monkeypatch.setenv("TRAIN_INIT", "current")
    monkeypatch.setenv("TRAIN_HOLDOUT", "1")
    with pytest.raises(SettingsError, match="TRAIN_HOLDOUT"):
        BackendSettings.from_env()


# ------------------------------------------------------------------------------------------ jobs

FAKE_JOB = textwrap.dedent("""
    import os, signal, sys, time
    from backend.training_job import Cancelled, JobReporter, job_status_path, utc_now
    job_id, seconds = sys.argv[1], float(sys.argv[2])
    r = JobReporter(job_status_path(os.environ["MODEL_DIR"], job_id), echo=lambda s: None)
    signal.signal(signal.SIGTERM, r.on_sigterm)
    r.update(phase="training", pid=os.getpid())
    try:
        time.sleep(seconds)
    except Cancelled as e:
        r.update(status="cancelled", phase="cancelled", error=str(e), finished=utc_now())
        sys.exit(3)
    r.update(status="done", phase="done", finished=utc_now())
""")


def _fake(seconds: float):
    return lambda project, job_id: [sys.executable, "-c", FAKE_JOB, job_id, str(seconds)]


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.slow  # starts training jobs (subprocesses)
def test_one_job_per_project_status_cancel_and_kill(tmp_path, monkeypatch):
    # cancel() SIGTERMs, then SIGKILLs after CANCEL_GRACE_S. With a grace (120 s) longer than the
    # job (60 s), returning within 60 s shows it returns when the job ends, never waiting out the
    # grace, however loaded the machine is; the job's own report shows it ended on the SIGTERM.
    monkeypatch.setattr("backend.jobs.CANCEL_GRACE_S", 120.0)
    jobs = JobManager(_settings(tmp_path, None), command=_fake(60))
    first = jobs.start(1)
    assert first["status"] == "started" and first["job_id"].startswith("project-1-")
    again = jobs.start(1)
    assert again == {**again, "status": "running", "job_id": first["job_id"]}
    other = jobs.start(2)  # another project trains at the same time
    assert other["status"] == "started"
    st = _wait(lambda: (s := jobs.status(first["job_id"]))["phase"] == "training" and s)
    assert st["status"] == "running" and st["pid"] == first["pid"] and jobs.running_job(1) == first["job_id"]
    t = time.monotonic()
    st = jobs.cancel(project=1)
    assert st["status"] == "cancelled" and "SIGTERM" in st["error"] and time.monotonic() - t < 60
    assert jobs.running_job(1) is None and jobs.start(1)["status"] == "started"
    # SIGKILL (what the OOM killer does): the lock goes with the process; the status says so
    st2 = jobs.status(project=2)
    os.kill(st2["pid"], signal.SIGKILL)
    st2 = _wait(lambda: (s := jobs.status(project=2))["status"] != "running" and s)
    assert st2["status"] == "failed" and "ended without reporting" in st2["error"]
    assert jobs.cancel(project=2)["message"].startswith(f"job {st2['job_id']} is not running")
    jobs.cancel(project=1)
    assert {j["status"] for j in jobs.jobs()} == {"cancelled", "failed"} and len(jobs.jobs()) == 3
    quick = JobManager(_settings(tmp_path, None), command=_fake(0.2))
    done = quick.start(3)
    assert _wait(lambda: quick.status(done["job_id"])["status"] == "done")


@pytest.mark.slow  # starts training jobs (subprocesses)
def test_every_n_annotations_start_a_job(tmp_path, tiny_model):
    settings = _settings(tmp_path, None, train_every_n=2)
    backend = StableSamBackend(settings, model=tiny_model)
    backend.jobs.command = _fake(0.5)
    c = create_app(backend=backend).test_client()
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "result": []}, "task": {"id": 1}, "project": {"id": 7}}
    r = c.post("/webhook", json=event)
    assert r.status_code == 200 and r.get_json() == {"status": "counted", "project": 7, "count": 1, "every": 2}
    r = c.post("/webhook", json={**event, "action": "ANNOTATION_UPDATED"})
    assert r.status_code == 201 and r.get_json()["status"] == "started" and r.get_json()["count"] == 2
    job = r.get_json()["job_id"]
    assert c.post("/webhook", json={**event, "action": "ANNOTATION_DELETED"}).get_json()["status"] == "ignored"
    assert c.post("/webhook", json=event).get_json()["count"] == 1  # counting starts again
    assert _wait(lambda: c.get(f"/train/status/{job}").get_json()["status"] == "done")


@pytest.mark.slow  # starts training jobs (subprocesses)
def test_start_training_webhook_runs_a_job_and_the_new_version_serves(tmp_path, media, tiny_model):
    """START_TRAINING -> 201 at once -> a real job (python -m backend.training_job, labels from an
    export instead of the live project) -> new version activated -> served without a restart."""
    media_dir, scenes = media
    tasks = [{"id": i + 1, "data": {"image": f"/data/upload/1/s{i}.png"},
              "annotations": [{"id": 10 + i, "result": [brush_result(m, f"b{k}") for k, m in enumerate(sc.masks)]
                               + [rectangle(loosen(sc.boxes[0], sc.size), sc.size, rid="r0")]}]}
             for i, sc in enumerate(scenes)]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    settings = _settings(tmp_path, media_dir, torch_threads=1)
    backend = StableSamBackend(settings, model=tiny_model)
    backend.jobs.command = lambda project, job_id: JobManager.default_command(project, job_id) + [
        "--export", str(export), "--image-root", str(media_dir)]
    c = create_app(backend=backend).test_client()
    before = c.post("/setup", json={"project": "1.1"}).get_json()["model_version"]
    r = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1, "title": "p"}})
    assert r.status_code == 201, r.get_json()
    job = r.get_json()["job_id"]
    # answered at once, not when the job ends: the job still runs after the answer
    again = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert again.status_code == 200 and again.get_json()["status"] == "running" and again.get_json()["job_id"] == job
    seen = set()

    def finished():
        st = c.get("/train/status", query_string={"project": 1}).get_json()
        seen.add(st["phase"])
        return st["status"] != "running" and st

    st = _wait(finished, timeout=120)
    assert st["status"] == "done", (st, (tmp_path / "models" / "jobs" / f"{job}.log").read_text()[-3000:])
    assert st["job_id"] == job and "training" in seen | {st["phase"]}
    h = st["heldout"]
    assert h["images"] == 1 and h["miou_before"] is not None and h["miou_after"] is not None
    assert st["model_version"] != before and st["previous_version"] == "init"
    after = c.post("/setup", json={"project": "1.1"}).get_json()["model_version"]
    assert after == st["model_version"]
    sc = scenes[0]
    r = c.post("/predict", json=_body(media_dir / "s0.png", [rectangle(loosen(sc.boxes[1], sc.size), sc.size)], "1.1"))
    res = r.get_json()["results"][0]
    assert res["model_version"] == after and iou(result_mask(res["result"][0]), sc.masks[1]) > 0.8
    ckpt = load_plugin(Path(st["path"]), model_type="sam_tiny")
    assert ckpt.summary["heldout"]["miou_after"] == h["miou_after"] and ckpt.summary["job_id"] == job
    v = c.get("/versions", query_string={"project": 1}).get_json()
    assert v["current"] == st["version"] and v["details"][-1]["heldout"]["miou_before"] == h["miou_before"]
    assert c.post("/setup", json={"project": "2.1"}).get_json()["model_version"] == before  # other projects unchanged


@pytest.mark.slow  # starts training jobs (subprocesses)
def test_a_job_without_usable_labels_fails_with_a_message(tmp_path, media):
    media_dir, _ = media
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": "/data/upload/1/s0.png"}, "annotations": []}]))
    jobs = JobManager(_settings(tmp_path, media_dir, torch_threads=1), command=lambda project, job_id: (
        JobManager.default_command(project, job_id) + ["--export", str(export), "--image-root", str(media_dir)]))
    job = jobs.start(8)["job_id"]
    st = _wait(lambda: (s := jobs.status(job))["status"] != "running" and s, timeout=60)
    assert st["status"] == "failed" and "no task has a brush" in st["error"] and st["phase"] == "failed"
    assert not (tmp_path / "models" / "plugins").exists() or not list((tmp_path / "models" / "plugins").rglob("*.pt"))
    assert jobs.running_job(8) is None


@pytest.mark.slow  # runs the finetune CLI in a subprocess
def test_finetune_cli_adapts_an_export_into_a_store(tmp_path, media):
    media_dir, scenes = media
    tasks = [{"id": i + 1, "data": {"image": f"/data/upload/1/s{i}.png"},
              "annotations": [{"id": 1, "result": [brush_result(m, f"b{k}") for k, m in enumerate(sc.masks)]}]}
             for i, sc in enumerate(scenes)]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--dataset", str(export), "--image-root", str(media_dir),
           "--project", "4", "--store", str(tmp_path / "m"), "--threads", "1", "--no-progress", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "held-out mIoU (1 images, 2 objects): before" in done.stdout
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["activated"] and out["previous_version"] == "init" and out["heldout"]["noisy_box_prompts"] == 2
    store = PluginStore(tmp_path / "m", out["model_version"].split("+plugin-")[0])
    assert store.current("project-4") == out["version"]
    # a second run starts from the first (current), and --no-activate keeps it serving
    done = subprocess.run(cmd + ["--no-activate"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    second = json.loads(done.stdout.strip().splitlines()[-1])
    assert second["previous_version"] == out["version"] and not second["activated"]
    assert store.current("project-4") == out["version"] and len(store.versions("project-4")) == 2
    bad = subprocess.run(cmd[:2] + ["--dataset", str(export), "--image-root", str(media_dir)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--store" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # starts training jobs (subprocesses)
def test_old_job_files_are_pruned_to_the_newest_jobs(tmp_path, monkeypatch):
    """Status / log / cancel files of a project's jobs beyond the newest JOB_HISTORY go when a new
    job starts; other projects' files stay."""
    import backend.jobs as jobs_module

    monkeypatch.setattr(jobs_module, "JOB_HISTORY", 3)
    jobs = JobManager(_settings(tmp_path, None), command=_fake(0.05))
    old = [f"project-7-2026010100000{i}-abcde{i}" for i in range(5)]
    for job_id in old + ["project-8-20260101000000-aaaaaa"]:
        for suffix in (".json", ".log", ".cancel"):
            (jobs.dir / f"{job_id}{suffix}").parent.mkdir(parents=True, exist_ok=True)
            (jobs.dir / f"{job_id}{suffix}").write_text("{}")
    new = jobs.start(7)["job_id"]
    _wait(lambda: jobs.status(new)["status"] == "done")
    kept = sorted({p.name.split(".")[0] for p in jobs.dir.glob("project-7-*.json")})
    assert kept == old[-2:] + [new]
    assert not any(jobs.dir.glob(f"{old[0]}.*")) and (jobs.dir / f"{old[-1]}.log").exists()
    assert (jobs.dir / "project-8-20260101000000-aaaaaa.log").exists()


def test_every_n_without_label_studio_settings_is_acknowledged_not_stuck(tmp_path):
    """TRAIN_EVERY_N set but no LABEL_STUDIO_URL / key: every annotation event is answered with the
    reason (200 for the webhook), never a 4xx loop, and no counter is kept."""
    s = BackendSettings(sam_checkpoint=SYNTHETIC_SAM, model_dir=tmp_path / "models", train_every_n=2)
    jobs = JobManager(s, command=_fake(0.05))
    for _ in range(3):
        out = jobs.count_annotation(5)
        assert out["status"] == "ignored" and "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in out["reason"]
    assert not (jobs.dir / "project-5.count").exists()


def test_a_stale_running_status_does_not_touch_a_running_jobs_temp_files(tmp_path):
    """Job A was killed unseen, job B of the same project runs and is writing: reading A's status
    marks A failed but leaves B's temporary files in the store alone."""
    jobs = JobManager(_settings(tmp_path, None), command=_fake(60))
    store_dir = tmp_path / "models" / "plugins" / "x" / "project-4"
    store_dir.mkdir(parents=True)
    stale = "project-4-20260101000000-abcdef"
    jobs.dir.mkdir(parents=True, exist_ok=True)
    (jobs.dir / f"{stale}.json").write_text(json.dumps({"job_id": stale, "project": 4, "status": "running",
                                                        "store_dir": str(store_dir)}))
    b = jobs.start(4)
    try:
        temp = store_dir / ".v2.pt.abc123.tmp"  # B's atomic write in progress
        temp.write_bytes(b"partial")
        st = jobs.status(stale)
        assert st["status"] == "failed" and temp.exists()
    finally:
        jobs.cancel(job_id=b["job_id"])
    st = jobs.status(stale)
    assert st["status"] == "failed"
