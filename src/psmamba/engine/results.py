"""Evaluation results: the per pair x label and per-pair tables, their files, summaries.

Results files (``EvaluationResult.write(path)``, what ``psmamba evaluate --out results.csv`` writes)
------------------------------------------------------------------------------------------------
* ``results.csv`` -- one row per pair x label (tidy/long format):
  ``method, pair_id, moving, fixed, label, dice, dice_before, hd95_mm, folding_percent, sdlogj,
  seconds``. The per-pair columns (folding, SDlogJ, seconds) repeat on each label row of the
  pair; a pair without label maps has one row with an empty ``label``.
* ``results_pairs.csv`` -- one row per pair: ``method, pair_id, moving, fixed, n_labels,
  dice_mean, dice_before_mean, hd95_mean_mm, folding_percent, sdlogj, sdlogj_l2r, seconds``.
* ``results_summary.md`` -- the summary table (:func:`format_summary_table`).

:func:`read_results` reads either CSV back (``psmamba evaluate --compare`` and
``psmamba plot`` use it). The ``method`` column holds the registration method's own name
(:mod:`psmamba.engine.methods`).

The summary follows the paper's tables: Dice as mean +- standard deviation over pairs of the
per-pair mean Dice (over labels), HD95 likewise, folding % and SDlogJ as mean +- std over
pairs, time as the mean seconds per pair.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psmamba.engine.logs import format_cell
from psmamba.errors import PsmambaError, require_file
from psmamba.files import atomic_write_all

__all__ = [
    "EvaluationResult", "MethodResults", "read_results", "summarize", "format_summary_table",
    "write_csv", "companion_paths", "check_writable", "LABEL_COLUMNS", "PAIR_COLUMNS",
]

#: Columns of the per pair x label CSV.
LABEL_COLUMNS = (
    "method", "pair_id", "moving", "fixed", "label", "dice", "dice_before", "hd95_mm",
    "folding_percent", "sdlogj", "seconds",
)
#: Columns of the per-pair CSV.
PAIR_COLUMNS = (
    "method", "pair_id", "moving", "fixed", "n_labels", "dice_mean", "dice_before_mean",
    "hd95_mean_mm", "folding_percent", "sdlogj", "sdlogj_l2r", "seconds",
)


# --------------------------------------------------------------------------- evaluation
@dataclass
class EvaluationResult:
    """Per pair x label rows and per-pair rows of one method (see the module docstring)."""

    method: str
    label_rows: list[dict[str, Any]] = field(default_factory=list)
    pair_rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Mean +- std over pairs (see :func:`summarize`)."""
        return summarize(self.pair_rows, self.method)

    def write(self, path: str | os.PathLike) -> list[Path]:
        """Write ``path`` (per label), ``<stem>_pairs.csv`` and ``<stem>_summary.md``, all or none,
    creating the folder (:func:`psmamba.files.atomic_write_all`)."""
        path = Path(path)
        pairs_path, md_path = companion_paths(path)
        table = format_summary_table([self.summary()]) + "\n"

        def md(name: str) -> None:
            with open(name, "w", encoding="utf-8") as fh:
                fh.write(table)

        return _write_all(path, [(path, _csv_writer(LABEL_COLUMNS, self.label_rows, 6)),
                                 (pairs_path, _csv_writer(PAIR_COLUMNS, self.pair_rows, 6)), (md_path, md)])


def companion_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``results.csv`` -> (``results_pairs.csv``, ``results_summary.md``)."""
    path = Path(path)
    stem = path.name[:-4] if path.name.lower().endswith(".csv") else path.name
    return path.with_name(f"{stem}_pairs.csv"), path.with_name(f"{stem}_summary.md")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (one line) when the results file cannot be written; creates nothing.

    A folder that does not exist yet is fine when it can be created (its nearest existing
    ancestor is a writable folder): the writers create it once the results exist.
    """
    from psmamba.files import probe_writable

    path = Path(path).expanduser().absolute()
    if path.exists() and path.is_dir():
        raise PsmambaError(f"results file {path} is a folder")
    if path.parent.exists() and not path.parent.is_dir():
        raise PsmambaError(f"results file {path}: {path.parent} is not a folder")
    probe_writable(path.parent, "results folder")
    return path


def _csv_writer(columns: Sequence[str], rows: Iterable[Mapping[str, Any]], digits: int):
    def write(name: str) -> None:
        with open(name, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: format_cell(row.get(k), digits, nan="") for k in columns})

    return write


def _write_all(what: Path, writes) -> list[Path]:
    try:
        return atomic_write_all(writes)
    except OSError as exc:
        raise PsmambaError(f"results file {what}: cannot be written ({exc.strerror or exc})") from None


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]], digits: int = 6) -> None:
    """Write rows atomically (creating the folder); floats with ``digits`` significant digits,
    NaN/None as empty cells."""
    _write_all(Path(path), [(path, _csv_writer(columns, rows, digits))])


def nanmean(values: Iterable[float]) -> float:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


