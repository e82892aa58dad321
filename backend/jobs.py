"""Training jobs as subprocesses: one per project at a time, visible, cancellable, crash-proof.

``JobManager.start(project)`` answers at once: it starts ``python -m backend.training_job`` (the
server's settings in its environment, output to ``MODEL_DIR/jobs/<job id>.log``) and returns the
job id. The job reports in ``MODEL_DIR/jobs/<job id>.json`` (``backend/training_job.py``). A job that
is killed or runs out of memory takes nothing else down, and leaves the previous version serving.

Several gunicorn workers agree through files under ``MODEL_DIR/jobs/`` with ``fcntl.flock``:

- ``project-N.lock``: held by the running job for its whole life. The server takes it, starts the
  job with the descriptor inherited and closes its own copy, so the lock is released when the job
  process ends, however it ends (exit, SIGKILL, OOM killer); a job that reported its end releases
  it at once (a Python process takes a while to exit). Its content is ``<job id> <pid>`` of the
  latest job. Held = a job of project N runs.
- ``project-N.ctl``: a short lock serialising start / check / count between server threads and
  workers, so that checking the job lock never makes a concurrent start see a phantom job.
- ``project-N.count``: the annotation counter for ``TRAIN_EVERY_N``, shared by all workers.
- ``<job id>.cancel``: written by ``cancel``; a job that dies after it is reported cancelled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from stable_sam.checkpoint import TEMP_SUFFIX, atomic_write_json
from stable_sam.plugin_store import project_scope

from .errors import BadInput, short_repr
from .job_files import LOCK_FD_ENV, job_status_path, utc_now
from .server_settings import BackendSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
JOB_ID = re.compile(r"^project-(\d{1,19})-\d{14}-[0-9a-f]{6}\Z", re.ASCII)  # ASCII: \d would take "٣"
CANCEL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
JOB_HISTORY = 50  # a project's newest jobs whose status and log files are kept
RUNNING = "running"


class JobNotFound(BadInput):
    """No such training job (404)."""
    def __init__(self, message: str) -> None:
        super().__init__(message, status=404)


class JobManager:
    """Starts, lists, checks and cancels the training jobs of every project."""

    def __init__(self, settings: BackendSettings,
                 command: Optional[Callable[[int, str], List[str]]] = None) -> None:
        self.settings = settings
        self.dir = Path(settings.model_dir) / "jobs"
        self.command = command or self.default_command

    @staticmethod
    def default_command(project: int, job_id: str) -> List[str]:
        """The training job's command line: ``python -m backend.training_job --project N --job-id ID``."""
        return [sys.executable, "-m", "backend.training_job", "--project", str(project), "--job-id", job_id]

    # -- files and locks ---------------------------------------------------------------------------
    def _path(self, project: int, suffix: str) -> Path:
        return self.dir / f"{project_scope(project)}{suffix}"

    @contextlib.contextmanager
    def _control(self, project: int) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self._path(project, ".ctl"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _lock_info(self, project: int) -> Tuple[Optional[str], Optional[int]]:
        """(job id, pid) of the project's latest job, from its lock file."""
        try:
            parts = self._path(project, ".lock").read_text().split()
        except FileNotFoundError:
            return None, None
        job_id = parts[0] if parts and JOB_ID.match(parts[0]) else None
        pid = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        return job_id, pid

    def _held(self, project: int) -> bool:
        """Whether a job of ``project`` runs (call under the control lock)."""
        path = self._path(project, ".lock")
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases our probe lock
        return False

    def running_job(self, project: int) -> Optional[str]:
        """The id of ``project``'s running job, None when none runs."""
        with self._control(project):
            return self._lock_info(project)[0] if self._held(project) else None

    # -- starting ----------------------------------------------------------------------------------
    def check_configured(self) -> None:
        """``BadInput`` naming what is missing when Label Studio's URL or API key is not set (a job
        reads the project through them)."""
        s = self.settings
        missing = [name for name, value in (("LABEL_STUDIO_URL", s.label_studio_url),
                                            ("LABEL_STUDIO_API_KEY", s.label_studio_api_key)) if not value]
        if missing:
            raise BadInput(f"training reads the project's labels from Label Studio: set {' and '.join(missing)} on "
                           f"the backend (the URL as the backend reaches Label Studio; a personal access token "
                           f"or a legacy token)", status=422)

    def start(self, project: int, trigger: str = "START_TRAINING") -> Dict[str, Any]:
        """Start a job for ``project`` unless one runs: ``{"status": "started" | "running", "job_id", ...}``."""
        self.check_configured()
        with self._control(project):
            return self._start_locked(project, trigger)

    def _start_locked(self, project: int, trigger: str) -> Dict[str, Any]:
        lock_path = self._path(project, ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                job_id, _ = self._lock_info(project)
                return {"status": "running", "job_id": job_id, "project": project,
                        "message": f"a training job of project {project} is running; see /train/status?project={project}"}
            started = datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S')
            job_id = f"{project_scope(project)}-{started}-{secrets.token_hex(3)}"
            status_path = job_status_path(self.settings.model_dir, job_id)
            log_path = status_path.with_suffix(".log")
            status = {"job_id": job_id, "project": project, "status": RUNNING, "phase": "starting",
                      "trigger": trigger, "started": utc_now(), "log": str(log_path)}
            atomic_write_json(status, status_path)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{job_id}\n".encode(), 0)
            env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1", LOCK_FD_ENV: str(fd)}
            try:
                with open(log_path, "ab") as out:
                    # the job inherits the locked descriptor: the lock lives exactly as long as it;
                    # its own session: a signal to the server's process group does not reach it
                    proc = subprocess.Popen(self.command(project, job_id), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, pass_fds=(fd,),
                                            start_new_session=True)
            except OSError as e:
                atomic_write_json({**status, "status": "failed", "phase": "failed", "finished": utc_now(),
                                   "error": f"cannot start the training process: {e}"}, status_path)
                raise BadInput(f"cannot start the training process: {e}", status=500) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{job_id} {proc.pid}\n".encode(), 0)
            threading.Thread(target=proc.wait, name=f"reap-{job_id}", daemon=True).start()  # no zombie
            log.info("training job %s started for project %s (pid %d, %s)", job_id, project, proc.pid, trigger)
            self._prune(project)
            return {"status": "started", "job_id": job_id, "job": job_id,  # "job": Label Studio records it
                    "project": project, "pid": proc.pid, "status_url": f"/train/status/{job_id}"}
        finally:
            os.close(fd)

    def _prune(self, project: int) -> None:
        """Delete the status, log and cancel files of the project's jobs beyond the newest
        JOB_HISTORY (job ids sort by start time). Only finished jobs are that old: one runs at a time."""
        ids = sorted({p.name.split(".")[0] for p in self.dir.glob(f"{project_scope(project)}-*.*")
                      if JOB_ID.match(p.name.split(".")[0])})
        for old in ids[:-JOB_HISTORY]:
            for suffix in (".json", ".log", ".cancel"):
                (self.dir / f"{old}{suffix}").unlink(missing_ok=True)

    def count_annotation(self, project: int) -> Dict[str, Any]:
        """TRAIN_EVERY_N: count an ANNOTATION_CREATED / _UPDATED; the Nth starts a job (when none
        runs; otherwise the count goes on and the next event after the job starts one)."""
        n = self.settings.train_every_n
        if n <= 0:
            return {"status": "ignored", "reason": "TRAIN_EVERY_N is 0: training starts on START_TRAINING only"}
        try:
            self.check_configured()
        except BadInput as e:  # say why at once; a count that could never start a job is pointless
            return {"status": "ignored", "reason": e.message}
        path = self._path(project, ".count")
        with self._control(project):
            try:
                count = int(json.loads(path.read_text()).get("count", 0)) + 1
            except (FileNotFoundError, ValueError, AttributeError):
                count = 1
            out: Dict[str, Any] = {"status": "counted", "project": project, "count": count, "every": n}
            if count >= n:
                if self._held(project):
                    out["running"] = self._lock_info(project)[0]
                else:
                    out = {**self._start_locked(project, f"TRAIN_EVERY_N={n}"), "count": count, "every": n}
                    count = 0
            atomic_write_json({"count": count}, path)
        return out

    # -- status ------------------------------------------------------------------------------------
    def _read(self, job_id: str) -> Dict[str, Any]:
        path = job_status_path(self.settings.model_dir, job_id)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise JobNotFound(f"no training job {job_id}") from None
        except ValueError:
            return {"job_id": job_id, "status": "unknown", "error": f"status file {path} is unreadable"}

    def status(self, job_id: Optional[str] = None, project: Optional[int] = None) -> Dict[str, Any]:
        """A job's status (the project's latest when no job id), with ``running`` checked live."""
        if job_id is None:
            if project is None:
                raise BadInput("give a job id (/train/status/<job id>) or ?project=<id>")
            job_id, _ = self._lock_info(project)
            if job_id is None:
                return {"project": project, "status": "none", "message": f"no training job has run for project {project}"}
        m = JOB_ID.match(job_id) if isinstance(job_id, str) else None
        if not m:
            raise BadInput(f"{short_repr(job_id)} is not a training job id (project-<N>-<time>-<hex>)")
        project = int(m.group(1))
        with self._control(project):
            st = self._read(job_id)
            if st.get("status") == RUNNING:
                latest, _ = self._lock_info(project)
                held = self._held(project)
                if not (latest == job_id and held):
                    # a newer job of the project may be running and writing: its temporary files stay
                    st = self._ended_without_report(st, clean_temp=not held)
        return st

    def _ended_without_report(self, st: Dict[str, Any], clean_temp: bool) -> Dict[str, Any]:
        """A job whose process is gone but whose status still says running: killed (SIGKILL, OOM
        killer) or crashed. Record it, and (``clean_temp``: when no job of the project runs)
        remove what a killed atomic write may have left."""
        job_id = st["job_id"]
        cancelled = job_status_path(self.settings.model_dir, job_id).with_suffix(".cancel").exists()
        st = {**st, "status": "cancelled" if cancelled else "failed", "phase": "cancelled" if cancelled else "failed",
              "finished": utc_now(),
              "error": "cancelled: the job was killed before it wrote a new version" if cancelled else
              f"the training process ended without reporting (killed, or out of memory); the previous version "
              f"still serves; see {st.get('log')}"}
        if clean_temp and st.get("store_dir"):
            for p in Path(st["store_dir"]).glob(f".*{TEMP_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        atomic_write_json(st, job_status_path(self.settings.model_dir, job_id))
        log.warning("training job %s: %s", job_id, st["error"])
        return st

    def jobs(self, project: Optional[int] = None) -> List[Dict[str, Any]]:
        """Every job's status (of ``project``), oldest first."""
        if not self.dir.is_dir():
            return []
        pattern = f"{project_scope(project)}-*.json" if project is not None else "project-*.json"
        out = []
        for p in self.dir.glob(pattern):
            if JOB_ID.match(p.stem):
                with contextlib.suppress(JobNotFound):
                    out.append(self.status(p.stem))
        return sorted(out, key=lambda s: (str(s.get("started", "")), s.get("job_id", "")))

    # -- cancelling --------------------------------------------------------------------------------
    def cancel(self, job_id: Optional[str] = None, project: Optional[int] = None) -> Dict[str, Any]:
        """SIGTERM the job (it stops without writing a version), SIGKILL after CANCEL_GRACE_S."""
        st = self.status(job_id, project)
        if st.get("status") != RUNNING:
            return {**st, "message": f"job {st.get('job_id')} is not running ({st.get('status')})"}
        job_id = st["job_id"]
        project = int(JOB_ID.match(job_id).group(1))
        latest, pid = self._lock_info(project)
        pid = pid or st.get("pid")
        if latest != job_id or not pid or not _is_job_process(pid, job_id):
            raise BadInput(f"job {job_id}: its process cannot be identified safely; not killed", status=409)
        job_status_path(self.settings.model_dir, job_id).with_suffix(".cancel").write_text(utc_now())
        for sig, wait in ((signal.SIGTERM, CANCEL_GRACE_S), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.running_job(project) == job_id:
                time.sleep(0.05)
            if self.running_job(project) != job_id:
                break
        st = self.status(job_id)
        if st.get("status") == "done":
            st["message"] = "too late to cancel: the job had already written its new version"
        return st


def _is_job_process(pid: int, job_id: str) -> bool:
    """Whether ``pid`` is still the job (not a recycled pid): its command line names the job."""
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): the lock file named this pid for this job
        return True
