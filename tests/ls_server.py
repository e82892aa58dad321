"""A real Label Studio and our backend as subprocesses, for the end-to-end test.

Label Studio lives in its own venv (``make install-ls`` -> .venv-ls: it pins Django and its own
label-studio-sdk). Its database migrations take about a minute, so a migrated data dir is built
once with ``label-studio init`` and kept as a template under the venv; each run copies it to a
temporary dir and starts from there in seconds. Settings as in ../shared/docs/label-studio-protocol.md.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import requests

ROOT = Path(__file__).resolve().parents[1]
LS_VERSION = "1.23.2"
LS_BIN = Path(os.environ.get("LABEL_STUDIO_BIN") or ROOT / ".venv-ls" / "bin" / "label-studio")
TEMPLATE = LS_BIN.parent.parent / f"ls-template-{LS_VERSION}"

USERNAME = "e2e@example.com"
PASSWORD = "e2e-password-123"
LEGACY_TOKEN = "e2e0legacy0token0123456789abcdef"


def require_label_studio() -> None:
    """Skip the calling test without Label Studio, or fail under ``make test``
    (STABLE_SAM_E2E=require), which installs it."""
    import pytest

    if not LS_BIN.exists():
        msg = f"Label Studio is not installed at {LS_BIN}: run `make install-ls` (make test does)"
        if os.environ.get("STABLE_SAM_E2E") == "require":
            pytest.fail(msg)
        pytest.skip(msg)


def import_images(ls_url: str, project: int, pngs: List[bytes]) -> None:
    """Upload PNG images to a project as tasks (``POST /api/projects/{id}/import``), one each."""
    for i, png in enumerate(pngs):
        r = requests.post(f"{ls_url}/api/projects/{project}/import", headers={"Authorization": f"Token {LEGACY_TOKEN}"},
                          files={"file": (f"scene{i}.png", io.BytesIO(png), "image/png")}, timeout=60)
        if r.status_code != 201:
            raise RuntimeError(f"import into project {project} failed: HTTP {r.status_code} {r.text[:300]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ls_env(data_dir: Path, port: int) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("USERNAME", "PASSWORD", "PORT", "HOST") and not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": LEGACY_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_PORT": str(port),
    })
    return env


def ensure_template(log_dir: Path) -> Path:
    """The migrated data-dir template, built once (about a minute) and reused."""
    if (TEMPLATE / "label_studio.sqlite3").is_file():
        return TEMPLATE
    tmp = TEMPLATE.with_name(TEMPLATE.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log = log_dir / "ls-init.log"
    with open(log, "wb") as out:
        rc = subprocess.call([str(LS_BIN), "init", "-q"], env=ls_env(tmp, 0), stdout=out, stderr=subprocess.STDOUT,
                             timeout=600)
    if rc != 0 or not (tmp / "label_studio.sqlite3").is_file():
        raise RuntimeError(f"label-studio init failed (rc {rc}):\n{log.read_text()[-3000:]}")
    try:
        os.rename(tmp, TEMPLATE)
    except OSError:  # another run made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return TEMPLATE


class Process:
    """A subprocess with its log file; stopped with SIGTERM then SIGKILL (its own process group)."""

    def __init__(self, name: str, cmd: List[str], env: Dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float) -> None:
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


def start_label_studio(work: Path) -> tuple[Process, str]:
    template = ensure_template(work)
    data = work / "ls-data"
    shutil.copytree(template, data)
    port = free_port()
    cmd = [str(LS_BIN), "start", "--no-browser", "--debug", "--internal-host", "127.0.0.1", "--port", str(port)]
    return _answering(Process("label-studio", cmd, ls_env(data, port), work / "label-studio.log"), port, timeout=240)


def _answering(proc: Process, port: int, timeout: float) -> tuple[Process, str]:
    """``proc`` and its URL once its /health answers; stopped if it never does."""
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{url}/health", timeout=timeout)
    except Exception:
        proc.stop()
        raise
    return proc, url


def start_backend(work: Path, env_extra: Dict[str, str], python: Optional[str] = None) -> tuple[Process, str]:
    port = free_port()
    env = dict(os.environ)
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "1", "THREADS": "4", "LOG_LEVEL": "INFO",
                "DEVICE": "cpu"})
    env.update(env_extra)
    cmd = [python or sys.executable, "-m", "gunicorn", "-c", str(ROOT / "backend" / "gunicorn.conf.py"),
           "backend.wsgi:app"]
    return _answering(Process("backend", cmd, env, work / "backend.log"), port, timeout=120)
