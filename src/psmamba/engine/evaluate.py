"""Evaluate a registration method over many pairs: per-pair, per-label metrics and a summary.

:func:`evaluate_pairs` registers every pair with :func:`psmamba.engine.register.register_pair`
(a checkpoint, test-time optimisation, or the identity for the "before registration" baseline)
and measures, on the fixed image's grid:

* Dice per label and its mean over labels (labels warped nearest-neighbour;
  :func:`psmamba.metrics.dice`'s rules for labels missing from a map),
* HD95 per label in mm (the fixed image's spacing; :func:`psmamba.metrics.hd95`),
* folding % (voxels with ``det J <= 0``) and SDlogJ of the field (:mod:`psmamba.metrics`),
* seconds per pair: the registration proper (resampling to the model grid, the network and/or
  the optimisation, the field back to the fixed grid); reading files and computing metrics are
  excluded.

Results files (``write_results(path)``, what ``psmamba evaluate --out results.csv`` writes)
------------------------------------------------------------------------------------------
* ``results.csv`` -- one row per pair x label (tidy/long format):
  ``method, pair_id, moving, fixed, label, dice, dice_before, hd95_mm, folding_percent, sdlogj,
  seconds``. The per-pair columns (folding, SDlogJ, seconds) repeat on each label row of the
  pair; a pair without label maps has one row with an empty ``label``.
* ``results_pairs.csv`` -- one row per pair: ``method, pair_id, moving, fixed, n_labels,
  dice_mean, dice_before_mean, hd95_mean_mm, folding_percent, sdlogj, sdlogj_l2r, seconds``.
* ``results_summary.md`` -- the summary table (:func:`format_summary_table`).

:func:`read_results` reads either CSV back (``psmamba evaluate --compare`` and
``psmamba plot`` use it).

The summary follows the paper's tables: Dice as mean +- standard deviation over pairs of the
per-pair mean Dice (over labels), HD95 likewise, folding % and SDlogJ as mean +- std over
pairs, time as the mean seconds per pair.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from psmamba.errors import PsmambaError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Pair",
    "EvaluationResult",
    "MethodResults",
    "evaluate_pairs",
    "read_pair_list",
    "LazyPairs",
    "demo_pairs",
    "split_pairs",
    "read_results",
    "summarize",
    "format_summary_table",
    "LABEL_COLUMNS",
    "PAIR_COLUMNS",
]

#: Columns of the per pair x label CSV.
LABEL_COLUMNS = (
    "method", "pair_id", "moving", "fixed", "label", "dice", "dice_before", "hd95_mm",
    "folding_percent", "sdlogj", "seconds",
)
#: Columns of the per-pair CSV.
PAIR_COLUMNS = (
    "method", "pair_id", "moving", "fixed", "n_labels", "dice_mean", "dice_before_mean",
    "hd95_mean_mm", "folding_percent", "sdlogj", "sdlogj_l2r", "seconds",
)


@dataclass
class Pair:
    """One registration pair. Paths, :class:`psmamba.io.Image` objects or 3-D arrays.

    Attributes:
        pair_id: unique name of the pair (used to match pairs across methods).
        moving, fixed: the images; ``moving_labels``, ``fixed_labels``: their label maps or None.
    """

    pair_id: str
    moving: Any
    fixed: Any
    moving_labels: Any = None
    fixed_labels: Any = None


def _stem(p: Any) -> str:
    name = Path(str(p)).name
    for suffix in (".nii.gz", ".nii", ".hdr", ".img", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_pair_list(path: str | os.PathLike) -> list[Pair]:
    """Read a pair list CSV: ``moving,fixed[,moving_labels,fixed_labels][,pair_id]``.

    A header row is optional: when the first row names the columns (``moving``, ``fixed``,
    ``moving_labels``, ``fixed_labels``, ``pair_id``; any order) they are matched by name,
    otherwise the columns are positional. Relative paths are relative to the CSV's folder.
    Empty label cells mean "no labels". Default pair id: ``<moving stem>_to_<fixed stem>``.

    Raises:
        PsmambaError: missing CSV, a row with fewer than 2 columns, a listed file that does not
            exist, or a duplicate pair id; the message names the CSV line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PsmambaError(f"pair list {path} does not exist")
    base = path.parent
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise PsmambaError(f"pair list {path} is empty")
    known = ("moving", "fixed", "moving_labels", "fixed_labels", "pair_id")
    header = [c.strip().lower() for c in rows[0]]
    if "moving" in header and "fixed" in header:
        unknown = [c for c in header if c and c not in known]
        if unknown:
            raise PsmambaError(f"pair list {path}: unknown column(s) {unknown}; expected some of {list(known)}")
        cols = {name: header.index(name) for name in known if name in header}
        body, first_line = rows[1:], 2
    else:
        cols = {name: i for i, name in enumerate(known[:4])}
        body, first_line = rows, 1

    def cell(row: list[str], name: str) -> str:
        i = cols.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    pairs: list[Pair] = []
    seen: set[str] = set()
    for n, row in enumerate(body, start=first_line):
        if len(row) < 2:
            raise PsmambaError(f"pair list {path} line {n}: expected moving,fixed[,moving_labels,fixed_labels]")
        files = {}
        for name in ("moving", "fixed", "moving_labels", "fixed_labels"):
            value = cell(row, name)
            if not value:
                if name in ("moving", "fixed"):
                    raise PsmambaError(f"pair list {path} line {n}: the {name} image is empty")
                files[name] = None
                continue
            p = Path(value).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.exists():
                raise PsmambaError(f"pair list {path} line {n}: {name.replace('_', ' ')} file {p} does not exist")
            files[name] = p
        pid = cell(row, "pair_id") or f"{_stem(files['moving'])}_to_{_stem(files['fixed'])}"
        if pid in seen:
            raise PsmambaError(f"pair list {path} line {n}: duplicate pair id {pid!r}")
        seen.add(pid)
        pairs.append(Pair(pid, files["moving"], files["fixed"], files["moving_labels"], files["fixed_labels"]))
    if not pairs:
        raise PsmambaError(f"pair list {path} lists no pairs")
    return pairs


