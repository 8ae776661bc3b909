"""``psmamba plot``: Dice box plots per ROI across methods and a per-pair Dice plot."""

from __future__ import annotations

import argparse

HELP = "plot per-ROI Dice box plots and per-pair Dice across methods from evaluation CSVs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="CSV", help="results CSVs of psmamba evaluate (per pair x label)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="method names (default: the method column)")
    parser.add_argument("--label-names", metavar="FILE",
                        help="CSV or TSV of code,name to label the ROI axis (default: the codes)")
    parser.add_argument("--labels", metavar="L", help="comma-separated label codes for dice_per_roi.png (default: all; dice_per_pair.png keeps each pair's mean over the labels its CSV scored)")
    parser.add_argument("--title", default=None, help="title of the box plot")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for dice_per_roi.png and dice_per_pair.png (created)")


def _label_names(path: str | None) -> dict[int, str] | None:
    import csv
    from pathlib import Path

    from psmamba.errors import PsmambaError

    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise PsmambaError(f"label names file {p} does not exist")
    text = p.read_text(encoding="utf-8-sig")
    delim = "\t" if "\t" in text.splitlines()[0] else ","
    names = {}
    for row in csv.reader(text.splitlines(), delimiter=delim):
        if len(row) >= 2 and row[0].strip().lstrip("-").isdigit():
            names[int(row[0])] = row[1].strip()
    if not names:
        raise PsmambaError(f"label names file {p}: no 'code,name' rows found")
    return names


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from psmamba.checks import check_label_codes
    from psmamba.commands.evaluate import _labels
    from psmamba.engine.results import read_results
    from psmamba.errors import PsmambaError
    from psmamba.viz import dice_boxplot, pair_dice_plot

    if args.names and len(args.names) != len(args.results):
        raise PsmambaError(f"--names gives {len(args.names)} names for {len(args.results)} files")
    results = [read_results(p, name=(args.names[i] if args.names else None)) for i, p in enumerate(args.results)]
    names = [r.name for r in results]
    for r in results:
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path.name})"
    wanted = _labels(args.labels)
    if wanted is not None:
        scored = set().union(*(r.per_label for r in results))
        if not scored:
            raise PsmambaError("--labels picks labels of per-label rows, and these files have none "
                               "(give the per pair x label CSVs psmamba evaluate writes)")
        check_label_codes(wanted, scored, "these results", "--labels")
    label_names = _label_names(args.label_names)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PsmambaError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PsmambaError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    written = []
    per_label = {
        r.name: {lab: list(v.values()) for lab, v in r.per_label.items() if wanted is None or lab in wanted}
        for r in results
    }
    if any(per_label.values()):
        written.append(dice_boxplot(per_label, out / "dice_per_roi.png", label_names=label_names,
                                    title=args.title or "Dice per ROI"))
    else:
        print("no per-label rows in these files: skipping dice_per_roi.png (give the per pair x label CSVs)")
    written.append(pair_dice_plot({r.name: r.per_pair for r in results}, out / "dice_per_pair.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
