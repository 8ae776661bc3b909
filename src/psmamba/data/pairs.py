"""Which volumes are registered to which: pair lists and subject-wise splits.

A pair is ``(moving_id, fixed_id)``: the moving volume is warped onto the fixed one (the
paper's order: moving first).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from psmamba.errors import PsmambaError, require_file

__all__ = ["all_pairs", "atlas_pairs", "read_pair_list", "id_pairs", "PairRow", "split_subjects"]


def all_pairs(ids: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered pair of distinct volumes: ``N * (N - 1)`` pairs (the paper's training set).

    Order: for each moving volume in ``ids`` order, every other volume as fixed.
    """
    ids = list(ids)
    return [(m, f) for m in ids for f in ids if m != f]


def atlas_pairs(atlas: str, ids: Sequence[str], direction: str = "to_atlas") -> list[tuple[str, str]]:
    """Pairs between one atlas and every other volume.

    Args:
        atlas: id of the atlas.
        ids: the subjects (the atlas itself is skipped if listed).
        direction: ``"to_atlas"`` (subject moving, atlas fixed), ``"from_atlas"`` (atlas moving)
            or ``"both"``.
    """
    others = [i for i in ids if i != atlas]
    if direction == "to_atlas":
        return [(i, atlas) for i in others]
    if direction == "from_atlas":
        return [(atlas, i) for i in others]
    if direction == "both":
        return [(i, atlas) for i in others] + [(atlas, i) for i in others]
    raise PsmambaError(f"atlas_pairs direction must be 'to_atlas', 'from_atlas' or 'both', got {direction!r}")


@dataclass(frozen=True)
class PairRow:
    """One row of a pair list: the moving and fixed entries (volume ids or file paths, as the
    list holds them), optional label-map entries, pair id and displacement field (``ddf``: a
    field computed elsewhere, scored by ``psmamba evaluate --fields``), and where it came from."""

    moving: str
    fixed: str
    moving_labels: str | None = None
    fixed_labels: str | None = None
    pair_id: str | None = None
    where: str = ""  # "FILE line N" / "FILE pair N", for error messages
    ddf: str | None = None


_COLUMNS = ("moving", "fixed", "moving_labels", "fixed_labels", "pair_id", "ddf")
#: the columns of a list without a header, in this order (``ddf`` is named in a header only)
_POSITIONAL = _COLUMNS[:5]


def read_pair_list(path: str | os.PathLike) -> list[PairRow]:
    """Read a pair list: a CSV or a JSON file.

    CSV: columns ``moving, fixed[, moving_labels, fixed_labels][, pair_id]``, and ``ddf`` (a
    displacement field computed elsewhere, for ``psmamba evaluate --fields``) named in a header. A
    header row is optional: when the first row names the columns (any order) they are matched by
    name, otherwise the first five are positional. A first row that names some columns but not ``moving`` and
    ``fixed``, or that holds no image file names above a row that does (``source,target``), is
    a header of the wrong columns: an error, not a pair. Empty rows and rows starting with ``#`` are skipped; an empty
    label cell means "no labels". JSON: a list (or ``{"pairs": [...]}``) of objects with those
    keys, or of ``[moving, fixed]`` lists.

    What an entry means (a volume id of a data source, a file path relative to the list) is the
    caller's business: :func:`psmamba.data.sources` checks ids,
    :func:`psmamba.engine.evaluate.pair_files` resolves and checks files.

    Raises:
        PsmambaError: a missing or unreadable file, an unknown column, a header without the
            moving and fixed columns, a row without two entries, or no pairs at all; the
            message names the file and line.
    """
    path = Path(path).expanduser()
    require_file(path, "pair list")
    rows = _json_rows(path) if path.suffix.lower() == ".json" else _csv_rows(path)
    if not rows:
        raise PsmambaError(f"pair list {path} lists no pairs")
    return rows


def _csv_rows(path: Path) -> list[PairRow]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            raw = [(n, r) for n, r in enumerate(csv.reader(fh), start=1)
                   if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PsmambaError(f"pair list {path} cannot be read ({exc})") from None
    header = [c.strip().lower() for c in raw[0][1]] if raw else []
    named = [c for c in header if c in _COLUMNS]
    if named and not ("moving" in header and "fixed" in header):
        missing = [c for c in ("moving", "fixed") if c not in header]
        raise PsmambaError(f"pair list {path} line {raw[0][0]}: the header names {named} but no {missing} column; "
                           f"expected columns {', '.join(_COLUMNS)} (moving and fixed required)")
    if not named and len(raw) > 1 and _looks_like_header(raw[0][1], raw[1][1]):
        raise PsmambaError(f"pair list {path} line {raw[0][0]}: {','.join(c.strip() for c in raw[0][1])!r} looks like "
                           f"a header but names no known column; expected columns {', '.join(_COLUMNS)} "
                           "(moving and fixed required; the header is optional)")
    if "moving" in header and "fixed" in header:
        twice = sorted({c for c in header if c and header.count(c) > 1})
        if twice:
            raise PsmambaError(f"pair list {path} line {raw[0][0]}: the header names {twice} more than once")
        unknown = [c for c in header if c and c not in _COLUMNS]
        if unknown:
            raise PsmambaError(f"pair list {path}: unknown column(s) {unknown}; expected some of {list(_COLUMNS)}")
        cols = {name: header.index(name) for name in _COLUMNS if name in header}
        raw = raw[1:]
    else:
        cols = {name: i for i, name in enumerate(_POSITIONAL)}  # positional: the five, in order
    width = max(cols.values()) + 1
    out = []
    for n, row in raw:
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in cols.items()}
        if not cells.get("moving") or not cells.get("fixed"):
            raise PsmambaError(f"pair list {path} line {n}: expected moving,fixed[,moving_labels,fixed_labels][,pair_id]")
        extra = [c for c in row[width:] if c.strip()]
        if extra:
            hint = " (a ddf column is read when a header names it)" if "ddf" not in cols else ""
            raise PsmambaError(f"pair list {path} line {n}: {len(row)} columns, expected at most {width} "
                               f"({', '.join(sorted(cols, key=cols.get))}){hint}")
        out.append(PairRow(cells["moving"], cells["fixed"], cells.get("moving_labels") or None,
                           cells.get("fixed_labels") or None, cells.get("pair_id") or None, f"{path} line {n}",
                           cells.get("ddf") or None))
    return out


