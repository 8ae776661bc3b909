"""``python -m benchmarks [--quick]``: the speed and accuracy benchmarks, results in ``benchmarks/results/``.

``--quick`` is sized to finish in about 10 minutes on a 2-core CPU; the full run measures
every method (the paper's eight peers included) at 96x112x96 and 160x192x160, inference and a
training step at both, and trains each network 600 steps: roughly 1.2 h of speed run (printed at
its start; good to a factor of 2) plus about 17 min of accuracy run on an idle 2-core CPU, see
``benchmarks/README.md``. Every setting can be overridden (``--help``). Results go to
``speed{tag}.{json,csv,md,png}`` and ``accuracy{tag}.{json,csv,md,png}`` with ``tag`` =
``_quick`` for ``--quick`` and ``_gpu`` added on an accelerator (``--tag`` overrides).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import RESULTS_DIR, load_average, parse_size, wait_for_load

#: settings of the two modes; command-line options override them one by one
#: (lr 1e-4, the paper's, for both networks: at 1e-3 PSMamba-Net's loss diverged in its first
#: steps, checked on validation pairs only; see benchmarks/README.md)
PROFILES = {
    "quick": {
        "sizes": ["32x40x32", "64x80x64"], "train_sizes": ["32x40x32"], "repeats": 3, "train_repeats": 3,
        "mem_limit_gb": 8.0,
        "steps": 60, "iters": 20, "val_every": 1, "grid": "32x40x32", "demo_size": "small", "one_way": True,
        "lr": 1e-4,
    },
    "full": {
        "sizes": ["96x112x96", "160x192x160"], "train_sizes": ["96x112x96", "160x192x160"], "repeats": 3,
        "train_repeats": 2, "mem_limit_gb": 16.0,
        "steps": 600, "iters": 50, "val_every": 1, "grid": "32x40x32", "demo_size": "small", "one_way": True,
        "lr": 1e-4,
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Side-by-side benchmarks: PSMamba-Net vs VoxelMorph, a mambapy-based PSMamba, ANTs SyN and "
                    "(speed) the paper's eight learned peers.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats, a small training budget (~10 min on 2 cores)")
    p.add_argument("--only", choices=("speed", "accuracy"), action="append", help="run only this part (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: benchmarks/results)")
    p.add_argument("--tag", default=None, help="suffix of the result files (default: _quick / '' plus _gpu)")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=None, help="torch/numba/ITK threads (default: the library defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-load", type=float, default=0.0, metavar="LOAD",
                   help="before starting, wait (up to --max-wait s) until the 1-min load average is below LOAD")
    p.add_argument("--max-wait", type=float, default=900.0, metavar="S")
    g = p.add_argument_group("speed")
    g.add_argument("--sizes", nargs="+", default=None, help="volume sizes, e.g. 96x112x96 160x192x160")
    g.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="speed methods, names from benchmarks.peers.METHODS (default: all of them, the paper's "
                        "eight peers included)")
    g.add_argument("--repeats", type=int, default=None, help="timed inference calls per method and size")
    g.add_argument("--train-sizes", "--train-size", dest="train_sizes", nargs="+", default=None,
                   help="sizes of the training-step measurements (default: full run both sizes, --quick the smallest)")
    g.add_argument("--train-repeats", type=int, default=None, help="timed training steps per method (0: none)")
    g.add_argument("--mem-limit-gb", type=float, default=None, help="memory cap per measuring process (0: none)")
    g.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds per probe process (one method), and per (method, size) of the timing process")
    g.add_argument("--inputs", choices=("demo", "random"), default="demo")
    g = p.add_argument_group("accuracy")
    g.add_argument("--demo-size", choices=("small", "full"), default=None, help="demo data set size")
    g.add_argument("--grid", default=None, help="grid the networks train and run on (default: the data's)")
    g.add_argument("--steps", type=int, default=None, help="training steps per network (the shared budget)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate of both networks (default 1e-4)")
    g.add_argument("--iters", type=int, default=None, help="test-time refinement steps per pair")
    g.add_argument("--val-every", type=int, default=None)
    g.add_argument("--rows", nargs="+", default=None, help="accuracy rows (default: all)")
    g.add_argument("--splits", nargs="+", default=["test", "test_hard"])
    g.add_argument("--one-way", dest="one_way", action="store_true", default=None,
                   help="score one direction of each test pair (A->B, not also B->A); --quick does")
    g.add_argument("--both-ways", dest="one_way", action="store_false", help="score every ordered test pair")
    g.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slowest metric)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    prof = dict(PROFILES["quick" if args.quick else "full"])
    for key in ("sizes", "train_sizes", "repeats", "train_repeats", "mem_limit_gb", "steps", "iters", "val_every", "grid", "demo_size",
                "one_way", "lr"):
        value = getattr(args, key)
        if value is not None:
            prof[key] = value
    parts = args.only or ["speed", "accuracy"]
    command = "python -m benchmarks" + ("" if not argv else " " + shlex.join(argv))

    import torch  # noqa: F401  (after argument parsing: --help stays fast)

    from benchmarks.common import machine_info, set_threads
    from psmamba.engine.distributed import resolve_device

    dev = resolve_device(args.device)
    tag = args.tag if args.tag is not None else ("_quick" if args.quick else "") + ("" if dev.type == "cpu" else "_gpu")
    if args.wait_load:
        load = wait_for_load(args.wait_load, args.max_wait, log=print)
        print(f"load average {load}: starting")
    set_threads(args.threads)
    t0 = time.perf_counter()
    print(f"{command}: device {dev}, load average {load_average()}, results -> {args.out} (tag {tag!r})")
    if "speed" in parts:
        from benchmarks.bench_speed import run_speed, write_speed
        from benchmarks.peers import METHODS

        unknown = [m for m in args.methods or () if m not in METHODS]
        if unknown:
            raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        sizes = [parse_size(s) for s in prof["sizes"]]
        res = run_speed(sizes, args.methods or tuple(METHODS), repeats=prof["repeats"],
                        train_sizes=[parse_size(s) for s in prof["train_sizes"]],
                        train_repeats=prof["train_repeats"], device=args.device, threads=args.threads,
                        inputs=args.inputs, mem_limit_gib=prof["mem_limit_gb"] or None, timeout_s=args.timeout,
                        seed=args.seed)
        for p in write_speed(res, machine_info(dev), command, args.out, tag):
            print(f"wrote {p}")
    if "accuracy" in parts:
        from benchmarks.bench_accuracy import ROWS, run_accuracy, write_accuracy

        res = run_accuracy(demo_size=prof["demo_size"], grid=parse_size(prof["grid"]) if prof["grid"] else None,
                           steps=prof["steps"], lr=prof["lr"], iters=prof["iters"], val_every=prof["val_every"],
                           splits=args.splits, rows=args.rows or tuple(ROWS), device=args.device,
                           threads=args.threads, seed=args.seed, hd95=not args.no_hd95, one_way=prof["one_way"])
        for p in write_accuracy(res, machine_info(dev), command, args.out, tag):
            print(f"wrote {p}")
    print(f"done in {time.perf_counter() - t0:.0f} s; load average {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
