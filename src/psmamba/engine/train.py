"""Training: :func:`fit` runs the paper's protocol (or any :class:`TrainConfig`) end to end.

One call does everything a run needs::

    from psmamba.engine import fit, load_train_config
    result = fit(load_train_config("configs/paper_lpba40.yaml", ["optim.epochs=2"]))
    result.best_checkpoint          # OUT/best.pt, selected by validation Dice (never test)

The output folder holds ``config.yaml`` (the resolved config), ``last.pt`` (the full training
state: :mod:`psmamba.engine.checkpointing`), ``best.pt`` (the model with the best validation
Dice, loadable by :func:`psmamba.models.load_checkpoint`), ``metrics.csv`` (every scalar) and
``tb/`` (TensorBoard, when installed).

Exact resumption. Nothing a step depends on is left to chance: the pair order of epoch ``m``
is a permutation seeded by ``(seed, m)`` (:func:`~psmamba.engine.distributed.epoch_order`),
the checkpoint stores the step inside the epoch, the optimiser, scheduler and gradient-scaler
states and the random generator states of every rank, and the learning rate of an epoch is a
function of its index. ``fit(cfg, resume=True)`` therefore continues with the same weights the
uninterrupted run would have had (bit for bit on the same machine and thread count).

Several processes (``torchrun``): every rank runs the same steps on its own share of each
step's pairs (:func:`~psmamba.engine.distributed.rank_batches`) and DistributedDataParallel
averages the gradients; rank 0 alone validates and writes files.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from psmamba.engine.checkpointing import (
    capture_rng_state,
    temp_beside,
    load_training_state,
    restore_rng_state,
    save_model_checkpoint,
    save_training_state,
)
from psmamba.engine.config import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_train_config,
    save_train_config,
)
from psmamba.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    barrier,
    epoch_order,
    init_distributed,
    rank_batches,
    shutdown_distributed,
    steps_per_epoch,
)
from psmamba.errors import PsmambaError

__all__ = [
    "FitResult",
    "Objective",
    "collate_pairs",
    "poly_lr",
    "fit",
    "check_output_dir",
    "CSV_FIELDS",
    "VOLATILE_KEYS",
    "RESET_ON_RESUME",
]

#: columns of ``metrics.csv`` (train rows every ``run.log_every`` steps, val rows per validation)
CSV_FIELDS = [
    "time", "epoch", "step", "split", "loss", "similarity", "regulariser", "dice_loss",
    "dice", "folding_percent", "lr", "pairs_per_s",
]

#: settings a resumed run may change without breaking exact continuation
VOLATILE_KEYS = {
    "run": {"out", "device", "threads", "log_every", "checkpoint_every", "max_steps", "max_minutes",
            "tensorboard", "progress", "images"},
    "data": {"num_workers"},
}

#: one-shot stops of an invocation: a run resumed from its stored config starts without them
RESET_ON_RESUME = {"run": {"max_steps", "max_minutes"}}


@dataclass
class FitResult:
    """What :func:`fit` returns (the same on every rank; only rank 0 wrote the files).

    Attributes:
        out_dir: the output folder.
        last_checkpoint: ``out_dir/last.pt`` (full training state).
        best_checkpoint: ``out_dir/best.pt`` or None when no validation ran yet.
        best_metric: ``"val_dice"`` (higher is better) or ``"val_loss"`` (no labels; lower).
        best_value, best_epoch: the selected validation value and its (1-based) epoch.
        epochs_completed: finished epochs (of ``optim.epochs``).
        steps: optimiser steps done in total (including before a resume).
        stopped: None after the last epoch; ``"max_steps"``, ``"time"`` or ``"signal"`` otherwise.
        history: one dict per validation (epoch, step, loss, dice, folding_percent, lr).
        metrics_csv: ``out_dir/metrics.csv``.
    """

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_metric: str
    best_value: float | None
    best_epoch: int | None
    epochs_completed: int
    steps: int
    stopped: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics_csv: Path | None = None


def poly_lr(base_lr: float, epoch: int, epochs: int, power: float = 0.8) -> float:
    """The paper's per-epoch decay for 0-based ``epoch``: ``base * (1 - epoch / epochs) ** power``.

    (The paper writes it 1-based: ``lr_m = lr (1 - (m - 1) / M)^0.8``.)
    """
    return float(base_lr) * (1.0 - float(epoch) / float(epochs)) ** float(power)


# --------------------------------------------------------------------------- objective
class Objective(nn.Module):
    """``similarity(warped, fixed) + reg_weight * regulariser(ddf) [+ dice_weight * DiceLoss]``.

    Computed in float32 whatever the autocast dtype of the forward pass. The Dice term warps the
    one-hot moving labels with the field (trilinear, so it is differentiable) and compares them
    with the fixed labels; the number of classes is ``1 + max label`` of the pair.

    ``forward(warped (B,1,D,H,W), ddf (B,3,D,H,W), fixed (B,1,D,H,W), moving_labels=None,
    fixed_labels=None) -> (total, parts)`` where ``parts`` holds the detached terms
    ``similarity``, ``regulariser`` and ``dice_loss``.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        from psmamba.losses import LNCC, MSE, BendingEnergy, DiceLoss, Diffusion

        self.similarity = LNCC(window=cfg.window) if cfg.similarity == "lncc" else MSE()
        self.regulariser = Diffusion() if cfg.regulariser == "diffusion" else BendingEnergy()
        self.reg_weight = float(cfg.reg_weight)
        self.dice_weight = float(cfg.dice_weight)
        self.dice = DiceLoss() if self.dice_weight > 0 else None

    def forward(self, warped, ddf, fixed, moving_labels=None, fixed_labels=None):
        from psmamba import spatial
        from psmamba.losses import one_hot

        with _no_autocast(warped.device):
            warped, ddf, fixed = warped.float(), ddf.float(), fixed.float()
            sim = self.similarity(warped, fixed)
            reg = self.regulariser(ddf)
            total = sim + self.reg_weight * reg
            dice_loss = torch.zeros((), device=warped.device)
            if self.dice is not None and moving_labels is not None and fixed_labels is not None:
                k = int(max(moving_labels.max(), fixed_labels.max())) + 1
                if k >= 2:
                    soft = spatial.warp(one_hot(moving_labels, k), ddf)  # (B, K, D, H, W)
                    dice_loss = self.dice(soft, fixed_labels)
                    total = total + self.dice_weight * dice_loss
        parts = {"similarity": sim.detach(), "regulariser": reg.detach(), "dice_loss": dice_loss.detach()}
        return total, parts


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA only; a null context everywhere else."""
    if amp == "none" or device.type == "cpu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- batches
def collate_pairs(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack pair dicts into a batch.

    Each item holds ``moving`` and ``fixed`` ``(1, D, H, W)`` float volumes (``(D, H, W)`` is
    accepted), optional integer ``moving_labels`` / ``fixed_labels`` and optional ids. The
    batch holds ``moving``, ``fixed`` ``(B, 1, D, H, W)`` float32, the labels ``(B, 1, D, H, W)``
    int64 when every item has them, and ``moving_id`` / ``fixed_id`` lists.
    """
    if not items:
        raise PsmambaError("collate_pairs: empty batch")
    out: dict[str, Any] = {}
    for key in ("moving", "fixed"):
        vols = []
        for item in items:
            if key not in item:
                raise PsmambaError(f"a training pair has no {key!r} volume (keys: {sorted(item)})")
            vols.append(_as_volume(item[key], key, torch.float32))
        _same_shapes(vols, key)
        out[key] = torch.stack(vols)
    if out["moving"].shape != out["fixed"].shape:
        raise PsmambaError(
            f"moving {tuple(out['moving'].shape[2:])} and fixed {tuple(out['fixed'].shape[2:])} grids differ"
        )
    for key in ("moving_labels", "fixed_labels"):
        if all(item.get(key) is not None for item in items):
            labs = [_as_volume(item[key], key, torch.int64) for item in items]
            _same_shapes(labs, key)
            out[key] = torch.stack(labs)
    for key in ("moving_id", "fixed_id"):
        out[key] = [str(item.get(key, "")) for item in items]
    return out


