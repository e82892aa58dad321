"""The single-machine offline job: a work list in, a COCO JSON (and PNG masks) out.

Three stages overlap: a reader thread decodes images from disk (``read_ahead`` ahead), an encoder
thread runs the image encoder on them (``encode_ahead``), and the calling thread decodes every
image's prompts (one decoder call per prompt shape), encodes the masks as RLE, writes PNGs and
appends the record to the journal. The output is rewritten atomically from the journal at the end
of every run, complete or not; a restart with the same arguments does only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ..data.dataset import DatasetError, load_image
from ..model import ImageEmbedding, StableSam
from ..predictor import PromptError
from .automatic import AutoConfig
from .items import DEFAULT_LABEL, InputError, WorkItem, WorkList
from .journal import Journal
from .output import build_coco, write_json_atomic, write_mask_pngs
from .readahead import ReadAhead
from .segment import annotate_image

log = logging.getLogger(__name__)

# Failures of one image that the job reports and moves past; anything else is unexpected and gets
# a traceback in the log, but the job still moves past it.
EXPECTED_ERRORS = (InputError, DatasetError, PromptError)


@dataclass
class OfflineSummary:
    """What a run did. ``seconds``: wall time from the first image read to the output written;
    ``stage_s``: busy seconds of each stage and the decoder stage's wait for the encoder."""

    output: Path
    images: int
    already_done: int
    processed: int
    objects: int
    seconds: float
    failed: List[Tuple[str, str]] = field(default_factory=list)
    stage_s: Dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> Dict[str, Any]:
        return {"output": str(self.output), "images": self.images, "already_done": self.already_done,
                "processed": self.processed, "failed": len(self.failed), "objects": self.objects,
                "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 3),
                "stage_s": {k: round(v, 3) for k, v in self.stage_s.items()},
                "failures": [{"image": f, "error": e} for f, e in self.failed]}


def journal_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".journal.jsonl")


def run_key(model: StableSam, work: WorkList, auto: Optional[AutoConfig], png_dir: Optional[Path]) -> str:
    """What a journal must match to be resumed: model, inputs, and the options that change outputs."""
    spec = {"model": model.version, "work": work.fingerprint(), "auto": auto.to_json() if auto else None,
            "png_dir": str(Path(png_dir).resolve()) if png_dir else None}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def run_offline(model: StableSam, work: WorkList, output: Path, png_dir: Optional[Path] = None,
                auto: Optional[AutoConfig] = None, auto_label: str = DEFAULT_LABEL, limit: Optional[int] = None,
                fresh: bool = False, read_ahead: int = 4, encode_ahead: bool = True,
                progress: bool = True) -> OfflineSummary:
    """Pre-annotate ``work`` into ``output`` (COCO JSON). ``auto``: segment images without prompts
    automatically (category ``auto_label``). ``limit``: at most that many images this run.
    ``fresh``: ignore (delete) the journal of an earlier run. ``read_ahead=0``: no background
    threads at all (the serial baseline of the benchmark); ``encode_ahead=False``: encode in the
    calling thread."""
    output = Path(output)
    auto_category = 0
    if auto is not None:
        auto_category, work = work.category_for(auto_label)
    journal = Journal(journal_path(output), run_key(model, work, auto, png_dir), fresh=fresh)
    already = sum(1 for it in work.items if it.image_id in journal.records)
    todo = [it for it in work.items if it.image_id not in journal.records]
    if limit is not None:
        todo = todo[:max(limit, 0)]

    def needs_model(item: WorkItem) -> bool:
        return bool(item.objects) or auto is not None

    def read(item: WorkItem) -> np.ndarray:
        return load_image(item.path)

    def encode(step: Tuple[WorkItem, Optional[np.ndarray], Optional[BaseException]]) -> Optional[ImageEmbedding]:
        item, image, error = step
        if error is not None:
            raise error
        return model.embed(image) if needs_model(item) else None

    reader = ReadAhead(todo, read, depth=read_ahead, name="preannotate-read")
    encoder = ReadAhead(reader, encode, depth=2 if read_ahead and encode_ahead else 0, name="preannotate-encode")
    failed: List[Tuple[str, str]] = []
    processed = 0
    work_s = 0.0
    start = time.perf_counter()
    try:
        with tqdm(total=len(todo), unit="img", desc="pre-annotating", disable=not progress, smoothing=0.1) as bar:
            for (item, image, _), emb, error in encoder:
                t = time.perf_counter()
                try:
                    if error is not None:
                        raise error
                    result = annotate_image(model, item, image, auto, auto_category, embedding=emb)
                    if png_dir is not None:
                        write_mask_pngs(png_dir, item.file_name, result.masks)
                    journal.append(result.record)
                    processed += 1
                except Exception as e:  # one bad image never stops the job; reported at the end
                    message = str(e) if isinstance(e, EXPECTED_ERRORS) else f"{e.__class__.__name__}: {e}"
                    if not isinstance(e, EXPECTED_ERRORS):
                        log.exception("image %s failed", item.file_name)
                    failed.append((item.file_name, message))
                    bar.set_postfix(failed=len(failed))
                work_s += time.perf_counter() - t
                bar.update(1)
    finally:
        encoder.close()
        journal.close()
    info = {"description": "Stable-SAM pre-annotation", "model_version": model.version,
            "auto": auto.to_json() if auto else None}
    coco = build_coco(work, journal.records, info)
    write_json_atomic(output, coco)
    seconds = time.perf_counter() - start
    stages = {"read": reader.busy_s, "encode": encoder.busy_s, "decode_rle_write": work_s,
              "waited_for_encoder": encoder.waited_s}
    return OfflineSummary(output, len(work.items), already, processed, len(coco["annotations"]), seconds, failed,
                          stages)
