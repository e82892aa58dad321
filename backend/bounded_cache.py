"""A small thread-safe LRU cache bounded in entries and in bytes (label configs, plugins).

Not ``cachetools.LRUCache``: it bounds one measure (``maxsize`` of summed ``getsizeof``), not a
count and a byte budget together, raises for an entry over the budget instead of passing it on
uncached, and has no lock of its own; the wrapper that would add those is as long as this class.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Optional, Tuple, TypeVar

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """Least recently used first out, past ``max_items`` entries or ``max_bytes`` in all. An entry
    bigger than the whole budget is not kept (the caller still gets its value)."""

    def __init__(self, max_items: int, max_bytes: float) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: "OrderedDict[Hashable, Tuple[V, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, valid: Optional[Callable[[V], bool]] = None) -> Optional[V]:
        """The value for ``key`` (None if absent, or if ``valid(value)`` says it is stale)."""
        with self._lock:
            item = self._items.get(key)
            if item is None or (valid is not None and not valid(item[0])):
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        """Store ``value`` (``nbytes`` large) as the newest entry, evicting the oldest past the bounds
        (a value over the byte bound alone is not stored)."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if self.max_items <= 0 or nbytes > self.max_bytes:
                return
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get_or_put(self, key: Hashable, make: Callable[[], Tuple[V, int]]) -> V:
        """The cached value, else ``make()`` -> (value, bytes), kept. ``make`` runs outside the
        lock: two threads may both make it, and the second one's is kept."""
        hit = self.get(key)
        if hit is not None:
            return hit
        value, nbytes = make()
        self.put(key, value, nbytes)
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        """The bytes held now."""
        with self._lock:
            return self._bytes
