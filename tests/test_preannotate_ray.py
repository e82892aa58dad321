"""The offline pre-annotation job on a local Ray cluster (2 CPUs, started here): the same bytes as
the single-machine job, a worker killed mid-run, a restart after a partial run, the CLI's
``--ray-address`` path and its errors, and a single-machine run that never imports Ray."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest
import ray

from backend_helpers import SYNTHETIC_SAM, drawn_scene
from stable_sam.builders import build
from stable_sam.preannotation import items_from_coco, run_offline
from stable_sam.preannotation.offline import journal_path
from stable_sam.preannotation.ray_job import (ACTOR_NAME, RayUnavailable, ShardPool, _check_reachable, run_offline_ray,
                                             start_workers, stop_workers)
from test_preannotate import write_coco_input
from test_rts import one_thread  # noqa: F401 - its autouse fixture: one torch thread in this module (as each CPU worker: the reference is computed with the same thread count), restored after

pytestmark = pytest.mark.slow  # a local Ray cluster and its worker processes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "preannotate.py"
# what each Ray worker loads: the tests' small SAM (a worker does not see conftest's in-process default)
FACTORY = functools.partial(build, "sam_tiny", sam_checkpoint=SYNTHETIC_SAM)
N_IMAGES = 16


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model):
    """N_IMAGES drawn scenes with a rough box per object, and the single-machine job's output."""
    folder = tmp_path_factory.mktemp("ray-job")
    work = items_from_coco(write_coco_input(folder, [drawn_scene(70 + i) for i in range(N_IMAGES)]), folder)
    ref = folder / "ref" / "masks.json"
    summary = run_offline(tiny_model, work, ref, png_dir=folder / "ref" / "png", progress=False)
    assert summary.processed == N_IMAGES and not summary.failed
    return folder, work, ref


@pytest.fixture(autouse=True)
def no_workers_left(cluster):
    """Each test starts with no pre-annotation worker on the cluster and leaves none behind (a test
    that fails while a job runs must not fail the next ones with a name clash)."""
    yield
    for i in range(4):
        try:
            ray.kill(ray.get_actor(ACTOR_NAME.format(i)), no_restart=True)
        except ValueError:  # no such actor
            pass


def journal_ids(output: Path) -> List[int]:
    """Image ids of the journal's records, one per line, in the order they were written; none
    while the file is still empty (a run creates it, then writes the header)."""
    lines = journal_path(output).read_text().splitlines()
    if not lines:
        return []
    assert json.loads(lines[0])["format"].startswith("stable-sam-preannotation-journal")
    return [json.loads(line)["image_id"] for line in lines[1:]]


def test_ray_output_is_byte_identical_to_the_single_machine_job(cluster, job):
    folder, work, ref = job
    out = folder / "ray2" / "masks.json"
    summary = run_offline_ray(FACTORY, work, out, png_dir=folder / "ray2" / "png", workers=2, shard_size=3,
                              progress=False)
    assert (summary.processed, summary.already_done, summary.failed, summary.workers) == (N_IMAGES, 0, [], 2)
    assert summary.model_version == json.loads(ref.read_text())["info"]["model_version"]
    assert sorted(summary.by_worker) == [0, 1] and sum(summary.by_worker.values()) == N_IMAGES  # both worked
    assert out.read_bytes() == ref.read_bytes()
    ref_png = sorted((folder / "ref" / "png").iterdir())
    ray_png = sorted((folder / "ray2" / "png").iterdir())
    assert [p.name for p in ray_png] == [p.name for p in ref_png] and len(ref_png) == 2 * N_IMAGES
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ref_png, ray_png))
    assert sorted(journal_ids(out)) == [it.image_id for it in work.items]


