"""The single-machine offline job: a work list in, a COCO JSON (and PNG masks) out.

Three stages overlap: a reader thread decodes images from disk (``read_ahead`` ahead), an encoder
thread runs the image encoder on them (``encode_ahead``), and the calling thread decodes every
image's prompts (one decoder call per prompt shape), encodes the masks as RLE, writes PNGs and
appends the record to the journal. The output is rewritten atomically from the journal at the end
of every run, complete or not; a restart with the same arguments does only what is missing.
The three stages are ``ImagePipeline``, which each Ray worker (``on_ray``) runs on its shards too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_write_json
from ..data.dataset import DatasetError, load_image
from ..model import ImageEmbedding, StableSam
from ..predictor import PromptError
from .automatic import AutoConfig
from .items import DEFAULT_LABEL, InputError, WorkItem, WorkList
from .journal import Journal
from .output import build_coco, write_mask_pngs
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
        """Images processed per second of the run."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> Dict[str, Any]:
        """The summary as printed by ``--json``."""
        return {"output": str(self.output), "images": self.images, "already_done": self.already_done,
                "processed": self.processed, "failed": len(self.failed), "objects": self.objects,
                "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 3),
                "stage_s": {k: round(v, 3) for k, v in self.stage_s.items()},
                "failures": [{"image": f, "error": e} for f, e in self.failed]}


def journal_path(output: Path) -> Path:
    """The journal beside ``output`` (``<output>.journal.jsonl``)."""
    return Path(output).with_name(Path(output).name + ".journal.jsonl")


def run_key(model_version: str, work: WorkList, auto: Optional[AutoConfig], png_dir: Optional[Path],
            min_region_px: int = 0) -> str:
    """What a journal must match to be resumed: model, inputs, and the options that change outputs."""
    spec = {"model": model_version, "work": work.fingerprint(), "auto": auto.to_json() if auto else None,
            "png_dir": str(Path(png_dir).resolve()) if png_dir else None}
    if min_region_px:  # absent when off: journals written before the option existed still resume
        spec["min_region_px"] = min_region_px
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def prepare_work(work: WorkList, auto: Optional[AutoConfig], auto_label: str) -> Tuple[WorkList, int]:
    """The work list with the automatic masks' category added (when ``auto``), and that category's id."""
    if auto is None:
        return work, 0
    auto_category, work = work.category_for(auto_label)
    return work, auto_category


def output_info(model_version: str, auto: Optional[AutoConfig], min_region_px: int = 0) -> Dict[str, Any]:
    """The COCO file's ``info``: what made it, so any run of the same job writes the same bytes."""
    return {"description": "Stable-SAM pre-annotation", "model_version": model_version,
            "auto": auto.to_json() if auto else None, "min_region_px": min_region_px}


def failure_message(item: WorkItem, e: BaseException) -> str:
    """The one-line reason an image failed; unexpected errors also get their traceback logged."""
    if isinstance(e, EXPECTED_ERRORS):
        return str(e)
    log.error("image %s failed", item.file_name, exc_info=e)
    return f"{e.__class__.__name__}: {e}"


def encode_ahead_helps(device: torch.device) -> bool:
    """Whether encoding in a second thread overlaps work instead of splitting the same CPU cores:
    yes on a GPU; on CPU only when two stages' torch threads fit the cores. Measured on 2 cores
    (``scripts/bench_preannotate.py``): ViT-B with 2 threads a stage ran at 0.896 of the encoder's
    pace encoding ahead and 0.984 inline; the small SAM with 1 thread a stage, 0.449 vs 0.313."""
    if device.type != "cpu":
        return True
    return 2 * torch.get_num_threads() <= (os.cpu_count() or 1)


