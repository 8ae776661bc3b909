"""``psmamba demo``: the whole workflow on the built-in real example, in minutes on a CPU.

1. builds (or reads from the cache) the demo data set: real brain templates with real
   subcortical label maps (:mod:`psmamba.data.demo`, nothing downloaded);
2. trains a small PSMamba-Net on its training pairs within a time budget (``--minutes``), or
   loads the model a previous demo left in the output folder;
3. registers a held-out pair with it (``psmamba.engine.register.register_pair``): the network
   alone, then (``--refine io``, the default) the network's field refined by the instance
   optimisation that ``psmamba register`` runs after its network (``--method network+io``), and
   io alone for comparison; the refined registration writes ``warped.nii.gz``, ``ddf.nii.gz``,
   ``warped_labels.nii.gz``, ``jacobian.nii.gz``, ``summary.json`` and ``overview.png``;
4. prints the label Dice and the folding before and after registration.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

#: ``--refine`` choices (see :func:`add_arguments`)
REFINEMENTS = ("io", "field", "none")
#: ``--refine field``'s steps when ``--iters`` is not given
FIELD_ITERS = 120

HELP = "train a small model on the built-in real example and register a held-out pair (a few minutes on a CPU)"
#: the CLI keeps freed memory for reuse before running this command (see psmamba.runtime)
KEEP_FREED_MEMORY = True

#: The demo's training run (``configs/demo.yaml`` holds the same settings, for ``psmamba train``).
#: The paper's protocol (Adam 1e-4 amsgrad, LNCC + diffusion) on a network small enough for a CPU:
#: c = 1 (540k parameters, SMB blocks and K = 3 refinement passes as in the paper), the demo
#: volumes at half size (5 mm), an LNCC window of 5 voxels (25 mm, about the paper's 9 mm window
#: at 1 mm scaled by the coarser grid) and Dice supervision, because the demo has labels and a few
#: CPU minutes are a few dozen steps. ``epochs`` is large so that the time budget ends the run.
DEMO_CONFIG: dict[str, Any] = {
    "model": {"preset": "paper", "channels": 1, "sir_iters": 3},
    "data": {"source": "demo", "size": "small", "resize": [32, 40, 32], "max_val_pairs": 2},
    "loss": {"window": 5, "reg_weight": 1.0, "dice_weight": 1.0},
    "optim": {"lr": 1e-4, "epochs": 100},
    "run": {"log_every": 5, "checkpoint_every": 25, "max_minutes": 4.0},
}

#: ``--quick`` (tests): a tiny network on a tiny grid, two steps, one validation pair.
QUICK_OVERRIDES: dict[str, Any] = {
    "model": {"preset": "baseline_conv", "channels": 1, "sir_iters": 1},
    "data": {"resize": [16, 20, 16], "max_val_pairs": 1},
    "run": {"max_steps": 2, "max_minutes": None, "log_every": 1, "checkpoint_every": 0},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", "-o", default="psmamba_out/demo", metavar="DIR",
                        help="output folder: train/ (the model) and register/ (the results); default %(default)s")
    parser.add_argument("--minutes", type=float, default=4.0,
                        help="training time budget in minutes (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a few training steps of a tiny network (checks the pipeline; results mean nothing)")
    parser.add_argument("--retrain", action="store_true",
                        help="train again even if the output folder holds a trained model")
    parser.add_argument("--refine", choices=REFINEMENTS, default="io",
                        help="how the network's field is refined on the held-out pair: io (default: the "
                             "diffeomorphic instance optimisation of `register --method network+io`), field "
                             "(Adam on the field for --iters steps, `register --refine field`) or none")
    parser.add_argument("--iters", type=int, default=None,
                        help="steps of --refine field (default 120); 0: the network alone (--refine none)")
    parser.add_argument("--split", choices=("test_hard", "test"), default="test_hard",
                        help="held-out pairs: deformed copies of the templates (test_hard, default) or the "
                             "three undeformed templates (test)")
    parser.add_argument("--pair", type=int, default=0, help="which pair of the split (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--cache-dir", metavar="DIR", help="demo data cache (default $PSMAMBA_CACHE or ~/.cache/psmamba)")
    parser.add_argument("--seed", type=int, default=0)


def demo_config(out: str, minutes: float, quick: bool, device: str, seed: int, cache_dir: str | None) -> dict:
    """The training config (nested dict) the demo runs."""
    cfg = copy.deepcopy(DEMO_CONFIG)
    if quick:
        for section, values in QUICK_OVERRIDES.items():
            if section == "model":
                cfg["model"] = dict(values)
            else:
                cfg[section].update(values)
    else:
        cfg["run"]["max_minutes"] = float(minutes)
    cfg["run"].update({"out": out, "device": device, "seed": int(seed)})
    if cache_dir:
        cfg["data"]["options"] = {"cache_dir": cache_dir}
    return cfg


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from psmamba.errors import PsmambaError

    from psmamba.checks import check_number
    from psmamba.files import probe_writable

    t0 = time.perf_counter()
    # every flag before the data is built (a bad --minutes or --seed was found by the training config)
    check_number("--minutes", args.minutes, positive=True)  # finite: inf started a 100-epoch run
    if not 0 <= args.seed < 2**63:
        raise PsmambaError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    check_number("--pair", args.pair, integer=True, nonnegative=True)
    refine, iters = _refinement(args.refine, args.iters)
    if not str(args.out).strip():
        raise PsmambaError("--out is empty: name the output folder")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise PsmambaError(f"--out {out} exists and is not a folder")
    probe_writable(out, "--out")
    if args.cache_dir is not None and Path(args.cache_dir).expanduser().exists() \
            and not Path(args.cache_dir).expanduser().is_dir():
        raise PsmambaError(f"--cache-dir {args.cache_dir} is a file, not a folder")
    from psmamba.engine.distributed import resolve_device

    resolve_device(args.device)
    train_dir, reg_dir = out / "train", out / "register"

    # ---- 1. the data
    from psmamba.data.demo import DEMO_SIZES, build_demo

    print("psmamba demo: building the example data set (first time only) ...", flush=True)
    demo = build_demo("small", cache_dir=args.cache_dir)
    shape, spacing = DEMO_SIZES["small"]
    pairs = demo.pairs.get(args.split) or []
    if not 0 <= args.pair < len(pairs):
        raise PsmambaError(f"--pair {args.pair}: the {args.split} split has {len(pairs)} pairs (0..{len(pairs) - 1})")
    print(f"  {len(demo.volumes)} volumes of real brain templates with 14 subcortical labels, "
          f"{'x'.join(map(str, shape))} at {spacing} mm; {len(demo.pairs['train'])} training pairs, "
          f"{len(demo.pairs.get('val', []))} validation pairs ({demo.root})")

    # ---- 2. the model: reuse, continue or train
    from psmamba.config import config_from_dict

    cfg = config_from_dict(demo_config(str(train_dir), args.minutes, args.quick, args.device, args.seed,
                                       args.cache_dir), "psmamba demo")
    best = train_dir / "best.pt"
    t_train = 0.0
    trained_steps = None
    if best.is_file() and not args.retrain:
        print(f"using the model trained by an earlier demo: {best} (--retrain to train again)")
    else:
        import shutil

        from psmamba.engine.train import fit

        if args.retrain and train_dir.exists():
            shutil.rmtree(train_dir)
        resume = (train_dir / "last.pt").is_file()
        mc = cfg.model_config()
        budget = "2 steps (--quick)" if args.quick else f"up to {args.minutes:g} min"
        print(f"training PSMamba-Net ({cfg.model['preset']}, c={mc.channels}, K={mc.sir_iters}) on the "
              f"{'x'.join(map(str, cfg.data.resize))} grid for {budget}"
              + (" (continuing an interrupted demo)" if resume else "") + " ...", flush=True)
        t1 = time.perf_counter()
        result = fit(cfg, resume=resume)
        t_train = time.perf_counter() - t1
        if result.best_checkpoint is None:
            raise PsmambaError(f"training produced no validated model in {train_dir}; run the demo again")
        print(f"  {result.steps} steps in {t_train / 60:.1f} min; best validation Dice "
              f"{result.best_value:.3f} (epoch {result.best_epoch}); model: {result.best_checkpoint}")
        trained_steps = result.steps

    # ---- 3. register a held-out pair
    from psmamba.engine.register import register_pair
    from psmamba.metrics import folding_percent

    m_id, f_id = pairs[args.pair]
    mv, fx = demo.load(m_id), demo.load(f_id)
    print(f"registering the held-out {args.split} pair {m_id} -> {f_id} ...", flush=True)
    # (row, register_pair's options); the row marked True writes the outputs
    network = ("after (network)", {"checkpoint": best, "method": "network"}, refine == "none")
    runs = {"none": [network],
            # Adam on the network's field: LNCC window 9 + diffusion (register --refine field)
            "field": [network, (f"after (network + {iters} refinement steps)",
                                {"checkpoint": best, "iters": iters, "refine": "field"}, True)],
            # register's own pipeline after a network (no affine stage: the demo's pairs share a
            # space): the network's field, kept if it raises the LNCC, refined diffeomorphically;
            # then io alone, to show what the network adds
            "io": [network, ("after (network + io)", {"checkpoint": best, "method": "network+io"}, True),
                   ("io alone (no network)", {"method": "io"}, False)]}[refine]
    rows = []
    for label, kw, writes in runs:
        r = register_pair(fx, mv, moving_labels=mv, fixed_labels=fx, device=args.device,
                          out_dir=reg_dir if writes else None, **kw)
        rows.append((label, r.dice_after, r.summary["folding_percent"]))
        if writes:
            res = r
    import numpy as np

    rows.insert(0, ("before (identity)", res.dice_before, float(folding_percent(np.zeros((3, 4, 4, 4))))))

    # ---- 4. report
    width = max(len(r[0]) for r in rows)
    print(f"\n  {'':{width}}  mean Dice (14 labels)  folding %")
    for name, dice, fold in rows:
        print(f"  {name:{width}}  {dice:21.3f}  {fold:9.3f}")
    net_gain = dict((r[0], r[1]) for r in rows)["after (network)"] - res.dice_before
    if trained_steps is not None and trained_steps < 500 and not args.quick and net_gain < 0.05:
        # at the paper's learning rate the registration heads (initialised near zero) need
        # hundreds of steps before the predicted fields grow: say so instead of leaving a puzzle
        print(f"\n  note: {trained_steps} training steps teach the network little (its fields start near zero);"
              f"\n  give it more time (--minutes 30 --retrain) or a GPU, which runs thousands of steps in the same time.")
    files = ", ".join(res.summary.get("outputs", []))
    print(f"\noutputs in {reg_dir}: {files}")
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min"
          + (f" (training {t_train / 60:.1f} min)" if t_train else ""))
    return 0


def _refinement(refine: str, iters: int | None) -> tuple[str, int]:
    """``--refine`` and ``--iters`` checked together: ``(refine, field steps)``."""
    from psmamba.errors import PsmambaError

    if iters is None:
        return refine, FIELD_ITERS
    if iters < 0:
        raise PsmambaError(f"--iters must be >= 0, got {iters}")
    if iters == 0:  # the network alone, as before --refine existed
        return "none", 0
    if refine != "field":
        raise PsmambaError(f"--iters sets the steps of --refine field, not of --refine {refine}")
    return refine, iters
