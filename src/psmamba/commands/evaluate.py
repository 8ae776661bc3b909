"""``psmamba evaluate``: score a method over many pairs, or compare result files statistically."""

from __future__ import annotations

import argparse

HELP = "evaluate registration over pairs (Dice, HD95, folding, SDlogJ, time) or --compare result CSVs"
#: the CLI keeps freed memory for reuse before running this command (see psmamba.runtime)
KEEP_FREED_MEMORY = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group(
        "pairs (one of; default: the test split of the data the --checkpoint was trained on)")
    src.add_argument("--pairs", metavar="CSV",
                     help="pair list: moving,fixed[,moving_labels,fixed_labels][,pair_id] (header optional; "
                     "a header may add a ddf column for --fields)")
    src.add_argument("--demo", action="store_true", help="the built-in demo data set (its test pairs)")
    src.add_argument("--demo-size", default=None, choices=("small", "full"), help="demo grid: small (64x80x64, default) or full")
    src.add_argument("--config", metavar="YAML", help="a psmamba train config: the data set and split it describes")
    src.add_argument("--split", default="test",
                     help="split of --demo / --config / the checkpoint's data (default test; demo: also test_hard)")
    meth = parser.add_argument_group("method")
    meth.add_argument("--checkpoint", metavar="C", help="trained psmamba checkpoint: without --method its network "
                      "alone (refined with --iters), with --method the network stage of that pipeline")
    meth.add_argument("--identity", action="store_true", help="no registration (the 'before' baseline)")
    meth.add_argument("--iters", type=int, default=0, metavar="N",
                      help="test-time optimisation steps per pair (see psmamba register --help)")
    meth.add_argument("--refine", choices=("weights", "field"), default=None,
                      help="with --checkpoint and --iters: fine-tune a copy of the weights per pair (default) "
                           "or refine the network's field (see psmamba register --help)")
    meth.add_argument("--lr", type=float, default=None, help="io's step with --method (default 1), or Adam's learning rate with --iters")
    meth.add_argument("--lambda", dest="lam", type=float, default=None, metavar="W",
                      help="diffusion weight of --iters (default 1 for a network, 3 for a field)")
    meth.add_argument("--model-size", type=int, nargs=3, metavar=("D", "H", "W"), help="grid the network runs on")
    meth.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    meth.add_argument("--method", metavar="NAME",
                      help="the registration pipeline, as psmamba register's --method: default, identity, affine, "
                      "io, affine+io, network, network+io, affine+network+io, ... (the network: --checkpoint's, else the shipped one)")
    meth.add_argument("--fields", action="store_true",
                      help="score the displacement fields named in the --pairs list's ddf column (another tool's "
                      "results: psmamba/Learn2Reg voxel fields or ITK/ANTs warps, the whole map on the fixed grid) "
                      "instead of registering")
    meth.add_argument("--name", metavar="NAME", help="name in the method column (default: the method's own name; "
                      "without --method, a network is named after its checkpoint file)")
    meth.add_argument("--labels", metavar="L", help="comma-separated label codes to score (default: all non-zero)")
    meth.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster on large volumes)")
    meth.add_argument("--max-pairs", type=int, metavar="N", help="evaluate only the first N pairs (a quick look)")
    parser.add_argument("--out", metavar="CSV",
                        help="results CSV (per pair x label; also writes <stem>_pairs.csv and <stem>_summary.md; "
                        "its folder is created); with --compare: a CSV of the tests")
    cmp_ = parser.add_argument_group("statistics")
    cmp_.add_argument("--compare", nargs="+", metavar="CSV",
                      help="compare two or more results CSVs: paired t / Wilcoxon (Bonferroni), ANOVA + Tukey HSD")
    cmp_.add_argument("--names", nargs="+", metavar="NAME", help="method names for --compare (default: method column)")
    parser.add_argument("--quiet", action="store_true", help="no per-pair progress lines")


