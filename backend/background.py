"""The backend's background threads, stopped and joined before the interpreter finalizes.

Why: a daemon thread that is still inside torch when Python finalizes is ended by Python 3.11
with ``pthread_exit`` as soon as it next takes the GIL (e.g. while torch frees a tensor). That
unwinds through torch's ``noexcept`` C++ frames, so ``std::terminate`` aborts the whole process:
``terminate called without an active exception``, exit code 134. It happened when a process (a
script, a gunicorn worker on SIGTERM) exited while a task's image was still being encoded by the
prefetch, or while the model version was being read from the checkpoint files.

So every thread the backend starts for itself is started here (``start``), and one ``atexit``
hook asks their owners to stop (``stop``: e.g. the prefetch drops what is still queued) and joins
them: what a thread has in hand (one model load, one encode) finishes, nothing new starts. atexit
hooks run before finalization, after ``threading`` has joined the non-daemon threads. The threads
stay daemon threads on purpose: ``threading`` joins non-daemon ones *before* any atexit hook, so a
worker that waits on its queue for ever would never be told to stop and the exit would hang.

Not started here: a training job's reaper thread (``backend/jobs.py``: it only waits for the job
process, which outlives the server by design, and runs no torch) and a download's deadline timer
(cancelled when the download ends; no torch either).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Callable, List, Optional

log = logging.getLogger(__name__)

_lock = threading.Lock()
# thread -> its owner's stop request (or None); weak: a finished thread is forgotten with its owner
_threads: "weakref.WeakKeyDictionary[threading.Thread, Optional[Callable[[], None]]]" = weakref.WeakKeyDictionary()
_hooked = False


def start(target: Callable[[], object], name: str, stop: Optional[Callable[[], None]] = None) -> threading.Thread:
    """Start ``target`` in a daemon thread that is stopped (``stop()``, when given) and joined at
    exit. ``stop`` must make ``target`` return soon, without waiting for it."""
    global _hooked
    thread = threading.Thread(target=target, name=name, daemon=True)
    with _lock:
        if not _hooked:
            atexit.register(stop_all)
            _hooked = True
        _threads[thread] = stop
    thread.start()
    return thread


def running() -> List[threading.Thread]:
    """The threads started here that are still alive."""
    with _lock:
        return [t for t in list(_threads.keys()) if t.is_alive()]


def stop_all(timeout: Optional[float] = None) -> List[threading.Thread]:
    """Ask every running thread's owner to stop, then join the threads (``timeout`` each; None:
    as long as the work in hand takes). Returns the threads still alive (none without a timeout)."""
    with _lock:
        items = [(t, s) for t, s in list(_threads.items()) if t.is_alive()]
    if items:
        log.info("stopping background threads: %s", ", ".join(sorted({t.name for t, _ in items})))
    for _, stop in items:
        if stop is not None:
            stop()
    me = threading.current_thread()
    for thread, _ in items:
        if thread is not me:
            thread.join(timeout)
    return [t for t, _ in items if t.is_alive()]