# --------------------------------------------------------------------------- data set splits
class LazyPairs(Sequence):
    """The pairs of a :class:`psmamba.data.PairDataset`, read (and preprocessed) one at a time.

    Item ``i`` is a :class:`Pair` of :class:`psmamba.io.Image` objects (with the volumes'
    affines) whose id is ``"<moving id>-><fixed id>"``.
    """

    def __init__(self, dataset: Any, what: str = "") -> None:
        self.dataset = dataset
        self.what = what
        self.pair_ids_all = [f"{m}->{f}" for m, f in dataset.pairs]
        self._index = list(range(len(self.pair_ids_all)))
        self.pair_ids = list(self.pair_ids_all)

    def __len__(self) -> int:
        return len(self.pair_ids)

    def __getitem__(self, i: int | slice) -> Pair | LazyPairs:  # type: ignore[override]
        from psmamba.io import Image

        if isinstance(i, slice):  # a lazy subset (e.g. the first N pairs)
            sub = LazyPairs.__new__(LazyPairs)
            sub.dataset, sub.what = self.dataset, self.what
            sub._index = self._index[i]
            sub.pair_ids = [self.pair_ids_all[k] for k in sub._index]
            sub.pair_ids_all = self.pair_ids_all
            return sub
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        k = self._index[i]
        item = self.dataset[k]

        def image(key: str, vid: str, aff_key: str) -> Image | None:
            if key not in item:
                return None
            arr = item[key][0].numpy()
            return Image(data=arr, affine=item[aff_key].numpy().astype(np.float64), header=None, path=vid)  # type: ignore[arg-type]

        m_id, f_id = item["moving_id"], item["fixed_id"]
        return Pair(
            self.pair_ids_all[k],
            image("moving", m_id, "moving_affine"), image("fixed", f_id, "fixed_affine"),
            image("moving_labels", m_id, "moving_affine"), image("fixed_labels", f_id, "fixed_affine"),
        )


