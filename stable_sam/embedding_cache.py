"""Image-embedding cache: the encoder runs once per distinct image and model.

Keys are ``<model id>/<image content hash>``; a value is what the encoder made of the image: one
tensor, or a tuple of them (SAM 2: the embedding and its high-resolution maps), every byte of
which counts against the bound. An in-memory LRU bounded in MB holds them on the model's device; an optional on-disk store keeps them across restarts. Thread-safe: two
threads asking for the same new image wait for one encoder call instead of running two.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .checkpoint import atomic_torch_save

log = logging.getLogger(__name__)

Features = Union[torch.Tensor, Tuple[torch.Tensor, ...]]  # what one image's entry holds


def features_nbytes(value: Features) -> int:
    """Bytes of a tensor or of all tensors of a tuple."""
    tensors = (value,) if isinstance(value, torch.Tensor) else value
    return sum(t.numel() * t.element_size() for t in tensors)


def image_hash(image: np.ndarray) -> str:
    """SHA-256 of an image's pixels, shape and dtype (the same picture from any file gives one key)."""
    h = hashlib.sha256()
    h.update(f"{image.shape}|{image.dtype}|".encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


class EmbeddingCache:
    """LRU of image embeddings, ``max_mb`` megabytes at most in memory, optionally backed by disk."""

    def __init__(self, max_mb: float = 512.0, disk_dir: Optional[Path] = None) -> None:
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._items: "OrderedDict[str, Features]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._inflight: Dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """The bytes held in memory now."""
        return self._bytes

    def stats(self) -> Dict[str, float]:
        """Hits, misses, disk hits, entries, MB held and the MB bound."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "disk_hits": self.disk_hits,
                    "entries": len(self._items), "mb": self._bytes / 2**20, "max_mb": self.max_bytes / 2**20}

    def get(self, key: str) -> Optional[Features]:
        """The features cached in memory for ``key`` (now the newest), None when absent."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: Features) -> None:
        """Keep ``value`` for ``key`` in memory, evicting the oldest past the bound (features over the
        bound alone are not kept)."""
        size = features_nbytes(value)
        with self._lock:
            if key in self._items:
                old = self._items.pop(key)
                self._bytes -= features_nbytes(old)
            if size > self.max_bytes:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= features_nbytes(old)

    def get_or_compute(self, key: str, compute: Callable[[], Features]) -> Features:
        """The cached embedding for ``key``, else ``compute()`` once (even under concurrent calls)."""
        value = self.get(key)
        if value is not None:
            with self._lock:
                self.hits += 1
            return value
        with self._lock:
            key_lock = self._inflight.setdefault(key, threading.Lock())
        with key_lock:
            value = self.get(key)  # another thread may have computed it while we waited
            if value is not None:
                with self._lock:
                    self.hits += 1
                return value
            try:
                value = self._load_from_disk(key)
                if value is None:
                    with self._lock:
                        self.misses += 1
                    value = compute()
                    self._save_to_disk(key, value)
                self.put(key, value)
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
        return value

    def _disk_path(self, key: str) -> Optional[Path]:
        if self.disk_dir is None:
            return None
        return self.disk_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".pt")

    def _load_from_disk(self, key: str) -> Optional[Features]:
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt entry is recomputed, never fatal
            log.warning("ignoring unreadable cached embedding %s: %s", path, e)
            return None
        with self._lock:
            self.disk_hits += 1
        return value

    def _save_to_disk(self, key: str, value: Features) -> None:
        path = self._disk_path(key)
        if path is not None:
            try:
                cpu = value.detach().cpu() if isinstance(value, torch.Tensor) else tuple(t.detach().cpu() for t in value)
                atomic_torch_save(cpu, path)
            except OSError as e:
                log.warning("could not store embedding %s on disk: %s", path, e)
