"""Issue 13: io steps at full size (level 1), on the demo's VAL pairs (not the benchmark's test pairs).

The default pipeline (affine, the shipped network, io) with io's most steps per level (1/4,
1/2, 1) at 100, 30, 0 (the default before 2026-11-30), 100, 30, 2 (the default since), 100, 30,
3 and 100, 30, 5; each pair aligned and misaligned as ``bench_register.py`` misaligns (seed 7),
the variant order rotated from pair to pair, 2 threads.

    python benchmarks/ablations/register_io_full.py [--threads 2]

Writes ``results/register_io_full.jsonl`` (one row per run) and prints the means.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ablations._common import (  # noqa: E402
    Rows, levels_run, parse_args, register_timed, rotated, scores, val_pairs,
)

SCHEDULES = {"full0": (100, 30, 0), "full2": (100, 30, 2), "full3": (100, 30, 3), "full5": (100, 30, 5)}


def main() -> int:
    args = parse_args(__doc__, "register_io_full.jsonl")

    import numpy as np
    from psmamba.deformable import DeformableConfig

    with Rows(args.out) as out:
        for i, p in enumerate(val_pairs(misaligned=True)):
            for name in rotated(SCHEDULES, i):
                res, sec = register_timed(p, "default", deformable=DeformableConfig(iterations=SCHEDULES[name]))
                out.add({"pair": p.pair_id, "mis": p.motion is not None, "cfg": name, "sec": round(sec, 1),
                         **scores(res), "levels": levels_run(res.summary)})
    print("\nvariant   aligned  misaligned  seconds (mean)")
    for name in SCHEDULES:
        d = {m: [r["dice"] for r in out.rows if r["cfg"] == name and r["mis"] == m] for m in (False, True)}
        sec = [r["sec"] for r in out.rows if r["cfg"] == name]
        print(f"{name:8s}  {np.mean(d[False]):.4f}   {np.mean(d[True]):.4f}      {np.mean(sec):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
