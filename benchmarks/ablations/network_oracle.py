"""Issue 14: how good must the network be for ``network+io`` to reach io's Dice in half its time?

The shipped network does not let io do less (``network_io_budget.py``). This asks the converse
on the demo's VAL pairs: replace the network's prediction by an *oracle* field on the network's
own 48x64x48 grid and see what io needs after it. The oracle stage still runs the shipped network
(its output thrown away), so its time is the real network stage's: inference, resizing, the LNCC
guard and the inverse on its grid.

Oracles, per pair (no affine stage: the val pairs share a space):

* ``io-full``: io alone's own final field (default schedule) resized to the network's grid: the
  best a network at that grid could predict if it had learned io's answer;
* ``io-quarter``: io's field after its 1/4 level only (schedule 100, 0, 0), resized likewise: a
  network that gets the coarse anatomy right.

Each oracle runs alone and before io with the most steps per level (1/4, 1/2, 1) at the default
(100, 30, 2) and at reduced budgets. The variant order rotates from pair to pair; 2 threads, one
process. Seconds: from the arrays in memory to both maps (metrics left out).

    python benchmarks/ablations/network_oracle.py [--threads 2]

Writes ``results/network_oracle.jsonl`` (one row per run) and prints the means.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: (oracle or None for the plain method, method, io steps per level)
VARIANTS = (
    ("io-full", "network", None),
    ("io-full", "network+io", (100, 30, 2)),
    ("io-full", "network+io", (0, 30, 2)),
    ("io-full", "network+io", (0, 10, 2)),
    ("io-full", "network+io", (0, 0, 2)),
    ("io-quarter", "network", None),
    ("io-quarter", "network+io", (0, 30, 2)),
    ("io-quarter", "network+io", (0, 15, 2)),
    ("shipped", "network+io", (0, 15, 2)),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "network_oracle.jsonl")
    args = ap.parse_args()

    import numpy as np
    import torch

    from benchmarks.bench_register import demo_bench_data
    from psmamba.engine.register import build_pipeline, register_pair
    from psmamba.io import Image
    from psmamba.spatial import resize_ddf

    torch.set_num_threads(args.threads)
    pairs = demo_bench_data("full", one_way=True, splits=("val",)).pairs["val"]
    oracle: dict[str, torch.Tensor | None] = {}

    def stage_of(pipe):
        return pipe.method.stages[0] if hasattr(pipe.method, "stages") else pipe.method

    def with_oracle(name, method, its):
        pipe = build_pipeline(method, deformable=None if its is None else {"iterations": its})
        net = stage_of(pipe)
        real = net.predict

        def predict(model, moving, fixed):
            out = real(model, moving, fixed)  # the real network's cost
            return out if name == "shipped" else oracle[name].to(out)

        net.predict = predict
        return pipe

    pipes = {v: with_oracle(*v) for v in VARIANTS}
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        def run(p, key, method, its, override=True):
            def img(a, n, aff=p.affine):
                return Image(data=a, affine=aff, header=None, path=n)

            t0 = time.perf_counter()
            res = register_pair(img(p.fixed, "f"), img(p.moving, "m"), method=method, device="cpu",
                                overview=False, moving_labels=img(p.moving_labels, "ml"),
                                fixed_labels=img(p.fixed_labels, "fl"),
                                **({"deformable": {"iterations": its}} if override else {}))
            tm = res.summary.get("timings_s", {})
            sec = time.perf_counter() - t0 - float(tm.get("metrics", 0.0)) - float(tm.get("write", 0.0))
            row = {"pair": p.pair_id, "oracle": key[0], "method": key[1],
                   "iterations": None if its is None else list(its), "sec": round(sec, 2),
                   "dice": res.summary["dice_after"]["mean"], "before": res.summary["dice_before"]["mean"],
                   "fold": res.summary.get("folding_percent")}
            print(json.dumps(row), flush=True)
            fh.write(json.dumps(row) + "\n")
            rows.append(row)
            return res

        for i, p in enumerate(pairs):
            grid = stage_of(pipes[VARIANTS[0]]).grid
            # io alone first: it is the reference and gives the oracles
            full = run(p, (None, "io"), "io", (100, 30, 2))
            quarter = run(p, ("(oracle)", "io"), "io", (100, 0, 0))
            for name, res in (("io-full", full), ("io-quarter", quarter)):
                oracle[name] = resize_ddf(torch.from_numpy(res.ddf)[None].float(), grid)
            order = list(VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)])
            for v in order:
                run(p, v, pipes[v], v[2], override=False)
    print("\noracle       method       io steps (1/4, 1/2, 1)  Dice    seconds  (mean of the val pairs)")
    keys = [(None, "io", [100, 30, 2]), ("(oracle)", "io", [100, 0, 0])] + [
        (o, m, None if its is None else list(its)) for o, m, its in VARIANTS]
    for o, m, its in keys:
        mine = [r for r in rows if r["oracle"] == o and r["method"] == m and
                (r["iterations"] == its or its is None and r["iterations"] is None)]
        if mine:
            print(f"{str(o or '-'):12s} {m:12s} {str(its or '-'):22s}  {np.mean([r['dice'] for r in mine]):.4f}  "
                  f"{np.mean([r['sec'] for r in mine]):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
