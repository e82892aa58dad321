"""The Label Studio pre-annotation job on a Ray cluster: the project's tasks in shards on Ray workers.

The driver (the process that runs ``scripts/preannotate.py label-studio --ray-address ...``) reads
the project's label config, starts the workers, then lists the tasks page by page, skips those that
already have a prediction of the served model version (or have no prompt), and hands the others
in shards of ``shard_size`` tasks to ``ShardPool`` (``stable_sam.preannotation.ray_job``), while it
goes on listing. Each worker holds the backend with its model (loaded once) and a Label Studio
client, and runs the single-machine job's own per-task work (``TaskAnnotator``: the next images are
downloaded and encoded in a background thread while the decoder works) on its shard: it predicts and
uploads the predictions itself, and returns the shard's counts and failures.

Exactly once: a worker that dies is restarted by Ray and its shards are sent again; a shard's first
attempt may have uploaded part of it, so a worker asks Label Studio, right before each upload,
whether the task already has a prediction of this version (``TaskAnnotator(recheck=True)``). A run
killed as a whole and restarted with the same arguments skips what was uploaded, as the
single-machine job does.

The workers need the Label Studio URL and key: they travel to the cluster in the workers' settings
(the offline Ray job sends none).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

from tqdm import tqdm

from stable_sam.builders import build_from_settings
from stable_sam.preannotation.automatic import AutoConfig
from stable_sam.preannotation.items import InputError
from stable_sam.preannotation.ray_job import (RayStats, RayUnavailable, ShardPool, import_ray, plan_workers,
                                              start_workers, stop_workers)

from .errors import BadInput
from .label_studio import connect
from .ml_backend import StableSamBackend
from .project_preannotation import SOURCES, LabelStudioSummary, TaskAnnotator, classify, list_tasks, project_config
from .server_settings import BackendSettings

log = logging.getLogger(__name__)

Task = Dict[str, Any]


class LabelStudioShardWorker:
    """One Ray actor (``ray.remote`` is applied when the job starts): a Label Studio client, the
    backend with its model, loaded once per process, and the project's ``TaskAnnotator``, which
    re-checks for a prediction of its version before each upload; ``run`` pre-annotates a shard."""

    def __init__(self, index: int, settings: BackendSettings, threads: int, project: int, source: str,
                 auto: Optional[AutoConfig], auto_label: Optional[str], dry_run: bool, read_ahead: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.index = index
        client = connect(settings.label_studio_url, settings.label_studio_api_key)
        backend = StableSamBackend(settings, model=build_from_settings(settings))
        self.annotator = TaskAnnotator(client, backend, project, source, auto, auto_label, dry_run, recheck=True,
                                       read_ahead=read_ahead)

    def describe(self) -> Dict[str, Any]:
        """Ready (model loaded, Label Studio answered): the version its predictions carry, and where."""
        return {"worker": self.index, "version": self.annotator.version, "device": str(self.annotator.model.device),
                "host": socket.gethostname(), "pid": os.getpid()}

    def run(self, shard: List[Task]) -> LabelStudioSummary:
        """Pre-annotate (and upload) ``shard`` on this worker; its summary."""
        summary = LabelStudioSummary(self.annotator.version)
        start = time.perf_counter()
        self.annotator.run(shard, summary)
        summary.seconds = time.perf_counter() - start
        return summary


@dataclass
class LabelStudioRaySummary(LabelStudioSummary, RayStats):
    """``LabelStudioSummary`` plus the cluster's part (``RayStats``; ``by_worker``: tasks each
    worker pre-annotated). ``seconds`` runs from the first shard sent (every worker ready) to the
    last one back."""

    def to_json(self) -> Dict[str, Any]:
        """The summary as printed by ``--json``, with the cluster's part (``ray``)."""
        return dict(super().to_json(), ray=self.ray_json())


def worker_settings(settings: BackendSettings, device: str) -> BackendSettings:
    """What the workers get: the model's and Label Studio's settings on ``device``; not the
    backend's own basic-auth password, which they do not need."""
    return dataclasses.replace(settings, device=device, basic_auth_user="", basic_auth_pass="")


def task_shards(client, project: int, view: Optional[int], version: str, source: str, auto: Optional[AutoConfig],
                limit: Optional[int], shard_size: int, summary: LabelStudioRaySummary) -> Iterator[List[Task]]:
    """The tasks to do, in shards of ``shard_size``, as the listing goes; those already done by
    ``version`` or without a prompt are counted in ``summary`` and skipped; ``limit`` tasks at most."""
    shard: List[Task] = []
    todo = 0
    for task in list_tasks(client, project, view):
        status = classify(task, version, SOURCES[source], auto).status
        if status == "done":
            summary.skipped_done += 1
            continue
        if status == "no-prompts":
            summary.no_prompts += 1
            continue
        if limit is not None and todo >= limit:
            break
        todo += 1
        shard.append(task)
        if len(shard) == shard_size:
            yield shard
            shard = []
    if shard:
        yield shard