# --------------------------------------------------------------------------- summary table
def _mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    v = np.array([float(x) for x in values if x is not None and x != ""], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarize(pair_rows: Sequence[Mapping[str, Any]], method: str | None = None) -> dict[str, Any]:
    """Mean and (sample, ddof=1) standard deviation over pairs of each per-pair metric.

    Returns ``{"method", "pairs", "dice": (mean, std), "dice_before", "hd95_mm",
    "folding_percent", "sdlogj", "seconds"}`` (each a ``(mean, std)`` tuple).
    """
    out: dict[str, Any] = {"method": method or (pair_rows[0].get("method") if pair_rows else ""), "pairs": len(pair_rows)}
    for key, col in (
        ("dice", "dice_mean"), ("dice_before", "dice_before_mean"), ("hd95_mm", "hd95_mean_mm"),
        ("folding_percent", "folding_percent"), ("sdlogj", "sdlogj"), ("seconds", "seconds"),
    ):
        mean, std, n = _mean_std(r.get(col) for r in pair_rows)
        out[key] = (mean, std)
        out[f"{key}_pairs"] = n  # the pairs that have the metric (Dice: those with label maps)
    return out


def format_summary_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table in the layout of the paper's result tables (one row per method)."""

    def ms(summary: Mapping[str, Any], key: str, digits: int) -> str:
        m, s = summary[key]
        if math.isnan(m):
            return "-"
        n, total = summary.get(f"{key}_pairs", summary["pairs"]), summary["pairs"]
        return f"{m:.{digits}f} ± {s:.{digits}f}" + (f" ({n} of {total} pairs)" if n < total else "")

    head = "| method | pairs | Dice | HD95 (mm) | folding % (\\|J\\|<=0) | SDlogJ | time (s/pair) |"
    lines = [head, "|---|---:|---|---|---|---|---:|"]
    for s in summaries:
        t = s["seconds"][0]
        lines.append(
            f"| {s['method']} | {s['pairs']} | {ms(s, 'dice', 3)} | {ms(s, 'hd95_mm', 2)} | "
            f"{ms(s, 'folding_percent', 3)} | {ms(s, 'sdlogj', 3)} | {'-' if math.isnan(t) else f'{t:.2f}'} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading back
@dataclass
class MethodResults:
    """One method's results read back from a CSV.

    Attributes:
        name: the method name (the ``method`` column, or the file name).
        path: the CSV read.
        per_pair: ``{pair_id: mean Dice over labels}``.
        per_label: ``{label: {pair_id: Dice}}`` (empty when read from a per-pair CSV).
        pair_rows: the per-pair rows (for :func:`summarize`).
    """

    name: str
    path: Path
    per_pair: dict[str, float]
    per_label: dict[int, dict[str, float]]
    pair_rows: list[dict[str, Any]]


def _num(v: Any) -> float:
    try:
        return float(v) if v not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def read_results(path: str | os.PathLike, name: str | None = None) -> MethodResults:
    """Read a results CSV written by :func:`evaluate_pairs` (either the per-label or the per-pair file).

    The per-pair mean Dice is recomputed from the per-label rows when those are given (mean
    over labels, NaN labels skipped), so both files give the same numbers.

    Raises:
        PsmambaError: missing file, or a CSV without ``pair_id`` and Dice columns.
    """
    path = Path(path).expanduser()
    require_file(path, "results file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PsmambaError(f"results file {path} cannot be read ({exc})") from None
    if "pair_id" not in cols or not ({"dice", "label"} <= set(cols) or "dice_mean" in cols):
        raise PsmambaError(
            f"results file {path} is not a psmamba evaluation CSV (needs pair_id and label,dice or dice_mean columns)"
        )
    method = name or next((r.get("method") for r in rows if r.get("method")), None) or path.name.removesuffix(".csv")
    per_label: dict[int, dict[str, float]] = {}
    pair_rows: dict[str, dict[str, Any]] = {}
    if "label" in cols:
        grouped: dict[str, list[float]] = {}
        for r in rows:
            pid = r["pair_id"]
            first = pair_rows.setdefault(pid, {
                "method": method, "pair_id": pid, "moving": r.get("moving", ""), "fixed": r.get("fixed", ""),
                "folding_percent": _num(r.get("folding_percent")), "sdlogj": _num(r.get("sdlogj")),
                "seconds": _num(r.get("seconds")), "_hd": [], "_before": [],
            })
            grouped.setdefault(pid, [])
            if r.get("label", "") != "":
                lab = int(float(r["label"]))
                d = _num(r.get("dice"))
                per_label.setdefault(lab, {})[pid] = d
                grouped[pid].append(d)
                first["_hd"].append(_num(r.get("hd95_mm")))
                first["_before"].append(_num(r.get("dice_before")))
        for pid, row in pair_rows.items():
            row["dice_mean"] = nanmean(grouped[pid])
            row["hd95_mean_mm"] = nanmean(row.pop("_hd"))
            row["dice_before_mean"] = nanmean(row.pop("_before"))
            row["n_labels"] = len(grouped[pid])
    else:
        for r in rows:
            pair_rows[r["pair_id"]] = {
                **r, "method": method,
                **{k: _num(r.get(k)) for k in ("dice_mean", "dice_before_mean", "hd95_mean_mm",
                                                "folding_percent", "sdlogj", "sdlogj_l2r", "seconds")},
            }
    per_pair = {pid: float(r["dice_mean"]) for pid, r in pair_rows.items()}
    return MethodResults(method, path, per_pair, per_label, list(pair_rows.values()))