class ImagePipeline:
    """read -> encode -> annotate (and PNGs) over ``items``, the stages overlapped: iterating gives
    ``(item, record, None)`` for a finished image and ``(item, None, reason)`` for a failed one, in
    item order. One bad image never stops it. The single-machine job and each Ray worker run this.
    ``read_ahead=0``: no background threads (the serial baseline); ``encode_ahead=False``: encode in
    the iterating thread; None: ``encode_ahead_helps`` on the model's device. ``stage_s``: busy seconds of each stage and the wait for the encoder.
    ``encoder_stream``: when encoding ahead on CUDA, the encoder thread queues its work on a CUDA
    stream of its own, so the decoder's device-to-host copies wait only for the decoder's kernels,
    not for the encoder's queued image too. Off until a GPU run shows it pays
    (``scripts/device_report.py`` measures both; docs/gpu.md)."""

    def __init__(self, model: StableSam, items: Sequence[WorkItem], auto: Optional[AutoConfig] = None,
                 auto_category: int = 0, png_dir: Optional[Path] = None, read_ahead: int = 4,
                 encode_ahead: Optional[bool] = None, encoder_stream: bool = False, min_region_px: int = 0) -> None:
        if encode_ahead is None:
            encode_ahead = encode_ahead_helps(model.device)
        ahead = bool(read_ahead and encode_ahead)
        self.stream = torch.cuda.Stream(model.device) if encoder_stream and ahead and model.device.type == "cuda" else None
        self.model, self.auto, self.auto_category, self.png_dir = model, auto, auto_category, png_dir
        self.min_region_px = min_region_px
        self.reader = ReadAhead(items, self._read, depth=read_ahead, name="preannotate-read")
        self.encoder = ReadAhead(self.reader, self._encode, depth=2 if ahead else 0,
                                 name="preannotate-encode")
        self.work_s = 0.0

    def _read(self, item: WorkItem) -> np.ndarray:
        return load_image(item.path)

    def _encode(self, step: Tuple[WorkItem, Optional[np.ndarray], Optional[BaseException]]) -> Optional[ImageEmbedding]:
        item, image, error = step
        if error is not None:
            raise error
        # images without prompts need the encoder only in automatic mode
        if not item.objects and self.auto is None:
            return None
        if self.stream is None:
            return self.model.embed(image)
        with torch.cuda.stream(self.stream):
            emb = self.model.embed(image)
        # Finished before it is handed over (this thread has nothing else to do meanwhile), and
        # marked as used on the decoder's stream so its memory is not reused while that reads it.
        self.stream.synchronize()
        for t in emb.features:  # SAM 2: its high-resolution maps too
            t.record_stream(torch.cuda.default_stream(self.model.device))
        return emb

    def __iter__(self) -> Iterator[Tuple[WorkItem, Optional[Dict[str, Any]], Optional[str]]]:
        for (item, image, _), emb, error in self.encoder:
            t = time.perf_counter()
            try:
                if error is not None:
                    raise error
                result = annotate_image(self.model, item, image, self.auto, self.auto_category, embedding=emb,
                                        min_region_px=self.min_region_px)
                if self.png_dir is not None:  # before the record is handed on: a journaled image has its PNGs
                    write_mask_pngs(self.png_dir, item.file_name, result.masks)
                outcome: Tuple[WorkItem, Optional[Dict[str, Any]], Optional[str]] = (item, result.record, None)
            except Exception as e:  # one bad image never stops the job; reported at the end
                outcome = (item, None, failure_message(item, e))
            self.work_s += time.perf_counter() - t
            yield outcome

    @property
    def stage_s(self) -> Dict[str, float]:
        """Seconds busy per stage: read, encode, decode + RLE + write, and waiting for the encoder."""
        return {"read": self.reader.busy_s, "encode": self.encoder.busy_s, "decode_rle_write": self.work_s,
                "waited_for_encoder": self.encoder.waited_s}

    def close(self) -> None:
        """Stop the encoder's background stage."""
        self.encoder.close()


def run_offline(model: StableSam, work: WorkList, output: Path, png_dir: Optional[Path] = None,
                auto: Optional[AutoConfig] = None, auto_label: str = DEFAULT_LABEL, limit: Optional[int] = None,
                fresh: bool = False, read_ahead: int = 4, encode_ahead: Optional[bool] = None,
                progress: bool = True, encoder_stream: bool = False, min_region_px: int = 0) -> OfflineSummary:
    """Pre-annotate ``work`` into ``output`` (COCO JSON). ``auto``: segment images without prompts
    automatically (category ``auto_label``). ``limit``: at most that many images this run.
    ``fresh``: ignore (delete) the journal of an earlier run. ``read_ahead=0``: no background
    threads at all (the serial baseline of the benchmark); ``encode_ahead=False``: encode in the
    calling thread (None: when it helps, see ``encode_ahead_helps``); ``encoder_stream``: see
    ``ImagePipeline``; ``min_region_px``: islands and holes under that many pixels are removed from
    every mask (MASK_MIN_REGION_PX; 0: off)."""
    output = Path(output)
    work, auto_category = prepare_work(work, auto, auto_label)
    journal = Journal(journal_path(output), run_key(model.version, work, auto, png_dir, min_region_px), fresh=fresh)
    already = sum(1 for it in work.items if it.image_id in journal.records)
    todo = [it for it in work.items if it.image_id not in journal.records]
    if limit is not None:
        todo = todo[:max(limit, 0)]

    pipeline = ImagePipeline(model, todo, auto, auto_category, png_dir, read_ahead, encode_ahead, encoder_stream,
                             min_region_px)
    failed: List[Tuple[str, str]] = []
    processed = 0
    journal_s = 0.0
    start = time.perf_counter()
    try:
        with tqdm(total=len(todo), unit="img", desc="pre-annotating", disable=not progress, smoothing=0.1) as bar:
            for item, record, error in pipeline:
                if record is not None:
                    t = time.perf_counter()
                    journal.append(record)
                    journal_s += time.perf_counter() - t
                    processed += 1
                else:
                    failed.append((item.file_name, error or ""))
                    bar.set_postfix(failed=len(failed))
                bar.update(1)
    finally:
        pipeline.close()
        journal.close()
    coco = build_coco(work, journal.records, output_info(model.version, auto, min_region_px))
    atomic_write_json(coco, output, compact=True)
    seconds = time.perf_counter() - start
    stages = pipeline.stage_s
    stages["decode_rle_write"] += journal_s
    return OfflineSummary(output, len(work.items), already, processed, len(coco["annotations"]), seconds, failed,
                          stages)
