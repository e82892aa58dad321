"""Photo training sets packed small enough to travel with a GPU run.

The device tool carries at most 64 MiB of ignored files, and the three training folders are about
72 MB (the JPEGs at quality 92). This writes one ``.tar.gz`` that holds the same folder layout
(``<set>/images/*.jpg``, ``<set>/masks/*_mask_<k>.png``), the photos re-encoded at a lower JPEG
quality and the masks copied as they are; ``tar xzf`` restores folders ``FolderDataset`` reads.

    python -m training.pack_photos ../shared/data/real/ccp-train,../shared/data/real/camvid-train \\
        --quality 80 --out runs/photos.tar.gz
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path
from typing import BinaryIO, Dict, List

from PIL import Image

from stable_sam.checkpoint import atomic_write

# What the device tool carries, all paths together.
CARRY_LIMIT_BYTES = 64 * 2**20


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def reencoded_jpeg(path: Path, quality: int) -> bytes:
    """The photo at ``path`` as JPEG bytes at ``quality`` (RGB, same size)."""
    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def pack_photos(folders: List[Path], out: Path, quality: int) -> Dict[str, int]:
    """Write ``folders`` (folder datasets) into one gzipped tar at ``out``, atomically.

    Each folder becomes a top-level directory named as the folder. Returns counts and sizes."""
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise ValueError(f"folders must have distinct names, got {names}")
    counts = {"images": 0, "masks": 0, "image_bytes_before": 0, "image_bytes_after": 0}

    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w:gz", compresslevel=9) as tar:
            for folder in folders:
                images = sorted((folder / "images").iterdir())
                masks = sorted((folder / "masks").glob("*.png"))
                if not images or not masks:
                    raise ValueError(f"{folder} is not a folder dataset (images/ and masks/ expected)")
                for path in images:
                    data = reencoded_jpeg(path, quality)
                    _add_bytes(tar, f"{folder.name}/images/{path.stem}.jpg", data)
                    counts["images"] += 1
                    counts["image_bytes_before"] += path.stat().st_size
                    counts["image_bytes_after"] += len(data)
                for path in masks:
                    tar.add(path, arcname=f"{folder.name}/masks/{path.name}")
                    counts["masks"] += 1

    atomic_write(out, write)
    counts["archive_bytes"] = out.stat().st_size
    return counts


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", help="comma-separated folder datasets")
    parser.add_argument("--out", type=Path, default=Path("runs/photos.tar.gz"))
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality of the packed photos (1-95)")
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON line last")
    args = parser.parse_args(argv)
    if not 1 <= args.quality <= 95:
        parser.error(f"--quality must be 1-95, got {args.quality}")
    folders = [Path(f) for f in args.folders.split(",") if f]
    missing = [str(f) for f in folders if not (f / "images").is_dir()]
    if missing:
        parser.error(f"not folder datasets (no images/): {', '.join(missing)}")
    counts = pack_photos(folders, args.out, args.quality)
    mib = counts["archive_bytes"] / 2**20
    print(f"{args.out}: {counts['images']} photos, {counts['masks']} masks, {mib:.1f} MiB "
          f"(photos {counts['image_bytes_before'] / 2**20:.1f} -> {counts['image_bytes_after'] / 2**20:.1f} MiB)")
    if counts["archive_bytes"] > CARRY_LIMIT_BYTES:
        print(f"warning: over the device tool's {CARRY_LIMIT_BYTES // 2**20} MiB carry limit; lower --quality")
    if args.json:
        print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
