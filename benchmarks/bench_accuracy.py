"""Accuracy on the built-in real example pairs: Dice per label, HD95, folding %, SDlogJ, seconds per pair.

Protocol (``python -m benchmarks --only accuracy``):

* **Data**: the demo data set (:mod:`psmamba.data.demo`): three real MNI-space brain templates
  with 14 subcortical labels from three labelling protocols. ``train`` = deformed copies of the
  templates (72 ordered pairs), ``val`` = other copies (6 pairs), and two TEST splits:
  ``test`` (the six ordered pairs of the undeformed templates: the real inter-template task)
  and ``test_hard`` (further deformed copies, six pairs).
* **Methods** (rows): no registration; ANTs SyN (``antspyx`` defaults, with the demo's voxel
  size); VoxelMorph (MONAI) and PSMamba-Net (``paper``) trained with the SAME budget: the same
  training pairs in the same seeded order, the same number of steps, the same loss
  (``LNCC(9) + lambda * Diffusion``, lambda = 1), the same optimiser (Adam, amsgrad, the
  paper's per-epoch poly decay) through the engine's training step
  (:func:`benchmarks.common.train_network` uses :func:`psmamba.engine.objective.train_step`
  and the trainer's schedule and selection rule), each checkpoint chosen by mean Dice on the
  ``val`` pairs; and each network again with test-time refinement
  (``iters`` Adam steps per test pair on the network's predicted field, on the data grid,
  same loss, the field's default lr: ``psmamba register --iters N --refine field``, a
  :class:`~psmamba.engine.methods.Chain` of ``Network`` and ``InstanceOptimisation``; the row
  ids ``+io`` date from before the diffeomorphic ``io`` method existed and do not mean it). Fine-tuning a copy of the weights instead (``refine="weights"``)
  was tried first: with Adam at lr 1e-4 it wrecked barely trained networks (PSMamba-Net's Dice
  0.747 -> 0.424 in 3 steps in the quick run), because Adam's first steps move every weight by
  about lr, most likely the cause: that is ten times the N(0, 1e-5) projection weights, whose
  output RMSNorm then scales up (not verified further).
* **Scoring**: :func:`psmamba.engine.evaluate.evaluate_pairs` (the engine behind
  ``psmamba evaluate``) on the fixed grid of the demo size, every method through the same
  code; methods are run in round robin per test pair. Seconds per pair = the registration
  proper (resampling to the model grid, network / optimisation / ANTs, the field back to the
  fixed grid), not reading files or metrics.
* Nothing is tuned on the test pairs: the budget and the learning rate are fixed in advance
  (see ``benchmarks/README.md``), and checkpoint selection uses the ``val`` pairs only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS_DIR,
    fmt,
    load_average,
    machine_lines,
    markdown_table,
    set_threads,
    size_str,
    train_network,
    write_csv,
    write_json,
    write_text,
)
from benchmarks.peers import available, build_method
from psmamba.data.preprocess import minmax_scale as minmax
from psmamba.spatial import resize_volume

__all__ = ["run_accuracy", "write_accuracy", "plot_accuracy", "ROWS", "NETS", "LABEL_CSV_COLUMNS"]

#: the learned methods trained here (peers.METHODS names)
NETS = ("voxelmorph", "paper")
#: table rows in order: (row id, label)
ROWS = {
    "identity": "no registration",
    "ants_syn": "ANTs SyN",
    "voxelmorph": "VoxelMorph",
    "voxelmorph+io": "VoxelMorph + test-time refinement",
    "paper": "PSMamba-Net (paper)",
    "paper+io": "PSMamba-Net (paper) + test-time refinement",
}
LABEL_CSV_COLUMNS = ("split", "method", "pair_id", "moving", "fixed", "label", "label_name", "dice", "dice_before",
                     "hd95_mm", "folding_percent", "sdlogj", "seconds")
PAIR_CSV_COLUMNS = ("split", "method", "pair_id", "moving", "fixed", "n_labels", "dice_mean", "dice_before_mean",
                    "hd95_mean_mm", "folding_percent", "sdlogj", "sdlogj_l2r", "seconds")


@dataclass
class _Vol:
    id: str
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


@dataclass
class AccuracyData:
    """What the benchmark needs of a data set (the demo, or tiny volumes in tests).

    Attributes:
        name: shown in the report.
        volumes: id -> volume (image ``(D, H, W)`` float, labels ``(D, H, W)`` int, affine).
        pairs: split -> ordered ``(moving id, fixed id)``; needs ``train`` and ``val`` and
            the test splits.
        label_names: label code -> name.
    """

    name: str
    volumes: dict[str, _Vol]
    pairs: dict[str, list[tuple[str, str]]]
    label_names: dict[int, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.volumes.values())).image.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        aff = next(iter(self.volumes.values())).affine
        return tuple(float(s) for s in np.sqrt((np.asarray(aff)[:3, :3] ** 2).sum(0)))  # type: ignore[return-value]


def demo_data(size: str = "small") -> AccuracyData:
    """The built-in demo data set as :class:`AccuracyData` (built on first use, then cached)."""
    from psmamba.data.demo import build_demo

    demo = build_demo(size=size)
    vols = {}
    for vid in demo.ids:
        v = demo.load(vid)
        vols[vid] = _Vol(vid, np.asarray(v.image, dtype=np.float32), np.asarray(v.labels), np.asarray(v.affine))
    return AccuracyData(f"psmamba demo ({size}, {size_str(demo.shape)})", vols,
                        {k: [tuple(p) for p in v] for k, v in demo.pairs.items()}, dict(demo.label_names))


def _tensor(a: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(device)


def _pair(data: AccuracyData, m: str, f: str):
    from psmamba.engine.evaluate import Pair
    from psmamba.io import Image

    def img(v: _Vol, arr: np.ndarray) -> Image:
        return Image(data=arr, affine=np.asarray(v.affine, dtype=np.float64), header=None, path=v.id)  # type: ignore[arg-type]

    mv, fx = data.volumes[m], data.volumes[f]
    return Pair(f"{m}->{f}", img(mv, mv.image), img(fx, fx.image), img(mv, mv.labels), img(fx, fx.labels))


def scored_pairs(data: AccuracyData, split: str, one_way: bool = False) -> list[tuple[str, str]]:
    """The ordered pairs of a split, or with ``one_way`` only the first direction of each."""
    pairs = list(data.pairs.get(split, []))
    if not one_way:
        return pairs
    seen: set[frozenset] = set()
    kept = []
    for m, f in pairs:
        if frozenset((m, f)) not in seen:
            seen.add(frozenset((m, f)))
            kept.append((m, f))
    return kept


def _val_fn(data: AccuracyData, grid, device, labels) -> Callable[[Any], float]:
    """Mean Dice over the ``val`` pairs, scored exactly as the test pairs are
    (:func:`psmamba.engine.evaluate.evaluate_pairs` on the data grid; the network on ``grid``)."""
    from psmamba.engine.evaluate import evaluate_pairs

    pairs = [_pair(data, m, f) for m, f in data.pairs["val"]]

    def score(model) -> float:
        res = evaluate_pairs(pairs, model=model, model_size=grid, device=device, labels=labels, hd95=False,
                             name="validation")
        return float(np.nanmean([p["dice_mean"] for p in res.pair_rows]))

    return score


def run_accuracy(
    data: AccuracyData | None = None,
    *,
    demo_size: str = "small",
    grid: Sequence[int] | None = None,
    steps: int = 1000,
    lr: float = 1e-4,
    lam: float = 1.0,
    iters: int = 20,
    val_every: int = 1,
    splits: Sequence[str] = ("test", "test_hard"),
    rows: Sequence[str] = tuple(ROWS),
    device: str = "auto",
    threads: int | None = None,
    seed: int = 0,
    hd95: bool = True,
    one_way: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train the networks with one budget, then score every row on the test splits.

    Args:
        data: the data (default: :func:`demo_data` of ``demo_size``).
        grid: the grid ``(D, H, W)`` the networks train and run on (default: the data's own);
            ANTs and the scoring always use the data's own grid.
        steps: training steps per network (the shared budget).
        lr: Adam learning rate of the training (the refinement uses the field's default,
            :data:`psmamba.engine.methods.LR_FIELD`).
        lam: diffusion weight (the paper's 1).
        iters: test-time refinement steps per pair (the ``+io`` rows).
        val_every: validation (mean Dice on ``val`` pairs) every this many epochs, and at the end (0: none).
        splits: the test splits to score.
        rows: which rows of :data:`ROWS` to run.
        device, threads, seed: where, how many threads, the seed of weights and pair order.
        hd95: compute HD95 (the slowest metric).
        one_way: score only one direction of each test pair (the first of A->B, B->A met).

    Returns:
        ``{"settings", "training", "label_rows", "pair_rows", "summaries", "load_before", "load_after", ...}``.
    """
    from psmamba.engine.evaluate import evaluate_pairs
    from psmamba.engine.results import summarize
    from psmamba.engine.distributed import resolve_device

    say = log or (lambda _m: None)
    t_all = time.perf_counter()
    threads = set_threads(threads)
    dev = resolve_device(device)
    data = data or demo_data(demo_size)
    grid = tuple(int(s) for s in (grid or data.shape))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown accuracy rows {unknown}; choose from {list(ROWS)}")
    skipped = {}
    for r in rows:
        ok, why = available(r.split("+")[0]) if r != "identity" else (True, "")
        if not ok:
            skipped[r] = why
    rows = [r for r in rows if r not in skipped]
    out: dict[str, Any] = {
        "settings": {"data": data.name, "grid": list(grid), "data_grid": list(data.shape), "spacing_mm": list(data.spacing),
                     "steps": steps, "lr": lr, "lam": lam, "lncc_window": 9, "optimiser": "Adam (amsgrad), per-epoch poly decay from learning rate",
                     "batch": 1, "iters": iters, "val_every": val_every, "splits": list(splits), "rows": list(rows),
                     "seed": seed, "device": str(dev), "threads": threads, "one_way": one_way,
                     "n_pairs": {k: len(v) for k, v in data.pairs.items()},
                     "n_scored": {k: len(scored_pairs(data, k, one_way)) for k in splits}},
        "skipped": skipped, "training": {}, "label_rows": [], "pair_rows": [], "load_before": load_average(),
    }

    # ---- train every network on the same pairs, same order, same steps, same loss
    cache: dict[str, Any] = {}

    def vol(vid: str):
        if vid not in cache:
            cache[vid] = minmax(resize_volume(_tensor(data.volumes[vid].image, dev), grid))
        return cache[vid]

    labels = sorted(data.label_names) or None
    train_pairs = [(vol(m), vol(f)) for m, f in data.pairs["train"]]
    val_fn = _val_fn(data, grid, dev, labels) if data.pairs.get("val") and val_every else None
    nets: dict[str, Any] = {}
    for name in NETS:
        if not any(r.split("+")[0] == name for r in rows):
            continue
        say(f"[accuracy] training {name}: {steps} steps on {len(train_pairs)} pairs at {size_str(grid)}")
        model = build_method(name, seed=seed).to(dev)
        val_before = val_fn(model.eval()) if val_fn is not None else None  # for reference, never selected
        report = train_network(model, train_pairs, steps=steps, lr=lr, lam=lam, window=9, seed=seed,
                               val_fn=val_fn, val_every=val_every, log=say)
        nets[name] = model.eval()
        out["training"][name] = {**report.to_dict(), "params": sum(p.numel() for p in model.parameters()),
                                 "val_before_training": val_before}
        say(f"[accuracy] {name}: {report.seconds:.0f} s, {report.step_seconds_median:.2f} s/step, "
            f"selected step {report.selected_step}")
    cache.clear()

    # ---- score: per test pair, every row in turn (round robin)
    ants = build_method("ants_syn", spacing=data.spacing, threads=threads) if "ants_syn" in rows else None
    for split in splits:
        for m, f in scored_pairs(data, split, one_way):
            pair = _pair(data, m, f)
            for r in rows:
                base = r.split("+")[0]
                kw: dict[str, Any] = {"device": dev, "labels": labels, "hd95": hd95, "name": r, "lam": lam}
                if r == "identity":
                    kw["identity"] = True
                elif r == "ants_syn":
                    kw["model"] = ants
                else:
                    kw.update(model=nets[base], model_size=grid)
                    if r.endswith("+io"):
                        kw.update(iters=iters, refine="field")
                res = evaluate_pairs([pair], **kw)
                for row in res.label_rows:
                    out["label_rows"].append({"split": split, **row,
                                              "label_name": data.label_names.get(int(row["label"])) if row.get("label") is not None else None})
                for row in res.pair_rows:
                    out["pair_rows"].append({"split": split, **row})
                p = res.pair_rows[0]
                say(f"[accuracy] {split} {pair.pair_id} {r}: Dice {p['dice_before_mean']:.3f} -> {p['dice_mean']:.3f}, "
                    f"HD95 {p['hd95_mean_mm']:.2f} mm, folding {p['folding_percent']:.3f}%, {p['seconds']:.2f} s")
    out["summaries"] = {split: [summarize([p for p in out["pair_rows"] if p["split"] == split and p["method"] == r], r)
                                for r in rows] for split in splits}
    out["per_label"] = _per_label(out["label_rows"], splits, rows)
    out["label_names"] = dict(data.label_names)
    out["load_after"] = load_average()
    out["seconds"] = time.perf_counter() - t_all
    return out


