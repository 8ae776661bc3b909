"""Which volumes are registered to which: pair lists and subject-wise splits.

A pair is ``(moving_id, fixed_id)``: the moving volume is warped onto the fixed one (the
paper's order: moving first).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from psmamba.errors import PsmambaError

__all__ = ["all_pairs", "atlas_pairs", "read_pair_list", "split_subjects"]


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


def read_pair_list(path: str | os.PathLike, known_ids: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Read explicit pairs from a CSV (``moving,fixed`` columns, or two columns) or JSON file.

    JSON: a list of ``{"moving": ..., "fixed": ...}`` objects or ``[moving, fixed]`` lists.
    With ``known_ids``, an id that is not among them is an error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise PsmambaError(f"{path}: pair list not found")
    pairs: list[tuple[str, str]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PsmambaError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "pairs" in data:
            data = data["pairs"]
        if not isinstance(data, list):
            raise PsmambaError(f"{path}: expected a list of pairs")
        for i, item in enumerate(data):
            if isinstance(item, dict):
                if "moving" not in item or "fixed" not in item:
                    raise PsmambaError(f"{path}: pair {i} needs 'moving' and 'fixed' entries, got {sorted(item)}")
                pairs.append((str(item["moving"]), str(item["fixed"])))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append((str(item[0]), str(item[1])))
            else:
                raise PsmambaError(f"{path}: pair {i} must be {{moving, fixed}} or [moving, fixed], got {item!r}")
    else:
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["moving", "fixed"]:
            rows = rows[1:]
        for i, row in enumerate(rows):
            if len(row) < 2:
                raise PsmambaError(f"{path}: row {i + 1} needs two columns (moving, fixed), got {row}")
            pairs.append((row[0].strip(), row[1].strip()))
    if known_ids is not None:
        known = set(known_ids)
        for i, (m, f) in enumerate(pairs):
            for v in (m, f):
                if v not in known:
                    raise PsmambaError(f"{path}: pair {i + 1} names volume {v!r}, which the source does not have")
    return pairs


def _count(part: float | int, n: int, name: str) -> int:
    if part < 0:
        raise PsmambaError(f"split {name} must be >= 0, got {part}")
    if isinstance(part, float) and part < 1:
        return int(round(part * n))
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
    order = subj[:]
    random.Random(seed).shuffle(order)
    test_s = set(order[:n_test])
    val_s = set(order[n_test : n_test + n_val])
    return {
        "train": [i for i in ids if subj_of[i] not in test_s and subj_of[i] not in val_s],
        "val": [i for i in ids if subj_of[i] in val_s],
        "test": [i for i in ids if subj_of[i] in test_s],
    }
