"""The journal of a single-machine offline run: what is finished, so a restart skips it.

A JSON-lines file next to the output. The first line names the run (a key made of the model
version, the work list's fingerprint and the options that change masks); every further line is one
finished image's record, appended and flushed as soon as the image is done (its PNG masks, if any,
are written before). A run killed at any point leaves at most a torn last line, which is dropped
on restart; a journal of another run (other model, inputs or options) is refused, not mixed in.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

from .items import InputError

log = logging.getLogger(__name__)

FORMAT = "stable-sam-preannotation-journal/1"


class Journal:
    """``records``: image id -> record of the images finished so far (by this or earlier runs)."""

    def __init__(self, path: Path, run_key: str, fresh: bool = False) -> None:
        self.path, self.run_key = Path(path), run_key
        self.records: Dict[int, Dict[str, Any]] = {}
        self._file: Optional[TextIO] = None
        if fresh and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the journal {self.path}: {e}") from None
        lines = text.split("\n")
        complete = lines[:-1]  # the part after the last newline is empty, or a torn write
        if lines[-1]:  # cut the torn line off, so appends start on a line of their own; a kill
            # during a truncate loses nothing finished (a rewrite of the file could lose it all)
            log.warning("journal %s: dropping a torn last line (the previous run was interrupted)", self.path)
            os.truncate(self.path, len(text[:text.rfind("\n") + 1].encode()))
        if not complete:
            return
        try:
            header = json.loads(complete[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise InputError(f"{self.path} is not a pre-annotation journal: delete it or pass --fresh")
        if header.get("run_key") != self.run_key:
            raise InputError(f"the journal {self.path} belongs to another run (a different model, input or "
                             f"options): restart with the same arguments, or pass --fresh to start over")
        for n, line in enumerate(complete[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{self.path} line {n} is corrupt ({e}): pass --fresh to start over") from None
            self.records[int(record["image_id"])] = record

    def _open(self) -> TextIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a")
            if new:
                self._write({"format": FORMAT, "run_key": self.run_key})
        return self._file

    def _write(self, obj: Dict[str, Any]) -> None:
        f = self._file
        assert f is not None
        f.write(json.dumps(obj, separators=(",", ":")) + "\n")
        f.flush()  # a killed process loses nothing written: the OS holds it

    def append(self, record: Dict[str, Any]) -> None:
        """Write one image's record (flushed to the file) and keep it in ``records``."""
        self._open()
        self._write(record)
        self.records[int(record["image_id"])] = record

    def close(self) -> None:
        """Flush, fsync and close the file."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
