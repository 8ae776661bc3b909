"""The shipped network against no registration and instance optimisation: issue 14's benchmark.

Protocol (``python -m benchmarks.bench_pretrained``; ``--quick`` for a smoke run):

* **Pairs**: the demo's full-size (160x192x160, 1 mm) ``test`` pairs (three real MNI templates)
  and ``test_hard`` pairs (deformed copies), one direction of each pair by default (``--both-ways``
  for all six ordered pairs), loaded by :func:`benchmarks.bench_register.demo_bench_data`.
* **Methods**: ``psmamba.register`` with ``method=`` each of :data:`METHODS`, without
  ``checkpoint=``: the network is the shipped one (:mod:`psmamba.models.pretrained`), run on its
  own grid and its field resized to the pair's. ``identity`` scores the unregistered pair.
* **One fresh process per method and pair** (the runner of ``bench_register``), 2 threads, the
  method order rotated from pair to pair; the same scoring as ``bench_register`` (Dice over the
  labels, HD95, folding %, SDlogJ, seconds from the arrays in memory to the field).
* **Inference at the network's grid**: the median of 5 forward passes of the shipped network
  on its grid (after one warm-up), in this process with the same threads.
* The issue's goals are evaluated from this one run and printed as PASS/FAIL with the figures.

Outputs (``benchmarks/results/``): ``pretrained{tag}.json``, ``.csv`` (a row per method and
pair), ``.md`` (a table per split, the goals) and ``.png`` (Dice against seconds).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    fmt,
    load_average,
    machine_lines,
    markdown_table,
    run_and_report,
    write_csv,
    write_json,
    write_text,
)

#: psmamba method -> table label
METHODS: dict[str, str] = {
    "identity": "no registration",
    "network": "network alone",
    "io": "instance optimisation (io) alone",
    "network+io": "network + io",
    "affine+io": "affine + io",
    "affine+network+io": "affine + network + io (default)",
}
SPLITS = ("test", "test_hard")
GOALS = {
    "network_gain_min": 0.05,  # network Dice - identity Dice on test_hard
    "network_folding_max": 0.05,  # %
    "inference_max_s": 2.0,  # one forward pass at the network's grid
    "time_fraction_max": 0.5,  # network+io seconds / io seconds, at io's Dice or better
}
COLUMNS = ("split", "method", "pair_id", "moving", "fixed", "status", "dice_mean", "dice_before_mean", "hd95_mean_mm",
           "folding_percent", "sdlogj", "max_disp_vox", "seconds", "call_seconds", "peak_rss_mib", "order", "ran_as",
           "error")


def time_inference(threads: int, repeats: int = 5, checkpoint: str | None = None) -> dict[str, Any]:
    """Seconds of one forward pass of the shipped network (or ``checkpoint``'s) at its grid
    (median of ``repeats``)."""
    import torch

    from psmamba.engine.methods import load_model, training_size
    from psmamba.models import pretrained

    torch.set_num_threads(threads)
    model, ckpt = load_model(checkpoint) if checkpoint else pretrained.load_shipped()
    grid = training_size(ckpt)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1, *grid), generator=gen)
    y = torch.rand((1, 1, *grid), generator=gen)
    times = []
    with torch.no_grad():
        model(x, y)  # warm-up (allocations, the scan kernel's compilation cache)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x, y)
            times.append(time.perf_counter() - t0)
    return {"name": checkpoint or pretrained.DEFAULT, "grid": list(grid), "threads": threads, "seconds": statistics.median(times),
            "all_seconds": times, "params": sum(p.numel() for p in model.parameters())}


def run_pretrained_bench(data, *, methods: Sequence[str] = tuple(METHODS), threads: int = 2, hd95: bool = True,
                         timeout_s: float = 3600.0, checkpoint: str | None = None,
                         progress: Callable[[dict], None] | None = None,
                         log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Every method on every pair of ``data`` (a :class:`benchmarks.bench_register.BenchData`),
    with the shipped network or ``checkpoint``'s."""
    from benchmarks.bench_register import _run_child, _save_pair, method_order

    say = log or (lambda _m: None)
    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "settings": {"data": data.name, "methods": list(methods), "splits": [s for s in SPLITS if s in data.pairs],
                     "threads": threads, "hd95": hd95, "checkpoint": checkpoint,
                     "n_pairs": {k: len(v) for k, v in data.pairs.items()}},
        "rows": [], "load_before": load_average(),
    }
    k = 0
    with tempfile.TemporaryDirectory(prefix="psmamba-bench-pretrained-") as tmp:
        for split in result["settings"]["splits"]:
            for i, pair in enumerate(data.pairs[split]):
                path = _save_pair(pair, Path(tmp), f"{split}_{i}")
                for j, m in enumerate(method_order(list(methods), k)):
                    spec = {"method": "psmamba", "psmamba_method": m, "pair_file": str(path), "threads": threads,
                            "hd95": hd95, "checkpoint": checkpoint}
                    row = _run_child(spec, None, timeout_s, threads)
                    row.update(split=split, method=m, pair_id=pair.pair_id, moving=pair.moving_id, fixed=pair.fixed_id,
                               order=j)
                    result["rows"].append(row)
                    say(f"{split} {pair.pair_id} {m}: " + (
                        f"Dice {fmt(row.get('dice_mean'), 4)} (before {fmt(row.get('dice_before_mean'), 4)}), "
                        f"folding {fmt(row.get('folding_percent'), 4)} %, {fmt(row.get('seconds'), 1)} s"
                        if row.get("status") == "ok" else f"{row.get('status')}: {row.get('error')}"))
                    if progress:
                        progress(result)
                k += 1
                path.unlink()
    result["inference"] = time_inference(threads, checkpoint=checkpoint)
    say(f"inference at {result['inference']['grid']}: {result['inference']['seconds']:.3f} s (median of 5)")
    result["load_after"] = load_average()
    result["seconds"] = time.perf_counter() - t_all
    return result