def run_shards(pool: ShardPool[Task], shards: Iterator[List[Task]], summary: LabelStudioRaySummary, workers: int,
               progress: bool) -> None:
    """Send ``shards`` through ``pool`` and add what comes back to ``summary`` (a shard given up:
    each of its tasks failed with the reason), with a progress bar; ``summary.seconds`` and the
    pool's retries and lost workers are set even when it stops early."""
    run_start = time.perf_counter()
    try:
        with tqdm(unit="img", desc=f"pre-annotating on {workers} Ray worker(s)", disable=not progress) as bar:
            for w, shard, result, reason in pool.run(shards):
                if result is None:  # given up: each of its tasks is reported with the reason
                    summary.processed += len(shard)
                    summary.failed.extend((task.get("id"), reason or "") for task in shard)
                else:
                    summary.add(result)
                    summary.by_worker[w] = summary.by_worker.get(w, 0) + result.processed
                bar.update(len(shard))
                bar.set_postfix(skipped=summary.skipped_done, failed=len(summary.failed),
                                retried=pool.retried, refresh=False)
    finally:
        summary.seconds = time.perf_counter() - run_start
        summary.retried_shards, summary.lost_workers = pool.retried, pool.lost_workers


def run_label_studio_ray(client, settings: BackendSettings, project: int, view: Optional[int] = None,
                         source: str = "any", auto: Optional[AutoConfig] = None, auto_label: Optional[str] = None,
                         limit: Optional[int] = None, dry_run: bool = False, read_ahead: int = 4,
                         workers: Optional[int] = None, shard_size: int = 16, cpus_per_worker: float = 1.0,
                         use_gpu: Optional[bool] = None, threads: int = 0, max_attempts: int = 3,
                         progress: bool = True) -> LabelStudioRaySummary:
    """``run_label_studio`` on the Ray cluster this process is connected to (``ray_job.connect``):
    the same predictions, uploaded by the workers. ``client`` lists the tasks on the driver;
    ``settings`` (model, Label Studio URL and key, image fetching) go to every worker, which loads
    the model with them: the checkpoints and ``MODEL_DIR`` at the same paths on every node.
    ``workers`` / ``cpus_per_worker`` / ``use_gpu`` / ``threads`` / ``max_attempts`` as for
    ``run_offline_ray``. Raises ``LabelStudioUnavailable`` when the project cannot be read,
    ``RayUnavailable`` when the workers cannot start."""
    ray = import_ray()
    if not ray.is_initialized():
        raise RayUnavailable("not connected to a Ray cluster (stable_sam.preannotation.ray_job.connect)")
    if shard_size < 1 or max_attempts < 1:
        raise InputError(f"shard size and attempts must be >= 1, got {shard_size}, {max_attempts}")
    if source not in SOURCES:
        raise BadInput(f"source must be one of {sorted(SOURCES)}, got {source!r}")
    project_config(client, project, auto, auto_label)  # a missing project fails here, before any worker starts
    workers, use_gpu = plan_workers(ray, workers, cpus_per_worker, use_gpu)
    device = "cuda" if use_gpu else "cpu"
    cpu_threads = 0 if use_gpu else threads or max(1, int(cpus_per_worker))
    remote_settings = worker_settings(settings, device)

    start = time.perf_counter()
    actors, described = start_workers(
        ray, LabelStudioShardWorker, lambda i: (i, remote_settings, cpu_threads, project, source, auto, auto_label,
                                                dry_run, read_ahead), workers, cpus_per_worker, use_gpu,
        max_restarts=max_attempts)
    try:
        version = described[0]["version"]
        summary = LabelStudioRaySummary(version, workers=workers, shard_size=shard_size, device=device,
                                        startup_s=time.perf_counter() - start)
        log.info("%d Ray worker(s) ready in %.1f s: %s", workers, summary.startup_s, described)
        shards = task_shards(client, project, view, version, source, auto, limit, shard_size, summary)
        run_shards(ShardPool(ray, actors, max_attempts), shards, summary, workers, progress)
    finally:
        stop_workers(ray, actors)
    # shards come back in any order: failures in task order, as the single-machine job lists them
    summary.failed.sort(key=lambda f: f[0] if isinstance(f[0], int) else -1)
    return summary