_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img", ".hdr.gz", ".img.gz", ".mgz", ".nrrd", ".mha", ".mhd")


def _looks_like_header(first: Sequence[str], second: Sequence[str]) -> bool:
    """A first row whose two entries are not image files while the second row's both are."""
    def files(row: Sequence[str]) -> bool:
        return len(row) >= 2 and all(c.strip().lower().endswith(_IMAGE_SUFFIXES) for c in row[:2])

    return files(second) and not any(c.strip().lower().endswith(_IMAGE_SUFFIXES) for c in first[:2])


def _json_rows(path: Path) -> list[PairRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PsmambaError(f"pair list {path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and "pairs" in data:
        data = data["pairs"]
    if not isinstance(data, list):
        raise PsmambaError(f"pair list {path}: expected a list of pairs")
    out = []
    for i, item in enumerate(data, start=1):
        where = f"{path} pair {i}"
        if isinstance(item, dict):
            if "moving" not in item or "fixed" not in item:
                raise PsmambaError(f"{where}: needs 'moving' and 'fixed' entries, got {sorted(item)}")
            unknown = sorted(set(item) - set(_COLUMNS))
            if unknown:
                raise PsmambaError(f"{where}: unknown key(s) {unknown}; expected some of {list(_COLUMNS)}")
            get = lambda k: None if item.get(k) in (None, "") else str(item[k])  # noqa: E731
            out.append(PairRow(str(item["moving"]), str(item["fixed"]), get("moving_labels"), get("fixed_labels"),
                               get("pair_id"), where, get("ddf")))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append(PairRow(str(item[0]), str(item[1]), where=where))
        else:
            raise PsmambaError(f"{where}: must be {{moving, fixed}} or [moving, fixed], got {item!r}")
    return out


def id_pairs(rows: Sequence[PairRow], known_ids: Sequence[str]) -> list[tuple[str, str]]:
    """``(moving_id, fixed_id)`` of pair-list rows whose entries are volume ids of a source.

    Raises:
        PsmambaError: a row naming an id the source does not have (the message names the row).
    """
    known = set(known_ids)
    for row in rows:
        if row.ddf:
            raise PsmambaError(f"{row.where}: names a displacement field (ddf column), which only "
                               "'psmamba evaluate --pairs LIST --fields' reads; drop the column here")
        for v in (row.moving, row.fixed):
            if v not in known:
                raise PsmambaError(f"{row.where}: names volume {v!r}, which the source does not have")
    return [(r.moving, r.fixed) for r in rows]


def _count(part: float | int, n: int, name: str) -> int:
    """A fraction (< 1) or a whole count of ``n`` subjects; numpy and torch scalars too (a
    ``np.float32(0.4)`` was read as the count 0 before)."""
    if hasattr(part, "item") and not isinstance(part, (int, float)):
        part = part.item()
    if isinstance(part, bool) or not isinstance(part, (int, float)) or not math.isfinite(part) or part < 0:
        raise PsmambaError(f"split {name} must be a fraction in [0, 1) or a count >= 1 of subjects, got {part!r}")
    if isinstance(part, float) and part < 1:
        return int(round(part * n))
    if part != int(part):
        raise PsmambaError(f"split {name} must be a fraction in [0, 1) or a whole count of subjects, got {part!r}")
    return int(part)


def split_subjects(
    ids: Sequence[str],
    subjects: Mapping[str, str] | None = None,
    val: float | int = 0.1,
    test: float | int = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split volume ids into train/val/test by SUBJECT: a subject's volumes stay together.

    Args:
        ids: volume ids.
        subjects: ``{id: subject}`` (default: each volume its own subject).
        val, test: a fraction (float < 1) or a count (>= 1) of SUBJECTS.
        seed: the shuffle seed (same seed, same split).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each in the order of ``ids``.
    """
    ids = list(ids)
    subjects = dict(subjects or {})
    subj_of = {i: subjects.get(i, i) for i in ids}
    subj = sorted(set(subj_of.values()))
    n = len(subj)
    n_test, n_val = _count(test, n, "test"), _count(val, n, "val")
    if n_test + n_val > n:
        raise PsmambaError(f"split asks for {n_val} val + {n_test} test subjects but there are only {n}")
    if n and n_test + n_val == n:  # an empty training part, silently, before
        raise PsmambaError(f"split asks for {n_val} val + {n_test} test subjects: all {n}, none left to train on")
    seed = int(seed.item() if hasattr(seed, "item") else seed)
    order = subj[:]
    random.Random(seed).shuffle(order)
    test_s = set(order[:n_test])
    val_s = set(order[n_test : n_test + n_val])
    return {
        "train": [i for i in ids if subj_of[i] not in test_s and subj_of[i] not in val_s],
        "val": [i for i in ids if subj_of[i] in val_s],
        "test": [i for i in ids if subj_of[i] in test_s],
    }
