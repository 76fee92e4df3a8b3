"""CSV training log a user can plot (``pandas.read_csv(OUT/"log.csv")``).

One row per ``log_every`` steps: ``step`` (optimizer steps completed), ``epoch``, ``loss`` and
every ``loss_*`` term the model returns (averaged over the steps since the previous row and over
ranks), ``lr``, ``grad_norm`` (averaged likewise, before clipping), ``img_s`` (images per second
over those steps, all ranks together) and ``time`` (training seconds since the run began,
continued across resumes). Floats are written with ``repr`` so a resumed run's rows can be
compared exactly with an uninterrupted run's.

On resume the rows after the checkpoint's step (written before a crash, then recomputed) are
dropped, so the file always reads as one run.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class CsvLogger:
    """Append rows with a fixed header to ``path`` (rank 0 only)."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.columns: list[str] | None = None
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                rows = [r for r in reader if int(r["step"]) <= resume_step]
            self._write(rows, mode="w")
        elif self.path.exists():
            self.path.unlink()  # a fresh run replaces an old log

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        assert self.columns is not None
        new = mode == "w" or not self.path.exists()
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row; its keys must be those of the first row."""
        if self.columns is None:
            self.columns = list(row)
        elif set(row) != set(self.columns):
            raise ValueError(f"log row keys {sorted(row)} differ from the header "
                             f"{sorted(self.columns)} of {self.path}")
        self._write([{k: repr(v) if isinstance(v, float) else v for k, v in row.items()}],
                    mode="a")


def read_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a log written by ``CsvLogger`` as floats (for plots and tests)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
