"""Validation Dice against steps of one or more training runs, from their ``metrics.csv``.

Usage::

    python benchmarks/plot_training.py runs/pretrain/metrics.csv=paper \\
        runs/pretrain_baseline/metrics.csv=baseline_conv --baseline 0.60 --out curve.png

Each argument is ``CSV[=NAME]`` (default name: the run folder's name). ``--baseline`` draws the
Dice before registration as a dashed line. A run still going can be plotted any time: the
trainer flushes every row as it writes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from psmamba.errors import PsmambaError
    from psmamba.viz import read_training_log, training_curves

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="CSV[=NAME]")
    p.add_argument("--baseline", type=float, default=None, help="Dice before registration (dashed line)")
    p.add_argument("--title", default="Validation Dice (network alone, demo val pairs)")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    runs = {}
    for text in args.runs:
        path, _, name = text.partition("=")
        runs[name or Path(path).parent.name] = path
    try:
        out = training_curves(runs, args.out, baseline=args.baseline, title=args.title)
        for name, path in runs.items():
            log = read_training_log(path)
            print(f"{name}: {len(log['step'])} validations, last step {int(log['step'][-1])}, "
                  f"Dice {log['dice'][-1]:.4f} (best {max(log['dice']):.4f})")
    except PsmambaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