def _as_volume(x: Any, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[0] != 1:
        raise PsmambaError(f"{name} must be a (1, D, H, W) volume, got shape {tuple(t.shape)}")
    return t.to(dtype)


def _same_shapes(vols: list[torch.Tensor], name: str) -> None:
    shapes = {tuple(v.shape) for v in vols}
    if len(shapes) > 1:
        raise PsmambaError(f"{name}: volumes of one batch differ in shape {sorted(shapes)}; use batch_size 1")


def _to_device(batch: dict[str, Any], device: torch.device, use_labels: bool) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            if key.endswith("_labels") and not use_labels:
                continue
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


def _micro_batches(dataset, batches: list[list[int]], num_workers: int, pin: bool) -> Iterator[dict]:
    """Yield the collated micro-batches listed in ``batches``, in order."""
    if num_workers <= 0:
        for idx in batches:
            yield collate_pairs([dataset[i] for i in idx])
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_pairs,
        pin_memory=pin, persistent_workers=False,
    )
    yield from loader


# --------------------------------------------------------------------------- files
class _CsvLog:
    """``metrics.csv``: one row per log step or validation, flushed as written."""

    def __init__(self, path: Path, keep_rows: int | None) -> None:
        """``keep_rows``: rows of an existing file to keep (a resumed run drops what was logged
        after its checkpoint); ``None`` keeps them all; 0 starts a new file."""
        self.path = path
        rows: list[dict[str, str]] = []
        if keep_rows != 0 and path.is_file():
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            rows = rows if keep_rows is None else rows[:keep_rows]
        self.rows = len(rows)
        # rewrite (resume: drop rows written after the checkpoint, so nothing is logged twice)
        text_rows = rows
        tmp = temp_beside(path)
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(text_rows)
        os.replace(tmp, path)
        self._fh = path.open("a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=CSV_FIELDS)

    def write(self, row: Mapping[str, Any]) -> None:
        clean = {k: _fmt(row.get(k)) for k in CSV_FIELDS}
        self._writer.writerow(clean)
        self._fh.flush()
        self.rows += 1

    def close(self) -> None:
        self._fh.close()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class _TensorBoard:
    """A SummaryWriter when tensorboard is installed and wanted; silently nothing otherwise."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard missing or broken: the CSV still has every number
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        if self.writer is None:
            return
        for key, img in images.items():
            self.writer.add_image(f"val/{key}", img, step, dataformats="CHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_output_dir(out: str | Path, resume: bool) -> Path:
    """Fail early, creating nothing, when ``out`` cannot hold this run.

    * ``resume=True``: ``out/last.pt`` must exist.
    * otherwise: ``out`` must not hold a previous run (``last.pt`` or ``metrics.csv``), and its
      nearest existing ancestor must be a writable folder (checked by creating and removing a
      temporary file there, which also catches read-only file systems).
    """
    out = Path(out)
    if resume:
        if not (out / "last.pt").is_file():
            raise PsmambaError(f"--resume: no training checkpoint {out / 'last.pt'} to continue from")
    elif (out / "last.pt").exists() or (out / "metrics.csv").exists():
        raise PsmambaError(
            f"output folder {out} already holds a training run; pass --resume to continue it or choose another --out"
        )
    probe = out
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        raise PsmambaError(f"output folder {out} cannot be created: {probe} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".psmamba-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PsmambaError(f"output folder {out} is not writable ({probe}: {exc.strerror or exc})") from None
    return out


# --------------------------------------------------------------------------- signals
class _StopSignal:
    """Turn the first SIGINT/SIGTERM into a flag (checked after each step); a second one aborts."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- data
#: ``data.options`` keys the engine handles itself for file sources; the rest go to the reader
_FILE_OPTIONS = ("pipeline", "cache_dir", "test", "atlas", "atlas_direction")
_LAYOUT_OF = {"abdomenct": "abdomen"}


class SynthEpochs(torch.utils.data.Dataset):
    """SynthMorph-style pairs, new ones every epoch: item ``i`` of epoch ``e`` is drawn from seed
    ``seed + e * length + i`` (reproducible, so a resumed run sees the same pairs).

    The training loop calls :meth:`set_epoch` before each epoch (the ``DistributedSampler``
    convention). Items: see :class:`psmamba.data.synth.SynthPairDataset`.
    """

    def __init__(self, length: int, seed: int, shape=(64, 64, 64), config=None, fresh: bool = True) -> None:
        from psmamba.data.synth import SynthPairDataset

        self.length, self.seed, self.fresh = int(length), int(seed), bool(fresh)
        self._make = lambda s: SynthPairDataset(self.length, shape=tuple(shape), config=config, seed=s)
        self.epoch = 0
        self._ds = self._make(self.seed)

    def set_epoch(self, epoch: int) -> None:
        if self.fresh and epoch != self.epoch:
            self.epoch = int(epoch)
            self._ds = self._make(self.seed + self.epoch * self.length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self._ds[index]


class Resized(torch.utils.data.Dataset):
    """Pairs of another data set resampled to one grid ``size = (D, H, W)`` on the fly.

    Images trilinear and labels nearest-neighbour, both with ``align_corners=True`` (the corner
    voxels of the two grids coincide, as :func:`psmamba.spatial.resize_ddf` assumes), so a field
    predicted on this grid maps back with ``resize_ddf``.
    """

    def __init__(self, dataset, size: Sequence[int]) -> None:
        self.dataset = dataset
        self.size = tuple(int(s) for s in size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _resize(self, x: torch.Tensor, labels: bool) -> torch.Tensor:
        x = torch.as_tensor(x)
        if tuple(x.shape[-3:]) == self.size:
            return x
        v = x.reshape(1, 1, *x.shape[-3:])
        if labels:
            # nearest with the align_corners=True correspondence: sample at the identity grid
            theta = torch.eye(3, 4, dtype=torch.float64).unsqueeze(0)
            grid = torch.nn.functional.affine_grid(theta, [1, 1, *self.size], align_corners=True)
            out = torch.nn.functional.grid_sample(v.double(), grid, mode="nearest", align_corners=True)
            return out.round().to(x.dtype)[0]
        out = torch.nn.functional.interpolate(v.float(), size=self.size, mode="trilinear", align_corners=True)
        return out.to(x.dtype)[0]

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        for key in ("moving", "fixed"):
            item[key] = self._resize(item[key], labels=False)
        for key in ("moving_labels", "fixed_labels"):
            if item.get(key) is not None:
                item[key] = self._resize(item[key], labels=True)
        return item


def build_datasets(cfg: TrainConfig):
    """The training and validation pair data sets that ``cfg.data`` describes.

    * ``demo``: :func:`psmamba.data.build_demo` (``data.size``; ``data.options`` go to it), its
      ``train`` and ``val`` splits (the ``test`` pairs are never touched here).
    * file sources: :func:`psmamba.data.open_source` on ``data.root`` with the layout named by
      ``data.source``; ``data.options`` may set ``pipeline`` (a preprocessing preset; default
      the protocol's own), ``cache_dir``, ``test`` (test share when the source has no published
      split; default 0.2), ``atlas`` / ``atlas_direction`` (with ``data.pairs: atlas``); every
      other option goes to the reader (``image_glob``, ``label_glob``, ...). Validation subjects
      (``data.val_fraction``) are drawn from the training part, never from the test part.
    * ``synth``: ``data.synth_pairs`` new :mod:`psmamba.data.synth` pairs per epoch;
      ``data.options`` may set ``shape`` (default 64^3) and any ``SynthConfig`` field.
      Validation: ``data.max_val_pairs`` (default 8) fixed pairs from other seeds.

    Returns ``(train, val)``: map-style data sets of pair dicts; ``val`` is None when empty.

    Raises:
        PsmambaError: missing folder, unknown option, empty split (one line).
    """
    d = cfg.data
    seed = cfg.run.seed
    options = dict(d.options)
    if d.source == "demo":
        from psmamba.data.demo import build_demo

        try:
            demo = build_demo(size=d.size, **options)
        except TypeError as exc:
            raise PsmambaError(f"data.options: {_first_line(exc)} (options of psmamba.data.build_demo)") from None
        train = demo.pair_dataset("train", labels=d.use_labels)
        val = demo.pair_dataset("val", labels=d.use_labels) if demo.pairs.get("val") else None
        return train, val
    if d.source == "synth":
        from psmamba.data.synth import SynthConfig

        shape = options.pop("shape", (64, 64, 64))
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3):
            raise PsmambaError(f"data.options.shape must be three sizes, got {shape!r}")
        try:
            synth_cfg = SynthConfig(**options)
        except TypeError as exc:
            raise PsmambaError(f"data.options: {_first_line(exc)} (fields of psmamba.data.SynthConfig)") from None
        train = SynthEpochs(d.synth_pairs, seed=seed, shape=shape, config=synth_cfg)
        val = SynthEpochs(d.max_val_pairs or 8, seed=seed + 10**9, shape=shape, config=synth_cfg, fresh=False)
        return train, val

    from psmamba.data.pairs import atlas_pairs
    from psmamba.data.sources import open_source

    root = Path(str(d.root)).expanduser()
    if not root.exists():
        raise PsmambaError(f"data.root {root} does not exist")
    engine_opts = {k: options.pop(k) for k in _FILE_OPTIONS if k in options}
    layout = _LAYOUT_OF.get(d.source, d.source)
    try:
        src = open_source(root, layout=layout, **options)
    except TypeError as exc:
        raise PsmambaError(f"data.options: {_first_line(exc)} (options of the {layout} reader)") from None
    splits = src.make_splits(val=d.val_fraction, test=engine_opts.get("test", 0.2), seed=seed)
    pipeline = engine_opts.get("pipeline", "preset")
    cache_dir = engine_opts.get("cache_dir")
    parts = []
    for split in ("train", "val"):
        ids = splits.get(split, [])
        pairs = None
        if d.pairs == "atlas":
            atlas = engine_opts.get("atlas")
            if atlas is None:
                raise PsmambaError("data.pairs: atlas needs data.options.atlas (the atlas volume id)")
            if atlas not in src.ids:
                raise PsmambaError(f"data.options.atlas {atlas!r} is not a volume of {root}")
            pairs = atlas_pairs(atlas, ids, engine_opts.get("atlas_direction", "to_atlas"))
        ds = src.pair_dataset(split, splits=splits, pipeline=pipeline, cache_dir=cache_dir,
                              labels=d.use_labels, pairs=pairs)
        parts.append(ds if len(ds) else None)
    train, val = parts
    if val is None and d.val_fraction > 0:
        warnings.warn(f"data.root {root}: the validation split ({len(splits.get('val', []))} volumes) holds no pairs; "
                      "no validation, no best.pt (raise data.val_fraction)")
    if train is None:
        raise PsmambaError(f"data.root {root}: the training split holds no pairs ({len(splits.get('train', []))} volumes)")
    return train, val


def _maybe_resize(cfg: TrainConfig, train, val):
    if cfg.data.resize is None:
        return train, val
    return Resized(train, cfg.data.resize), (Resized(val, cfg.data.resize) if val is not None else None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def _validate(model: nn.Module, dataset, indices: list[int], objective: Objective, device, amp: str,
              use_labels: bool, want_images: bool) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from psmamba import metrics, spatial

    was_training = model.training
    model.eval()
    losses, dices, folds = [], [], []
    images: dict[str, np.ndarray] = {}
    for n, i in enumerate(indices):
        batch = _to_device(collate_pairs([dataset[i]]), device, use_labels)
        with _autocast(device, amp):
            out = model(batch["moving"], batch["fixed"])
        warped, ddf = out.warped.float(), out.ddf.float()
        loss, _ = objective(warped, ddf, batch["fixed"], batch.get("moving_labels"), batch.get("fixed_labels"))
        losses.append(float(loss))
        folds.append(float(metrics.folding_percent(ddf[0].cpu())))
        if "moving_labels" in batch and "fixed_labels" in batch:
            warped_labels = spatial.warp(batch["moving_labels"], ddf, mode="nearest")
            d = metrics.mean_dice(batch["fixed_labels"][0, 0].cpu().numpy(), warped_labels[0, 0].cpu().numpy())
            if not math.isnan(float(d)):
                dices.append(float(d))
        if want_images and n == 0:
            images = _slice_images(batch["moving"], batch["fixed"], warped, ddf)
    if was_training:
        model.train()
    result = {
        "loss": float(np.mean(losses)) if losses else math.nan,
        "dice": float(np.mean(dices)) if dices else math.nan,
        "folding_percent": float(np.mean(folds)) if folds else math.nan,
    }
    return result, images


def _slice_images(moving, fixed, warped, ddf) -> dict[str, np.ndarray]:
    """Middle slices (first axis) for TensorBoard: moving | warped | fixed | |warped - fixed|,
    and a square grid deformed by the field. Each ``(1, H, W')`` float in [0, 1]."""
    from psmamba import spatial

    d = fixed.shape[2] // 2

    def norm(a: np.ndarray) -> np.ndarray:
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)

    m, w, f = (norm(t[0, 0, d].detach().float().cpu().numpy()) for t in (moving, warped, fixed))
    panel = np.concatenate([m, w, f, np.abs(w - f)], axis=1)
    # a grid of lines every 4 voxels in the slice plane, pulled through the field like the image
    lines = torch.zeros_like(fixed[:1])
    lines[..., ::4, :] = 1.0
    lines[..., :, ::4] = 1.0
    grid = spatial.warp(lines, ddf[:1].float()).clamp(0, 1)[0, 0, d].cpu().numpy()
    # small grids are enlarged (nearest) so that TensorBoard shows more than a thumbnail
    k = max(1, 256 // max(panel.shape[0], 1))
    up = lambda a: np.kron(a, np.ones((k, k), dtype=a.dtype))  # noqa: E731
    return {"slices": up(panel)[None].astype(np.float32), "grid": up(grid)[None].astype(np.float32)}


def _val_indices(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or n <= limit:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed) + 7919)  # fixed for the whole run
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


# --------------------------------------------------------------------------- config helpers
def _as_config(config: TrainConfig | Mapping[str, Any] | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), "config")
    return load_train_config(config)


def _check_resumable(cfg: TrainConfig, stored: Mapping[str, Any], path: Path) -> None:
    """A resumed run must train the same thing: only :data:`VOLATILE_KEYS` may differ."""
    now = config_to_dict(cfg)
    for section, values in now.items():
        before = stored.get(section, {})
        if section == "model":
            if dict(values) != dict(before):
                raise PsmambaError(f"--resume: model settings differ from {path} ({before} vs {values})")
            continue
        for key, value in values.items():
            if key in VOLATILE_KEYS.get(section, ()):
                continue
            if before.get(key) != value:
                raise PsmambaError(
                    f"--resume: {section}.{key} is {value!r} but {path} was trained with {before.get(key)!r}"
                )


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order), collected on all ranks."""
    state = capture_rng_state()
    if not info.distributed:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


# --------------------------------------------------------------------------- fit
def fit(
    config: TrainConfig | Mapping[str, Any] | str | Path,
    *,
    resume: bool = False,
    train_data=None,
    val_data=None,
) -> FitResult:
    """Train a model as ``config`` says; resume exactly from ``run.out/last.pt`` when asked.

    Args:
        config: a :class:`TrainConfig`, a nested dict of its sections or a YAML path.
        resume: continue the run in ``config.run.out`` (its ``last.pt``); the config must match
            the stored one except for :data:`VOLATILE_KEYS`.
        train_data, val_data: map-style data sets of pair dicts to use instead of ``config.data``
            (``moving``, ``fixed`` ``(1, D, H, W)`` float, optional ``moving_labels`` /
            ``fixed_labels`` ``(1, D, H, W)`` int). ``val_data=None`` with ``train_data`` given
            means no validation.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1) the ranks train one model together with
    DistributedDataParallel; only rank 0 writes files.

    Raises:
        PsmambaError: bad config, data or output folder, raised before any output is written.
    """
    cfg = _as_config(config)
    threads = torch.get_num_threads()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    info = init_distributed(cfg.run.device)
    try:
        return _fit(cfg, info, resume, train_data, val_data)
    finally:
        if info.distributed:
            shutdown_distributed()
        torch.set_num_threads(threads)


def _fit(cfg: TrainConfig, info: DistInfo, resume: bool, train_data, val_data) -> FitResult:
    from psmamba.models import build_model

    out = Path(cfg.run.out)
    device = info.device
    # ---------------------------------------------------------------- checks before any output
    check_output_dir(out, resume)
    ckpt = None
    if resume:
        ckpt = load_training_state(out / "last.pt", map_location="cpu")
        _check_resumable(cfg, ckpt["training"]["config"], out / "last.pt")
    # every rank has checked the folder before rank 0 creates anything in it (under torchrun a
    # rank that failed a check ends the whole group, so nobody waits here forever)
    barrier(info)
    model_cfg = cfg.model_config()
    if cfg.run.amp != "none" and device.type != "cuda":
        if info.is_main:
            warnings.warn(f"run.amp={cfg.run.amp} is for CUDA only; training in float32 on {device.type}")
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    if train_data is None:
        train_data, val_data = build_datasets(cfg)
    train_data, val_data = _maybe_resize(cfg, train_data, val_data)
    # the grid the network learnt on, for register (only when training fixed it)
    ckpt_extra = {"image_size": list(cfg.data.resize)} if cfg.data.resize is not None else {}
    n_pairs = len(train_data)
    if n_pairs < 1:
        raise PsmambaError("the training split holds no pairs")
    first = train_data[0]
    has_labels = first.get("moving_labels") is not None and first.get("fixed_labels") is not None
    use_labels = bool(cfg.data.use_labels and has_labels)
    if cfg.loss.dice_weight > 0 and not use_labels:
        raise PsmambaError("loss.dice_weight > 0 needs label maps, but the training pairs have none")
    collate_pairs([first])  # shape/key problems fail here, before any output

    # ---------------------------------------------------------------- model, optimiser
    _seed_all(cfg.run.seed)  # same initial weights on every rank
    model = build_model(model_cfg).to(device)
    objective = Objective(cfg.loss).to(device)
    optim = torch.optim.Adam(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay, amsgrad=cfg.optim.amsgrad,
    )
    epochs, power = cfg.optim.epochs, cfg.optim.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda e: max(0.0, 1.0 - e / epochs) ** power
    )
    scaler = None
    if cfg.run.amp == "fp16" and device.type != "cpu":
        scaler = torch.amp.GradScaler(device.type)
    _seed_all(cfg.run.seed + info.rank)  # data-side randomness differs per rank

    start_epoch, start_step_in_epoch, global_step = 0, 0, 0
    best: dict[str, Any] = {}
    csv_rows: int | None = None
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        state = ckpt["training"]
        model.load_state_dict(ckpt["state_dict"], strict=True)
        optim.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        global_step = int(state["step"])
        best = dict(state.get("best", {}))
        csv_rows = state.get("metrics", {}).get("csv_rows")
        history = list(state.get("metrics", {}).get("history", []))
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng_state(rngs[info.rank])
        elif rngs:
            restore_rng_state(rngs[0])
            if info.is_main:
                warnings.warn(f"resuming {len(rngs)}-process run on {info.world_size}: RNG states of rank 0 reused")

    net = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)  # the model has no buffers

    # ---------------------------------------------------------------- outputs (rank 0)
    csv_log = tb = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_train_config(cfg, out / "config.yaml")
        csv_log = _CsvLog(out / "metrics.csv", keep_rows=csv_rows if resume else 0)
        tb = _TensorBoard(out / "tb", cfg.run.tensorboard, purge_step=global_step + 1 if resume else None)
    barrier(info)

    G = cfg.optim.batch_size * cfg.optim.accumulate * info.world_size
    n_epoch_pairs = min(n_pairs, cfg.data.max_train_pairs or n_pairs)
    n_steps = steps_per_epoch(n_epoch_pairs, G)
    val_idx = _val_indices(len(val_data), cfg.data.max_val_pairs, cfg.run.seed) if val_data is not None else []
    best_metric = "val_dice" if use_labels else "val_loss"
    pin = device.type == "cuda"
    t_start = time.monotonic()
    pairs_done = 0
    stopped: str | None = None
    last_val: dict[str, float] = {}
    epoch = start_epoch

    def save_last(epoch_: int, step_in_epoch_: int) -> None:
        rngs = _gather_rng(info)  # a collective: every rank takes part, rank 0 writes
        if info.is_main:
            save_training_state(
                out / "last.pt", model, config=config_to_dict(cfg), optimizer=optim, scheduler=scheduler,
                scaler=scaler, epoch=epoch_, step=global_step, step_in_epoch=step_in_epoch_, best=best,
                metrics={"csv_rows": csv_log.rows, "history": history, "last_val": last_val},
                world_size=info.world_size, rng_states=rngs, extra=ckpt_extra,
            )

    def validate_and_select(epoch_: int) -> None:
        nonlocal last_val
        if val_data is None or not val_idx:
            return
        if info.is_main:
            res, images = _validate(model, val_data, val_idx, objective, device, cfg.run.amp, use_labels,
                                    cfg.run.images and tb.writer is not None)
            lr_now = optim.param_groups[0]["lr"]
            row = {"time": round(time.monotonic() - t_start, 3), "epoch": epoch_ + 1, "step": global_step,
                   "split": "val", **res, "lr": lr_now}
            csv_log.write(row)
            tb.scalars("val", res, global_step)
            tb.images(images, global_step)
            history.append({k: row[k] for k in ("epoch", "step", "loss", "dice", "folding_percent", "lr")})
            last_val = res
            value = res["dice"] if best_metric == "val_dice" else res["loss"]
            better = (not math.isnan(value)) and (
                "value" not in best
                or (value > best["value"] if best_metric == "val_dice" else value < best["value"])
            )
            if better:
                best.update({"metric": best_metric, "value": value, "epoch": epoch_ + 1, "step": global_step})
                save_model_checkpoint(out / "best.pt", model, train_summary={
                    "config": config_to_dict(cfg), "best": dict(best), "val": dict(res),
                }, **ckpt_extra)
        barrier(info)

    progress = None
    try:
        with _StopSignal() as stop_signal:
            while epoch < epochs and stopped is None:
                if hasattr(train_data, "set_epoch"):
                    train_data.set_epoch(epoch)
                order = epoch_order(n_pairs, epoch, cfg.run.seed)[:n_epoch_pairs]
                first_step = start_step_in_epoch if epoch == start_epoch else 0
                lr_now = optim.param_groups[0]["lr"]
                steps = list(range(first_step, n_steps))
                batches = [
                    mb
                    for s in steps
                    for mb in rank_batches(order, s, batch_size=cfg.optim.batch_size,
                                           accumulate=cfg.optim.accumulate,
                                           world_size=info.world_size, rank=info.rank)
                ]
                stream = _micro_batches(train_data, batches, cfg.data.num_workers, pin)
                if info.is_main and cfg.run.progress:
                    from tqdm.auto import tqdm

                    progress = tqdm(total=n_steps, initial=first_step, desc=f"epoch {epoch + 1}/{epochs}",
                                    unit="step", dynamic_ncols=True, leave=False)
                net.train()
                run_sums = torch.zeros(4, dtype=torch.float64)  # loss, sim, reg, dice over log window
                run_n = 0
                for s in steps:
                    optim.zero_grad(set_to_none=True)
                    step_sums = torch.zeros(4, dtype=torch.float64, device=device)
                    for a in range(cfg.optim.accumulate):
                        batch = _to_device(next(stream), device, use_labels)
                        sync = net.no_sync() if (info.distributed and a < cfg.optim.accumulate - 1) else contextlib.nullcontext()
                        with sync:
                            with _autocast(device, cfg.run.amp):
                                res = net(batch["moving"], batch["fixed"])
                            loss, parts = objective(res.warped, res.ddf, batch["fixed"],
                                                    batch.get("moving_labels"), batch.get("fixed_labels"))
                            scaled = loss / cfg.optim.accumulate
                            (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        step_sums += torch.stack([loss.detach(), parts["similarity"], parts["regulariser"],
                                                  parts["dice_loss"]]).double()
                    if cfg.optim.grad_clip > 0:
                        if scaler is not None:
                            scaler.unscale_(optim)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    if scaler is not None:
                        scaler.step(optim)
                        scaler.update()
                    else:
                        optim.step()
                    global_step += 1
                    pairs_done += G
                    run_sums += (step_sums / cfg.optim.accumulate).cpu()
                    run_n += 1

                    if global_step % cfg.run.log_every == 0 or s == n_steps - 1:
                        means = all_reduce_mean((run_sums / max(run_n, 1)).tolist(), info)
                        rate = pairs_done / max(time.monotonic() - t_start, 1e-9)
                        if info.is_main:
                            vals = dict(zip(("loss", "similarity", "regulariser", "dice_loss"), means))
                            row = {"time": round(time.monotonic() - t_start, 3), "epoch": epoch + 1,
                                   "step": global_step, "split": "train", **vals, "lr": lr_now,
                                   "pairs_per_s": rate}
                            csv_log.write(row)
                            tb.scalars("train", {**vals, "lr": lr_now, "pairs_per_s": rate}, global_step)
                            if progress is not None:
                                progress.set_postfix(loss=f"{vals['loss']:.4f}", pairs_s=f"{rate:.2f}")
                        run_sums.zero_()
                        run_n = 0
                    if progress is not None:
                        progress.update(1)

                    reason = None
                    if stop_signal.received is not None:
                        reason = "signal"
                    elif cfg.run.max_steps is not None and global_step >= cfg.run.max_steps:
                        reason = "max_steps"
                    elif cfg.run.max_minutes is not None and time.monotonic() - t_start >= 60 * cfg.run.max_minutes:
                        reason = "time"
                    if info.distributed:
                        # every rank must leave the loop at the same step
                        if any_rank(reason is not None, info) and reason is None:
                            reason = "signal"
                    if reason is not None:
                        stopped = reason
                        if reason != "signal":  # a planned stop ends like an epoch: validated
                            validate_and_select(epoch)
                        save_last(epoch, s + 1)
                        break
                    if cfg.run.checkpoint_every and global_step % cfg.run.checkpoint_every == 0 and s + 1 < n_steps:
                        save_last(epoch, s + 1)
                if progress is not None:
                    progress.close()
                    progress = None
                if stopped is not None:
                    break
                # ---------------------------------------------------- end of epoch
                if (epoch + 1) % cfg.run.val_every == 0 or epoch + 1 == epochs:
                    validate_and_select(epoch)
                scheduler.step()  # the next epoch's poly-decayed learning rate
                epoch += 1
                save_last(epoch, 0)
    finally:
        if progress is not None:
            progress.close()
        if csv_log is not None:
            csv_log.close()
        if tb is not None:
            tb.close()

    best_path = out / "best.pt"
    return FitResult(
        out_dir=out,
        last_checkpoint=out / "last.pt",
        best_checkpoint=best_path if best_path.is_file() else None,
        best_metric=best_metric,
        best_value=best.get("value"),
        best_epoch=best.get("epoch"),
        epochs_completed=epoch,
        steps=global_step,
        stopped=stopped,
        history=history,
        metrics_csv=out / "metrics.csv",
    )
