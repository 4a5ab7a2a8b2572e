"""The run's logged metrics as JSON lines (`history.jsonl` in the run directory), one line per
logging step. It survives a resume (lines after the checkpoint's step are dropped, then the run
appends), so the training curve and metrics.json's first and last loss cover the whole run."""

from __future__ import annotations

import json
from pathlib import Path

from moelora import atomic

HISTORY_FILE = "history.jsonl"


class History:
    """Written by the main process only; every process may read it."""

    def __init__(self, run_dir: Path, writer: bool) -> None:
        self.path, self.writer = run_dir / HISTORY_FILE, writer

    def append(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            atomic.append_text(self.path, json.dumps({"step": step, **values}) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def keep_until(self, step: int) -> None:
        """Drop what was logged after `step` (a resumed run logs those steps again)."""
        if self.writer and self.path.exists():
            kept = [row for row in self.read() if row["step"] <= step]
            atomic.write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def values(self, key: str) -> list[float]:
        return [row[key] for row in self.read() if key in row]
