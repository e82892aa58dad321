"""The offline pre-annotation job on a Ray cluster: shards of the work list on a pool of Ray actors.

The driver (the process that runs ``scripts/preannotate.py``) owns the work list, the journal and
the output, exactly as the single-machine job does (``offline``): same journal file, same run key,
so either path resumes the other's run. What is missing is cut into shards of ``shard_size`` items
in input order and dispatched to actors, one per GPU (else one per ``cpus_per_worker`` CPUs). Each
actor loads the model once and runs the single-machine ``ImagePipeline`` on its shard (the next
images are read and encoded while the decoder works on this one), writes the shard's PNG masks, and
returns the shard's records; the driver appends them to the journal and, at the end, merges
everything with ``build_coco`` in input order: the same bytes as the single-machine job.

Faults: an actor that dies (killed, out of memory, its node lost) is restarted by Ray
(``max_restarts``); the shards it held fail on the driver with ``RayActorError`` and are queued
again. A shard's records reach the journal only when the whole shard came back, and each shard
comes back once, so no image is recorded twice; a shard whose worker died ``max_attempts`` times
while running it is reported as failed (a rerun tries it again). The driver dying loses at most the shards in flight:
a restart with the same arguments does only what the journal lacks.

Why actors and not Ray Data's ``map_batches``: with an actor pool holding every CPU of a small
cluster, Ray Data's streaming executor kept the read stage waiting for a CPU forever (on a 2-CPU
cluster, ``ActorPoolStrategy(size=2)`` never made progress); the resume and exactly-once rules
also need the driver to see whole shards, which plain actors give directly. Reading stays
pipelined ahead of the encoder inside each actor, by the same stages the single-machine job uses.

The Label Studio mode on Ray (``backend.project_preannotation_ray``) uses the same pieces: ``start_workers``,
``ShardPool``, ``RayStats``.

Ray is imported only here, and only when a function of this module runs: the single-machine path
never loads it. That is why the module is over 400 lines: splitting it would spread the one place
that touches Ray (connection, workers, the shard pool, the driver) over several.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, Callable, Deque, Dict, Generic, Iterable, Iterator, List, Optional, Sequence, Set, Tuple,
                    TypeVar)

from tqdm import tqdm

from ..checkpoint import atomic_write_json
from ..model import StableSam
from ..settings import REPO_ROOT
from .automatic import AutoConfig
from .items import DEFAULT_LABEL, InputError, WorkItem, WorkList
from .journal import Journal
from .offline import (ImagePipeline, OfflineSummary, journal_path, output_info, prepare_work, run_key)
from .output import build_coco

log = logging.getLogger(__name__)

# Ray actor names: worker i is ``ACTOR_NAME.format(i)`` in the driver's namespace (tests and
# operators find a worker by it, e.g. ``ray.get_actor(ACTOR_NAME.format(0))``).
ACTOR_NAME = "stable-sam-preannotate-{}"
IN_FLIGHT = 2  # shards queued per actor: the next shard is there when one ends (no driver round trip)
GCS_PORT, CLIENT_PORT = 6379, 10001  # Ray's default ports for "host" and "ray://host"

T = TypeVar("T")
ModelFactory = Callable[..., StableSam]  # called as factory(device="cpu" | "cuda") in each worker


class RayUnavailable(InputError):
    """Ray is not installed, the cluster cannot be reached, or it cannot run the workers asked for."""


def import_ray():
    """The ``ray`` module; ``RayUnavailable`` saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray-address needs Ray: pip install -r requirements-ray.txt") from None
    return ray


