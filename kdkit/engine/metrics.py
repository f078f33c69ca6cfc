"""RUN/metrics.jsonl, the run's record of every logged step and evaluation (resume rewrites it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdkit.files import atomic_write_text, disk_full, out_of_space


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per line, flushed as written (main process only; `path`
    None elsewhere).

    Opening it keeps the first `keep` complete lines of the file and appends after them: 0 for a
    fresh run, the checkpoint's count on resume, so that the file reads as if the run had never
    stopped (a line torn by a crash is dropped with whatever followed the checkpoint).
    """

    def __init__(self, path: Path | None, keep: int = 0):
        self.path, self.file, self.lines = path, None, 0
        if path is None:
            return
        kept: list[str] = []
        if keep and path.is_file():
            for line in path.read_text(errors="replace").splitlines(keepends=True):
                if len(kept) == keep or not _complete_json(line):
                    break
                kept.append(line)
        atomic_write_text(path, "".join(kept))
        self.lines = len(kept)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115  (line-buffered: one write per record)

    def write(self, **record: object) -> None:
        if self.file:
            try:
                self.file.write(json.dumps(record) + "\n")
            except OSError as e:
                raise out_of_space(self.path, "every line before this one") if disk_full(e) else e from None
            self.lines += 1

    def sync(self) -> int:
        """Flush to disk (before a checkpoint records the line count); returns the line count."""
        if self.file:
            self.file.flush()
            os.fsync(self.file.fileno())
        return self.lines

    def close(self) -> None:
        if self.file:
            self.file.close()


def _complete_json(line: str) -> bool:
    if not line.endswith("\n"):
        return False
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
