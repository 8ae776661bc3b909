"""``psmamba register``: register one moving image onto one fixed image and write the results."""

from __future__ import annotations

import argparse

HELP = "register a moving image onto a fixed image (by default: affine, the shipped network, diffeomorphic refinement)"
#: the CLI keeps freed memory for reuse before running this command (see psmamba.runtime)
KEEP_FREED_MEMORY = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fixed", required=True, metavar="F", help="fixed image (.nii, .nii.gz, .hdr/.img)")
    parser.add_argument("--moving", required=True, metavar="M", help="moving image (any size, spacing, position)")
    parser.add_argument("--moving-labels", metavar="L", help="moving label map (warped nearest-neighbour)")
    parser.add_argument("--fixed-labels", metavar="FL", help="fixed label map (Dice before/after in summary.json)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files replaced)")
    meth = parser.add_argument_group("method")
    meth.add_argument(
        "--method", metavar="NAME",
        help="default (affine, then the network: the shipped one or --checkpoint's, then io), identity, affine, "
        "rigid, io, "
        "network, or stages joined by '+' in the order rigid|affine, network, io: affine+io, network+io, "
        "affine+network+io, ...",
    )
    meth.add_argument("--affine-only", action="store_true", help="stop after the affine stage (= --method affine)")
    meth.add_argument("--initial-transform", metavar="T",
                      help="an affine found before, as an ITK/ANTs transform file (.txt, .tfm, .mat: ANTs' "
                      "0GenericAffine.mat, an earlier affine.txt): the rigid/affine stage starts from it; a method "
                      "without one (io, network+io, identity) uses it as it is")
    meth.add_argument("--checkpoint", metavar="C",
                      help="trained psmamba checkpoint (psmamba train) instead of the shipped network")
    meth.add_argument("--similarity", default="lncc", choices=("lncc", "mi"),
                      help="of the rigid/affine stage: lncc (same modality, default) or mi (mutual information, "
                      "across modalities, e.g. MR to CT)")
    meth.add_argument("--fixed-mask", metavar="FM", help="fixed mask (non-zero inside): scaling and similarity only there")
    meth.add_argument("--moving-mask", metavar="MM", help="moving mask (non-zero inside)")
    meth.add_argument("--fixed-window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                      help="intensity window of the fixed image, e.g. a CT window in HU: -500 800 "
                      "(default: its 0.5 and 99.5 percentiles)")
    meth.add_argument("--moving-window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                      help="intensity window of the moving image (see --fixed-window)")
    meth.add_argument("--lr", type=float, default=None,
                      help="step of the io stage (default 1), or Adam's learning rate with --iters")
    meth.add_argument("--io-iterations", type=int, nargs="+", metavar="N",
                      help="the most io steps per pyramid level, coarse to fine (default 100 30 2 at 1/4, 1/2, 1)")
    meth.add_argument("--sigma-field", type=float, metavar="S",
                      help="io: Gaussian smoothing of the velocity after each step, voxels (default 0.5, at most 32)")
    meth.add_argument("--sigma-update", type=float, metavar="S",
                      help="io: Gaussian smoothing of each update, voxels (default 1.5, at most 32)")
    legacy = parser.add_argument_group("Adam optimisation of earlier versions (no affine stage)")
    legacy.add_argument(
        "--iters", type=int, default=0, metavar="N",
        help="Adam steps of LNCC + lambda*diffusion: of a copy of the network's weights with --checkpoint, "
        "else of the displacement field itself (coarse to fine)",
    )
    legacy.add_argument("--refine", choices=("weights", "field"), default=None,
                        help="with --checkpoint and --iters: fine-tune a copy of the network's weights "
                        "(default), or optimise the network's predicted field directly")
    legacy.add_argument("--lambda", dest="lam", type=float, default=None, metavar="W",
                        help="diffusion weight of --iters (default: 1 for a network, 3 for a field)")
    run_ = parser.add_argument_group("run")
    run_.add_argument("--model-size", type=int, nargs=3, metavar=("D", "H", "W"),
                      help="grid the network runs on (default: training size stored in the checkpoint)")
    run_.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    run_.add_argument("--no-overview", action="store_true", help="do not draw overview.png")
    run_.add_argument("--itk", action="store_true",
                      help="also write warp_itk.nii.gz and warp_itk_inverse.nii.gz: the whole map and its inverse as "
                      "ITK/ANTs displacement field transforms (antsApplyTransforms, SimpleITK, 3D Slicer)")


def run(args: argparse.Namespace) -> int:
    from psmamba.checks import check_number
    from psmamba.deformable import _SIGMA_MAX
    from psmamba.engine.register import register_pair
    from psmamba.errors import PsmambaError

    method = args.method
    if method is not None and not method.strip():
        raise PsmambaError("--method is empty: name a method (default, io, affine+io, ...) or leave the flag out")
    if not str(args.out).strip():
        raise PsmambaError("--out is empty: name the output folder")
    if args.refine is not None and not (args.iters and args.checkpoint):
        raise PsmambaError("--refine chooses what --iters optimises after a --checkpoint's network: give both, "
                           "or leave --refine out")
    if args.fixed_labels and not args.moving_labels:
        raise PsmambaError("--fixed-labels is compared with the warped --moving-labels (Dice): give both")
    if args.affine_only:
        if method not in (None, "affine"):
            raise PsmambaError(f"--affine-only and --method {method} contradict each other")
        method = "affine"
    for v in args.model_size or ():
        check_number("--model-size", v, integer=True, minimum=2)
    deformable = {}
    if args.io_iterations is not None:
        for n in args.io_iterations:
            check_number("--io-iterations", n, integer=True, nonnegative=True)
        deformable["iterations"] = tuple(args.io_iterations)
    for flag, key, value in (("--sigma-field", "sigma_field", args.sigma_field),
                             ("--sigma-update", "sigma_update", args.sigma_update)):
        if value is not None:
            deformable[key] = check_number(flag, value, nonnegative=True, maximum=_SIGMA_MAX)
    if "iterations" in deformable:
        from psmamba.deformable import DeformableConfig

        levels = DeformableConfig().levels
        if len(deformable["iterations"]) != len(levels):
            raise PsmambaError(f"--io-iterations takes one count per level ({len(levels)}: "
                               f"1/{', 1/'.join(map(str, levels))}), got {len(deformable['iterations'])}")
    if deformable and args.iters:
        raise PsmambaError("--io-iterations/--sigma-* set the io stage; --iters runs the Adam optimisation instead")
    result = register_pair(
        args.fixed, args.moving,
        moving_labels=args.moving_labels, fixed_labels=args.fixed_labels,
        fixed_mask=args.fixed_mask, moving_mask=args.moving_mask,
        method=method, checkpoint=args.checkpoint, iters=args.iters, refine=args.refine or "weights", lr=args.lr, lam=args.lam,
        similarity=args.similarity, fixed_window=args.fixed_window, moving_window=args.moving_window,
        deformable=deformable or None,
        device=args.device, out_dir=args.out, model_size=args.model_size,
        overview=not args.no_overview, itk=args.itk, initial_transform=args.initial_transform,
    )
    s = result.summary
    t = s["timings_s"]
    print(f"method: {s['method']} on {s['device']}")
    if s.get("affine") and s["affine"]["stage"] == "given":
        print(f"affine: as given by --initial-transform {args.initial_transform}")
    elif s.get("affine"):
        start = f", from --initial-transform {args.initial_transform}" if args.initial_transform else ""
        print(f"affine stage: {s['affine']['stage']} ({s['affine']['similarity']}{start}) in "
              f"{s['affine']['time_s']:.1f} s")
    if s.get("dice_after") is not None:
        print(f"Dice: {s['dice_before']['mean']:.4f} before -> {s['dice_after']['mean']:.4f} after "
              f"({len(s['dice_after']['per_label'])} labels)")
    print(f"folding: {s['folding_percent']:.4f}% of voxels with det J <= 0; SDlogJ {s['sdlogj']:.4f}")
    print(f"time: {t['register']:.2f} s registration, {t['total']:.2f} s total")
    print(f"wrote {', '.join(s['outputs'])} to {result.out_dir}")
    return 0
