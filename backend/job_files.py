"""What the server (``backend/jobs.py``) and a training job (``backend/training_job.py``) share: where
a job's status file lives, how the job finds its inherited lock, and the timestamps both write."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

LOCK_FD_ENV = "STABLE_SAM_JOB_LOCK_FD"  # the inherited descriptor of the project's job lock


def job_status_path(model_dir: Path, job_id: str) -> Path:
    """The status file of training job ``job_id`` under ``model_dir``."""
    return Path(model_dir) / "jobs" / f"{job_id}.json"


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second (the job files' timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
