"""Official SAM checkpoints: known URLs (and SHA-256 where published), downloaded into ``MODEL_DIR``.

SAM 1 (ViT-B/L/H): the file's size and SHA-256 are known and checked. SAM 2.1: the URLs are those
of Meta's ``checkpoints/download_ckpts.sh`` (release folder 092824); Meta publishes no checksum or
size for them, so a download is checked against the server's Content-Length only (a cut transfer
fails), and the file is then loaded strictly (every key and shape) by ``build_sam2``.

Not ``torch.hub.download_url_to_file``: it does the rest of this (a temporary file moved into place,
the SHA-256 through ``hash_prefix``, a tqdm bar), but opens the URL with no timeout and takes none,
short of the process-wide socket default, which would change every other connection of the server.
A stalled download would then hold the loading thread and the first /predict until gunicorn kills
the worker, where here it is a CheckpointError (a 503 saying where to get the file) after ``timeout``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt or made for another model."""


@dataclass(frozen=True)
class OfficialCheckpoint:
    """An official SAM checkpoint: its file name, URL, SHA-256 and size where published."""
    filename: str
    url: str
    sha256: Optional[str]  # None: not published (SAM 2.1)
    size: Optional[int]  # bytes; None: not published
    release: str = ""  # the publisher's release tag; names the weights where no checksum is known

    @property
    def identity(self) -> str:
        """What names these weights in a model id: the SHA-256 prefix, else the release tag."""
        return self.sha256[:12] if self.sha256 else self.release


SAM2_RELEASE = "092824"  # Meta's SAM 2.1 release folder (September 2024)
SAM2_BASE_URL = f"https://dl.fbaipublicfiles.com/segment_anything_2/{SAM2_RELEASE}"

OFFICIAL_CHECKPOINTS: Dict[str, OfficialCheckpoint] = {
    "vit_h": OfficialCheckpoint(
        "sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879),
    "vit_l": OfficialCheckpoint(
        "sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1249524607),
    "vit_b": OfficialCheckpoint(
        "sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375042383),
    **{f"sam2.1_hiera_{name}": OfficialCheckpoint(
        f"sam2.1_hiera_{name}.pt", f"{SAM2_BASE_URL}/sam2.1_hiera_{name}.pt", None, None, SAM2_RELEASE)
       for name in ("tiny", "small", "base_plus", "large")},
}


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def ensure_official_checkpoint(model_type: str, model_dir: Path, download: bool = True,
                               timeout: float = 30.0) -> Path:
    """Path of the official ``model_type`` checkpoint in ``model_dir``, downloading it if absent.

    Raises CheckpointError naming the file and where to get it when it is absent and cannot be
    downloaded (offline, or ``download=False``), or when the download fails its SHA-256 check.
    """
    if model_type not in OFFICIAL_CHECKPOINTS:
        raise CheckpointError(f"no official checkpoint for model type {model_type!r}; "
                              f"known: {sorted(OFFICIAL_CHECKPOINTS)}")
    ck = OFFICIAL_CHECKPOINTS[model_type]
    path = Path(model_dir) / ck.filename
    if path.is_file():
        return path
    checksum = f"SHA-256 {ck.sha256}" if ck.sha256 else "no checksum is published for it"
    how = f"Download {ck.url} ({checksum}) into {path.parent}, or set SAM_CHECKPOINT to the file's path."
    if not download:
        raise CheckpointError(f"SAM {model_type} checkpoint not found at {path}. {how}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{ck.filename}.", suffix=".part", dir=path.parent)
    try:
        h = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(ck.url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            announced = int(length) if length.isdigit() else None
            total = announced or ck.size
            with tqdm(total=total, unit="B", unit_scale=True, desc=ck.filename) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    received += len(block)
                    bar.update(len(block))
        if announced is not None and received != announced:
            raise CheckpointError(f"download of {ck.filename} stopped at {received} of {announced} bytes. {how}")
        if ck.sha256 and h.hexdigest() != ck.sha256:
            raise CheckpointError(f"downloaded {ck.filename} has SHA-256 {h.hexdigest()}, expected "
                                  f"{ck.sha256}: the file is corrupt or was changed. {how}")
        os.replace(tmp, path)
        return path
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:  # HTTPException: a cut body
        raise CheckpointError(f"SAM {model_type} checkpoint not found at {path} and the download from "
                              f"{ck.url} failed ({e}). {how}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
