"""What the ablation scripts share: the demo's val pairs, variant order, one timed registration,
rows written as they come.

Every script registers the demo's full-size VAL pairs (never the benchmark's test pairs) from
arrays in memory, in one process, with the variant order rotated from pair to pair, and writes
one JSON row per run.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: the seed of the misalignment the ablations draw (as ``bench_register.py --misalign`` does)
MISALIGN_SEED = 7


def parse_args(doc: str, out: str | None = None,
               more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """An ablation script's flags: ``--threads`` (default 2, set in torch here), ``--out``
    (default ``results/<out>``, when the script writes a file) and whatever ``more`` adds."""
    import torch

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    if out is not None:
        ap.add_argument("--out", type=Path, default=RESULTS / out)
    if more is not None:
        more(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def val_pairs(misaligned: bool = False) -> list:
    """The demo's full-size val pairs (one direction each); with ``misaligned``, followed by the
    same pairs moved by a random rigid motion (``bench_register._misaligned``, seed 7)."""
    from benchmarks.bench_register import _misaligned, demo_bench_data

    pairs = list(demo_bench_data("full", one_way=True, splits=("val",)).pairs["val"])
    return pairs + [_misaligned(p, MISALIGN_SEED) for p in pairs] if misaligned else pairs


def rotated(names: Sequence, i: int) -> list:
    """``names`` started at position ``i`` (mod its length): the variant order of pair ``i``."""
    names = list(names)
    k = i % len(names)
    return names[k:] + names[:k]


def register_timed(p, method: Any, **options: Any) -> tuple[Any, float]:
    """Register bench pair ``p`` with ``register_pair(method=method, **options)``: the
    :class:`~psmamba.engine.register.RegistrationResult` and the seconds from the arrays in
    memory to both maps (metrics and writing left out)."""
    from psmamba.engine.register import register_pair
    from psmamba.io import Image

    def img(a, name):
        return Image(data=a, affine=p.affine, header=None, path=name)

    t0 = time.perf_counter()
    res = register_pair(img(p.fixed, "f"), img(p.moving, "m"), method=method, device="cpu", overview=False,
                        moving_labels=img(p.moving_labels, "ml"), fixed_labels=img(p.fixed_labels, "fl"),
                        **options)
    tm = res.summary.get("timings_s", {})
    sec = time.perf_counter() - t0 - float(tm.get("metrics", 0.0)) - float(tm.get("write", 0.0))
    return res, sec


def scores(res: Any) -> dict[str, Any]:
    """The row fields every ablation keeps: Dice after and before, folding %."""
    summary = res.summary
    return {"dice": summary["dice_after"]["mean"], "before": summary["dice_before"]["mean"],
            "fold": summary.get("folding_percent")}


def levels_run(summary: dict) -> list | None:
    """The io stage's per-level log ``(factor, iterations, converged)``, wherever the summary nests it."""
    stack = [summary]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if "levels_run" in d:
                return [(lv.get("factor"), lv.get("iterations"), lv.get("converged")) for lv in d["levels_run"]]
            stack.extend(d.values())
        elif isinstance(d, list):
            stack.extend(d)
    return None


class Rows:
    """Rows printed and written to a JSON-lines file as they come (a stopped run keeps its rows)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self._fh = open(path, "w")

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps(row, default=str)
        print(line, flush=True)
        self._fh.write(line + "\n")
        self._fh.flush()
        self.rows.append(row)
        return row

    def __enter__(self) -> "Rows":
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()