def _check_reachable(address: str, timeout_s: float) -> None:
    """A TCP connect to the cluster's port first: ``ray.init`` retries an unreachable address for
    minutes before it fails."""
    if address == "auto":  # found through the local node's files; ray.init fails at once without one
        return
    client = address.startswith("ray://")
    hostport = address[len("ray://"):] if client else address
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    try:
        socket.create_connection((host, int(port or (CLIENT_PORT if client else GCS_PORT))), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {e}") from None


def connect(address: str, timeout_s: float = 10.0) -> float:
    """Connect this process to the Ray cluster at ``address`` (``auto``, ``host:port``,
    ``ray://host:port``; ``local``: start a cluster of this machine's CPUs / GPUs here). Returns
    the seconds it took; a process already connected stays on its cluster. Raises
    ``RayUnavailable`` with the reason."""
    ray = import_ray()
    if ray.is_initialized():
        return 0.0
    start = time.perf_counter()
    try:
        if address == "local":
            ray.init(include_dashboard=False)
        else:
            _check_reachable(address, timeout_s)
            ray.init(address=address)
    except RayUnavailable:
        raise
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        raise RayUnavailable(f"cannot connect to the Ray cluster at {address}: {e}") from None
    return time.perf_counter() - start


@dataclass
class ShardResult:
    """What a worker sends back for one shard: ``records`` of the images done, ``failed``
    (image id, reason) of the others, its stages' busy seconds."""

    records: List[Dict[str, Any]]
    failed: List[Tuple[int, str]]
    stage_s: Dict[str, float]


class ShardWorker:
    """One Ray actor (``ray.remote`` is applied when the job starts, so this module needs no Ray
    to import): the model, loaded once per process; ``run`` pre-annotates a shard."""

    def __init__(self, index: int, factory: ModelFactory, device: str, threads: int, auto: Optional[AutoConfig],
                 auto_category: int, png_dir: Optional[Path], read_ahead: int, encode_ahead: Optional[bool],
                 min_region_px: int = 0) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.index = index
        self.model = factory(device=device)
        self.options = dict(auto=auto, auto_category=auto_category, png_dir=png_dir, read_ahead=read_ahead,
                            encode_ahead=encode_ahead, min_region_px=min_region_px)

    def describe(self) -> Dict[str, Any]:
        """Ready (the model is loaded): its version, device and where it runs."""
        return {"worker": self.index, "version": self.model.version, "device": str(self.model.device),
                "host": socket.gethostname(), "pid": os.getpid()}

    def run(self, shard: Sequence[WorkItem]) -> ShardResult:
        """Pre-annotate ``shard`` on this worker: its records, the images that failed (id, reason)
        and the seconds per stage."""
        pipeline = ImagePipeline(self.model, shard, **self.options)
        records: List[Dict[str, Any]] = []
        failed: List[Tuple[int, str]] = []
        try:
            for item, record, error in pipeline:
                if record is not None:
                    records.append(record)
                else:
                    failed.append((item.image_id, error or ""))
        finally:
            pipeline.close()
        return ShardResult(records, failed, pipeline.stage_s)


@dataclass(kw_only=True)  # keyword-only: it mixes into summaries whose own fields come first
class RayStats:
    """The cluster's part of a run's summary: ``startup_s``: starting the workers and loading their
    models; ``retried_shards``: shards sent again after their worker died; ``lost_workers``:
    workers that died for good; ``by_worker``: images / tasks each worker did."""

    workers: int = 0
    shard_size: int = 0
    device: str = ""
    startup_s: float = 0.0
    retried_shards: int = 0
    lost_workers: int = 0
    by_worker: Dict[int, int] = field(default_factory=dict)

    def ray_json(self) -> Dict[str, Any]:
        """The cluster's part of the summary as JSON."""
        return {"workers": self.workers, "shard_size": self.shard_size, "device": self.device,
                "startup_s": round(self.startup_s, 3), "retried_shards": self.retried_shards,
                "lost_workers": self.lost_workers, "by_worker": {str(k): v for k, v in sorted(self.by_worker.items())}}


@dataclass
class RaySummary(OfflineSummary, RayStats):
    """``OfflineSummary`` plus the cluster's part (``RayStats``). ``seconds`` runs from the first
    shard sent (every worker's model loaded) to the output written."""

    model_version: str = ""

    def to_json(self) -> Dict[str, Any]:
        """The summary as printed by ``--json``: the single-machine fields, the model version, ``ray``."""
        return dict(super().to_json(), model_version=self.model_version, ray=self.ray_json())


def _last_line(e: BaseException) -> str:
    """The cause of a Ray error in one line (Ray's text ends with the remote traceback's last line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else e.__class__.__name__


def plan_workers(ray, workers: Optional[int], cpus_per_worker: float, use_gpu: Optional[bool]) -> Tuple[int, bool]:
    """(number of workers, on GPUs?): one per GPU of the cluster, else one per ``cpus_per_worker``
    CPUs; refused when the cluster cannot hold that many at once (they would wait forever)."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu and gpus == 0:
        raise RayUnavailable("GPU workers asked for, but the Ray cluster has no GPU")
    if workers is None:
        workers = gpus if use_gpu else int(cpus // cpus_per_worker)
    if workers < 1 or workers * cpus_per_worker > cpus or (use_gpu and workers > gpus):
        raise RayUnavailable(f"{workers} worker(s) of {cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''} each "
                             f"do not fit the Ray cluster ({cpus:g} CPUs, {gpus} GPUs)")
    return workers, use_gpu


def start_workers(ray, cls: type, args_of: Callable[[int], Tuple[Any, ...]], workers: int, cpus_per_worker: float,
                  use_gpu: bool, max_restarts: int) -> Tuple[List[Any], List[Dict[str, Any]]]:
    """``workers`` Ray actors of ``cls`` (``cls(*args_of(i))``), named ``ACTOR_NAME``, restarted by
    Ray up to ``max_restarts`` times; returns them once every one answered ``describe()`` (its
    model loaded), and what they answered. Raises ``RayUnavailable`` with the cause when one
    cannot start (the actors are stopped then)."""
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    options = dict(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=max_restarts,
                   # the workers import this package from where the driver has it
                   runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    remote_cls = ray.remote(cls)
    actors: List[Any] = []
    try:
        for i in range(workers):
            actors.append(remote_cls.options(name=ACTOR_NAME.format(i), **options).remote(*args_of(i)))
    except ray.exceptions.ActorAlreadyExistsError as e:  # another job's workers hold the names
        stop_workers(ray, actors)
        raise RayUnavailable(f"another pre-annotation job is running on this Ray cluster (its worker "
                             f"{ACTOR_NAME.format(len(actors))!r} exists): wait for it, or stop it ({_last_line(e)})"
                             ) from None
    try:
        described = ray.get([a.describe.remote() for a in actors])
    except ray.exceptions.RayError as e:
        stop_workers(ray, actors)
        raise RayUnavailable(f"the Ray workers could not load the model: {_last_line(e)}") from None
    if len({d["version"] for d in described}) != 1:
        stop_workers(ray, actors)
        raise RayUnavailable(f"the Ray workers loaded different models {sorted({d['version'] for d in described})}: "
                             f"every node needs the same checkpoints")
    return actors, described


def stop_workers(ray, actors: Sequence[Any]) -> None:
    """Kill the actors for good: the cluster's CPUs / GPUs go back at once, whatever happened."""
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception as e:  # e.g. the connection to the cluster is gone: its actors go with it
            log.warning("could not stop a Ray worker: %s", e)


class ShardPool(Generic[T]):
    """Shards over Ray actors, ``IN_FLIGHT`` shards deep per actor, each shard ``actor.run(shard)``.
    ``run`` yields ``(worker, shard, result, None)`` for every shard that came back and
    ``(worker, shard, None, reason)`` for one given up: its worker's code raised, its worker died
    ``max_attempts`` times while running it, or no worker is left. A shard whose worker died
    (``RayActorError``: killed, out of memory, node lost) goes back to the front of the queue; only
    the shard the worker was running counts the death (the ones queued behind it are innocent), so
    a poison image ends its own shard, not its neighbours'. Which one that was can be unclear (a
    finished shard's answer can be lost with its worker), so every shard that was in flight at a
    death is a suspect from then on and runs alone on its worker: its next death blames it for
    sure, and an innocent one comes back fine. The worker gets a cheap ``describe()``
    call that tells restarted (it answers, and gets shards again) from dead for good (dropped).
    Every shard is yielded exactly once. ``shards`` is read lazily, a shard when a worker has room
    (so a driver can list its work while the workers run); an error it raises ends ``run``."""

    def __init__(self, ray, actors: Sequence[Any], max_attempts: int = 3) -> None:
        self.ray, self.actors, self.max_attempts = ray, list(actors), max_attempts
        self.retried = 0  # shards sent again after their worker died
        self.lost_workers = 0  # workers dead for good

    def run(self, shards: Iterable[List[T]]) -> Iterator[Tuple[int, List[T], Any, Optional[str]]]:
        """Every shard of ``shards`` once, as it comes back: ``(worker, shard, result, None)``, or
        ``(worker, shard, None, reason)`` for one given up (worker -1: no worker was left)."""
        from ray.exceptions import RayError, RayTaskError

        state: _PoolState[T] = _PoolState(self.ray, self.actors, shards)
        while state.refill() or any(state.in_flight):  # a probe alone does not keep the job waiting
            state.send()
            if not state.pending:  # shards left, no worker left
                while state.refill():
                    yield -1, state.queue.popleft()[0], None, "no Ray worker left (all died): rerun to continue"
                return
            (ref,), _ = self.ray.wait(list(state.pending), num_returns=1)
            w, sent = state.pending.pop(ref)
            if sent is None:  # a probe: the worker is back, dead for good, or still restarting
                self.lost_workers += state.probe_answered(w, ref)
                continue
            try:
                result = self.ray.get(ref)
            except RayTaskError as e:  # the worker's code raised: a bug, not a death; not retried
                state.done(w, ref)
                yield w, sent[0], None, f"Ray worker {w}: {_last_line(e)}"
                continue
            except RayError as e:  # the worker died (or its node)
                reason = state.died(w, ref, sent, e, self.max_attempts)
                if reason is None:
                    self.retried += 1
                else:
                    yield w, sent[0], None, reason
                continue
            state.done(w, ref)
            yield w, sent[0], result, None


# a shard in the queue: (shard, deaths so far, suspect: in flight at a death)
_Queued = Tuple[List[T], int, bool]


class _PoolState(Generic[T]):
    """The bookkeeping of one ``ShardPool.run``: the shards waiting (retried ones first, then fresh
    ones, read lazily), the calls in flight per worker, and what is known of each worker's deaths."""

    def __init__(self, ray, actors: List[Any], shards: Iterable[List[T]]) -> None:
        self.ray, self.actors = ray, actors
        self.fresh = iter(shards)
        self.exhausted = False
        self.queue: Deque[_Queued] = deque()
        self.pending: Dict[Any, Tuple[int, Optional[_Queued]]] = {}  # ref -> (worker, shard | None: probe)
        self.in_flight: List[List[Any]] = [[] for _ in actors]  # refs per worker, in the order it runs them
        self.blamed: Dict[int, Any] = {}  # a worker that died -> the ref it was running then; no shards meanwhile
        self.back: Set[int] = set()  # workers that died and answered their probe (restarted)
        self.retired: Set[int] = set()  # dead for good
        self.alone: Set[int] = set()  # workers running a suspect, which get nothing else meanwhile

    def refill(self) -> bool:
        """Whether a shard waits to be sent; reads the next fresh one when none does."""
        if not self.queue and not self.exhausted:
            shard = next(self.fresh, None)
            if shard is None:
                self.exhausted = True
            else:
                self.queue.append((shard, 0, False))
        return bool(self.queue)

    def send(self) -> None:
        """Fill every live worker up to ``IN_FLIGHT`` shards; a suspect goes only to an idle worker,
        which then gets nothing else until it is back."""
        for w in range(len(self.actors)):
            while (w not in self.blamed and w not in self.retired and w not in self.alone
                   and len(self.in_flight[w]) < IN_FLIGHT and self.refill()
                   and not (self.queue[0][2] and self.in_flight[w])):
                shard = self.queue.popleft()
                ref = self.actors[w].run.remote(shard[0])
                self.pending[ref] = (w, shard)
                self.in_flight[w].append(ref)
                if shard[2]:
                    self.alone.add(w)

    def probe(self, w: int) -> None:
        """Ask worker ``w`` a cheap ``describe()``: its answer tells restarted from dead for good."""
        self.pending[self.actors[w].describe.remote()] = (w, None)

    def probe_answered(self, w: int, ref: Any) -> int:
        """Worker ``w``'s probe came back: back (shards again once its old ones are accounted for),
        dead for good (1 returned: one worker lost), or still restarting (probed again)."""
        from ray.exceptions import ActorDiedError, RayError

        try:
            self.ray.get(ref)
        except ActorDiedError as e:
            self.retired.add(w)
            log.warning("Ray worker %d is gone: %s", w, _last_line(e))
            return 1
        except RayError:
            self.probe(w)
        else:
            self.back.add(w)
            if not self.in_flight[w]:
                self.back.discard(w)
                del self.blamed[w]
        return 0

    def running(self, refs: List[Any]) -> Any:
        """The shard a dead worker was running: it runs them in the order sent, so the oldest of
        its shards that did not come back fine (results may wait unread in ``pending``)."""
        from ray.exceptions import RayError

        for r in refs:
            if not self.ray.wait([r], timeout=0)[0]:
                return r
            try:
                self.ray.get(r)
            except RayError:
                return r
        return refs[0]

    def done(self, w: int, ref: Any) -> None:
        """``ref`` of worker ``w`` is accounted for."""
        self.in_flight[w].remove(ref)
        if not self.in_flight[w]:
            self.alone.discard(w)
        if w in self.back and not self.in_flight[w]:  # restarted, and all it held before is accounted for
            self.back.discard(w)
            del self.blamed[w]

    def died(self, w: int, ref: Any, sent: _Queued, e: BaseException, max_attempts: int) -> Optional[str]:
        """Worker ``w`` died with ``sent`` in hand: the shard goes back to the front of the queue as a
        suspect (None returned), or, after ``max_attempts`` deaths while running it, is given up
        (the reason returned). Only the shard the worker was running counts the death."""
        if w not in self.blamed:  # the first news of this death
            self.blamed[w] = self.running(self.in_flight[w])
            self.probe(w)
        shard, deaths, _ = sent
        deaths += ref == self.blamed[w]
        self.done(w, ref)
        log.warning("Ray worker %d died with a shard of %d in hand: %s", w, len(shard), _last_line(e))
        if deaths >= max_attempts:
            return f"its Ray worker died {deaths} times running this shard (out of memory?): rerun to retry"
        self.queue.appendleft((shard, deaths, True))
        return None


def _todo(work: WorkList, journal: Journal, limit: Optional[int]) -> List[WorkItem]:
    """The work items the journal does not hold yet (at most ``limit``), their paths absolute:
    the workers may run elsewhere."""
    todo = [dataclasses.replace(it, path=Path(it.path).absolute())
            for it in work.items if it.image_id not in journal.records]
    return todo if limit is None else todo[:max(limit, 0)]


def _record_shard(summary: RaySummary, journal: Journal, failed: Dict[int, str], worker: int,
                  shard: List[WorkItem], result: Optional[ShardResult], reason: Optional[str]) -> None:
    """A shard came back (``result``) or was given up (``reason``): its records into the journal
    (flushed line by line: a killed driver keeps them), its failures into ``failed`` (image id ->
    reason), its counts and stage times into ``summary``."""
    if result is None:
        failed.update((it.image_id, reason or "") for it in shard)
        return
    for record in result.records:
        journal.append(record)
    failed.update(result.failed)
    for k, v in result.stage_s.items():
        summary.stage_s[k] = summary.stage_s.get(k, 0.0) + v
    summary.processed += len(result.records)
    summary.by_worker[worker] = summary.by_worker.get(worker, 0) + len(result.records)


def run_offline_ray(model_factory: ModelFactory, work: WorkList, output: Path, png_dir: Optional[Path] = None,
                    auto: Optional[AutoConfig] = None, auto_label: str = DEFAULT_LABEL, limit: Optional[int] = None,
                    fresh: bool = False, workers: Optional[int] = None, shard_size: int = 16,
                    cpus_per_worker: float = 1.0, use_gpu: Optional[bool] = None, threads: int = 0,
                    read_ahead: int = 4, encode_ahead: Optional[bool] = None, max_attempts: int = 3,
                    progress: bool = True, min_region_px: int = 0) -> RaySummary:
    """``run_offline`` on the Ray cluster this process is connected to (``connect``): the same
    output, byte for byte, and the same journal. ``model_factory(device=...)`` builds the model in
    each worker (picklable, e.g. ``functools.partial(build_from_settings, settings)``); ``workers``:
    default one per GPU, else one per ``cpus_per_worker`` CPUs; ``use_gpu``: default when the
    cluster has GPUs; ``threads``: torch threads per CPU worker (default ``cpus_per_worker``);
    ``max_attempts``: a shard is given up (reported failed) after its worker died that often;
    ``min_region_px``: as ``run_offline``'s.
    The code and the image folder must be at the same paths on every node (PNG masks are written
    by the workers)."""
    ray = import_ray()
    if not ray.is_initialized():
        raise RayUnavailable("not connected to a Ray cluster (stable_sam.preannotation.ray_job.connect)")
    if shard_size < 1 or max_attempts < 1:
        raise InputError(f"shard size and attempts must be >= 1, got {shard_size}, {max_attempts}")
    output = Path(output)
    png_dir = Path(png_dir).absolute() if png_dir is not None else None  # workers may run elsewhere
    workers, use_gpu = plan_workers(ray, workers, cpus_per_worker, use_gpu)
    work, auto_category = prepare_work(work, auto, auto_label)
    device = "cuda" if use_gpu else "cpu"
    cpu_threads = 0 if use_gpu else threads or max(1, int(cpus_per_worker))

    start = time.perf_counter()
    actors, described = start_workers(
        ray, ShardWorker, lambda i: (i, model_factory, device, cpu_threads, auto, auto_category, png_dir, read_ahead,
                                     encode_ahead, min_region_px), workers, cpus_per_worker, use_gpu,
        max_restarts=max_attempts)
    try:
        version = described[0]["version"]
        summary = RaySummary(output, len(work.items), 0, 0, 0, 0.0, model_version=version, workers=workers,
                             shard_size=shard_size, device=device, startup_s=time.perf_counter() - start)
        log.info("%d Ray worker(s) ready in %.1f s: %s", workers, summary.startup_s, described)
        journal = Journal(journal_path(output), run_key(version, work, auto, png_dir, min_region_px), fresh=fresh)
        summary.already_done = sum(1 for it in work.items if it.image_id in journal.records)
        todo = _todo(work, journal, limit)
        pool: ShardPool[WorkItem] = ShardPool(ray, actors, max_attempts)
        failed: Dict[int, str] = {}
        run_start = time.perf_counter()
        try:
            with tqdm(total=len(todo), unit="img", desc=f"pre-annotating on {workers} Ray worker(s)",
                      disable=not progress, smoothing=0.1) as bar:
                for w, shard, result, reason in pool.run([todo[i:i + shard_size]
                                                          for i in range(0, len(todo), shard_size)]):
                    _record_shard(summary, journal, failed, w, shard, result, reason)
                    bar.update(len(shard))
                    bar.set_postfix(failed=len(failed), retried=pool.retried, refresh=False)
        finally:
            journal.close()
            summary.retried_shards, summary.lost_workers = pool.retried, pool.lost_workers
        coco = build_coco(work, journal.records, output_info(version, auto, min_region_px))
        atomic_write_json(coco, output, compact=True)
    finally:
        stop_workers(ray, actors)
    summary.seconds = time.perf_counter() - run_start
    summary.objects = len(coco["annotations"])
    summary.failed = [(it.file_name, failed[it.image_id]) for it in work.items if it.image_id in failed]
    return summary
