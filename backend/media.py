"""Fetching a task's image: Label Studio uploads, local files, http(s), cloud-storage URIs.

Remote forms go through label-studio-sdk's media access (``get_base64_content``: /data/upload/
prefixed with LABEL_STUDIO_URL, /data/local-files/, s3:// gs:// azure-blob:// via the task's
presign URL) with our own ``requests`` session (timeouts, a byte limit). Authentication: a legacy
token is sent as ``Token``; a personal access token (a JWT refresh token) gets 401 when sent as
is, so it is exchanged at ``/api/token/refresh/`` for an access token (5 min), cached.

Every download goes through ``backend/guarded_fetch.py``: SSRF protection on every connection, a
deadline and a byte limit.

Images are decoded with EXIF orientation applied (the browser shows them so, and Label Studio's
``original_width``/``original_height`` are of the oriented picture) and refused over
MAX_IMAGE_PIXELS before their pixels are decoded. 16-bit and float images are scaled to 8 bits.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlparse

import jwt
import numpy as np
import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils import io as ls_io
from PIL import Image, ImageOps, UnidentifiedImageError

from stable_sam.embedding_cache import image_hash

from .errors import BadInput, ImageTooLarge, ImageUnavailable, short_repr
from .guarded_fetch import AddressGuard, Download, LimitedSession, short_url
from .server_settings import BackendSettings

log = logging.getLogger(__name__)

MAX_URL_CHARS = 16384  # an image URL (not data:) longer than this is refused: S3 presigned URLs are ~2 KB
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class TokenSource:
    """The credential for Label Studio media: LABEL_STUDIO_API_KEY, a PAT exchanged when needed."""

    def __init__(self, base_url: str, api_key: str, timeout: float) -> None:
        self.base_url, self.api_key, self.timeout = base_url, api_key, timeout
        self._lock = threading.Lock()
        self._access: Optional[str] = None
        self._expires = 0.0
        self.is_refresh_token = False
        if api_key:
            try:
                claims = jwt.decode(api_key, options={"verify_signature": False})
                self.is_refresh_token = claims.get("token_type") == "refresh"
            except jwt.PyJWTError:
                pass  # a legacy token: sent as "Token <key>"

    def token(self) -> str:
        """The token to send to Label Studio: the legacy key, or a short-lived access token
        (refreshed through /api/token/refresh/ 30 s before it expires)."""
        if not self.is_refresh_token:
            return self.api_key
        with self._lock:
            if self._access is None or time.time() > self._expires - 30:
                url = ls_io.concat_urls(self.base_url, "/api/token/refresh/")
                try:
                    r = requests.post(url, json={"refresh": self.api_key}, timeout=self.timeout)
                except requests.RequestException as e:
                    raise ImageUnavailable(f"cannot reach Label Studio at {self.base_url} to exchange "
                                           f"LABEL_STUDIO_API_KEY: {e.__class__.__name__}") from None
                if r.status_code != 200:
                    raise ImageUnavailable(f"Label Studio refused LABEL_STUDIO_API_KEY (personal access token) at "
                                           f"{url}: HTTP {r.status_code}")
                self._access = r.json()["access"]
                try:
                    exp = jwt.decode(self._access, options={"verify_signature": False}).get("exp")
                except jwt.PyJWTError:
                    exp = None
                self._expires = float(exp) if exp else time.time() + 240
            return self._access


def decode_image(data: bytes, max_pixels: int, what: str) -> np.ndarray:
    """Bytes -> H x W x 3 uint8 RGB, EXIF orientation applied; 4xx errors for non-images / too large."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError as e:  # PIL's own limit: far over ours too
        raise ImageTooLarge(f"{what} is too large: {e} (MAX_IMAGE_PIXELS is {max_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageUnavailable(f"{what} is not an image PIL can read ({len(data)} bytes: "
                               f"{e.__class__.__name__})") from None
    if w * h > max_pixels:
        raise ImageTooLarge(f"{what} is {w} x {h} = {w * h} pixels, over MAX_IMAGE_PIXELS ({max_pixels})")
    try:
        with _pil_limit(max_pixels):
            img = ImageOps.exif_transpose(img)
            arr = to_rgb8(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageUnavailable(f"{what} could not be decoded: {e.__class__.__name__}: {str(e)[:200]}") from None
    if arr.ndim != 3 or min(arr.shape[:2]) < 1:
        raise ImageUnavailable(f"{what} decodes to an empty image {arr.shape}")
    return np.ascontiguousarray(arr)


def to_rgb8(img: Image.Image) -> np.ndarray:
    """H x W x 3 uint8. PIL's own conversion clips 16-bit and float samples at 255; here they are
    scaled: 16-bit by 255/65535, 32-bit integers and floats from their range (floats in 0..1 as
    0..1), so a 16-bit copy of an image gives the same pixels as the 8-bit one."""
    if img.mode not in HIGH_BIT_DEPTH_MODES:
        return np.asarray(img.convert("RGB"))
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        scaled = a / 257.0
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = float(a.min()), float(a.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = a  # already 8-bit values
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = a / 257.0  # 16-bit samples in a 32-bit mode
        else:
            scaled = (a - lo) * (255.0 / (hi - lo))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


class _pil_limit:
    """PIL's own bomb check follows our limit while decoding (it is a module global: it is only
    ever raised here, never lowered below what another thread may rely on)."""

    _lock = threading.Lock()

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def __enter__(self):
        with self._lock:
            if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
                Image.MAX_IMAGE_PIXELS = self.max_pixels
        return self

    def __exit__(self, *exc):
        return False


class ImageLoader:
    """url (+ task id) -> decoded image and its content hash, with a small TTL cache keyed by the
    URL. Embeddings are not kept here: the model's cache holds them by that content hash."""

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self.tokens = TokenSource(settings.label_studio_url, settings.label_studio_api_key, settings.fetch_timeout_s)
        self.guard = AddressGuard(settings)
        self.max_bytes = int(settings.max_image_mb * 2**20)
        self._cache: "OrderedDict[Tuple[str, Any], Tuple[float, np.ndarray, str]]" = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    # -- cache -----------------------------------------------------------------------------------
    def cached(self, url: str, task_id: Any) -> Optional[Tuple[np.ndarray, str]]:
        """The cached (image, source) of ``url`` (per task for cloud URIs), None when absent or expired."""
        key = (url, task_id if ls_io.is_cloud_storage_uri(url) else None)
        with self._lock:
            item = self._cache.get(key)
            if item is None or time.monotonic() - item[0] > self.settings.image_cache_ttl_s:
                self.misses += 1
                return None
            self._cache.move_to_end(key)
            self.hits += 1
            return item[1], item[2]

    def _remember(self, url: str, task_id: Any, image: np.ndarray, digest: str) -> None:
        budget = self.settings.image_cache_mb * 2**20
        if self.settings.image_cache_items <= 0 or image.nbytes > budget:
            return
        key = (url, task_id if ls_io.is_cloud_storage_uri(url) else None)
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            self._cache[key] = (time.monotonic(), image, digest)
            self._bytes += image.nbytes
            while len(self._cache) > self.settings.image_cache_items or self._bytes > budget:
                _, (_, dropped, _) = self._cache.popitem(last=False)
                self._bytes -= dropped.nbytes

    def load(self, url: Any, task_id: Any = None) -> Tuple[np.ndarray, str]:
        """The image for ``url`` and its content hash (``image_hash``, computed once per download:
        the model's embedding cache is keyed by it, so a repeated click is decoder-only)."""
        if not isinstance(url, str) or not url.strip():
            raise BadInput(f"the task's image URL must be a non-empty string, got {short_repr(url)}")
        url = url.strip()
        if len(url) > MAX_URL_CHARS and not url.startswith("data:"):
            raise BadInput(f"image URL {short_url(url)} is {len(url)} characters long, over {MAX_URL_CHARS}")
        if ls_io.is_cloud_storage_uri(url) and task_id is not None and (
                isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < 2**63):
            # it goes into Label Studio's presign URL (/tasks/<id>/presign/) and the cache key
            raise BadInput(f"image {short_url(url)} is a cloud-storage URI: the task id must be a Label Studio "
                           f"task id (a whole number), got {short_repr(task_id, 40)}")
        hit = self.cached(url, task_id)
        if hit is not None:
            return hit
        image = decode_image(self._fetch(url, task_id), self.settings.max_image_pixels, f"image {short_url(url)}")
        digest = image_hash(image)
        self._remember(url, task_id, image, digest)
        return image, digest

    # -- fetching --------------------------------------------------------------------------------
    def _local_path(self, path: str, relative: bool = False) -> Path:
        """``path`` on disk, refused outside LOCAL_FILES_DOCUMENT_ROOT. ``relative``: Label Studio's
        ``?d=`` value, always relative to the root (as its /data/local-files/ view reads it)."""
        root = self.settings.local_files_root
        if root is None:
            raise BadInput(f"image {short_url(path)} is a local path; local files are read only under "
                           f"LOCAL_FILES_DOCUMENT_ROOT, which is not set")
        try:
            full = (root / path.lstrip("/")).resolve() if relative else Path(path).resolve()
        except (ValueError, OSError, RuntimeError) as e:  # a NUL byte, a symlink loop
            raise BadInput(f"image {short_url(path)} is not a usable local path ({e.__class__.__name__})") from None
        if full != root and root not in full.parents:
            raise BadInput(f"image {short_url(path)} is outside LOCAL_FILES_DOCUMENT_ROOT ({root})")
        return full

    def _read_file(self, path: Path, shown: str) -> bytes:
        try:
            st = path.stat()
        except OSError as e:  # missing, or a name too long for the file system
            raise ImageUnavailable(f"image {shown}: no such file ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"image {shown} is not a file (a directory or a device)")
        size = st.st_size
        if size > self.max_bytes:
            raise ImageTooLarge(f"image {shown} is {size / 2**20:.1f} MB, over MAX_IMAGE_MB "
                                f"({self.settings.max_image_mb:g} MB)")
        try:
            return path.read_bytes()
        except OSError as e:
            raise ImageUnavailable(f"image {shown} cannot be read: {e.strerror}") from None

    def _fetch(self, url: str, task_id: Any) -> bytes:
        shown = short_url(url)
        if url.startswith("data:"):
            head, _, payload = url.partition(",")
            if ";base64" not in head:
                raise BadInput(f"image {shown}: only base64 data: URLs are supported")
            if len(payload) * 3 // 4 > self.max_bytes:
                raise ImageTooLarge(f"image {shown} is over MAX_IMAGE_MB ({self.settings.max_image_mb:g} MB)")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise BadInput(f"image {shown}: invalid base64 data") from None
        if url.startswith("file://"):
            return self._read_file(self._local_path(unquote(urlparse(url).path)), shown)
        if url.startswith("/") and not url.startswith(("/data/", "/storage-data/")):
            return self._read_file(self._local_path(url), shown)
        if url.startswith("/data/") and "?d=" in url and self.settings.local_files_root is not None:
            rel = parse_qs(urlparse(url).query, keep_blank_values=True).get("d", [""])[-1]
            path = self._local_path(rel, relative=True)
            try:
                exists = path.exists()
            except OSError:  # a name too long for the file system
                exists = False
            if exists:  # else Label Studio may serve it (its own root can differ)
                return self._read_file(path, shown)
        needs_ls = url.startswith(("/", "upload")) or ls_io.is_cloud_storage_uri(url)
        if needs_ls and not self.settings.label_studio_url:
            raise BadInput(f"image {shown} is served by Label Studio, but LABEL_STUDIO_URL is not set "
                           f"(and LABEL_STUDIO_API_KEY) on the backend")
        if needs_ls and not self.settings.label_studio_api_key:
            raise BadInput(f"image {shown} needs LABEL_STUDIO_API_KEY on the backend to be downloaded")
        if ls_io.is_cloud_storage_uri(url) and task_id is None:
            raise BadInput(f"image {shown} is a cloud-storage URI: the task id is needed to presign it")
        if not needs_ls and not url.startswith(("http://", "https://")):
            raise BadInput(f"image {shown}: unsupported URL form (expected /data/upload/..., http(s)://, "
                           f"s3://, gs://, azure-blob://, a local path or a data: URL)")
        download = Download(self.guard, self.settings.fetch_deadline_s)
        session = LimitedSession(self.settings.fetch_timeout_s, self.max_bytes, download)
        try:
            token = self.tokens.token() if self.settings.label_studio_api_key else None
            with ls_io.http_session(session):
                b64 = ls_io.get_base64_content(url, hostname=self.settings.label_studio_url or None,
                                               access_token=token, task_id=task_id)
        except BadInput:
            raise
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            hint = " (check LABEL_STUDIO_API_KEY)" if code in (401, 403) else ""
            raise ImageUnavailable(f"image {shown}: HTTP {code} from {short_url(e.request.url if e.request else url)}"
                                   f"{hint}") from None
        except requests.RequestException as e:
            if download.expired:
                raise download.timeout_error() from None
            raise ImageUnavailable(f"image {shown} is unreachable: {e.__class__.__name__}") from None
        except (FileNotFoundError, ValueError) as e:
            raise BadInput(f"image {shown}: {short_repr(str(e), 200)}") from None
        except OSError as e:  # the SDK reading a Local Storage path itself (a directory, say)
            raise ImageUnavailable(f"image {shown} cannot be read: {e.__class__.__name__}") from None
        finally:
            download.close()
            session.close()
        return base64.b64decode(b64)
