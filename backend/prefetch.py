"""Background work that must never hold up a request: a bounded queue and one worker thread.

When an annotator opens a task, Label Studio calls /predict for it with no context (the task has
no prompts yet). The backend answers at once with no prediction and hands the task's image to
this queue, so the image is fetched, decoded and encoded (into the same image and embedding
caches a click uses) while the annotator looks at it: the first click then costs a decoder pass.

The queue is bounded (PREFETCH_QUEUE); a full queue drops the new job (counted) instead of
blocking or growing, and a key already waiting is not queued twice. One worker thread: the
encoder is the expensive part and more threads would only compete with the clicks for the CPU/GPU.
At exit the worker finishes the job in hand, drops the queued ones and ends (``backend/background.py``:
a thread left inside torch at interpreter exit aborts the process).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Hashable, Optional, Set, Tuple

from . import background
from .errors import short_repr
from .prometheus_metrics import Metrics

log = logging.getLogger(__name__)

_STOP = object()  # queued by ``stop``: the worker ends when it takes it


class Prefetcher:
    """``submit(key, job)`` runs ``job()`` later in a worker thread, unless the queue is full."""

    def __init__(self, max_queued: int, metrics: Optional[Metrics] = None, name: str = "prefetch") -> None:
        self.max_queued = max_queued
        self.metrics = metrics
        self.name = name
        self._queue: "queue.Queue[Tuple[Hashable, Callable[[], object]]]" = queue.Queue(maxsize=max(max_queued, 1))
        self._waiting: Set[Hashable] = set()  # keys queued or running
        self._lock = threading.Lock()
        self._worker: Optional[threading.Thread] = None
        self._stopped = False

    @property
    def enabled(self) -> bool:
        """Whether prefetching is on (a queue bound above 0)."""
        return self.max_queued > 0

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.count(f"prefetch_{what}_total")

    def submit(self, key: Hashable, job: Callable[[], object]) -> bool:
        """Queue ``job`` under ``key``; False (and nothing queued) when off, full or already waiting.
        Never blocks."""
        if not self.enabled:
            return False
        with self._lock:
            if self._stopped:
                return False
            if key in self._waiting:
                self._count("duplicate")
                return False
            try:
                self._queue.put_nowait((key, job))
            except queue.Full:
                self._count("dropped")
                return False
            self._waiting.add(key)
            if self._worker is None or not self._worker.is_alive():
                self._worker = background.start(self._run, self.name, stop=self.stop)
        self._count("queued")
        return True

    def pending(self) -> int:
        """Images queued, not yet started."""
        with self._lock:
            return len(self._waiting)

    def stop(self) -> None:
        """Drop the queued jobs and end the worker after the job in hand; later submits are refused.
        Does not wait (``background.stop_all`` joins the worker)."""
        with self._lock:
            self._stopped = True
            while True:
                try:
                    key, _ = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._waiting.discard(key)
                self._queue.task_done()
            if self._worker is not None:
                self._queue.put_nowait((None, _STOP))  # room: just emptied, and submit is refused now

    def _run(self) -> None:
        while True:
            key, job = self._queue.get()
            if job is _STOP:
                self._queue.task_done()
                return
            try:
                job()
                self._count("done")
            except Exception as e:  # a bad image is the click's problem to report, not ours
                self._count("failed")
                log.info("prefetch %s failed: %s: %s", short_repr(key, 200), e.__class__.__name__, short_repr(str(e), 300))
            finally:
                with self._lock:
                    self._waiting.discard(key)
                self._queue.task_done()
