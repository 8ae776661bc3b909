"""``psmamba train``: train PSMamba-Net from a YAML config (the paper's protocol by default), or
one of the paper's comparison networks (``--set model.preset=transmorph``: its Table 1 training
is then the default of ``loss`` and ``optim``).

Examples::

    psmamba train --config configs/paper_lpba40.yaml --out runs/lpba40
    psmamba train --config configs/paper_lpba40.yaml --set model.preset=transmorph --out runs/transmorph
    psmamba train --config configs/demo.yaml --set optim.epochs=2 --set run.max_steps=50
    psmamba train --out runs/lpba40 --resume                       # continue exactly
    psmamba train --out runs/lpba40 --resume --set optim.epochs=60 # train longer (new poly decay)
    torchrun --nproc_per_node 4 -m psmamba train --config cfg.yaml # 4 GPUs (DDP)
"""

from __future__ import annotations

import argparse

HELP = "train a registration model from a YAML config (paper protocol by default; DDP with torchrun)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="YAML",
                        help="config file (sections model, data, loss, optim, run); default: the paper's "
                             "protocol on the built-in demo data")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=3e-4 --set model.channels=2 (repeatable)")
    parser.add_argument("--out", "-o", metavar="DIR", help="output folder (overrides run.out)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the output folder from its last.pt (same schedule and pair "
                             "order); with --set optim.epochs=N, train on to N epochs (the poly decay is "
                             "recomputed for N from the current epoch on)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides run.device")
    parser.add_argument("--seed", type=int, help="overrides run.seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve_config(args: argparse.Namespace):
    """The config of this invocation: the file (or, with --resume and no file, the stored one)
    plus flags. The one-shot stops of a stored config (run.max_steps, run.max_minutes) are dropped."""
    from pathlib import Path

    from psmamba.config import apply_overrides, config_from_dict, load_train_config
    from psmamba.engine.train import RESET_ON_RESUME
    from psmamba.errors import PsmambaError

    if args.seed is not None and not 0 <= args.seed < 2**63:  # named as typed, not as the --set it becomes
        raise PsmambaError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    if args.out is not None and not str(args.out).strip():
        raise PsmambaError("--out is empty: name the output folder")
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out={args.out}")
    if args.device:
        overrides.append(f"run.device={args.device}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    if args.no_progress:
        overrides.append("run.progress=false")
    if args.config or not args.resume:
        return load_train_config(args.config, overrides)
    # --resume without --config: the config stored beside the checkpoint
    if not args.out:
        raise PsmambaError("--resume needs --out DIR (the run to continue) or --config")
    from psmamba.engine.checkpointing import load_training_state

    stored = load_training_state(Path(args.out) / "last.pt")["training"]["config"]
    for section, keys in RESET_ON_RESUME.items():
        for key in keys:
            stored.get(section, {}).pop(key, None)  # defaults again, unless set on this command line
    raw = apply_overrides(stored, overrides)
    return config_from_dict(raw, f"{Path(args.out) / 'last.pt'} + --set")


def run(args: argparse.Namespace) -> int:
    from psmamba.config import parse_override
    from psmamba.engine.train import fit

    cfg = _resolve_config(args)
    # a new schedule only when asked for on this command line (a config file that differs is refused)
    reschedule = any(parse_override(o)[0] == ["optim", "epochs"] for o in args.overrides)
    result = fit(cfg, resume=args.resume, reschedule=reschedule)
    if result.best_value is not None:
        best = f"best {result.best_metric} {result.best_value:.4f} (epoch {result.best_epoch})"
    else:
        best = "no validation yet"
    status = "finished" if result.stopped is None else f"stopped ({result.stopped})"
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        epochs = f"{result.epochs_completed} full epoch{'' if result.epochs_completed == 1 else 's'}"
        print(f"training {status} after {result.steps} steps ({epochs}); {best}; checkpoints in {result.out_dir}")
    return 130 if result.stopped == "signal" else 0
