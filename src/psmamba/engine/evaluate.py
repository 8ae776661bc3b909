"""Evaluate a registration method over many pairs: per-pair, per-label metrics and a summary.

:func:`evaluate_pairs` registers every pair with :func:`psmamba.engine.register.register_pair`
(a named method of :mod:`psmamba.engine.methods`: the identity for the "before registration"
baseline, a network, a network refined or fine-tuned on each pair, instance optimisation) and
measures, on the fixed image's grid:

* Dice per label and its mean over labels (labels warped nearest-neighbour;
  :func:`psmamba.metrics.dice`'s rules for labels missing from a map),
* HD95 per label in mm (the fixed image's spacing; :func:`psmamba.metrics.hd95`),
* folding % (voxels with ``det J <= 0``) and SDlogJ of the field (:mod:`psmamba.metrics`),
* seconds per pair: the preparation (intensity scaling, the moving image and labels resampled
  onto the fixed grid) and the registration proper (resampling to the model grid, the network
  and/or the optimisation, the field back to the fixed grid and its inverse); reading files and
  computing metrics are excluded.

The tables, their files and summaries are :mod:`psmamba.engine.results`. Pairs come from a pair
list (:func:`pair_files`), the demo (:func:`demo_pairs`) or a training config's split
(:func:`split_pairs`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from psmamba.engine.results import EvaluationResult
from psmamba.errors import PsmambaError
from psmamba.io import READ_SUFFIXES

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from psmamba.engine.methods import RegistrationMethod

__all__ = ["Pair", "pair_files", "check_pairs", "LazyPairs", "demo_pairs", "split_pairs", "evaluate_pairs"]


@dataclass
class Pair:
    """One registration pair. Paths, :class:`psmamba.io.Image` objects or 3-D arrays.

    Attributes:
        pair_id: unique name of the pair (used to match pairs across methods).
        moving, fixed: the images; ``moving_labels``, ``fixed_labels``: their label maps or None.
        ddf: a displacement field computed elsewhere for this pair (scored by
            ``evaluate_pairs(fields=True)``, :class:`psmamba.engine.methods.GivenField`), or None.
    """

    pair_id: str
    moving: Any
    fixed: Any
    moving_labels: Any = None
    fixed_labels: Any = None
    ddf: Any = None


def _stem(p: Any) -> str:
    name = Path(str(p)).name
    for suffix in (*READ_SUFFIXES, ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def pair_files(path: str | os.PathLike) -> list[Pair]:
    """The pairs of a pair list of files (:func:`psmamba.data.pairs.read_pair_list`'s format).

    Relative paths are relative to the list's folder; empty label cells mean "no labels";
    default pair id ``<moving stem>_to_<fixed stem>``.

    Raises:
        PsmambaError: a listed file that does not exist, or a duplicate pair id (naming the line).
    """
    from psmamba.data.pairs import read_pair_list

    base = Path(path).expanduser().parent
    pairs: list[Pair] = []
    seen: set[str] = set()
    for row in read_pair_list(path):
        files: dict[str, Path | None] = {}
        for name in ("moving", "fixed", "moving_labels", "fixed_labels", "ddf"):
            value = getattr(row, name)
            if value is None:
                files[name] = None
                continue
            p = Path(value).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.exists():
                hint = ""
                if not pairs and not value.lower().endswith(READ_SUFFIXES):
                    hint = (" (if this row is a header, name its columns moving, fixed[, moving_labels, "
                            "fixed_labels][, pair_id])")
                what = "displacement field (ddf)" if name == "ddf" else name.replace("_", " ")
                raise PsmambaError(f"pair list {row.where}: {what} file {p} does not exist{hint}")
            files[name] = p
        pid = row.pair_id or f"{_stem(files['moving'])}_to_{_stem(files['fixed'])}"
        if pid in seen:
            if row.pair_id:
                raise PsmambaError(f"pair list {row.where}: duplicate pair id {pid!r}")
            raise PsmambaError(f"pair list {row.where}: the same moving and fixed files as an earlier row (pair id "
                               f"{pid!r}, made from their names): give each row a pair_id to tell them apart")
        seen.add(pid)
        pairs.append(Pair(pid, files["moving"], files["fixed"], files["moving_labels"], files["fixed_labels"],
                          files["ddf"]))
    return pairs


def check_pairs(
    pairs: Sequence[Pair],
    *,
    labels: Sequence[int] | None = None,
    min_size: int | None = None,
    why: str | None = None,
    fields: bool = False,
) -> int:
    """Check every input of every pair before the first one is registered.

    Each distinct file is read once (:func:`psmamba.checks.check_volume_file`: readable,
    3-D, finite, a sane affine, an image not constant, a label map of integers) and only its
    facts are kept; in-memory images are checked in place. Then, per pair
    (:func:`psmamba.checks.check_inputs`): image sizes, label maps on their image's grid, and
    fixed and moving label maps sharing a label (of ``labels``, when given). :class:`LazyPairs` (the demo's and a config's preprocessed volumes) are not
    read here: each pair is checked when it is registered.

    Args:
        pairs: the pairs.
        labels: the label codes to be scored (default: all).
        min_size, why: the fewest voxels a side the method needs of both images, and why
            (:func:`psmamba.checks.check_size`); the fixed image also needs
            :data:`psmamba.checks.METRICS_MIN_SIZE` for the metrics.
        fields: each pair's ``ddf`` too (read, finite, on its fixed image's grid:
            :meth:`psmamba.engine.methods.GivenField.check`).

    Returns:
        The number of files read.

    Raises:
        PsmambaError: the first problem found, naming the file (a problem of a pair: the pair
            id, then its files).
    """
    from psmamba.checks import _codes_of, check_inputs, check_label_codes, check_label_list, check_volume_file
    from psmamba.io import as_image

    labels = check_label_list(labels)
    if isinstance(pairs, LazyPairs):
        return 0
    cache: dict[tuple[str, bool], Any] = {}
    present: set[int] = set()

    def facts(obj: Any, what: str, is_labels: bool) -> Any:
        """A file's facts (read once), or the in-memory image as an Image (checked with the pair)."""
        if obj is None:
            return None
        if isinstance(obj, (str, os.PathLike)):
            key = (os.path.realpath(Path(obj).expanduser()), is_labels)
            if key not in cache:
                cache[key] = check_volume_file(obj, what, labels=is_labels)
            return cache[key]
        return as_image(obj, what, labels=is_labels)  # in memory: no copy

    for pair in pairs:
        inputs = [facts(pair.fixed, "fixed image", False), facts(pair.moving, "moving image", False),
                  facts(pair.fixed_labels, "fixed labels", True), facts(pair.moving_labels, "moving labels", True)]
        try:
            check_inputs(*inputs, labels=labels, min_size=min_size, why=why)
            if fields:
                from psmamba.engine.methods import GivenField

                fixed = inputs[0]
                shape = fixed.shape if hasattr(fixed, "shape") else fixed.data.shape
                named = isinstance(pair.fixed, (str, os.PathLike))
                GivenField(pair.ddf).check(shape, fixed.affine, f"the fixed image {pair.fixed}" if named else "the fixed image")
        except PsmambaError as exc:
            raise PsmambaError(f"pair {pair.pair_id}: {exc}") from None
        if labels is not None:
            present.update(*(_codes_of(x) for x in inputs[2:] if x is not None))
    # a code may be absent from some pairs (a structure a subject lacks), not from all of them
    check_label_codes(labels, present, f"the {len(pairs)} pair(s)")
    return len(cache)


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
    test=data.options.test (0.2), seed=run.seed)`` (a published split keeps its own
    parts; :meth:`psmamba.data.SourceData.make_splits`), with the same preprocessing pipeline and cache; ``demo`` uses the demo's splits.

    Args:
        config: a :class:`psmamba.config.TrainConfig`, its dict form (as stored in
            checkpoints), or the path of a YAML config.
        split: ``"test"`` (default), ``"val"``, ``"train"`` (``"test_hard"`` for the demo).
    """
    cfg = _train_config(config)
    d = cfg.data
    if d.source == "demo":
        from psmamba.data.demo import build_demo

        demo = build_demo(size=d.size, **dict(d.options))
        if not demo.pairs.get(split):
            raise PsmambaError(f"the demo data set has no {split!r} pairs; choose one of {sorted(demo.pairs)}")
        return LazyPairs(demo.pair_dataset(split, labels=True), f"demo {d.size} {split}")
    if d.source == "synth":
        raise PsmambaError("data.source synth has no test split: evaluate on --pairs, --demo or a data folder")
    from psmamba.data.training import open_file_source, prepare_before_use, report_left_out

    root = Path(str(d.root)).expanduser()

    src, splits, engine_opts = open_file_source(cfg)
    report_left_out(src, splits)
    if not splits.get(split):
        raise PsmambaError(f"{root}: the {split!r} split holds no volumes")
    ds = src.pair_dataset(split, splits=splits, pipeline=engine_opts.get("pipeline", "preset"),
                          cache_dir=engine_opts.get("cache_dir"), labels=True)
    if not len(ds):
        raise PsmambaError(f"{root}: the {split!r} split holds no pairs")
    prepare_before_use(ds)  # an unusable volume fails before the first pair, not at pair 3 of 90
    return LazyPairs(ds, f"{root} {split}")


def _train_config(config: Any):
    from psmamba.config import TrainConfig, config_from_dict, load_train_config

    if isinstance(config, (str, os.PathLike)):
        return load_train_config(config)
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), "checkpoint config")
    if isinstance(config, TrainConfig):
        return config
    raise PsmambaError(f"expected a training config, got {type(config).__name__}")


def trained_on(config: Any, checkpoint_config: Any, split: str = "test") -> list[str]:
    """The volumes of ``split``, as ``config`` draws it, that a network trained with
    ``checkpoint_config`` saw in its own ``train`` or ``val`` part (sorted ids; ``[]`` when the
    two configurations read different data sets, or the demo, whose splits are fixed).

    Two configurations of one data folder draw different splits when their ``run.seed``,
    ``data.val_fraction`` or ``data.options`` differ (``psmamba train --seed 1`` and a YAML
    that says 0): scoring such a split would score training subjects as test pairs.
    """
    from psmamba.data.training import open_file_source

    a, b = _train_config(config), _train_config(checkpoint_config)
    if a.data.source != b.data.source or a.data.source in ("demo", "synth", "pretrain"):
        return []
    root_a = Path(str(a.data.root)).expanduser().resolve()
    root_b = Path(str(b.data.root)).expanduser().resolve()
    if root_a != root_b:
        return []
    _, splits_a, _ = open_file_source(a)
    try:
        _, splits_b, _ = open_file_source(b)
    except PsmambaError:
        return []  # the checkpoint's own options no longer read this folder: nothing to compare
    seen = set(splits_b.get("train", [])) | set(splits_b.get("val", []))
    return sorted(set(splits_a.get(split, [])) & seen)


# --------------------------------------------------------------------------- evaluation
def evaluate_pairs(
    pairs: Sequence[Pair],
    *,
    method: "RegistrationMethod | str | None" = None,
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
    name: str | None = None,
    model_size: Sequence[int] | None = None,
    progress: bool | Callable[[str], None] = False,
    fields: bool = False,
) -> EvaluationResult:
    """Register and score every pair (or, with ``fields``, score the fields the pairs give).

    Args:
        pairs: the pairs (:class:`Pair`); ids must be unique.
        method: a method name (``"default"``, ``"affine+io"``, ``"network+io"``, ...: see
            :func:`psmamba.engine.methods.parse_method`; with ``checkpoint``/``model`` for the
            network), a :class:`psmamba.engine.register.Pipeline` or a
            :class:`psmamba.engine.methods.RegistrationMethod` (built once, run on every pair);
            or, when None, one built from the options below as earlier versions did:
        checkpoint / model: the network (loaded once, shared by all pairs; with ``iters > 0``
            each pair fine-tunes its own copy or refines the network's field). Exclusive with
            ``identity``. A checkpoint's network is named after its file.
        identity: score the unregistered pairs (the "initial" row of the paper's tables).
        iters, refine, lr, lam, device, model_size: as :func:`psmamba.engine.register.register_pair`
            (``iters > 0`` with no network is instance optimisation of the field).
        labels: label codes to score (default: all non-zero codes in either map).
        hd95: also compute HD95 (the slowest metric on large volumes).
        name: the name in the ``method`` column (default: the method's own name).
        progress: print one line per pair to stderr (or call this function with it).
        fields: score each pair's own ``ddf`` (a field computed elsewhere, another tool's result:
            :class:`psmamba.engine.methods.GivenField`) instead of registering; exclusive with
            the method options; its ``seconds`` are not known (NaN); ``name`` names it (default
            ``"given field"``).

    Every input of every pair is checked before the first pair is registered
    (:func:`check_pairs`; the method's ``min_size`` / ``min_size_why`` attributes, when it has
    them, say how small an image it can take).

    Raises:
        PsmambaError: conflicting options, duplicate pair ids, or any bad input.
    """
    from psmamba.engine.distributed import resolve_device
    from psmamba.engine.register import register_pair

    if fields and (identity or checkpoint is not None or model is not None or iters or method is not None):
        raise PsmambaError("--fields scores the displacement fields the pair list gives: do not combine it with "
                           "--method, a checkpoint, --identity or --iters")
    if identity and (checkpoint is not None or model is not None or iters or method is not None):
        raise PsmambaError("--identity scores unregistered pairs: do not combine it with a checkpoint or --iters")
    if method is None and not (identity or fields) and checkpoint is None and model is None and not iters:
        raise PsmambaError("nothing to evaluate: give --method NAME, a checkpoint, --identity, --iters N or --fields")
    if not pairs:
        raise PsmambaError("no pairs to evaluate")
    given = [] if isinstance(pairs, LazyPairs) else [p.pair_id for p in pairs if getattr(p, "ddf", None) is not None]
    if fields and len(given) < len(pairs):
        lacking = [p.pair_id for p in pairs if getattr(p, "ddf", None) is None]
        raise PsmambaError(f"--fields: {len(lacking)} of {len(pairs)} pair(s) name no displacement field (a ddf "
                           f"column in the pair list), e.g. {lacking[0]}")
    if given and not fields:
        raise PsmambaError(f"the pairs name displacement fields (a ddf column: {given[0]}, ...): add --fields to "
                           "score them, or drop the column to register the pairs")
    ids = list(getattr(pairs, "pair_ids", None) or [p.pair_id for p in pairs])
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PsmambaError(f"duplicate pair ids: {dup[:5]}")
    dev = resolve_device(device)
    if fields:
        return _score_fields(pairs, name or "given field", dev, labels, hd95, _say(progress))
    if isinstance(method, str):  # a pipeline by name ("default", "affine+io", ...), built once
        from psmamba.engine.register import build_pipeline

        if iters:
            raise PsmambaError("give --method or --iters, not both")
        method = build_pipeline(method, checkpoint=checkpoint, model=model, lr=lr, lam=lam, model_size=model_size,
                                device=dev)
    elif method is None:
        method = _method_of(checkpoint, model, iters, refine, lr, lam, model_size, dev)
    method = method.to(dev)
    say = _say(progress)
    t0 = time.perf_counter()
    n_files = check_pairs(pairs, labels=labels, min_size=getattr(method, "min_size", None),
                          why=getattr(method, "min_size_why", None))
    if say is not None and n_files:
        say(f"checked {n_files} files of {len(pairs)} pairs in {time.perf_counter() - t0:.1f} s")
    result = EvaluationResult(method=name or method.name)
    for k, pair in enumerate(pairs, start=1):
        with _naming_pair(pair, k, len(pairs)):
            res = register_pair(pair.fixed, pair.moving, moving_labels=pair.moving_labels,
                                fixed_labels=pair.fixed_labels, method=method, device=dev, overview=False,
                                labels=labels)
        prow = _score(result, pair, res, hd95)
        if say is not None:
            say(
                f"[{k}/{len(pairs)}] {pair.pair_id}: Dice {prow['dice_before_mean']:.4f} -> {prow['dice_mean']:.4f}, "
                + (f"HD95 {prow['hd95_mean_mm']:.2f} mm, " if hd95 else "")
                + f"folding {prow['folding_percent']:.3f}%, "
                f"SDlogJ {prow['sdlogj']:.3f}, {prow['seconds']:.2f} s"
            )
    return result


@contextlib.contextmanager
def _naming_pair(pair, k: int, n: int):
    """A one-line error raised while a pair runs (past the up-front checks) names that pair."""
    try:
        yield
    except PsmambaError as exc:
        raise PsmambaError(f"pair {pair.pair_id} ({k} of {n}; nothing written): {exc}") from None


def _score_fields(pairs: Sequence[Pair], name: str, dev, labels, hd95: bool,
                  say: Callable[[str], None] | None) -> EvaluationResult:
    """``evaluate_pairs(fields=True)``: every pair's given field, checked first, then scored."""
    from psmamba.engine.methods import GivenField
    from psmamba.engine.register import register_pair

    t0 = time.perf_counter()
    n_files = check_pairs(pairs, labels=labels, fields=True)
    if say is not None:
        say(f"checked {n_files} files and {len(pairs)} displacement fields of {len(pairs)} pairs "
            f"in {time.perf_counter() - t0:.1f} s")
    result = EvaluationResult(method=name)
    for k, pair in enumerate(pairs, start=1):
        with _naming_pair(pair, k, len(pairs)):
            res = register_pair(pair.fixed, pair.moving, moving_labels=pair.moving_labels,
                                fixed_labels=pair.fixed_labels, method=GivenField(pair.ddf, name=name), device=dev,
                                overview=False, labels=labels, inverse=False)
        prow = _score(result, pair, res, hd95, timed=False)
        if say is not None:
            say(f"[{k}/{len(pairs)}] {pair.pair_id}: Dice {prow['dice_before_mean']:.4f} -> {prow['dice_mean']:.4f}, "
                + (f"HD95 {prow['hd95_mean_mm']:.2f} mm, " if hd95 else "")
                + f"folding {prow['folding_percent']:.3f}%, SDlogJ {prow['sdlogj']:.3f}")
    return result


def _method_of(checkpoint, model, iters, refine, lr, lam, model_size, dev) -> RegistrationMethod:
    """The method of ``evaluate_pairs``' options; a checkpoint's network is named after its file."""
    from psmamba.engine.methods import load_model, method_from_options, training_size

    name = None
    if checkpoint is not None:
        if model is not None:
            raise PsmambaError("give either checkpoint= or model=, not both")
        model, ckpt = load_model(checkpoint, device=dev)
        model_size = model_size or training_size(ckpt)
        name = Path(checkpoint).stem
    return method_from_options(model, iters=iters, refine=refine, lr=lr, lam=lam, grid=model_size, name=name,
                               checkpoint=checkpoint)


def _say(progress: bool | Callable[[str], None]) -> Callable[[str], None] | None:
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return None


def _score(result: EvaluationResult, pair: Pair, res, hd95: bool, timed: bool = True) -> dict[str, Any]:
    """Append one registered pair's label rows and pair row to ``result``; returns the pair row
    (``timed``: False for a field computed elsewhere, whose seconds are not known)."""
    from psmamba import metrics
    from psmamba.engine.results import nanmean

    s = res.summary
    seconds = s["timings_s"]["preprocess"] + s["timings_s"]["register"] if timed else float("nan")
    common = {
        "method": result.method, "pair_id": pair.pair_id,
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
            result.label_rows.append({**common, "label": int(lab), "dice": d, "dice_before": dice_before.get(lab),
                                      "hd95_mm": hd.get(int(lab), float("nan"))})
    else:
        result.label_rows.append({**common, "label": None, "dice": None, "dice_before": None, "hd95_mm": None})
    prow = {
        **common, "n_labels": len(dice_after), "dice_mean": nanmean(dice_after.values()),
        "dice_before_mean": nanmean(dice_before.values()), "hd95_mean_mm": nanmean(hd.values()),
        "sdlogj_l2r": s["sdlogj_l2r"],
    }
    result.pair_rows.append(prow)
    return prow
