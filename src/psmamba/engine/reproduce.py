"""The paper's comparison in one call: train and evaluate methods on a data set, then write its
tables, statistics and figures.

:func:`reproduce` trains every method (PSMamba-Net and the peers of :mod:`psmamba.models.peers`)
with :func:`psmamba.engine.train.fit` from its config (``<config_dir>/<data>/<method>.yaml``,
see ``configs/paper/``), evaluates its best checkpoint on the data set's test split with
:func:`psmamba.engine.evaluate.evaluate_pairs`, and writes::

    OUT/<method>/train/                    fit's folder (config.yaml, last.pt, best.pt, metrics.csv)
    OUT/<method>/train_done.json           training finished (steps, stop reason, minutes)
    OUT/<method>/results.csv               per pair x label (+ _pairs.csv, _summary.md)
    OUT/identity/results.csv               the unregistered pairs (the tables' "Initial" row)
    OUT/table.csv, OUT/table.md            the paper's Table 2/3 rows: Dice mean ± std over
                                           pairs, % of folded voxels (det J <= 0), HD95, ...
    OUT/stats.txt, OUT/stats.csv           paired t-tests (and Wilcoxon) of the reference
                                           (PSMamba-Net) against each method, Bonferroni over
                                           k - 1; one-way ANOVA and Tukey's HSD over all methods
    OUT/fig_dice_groups.png                Figures 2-5: Dice per ROI group (the protocol's lobes)
    OUT/fig_dice_per_roi.png               Dice per ROI
    OUT/fig_dice_per_pair.png              mean Dice of every pair
    OUT/fig6_panel.png                     Figure 6: every method on one pair side by side
    OUT/reproduce.json                     what ran, with which configs, how long

It resumes: a method whose ``train_done.json`` exists is not trained again, one with only a
``last.pt`` continues exactly, and one whose ``results.csv`` exists is not evaluated again.
``quick=True`` replaces the configs by small runs on the built-in demo data set
(:mod:`psmamba.data.demo`): a few steps on a coarse grid, a CPU run of minutes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psmamba.errors import PsmambaError

__all__ = [
    "PAPER_METHODS", "QUICK_METHODS", "QUICK_GRID", "QUICK_STEPS", "METHOD_TITLES", "DATA_SETS",
    "MethodRun", "ReproductionResult", "reproduce", "method_config_path", "quick_config", "method_title",
    "label_protocol_of",
]

#: the methods of the paper's Tables 2-3 (PSMamba-Net first: the statistics' reference)
PAPER_METHODS = ("paper", "transmorph", "im2grid", "prnet_pp", "modet", "pivit", "mambamorph", "transmatch", "voxelmorph")
#: the paper's three data sets (the folders of ``configs/paper/``)
DATA_SETS = ("lpba40", "mindboggle", "abdomen")
#: ``quick``: methods, training grid (the demo's 64x80x64 at 2.5 mm, halved) and steps
QUICK_METHODS = ("paper", "voxelmorph", "mambamorph", "transmorph")
QUICK_GRID = (32, 40, 32)
QUICK_STEPS = 10
#: names in the tables and figures
METHOD_TITLES = {
    "identity": "Initial", "paper": "PSMamba-Net", "paper_diff": "PSMamba-Net (diff)", "transmorph": "TransMorph",
    "im2grid": "Im2Grid", "prnet_pp": "PR++", "modet": "ModeT", "pivit": "PIViT", "mambamorph": "MambaMorph",
    "mambamorph_feat": "MambaMorph-Feat", "transmatch": "TransMatch", "voxelmorph": "VoxelMorph",
}
#: data source -> the label protocol whose names and ROI groups the figures use
_PROTOCOLS = {"lpba40": "lpba40", "mindboggle": "dkt31", "abdomenct": "abdomenctct", "demo": "subcortical14"}


def method_title(name: str) -> str:
    """The name a method has in the paper's tables (``paper`` -> ``PSMamba-Net``)."""
    return METHOD_TITLES.get(name, name)


def label_protocol_of(source: str) -> str | None:
    """The label protocol (:func:`psmamba.data.labels.label_map_by_name`) of a data source, or None."""
    return _PROTOCOLS.get(source)


