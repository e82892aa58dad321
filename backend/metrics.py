"""Per-process counters for /metrics (Prometheus text, or JSON with ?format=json).

Request and error counts by route and status, predict latency, masks, image-cache and
embedding-cache hits/misses, and encoder / decoder calls and seconds measured by forward hooks on
SAM's image encoder and mask decoder (so they count exactly the model work, whatever the caller).
With several gunicorn workers each has its own counters.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, Dict, Tuple

import torch


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = defaultdict(float)
        self._local = threading.local()
        self.started = time.time()

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        with self._lock:
            self._counters[key] += value

    def get(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        with self._lock:
            return self._counters.get(key, 0.0)

    def instrument(self, module: torch.nn.Module, part: str) -> None:
        """Count calls and wall seconds of ``module``'s forward (per thread, nesting-safe)."""
        if getattr(module, "_backend_metrics_part", None):
            return
        module._backend_metrics_part = part
        local = self._local

        def pre(_m, _args):
            starts = getattr(local, part, None)
            if starts is None:
                starts = []
                setattr(local, part, starts)
            starts.append(time.perf_counter())

        def post(_m, _args, _out):
            starts = getattr(local, part, None)
            if starts:
                elapsed = time.perf_counter() - starts.pop()
                self.count(f"{part}_calls_total")
                self.count(f"{part}_seconds_total", elapsed)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def snapshot(self, extra: Dict[str, Any]) -> Dict[str, Any]:
        with self._lock:
            items = list(self._counters.items())
        out: Dict[str, Any] = {"uptime_seconds": round(time.time() - self.started, 3)}
        for (name, labels), value in sorted(items):
            if labels:
                out.setdefault(name, {})[",".join(f"{k}={v}" for k, v in labels)] = value
            else:
                out[name] = value
        out.update(extra)
        return out

    def prometheus(self, extra: Dict[str, float]) -> str:
        with self._lock:
            items = list(self._counters.items())
        lines = [f"stable_sam_backend_uptime_seconds {time.time() - self.started:.3f}"]
        for (name, labels), value in sorted(items):
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"stable_sam_backend_{name}{lab} {value:g}")
        for name, value in sorted(extra.items()):
            lines.append(f"stable_sam_backend_{name} {value:g}")
        return "\n".join(lines) + "\n"
