"""Training: :func:`fit` runs the paper's protocol (or any :class:`TrainConfig`) end to end.

One call does everything a run needs::

    from psmamba.engine import fit, load_train_config
    result = fit(load_train_config("configs/paper_lpba40.yaml", ["optim.epochs=2"]))
    result.best_checkpoint          # OUT/best.pt, selected by validation Dice (never test)

The output folder holds ``config.yaml`` (the resolved config), ``last.pt`` (the full training
state: :mod:`psmamba.engine.checkpointing`), ``best.pt`` (the model with the best validation
Dice, loadable by :func:`psmamba.models.load_checkpoint`), ``metrics.csv`` (every scalar) and
``tb/`` (TensorBoard, when installed).

The loop itself is :class:`psmamba.engine.trainer.Trainer` (a short ``run_training`` calling
``train_step``, ``validate_and_select``, ``on_epoch_end``, ... as methods of their own); every
step is :func:`psmamba.engine.objective.train_step`. ``fit(cfg, resume=True)`` continues with
the same weights the uninterrupted run would have had (bit for bit on the same machine and
thread count).

Several processes (``torchrun``): every rank runs the same steps on its own share of each
step's pairs (:func:`~psmamba.engine.distributed.rank_batches`) and DistributedDataParallel
averages the gradients; rank 0 alone validates and writes files.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from psmamba.config import TrainConfig, build_model_config, config_from_dict, config_to_dict, load_train_config
from psmamba.engine.checkpointing import load_training_state
from psmamba.engine.distributed import DistInfo, barrier, init_distributed, shutdown_distributed
from psmamba.errors import PsmambaError
from psmamba.files import probe_writable

__all__ = ["FitResult", "fit", "check_output_dir", "VOLATILE_KEYS", "EXTENDABLE", "RESET_ON_RESUME"]

#: settings a resumed run may change without breaking exact continuation
VOLATILE_KEYS = {
    "run": {"out", "device", "threads", "log_every", "checkpoint_every", "max_steps", "max_minutes",
            "tensorboard", "progress", "images"},
    "data": {"num_workers"},
}

#: settings a resumed run may change when asked to (``fit(..., reschedule=True)``, ``psmamba train
#: --resume --set optim.epochs=N``), ending exact continuation: ``optim.epochs`` (train longer or
#: stop sooner; the poly decay is recomputed for the new total from the next step on). A config
#: file that merely differs is refused as before.
EXTENDABLE = {"optim": {"epochs"}}

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
            started = " (its run stopped before its first checkpoint: start it again in a new --out)" \
                if (out / "metrics.csv").exists() else ""
            raise PsmambaError(f"--resume: no training checkpoint {out / 'last.pt'} to continue from{started}")
    elif (out / "metrics.csv").exists() and not (out / "last.pt").exists():
        raise PsmambaError(f"output folder {out} holds a run that stopped before its first checkpoint (metrics.csv, "
                           "no last.pt): nothing to resume; delete the folder or choose another --out")
    elif (out / "last.pt").exists() or (out / "metrics.csv").exists():
        raise PsmambaError(
            f"output folder {out} already holds a training run; pass --resume to continue it or choose another --out"
        )
    probe_writable(out, "output folder")
    return out


def _remove_unfinished(out: Path, existed: bool, before: set[Path]) -> None:
    """A run that failed before its first checkpoint leaves nothing behind: it could not be
    resumed, and its config.yaml and metrics.csv made the next run in that folder fail."""
    import shutil

    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in set(out.iterdir()) - before:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


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


# --------------------------------------------------------------------------- config helpers
def _as_config(config: TrainConfig | Mapping[str, Any] | str | Path) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), "config")
    return load_train_config(config)


def _check_resumable(cfg: TrainConfig, stored: Mapping[str, Any], path: Path, epochs_done: int,
                     reschedule: bool = False) -> None:
    """A resumed run must train the same thing: only :data:`VOLATILE_KEYS` may differ, and, when
    asked for (``reschedule``), ``optim.epochs`` (:data:`EXTENDABLE`) if epochs remain to train."""
    now = config_to_dict(cfg)
    was = stored.get("optim", {}).get("epochs")
    if reschedule and was is not None and cfg.optim.epochs != was and cfg.optim.epochs <= epochs_done:
        raise PsmambaError(
            f"--resume: optim.epochs={cfg.optim.epochs} but {path} has already trained {epochs_done} epochs: "
            f"set it above {epochs_done} to train longer"
        )
    for section, values in now.items():
        before = stored.get(section, {})
        if section == "model":
            # the networks compared, not the texts: a key left at its default is the same model
            # (mamba_backend is a run-time choice: a run begun on a GPU goes on on a CPU)
            def resolved(model_section, where):
                model = dataclasses.asdict(build_model_config(model_section, where))
                model.pop("mamba_backend", None)
                return dict(model_section).get("preset", "paper"), model

            if resolved(values, "--resume") != resolved(before, str(path)):
                raise PsmambaError(f"--resume: model settings differ from {path} ({before} vs {values})")
            continue
        for key, value in values.items():
            if key in VOLATILE_KEYS.get(section, ()) or reschedule and key in EXTENDABLE.get(section, ()):
                continue
            if before.get(key) != value:
                hint = (f" (to change the schedule on purpose: --set {section}.{key}={value})"
                        if key in EXTENDABLE.get(section, ()) else "")
                raise PsmambaError(
                    f"--resume: {section}.{key} is {value!r} but {path} was trained with {before.get(key)!r}{hint}"
                )


# --------------------------------------------------------------------------- fit
def fit(
    config: TrainConfig | Mapping[str, Any] | str | Path,
    *,
    resume: bool = False,
    reschedule: bool = False,
    train_data=None,
    val_data=None,
) -> FitResult:
    """Train a model as ``config`` says; resume exactly from ``run.out/last.pt`` when asked.

    Args:
        config: a :class:`TrainConfig`, a nested dict of its sections or a YAML path.
        resume: continue the run in ``config.run.out`` (its ``last.pt``); the config must match
            the stored one except for :data:`VOLATILE_KEYS`.
        reschedule: with ``resume``, ``config``'s ``optim.epochs`` may differ from the stored
            one (above the epochs already trained): the run trains on to it, the poly decay
            recomputed for the new total (:data:`EXTENDABLE`). Without it a differing
            ``optim.epochs`` is refused like any other setting.
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
        return _fit(cfg, info, resume, train_data, val_data, reschedule)
    finally:
        if info.distributed:
            shutdown_distributed()
        torch.set_num_threads(threads)