def _ok(rows, **match):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _mean(rows, key) -> float:
    v = [float(r[key]) for r in rows if r.get(key) is not None]
    return float(np.mean(v)) if v else float("nan")


def summarize(result: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per split, per method: means over the pairs."""
    out = {}
    for split in result["settings"]["splits"]:
        lst = []
        for m in result["settings"]["methods"]:
            every = [r for r in result["rows"] if r.get("split") == split and r.get("method") == m]
            ok = _ok(every)
            lst.append({"method": m, "n": len(ok), "failed": len(every) - len(ok), "dice": _mean(ok, "dice_mean"),
                        "dice_sd": float(np.std([r["dice_mean"] for r in ok])) if len(ok) > 1 else float("nan"),
                        "dice_before": _mean(ok, "dice_before_mean"), "hd95_mm": _mean(ok, "hd95_mean_mm"),
                        "folding_percent": _mean(ok, "folding_percent"),
                        "folding_percent_max": max((r["folding_percent"] for r in ok), default=float("nan")),
                        "sdlogj": _mean(ok, "sdlogj"), "seconds": _mean(ok, "seconds"),
                        "peak_rss_mib_max": max((r["peak_rss_mib"] for r in ok), default=float("nan"))})
        out[split] = lst
    return out


def _goal(name, split, value, limit, passed, text):
    return {"goal": name, "split": split, "value": value, "limit": limit,
            "verdict": "n/a" if passed is None else ("PASS" if passed else "FAIL"), "text": text}


def evaluate_goals(result: Mapping[str, Any], summaries=None) -> list[dict[str, Any]]:
    """Issue 14's benchmark goals from this run's figures (``PASS``/``FAIL``/``n/a`` each)."""
    summaries = summaries or summarize(result)
    nan = float("nan")

    def row(split, m):
        return next((s for s in summaries.get(split, []) if s["method"] == m and s["n"]), None)

    g = []
    for split in result["settings"]["splits"]:
        net, none = row(split, "network"), row(split, "identity")
        if net and none:
            gain = net["dice"] - none["dice"]
            judged = split == "test_hard"  # the goal; test is reported, not judged
            g.append(_goal(f"network Dice >= none + {GOALS['network_gain_min']}" + ("" if judged else " (reported)"),
                           split, gain, GOALS["network_gain_min"], gain >= GOALS["network_gain_min"] if judged else None,
                           f"network {net['dice']:.4f} vs none {none['dice']:.4f} ({gain:+.4f})"))
        if net:
            f = net["folding_percent"]
            g.append(_goal("network folding <= 0.05 %", split, f, GOALS["network_folding_max"],
                           f <= GOALS["network_folding_max"], f"mean {f:.4f} %, worst pair {net['folding_percent_max']:.4f} %"))
        for with_net, alone in (("network+io", "io"), ("affine+network+io", "affine+io")):
            a, b = row(split, with_net), row(split, alone)
            if a and b:
                frac = a["seconds"] / b["seconds"]
                ok = a["dice"] >= b["dice"] and frac <= GOALS["time_fraction_max"]
                g.append(_goal(f"{with_net} reaches {alone}'s Dice in <= half its time", split, frac,
                               GOALS["time_fraction_max"], ok,
                               f"Dice {a['dice']:.4f} vs {b['dice']:.4f}; {a['seconds']:.1f} s vs {b['seconds']:.1f} s "
                               f"(ratio {frac:.2f})"))
    inf = result.get("inference")
    if inf:
        s = inf["seconds"]
        g.append(_goal("inference <= 2 s at its grid", "x".join(map(str, inf["grid"])), s, GOALS["inference_max_s"],
                       s <= GOALS["inference_max_s"], f"{s:.3f} s per forward pass ({inf['threads']} threads)"))
    else:
        g.append(_goal("inference <= 2 s at its grid", "-", nan, GOALS["inference_max_s"], None, "not measured"))
    return g


def goals_text(goals) -> str:
    return "\n".join(f"{x['verdict']:<4}  {x['goal']} [{x['split']}]: {x['text']}" for x in goals)


def pretrained_markdown(result: Mapping[str, Any], machine: Mapping[str, Any], command: str) -> str:
    summaries = summarize(result)
    inf = result.get("inference") or {}
    lines = ["# The shipped network against no registration and instance optimisation (issue 14)", "",
             f"- command: `{command}`", *machine_lines(machine),
             f"- data: {result['settings']['data']}; pairs per split: {result['settings']['n_pairs']}; "
             f"threads per process: {result['settings']['threads']}",
             f"- network: {inf.get('name')} ({inf.get('params', 0):,} parameters), grid "
             f"{'x'.join(map(str, inf.get('grid', [])))}; one forward pass {fmt(inf.get('seconds'), 3)} s (median of 5)",
             f"- load average before / after: {result.get('load_before')} / {result.get('load_after')}; "
             f"whole run {result.get('seconds', 0):.0f} s",
             "- seconds: wall time from the arrays in memory to the whole field on the fixed grid, one fresh "
             "process per method and pair, method order rotated per pair", ""]
    for split, lst in summaries.items():
        lines += [f"## {split}", "", markdown_table(
            ["method", "pairs", "Dice", "Dice before", "HD95 (mm)", "folding % (mean / max)", "SDlogJ", "seconds",
             "peak memory (MiB)"],
            [[METHODS.get(s["method"], s["method"]), s["n"], f"{fmt(s['dice'], 4)} ± {fmt(s['dice_sd'], 4)}",
              fmt(s["dice_before"], 4), fmt(s["hd95_mm"], 2), f"{fmt(s['folding_percent'], 4)} / "
              f"{fmt(s['folding_percent_max'], 4)}", fmt(s["sdlogj"], 4), fmt(s["seconds"], 1),
              fmt(s["peak_rss_mib_max"], 0)] for s in lst]), ""]
    lines += ["## Goals", "", "```", goals_text(evaluate_goals(result, summaries)), "```", ""]
    return "\n".join(lines)


def write_pretrained(result, machine, command, out_dir: Path = RESULTS_DIR, tag: str = "") -> list[Path]:
    from benchmarks.bench_register import plot_register

    out_dir = Path(out_dir)
    stem = f"pretrained{tag}"
    summaries = summarize(result)
    return [
        write_json(out_dir / f"{stem}.json", {"command": command, "machine": machine, **result, "summaries": summaries,
                                               "goals": evaluate_goals(result, summaries)}),
        write_csv(out_dir / f"{stem}.csv", result["rows"], COLUMNS),
        write_text(out_dir / f"{stem}.md", pretrained_markdown(result, machine, command)),
        plot_register(result, out_dir / f"{stem}.png", labels=METHODS),
    ]


def main(argv: Sequence[str] | None = None, data=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_pretrained", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: the small demo (64x80x64), one pair per split")
    p.add_argument("--methods", nargs="+", default=None, choices=tuple(METHODS))
    p.add_argument("--both-ways", action="store_true", help="all six ordered pairs per split (default: one way, three)")
    p.add_argument("--pairs", type=int, default=None, help="first N pairs per split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    p.add_argument("--checkpoint", default=None, help="benchmark this psmamba checkpoint instead of the shipped network")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="result file suffix (default: _quick with --quick, else none)")
    args = p.parse_args(argv)
    from benchmarks.bench_register import demo_bench_data
    from benchmarks.common import machine_info
    from psmamba.models import pretrained

    if args.checkpoint:
        from psmamba.engine.methods import load_model
        from psmamba.errors import PsmambaError

        try:
            load_model(args.checkpoint)
        except PsmambaError as exc:
            print(f"error: --checkpoint: {exc}", file=sys.stderr)
            return 2
        args.checkpoint = str(Path(args.checkpoint).resolve())
    elif not pretrained.available():
        print("error: no shipped network is installed (psmamba/weights); give --checkpoint C", file=sys.stderr)
        return 2
    if args.threads < 1 or (args.pairs is not None and args.pairs < 1):
        print("error: --threads and --pairs must be >= 1", file=sys.stderr)
        return 2
    command = "python -m benchmarks.bench_pretrained" + ("" if not argv else " " + shlex.join(argv))
    tag = args.tag if args.tag is not None else ("_quick" if args.quick else "")
    if data is None:
        data = demo_bench_data("small" if args.quick else "full", pairs_per_split=args.pairs or (1 if args.quick else None),
                               one_way=not args.both_ways, splits=SPLITS)
    import torch

    torch.set_num_threads(args.threads)
    machine = machine_info()

    result = run_and_report(
        args.out, f"pretrained{tag}", {"command": command},
        lambda progress: run_pretrained_bench(data, methods=args.methods or tuple(METHODS), threads=args.threads,
                                              hd95=not args.no_hd95, timeout_s=args.timeout,
                                              checkpoint=args.checkpoint, progress=progress),
        lambda res: write_pretrained(res, machine, command, args.out, tag),
        lambda res: goals_text(evaluate_goals(res)))
    print(f"done in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