def demo_pairs(size: str = "small", split: str = "test") -> LazyPairs:
    """The pairs of one split of the built-in demo data set (:func:`psmamba.data.build_demo`).

    ``test`` is the six ordered pairs of the three real templates; ``test_hard`` adds smooth
    random deformations (see :mod:`psmamba.data.demo`).
    """
    from psmamba.data.demo import build_demo

    demo = build_demo(size=size)
    return LazyPairs(demo.pair_dataset(split, labels=True), f"demo {size} {split}")


def split_pairs(config: Any, split: str = "test") -> LazyPairs:
    """The pairs of a split of the data set a training configuration describes.

    The split is drawn exactly as ``psmamba train`` draws its train/val parts
    (:func:`psmamba.data.training.build_datasets`): ``make_splits(val=data.val_fraction,
    test=data.options.test (0.2), seed=run.seed)`` (a published split keeps its own test
    part), with the same preprocessing pipeline and cache; ``demo`` uses the demo's splits.

    Args:
        config: a :class:`psmamba.config.TrainConfig`, its dict form (as stored in
            checkpoints), or the path of a YAML config.
        split: ``"test"`` (default), ``"val"``, ``"train"`` (``"test_hard"`` for the demo).
    """
    from psmamba.config import TrainConfig, config_from_dict, load_train_config

    if isinstance(config, (str, os.PathLike)):
        cfg = load_train_config(config)
    elif isinstance(config, Mapping):
        cfg = config_from_dict(dict(config), "checkpoint config")
    elif isinstance(config, TrainConfig):
        cfg = config
    else:
        raise PsmambaError(f"expected a training config, got {type(config).__name__}")
    d = cfg.data
    options = dict(d.options)
    if d.source == "demo":
        from psmamba.data.demo import build_demo

        demo = build_demo(size=d.size, **options)
        if not demo.pairs.get(split):
            raise PsmambaError(f"the demo data set has no {split!r} pairs; choose one of {sorted(demo.pairs)}")
        return LazyPairs(demo.pair_dataset(split, labels=True), f"demo {d.size} {split}")
    if d.source == "synth":
        raise PsmambaError("data.source synth has no test split: evaluate on --pairs, --demo or a data folder")
    from psmamba.data.sources import open_source

    root = Path(str(d.root)).expanduser()
    if not root.exists():
        raise PsmambaError(f"data.root {root} does not exist")
    engine_keys = ("pipeline", "cache_dir", "test", "atlas", "atlas_direction")
    engine_opts = {k: options.pop(k) for k in engine_keys if k in options}
    src = open_source(root, layout={"abdomenct": "abdomen"}.get(d.source, d.source), **options)
    splits = src.make_splits(val=d.val_fraction, test=engine_opts.get("test", 0.2), seed=cfg.run.seed)
    if not splits.get(split):
        raise PsmambaError(f"{root}: the {split!r} split holds no volumes")
    ds = src.pair_dataset(split, splits=splits, pipeline=engine_opts.get("pipeline", "preset"),
                          cache_dir=engine_opts.get("cache_dir"), labels=True)
    if not len(ds):
        raise PsmambaError(f"{root}: the {split!r} split holds no pairs")
    return LazyPairs(ds, f"{root} {split}")


