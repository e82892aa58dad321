"""A pipeline stage that runs ahead of its consumer in a background thread.

``ReadAhead(items, fn, depth)`` calls ``fn`` on each item in a thread of its own, at most ``depth``
results ahead of whoever iterates it, and hands ``(item, result, error)`` over in item order.
Stages chain (a stage's items can be another stage), so a job reads image N+2 from disk while the
encoder works on image N+1 and the decoder on image N. Torch and PIL release the GIL in their
heavy parts, so the stages overlap for real.

A failure of ``fn`` on one item is handed over as that item's ``error`` and the stage goes on with
the next item (a job reports bad images at the end); a failure of the item source itself (e.g. a
server that stops answering) is raised in the consumer.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Generic, Iterable, Iterator, Optional, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


class _SourceFailed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReadAhead(Generic[T, R]):
    """``fn`` over ``items`` in a background thread, ``depth`` ahead; ``depth=0`` runs inline
    (no thread: the serial baseline). ``busy_s``: seconds spent in ``fn``; ``waited_s``: seconds the
    consumer spent waiting for a result (0 when the stage is always ahead)."""

    def __init__(self, items: Iterable[T], fn: Callable[[T], R], depth: int = 4, name: str = "read-ahead") -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.items, self.fn, self.depth, self.name = items, fn, depth, name
        self.busy_s = 0.0
        self.waited_s = 0.0
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _call(self, item: T) -> Tuple[T, Optional[R], Optional[BaseException]]:
        t = time.perf_counter()
        try:
            return item, self.fn(item), None
        except Exception as e:  # handed to the consumer with its item
            return item, None, e
        finally:
            self.busy_s += time.perf_counter() - t

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self.items:
                if self._stop.is_set() or not self._put(self._call(item)):
                    return
            self._put(_END)
        except BaseException as e:  # the item source failed: the consumer raises it
            self._put(_SourceFailed(e))

    def __iter__(self) -> Iterator[Tuple[T, Optional[R], Optional[BaseException]]]:
        if self.depth == 0:
            for item in self.items:
                yield self._call(item)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        while True:
            t = time.perf_counter()
            try:
                value = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():  # closed (e.g. by a downstream stage): nothing more comes
                    return
                continue
            finally:
                self.waited_s += time.perf_counter() - t
            if value is _END:
                return
            if isinstance(value, _SourceFailed):
                raise value.error
            yield value

    def close(self) -> None:
        """Stop the thread (it finishes the item in hand) and drop what it read ahead."""
        self._stop.set()
        if isinstance(self.items, ReadAhead):
            self.items.close()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> "ReadAhead[T, R]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
