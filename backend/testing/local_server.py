"""The backend as a subprocess on 127.0.0.1 and a free port (gunicorn, as ``make run`` starts it),
stopped with its whole process group: what ``scripts/soak.py`` and the end-to-end tests run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A subprocess with its log file; stopped with SIGTERM then SIGKILL (its own process group)."""

    def __init__(self, name: str, cmd: List[str], env: Dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the process's log."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float) -> None:
        """Wait until ``url`` answers; RuntimeError with the log if the process exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(url, timeout=2).status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM its process group; SIGKILL if it is not gone within 15 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self._log.close()


def answering(proc: Process, port: int, timeout: float) -> tuple[Process, str]:
    """``proc`` and its URL once its /health answers; stopped if it never does."""
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/health", timeout=timeout)
    except Exception:
        proc.stop()
        raise
    return proc, url


def start_backend(work: Path, env_extra: Dict[str, str], python: Optional[str] = None,
                  loopback_only: bool = False) -> tuple[Process, str]:
    """``loopback_only``: the server refuses every connection outside loopback (``loopback_guard.py``)."""
    port = free_port()
    env = dict(os.environ)
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "1", "THREADS": "4", "LOG_LEVEL": "INFO",
                "DEVICE": "cpu"})
    env.update(env_extra)
    guard = ["-m", "backend.testing.loopback_guard"] if loopback_only else []
    cmd = [python or sys.executable, *guard, "-m", "gunicorn", "-c", str(ROOT / "backend" / "gunicorn.conf.py"),
           "backend.wsgi:app"]
    return answering(Process("backend", cmd, env, work / "backend.log"), port, timeout=120)