# --------------------------------------------------------------------------- evaluation
@dataclass
class EvaluationResult:
    """Per pair x label rows and per-pair rows of one method (see the module docstring)."""

    method: str
    label_rows: list[dict[str, Any]] = field(default_factory=list)
    pair_rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Mean +- std over pairs (see :func:`summarize`)."""
        return summarize(self.pair_rows, self.method)

    def write(self, path: str | os.PathLike) -> list[Path]:
        """Write ``path`` (per label), ``<stem>_pairs.csv`` and ``<stem>_summary.md``; atomic each."""
        path = Path(path)
        pairs_path, md_path = companion_paths(path)
        _write_csv(path, LABEL_COLUMNS, self.label_rows)
        _write_csv(pairs_path, PAIR_COLUMNS, self.pair_rows)
        _write_text(md_path, format_summary_table([self.summary()]) + "\n")
        return [path, pairs_path, md_path]


def companion_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``results.csv`` -> (``results_pairs.csv``, ``results_summary.md``)."""
    path = Path(path)
    stem = path.name[:-4] if path.name.lower().endswith(".csv") else path.name
    return path.with_name(f"{stem}_pairs.csv"), path.with_name(f"{stem}_summary.md")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (one line) when the results file's folder cannot be written."""
    path = Path(path).expanduser().absolute()
    if path.exists() and path.is_dir():
        raise PsmambaError(f"results file {path} is a folder")
    if not path.parent.is_dir():
        raise PsmambaError(f"results file {path}: folder {path.parent} does not exist")
    try:  # a real write: os.access says yes to root even on read-only folders
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PsmambaError(f"results file {path}: folder {path.parent} is not writable ({exc.strerror or exc})") from None
    return path