def method_config_path(config_dir: str | os.PathLike, data: str, method: str) -> Path:
    """``<config_dir>/<data>/<method>.yaml``; a missing file is an error listing what exists."""
    folder = Path(config_dir).expanduser() / data
    path = folder / f"{method}.yaml"
    if not path.is_file():
        if not folder.is_dir():
            have = sorted(p.name for p in Path(config_dir).expanduser().glob("*") if p.is_dir())
            raise PsmambaError(f"--config-dir {config_dir}: no folder {data!r} (data sets: {', '.join(have) or 'none'})")
        have = sorted(p.stem for p in folder.glob("*.yaml"))
        raise PsmambaError(f"{path}: no config for method {method!r} (methods: {', '.join(have) or 'none'})")
    return path


def quick_config(method: str, steps: int = QUICK_STEPS, grid: Sequence[int] = QUICK_GRID, seed: int = 0) -> dict[str, Any]:
    """A small run of ``method`` on the demo data: ``steps`` optimiser steps on ``grid``.

    The method's own training settings apply (its preset's defaults: the paper's Table 1); the
    demo's volumes are resampled to ``grid``. The run validates once, on one pair, when it
    stops: ``best.pt`` is then simply the last model, written by the same path as in a full run.
    """
    return {
        "model": {"preset": method},
        "data": {"source": "demo", "size": "small", "resize": [int(s) for s in grid], "max_val_pairs": 1},
        "optim": {"epochs": 1},
        "run": {"seed": int(seed), "max_steps": int(steps), "log_every": max(1, int(steps) // 5),
                "tensorboard": False, "progress": False, "images": False},
    }


@dataclass
class MethodRun:
    """One method's part of a reproduction.

    Attributes:
        name: the method (a model preset: ``paper``, ``transmorph``, ...); ``title`` its table name.
        config: where its config came from (a file, or ``"quick"``).
        train_dir: fit's output folder; ``checkpoint``: the evaluated one (``best.pt``).
        params: trainable parameters.
        train: ``{"steps", "stopped", "seconds", "best_value", "resumed"}`` of its training.
        results_csv: the per pair x label results; ``summary``: :func:`psmamba.engine.results.summarize`.
        trained_now, evaluated_now: False when an earlier run's output was reused.
    """

    name: str
    title: str
    config: str
    train_dir: Path
    checkpoint: Path | None = None
    params: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    results_csv: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    trained_now: bool = False
    evaluated_now: bool = False


@dataclass
class ReproductionResult:
    """What :func:`reproduce` did and wrote (see the module docstring for the files)."""

    out: Path
    data: str
    methods: list[MethodRun]
    files: dict[str, Path]
    reference: str | None
    seconds: float


# --------------------------------------------------------------------------- the run
def reproduce(
    config_dir: str | os.PathLike | None,
    data: str | None,
    methods: Sequence[str],
    out: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    quick: bool = False,
    steps: int | None = None,
    grid: Sequence[int] | None = None,
    split: str = "test",
    max_pairs: int | None = None,
    device: str = "auto",
    hd95: bool = True,
    figure_pair: int = 0,
    reference: str | None = None,
    progress: Callable[[str], None] | None = print,
) -> ReproductionResult:
    """Train, evaluate and compare ``methods`` on one data set (see the module docstring).

    Args:
        config_dir, data: the configs ``<config_dir>/<data>/<method>.yaml`` (ignored with ``quick``).
        methods: model presets (``paper``, ``transmorph``, ...), in table order.
        out: the output folder (created; an earlier reproduction there is resumed).
        overrides: ``KEY=VALUE`` settings applied to every method's config (``data.root=...``).
        quick: small runs on the built-in demo data (:func:`quick_config`).
        steps: ``run.max_steps`` of every training (``quick``: default :data:`QUICK_STEPS`).
        grid: ``quick`` only: the training grid (default :data:`QUICK_GRID`).
        split: the evaluated split (``test``).
        max_pairs: evaluate only the first this-many pairs.
        device: ``auto``, ``cpu`` or ``cuda``, for training and evaluation.
        hd95: also compute HD95 (slow on large volumes).
        figure_pair: index (in the evaluated pairs) of Figure 6's pair.
        reference: the method the paired tests compare with the others (default ``paper`` when
            it is among the methods, else the first one).
        progress: called with one line per stage (None: quiet).

    Raises:
        PsmambaError: a bad method name, a missing config, a bad override, ... before anything
            is trained (every config is resolved first).
    """
    from psmamba.config import apply_overrides, config_from_dict, parse_override, read_yaml

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    methods = _check_methods(methods)
    if not quick and (not config_dir or not data):
        raise PsmambaError("give --config-dir and --data (or --quick for the built-in demo data)")
    if grid is not None and not quick:
        raise PsmambaError("--grid is for --quick; set data.resize in the configs (or --set data.resize=[D,H,W])")
    if steps is not None and (isinstance(steps, bool) or int(steps) < 1):
        raise PsmambaError(f"--steps must be >= 1, got {steps}")
    if reference is not None and reference not in methods:
        raise PsmambaError(f"--reference {reference!r} is not among the methods {list(methods)}")
    if not str(out).strip():
        raise PsmambaError("--out is empty: name the output folder")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PsmambaError(f"--out {out} exists and is not a folder")
    for text in overrides:
        if ".".join(parse_override(str(text))[0]) in ("run.out", "run.device"):
            raise PsmambaError(f"--set {text}: reproduce puts each method's run in --out/<method>/train on --device; "
                               "use those flags")
    from psmamba.engine.distributed import resolve_device

    resolve_device(device)  # a --device this machine lacks fails here, not after the first evaluation
    data_name = "demo" if quick else str(data)

    # ---- every config first: a typo fails before hours of training
    runs, configs = [], {}
    for name in methods:
        if quick:
            raw, where = quick_config(name, steps or QUICK_STEPS, grid or QUICK_GRID), "quick"
        else:
            path = method_config_path(config_dir, data_name, name)  # type: ignore[arg-type]
            raw, where = read_yaml(path), str(path)
            if steps is not None:
                raw = apply_overrides(raw, [f"run.max_steps={int(steps)}"])
        raw = apply_overrides(raw, list(overrides))
        if isinstance(raw.get("run") or {}, dict):  # else config_from_dict names the bad section
            raw["run"] = {**(raw.get("run") or {}), "out": str(out / name / "train"), "device": device}
        cfg = config_from_dict(raw, f"{where} + --set" if overrides else where)
        if cfg.model_name != name:
            raise PsmambaError(f"{where}: model.preset is {cfg.model_name!r}, expected {name!r}")
        configs[name] = cfg
        runs.append(MethodRun(name, method_title(name), where, out / name / "train"))

    # ---- the pairs every method is scored on
    from psmamba.engine.evaluate import split_pairs

    pairs = split_pairs(configs[methods[0]], split=split)
    if max_pairs is not None:
        if max_pairs < 1:
            raise PsmambaError(f"--max-pairs must be >= 1, got {max_pairs}")
        pairs = pairs[:max_pairs]
    if not 0 <= figure_pair < len(pairs):
        raise PsmambaError(f"--figure-pair {figure_pair}: the {split} split has {len(pairs)} pairs here")
    out.mkdir(parents=True, exist_ok=True)
    say(f"reproduce: {len(runs)} method(s) on {data_name} ({split}: {len(pairs)} pairs) -> {out}")

    # ---- train and evaluate each method
    identity = _evaluate_identity(pairs, out, device, hd95, say)
    models = {}
    for run in runs:
        _train(run, configs[run.name], say)
        models[run.name] = _evaluate(run, pairs, device, hd95, say)

    # ---- tables, statistics, figures
    source = configs[methods[0]].data.source
    files = _write_tables(out, identity, runs)
    ref = reference or ("paper" if "paper" in methods else methods[0])
    files.update(_write_stats(out, runs, ref if len(runs) > 1 else None))
    files.update(_write_figures(out, runs, label_protocol_of(source), data_name))
    files["fig6_panel"] = _figure6(out, runs, models, pairs[figure_pair], device, data_name)
    seconds = time.perf_counter() - t0
    files["reproduce_json"] = _write_record(out, data_name, split, len(pairs), quick, runs, files, ref, seconds)
    say(f"reproduce: done in {seconds / 60:.1f} min; table: {files['table_md']}")
    return ReproductionResult(out, data_name, runs, files, ref if len(runs) > 1 else None, seconds)


def _check_methods(methods: Sequence[str]) -> list[str]:
    from psmamba.models import PEERS, PRESETS

    methods = [m.strip() for m in methods if m and m.strip()]
    if not methods:
        raise PsmambaError("--methods names no method")
    for m in methods:
        if m not in PRESETS and m not in PEERS:
            raise PsmambaError(f"--methods: unknown method {m!r} (PSMamba-Net presets: {', '.join(sorted(PRESETS))}; "
                               f"peers: {', '.join(sorted(PEERS))})")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise PsmambaError(f"--methods names {dup} more than once")
    if "identity" in methods:
        raise PsmambaError("--methods: the unregistered 'identity' row is always included")
    return methods


def _train(run: MethodRun, cfg, say: Callable[[str], None]) -> None:
    """Train (or continue, or reuse) one method; fills ``run.train`` and ``run.checkpoint``."""
    from psmamba.engine.train import fit
    from psmamba.files import atomic_write_text

    done = run.train_dir.parent / "train_done.json"
    if done.is_file():
        run.train = json.loads(done.read_text(encoding="utf-8"))
        say(f"  {run.title}: trained earlier ({run.train.get('steps')} steps), reusing {run.train_dir}")
    else:
        resume = (run.train_dir / "last.pt").is_file()
        say(f"  {run.title}: training{' (continuing)' if resume else ''} -> {run.train_dir}")
        t = time.perf_counter()
        res = fit(cfg, resume=resume)
        if res.stopped == "signal":
            raise PsmambaError(f"{run.title}: training interrupted; run the same command again to continue it")
        run.train = {"steps": res.steps, "stopped": res.stopped, "seconds": time.perf_counter() - t,
                     "best_metric": res.best_metric, "best_value": res.best_value, "best_epoch": res.best_epoch,
                     "resumed": resume}
        atomic_write_text(done, json.dumps(run.train, indent=2) + "\n")
        run.trained_now = True
        best = "" if res.best_value is None else f", best {res.best_metric} {res.best_value:.4f}"
        say(f"  {run.title}: {res.steps} steps in {run.train['seconds'] / 60:.1f} min{best}")
    best = run.train_dir / "best.pt"
    run.checkpoint = best if best.is_file() else run.train_dir / "last.pt"


def _evaluate(run: MethodRun, pairs, device: str, hd95: bool, say: Callable[[str], None]):
    """Score ``run``'s checkpoint on ``pairs`` (or read an earlier run's results); returns its method."""
    from psmamba.engine.evaluate import evaluate_pairs
    from psmamba.engine.methods import load_model, method_from_options, training_size
    from psmamba.engine.results import read_results, summarize

    model, ckpt = load_model(run.checkpoint, device=_device(device))
    run.params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    method = method_from_options(model, grid=training_size(ckpt), name=run.name, checkpoint=run.checkpoint)
    run.results_csv = run.train_dir.parent / "results.csv"
    if not run.trained_now and _results_match(run.results_csv, pairs):
        say(f"  {run.title}: evaluated earlier, reusing {run.results_csv}")
    else:
        say(f"  {run.title}: evaluating {len(pairs)} pairs ...")
        evaluate_pairs(pairs, method=method, device=device, hd95=hd95, name=run.name).write(run.results_csv)
        run.evaluated_now = True
    run.summary = summarize(read_results(run.results_csv).pair_rows, run.name)
    return method


def _evaluate_identity(pairs, out: Path, device: str, hd95: bool, say: Callable[[str], None]) -> dict[str, Any]:
    from psmamba.engine.evaluate import evaluate_pairs
    from psmamba.engine.results import read_results, summarize

    path = out / "identity" / "results.csv"
    if not _results_match(path, pairs):
        say("  Initial (no registration): evaluating ...")
        path.parent.mkdir(parents=True, exist_ok=True)
        evaluate_pairs(pairs, identity=True, device=device, hd95=hd95, name="identity").write(path)
    return summarize(read_results(path).pair_rows, "identity")


def _results_match(path: Path, pairs) -> bool:
    """An earlier results file scored exactly these pairs."""
    if not path.is_file():
        return False
    from psmamba.engine.results import read_results

    try:
        have = set(read_results(path).per_pair)
    except PsmambaError:
        return False
    want = set(getattr(pairs, "pair_ids", None) or [p.pair_id for p in pairs])
    return have == want


def _device(device: str):
    from psmamba.engine.distributed import resolve_device

    return resolve_device(device)


# --------------------------------------------------------------------------- tables
TABLE_COLUMNS = (
    "method", "title", "params", "train_steps", "train_minutes", "pairs", "dice_mean", "dice_std",
    "folding_percent_mean", "folding_percent_std", "hd95_mm_mean", "hd95_mm_std", "sdlogj_mean", "sdlogj_std",
    "seconds_per_pair",
)


def _table_rows(identity: Mapping[str, Any], runs: Sequence[MethodRun]) -> list[dict[str, Any]]:
    def row(name: str, title: str, s: Mapping[str, Any], params=None, steps=None, minutes=None) -> dict[str, Any]:
        return {
            "method": name, "title": title, "params": params, "train_steps": steps, "train_minutes": minutes,
            "pairs": s["pairs"], "dice_mean": s["dice"][0], "dice_std": s["dice"][1],
            "folding_percent_mean": s["folding_percent"][0], "folding_percent_std": s["folding_percent"][1],
            "hd95_mm_mean": s["hd95_mm"][0], "hd95_mm_std": s["hd95_mm"][1],
            "sdlogj_mean": s["sdlogj"][0], "sdlogj_std": s["sdlogj"][1], "seconds_per_pair": s["seconds"][0],
        }

    rows = [row("identity", method_title("identity"), identity)]
    for r in runs:
        minutes = r.train.get("seconds")
        rows.append(row(r.name, r.title, r.summary, r.params, r.train.get("steps"),
                        None if minutes is None else minutes / 60))
    return rows


def _fmt(mean: Any, std: Any, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table (the layout of the paper's Tables 2-3 plus HD95, size and cost)."""
    lines = [
        "| Method | Dice | % of \\|J\\| <= 0 | HD95 (mm) | SDlogJ | parameters | training steps | s / pair |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        params = "-" if not r["params"] else f"{r['params'] / 1e6:.2f} M"
        steps = "-" if r["train_steps"] is None else str(r["train_steps"])
        sec = r["seconds_per_pair"]
        lines.append(
            f"| {r['title']} | {_fmt(r['dice_mean'], r['dice_std'], 3)} | "
            f"{_fmt(r['folding_percent_mean'], r['folding_percent_std'], 3)} | "
            f"{_fmt(r['hd95_mm_mean'], r['hd95_mm_std'], 2)} | {_fmt(r['sdlogj_mean'], r['sdlogj_std'], 3)} | "
            f"{params} | {steps} | {'-' if sec is None or math.isnan(sec) else f'{sec:.2f}'} |"
        )
    return "\n".join(lines)


def _write_tables(out: Path, identity: Mapping[str, Any], runs: Sequence[MethodRun]) -> dict[str, Path]:
    from psmamba.engine.results import write_csv
    from psmamba.files import atomic_write_text

    rows = _table_rows(identity, runs)
    write_csv(out / "table.csv", TABLE_COLUMNS, rows)
    n = rows[0]["pairs"]
    text = (f"Dice: mean ± std over {n} pairs of the per-pair mean over labels; % of |J| <= 0: folded voxels "
            f"of the field, mean ± std over pairs.\n\n" + format_table(rows) + "\n")
    atomic_write_text(out / "table.md", text)
    return {"table_csv": out / "table.csv", "table_md": out / "table.md"}


# --------------------------------------------------------------------------- statistics
def _write_stats(out: Path, runs: Sequence[MethodRun], reference: str | None) -> dict[str, Path]:
    from psmamba.engine.results import read_results, write_csv
    from psmamba.engine.stats import compare_methods
    from psmamba.files import atomic_write_text

    txt = out / "stats.txt"
    if reference is None:
        atomic_write_text(txt, "One method: nothing to compare.\n")
        return {"stats_txt": txt}
    per_pair = {r.name: read_results(r.results_csv).per_pair for r in runs}  # type: ignore[arg-type]
    try:
        comp = compare_methods(per_pair, reference=reference)
    except PsmambaError as exc:  # e.g. a single test pair
        atomic_write_text(txt, f"No statistics: {exc}\n")
        return {"stats_txt": txt}
    atomic_write_text(txt, comp.to_text() + "\n")
    rows = comp.to_rows()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(out / "stats.csv", columns, rows)
    return {"stats_txt": txt, "stats_csv": out / "stats.csv"}


# --------------------------------------------------------------------------- figures
def _write_figures(out: Path, runs: Sequence[MethodRun], protocol: str | None, data: str) -> dict[str, Path]:
    from psmamba.engine.results import read_results
    from psmamba.viz import dice_boxplot, pair_dice_plot

    results = {r.title: read_results(r.results_csv) for r in runs}  # type: ignore[arg-type]
    files: dict[str, Path] = {}
    names: dict[int, str] | None = None
    groups: dict[str, tuple[int, ...]] | None = None
    if protocol is not None:
        from psmamba.data.labels import label_groups, label_map_by_name

        names = label_map_by_name(protocol).label_names
        groups = label_groups(protocol)
    per_label = {t: {lab: list(v.values()) for lab, v in res.per_label.items()} for t, res in results.items()}
    if any(per_label.values()):
        files["fig_dice_per_roi"] = dice_boxplot(per_label, out / "fig_dice_per_roi.png", label_names=names,
                                                 title=f"Dice per ROI ({data})")
        if groups:
            per_group = {t: _group_dice(res.per_label, groups) for t, res in results.items()}
            group_names = {k + 1: g for k, g in enumerate(groups)}
            files["fig_dice_groups"] = dice_boxplot(per_group, out / "fig_dice_groups.png", label_names=group_names,
                                                    title=f"Dice per ROI group ({data})")
    files["fig_dice_per_pair"] = pair_dice_plot({t: res.per_pair for t, res in results.items()},
                                                out / "fig_dice_per_pair.png", title=f"Mean Dice per pair ({data})")
    return files


def _group_dice(per_label: Mapping[int, Mapping[str, float]], groups: Mapping[str, Sequence[int]]) -> dict[int, list[float]]:
    """``{group index 1..G: [per-pair mean Dice over the group's labels]}`` (NaN labels skipped)."""
    pair_ids = sorted({p for v in per_label.values() for p in v})
    out: dict[int, list[float]] = {}
    for k, labels in enumerate(groups.values(), start=1):
        vals = []
        for pid in pair_ids:
            d = [per_label[lab][pid] for lab in labels if lab in per_label and pid in per_label[lab]]
            d = [x for x in d if np.isfinite(x)]
            if d:
                vals.append(float(np.mean(d)))
        if vals:
            out[k] = vals
    return out


def _figure6(out: Path, runs: Sequence[MethodRun], methods: Mapping[str, Any], pair, device: str, data: str) -> Path:
    """Every method's registration of ``pair`` side by side (:func:`psmamba.viz.save_method_panel`)."""
    from psmamba.engine.register import register_pair
    from psmamba.viz import PanelEntry, save_method_panel

    entries, first = {}, None
    for r in runs:
        res = register_pair(pair.fixed, pair.moving, moving_labels=pair.moving_labels, fixed_labels=pair.fixed_labels,
                            method=methods[r.name], device=device, overview=False)
        first = first or res
        entries[r.title] = PanelEntry(res.warped, res.ddf, res.warped_labels)
    assert first is not None
    return save_method_panel(out / "fig6_panel.png", fixed=first.fixed, moving=first.moving, methods=entries,
                             fixed_labels=first.fixed_labels, moving_labels=first.moving_labels, affine=first.affine,
                             title=f"{data}: {pair.pair_id}")


def _write_record(out: Path, data: str, split: str, n_pairs: int, quick: bool, runs: Sequence[MethodRun],
                  files: Mapping[str, Path], reference: str, seconds: float) -> Path:
    from psmamba.files import atomic_write_text

    record = {
        "data": data, "split": split, "pairs": n_pairs, "quick": quick, "reference": reference,
        "seconds": round(seconds, 1),
        "methods": [
            {"name": r.name, "title": r.title, "config": r.config, "train_dir": str(r.train_dir),
             "checkpoint": str(r.checkpoint), "params": r.params, "train": r.train, "trained_now": r.trained_now,
             "evaluated_now": r.evaluated_now, "dice": list(r.summary.get("dice", ())),
             "folding_percent": list(r.summary.get("folding_percent", ()))}
            for r in runs
        ],
        "files": {k: str(v) for k, v in files.items()},
    }
    path = out / "reproduce.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
