"""/metrics through prometheus_client: one registry per backend in one process; under gunicorn the
workers' counters are summed (exited workers' too), a given directory's stale counts are cleared at
start, and the temporary directory the master made is gone after it stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import requests

from backend.prometheus_metrics import Metrics
from ls_server import start_backend


def test_counters_by_name_and_labels_in_json_and_text():
    m = Metrics()
    m.count("requests_total", route="/predict", status=200)
    m.count("requests_total", route="/predict", status=200)
    m.count("request_seconds_total", 0.25, route="/predict")
    m.count("encoder_calls_total")
    assert m.get("requests_total", route="/predict", status=200) == 2
    assert m.get("prefetch_done_total") == 0 and Metrics().get("encoder_calls_total") == 0  # apart
    snap = m.snapshot({"model_loaded": 1.0})
    assert snap["requests_total"] == {"route=/predict,status=200": 2}
    assert snap["request_seconds_total"] == {"route=/predict": 0.25}
    assert snap["encoder_calls_total"] == 1 and snap["model_loaded"] == 1.0 and snap["uptime_seconds"] >= 0
    assert "prefetch_done_total" not in snap  # never counted: absent, not 0
    text = m.prometheus({"image_cache_hits_total": 4, "model_loaded": 0.0})
    lines = text.splitlines()
    assert 'stable_sam_backend_requests_total{route="/predict",status="200"} 2.0' in lines
    assert "stable_sam_backend_encoder_calls_total 1.0" in lines
    assert "stable_sam_backend_image_cache_hits_total 4.0" in lines
    assert "stable_sam_backend_model_loaded 0.0" in lines
    assert any(line.startswith("stable_sam_backend_uptime_seconds ") for line in lines)
    assert "_created" not in text


def _workers(master: int) -> List[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            pids.append(int(stat.parent.name))
    return pids


def _wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _health_count(url: str) -> float:
    m = requests.get(f"{url}/metrics", params={"format": "json"}, timeout=10).json()
    return m.get("requests_total", {}).get("route=/health,status=200", 0)


@pytest.mark.slow  # starts gunicorn
def test_gunicorn_workers_are_summed_and_the_temporary_directory_removed(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"WORKERS": "2", "TMPDIR": str(tmp), "MODEL_DIR": str(tmp_path / "models"), "LABEL_STUDIO_URL": "",
           "OMP_NUM_THREADS": "1", "TORCH_THREADS": "1"}
    proc, url = start_backend(tmp_path, env)
    try:
        master = proc.proc.pid
        _wait(lambda: proc.log_tail(20000).count("Booting worker") >= 2)
        (made,) = list(tmp.glob("stable-sam-metrics-*"))
        before = _health_count(url)
        for _ in range(20):  # a new connection each: either worker may answer
            assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert _health_count(url) == before + 20
        victim = _workers(master)[0]
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: victim not in _workers(master) and len(_workers(master)) == 2)
        assert _health_count(url) >= before + 20  # the killed worker's counts stay in the sum
    finally:
        proc.stop()
    assert not made.exists()


@pytest.mark.slow  # starts gunicorn
def test_gunicorn_clears_stale_counts_in_a_given_directory(tmp_path):
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    count = ("from backend.prometheus_metrics import Metrics\n"
             "m = Metrics()\n"
             "m.count('requests_total', 100, route='/health', status=200)\n")
    subprocess.run([sys.executable, "-c", count], check=True, timeout=120,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    assert list(metrics_dir.glob("counter_*.db"))
    proc, url = start_backend(tmp_path, {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "LABEL_STUDIO_URL": "",
                                         "MODEL_DIR": str(tmp_path / "models"), "OMP_NUM_THREADS": "1"})
    try:
        assert _health_count(url) < 100
    finally:
        proc.stop()
    assert metrics_dir.exists()  # given from outside: kept