def _labels(text: str | None):
    from psmamba.errors import PsmambaError

    from psmamba.checks import check_label_list

    if text is None:
        return None
    try:
        codes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise PsmambaError(f"--labels must be comma-separated integers, got {text!r}") from None
    return check_label_list(codes)


def _compare(args: argparse.Namespace) -> int:
    from psmamba.engine.results import check_writable, format_summary_table, read_results, summarize, write_csv
    from psmamba.engine.stats import compare_methods
    from psmamba.errors import PsmambaError

    if args.names and len(args.names) != len(args.compare):
        raise PsmambaError(f"--names gives {len(args.names)} names for {len(args.compare)} files")
    out = check_writable(args.out) if args.out else None
    results = [read_results(p, name=(args.names[i] if args.names else None)) for i, p in enumerate(args.compare)]
    names = [r.name for r in results]
    for i, r in enumerate(results):  # the same method name twice: tell them apart by file
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path.name})"
    comp = compare_methods({r.name: r.per_pair for r in results})  # its errors come before any output
    # the summary over the pairs every file has, the ones the tests below compare
    common = set.intersection(*(set(r.per_pair) for r in results))
    extra = {r.name: len(set(r.per_pair) - common) for r in results if set(r.per_pair) - common}
    print(format_summary_table([summarize([row for row in r.pair_rows if row.get("pair_id") in common], r.name)
                                for r in results]))
    if extra:
        print(f"(the {len(common)} pairs all files share; left out: "
              + ", ".join(f"{n} {k} more" for n, k in extra.items()) + ")")
    print()
    print(comp.to_text())
    if out is not None:
        rows = comp.to_rows()
        write_csv(out, list(rows[0]), rows, digits=10)
        print(f"\nwrote {out}")
    return 0


def _method(args: argparse.Namespace):
    """The registration method the flags name, and the checkpoint dict (None without one)."""
    from pathlib import Path

    from psmamba.engine.distributed import resolve_device
    from psmamba.engine.methods import Identity, load_model, method_from_options, training_size
    from psmamba.errors import PsmambaError

    if getattr(args, "fields", False):
        if args.checkpoint or args.iters or args.method or args.identity:
            raise PsmambaError("--fields scores the displacement fields the pair list gives: do not combine it with "
                               "--method, --checkpoint, --identity or --iters")
        if not args.pairs:
            raise PsmambaError("--fields reads the displacement fields from the ddf column of a --pairs list")
        return None, None
    if args.identity:
        if args.checkpoint or args.iters or args.method:
            raise PsmambaError("--identity scores unregistered pairs: do not combine it with --method, a checkpoint "
                               "or --iters")
        return Identity(), None
    if args.method:
        from psmamba.engine.register import build_pipeline

        if args.iters:
            raise PsmambaError("give --method or --iters, not both (--iters runs the Adam optimisation of earlier versions)")
        ckpt = None
        if args.checkpoint:
            model, ckpt = load_model(args.checkpoint, device=resolve_device(args.device))
            return build_pipeline(args.method, model=model,
                                  model_size=args.model_size or training_size(ckpt), lr=args.lr, lam=args.lam,
                                  device=args.device), ckpt
        return build_pipeline(args.method, lr=args.lr, lam=args.lam, model_size=args.model_size,
                              device=args.device), None
    if not args.checkpoint and not args.iters:
        raise PsmambaError("nothing to evaluate: give --method NAME, a checkpoint, --identity, --iters N or --fields")
    model = ckpt = None
    grid = args.model_size
    if args.checkpoint:
        model, ckpt = load_model(args.checkpoint, device=resolve_device(args.device))
        grid = grid or training_size(ckpt)  # the network's own grid
    name = Path(args.checkpoint).stem if args.checkpoint else None
    method = method_from_options(model, iters=args.iters, refine=args.refine or "weights", lr=args.lr, lam=args.lam,
                                 grid=grid, name=name, checkpoint=args.checkpoint)
    return method, ckpt


