"""What a training run writes as it goes: ``metrics.csv`` (always) and TensorBoard (optional)."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from psmamba.files import atomic_write

__all__ = ["CSV_FIELDS", "CsvLog", "TensorBoardLog", "format_cell"]

#: columns of ``metrics.csv`` (train rows every ``run.log_every`` steps, val rows per validation)
CSV_FIELDS = [
    "time", "epoch", "step", "split", "loss", "similarity", "regulariser", "dice_loss",
    "dice", "folding_percent", "lr", "pairs_per_s",
]


def format_cell(value: Any, digits: int = 6, nan: str = "nan") -> str:
    """A CSV cell: ``digits`` significant digits for floats, NaN as ``nan``, None as empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return nan if math.isnan(float(value)) else f"{float(value):.{digits}g}"
    return str(value)


class CsvLog:
    """``metrics.csv``: one row per log step or validation, flushed as written.

    ``keep_rows``: rows of an existing file to keep (a resumed run drops what was logged after
    its checkpoint, so nothing is logged twice); ``None`` keeps them all; 0 starts a new file.
    """

    def __init__(self, path: Path, keep_rows: int | None) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if keep_rows != 0 and path.is_file():
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            rows = rows if keep_rows is None else rows[:keep_rows]
        self.rows = len(rows)
        #: the ``time`` of the last row kept: a resumed run's clock continues from it
        self.time_before = 0.0
        if rows:
            try:
                self.time_before = max(float(rows[-1].get("time") or 0.0), 0.0)
            except ValueError:
                pass

        def write(name: str) -> None:
            with open(name, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(path, write)
        self._fh = path.open("a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=CSV_FIELDS)

    def write(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow({k: format_cell(row.get(k)) for k in CSV_FIELDS})
        self._fh.flush()
        self.rows += 1

    def close(self) -> None:
        self._fh.close()


class TensorBoardLog:
    """A SummaryWriter when tensorboard is installed and wanted; silently nothing otherwise."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard missing or broken: the CSV still has every number
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        if self.writer is None:
            return
        for key, img in images.items():
            self.writer.add_image(f"val/{key}", img, step, dataformats="CHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
