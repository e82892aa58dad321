"""A real Label Studio and our backend as subprocesses, for the end-to-end test.

Label Studio lives in its own venv (``make install-ls`` -> .venv-ls: it pins Django and its own
label-studio-sdk). Its database migrations take about a minute, so a migrated data dir is built
once with ``label-studio init`` and kept as a template under the venv; each run copies it to a
temporary dir and starts from there in seconds. Settings as in ../shared/docs/label-studio-protocol.md;
the ones that let it call a backend on 127.0.0.1 are read from the README's step 1, so the tests
start it as a reader of the README would.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import requests

from backend.testing.local_server import Process, free_port, start_backend  # noqa: F401 - re-exported
from backend.testing.local_server import answering as _answering

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


def readme_label_studio_settings() -> Dict[str, str]:
    """The ``NAME=value`` settings the README's step 1 starts Label Studio with (its
    ``label-studio start`` line): the end-to-end tests start it with exactly these."""
    import re

    for line in (ROOT / "README.md").read_text().splitlines():
        if "label-studio start" in line:
            settings = dict(re.findall(r"\b([A-Z][A-Z0-9_]+)=(\S+)", line.split("label-studio start")[0]))
            if settings:
                return settings
    raise AssertionError("README.md has no `NAME=value ... label-studio start` line")


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
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_PORT": str(port),
    })
    env.update(readme_label_studio_settings())  # what lets it call a backend on this machine
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


def start_label_studio(work: Path) -> tuple[Process, str]:
    template = ensure_template(work)
    data = work / "ls-data"
    shutil.copytree(template, data)
    port = free_port()
    cmd = [str(LS_BIN), "start", "--no-browser", "--debug", "--internal-host", "127.0.0.1", "--port", str(port)]
    return _answering(Process("label-studio", cmd, ls_env(data, port), work / "label-studio.log"), port, timeout=240)
