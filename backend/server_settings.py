"""Every environment variable the backend reads, in one place.

``BackendSettings`` extends the model library's ``ModelSettings`` (MODEL_DIR, DEVICE,
SAM_MODEL_TYPE, SAM_CHECKPOINT, PLUGIN_CHECKPOINT, PLUGIN_VERSION, EMBEDDING_CACHE_MB,
EMBEDDING_DISK_CACHE) with the Label Studio, HTTP-server, input-limit and training settings below. Nothing else in ``backend/`` reads
``os.environ`` except gunicorn's config (``backend/gunicorn.conf.py``), which reads these settings
and sets ``PROMETHEUS_MULTIPROC_DIR`` for its workers' metrics.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, TypeVar

from stable_sam.settings import NO_PLUGIN, ModelSettings


class SettingsError(ValueError):
    """An environment variable with a value that cannot be used."""


Number = TypeVar("Number", int, float)


def _str(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, default).strip()


def _number(env: Mapping[str, str], name: str, default: Number, convert: Callable[[str], Number],
            minimum: Number, maximum: Optional[Number]) -> Number:
    """``name``'s value read by ``convert``, within ``minimum`` and ``maximum`` (None: no bound);
    ``default`` when unset or blank."""
    raw = _str(env, name)
    if not raw:
        return default
    try:
        value = convert(raw)
    except ValueError as e:
        raise SettingsError(f"{name}={raw!r} is not a number") from e
    if not minimum <= value:  # also NaN
        raise SettingsError(f"{name}={value} must be >= {minimum}")
    if maximum is not None and not value <= maximum:
        raise SettingsError(f"{name}={value} must be <= {maximum}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0,
         maximum: Optional[int] = None) -> int:
    return _number(env, name, default, lambda raw: int(float(raw)), minimum, maximum)  # "1e3" and "2.0" too


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0,
           maximum: Optional[float] = None) -> float:
    return _number(env, name, default, float, minimum, maximum)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _str(env, name).lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: expected 1/0, true/false, yes/no")


def _choice(env: Mapping[str, str], name: str, default: str, choices: Sequence[str]) -> str:
    raw = _str(env, name).lower() or default
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return raw


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default, 0.0)
    if value >= 1.0:
        raise SettingsError(f"{name}={value} must be below 1 (a share of the labelled tasks)")
    return value


def _host_list(env: Mapping[str, str], name: str) -> Tuple[str, ...]:
    """Comma-separated host names, IP addresses and CIDR networks (checked here, so a typo in a
    network fails at start, not on the first image)."""
    out = []
    for item in _str(env, name).split(","):
        item = item.strip().lower()
        if not item:
            continue
        if "/" in item:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as e:
                raise SettingsError(f"{name}: {item!r} is not a network ({e})") from None
        out.append(item)
    return tuple(out)


MAX_POLYGON_TOLERANCE_PX = 20.0  # beyond this a polygon no longer follows the mask
MAX_MIN_REGION_PX = 10**8  # areas in pixels: above MAX_IMAGE_PIXELS' scale is a typo

# Field -> environment variable, for ``to_env``: the field's name in capitals, but for these.
ENV_NAMES = {"local_files_root": "LOCAL_FILES_DOCUMENT_ROOT"}


@dataclass(frozen=True)
class BackendSettings(ModelSettings):
    """The model's settings (``ModelSettings``) plus the server's: Label Studio, fetching, limits,
    auth, workers, training jobs, output; each field's environment variable is in its comment."""
    # Label Studio: where relative /data/upload/... URLs and cloud URIs are resolved, and the key
    # used to read them: a legacy token, or a personal access token (exchanged for a short-lived
    # access token through /api/token/refresh/). /setup's access_token is never used (docs/configuration.md).
    label_studio_url: str = ""  # LABEL_STUDIO_URL, e.g. http://label-studio:8080
    label_studio_api_key: str = ""  # LABEL_STUDIO_API_KEY
    # Basic auth on every route but /health; off unless both are set.
    basic_auth_user: str = ""  # BASIC_AUTH_USER
    basic_auth_pass: str = ""  # BASIC_AUTH_PASS
    # Input limits: anything above is answered 413 with a message.
    max_image_pixels: int = 40_000_000  # MAX_IMAGE_PIXELS: width x height after decoding
    max_image_mb: float = 64.0  # MAX_IMAGE_MB: bytes fetched for one image
    max_request_mb: float = 32.0  # MAX_REQUEST_MB: /predict body (Label Studio sends ~1 MB at most)
    fetch_timeout_s: float = 20.0  # FETCH_TIMEOUT_S: connect/read timeout for image downloads
    # The whole download (connect, redirects, every byte): a server that trickles bytes cannot hold
    # a request thread past it (FETCH_TIMEOUT_S alone bounds each read, not their sum).
    fetch_deadline_s: float = 60.0  # FETCH_DEADLINE_S
    # Work per request. The labeling UI sends a handful of regions per click and Label Studio one
    # task per click; Retrieve Predictions sends the selected tasks. Beyond these: 413.
    max_regions_per_context: int = 200  # MAX_REGIONS_PER_CONTEXT: keypoints + rectangles of one context / task
    max_tasks_per_request: int = 1000  # MAX_TASKS_PER_REQUEST: tasks in one /predict
    # SSRF protection (as Label Studio's own): http(s) image URLs that resolve to a loopback,
    # private, link-local or other non-public address are refused unless the host is
    # LABEL_STUDIO_URL's or listed here (host names, IP addresses or CIDR networks).
    ssrf_protection: bool = True  # SSRF_PROTECTION=0: off
    ssrf_allowed_hosts: Tuple[str, ...] = ()  # SSRF_ALLOWED_HOSTS: comma-separated
    # Decoded images by URL, so a repeated click skips download + decode + hashing (the embedding
    # cache behind it is keyed by pixels, so a changed file at the same URL is re-encoded after TTL).
    image_cache_items: int = 16  # IMAGE_CACHE_ITEMS (0: off)
    image_cache_mb: float = 1024.0  # IMAGE_CACHE_MB: pixel budget of that cache
    image_cache_ttl_s: float = 600.0  # IMAGE_CACHE_TTL_S
    # Opening a task (Label Studio's no-context /predict) queues its image to be fetched and
    # encoded in the background, so the first click costs a decoder pass (backend/prefetch.py).
    prefetch_queue: int = 4  # PREFETCH_QUEUE: images waiting at most; a full queue drops (0: off)
    # The previous mask of an object being clicked, fed back with the next click (SAM's loop;
    # backend/previous_masks.py).
    previous_mask_items: int = 256  # PREVIOUS_MASK_ITEMS: entries kept (0: off)
    previous_mask_ttl_s: float = 600.0  # PREVIOUS_MASK_TTL_S: an entry's lifetime
    # Label configs: parsed ones by their text, and each project's /setup schema; each store keeps
    # at most this many entries and this many MB of config text.
    schema_cache_items: int = 64  # SCHEMA_CACHE_ITEMS
    schema_cache_mb: float = 16.0  # SCHEMA_CACHE_MB
    # Loaded plugin versions (per-project serving), in entries and MB of parameters.
    plugin_cache_items: int = 32  # PLUGIN_CACHE_ITEMS
    plugin_cache_mb: float = 256.0  # PLUGIN_CACHE_MB
    # Local files: absolute paths, file:// URLs and /data/local-files/?d= URLs are read from disk
    # only under this root (Label Studio's own variable); unset: local paths are refused.
    local_files_root: Optional[Path] = None  # LOCAL_FILES_DOCUMENT_ROOT
    # Serving.
    preload_model: bool = False  # PRELOAD_MODEL=1: start loading the model when a worker starts
    host: str = "0.0.0.0"  # HOST
    port: int = 9090  # PORT
    workers: int = 1  # WORKERS: gunicorn processes (each holds its own model)
    threads: int = 8  # THREADS: gunicorn threads per worker
    torch_threads: int = 0  # TORCH_THREADS: torch intra-op threads per worker (0: torch default)
    log_level: str = "INFO"  # LOG_LEVEL
    # Masks out (backend/results.py): islands and holes under MASK_MIN_REGION_PX pixels are removed
    # (SAM's remove_small_regions) from brush and polygon results alike. A config with a
    # PolygonLabels control on the image gets polygons: one per piece of at least
    # POLYGON_MIN_AREA_PX pixels (the largest always), or the largest alone, simplified within
    # POLYGON_TOLERANCE_PX pixels; holes are dropped (Label Studio's polygons have none).
    mask_min_region_px: int = 256  # MASK_MIN_REGION_PX (0: off; the default measured in docs/benchmarks.md)
    polygon_tolerance_px: float = 1.0  # POLYGON_TOLERANCE_PX: 0..20
    polygon_min_area_px: int = 16  # POLYGON_MIN_AREA_PX
    polygon_largest_only: bool = False  # POLYGON_LARGEST_ONLY=1: one polygon per object
    # Adaptation (training jobs, see backend/jobs.py): START_TRAINING always starts a job;
    # TRAIN_EVERY_N > 0 also starts one after every N ANNOTATION_CREATED / _UPDATED of a project.
    train_every_n: int = 0  # TRAIN_EVERY_N (0: off)
    train_init: str = "current"  # TRAIN_INIT: start from the project's serving plugin, or "fresh"
    train_holdout: float = 0.2  # TRAIN_HOLDOUT: share of labelled tasks held out for before / after mIoU

    @classmethod
    def from_env(cls) -> "BackendSettings":
        """The settings from the environment; ``SettingsError`` naming a variable with a bad value."""
        env = os.environ
        base = ModelSettings.from_env()
        root = _str(env, "LOCAL_FILES_DOCUMENT_ROOT")
        url = _str(env, "LABEL_STUDIO_URL").rstrip("/")
        if url and not url.startswith(("http://", "https://")):
            raise SettingsError(f"LABEL_STUDIO_URL={url!r} must start with http:// or https://")
        user, password = _str(env, "BASIC_AUTH_USER"), env.get("BASIC_AUTH_PASS", "")
        if bool(user) != bool(password):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        return cls(
            **{f.name: getattr(base, f.name) for f in fields(ModelSettings)},
            label_studio_url=url,
            label_studio_api_key=_str(env, "LABEL_STUDIO_API_KEY"),
            basic_auth_user=user,
            basic_auth_pass=password,
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", cls.max_image_pixels, 1),
            max_image_mb=_float(env, "MAX_IMAGE_MB", cls.max_image_mb, 0.001),
            max_request_mb=_float(env, "MAX_REQUEST_MB", cls.max_request_mb, 0.001),
            fetch_timeout_s=_float(env, "FETCH_TIMEOUT_S", cls.fetch_timeout_s, 0.1),
            fetch_deadline_s=_float(env, "FETCH_DEADLINE_S", cls.fetch_deadline_s, 0.1),
            max_regions_per_context=_int(env, "MAX_REGIONS_PER_CONTEXT", cls.max_regions_per_context, 1),
            max_tasks_per_request=_int(env, "MAX_TASKS_PER_REQUEST", cls.max_tasks_per_request, 1),
            ssrf_protection=_bool(env, "SSRF_PROTECTION", cls.ssrf_protection),
            ssrf_allowed_hosts=_host_list(env, "SSRF_ALLOWED_HOSTS"),
            schema_cache_items=_int(env, "SCHEMA_CACHE_ITEMS", cls.schema_cache_items, 0),
            schema_cache_mb=_float(env, "SCHEMA_CACHE_MB", cls.schema_cache_mb, 0.0),
            plugin_cache_items=_int(env, "PLUGIN_CACHE_ITEMS", cls.plugin_cache_items, 0),
            plugin_cache_mb=_float(env, "PLUGIN_CACHE_MB", cls.plugin_cache_mb, 0.0),
            image_cache_items=_int(env, "IMAGE_CACHE_ITEMS", cls.image_cache_items, 0),
            image_cache_mb=_float(env, "IMAGE_CACHE_MB", cls.image_cache_mb, 0.0),
            image_cache_ttl_s=_float(env, "IMAGE_CACHE_TTL_S", cls.image_cache_ttl_s, 0.0),
            prefetch_queue=_int(env, "PREFETCH_QUEUE", cls.prefetch_queue, 0),
            previous_mask_items=_int(env, "PREVIOUS_MASK_ITEMS", cls.previous_mask_items, 0),
            previous_mask_ttl_s=_float(env, "PREVIOUS_MASK_TTL_S", cls.previous_mask_ttl_s, 0.0),
            local_files_root=Path(root).expanduser().resolve() if root else None,
            preload_model=_bool(env, "PRELOAD_MODEL", cls.preload_model),
            host=_str(env, "HOST") or cls.host,
            port=_int(env, "PORT", cls.port, 1),
            workers=_int(env, "WORKERS", cls.workers, 1),
            threads=_int(env, "THREADS", cls.threads, 1),
            torch_threads=_int(env, "TORCH_THREADS", cls.torch_threads, 0),
            log_level=(_str(env, "LOG_LEVEL") or cls.log_level).upper(),
            mask_min_region_px=_int(env, "MASK_MIN_REGION_PX", cls.mask_min_region_px, 0, MAX_MIN_REGION_PX),
            polygon_tolerance_px=_float(env, "POLYGON_TOLERANCE_PX", cls.polygon_tolerance_px, 0.0,
                                        MAX_POLYGON_TOLERANCE_PX),
            polygon_min_area_px=_int(env, "POLYGON_MIN_AREA_PX", cls.polygon_min_area_px, 0, MAX_MIN_REGION_PX),
            polygon_largest_only=_bool(env, "POLYGON_LARGEST_ONLY", cls.polygon_largest_only),
            train_every_n=_int(env, "TRAIN_EVERY_N", cls.train_every_n, 0),
            train_init=_choice(env, "TRAIN_INIT", cls.train_init, ("current", "fresh")),
            train_holdout=_fraction(env, "TRAIN_HOLDOUT", cls.train_holdout),
        )

    def to_env(self) -> Dict[str, str]:
        """These settings as the environment variables that ``from_env`` reads back (a training
        job is started with them, so it uses the server's model, store and Label Studio)."""
        out = {}
        for f in fields(self):
            if f.name == "shipped_plugin":  # PLUGIN_CHECKPOINT below names the plugin that serves
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "1" if value else "0"
            elif isinstance(value, tuple):
                value = ",".join(value)
            out[ENV_NAMES.get(f.name, f.name.upper())] = "" if value is None else str(value)
        out["PLUGIN_CHECKPOINT"] = str(self.plugin_path) if self.plugin_path else NO_PLUGIN
        return out

    @property
    def auth_enabled(self) -> bool:
        """Whether basic auth is on (both BASIC_AUTH_USER and BASIC_AUTH_PASS set)."""
        return bool(self.basic_auth_user and self.basic_auth_pass)
