"""A server training job: adapting a Label Studio project's plugin to its labels.

``python -m backend.training_job --project N --job-id ID`` is what the server starts for
START_TRAINING (``backend/jobs.py``), with the server's settings in its environment. It fetches
the project's annotated tasks (``project_dataset``: label-studio-sdk, images through the backend's
``ImageLoader``) and runs the library's workflow (``stable_sam.adaptation.run_adaptation``): the
annotators' prompts rebuilt from each annotation, held-out mIoU of the plugin serving now, one RTS
epoch on the plugin only, held-out mIoU again, the new version written atomically under
``MODEL_DIR/plugins/<base model>/project-N/`` with its summary and the project pointed at it.

A job reports through an atomic status JSON (``MODEL_DIR/jobs/<job id>.json``): phase
(starting, fetching, evaluating_before, training step k of n with its loss, evaluating_after,
saving, done / failed / cancelled), pid, times, held-out mIoU before / after, the new version or
the error. SIGTERM cancels it (nothing is written, unless it already commits the new version).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Optional, Sequence, Tuple

import numpy as np

from stable_sam.adaptation import AdaptationConfig, AdaptationError, Reporter, export_dataset, run_adaptation
from stable_sam.checkpoint import atomic_write_json
from stable_sam.data.dataset import DatasetError
from stable_sam.data.label_studio_export import LabelStudioTasks
from stable_sam.data.label_studio_prompts import annotation_prompts
from stable_sam.download import CheckpointError
from stable_sam.plugin_store import PluginStore, project_scope

from .errors import BadInput
from .job_files import LOCK_FD_ENV, job_status_path, utc_now
from .server_settings import BackendSettings

JOB_NICE = 10  # a job yields the CPU to the server's interactive clicks
STATUS_EVERY_S = 1.0  # training-step updates of the status file, at most this often


def project_dataset(settings: BackendSettings, project: int) -> LabelStudioTasks:
    """The annotated tasks of a live project, images read through the backend's ``ImageLoader``
    (uploads, local files, cloud storage) with LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY."""
    from .label_config import parse_label_config
    from .label_studio import connect, project_tasks
    from .media import ImageLoader

    client = connect(settings.label_studio_url, settings.label_studio_api_key)
    image_key = None
    config = getattr(client.projects.get(id=project), "label_config", None)
    if config:
        cfg = parse_label_config(config)  # 4xx-style message when the config has no brush control
        image_key = cfg.image_keys.get(next(iter(cfg.output_by_image)))
    tasks = list(project_tasks(client, project, only_annotated=True))
    loader = ImageLoader(settings)

    def read(task: Dict[str, Any], url: str) -> Tuple[np.ndarray, str]:
        try:
            image, _ = loader.load(url, task.get("id"))
        except BadInput as e:
            raise DatasetError(f"task {task.get('id')}: {e.message}") from None
        return image, f"task {task.get('id')}"

    return LabelStudioTasks(tasks, read, f"Label Studio project {project} at {settings.label_studio_url}",
                            image_key=image_key, prompts_for=annotation_prompts)


class Cancelled(Exception):
    """SIGTERM reached a job before it committed its new version."""


class JobReporter(Reporter):
    """A job's reports: log lines, and its status file (atomic writes, training steps at most
    every STATUS_EVERY_S); SIGTERM cancels the run until the new version is being committed."""

    def __init__(self, status_path: Path, echo: Callable[[str], None] = print) -> None:
        super().__init__(echo)
        self.status_path = status_path
        self.state: Dict[str, Any] = {}
        if status_path.is_file():
            try:
                self.state = json.loads(status_path.read_text())
            except ValueError:
                self.state = {}
        self._last_write = 0.0
        self._committing = False

    def update(self, throttle: bool = False, **fields: Any) -> None:
        """Merge ``fields`` into the job's status and write the file (at most every STATUS_EVERY_S
        when ``throttle``)."""
        self.state.update(fields, updated=utc_now())
        now = time.monotonic()
        if throttle and now - self._last_write < STATUS_EVERY_S:
            return
        self._last_write = now
        atomic_write_json(self.state, self.status_path)

    def phase(self, name: str, info: Optional[Dict[str, Any]] = None) -> None:
        """The job entered phase ``name``: in the status file and the log."""
        self.update(phase=name, **(info or {}))
        super().phase(name, info)

    def step(self, step: int, steps: int, loss: Optional[float]) -> None:
        """RTS step ``step`` of ``steps`` (and its loss) in the status file, throttled but the last."""
        self.update(throttle=step < steps, phase="training", step=step, steps=steps,
                    **({"loss": loss} if loss is not None else {}))

    # cancellation: a SIGTERM raises Cancelled until the new version starts being committed;
    # from then on the run finishes (a half-done commit would be worse than a late cancel)
    def on_sigterm(self, signum, frame) -> None:
        """SIGTERM handler: cancel (``Cancelled``) unless the new version is being committed."""
        if not self._committing:
            raise Cancelled("cancelled (SIGTERM) before the new version was written")
        self.echo("SIGTERM while committing the new version: finishing")

    def committing(self) -> ContextManager[None]:
        """From here on a SIGTERM no longer cancels: the new version is being written."""
        self._committing = True
        return contextlib.nullcontext()


def release_job_lock() -> None:
    """Release the project's job lock once the final status is written: the interpreter's exit can
    take a while, and a new START_TRAINING must not be told that this job still runs."""
    fd = os.environ.get(LOCK_FD_ENV, "")
    if fd.isdigit():
        with contextlib.suppress(OSError):
            fcntl.flock(int(fd), fcntl.LOCK_UN)
            os.close(int(fd))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """A server training job: settings from the environment (the server passes its own)."""
    try:
        return _job(argv)
    finally:
        release_job_lock()


def _job(argv: Optional[Sequence[str]]) -> int:
    ap = argparse.ArgumentParser(description="Stable-SAM training job for one Label Studio project "
                                             "(started by the backend on START_TRAINING)")
    ap.add_argument("--project", type=int, required=True)
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--export", type=Path, default=None,
                    help="read the labels from this Label Studio JSON export instead of the live project")
    ap.add_argument("--image-root", type=Path, default=None)
    args = ap.parse_args(argv)

    from stable_sam.builders import build_from_settings

    from .logs import configure_logging

    settings = BackendSettings.from_env()
    configure_logging(settings.log_level)
    reporter = JobReporter(job_status_path(settings.model_dir, args.job_id), echo=lambda s: print(s, flush=True))
    signal.signal(signal.SIGTERM, reporter.on_sigterm)
    reporter.update(status="running", phase="fetching", pid=os.getpid())
    try:
        os.nice(JOB_NICE)
    except OSError:
        pass
    try:
        import torch

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        dataset = (export_dataset(args.export, args.image_root) if args.export is not None
                   else project_dataset(settings, args.project))
        reporter.update(tasks=len(dataset))
        model = build_from_settings(settings)
        store = PluginStore(settings.model_dir, model.model_id)
        scope = project_scope(args.project)
        reporter.update(store_dir=str(store.scope_dir(scope)), base_model=model.model_id)
        cfg = AdaptationConfig(holdout=settings.train_holdout, init=settings.train_init)
        result = run_adaptation(model, dataset, reporter, store=store, scope=scope, cfg=cfg,
                                extra_summary={"job_id": args.job_id, "project": args.project})
    except Cancelled as e:
        reporter.update(status="cancelled", phase="cancelled", error=str(e), finished=utc_now())
        return 3
    except (AdaptationError, DatasetError, BadInput, CheckpointError, ValueError) as e:
        msg = e.message if isinstance(e, BadInput) else str(e)
        reporter.update(status="failed", phase="failed", error=msg, finished=utc_now())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except BaseException as e:  # noqa: BLE001 - reported in the status, traceback to the job log
        traceback.print_exc()
        reporter.update(status="failed", phase="failed", error=f"{e.__class__.__name__}: {str(e)[:500]}",
                        finished=utc_now())
        return 1
    reporter.update(status="done", phase="done", finished=utc_now(), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
