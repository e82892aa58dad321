"""Adaptation end to end with a real Label Studio 1.23.2 and our backend under gunicorn.

Brush annotations (the true masks, plus a rough rectangle) are created through Label Studio's API,
"Start training" is pressed through the API (``client.ml.train``): Label Studio sends
START_TRAINING, the backend answers at once and a job trains the project's plugin from the
project's labels. The new version must serve (``/setup`` and a fresh interactive /predict carry the
new model_version, Label Studio lists it); a cancelled job and a SIGKILLed one must leave the
version serving and the store exactly as they were.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from backend_helpers import RECOMMENDED_CONFIG, brush_result, drawn_scene, iou, loosen, rectangle, result_mask
from ls_server import LEGACY_TOKEN, import_images, require_label_studio, start_backend, start_label_studio


pytestmark = pytest.mark.e2e  # a real Label Studio (and Chromium): `make test`, not `make test-fast`

AUTH = ("labelstudio", "e2e-adapt-secret")
BOX_IOU = 0.8


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_label_studio()
    work = tmp_path_factory.mktemp("adapt-e2e")
    model_dir = work / "models"
    ls, ls_url = start_label_studio(work)
    try:
        be, be_url = start_backend(work, {"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
                                          "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1],
                                          "SAM_MODEL_TYPE": "sam_tiny", "MODEL_DIR": str(model_dir),
                                          "TORCH_THREADS": "1", "PLUGIN_CHECKPOINT": "", "PLUGIN_VERSION": ""})
    except Exception:
        ls.stop()
        raise
    yield {"ls_url": ls_url, "backend_url": be_url, "ls": ls, "backend": be, "model_dir": model_dir}
    be.stop()
    ls.stop()


def _logs(stack, job=None) -> str:
    out = (f"\n--- backend log ---\n{stack['backend'].log_tail(3000)}"
           f"\n--- label studio log ---\n{stack['ls'].log_tail(2000)}")
    if job:
        log = stack["model_dir"] / "jobs" / f"{job}.log"
        if log.exists():
            out += f"\n--- job log ---\n{log.read_text()[-3000:]}"
    return out


def _store_files(model_dir):
    root = model_dir / "plugins"
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


def test_start_training_adapts_and_switches_and_a_killed_job_changes_nothing(stack):
    from label_studio_sdk import LabelStudio

    ls_url, be_url, model_dir = stack["ls_url"], stack["backend_url"], stack["model_dir"]
    headers = {"Authorization": f"Token {LEGACY_TOKEN}"}
    client = LabelStudio(base_url=ls_url, api_key=LEGACY_TOKEN)

    def status(project):
        return requests.get(f"{be_url}/train/status", params={"project": project}, auth=AUTH, timeout=10).json()

    def wait_for(project, job, until, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = status(project)
            if st.get("job_id") == job and until(st):
                return st
            time.sleep(0.05)
        raise AssertionError(f"job {job}: last status {status(project)}{_logs(stack, job)}")

    def setup_version(project):
        r = requests.post(f"{be_url}/setup", json={"project": f"{project}.0", "schema": RECOMMENDED_CONFIG},
                          auth=AUTH, timeout=10)
        return r.json()["model_version"]

    project = client.projects.create(title="Stable-SAM adaptation e2e", label_config=RECOMMENDED_CONFIG)
    scenes = [drawn_scene(60 + i) for i in range(4)]
    import_images(ls_url, project.id, [sc.png() for sc in scenes])
    task_ids = sorted(t.id for t in client.tasks.list(project=project.id))
    for tid, sc in zip(task_ids, scenes):  # what an annotator leaves: masks, and the rough box of one object
        result = [brush_result(m, f"b{k}") for k, m in enumerate(sc.masks)]
        result.append(rectangle(loosen(sc.boxes[0], sc.size), sc.size, rid="r0"))
        client.annotations.create(id=tid, result=result, ground_truth=False)

    ml = client.ml.create(project=project.id, url=be_url, is_interactive=True, title="Stable-SAM",
                          auth_method="BASIC_AUTH", basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
    ml = client.ml.get(id=ml.id)
    assert ml.state == "CO", f"backend state {ml.state}: {ml.error_message}{_logs(stack)}"
    v0 = setup_version(project.id)
    # PLUGIN_CHECKPOINT "" with the tests' SAM_CHECKPOINT (the synthetic small SAM, conftest): the
    # shipped plugin belongs to the shipped weights, so plain SAM (the no-op plugin) serves first
    assert v0.endswith("+plugin-init")

    # "Start training": Label Studio sends START_TRAINING, the backend answers at once with a job
    # (not when it ends: the job still runs after the call returns)
    t = time.monotonic()
    client.ml.train(id=ml.id)
    assert client.ml.get(id=ml.id).state != "ER", _logs(stack)
    first = status(project.id)
    assert first["status"] == "running" and first["trigger"] == "START_TRAINING", first
    job = first["job_id"]
    st = wait_for(project.id, job, lambda s: s["status"] != "running", timeout=120)
    assert st["status"] == "done", f"{st}{_logs(stack, job)}"
    took = time.monotonic() - t
    h = st["heldout"]
    print(f"job {job}: {took:.1f} s; held-out mIoU {h['miou_before']} -> {h['miou_after']} "
          f"({h['images']} images, {h['objects']} objects); trained on {st['images']} images")
    assert st["images"] == 3 and h["images"] == 1 and h["drawn_prompts"] >= 1
    assert st["prompt_kinds"].get("annotated", 0) >= 3
    version_file = model_dir / "plugins" / v0.split("+plugin-")[0] / f"project-{project.id}" / f"{st['version']}.pt"
    assert version_file.is_file() and str(version_file) == st["path"]

    # the new version serves without a restart: /setup, a fresh interactive /predict, Label Studio's list
    v1 = setup_version(project.id)
    assert v1 == st["model_version"] != v0
    sc = scenes[1]
    r = requests.post(f"{ls_url}/api/ml/{ml.id}/interactive-annotating", headers=headers, timeout=120,
                      json={"task": task_ids[1], "context": {"result": [rectangle(loosen(sc.boxes[1], sc.size), sc.size)]}})
    data = r.json().get("data")
    assert data and data["model_version"] == v1, f"{r.json()}{_logs(stack)}"
    assert iou(result_mask(data["result"][0]), sc.masks[1]) >= BOX_IOU
    listed = client.ml.list_model_versions(id=ml.id)
    listed = listed.get("versions") if isinstance(listed, dict) else getattr(listed, "versions", listed)
    assert v1 in listed and v0 in listed, listed
    before = _store_files(model_dir)

    # a job cancelled while it runs: no version written, the current one still serves
    client.ml.train(id=ml.id)
    job2 = status(project.id)["job_id"]
    assert job2 != job
    wait_for(project.id, job2, lambda s: s.get("pid") and s["phase"] != "starting", timeout=60)
    r = requests.post(f"{be_url}/train/cancel", json={"project": project.id}, auth=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", f"{r.json()}{_logs(stack, job2)}"
    assert setup_version(project.id) == v1 and _store_files(model_dir) == before

    # a job SIGKILLed (as the OOM killer would): reported failed, nothing changed, the server unharmed
    client.ml.train(id=ml.id)
    job3 = status(project.id)["job_id"]
    st3 = wait_for(project.id, job3, lambda s: s.get("pid") and s["phase"] != "starting", timeout=60)
    os.kill(st3["pid"], signal.SIGKILL)
    st3 = wait_for(project.id, job3, lambda s: s["status"] != "running", timeout=30)
    assert st3["status"] == "failed" and "ended without reporting" in st3["error"]
    assert setup_version(project.id) == v1 and _store_files(model_dir) == before
    r = requests.post(f"{ls_url}/api/ml/{ml.id}/interactive-annotating", headers=headers, timeout=120,
                      json={"task": task_ids[1], "context": {"result": [rectangle(loosen(sc.boxes[1], sc.size), sc.size)]}})
    assert r.json()["data"]["model_version"] == v1
    versions = requests.get(f"{be_url}/versions", params={"project": project.id}, auth=AUTH, timeout=10).json()
    assert versions["current"] == st["version"] and versions["jobs"] == []
    assert [d["version"] for d in versions["details"]] == [st["version"]]