def _per_label(label_rows: list[dict], splits, rows) -> dict[str, dict[str, dict[int, float]]]:
    """split -> row -> label -> mean Dice over the split's pairs."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for split in splits:
        out[split] = {}
        for r in rows:
            acc: dict[int, list[float]] = {}
            for x in label_rows:
                if x["split"] == split and x["method"] == r and x.get("label") is not None and x.get("dice") is not None:
                    acc.setdefault(int(x["label"]), []).append(float(x["dice"]))
            out[split][r] = {k: float(np.nanmean(v)) for k, v in sorted(acc.items())}
    return out


# --------------------------------------------------------------------------- outputs
def _ms(pair: Sequence[float], digits: int) -> str:
    m, s = pair
    return "-" if m is None or not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def accuracy_markdown(result: dict, machine: dict, command: str) -> str:
    """The markdown report: budget, machine, a summary table per split, Dice per label, training."""
    s = result["settings"]
    lines = [
        "# Accuracy on the built-in example pairs", "",
        f"Command: `{command}`", "",
        *machine_lines(machine),
        f"- load average (1, 5, 15 min) before: {result.get('load_before')}, after: {result.get('load_after')}",
        f"- whole accuracy benchmark: {result.get('seconds', float('nan')):.0f} s", "",
        f"Data: {s['data']}, voxel size {', '.join(fmt(x, 2) for x in s['spacing_mm'])} mm; pairs per split: "
        + ", ".join(f"{k} {v}" for k, v in s["n_pairs"].items()) + "; scored: "
        + ", ".join(f"{k} {v}" for k, v in s.get("n_scored", {}).items())
        + (" (one direction of each pair)" if s.get("one_way") else " (every ordered pair)") + ".",
        f"Budget (the same for every network): {s['steps']} training steps, batch 1, on the {s['n_pairs'].get('train', 0)} "
        f"train pairs in one seeded order, at the grid {size_str(s['grid'])}; loss LNCC (window 9) + {s['lam']} x "
        f"diffusion; {s['optimiser']} {s['lr']}; checkpoint chosen by mean Dice on the val pairs every "
        f"{s['val_every']} epoch(s) and at the end; test-time refinement: {s['iters']} Adam steps on the network's "
        f"predicted field per pair (the field's default lr, on the data grid). ANTs and all scoring work on the data grid {size_str(s['data_grid'])}. "
        "Nothing was tuned on test pairs.", "",
    ]
    head = ["method", "pairs", "Dice", "HD95 (mm)", "folding %", "SDlogJ", "s / pair"]
    for split, summaries in result["summaries"].items():
        body = []
        for sm in summaries:
            body.append([ROWS.get(sm["method"], sm["method"]), sm["pairs"], _ms(sm["dice"], 3), _ms(sm["hd95_mm"], 2),
                         _ms(sm["folding_percent"], 3), _ms(sm["sdlogj"], 3), fmt(sm["seconds"][0], 2)])
        lines += [f"## {split} pairs (mean ± std over pairs)", "", markdown_table(head, body), ""]
    for split, per in result["per_label"].items():
        row_ids = list(per)
        codes = sorted({k for v in per.values() for k in v})
        names = result.get("label_names") or {}
        body = [[f"{c} {names.get(str(c), names.get(c, ''))}".strip()] + [fmt(per[r].get(c), 3) for r in row_ids] for c in codes]
        lines += [f"## Dice per label, {split} pairs (mean over pairs)", "",
                  markdown_table(["label"] + [ROWS.get(r, r) for r in row_ids], body), ""]
    if result.get("training"):
        body = [[ROWS.get(n, n), fmt(t.get("params")), t["steps"], fmt(t["seconds"], 0), fmt(t["step_seconds_median"], 2),
                 fmt(t.get("val_before_training"), 3), ", ".join(f"{v['step']}: {v['score']:.3f}" for v in t.get("validation", [])),
                 t.get("selected_step")]
                for n, t in result["training"].items()]
        lines += ["## Training (same budget for each network)", "",
                  markdown_table(["network", "params", "steps", "seconds", "s / step (median)", "val Dice untrained",
                                  "val Dice by step", "selected step"], body), "",
                  "Validation Dice is scored like the test pairs (same code, data grid); the untrained value is "
                  "shown for reference and is never selected.", ""]
    if result.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in result["skipped"].items()] + [""]
    return "\n".join(lines)


def plot_accuracy(result: dict, path: Path, machine: dict | None = None) -> Path:
    """Dice vs seconds per pair (mean ± std over pairs), one panel per test split, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(result["summaries"])
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(5.5 * max(1, len(splits)), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for sm in result["summaries"][split]:
            d, t = sm["dice"], sm["seconds"]
            if d[0] is None or not math.isfinite(d[0]):
                continue
            ax.errorbar(max(t[0], 1e-2), d[0], yerr=d[1], xerr=t[1], fmt="o", capsize=3, label=ROWS.get(sm["method"], sm["method"]))
        ax.set(xscale="log", xlabel="seconds per pair (log)", ylabel="mean Dice over labels", title=f"{split} pairs")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if machine:
        fig.suptitle(f"{result['settings']['data']}; {machine.get('cpu')} / {machine.get('device')}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_accuracy(result: dict, machine: dict, command: str, out_dir: Path = RESULTS_DIR, tag: str = "") -> list[Path]:
    """Write ``accuracy{tag}.json``, ``.csv`` (pair x label), ``_pairs.csv``, ``.md`` and ``.png``."""
    out_dir = Path(out_dir)
    stem = f"accuracy{tag}"
    return [
        write_json(out_dir / f"{stem}.json", {"command": command, "machine": machine, **result}),
        write_csv(out_dir / f"{stem}.csv", result["label_rows"], LABEL_CSV_COLUMNS),
        write_csv(out_dir / f"{stem}_pairs.csv", result["pair_rows"], PAIR_CSV_COLUMNS),
        write_text(out_dir / f"{stem}.md", accuracy_markdown(result, machine, command)),
        plot_accuracy(result, out_dir / f"{stem}.png", machine),
    ]


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main as bench_main

    sys.exit(bench_main(["--only", "accuracy"] + sys.argv[1:]))
