"""Issue 13: io steps at full size (level 1), on the demo's VAL pairs (not the benchmark's test pairs).

The default pipeline (affine, the shipped network, io) with io's most steps per level (1/4,
1/2, 1) at 100, 30, 0 (the default before 2026-11-30), 100, 30, 2 (the default since), 100, 30,
3 and 100, 30, 5; each pair aligned and misaligned as ``bench_register.py`` misaligns (seed 7),
the variant order rotated from pair to pair, 2 threads.

    python benchmarks/ablations/register_io_full.py [--threads 2]

Writes ``results/register_io_full.jsonl`` (one row per run) and prints the means.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SCHEDULES = {"full0": (100, 30, 0), "full2": (100, 30, 2), "full3": (100, 30, 3), "full5": (100, 30, 5)}


def levels_run(summary: dict) -> list | None:
    """The io stage's per-level log, wherever the summary nests it."""
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "register_io_full.jsonl")
    args = ap.parse_args()

    import numpy as np
    import torch

    from benchmarks.bench_register import _misaligned, demo_bench_data
    from psmamba.deformable import DeformableConfig
    from psmamba.engine.register import register_pair
    from psmamba.io import Image

    torch.set_num_threads(args.threads)
    pairs = demo_bench_data("full", one_way=True, splits=("val",)).pairs["val"]
    pairs = pairs + [_misaligned(p, 7) for p in pairs]
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        for i, p in enumerate(pairs):
            names = list(SCHEDULES)
            names = names[i % len(names):] + names[:i % len(names)]
            for name in names:
                def img(a, n, aff=p.affine):
                    return Image(data=a, affine=aff, header=None, path=n)

                t0 = time.perf_counter()
                res = register_pair(img(p.fixed, "f"), img(p.moving, "m"), method="default",
                                    deformable=DeformableConfig(iterations=SCHEDULES[name]), device="cpu",
                                    overview=False, moving_labels=img(p.moving_labels, "ml"),
                                    fixed_labels=img(p.fixed_labels, "fl"))
                s = res.summary
                tm = s.get("timings_s", {})
                sec = time.perf_counter() - t0 - float(tm.get("metrics", 0.0)) - float(tm.get("write", 0.0))
                row = {"pair": p.pair_id, "mis": p.motion is not None, "cfg": name, "sec": round(sec, 1),
                       "dice": s["dice_after"]["mean"], "before": s["dice_before"]["mean"],
                       "fold": s.get("folding_percent"), "levels": levels_run(s)}
                print(json.dumps(row), flush=True)
                fh.write(json.dumps(row) + "\n")
                rows.append(row)
    print("\nvariant   aligned  misaligned  seconds (mean)")
    for name in SCHEDULES:
        d = {m: [r["dice"] for r in rows if r["cfg"] == name and r["mis"] == m] for m in (False, True)}
        sec = [r["sec"] for r in rows if r["cfg"] == name]
        print(f"{name:8s}  {np.mean(d[False]):.4f}   {np.mean(d[True]):.4f}      {np.mean(sec):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