def _fmt(v: Any, digits: int = 6) -> Any:
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(float(v)) else f"{float(v):.{digits}g}"
    return "" if v is None else v


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]], digits: int = 6) -> None:
    """Write rows atomically; floats with ``digits`` significant digits, NaN/None as empty cells."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: _fmt(row.get(k), digits) for k in columns})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _nanmean(values: Iterable[float]) -> float:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def evaluate_pairs(
    pairs: Sequence[Pair],
    *,
    checkpoint: str | os.PathLike | None = None,
    model: "torch.nn.Module | None" = None,
    identity: bool = False,
    iters: int = 0,
    refine: str = "weights",
    lr: float | None = None,
    lam: float | None = None,
    device: "str | torch.device" = "auto",
    labels: Sequence[int] | None = None,
    hd95: bool = True,
    method: str | None = None,
    model_size: Sequence[int] | None = None,
    progress: bool | Callable[[str], None] = False,
) -> EvaluationResult:
    """Register and score every pair.

    Args:
        pairs: the pairs (:class:`Pair`); ids must be unique.
        checkpoint / model: the network (loaded once, shared by all pairs; with ``iters > 0``
            each pair fine-tunes its own copy). Exclusive with ``identity``.
        identity: score the unregistered pairs (the "initial" row of the paper's tables).
        iters, refine, lr, lam, device, model_size: as :func:`psmamba.engine.register.register_pair`
            (``iters > 0`` with no network is instance optimisation of the field).
        labels: label codes to score (default: all non-zero codes in either map).
        hd95: also compute HD95 (the slowest metric on large volumes).
        method: the name written in the ``method`` column (default from the settings).
        progress: print one line per pair to stderr (or call this function with it).

    Raises:
        PsmambaError: conflicting options, duplicate pair ids, or any bad input
            (checked by ``register_pair`` before it works on that pair).
    """
    from psmamba import metrics
    from psmamba.engine.register import load_model, register_pair, resolve_device, training_size

    if identity and (checkpoint is not None or model is not None or iters):
        raise PsmambaError("--identity scores unregistered pairs: do not combine it with a checkpoint or --iters")
    if not identity and checkpoint is None and model is None and not iters:
        raise PsmambaError("nothing to evaluate: give a checkpoint, --identity or --iters N")
    if not pairs:
        raise PsmambaError("no pairs to evaluate")
    ids = list(getattr(pairs, "pair_ids", None) or [p.pair_id for p in pairs])
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PsmambaError(f"duplicate pair ids: {dup[:5]}")
    dev = resolve_device(device)
    if checkpoint is not None:
        if model is not None:
            raise PsmambaError("give either checkpoint= or model=, not both")
        model, ckpt = load_model(checkpoint, device=dev)
        model_size = model_size or training_size(ckpt)
    if method is None:
        method = (
            "identity" if identity
            else (Path(checkpoint).stem if checkpoint is not None else "network" if model is not None else "instance-opt")
            + (f"+tto{iters}" if iters and (checkpoint is not None or model is not None) else "")
        )
    say: Callable[[str], None] | None
    if callable(progress):
        say = progress
    elif progress:
        def say(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)
    else:
        say = None

    result = EvaluationResult(method=method)
    for k, pair in enumerate(pairs, start=1):
        res = register_pair(
            pair.fixed, pair.moving,
            moving_labels=pair.moving_labels, fixed_labels=pair.fixed_labels,
            model=model, iters=iters, refine=refine, lr=lr, lam=lam, device=dev,
            model_size=model_size, overview=False, labels=labels,
        )
        s = res.summary
        seconds = s["timings_s"]["preprocess"] + s["timings_s"]["register"]
        common = {
            "method": method, "pair_id": pair.pair_id,
            "moving": s.get("moving") or "", "fixed": s.get("fixed") or "",
            "folding_percent": s["folding_percent"], "sdlogj": s["sdlogj"], "seconds": seconds,
        }
        dice_after = (s.get("dice_after") or {}).get("per_label", {})
        dice_before = (s.get("dice_before") or {}).get("per_label", {})
        hd: dict[int, float] = {}
        if hd95 and dice_after and res.fixed_labels is not None and res.warped_labels is not None:
            hd = {int(k): float(v) for k, v in metrics.hd95(
                res.fixed_labels, res.warped_labels, spacing=s["fixed_spacing"], labels=list(dice_after)
            ).items()}
        if dice_after:
            for lab, d in dice_after.items():
                result.label_rows.append({
                    **common, "label": int(lab), "dice": d, "dice_before": dice_before.get(lab),
                    "hd95_mm": hd.get(int(lab), float("nan")),
                })
        else:
            result.label_rows.append({**common, "label": None, "dice": None, "dice_before": None, "hd95_mm": None})
        prow = {
            **common,
            "n_labels": len(dice_after),
            "dice_mean": _nanmean(dice_after.values()),
            "dice_before_mean": _nanmean(dice_before.values()),
            "hd95_mean_mm": _nanmean(hd.values()),
            "sdlogj_l2r": s["sdlogj_l2r"],
        }
        result.pair_rows.append(prow)
        if say is not None:
            say(
                f"[{k}/{len(pairs)}] {pair.pair_id}: Dice {prow['dice_before_mean']:.4f} -> {prow['dice_mean']:.4f}, "
                f"HD95 {prow['hd95_mean_mm']:.2f} mm, folding {prow['folding_percent']:.3f}%, "
                f"SDlogJ {prow['sdlogj']:.3f}, {seconds:.2f} s"
            )
    return result


# --------------------------------------------------------------------------- summary table
def _mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    v = np.array([float(x) for x in values if x is not None and x != ""], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarize(pair_rows: Sequence[Mapping[str, Any]], method: str | None = None) -> dict[str, Any]:
    """Mean and (sample, ddof=1) standard deviation over pairs of each per-pair metric.

    Returns ``{"method", "pairs", "dice": (mean, std), "dice_before", "hd95_mm",
    "folding_percent", "sdlogj", "seconds"}`` (each a ``(mean, std)`` tuple).
    """
    out: dict[str, Any] = {"method": method or (pair_rows[0].get("method") if pair_rows else ""), "pairs": len(pair_rows)}
    for key, col in (
        ("dice", "dice_mean"), ("dice_before", "dice_before_mean"), ("hd95_mm", "hd95_mean_mm"),
        ("folding_percent", "folding_percent"), ("sdlogj", "sdlogj"), ("seconds", "seconds"),
    ):
        mean, std, _ = _mean_std(r.get(col) for r in pair_rows)
        out[key] = (mean, std)
    return out


def format_summary_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table in the layout of the paper's result tables (one row per method)."""

    def ms(pair: tuple[float, float], digits: int) -> str:
        m, s = pair
        return "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"

    head = "| method | pairs | Dice | HD95 (mm) | folding % (\\|J\\|<=0) | SDlogJ | time (s/pair) |"
    lines = [head, "|---|---:|---|---|---|---|---:|"]
    for s in summaries:
        t = s["seconds"][0]
        lines.append(
            f"| {s['method']} | {s['pairs']} | {ms(s['dice'], 3)} | {ms(s['hd95_mm'], 2)} | "
            f"{ms(s['folding_percent'], 3)} | {ms(s['sdlogj'], 3)} | {'-' if math.isnan(t) else f'{t:.2f}'} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading back
@dataclass
class MethodResults:
    """One method's results read back from a CSV.

    Attributes:
        name: the method name (the ``method`` column, or the file name).
        path: the CSV read.
        per_pair: ``{pair_id: mean Dice over labels}``.
        per_label: ``{label: {pair_id: Dice}}`` (empty when read from a per-pair CSV).
        pair_rows: the per-pair rows (for :func:`summarize`).
    """

    name: str
    path: Path
    per_pair: dict[str, float]
    per_label: dict[int, dict[str, float]]
    pair_rows: list[dict[str, Any]]


def _num(v: Any) -> float:
    try:
        return float(v) if v not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def read_results(path: str | os.PathLike, name: str | None = None) -> MethodResults:
    """Read a results CSV written by :func:`evaluate_pairs` (either the per-label or the per-pair file).

    The per-pair mean Dice is recomputed from the per-label rows when those are given (mean
    over labels, NaN labels skipped), so both files give the same numbers.

    Raises:
        PsmambaError: missing file, or a CSV without ``pair_id`` and Dice columns.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PsmambaError(f"results file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PsmambaError(f"results file {path} cannot be read ({exc})") from None
    if "pair_id" not in cols or not ({"dice", "label"} <= set(cols) or "dice_mean" in cols):
        raise PsmambaError(
            f"results file {path} is not a psmamba evaluation CSV (needs pair_id and label,dice or dice_mean columns)"
        )
    method = name or next((r.get("method") for r in rows if r.get("method")), None) or _stem(path).removesuffix(".csv")
    per_label: dict[int, dict[str, float]] = {}
    pair_rows: dict[str, dict[str, Any]] = {}
    if "label" in cols:
        grouped: dict[str, list[float]] = {}
        for r in rows:
            pid = r["pair_id"]
            first = pair_rows.setdefault(pid, {
                "method": method, "pair_id": pid, "moving": r.get("moving", ""), "fixed": r.get("fixed", ""),
                "folding_percent": _num(r.get("folding_percent")), "sdlogj": _num(r.get("sdlogj")),
                "seconds": _num(r.get("seconds")), "_hd": [], "_before": [],
            })
            grouped.setdefault(pid, [])
            if r.get("label", "") != "":
                lab = int(float(r["label"]))
                d = _num(r.get("dice"))
                per_label.setdefault(lab, {})[pid] = d
                grouped[pid].append(d)
                first["_hd"].append(_num(r.get("hd95_mm")))
                first["_before"].append(_num(r.get("dice_before")))
        for pid, row in pair_rows.items():
            row["dice_mean"] = _nanmean(grouped[pid])
            row["hd95_mean_mm"] = _nanmean(row.pop("_hd"))
            row["dice_before_mean"] = _nanmean(row.pop("_before"))
            row["n_labels"] = len(grouped[pid])
    else:
        for r in rows:
            pair_rows[r["pair_id"]] = {
                **r, "method": method,
                **{k: _num(r.get(k)) for k in ("dice_mean", "dice_before_mean", "hd95_mean_mm",
                                                "folding_percent", "sdlogj", "sdlogj_l2r", "seconds")},
            }
    per_pair = {pid: float(r["dice_mean"]) for pid, r in pair_rows.items()}
    return MethodResults(method, path, per_pair, per_label, list(pair_rows.values()))
