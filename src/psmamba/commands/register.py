"""``psmamba register``: register one moving image onto one fixed image and write the results."""

from __future__ import annotations

import argparse

HELP = "register a moving image onto a fixed image (network, test-time optimisation, or both)"
#: the CLI keeps freed memory for reuse before running this command (see psmamba.runtime)
KEEP_FREED_MEMORY = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fixed", required=True, metavar="F", help="fixed image (.nii, .nii.gz, .hdr/.img)")
    parser.add_argument("--moving", required=True, metavar="M", help="moving image (any size/spacing: resampled)")
    parser.add_argument("--moving-labels", metavar="L", help="moving label map (warped nearest-neighbour)")
    parser.add_argument("--fixed-labels", metavar="FL", help="fixed label map (Dice before/after in summary.json)")
    parser.add_argument("--checkpoint", metavar="C", help="trained psmamba checkpoint (psmamba train)")
    parser.add_argument(
        "--iters", type=int, default=0, metavar="N",
        help="test-time optimisation steps of LNCC + lambda*diffusion: of a copy of the network's "
        "weights with --checkpoint, else of the displacement field itself (coarse to fine)",
    )
    parser.add_argument("--refine", choices=("weights", "field"), default="weights",
                        help="with --checkpoint and --iters: fine-tune a copy of the network's weights "
                        "(default), or optimise the network's predicted field directly")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate of --iters (default 1e-4 for weights, 0.1 for a field)")
    parser.add_argument("--lambda", dest="lam", type=float, default=None, metavar="W",
                        help="diffusion regulariser weight of --iters (default: 1, the paper's, for a network; "
                        "3 for a field, which has no network to smooth it)")
    parser.add_argument("--model-size", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="grid the network runs on (default: training size stored in the checkpoint, else the fixed grid)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--no-overview", action="store_true", help="do not draw overview.png")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files replaced)")


def run(args: argparse.Namespace) -> int:
    from psmamba.engine.register import register_pair
    from psmamba.errors import PsmambaError

    if args.checkpoint is None and args.iters <= 0:
        raise PsmambaError("nothing to do: give --checkpoint C and/or --iters N (N > 0)")
    if args.iters < 0:
        raise PsmambaError(f"--iters must be >= 0, got {args.iters}")
    result = register_pair(
        args.fixed, args.moving,
        moving_labels=args.moving_labels, fixed_labels=args.fixed_labels,
        checkpoint=args.checkpoint, iters=args.iters, refine=args.refine, lr=args.lr, lam=args.lam,
        device=args.device, out_dir=args.out, model_size=args.model_size,
        overview=not args.no_overview,
    )
    s = result.summary
    t = s["timings_s"]
    print(f"method: {s['method']} on {s['device']}, model grid {'x'.join(map(str, s['model_grid']))}")
    if s.get("dice_after") is not None:
        print(f"Dice: {s['dice_before']['mean']:.4f} before -> {s['dice_after']['mean']:.4f} after "
              f"({len(s['dice_after']['per_label'])} labels)")
    print(f"folding: {s['folding_percent']:.4f}% of voxels with det J <= 0; SDlogJ {s['sdlogj']:.4f}")
    print(f"time: {t['register']:.2f} s registration, {t['total']:.2f} s total")
    print(f"wrote {', '.join(s['outputs'])} to {result.out_dir}")
    return 0