def _fit(cfg: TrainConfig, info: DistInfo, resume: bool, train_data, val_data, reschedule: bool = False) -> FitResult:
    from psmamba.data.training import build_datasets, resize_datasets
    from psmamba.engine.trainer import Trainer

    out = Path(cfg.run.out)
    # ---------------------------------------------------------------- checks before any output
    check_output_dir(out, resume)
    ckpt = None
    if resume:
        ckpt = load_training_state(out / "last.pt", map_location="cpu")
        _check_resumable(cfg, ckpt["training"]["config"], out / "last.pt", int(ckpt["training"]["epoch"]),
                         reschedule)
    # every rank has checked the folder before rank 0 creates anything in it (under torchrun a
    # rank that failed a check ends the whole group, so nobody waits here forever)
    barrier(info)
    cfg.model_config()
    if cfg.run.amp != "none" and info.device.type != "cuda" and info.is_main:
        warnings.warn(f"run.amp={cfg.run.amp} is for CUDA only; training in float32 on {info.device.type}")
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if train_data is None:
        train_data, val_data = build_datasets(cfg)
    train_data, val_data = resize_datasets(cfg, train_data, val_data)
    existed = out.exists()
    before = set(out.iterdir()) if existed and out.is_dir() else set()
    try:
        trainer = Trainer(cfg, info, train_data, val_data, ckpt)
        with _StopSignal() as stop_signal:
            trainer.run_training(stop_signal)
    except BaseException:
        if not resume and info.is_main and not (out / "last.pt").exists():
            _remove_unfinished(out, existed, before)
        raise
    # every rank has finished (rank 0 has written last.pt) before any of them tears the process
    # group down: a rank destroying its gloo group while a peer still holds it can abort
    barrier(info)
    best_path = out / "best.pt"
    return FitResult(
        out_dir=out, last_checkpoint=out / "last.pt",
        best_checkpoint=best_path if best_path.is_file() else None, best_metric=trainer.best_metric,
        best_value=trainer.best.get("value"), best_epoch=trainer.best.get("epoch"),
        epochs_completed=trainer.epoch, steps=trainer.global_step, stopped=trainer.stopped,
        history=trainer.history, metrics_csv=out / "metrics.csv",
    )
