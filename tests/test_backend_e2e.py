"""End to end with a real Label Studio 1.23.2 (its own venv) and our backend under gunicorn.

Label Studio connects the backend (basic auth on), the server's interactive-annotating API sends a
keypoint and a rectangle through to /predict, "Retrieve predictions" turns a task's rough
rectangle annotation into a stored brush prediction, which is read back and decoded.
``make test`` sets STABLE_SAM_E2E=require so that a missing Label Studio fails instead of skipping.
"""

from __future__ import annotations

import io
import os

import pytest
import requests

from backend_helpers import (RECOMMENDED_CONFIG, centroid, drawn_scene, iou, keypoint, loosen, rectangle,
                             result_mask)
from ls_server import LEGACY_TOKEN, LS_BIN, start_backend, start_label_studio

pytestmark = pytest.mark.e2e  # a real Label Studio (and Chromium): `make test`, not `make test-fast`

# Quality floors for the small SAM on the drawn scenes, calibrated on the final checkpoint
# (sam_tiny-c867453b268e): these prompts measure IoU 0.95-0.97 (keypoint, rectangle) and 0.98
# (the batch rectangle).
KEYPOINT_IOU = 0.8
BOX_IOU = 0.8

AUTH = ("labelstudio", "e2e-basic-secret")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not LS_BIN.exists():
        msg = f"Label Studio is not installed at {LS_BIN}: run `make install-ls` (make test does)"
        if os.environ.get("STABLE_SAM_E2E") == "require":
            pytest.fail(msg)
        pytest.skip(msg)
    work = tmp_path_factory.mktemp("e2e")
    ls, ls_url = start_label_studio(work)
    try:
        be, be_url = start_backend(work, {"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
                                          "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1],
                                          "SAM_MODEL_TYPE": "sam_tiny"})
    except Exception:
        ls.stop()
        raise
    yield {"ls_url": ls_url, "backend_url": be_url, "ls": ls, "backend": be}
    be.stop()
    ls.stop()


def _logs(stack) -> str:
    return (f"\n--- backend log ---\n{stack['backend'].log_tail(3000)}"
            f"\n--- label studio log ---\n{stack['ls'].log_tail(3000)}")


def test_label_studio_end_to_end(stack):
    from label_studio_sdk import LabelStudio

    ls_url, be_url = stack["ls_url"], stack["backend_url"]
    headers = {"Authorization": f"Token {LEGACY_TOKEN}"}
    client = LabelStudio(base_url=ls_url, api_key=LEGACY_TOKEN)

    project = client.projects.create(title="Stable-SAM e2e", label_config=RECOMMENDED_CONFIG)
    scenes = [drawn_scene(11), drawn_scene(12)]
    for i, sc in enumerate(scenes):
        r = requests.post(f"{ls_url}/api/projects/{project.id}/import", headers=headers,
                          files={"file": (f"scene{i}.png", io.BytesIO(sc.png()), "image/png")}, timeout=60)
        assert r.status_code == 201, r.text
    task_ids = sorted(t.id for t in client.tasks.list(project=project.id))
    assert len(task_ids) == 2

    # connect the backend: Label Studio calls /health and /setup (with basic auth)
    ml = client.ml.create(project=project.id, url=be_url, is_interactive=True, title="Stable-SAM",
                          auth_method="BASIC_AUTH", basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    ml = client.ml.get(id=ml.id)
    assert ml.state == "CO", f"backend state {ml.state}: {ml.error_message}{_logs(stack)}"
    setup_version = requests.post(f"{be_url}/setup", json={"project": f"{project.id}.0", "schema": RECOMMENDED_CONFIG},
                                  auth=AUTH, timeout=10).json()["model_version"]

    # interactive: a keypoint, then a rough rectangle, on task 1 (the server sends them to /predict)
    sc, size = scenes[0], scenes[0].size
    for obj, region in ((0, keypoint(*centroid(scenes[0].masks[0]), size)),
                        (1, rectangle(loosen(sc.boxes[1], size), size))):
        r = requests.post(f"{ls_url}/api/ml/{ml.id}/interactive-annotating", headers=headers,
                          json={"task": task_ids[0], "context": {"result": [region]}}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert "errors" not in body and "data" in body, f"{body}{_logs(stack)}"
        data = body["data"]
        assert data["model_version"] == setup_version
        (res,) = data["result"]
        assert res["type"] == "brushlabels" and res["value"]["brushlabels"] == ["Object"]
        assert (res["original_width"], res["original_height"]) == size
        mask = result_mask(res)
        assert mask.shape == (size[1], size[0])
        floor = KEYPOINT_IOU if region["type"] == "keypointlabels" else BOX_IOU
        assert iou(mask, sc.masks[obj]) >= floor, (region["type"], iou(mask, sc.masks[obj]))

    # batch: task 2 has a rough rectangle annotation; "Retrieve predictions" makes a stored brush mask
    sc2, size2 = scenes[1], scenes[1].size
    client.annotations.create(id=task_ids[1], result=[rectangle(loosen(sc2.boxes[0], size2), size2)],
                              ground_truth=False)
    client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                          selected_items={"all": True, "excluded": []})
    preds = [p for p in client.predictions.list(task=task_ids[1]) if p.model_version == setup_version]
    assert preds, f"no stored prediction of {setup_version}{_logs(stack)}"
    stored = preds[-1].result
    (res,) = [r for r in stored if r["type"] == "brushlabels"]
    mask = result_mask(res)
    assert iou(mask, sc2.masks[0]) >= BOX_IOU, iou(mask, sc2.masks[0])
    assert res["meta"]["text"][0].startswith("Stable-SAM: predicted IoU")
    assert 0.0 <= res["stable_sam"]["alpha_deformed"] <= 1.0
    # task 1 has no rectangle or keypoint stored: no prediction (an empty one would show as an
    # extra, empty prediction tab in the labeling screen)
    assert list(client.predictions.list(task=task_ids[0])) == []

    # the backend counted all of it; /health needs no auth, the rest does
    assert requests.get(f"{be_url}/health", timeout=1).json()["model_loaded"] is True
    assert requests.get(f"{be_url}/metrics", timeout=5).status_code == 401
    metrics = requests.get(f"{be_url}/metrics", params={"format": "json"}, auth=AUTH, timeout=5).json()
    assert metrics["encoder_calls_total"] == 2  # one per image, however many clicks
    assert metrics["predict_calls_total"]["kind=interactive"] >= 2
