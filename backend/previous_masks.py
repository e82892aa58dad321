"""The previous mask of an object being corrected, so the next click refines it (SAM's own loop).

While a suggestion is pending, Label Studio sends every click on the object again, plus the new
one: ``[p1]``, then ``[p1, p2]``, then ``[p1, p2, p3]``. SAM's interactive loop feeds the low-res
logits predicted for ``[p1 .. pn-1]`` back as a mask prompt with ``[p1 .. pn]``; this keeps those
logits between requests.

Keys are the content of the request: project, task, image URL, model version, the control and
label, and the exact prompts (box, then points in the order sent). A click finds the entry of its
own prompts minus the newest point, or nothing (then it is decoded as before, without a mask).
Label Studio's /predict carries no user, so the key cannot name one; it does not need to: the
entry for a prompt sequence is a pure function of that sequence and the model version, so two
users sending the same clicks would each compute the same logits. Projects never share entries.

Bounded: at most PREVIOUS_MASK_ITEMS entries (LRU; float16, 32 KB each for the small SAM's
128 x 128 logits, 128 KB for a real SAM's 256 x 256), each dropped PREVIOUS_MASK_TTL_S after it
was stored. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Hashable, Optional, Sequence, Tuple

import numpy as np

# Prompt coordinates are rounded to this many decimals of a pixel in keys: the same click sent
# twice gives the same key, whatever float noise the percent -> pixel conversion adds.
KEY_DECIMALS = 2


def prompt_key(box: Optional[Sequence[float]], points: Sequence[Tuple[float, float]],
               labels: Sequence[int]) -> Tuple:
    """A hashable, rounded form of one object's prompts (box first, points in the order sent)."""
    b = None if box is None else tuple(round(float(v), KEY_DECIMALS) for v in box)
    p = tuple((round(float(x), KEY_DECIMALS), round(float(y), KEY_DECIMALS), int(lab))
              for (x, y), lab in zip(points, labels))
    return b, p


class PreviousMasks:
    """key -> low-res logits (h x w float16), LRU-bounded to ``max_items``, entries expire after
    ``ttl_s`` seconds. ``max_items`` 0: off (``get`` finds nothing, ``put`` keeps nothing)."""

    def __init__(self, max_items: int, ttl_s: float, clock=time.monotonic) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: "OrderedDict[Hashable, Tuple[float, np.ndarray]]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """Whether previous masks are kept (a bound above 0)."""
        return self.max_items > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: Hashable) -> Optional[np.ndarray]:
        """The low-res logits (h x w float16) stored for ``key``, None when absent or expired."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            item = self._items.get(key)
            if item is not None and now - item[0] > self.ttl_s:
                del self._items[key]
                item = None
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[1].astype(np.float32)

    def put(self, key: Hashable, logits: np.ndarray) -> None:
        """Keep ``logits`` (the last two dimensions: h x w low-res logits) for ``key``."""
        if not self.enabled:
            return
        value = np.asarray(logits, dtype=np.float16).reshape(np.shape(logits)[-2:]).copy()
        now = self._clock()
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (now, value)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            # expired entries at the old end go too, so an idle server does not hold them for ever
            while self._items:
                first_key, (stamp, _) = next(iter(self._items.items()))
                if now - stamp <= self.ttl_s:
                    break
                del self._items[first_key]
