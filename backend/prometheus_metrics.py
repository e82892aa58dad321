"""Counters for /metrics with prometheus_client (Prometheus text, or JSON with ?format=json).

Request and error counts by route and status, predict latency, masks, prefetches, and encoder /
decoder calls and seconds measured by forward hooks on SAM's image encoder and mask decoder (so they
count exactly the model work, whatever the caller). The route adds per-process values it reads at
scrape time (model loaded, image and embedding caches) with ``extra``.

Under gunicorn, backend/gunicorn.conf.py sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker starts:
the counters then live in prometheus_client's per-process files and /metrics sums all workers'
(live and exited), whichever worker answers. Otherwise (one process, the Flask test client) each
``Metrics`` has its own registry, so two backends in one process count apart.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "stable_sam_backend_"

_HELP = {
    "requests_total": "HTTP requests by route and status",
    "errors_total": "HTTP answers with status >= 400 by route and status",
    "request_seconds_total": "wall seconds spent answering, by route",
    "predict_calls_total": "/predict calls by kind (interactive, batch)",
    "predict_seconds_total": "wall seconds in /predict by kind",
    "masks_total": "masks returned",
    "encoder_calls_total": "SAM image encoder forward calls",
    "encoder_seconds_total": "wall seconds in SAM's image encoder",
    "decoder_calls_total": "SAM mask decoder forward calls",
    "decoder_seconds_total": "wall seconds in SAM's mask decoder",
    "uptime_seconds": "seconds since the answering worker's backend started",
    "model_loaded": "1 when the answering worker has loaded its model",
}


def multiprocess_dir() -> Optional[str]:
    """The directory prometheus_client's multi-process mode writes to, if it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class _Families:
    """``collect()`` over counters and scrape-time values: what ``generate_latest`` reads."""

    def __init__(self, source: Any, scraped: Dict[str, float]) -> None:
        self.source, self.scraped = source, scraped

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            # One process's creation times say nothing once workers are summed (multi-process mode
            # has none): the text is the same in both modes.
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
        for name, value in self.scraped.items():
            kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            yield kind(PREFIX + name, _HELP.get(name, name.replace("_", " ")), value=float(value))


class Metrics:
    """The backend's counters (prometheus_client), shared by the processes of a gunicorn server
    through PROMETHEUS_MULTIPROC_DIR when it is set."""
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registry = CollectorRegistry(auto_describe=True)
        self._counters: Dict[str, Counter] = {}
        self._local = threading.local()
        self._multiprocess = multiprocess_dir() is not None
        self.started = time.time()

    def _counter(self, name: str, labelnames: Tuple[str, ...]) -> Counter:
        # Made on first use, so a counter nothing touched is absent (as a scrape shows it), not 0.
        with self._lock:
            counter = self._counters.get(name)
            if counter is None:
                if not name.endswith("_total"):
                    raise ValueError(f"a counter's name ends in _total: {name!r}")
                counter = Counter(PREFIX + name, _HELP.get(name, name.replace("_", " ")), labelnames,
                                  registry=self._registry)
                self._counters[name] = counter
        return counter

    def count(self, name: str, value: float = 1.0, **labels: Any) -> None:
        """Add ``value`` to counter ``name`` (made on first use) with ``labels``."""
        counter = self._counter(name, tuple(sorted(labels)))
        (counter.labels(**{k: str(v) for k, v in labels.items()}) if labels else counter).inc(value)

    def get(self, name: str, **labels: Any) -> float:
        """This process's count (0 if never counted)."""
        value = self._registry.get_sample_value(PREFIX + name, {k: str(v) for k, v in labels.items()})
        return value if value is not None else 0.0

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

    def _source(self) -> Any:
        if not self._multiprocess:
            return self._registry
        # A fresh registry per scrape reads every process's files (prometheus_client's recipe).
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry

    def snapshot(self, extra: Dict[str, Any]) -> Dict[str, Any]:
        """The JSON form: ``{name: value}``, or ``{name: {"k=v,k2=v2": value}}`` for labelled counters."""
        out: Dict[str, Any] = {"uptime_seconds": round(time.time() - self.started, 3)}
        samples = [s for family in self._source().collect() for s in family.samples if s.name.endswith("_total")]
        for s in sorted(samples, key=lambda s: (s.name, sorted(s.labels.items()))):
            name = s.name[len(PREFIX):]
            if s.labels:
                out.setdefault(name, {})[",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
            else:
                out[name] = s.value
        out.update(extra)
        return out

    def prometheus(self, extra: Dict[str, float]) -> str:
        """Prometheus text format 0.0.4."""
        scraped = {"uptime_seconds": round(time.time() - self.started, 3), **extra}
        return generate_latest(_Families(self._source(), scraped)).decode()