def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric flag, before anything is read (one line naming the flag)."""
    from psmamba.checks import check_number

    check_number("--iters", args.iters, integer=True, nonnegative=True)
    check_number("--lr", args.lr, positive=True)
    check_number("--lambda", args.lam, nonnegative=True)
    check_number("--max-pairs", args.max_pairs, integer=True, positive=True)
    for v in args.model_size or ():
        check_number("--model-size", v, integer=True, minimum=2)
    if getattr(args, "refine", None) is not None and not (args.iters and args.checkpoint and not args.method):
        from psmamba.errors import PsmambaError

        raise PsmambaError("--refine chooses what --iters optimises after a --checkpoint's network: give both "
                           "(without --method), or leave --refine out")


def run(args: argparse.Namespace) -> int:
    from psmamba.errors import PsmambaError

    _check_numbers(args)
    if args.compare:
        if args.pairs or args.demo or args.checkpoint or args.identity or args.iters or args.method or args.fields:
            raise PsmambaError("--compare reads result files only: do not combine it with pairs or a method")
        return _compare(args)

    from psmamba.engine.evaluate import evaluate_pairs, pair_files, split_pairs
    from psmamba.engine.results import check_writable, format_summary_table

    n_sources = sum(bool(x) for x in (args.pairs, args.demo, args.config))
    if n_sources > 1:
        raise PsmambaError("give one source of pairs: --pairs CSV, --demo or --config YAML")
    if args.demo_size is not None and not args.demo:
        raise PsmambaError("--demo-size is the size of --demo's pairs (a config's data.size sets its own)")
    if not args.out:
        raise PsmambaError("--out CSV is required (where the results go)")
    from psmamba.engine.distributed import resolve_device

    resolve_device(args.device)  # a bad --device fails before any file is read
    out = check_writable(args.out)
    labels = _labels(args.labels)
    method, ckpt = _method(args)  # built once, early: a bad checkpoint fails before any pair is read
    if args.pairs:
        pairs = pair_files(args.pairs)
    elif args.demo:
        from psmamba.engine.evaluate import demo_pairs

        pairs = demo_pairs(size=args.demo_size or "small", split=args.split)
    elif args.config:
        _check_not_trained_on(args, ckpt)  # before split_pairs reads and checks every test volume
        pairs = split_pairs(args.config, split=args.split)
    else:
        from psmamba.engine.methods import train_config_of

        cfg = train_config_of(ckpt)
        if cfg is None:
            raise PsmambaError("give the pairs: --pairs CSV, --demo or --config YAML "
                               "(only a checkpoint of psmamba train knows its data set)")
        pairs = split_pairs(cfg, split=args.split)
    if args.max_pairs is not None:
        pairs = pairs[: args.max_pairs]
    result = evaluate_pairs(pairs, method=method, device=args.device, labels=labels, hd95=not args.no_hd95,
                            name=args.name, progress=not args.quiet, fields=args.fields)
    written = result.write(out)
    print(format_summary_table([result.summary()]))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _check_not_trained_on(args, ckpt) -> None:
    """--config with --checkpoint: refuse a split that holds volumes the network trained on."""
    from psmamba.engine.evaluate import _train_config, trained_on
    from psmamba.engine.methods import train_config_of
    from psmamba.errors import PsmambaError

    theirs = train_config_of(ckpt)
    if theirs is None:
        return
    seen = trained_on(args.config, theirs, args.split)
    if seen:
        ours, them = _train_config(args.config), _train_config(theirs)
        why = (f" (its run.seed {ours.run.seed}, the checkpoint's {them.run.seed})"
               if ours.run.seed != them.run.seed else "")
        listed = ", ".join(seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")
        raise PsmambaError(
            f"--config {args.config}: its {args.split!r} split holds {len(seen)} volume(s) that --checkpoint "
            f"{args.checkpoint} was trained or validated on ({listed}): the config draws the split "
            f"differently{why}; evaluate with --checkpoint alone (its own split) or make the config match")

