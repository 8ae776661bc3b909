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

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ablations._common import Rows, parse_args, register_timed, rotated, scores, val_pairs  # noqa: E402

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
    args = parse_args(__doc__, "network_oracle.jsonl")

    import numpy as np
    import torch

    from psmamba.engine.register import build_pipeline
    from psmamba.spatial import resize_ddf

    oracle: dict[str, torch.Tensor] = {}

    def with_oracle(name, method, its):
        """The pipeline of ``method`` whose network stage runs the shipped network (for its
        cost) and returns ``oracle[name]`` instead (``name == "shipped"``: its own field)."""
        pipe = build_pipeline(method, deformable=None if its is None else {"iterations": its})
        net = pipe.method.stages[0] if hasattr(pipe.method, "stages") else pipe.method
        real = net.predict

        def predict(model, moving, fixed):
            out = real(model, moving, fixed)
            return out if name == "shipped" else oracle[name].to(out)

        net.predict = predict
        return pipe, net.grid

    pipes = {v: with_oracle(*v) for v in VARIANTS}
    grid = pipes[VARIANTS[0]][1]
    with Rows(args.out) as out:
        def run(p, key, method, its, **options):
            res, sec = register_timed(p, method, **options)
            out.add({"pair": p.pair_id, "oracle": key[0], "method": key[1],
                     "iterations": None if its is None else list(its), "sec": round(sec, 2), **scores(res)})
            return res

        for i, p in enumerate(val_pairs()):
            # io alone first: it is the reference and gives the oracles
            for name, key, its in (("io-full", None, (100, 30, 2)), ("io-quarter", "(oracle)", (100, 0, 0))):
                res = run(p, (key, "io"), "io", its, deformable={"iterations": its})
                oracle[name] = resize_ddf(torch.from_numpy(res.ddf)[None].float(), grid)
            for v in rotated(VARIANTS, i):
                run(p, v, pipes[v][0], v[2])
        rows = out.rows
    print("\noracle       method       io steps (1/4, 1/2, 1)  Dice    seconds  (mean of the val pairs)")
    keys = [(None, "io", [100, 30, 2]), ("(oracle)", "io", [100, 0, 0])] + [
        (o, m, None if its is None else list(its)) for o, m, its in VARIANTS]
    for o, m, its in keys:
        mine = [r for r in rows if r["oracle"] == o and r["method"] == m and r["iterations"] == its]
        if mine:
            print(f"{str(o or '-'):12s} {m:12s} {str(its or '-'):22s}  {np.mean([r['dice'] for r in mine]):.4f}  "
                  f"{np.mean([r['sec'] for r in mine]):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