def test_a_worker_killed_mid_run_ends_with_every_image_done_once(cluster, job):
    folder, work, ref = job
    out = folder / "killed" / "masks.json"
    result = {}

    def run() -> None:
        try:
            result["summary"] = run_offline_ray(FACTORY, work, out, workers=2, shard_size=2, progress=False)
        except BaseException as e:  # handed to the test thread
            result["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 300  # generous: on a loaded CPU two workers load the model slowly
    while not (journal_path(out).exists() and len(journal_ids(out)) >= 2):  # a first shard is back
        assert time.monotonic() < deadline and runner.is_alive(), result
        time.sleep(0.005)
    done_at_kill = len(journal_ids(out))
    ray.kill(ray.get_actor(ACTOR_NAME.format(0)), no_restart=False)  # SIGKILL; Ray restarts it
    runner.join(timeout=600)
    assert not runner.is_alive() and "error" not in result, result
    summary = result["summary"]
    assert done_at_kill < N_IMAGES
    assert summary.retried_shards >= 1  # worker 0 held shards when it died: they were sent again
    assert (summary.processed, summary.failed, summary.lost_workers) == (N_IMAGES, [], 0)
    ids = journal_ids(out)
    assert sorted(ids) == [it.image_id for it in work.items]  # every image recorded exactly once
    assert out.read_bytes() == ref.read_bytes()


def test_restart_after_a_partial_run_does_only_what_is_missing(cluster, job, tiny_model):
    """A single-machine run stopped after 5 images, killed in a journal write; the Ray job with the
    same arguments takes its journal over (same run key) and does the other images only."""
    folder, work, ref = job
    out = folder / "resumed" / "masks.json"
    assert run_offline(tiny_model, work, out, limit=5, progress=False).processed == 5
    with open(journal_path(out), "a") as f:
        f.write('{"image_id": 15, "file_na')  # a torn last line
    summary = run_offline_ray(FACTORY, work, out, workers=1, shard_size=4, progress=False)
    assert (summary.already_done, summary.processed, summary.by_worker) == (5, N_IMAGES - 5, {0: N_IMAGES - 5})
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(journal_ids(out)) == [it.image_id for it in work.items]


def test_workers_that_cannot_load_the_model_or_do_not_fit_are_clear_errors(cluster, job, tmp_path):
    _, work, _ = job
    missing = functools.partial(build, "sam_tiny", sam_checkpoint=tmp_path / "nope.pt")
    with pytest.raises(RayUnavailable, match="could not load the model.*SAM checkpoint not found"):
        run_offline_ray(missing, work, tmp_path / "o.json", workers=1, progress=False)
    with pytest.raises(RayUnavailable, match="do not fit the Ray cluster"):
        run_offline_ray(FACTORY, work, tmp_path / "o.json", workers=3, progress=False)
    assert not (tmp_path / "o.json").exists()


class Toy:
    """A toy Ray worker: squares numbers; its process dies on a shard holding -1 (a poison image)."""

    def describe(self) -> dict:
        return {"version": "toy", "pid": os.getpid()}

    def run(self, shard: List[int]) -> List[int]:
        if -1 in shard:
            os._exit(1)
        return [x * x for x in shard]


@pytest.mark.parametrize("restarts", [5, 0])
def test_shard_pool_gives_up_a_shard_that_kills_its_workers(cluster, restarts):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    actors, described = start_workers(ray, Toy, lambda i: (), 2, 1, False, max_restarts=restarts)
    assert [d["version"] for d in described] == ["toy", "toy"]
    pool = ShardPool(ray, actors, max_attempts=3)
    shards = [[1, 2], [3, -1], [4, 5], [6], [7]]
    try:
        got = list(pool.run(shards))
    finally:
        stop_workers(ray, actors)
    assert sorted(map(tuple, (s for _, s, _, _ in got))) == sorted(map(tuple, shards))  # each shard once
    done = {tuple(s): r for _, s, r, _ in got if r is not None}
    given_up = {tuple(s): reason for _, s, r, reason in got if r is None}
    if restarts:  # restarted each time: the poison shard is given up after 3 deaths, the rest is done
        assert given_up == {(3, -1): "its Ray worker died 3 times running this shard (out of memory?): rerun to retry"}
        assert done == {(1, 2): [1, 4], (4, 5): [16, 25], (6,): [36], (7,): [49]}
        assert pool.retried >= 2 and pool.lost_workers == 0  # + the shards queued behind it
    else:  # no restarts: the poison shard kills both workers; what is left is reported, not lost
        assert pool.lost_workers == 2 and given_up[(3, -1)].startswith("no Ray worker left")
        assert all(reason.startswith("no Ray worker left") for reason in given_up.values())


def test_a_second_job_on_a_busy_cluster_is_a_clear_error(cluster, job, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    busy, _ = start_workers(ray, Toy, lambda i: (), 1, 1, False, max_restarts=0)  # another job's worker 0
    try:
        with pytest.raises(RayUnavailable, match="another pre-annotation job is running on this Ray cluster"):
            run_offline_ray(FACTORY, job[1], tmp_path / "o.json", workers=1, progress=False)
        assert ray.get(busy[0].describe.remote())["version"] == "toy"  # the other job's worker is untouched
    finally:
        stop_workers(ray, busy)
    assert not (tmp_path / "o.json").exists()

# Runs the CLI with `import ray` failing (block) or not, and says whether Ray got imported.
WRAPPER = """
import runpy, sys
block = sys.argv.pop(1) == "block"
if block:
    sys.modules["ray"] = None  # `import ray` raises ImportError, as without the package
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
imported = any(m == "ray" or m.startswith("ray.") for m, v in sys.modules.items() if v is not None)
print("RAY_IMPORTED" if imported else "RAY_NOT_IMPORTED", file=sys.stderr)
sys.exit(code)
"""


def preannotate_cli():
    """scripts/preannotate.py as a module, to call its ``main`` in this process."""
    spec = importlib.util.spec_from_file_location("preannotate_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*args: str, block_ray: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, "block" if block_ray else "-", str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_cli_single_machine_run_never_imports_ray_and_the_ray_run_finishes_it(cluster, job, monkeypatch):
    folder, work, ref = job
    monkeypatch.setenv("MASK_MIN_REGION_PX", "0")  # as the reference run (run_offline's default: no clean-up)
    out = folder / "cli" / "masks.json"
    common = ["offline", "--images", str(folder), "--coco", str(folder / "input.json"), "--out", str(out),
              "--threads", "1", "--no-progress", "--json"]
    single = cli(*common, "--limit", "6")
    assert single.returncode == 0, single.stderr
    assert "RAY_NOT_IMPORTED" in single.stderr  # the default path does not load Ray
    assert json.loads(single.stdout.strip().splitlines()[-1])["processed"] == 6
    on_ray = cli(*common, "--ray-address", cluster, "--workers", "1", "--shard-size", "4")
    assert on_ray.returncode == 0, on_ray.stderr
    assert "RAY_IMPORTED" in on_ray.stderr
    summary = json.loads(on_ray.stdout.strip().splitlines()[-1])
    assert (summary["already_done"], summary["processed"], summary["ray"]["workers"]) == (6, N_IMAGES - 6, 1)
    assert summary["ray"]["by_worker"] == {"0": N_IMAGES - 6} and summary["ray"]["retried_shards"] == 0
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(journal_ids(out)) == [it.image_id for it in work.items]


def test_cli_ray_errors_are_messages(job, tmp_path, capsys):
    folder, _, _ = job
    args = ["offline", "--images", str(folder), "--coco", str(folder / "input.json"), "--no-progress",
            "--out", str(tmp_path / "o.json")]
    no_ray = cli(*args, "--ray-address", "auto", block_ray=True)
    assert no_ray.returncode == 2 and "needs Ray: pip install -r requirements-ray.txt" in no_ray.stderr
    assert "Traceback" not in no_ray.stderr
    # a fresh process: this one is connected to the test's cluster already
    gone = cli(*args, "--ray-address", "127.0.0.1:1")
    assert gone.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in gone.stderr, gone.stderr
    assert "Traceback" not in gone.stderr
    with pytest.raises(RayUnavailable, match="cannot reach the Ray cluster at ray://127.0.0.1:1"):
        _check_reachable("ray://127.0.0.1:1", timeout_s=5)
    assert preannotate_cli().main(args + ["--workers", "2"]) == 2
    assert "--workers needs --ray-address" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
