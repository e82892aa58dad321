"""The Label Studio pre-annotation job on a local Ray cluster (2 CPUs, started here) against a real
Label Studio 1.23.2: a project of drawn scenes with rough rectangles gets one prediction of the
model's version per task from two Ray workers, masks overlapping the objects; a stopped run is
finished by the command line and a third run uploads nothing; a shard sent twice (as after its
worker died) uploads each task once; errors are messages. ``make test`` sets
STABLE_SAM_E2E=require so that a missing Label Studio fails instead of skipping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import List, Tuple

import pytest
import ray
import requests

from backend_helpers import SYNTHETIC_SAM, RECOMMENDED_CONFIG, DrawnScene, drawn_scene, iou, loosen, rectangle, result_mask
from backend.label_studio import LabelStudioUnavailable, connect
from backend.ml_backend import StableSamBackend
from backend.project_preannotation import list_tasks, run_label_studio
from backend.project_preannotation_ray import LabelStudioShardWorker, run_label_studio_ray, worker_settings
from backend.server_settings import BackendSettings
from ls_server import LEGACY_TOKEN, ROOT, free_port, import_images
from stable_sam.preannotation.ray_job import start_workers, stop_workers
from test_preannotate_ls import BOX_IOU, _ours as ours, ls  # noqa: F401 (ls: the module's Label Studio fixture)
from test_rts import one_thread  # noqa: F401 - its autouse fixture: one torch thread in this module, restored after

pytestmark = pytest.mark.e2e  # a real Label Studio (and Chromium): `make test`, not `make test-fast`

SCRIPT = ROOT / "scripts" / "preannotate.py"


@pytest.fixture
def settings(ls, tmp_path) -> BackendSettings:
    # a model dir of its own: no adapted plugin versions of other runs (the project serves the default)
    return dataclasses.replace(BackendSettings(), sam_checkpoint=SYNTHETIC_SAM, label_studio_url=ls, label_studio_api_key=LEGACY_TOKEN,
                               device="cpu", model_dir=tmp_path / "models")


def make_project(ls: str, client, seeds: List[int], title: str) -> Tuple[int, List[Tuple[int, DrawnScene]]]:
    """A project of drawn scenes, each task annotated with a rough rectangle per object."""
    project = client.projects.create(title=title, label_config=RECOMMENDED_CONFIG)
    scenes = [drawn_scene(s) for s in seeds]
    import_images(ls, project.id, [sc.png() for sc in scenes])
    ids = sorted(t.id for t in client.tasks.list(project=project.id))
    for tid, sc in zip(ids, scenes):
        client.annotations.create(id=tid, result=[rectangle(loosen(box, sc.size), sc.size, rid=f"t{tid}o{k}")
                                                  for k, box in enumerate(sc.boxes)])
    return project.id, list(zip(ids, scenes))


def test_a_project_pre_annotated_on_two_ray_workers(cluster, ls, settings, tiny_model):
    client = connect(ls, LEGACY_TOKEN)
    # scenes the small SAM gets IoU >= 0.84 on (on a few others, e.g. 83, it stays near 0.74 on any path)
    project, tasks = make_project(ls, client, [60 + i for i in range(6)], "Stable-SAM on Ray")
    r = requests.post(f"{ls}/api/projects/{project}/import", headers={"Authorization": f"Token {LEGACY_TOKEN}"},
                      json=[{"data": {"image": f"http://127.0.0.1:{free_port()}/gone.png"}}], timeout=60)
    assert r.status_code == 201, r.text
    gone = max(t.id for t in client.tasks.list(project=project))
    client.annotations.create(id=gone, result=[rectangle((10, 10, 50, 50), (240, 180), rid="g0")])
    version = tiny_model.version

    # a run stopped after 4 tasks (--limit), in shards of one: both workers uploaded
    first = run_label_studio_ray(client, settings, project, limit=4, workers=2, shard_size=1, progress=False)
    assert first.model_version == version
    assert (first.uploaded, first.processed, first.skipped_done, first.failed) == (4, 4, 0, []), first.to_json()
    assert sorted(first.by_worker) == [0, 1] and sum(first.by_worker.values()) == 4
    assert [len(ours(client, tid, version)) for tid, _ in tasks] == [1, 1, 1, 1, 0, 0]

    # the command line with the same arguments but the limit finishes only what is missing; the
    # unreachable image is reported (exit 1), not fatal
    env = dict(os.environ, LABEL_STUDIO_URL=ls, LABEL_STUDIO_API_KEY=LEGACY_TOKEN, DEVICE="cpu",
               SAM_MODEL_TYPE="sam_tiny", MODEL_DIR=str(settings.model_dir))
    cli = subprocess.run([sys.executable, str(SCRIPT), "label-studio", "--project", str(project), "--ray-address",
                          cluster, "--workers", "2", "--shard-size", "1", "--threads", "1", "--no-progress", "--json"],
                         capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert cli.returncode == 1, cli.stderr
    out = json.loads(cli.stdout.strip().splitlines()[-1])
    assert (out["uploaded"], out["skipped_done"], out["processed"], out["failed"]) == (2, 4, 3, 1), out
    assert out["model_version"] == version and out["ray"]["workers"] == 2
    assert out["failures"][0]["task"] == gone and "unreachable" in out["failures"][0]["error"]
    assert f"{gone}:" in cli.stderr and "Traceback" not in cli.stderr

    # every task: exactly one prediction of the version, masks on the objects
    for tid, sc in tasks:
        (pred,) = ours(client, tid, version)
        masks = [result_mask(res) for res in pred.result if res["type"] == "brushlabels"]
        assert len(masks) == len(sc.masks)
        for mask, gt in zip(masks, sc.masks):
            assert iou(mask, gt) >= BOX_IOU, (tid, iou(mask, gt))

    # a third run, on Ray and then on this machine: nothing new is uploaded
    again = run_label_studio_ray(client, settings, project, workers=2, shard_size=2, progress=False)
    assert (again.uploaded, again.skipped_done, again.processed, again.already_uploaded) == (0, 6, 1, 0)
    assert [tid for tid, _ in again.failed] == [gone]
    single = run_label_studio(client, StableSamBackend(settings, model=tiny_model), project, progress=False)
    assert (single.uploaded, single.skipped_done) == (0, 6)
    assert all(len(ours(client, tid, version)) == 1 for tid, _ in tasks)


def test_a_shard_sent_again_uploads_each_task_once(cluster, ls, settings, tiny_model):
    """What a retried shard meets: its first attempt uploaded part of it, and it comes back with
    the task list as it was listed (no prediction in it). The worker asks Label Studio again
    right before each upload."""
    client = connect(ls, LEGACY_TOKEN)
    project, tasks = make_project(ls, client, [70, 71, 73], "Stable-SAM retried shard")
    listed = list(list_tasks(client, project))
    remote = worker_settings(settings, "cpu")
    actors, described = start_workers(ray, LabelStudioShardWorker,
                                      lambda i: (i, remote, 1, project, "any", None, None, False, 2), 1, 1, False,
                                      max_restarts=0)
    try:
        assert described[0]["version"] == tiny_model.version
        partial = ray.get(actors[0].run.remote(listed[:2]))  # the first attempt, cut short
        assert (partial.uploaded, partial.already_uploaded) == (2, 0)
        retried = ray.get(actors[0].run.remote(listed))
    finally:
        stop_workers(ray, actors)
    assert (retried.uploaded, retried.already_uploaded, retried.processed, retried.failed) == (1, 2, 3, [])
    assert [len(ours(client, tid, tiny_model.version)) for tid, _ in tasks] == [1, 1, 1]


def test_errors_are_messages(cluster, ls, settings, tmp_path):
    client = connect(ls, LEGACY_TOKEN)
    with pytest.raises(LabelStudioUnavailable, match="cannot read project 9999: Label Studio answered HTTP 404"):
        run_label_studio_ray(client, settings, 9999, workers=1, progress=False)
    env = dict(os.environ, LABEL_STUDIO_URL=ls, LABEL_STUDIO_API_KEY=LEGACY_TOKEN, DEVICE="cpu",
               MODEL_DIR=str(tmp_path / "models"))
    base = [sys.executable, str(SCRIPT), "label-studio", "--project", "1", "--no-progress"]
    for extra, message in ((["--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
                           (["--workers", "2"], "--workers needs --ray-address")):
        r = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
