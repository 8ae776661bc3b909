"""``psmamba reproduce``: the paper's comparison -- train and evaluate methods on a data set, then
write its Table 2/3 rows, statistics and Figures 2-6 (:mod:`psmamba.engine.reproduce`).

Examples::

    psmamba reproduce --quick --out runs/repro-demo                  # minutes on a CPU (demo data)
    psmamba reproduce --config-dir configs/paper --data lpba40 --set data.root=/data/LPBA40 \\
        --methods paper,transmorph,im2grid,prnet_pp,modet,pivit,mambamorph,transmatch,voxelmorph \\
        --out runs/repro-lpba40                                      # the full protocol: a GPU job
"""

from __future__ import annotations

import argparse

HELP = "train and evaluate PSMamba-Net and its peers on a data set; write the paper's tables, statistics and figures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", default="configs/paper", metavar="DIR",
                        help="folder of <data>/<method>.yaml configs (default: configs/paper)")
    parser.add_argument("--data", metavar="NAME", help="data set: a folder of --config-dir (lpba40, mindboggle, abdomen)")
    parser.add_argument("--methods", metavar="A,B,...",
                        help="comma-separated model presets / peers in table order (default: the paper's nine; "
                             "--quick: paper,voxelmorph,mambamorph,transmorph)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created; an earlier reproduction there is resumed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value in every method's config, e.g. --set data.root=/data/LPBA40 (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="small runs on the built-in demo data (a few steps on a coarse grid; minutes on a CPU)")
    parser.add_argument("--steps", type=int, metavar="N", help="optimiser steps of each training (run.max_steps; "
                        "--quick default 10)")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="--quick: the training grid (default 32 40 32)")
    parser.add_argument("--split", default="test", help="the evaluated split (default: test)")
    parser.add_argument("--max-pairs", type=int, metavar="N", help="evaluate only the first N pairs")
    parser.add_argument("--reference", metavar="METHOD",
                        help="the method the paired tests compare with the others (default: paper)")
    parser.add_argument("--figure-pair", type=int, default=0, metavar="K",
                        help="index of the evaluated pair shown in Figure 6 (default 0)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="training and evaluation device")
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 (always skipped with --quick)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from psmamba.engine.reproduce import PAPER_METHODS, QUICK_METHODS, reproduce
    from psmamba.errors import PsmambaError

    if args.quick and args.data not in (None, "demo"):
        raise PsmambaError("--quick runs on the built-in demo data: drop --data (or drop --quick)")
    if not args.quick and not args.data:
        raise PsmambaError("--data is required (a folder of --config-dir: lpba40, mindboggle, abdomen), or use --quick")
    default = QUICK_METHODS if args.quick else PAPER_METHODS
    methods = args.methods.split(",") if args.methods else list(default)
    result = reproduce(
        args.config_dir, args.data, methods, args.out, overrides=args.overrides, quick=args.quick, steps=args.steps,
        grid=args.grid, split=args.split, max_pairs=args.max_pairs, device=args.device,
        hd95=not (args.no_hd95 or args.quick), figure_pair=args.figure_pair, reference=args.reference,
        progress=None if args.quiet else (lambda msg: print(msg, flush=True)),
    )
    print((result.out / "table.md").read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0
