"""Issue 14: does starting io from the shipped network let io do less? On the demo's VAL pairs.

``io`` alone and ``network+io`` (no affine stage: the val pairs share a space), each with io's
most steps per level (1/4, 1/2, 1) at the default 100, 30, 2 and at reduced budgets: the 1/4
level skipped (0, 30, 2), half the 1/2 level's steps (100, 15, 2), both (0, 15, 2), and ``io``
alone with half the 1/2 steps as the control. The variant order rotated from pair to pair, 2
threads, one process. Seconds: from the arrays in memory to both maps (metrics left out).

    python benchmarks/ablations/network_io_budget.py [--threads 2]

Writes ``results/network_io_budget.jsonl`` (one row per run) and prints the means.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ablations._common import Rows, parse_args, register_timed, rotated, scores, val_pairs  # noqa: E402

VARIANTS = (
    ("io", (100, 30, 2)),
    ("network+io", (100, 30, 2)),
    ("network+io", (0, 30, 2)),
    ("network+io", (100, 15, 2)),
    ("network+io", (0, 15, 2)),
    ("io", (100, 15, 2)),
)


def main() -> int:
    args = parse_args(__doc__, "network_io_budget.jsonl")

    import numpy as np
    with Rows(args.out) as out:
        for i, p in enumerate(val_pairs()):
            for method, its in rotated(VARIANTS, i):
                res, sec = register_timed(p, method, deformable={"iterations": its})
                out.add({"pair": p.pair_id, "method": method, "iterations": list(its), "sec": round(sec, 2),
                         **scores(res)})
    print("\nmethod       io steps (1/4, 1/2, 1)  Dice    seconds (mean of 3)")
    for method, its in VARIANTS:
        mine = [r for r in out.rows if r["method"] == method and tuple(r["iterations"]) == its]
        print(f"{method:12s} {str(its):22s}  {np.mean([r['dice'] for r in mine]):.4f}  "
              f"{np.mean([r['sec'] for r in mine]):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
