"""Clean exit (issue 23): a process that served the backend exits with code 0 and says nothing on
stderr, also while a task's image is still being encoded in the background.

Before the fix such a process aborted now and then with ``terminate called without an active
exception`` (exit code 134): a daemon thread still inside torch when Python finalizes is ended
with ``pthread_exit``, whose unwind through torch's C++ is fatal (``backend/background.py``).
The abort is a race, so each test also checks what makes it impossible: at exit, no background
thread of the backend is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from backend.prefetch import Prefetcher
from backend_helpers import RECOMMENDED_CONFIG, centroid, drawn_scene, keypoint
from ls_server import free_port

ROOT = Path(__file__).resolve().parents[1]

# Creates the app, serves one click, then opens another task (a /predict with one task and no
# context: its image is handed to the prefetch and encoded in the background) and exits at once.
SCRIPT = r"""
import atexit, json, sys, threading
from pathlib import Path

def alive_at_exit():  # registered before the backend exists, so atexit runs it after the backend's hook
    print("alive at exit:", sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()),
          flush=True)

atexit.register(alive_at_exit)

from backend.app import create_app
from backend.server_settings import BackendSettings

root = Path(sys.argv[1])
client = create_app(BackendSettings(local_files_root=root, model_dir=root / "models")).test_client()
for name in ("click", "open"):
    r = client.post("/predict", json=json.loads((root / f"{name}.json").read_text()))
    print(name, r.status_code, json.dumps(r.get_json())[:80], flush=True)
"""


def test_prefetch_stop_finishes_the_job_in_hand_and_drops_the_queued_ones():
    prefetcher = Prefetcher(3, name="test-stop")
    release, ran = threading.Event(), []
    assert prefetcher.submit("a", lambda: (release.wait(60), ran.append("a")))
    deadline = time.monotonic() + 60
    while prefetcher._queue.qsize():  # until the worker holds "a"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert prefetcher.submit("b", lambda: ran.append("b")) and prefetcher.submit("c", lambda: ran.append("c"))
    prefetcher.stop()  # does not wait for "a"
    assert not prefetcher.submit("d", lambda: ran.append("d")) and not release.is_set()
    release.set()
    prefetcher._worker.join(60)
    assert not prefetcher._worker.is_alive() and ran == ["a"] and prefetcher.pending() == 0


def _requests(root: Path) -> None:
    """click.json (a keypoint on a.png) and open.json (task b.png opened: no context) in ``root``."""
    for i, name in enumerate(("a", "b")):
        (root / f"{name}.png").write_bytes(drawn_scene(70 + i).png())
    sc = drawn_scene(70)
    click = {"tasks": [{"id": 1, "data": {"image": str(root / "a.png")}}], "label_config": RECOMMENDED_CONFIG,
             "params": {"context": {"result": [keypoint(*centroid(sc.masks[0]), sc.size)]}}}
    opened = {"tasks": [{"id": 2, "data": {"image": str(root / "b.png")}, "annotations": [], "predictions": []}],
              "label_config": RECOMMENDED_CONFIG, "params": {"context": None}}
    (root / "click.json").write_text(json.dumps(click))
    (root / "open.json").write_text(json.dumps(opened))


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_THREADS": "1", **extra}


@pytest.mark.slow  # subprocesses: the backend, and gunicorn twice
def test_a_process_that_served_a_click_and_opened_a_task_exits_cleanly(tmp_path):
    _requests(tmp_path)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert lines[0].startswith('click 200 {"results": [{"model_version"') and lines[1] == 'open 200 {"results": [[]]}', \
        (run.stdout, run.stderr[-3000:])
    assert "alive at exit: []" in run.stdout, run.stdout  # the prefetch and the version reader were joined
    assert run.returncode == 0 and run.stderr == "", (run.returncode, run.stderr[-3000:])


def _is_log_line(line: str) -> bool:
    # gunicorn's "[2026-01-01 10:00:00 +0000] [pid] [INFO] ..." or the backend's "2026-01-01 10:00:00,123 [pid] INFO ..."
    return line.startswith("[20") or line[:4].isdigit() and line[4:5] == "-"


class _Server:
    """``python -m backend``, what ``make run`` starts (gunicorn, one worker), its stderr read as it
    comes (so a test can wait for a line without a fixed sleep)."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        env = _env(HOST="127.0.0.1", PORT=str(self.port), WORKERS="1", THREADS="2", LOG_LEVEL="INFO",
                   MODEL_DIR=str(tmp_path / "models"), LOCAL_FILES_DOCUMENT_ROOT=str(tmp_path))
        self.proc = subprocess.Popen([sys.executable, "-m", "backend"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_for_line(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.lines)):
            assert self.proc.poll() is None and time.monotonic() < deadline, f"no {text!r}:\n{''.join(self.lines)}"
            time.sleep(0.05)

    def stop_cleanly(self, what: str) -> str:
        """SIGTERM; the exit code must be 0 and stderr log lines only, none of them an error and none
        saying that a worker died of a signal or with an exit code. Returns stderr."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self._reader.join(30)
        err = "".join(self.lines)
        assert self.proc.returncode == 0, f"{what}: exit code {self.proc.returncode}\n{err[-3000:]}"
        strays = [line for line in err.splitlines() if not _is_log_line(line)]
        assert not strays, f"{what}: not a log line on stderr: {strays[:5]}\n{err[-3000:]}"
        bad = [line for line in err.splitlines()
               if any(word in line for word in (" ERROR ", "[ERROR]", "CRITICAL", "was sent SIG", "exited with code"))]
        assert not bad, f"{what}: {bad[:5]}\n{err[-3000:]}"
        return err


@pytest.mark.slow  # subprocesses: the backend, and gunicorn twice
def test_gunicorn_stops_cleanly_on_sigterm_at_start_and_while_a_task_is_encoded(tmp_path):
    _requests(tmp_path)
    # as soon as gunicorn listens (its signal handlers are set; earlier, SIGTERM's default action
    # ends the starting interpreter, exit -15): the worker is still importing, or reading the model
    # version from the checkpoint files
    server = _Server(tmp_path)
    server.wait_for_line("Listening at")
    server.stop_cleanly("SIGTERM as gunicorn starts")

    # a task was just opened: the worker's prefetch is loading the model and encoding its image
    server = _Server(tmp_path)
    url = f"http://127.0.0.1:{server.port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.proc.poll() is None and time.monotonic() < deadline, "the backend did not start"
            try:
                requests.get(f"{url}/health", timeout=2)
                break
            except requests.RequestException:  # not listening yet, or the worker still booting
                time.sleep(0.2)
        r = requests.post(f"{url}/predict", data=(tmp_path / "open.json").read_bytes(),
                          headers={"Content-Type": "application/json"}, timeout=60)
        assert r.json() == {"results": [[]]}
    finally:
        err = server.stop_cleanly("SIGTERM while a task is prefetched")
    # the worker's exit stopped and joined its prefetch thread (which never ends by itself)
    assert "stopping background threads: " in err and "prefetch" in err.split("stopping background threads: ")[1], \
        err[-3000:]
