"""Batch pre-annotation against a real Label Studio 1.23.2: a small project with rough rectangles
(and keypoints) in annotations and predictions, an image that cannot be fetched and a task without
prompts. Every task with prompts gets a stored brush prediction of the model's version whose masks
overlap the objects; a second run uploads nothing new; failures are reported, not fatal.
``make test`` sets STABLE_SAM_E2E=require so that a missing Label Studio fails instead of skipping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import requests

from backend_helpers import RECOMMENDED_CONFIG, centroid, drawn_scene, iou, keypoint, loosen, rectangle, result_mask
from backend.label_studio import LabelStudioUnavailable, connect
from backend.ml_backend import StableSamBackend
from backend.project_preannotation import run_label_studio
from backend.server_settings import BackendSettings
from ls_server import LEGACY_TOKEN, ROOT, free_port, import_images, require_label_studio, start_label_studio
from stable_sam.embedding_cache import EmbeddingCache
from stable_sam.preannotation import AutoConfig
from test_rts import one_thread  # noqa: F401 - its autouse fixture: one torch thread in this module, restored after

pytestmark = pytest.mark.e2e  # a real Label Studio (and Chromium): `make test`, not `make test-fast`

BOX_IOU = 0.8  # the small SAM measures 0.91-0.95 on these rough rectangles (test_backend_e2e.py)


@pytest.fixture(scope="module")
def ls(tmp_path_factory):
    require_label_studio()
    proc, url = start_label_studio(tmp_path_factory.mktemp("preannotate-ls"))
    yield url
    proc.stop()


def _ours(client, task_id, version):
    return [p for p in client.predictions.list(task=task_id) if p.model_version == version]


def _check_masks(pred, scene, objects):
    masks = [result_mask(r) for r in pred.result if r["type"] == "brushlabels"]
    assert len(masks) == len(objects)
    for mask, k in zip(masks, objects):
        assert iou(mask, scene.masks[k]) >= BOX_IOU, (k, iou(mask, scene.masks[k]))


def test_preannotate_a_label_studio_project(ls, tiny_model, tmp_path):
    client = connect(ls, LEGACY_TOKEN)
    project = client.projects.create(title="Stable-SAM pre-annotation", label_config=RECOMMENDED_CONFIG)
    scenes = [drawn_scene(60 + i) for i in range(4)]
    import_images(ls, project.id, [sc.png() for sc in scenes])
    r = requests.post(f"{ls}/api/projects/{project.id}/import", headers={"Authorization": f"Token {LEGACY_TOKEN}"},
                      json=[{"data": {"image": f"http://127.0.0.1:{free_port()}/gone.png"}}], timeout=60)
    assert r.status_code == 201, r.text
    a, b, c, e, gone = sorted(t.id for t in client.tasks.list(project=project.id))
    sa, sb, sc_, se = scenes
    # A: two rough rectangles; B: a rough rectangle and a click on the other object (two prompt
    # shapes); C: nothing; E: a rough rectangle in a *prediction* (e.g. a detector's); gone: an
    # annotated task whose image cannot be fetched.
    client.annotations.create(id=a, result=[rectangle(loosen(sa.boxes[0], sa.size), sa.size, rid="a0"),
                                            rectangle(loosen(sa.boxes[1], sa.size), sa.size, rid="a1")])
    client.annotations.create(id=b, result=[rectangle(loosen(sb.boxes[1], sb.size), sb.size, rid="b1"),
                                            keypoint(*centroid(sb.masks[0]), sb.size, rid="b0")])
    client.predictions.create(task=e, result=[rectangle(loosen(se.boxes[0], se.size), se.size, rid="e0")],
                              model_version="rough-detector", score=0.5)
    client.annotations.create(id=gone, result=[rectangle((10, 10, 50, 50), (240, 180), rid="g0")])

    # a model dir of its own: no adapted plugin versions of other runs (the project serves the default)
    settings = dataclasses.replace(BackendSettings(), label_studio_url=ls, label_studio_api_key=LEGACY_TOKEN,
                                   device="cpu", model_dir=tmp_path / "models")
    backend = StableSamBackend(settings, model=tiny_model)
    version = tiny_model.version

    # a dry run computes everything and uploads nothing
    dry = run_label_studio(client, backend, project.id, dry_run=True, progress=False)
    assert (dry.processed, dry.would_upload, dry.uploaded, dry.no_prompts) == (4, 3, 0, 1)
    assert dry.model_version == version
    assert all(not _ours(client, t, version) for t in (a, b, e))

    # prompts from annotations only, at most one task: A
    first = run_label_studio(client, backend, project.id, source="annotations", limit=1, progress=False)
    assert (first.uploaded, first.processed) == (1, 1)
    (pred,) = _ours(client, a, version)
    _check_masks(pred, sa, [0, 1])
    assert pred.score > 0.5

    # resumed: A is done, B is new, E's prompts are in a prediction (not looked at), C has none
    fresh = StableSamBackend(settings, model=tiny_model)  # empty image cache
    cache, tiny_model.cache = tiny_model.cache, EmbeddingCache()  # and empty embedding cache
    try:
        calls = tiny_model.encoder_calls
        second = run_label_studio(client, fresh, project.id, source="annotations", progress=False)
        # B's image was fetched once (read ahead), found in the URL cache by predict(), encoded once;
        # the unreachable image was tried once
        assert (fresh.images.misses, fresh.images.hits, tiny_model.encoder_calls - calls) == (2, 1, 1)
    finally:
        tiny_model.cache = cache
    assert (second.uploaded, second.skipped_done, second.no_prompts) == (1, 1, 2), second.to_json()
    (pred,) = _ours(client, b, version)
    _check_masks(pred, sb, [1, 0])  # rectangle first, then the free keypoint
    (tid, message), = second.failed
    assert tid == gone and "unreachable" in message, message

    # the command line, prompts from annotations or predictions: only E is new
    env = dict(os.environ, LABEL_STUDIO_URL=ls, LABEL_STUDIO_API_KEY=LEGACY_TOKEN, DEVICE="cpu",
               SAM_MODEL_TYPE="sam_tiny", MODEL_DIR=str(settings.model_dir))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "preannotate.py"), "label-studio", "--project",
                        str(project.id), "--threads", "1", "--no-progress", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr  # 1: the unreachable task failed; the rest was done
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["uploaded"], out["skipped_done"], out["failed"]) == (1, 2, 1), out
    assert out["model_version"] == version
    assert f"{gone}:" in r.stderr and "unreachable" in r.stderr and "Traceback" not in r.stderr
    (pred,) = _ours(client, e, version)
    _check_masks(pred, se, [0])

    # running it again uploads nothing new
    again = run_label_studio(client, backend, project.id, progress=False)
    assert (again.uploaded, again.skipped_done, again.processed) == (0, 3, 1)
    assert all(len(_ours(client, t, version)) == 1 for t in (a, b, e))

    with pytest.raises(LabelStudioUnavailable, match="cannot read project 9999: Label Studio answered HTTP 404"):
        run_label_studio(client, backend, 9999, progress=False)

    # automatic masks for the task without prompts
    auto = run_label_studio(client, backend, project.id, auto=AutoConfig.for_model("sam_tiny", points_per_side=8),
                            progress=False)
    assert auto.uploaded == 1 and auto.skipped_done == 3
    (pred,) = _ours(client, c, version)
    masks = [result_mask(res) for res in pred.result]
    for gt in sc_.masks:
        assert max(iou(m, gt) for m in masks) >= BOX_IOU
    assert all(res["value"]["brushlabels"] == ["Object"] for res in pred.result)
    assert pred.result[0]["meta"]["text"][0].endswith(")") and "automatic" in pred.result[0]["meta"]["text"][0]


def test_unreachable_label_studio_is_a_clear_error():
    with pytest.raises(LabelStudioUnavailable, match="unreachable"):
        connect(f"http://127.0.0.1:{free_port()}", "some-key", timeout=5)
