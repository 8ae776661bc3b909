"""The training loop as a class with hooks (the shape of nnU-Net's ``run_training``).

:meth:`Trainer.run_training` is a short loop; each concern is a method of its own, so a
subclass (or a reader) finds the training step, the validation step, the end of an epoch,
checkpointing and logging by name::

    run_training
      on_train_start                     outputs, TensorBoard
      for each epoch:
        on_epoch_start                   pair order, micro-batches, progress bar
        for each step: train_step        one optimiser step (psmamba.engine.objective.train_step)
                       on_step_end       log, stop checks, mid-epoch checkpoint
        on_epoch_end                     validate + select, poly lr, last.pt
      on_train_end                       close files

Exact resumption: the pair order of epoch ``m`` is a permutation seeded by ``(seed, m)``, the
checkpoint stores the step inside the epoch, the optimiser, scheduler and gradient-scaler states
and the random generator states of every rank, and the learning rate of an epoch is a function of
its index; a resumed run continues with the weights the uninterrupted run would have had.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psmamba.config import TrainConfig, config_to_dict, save_train_config
from psmamba.data.training import collate_pairs
from psmamba.engine.checkpointing import capture_rng_state, restore_rng_state, save_training_state
from psmamba.engine.distributed import DistInfo, all_reduce_mean, any_rank, barrier, epoch_order, rank_batches, steps_per_epoch
from psmamba.engine.logs import CsvLog, TensorBoardLog
from psmamba.engine.objective import STEP_TERMS, Objective, autocast, to_device, train_step, velocity_of
from psmamba.errors import PsmambaError, first_line

__all__ = ["Trainer", "MicroBatches", "seed_all", "poly_lr", "poly_scheduler", "is_better", "grad_scaler", "STOP_AGREE_EVERY"]

#: steps between the stop agreements of a distributed run (see :meth:`Trainer._agree_on_stops`)
STOP_AGREE_EVERY = 10


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def poly_lr(base_lr: float, epoch: int, epochs: int, power: float = 0.8) -> float:
    """The paper's per-epoch decay for 0-based ``epoch``: ``base * (1 - epoch / epochs) ** power``.

    (The paper writes it 1-based: ``lr_m = lr (1 - (m - 1) / M)^0.8``.) Zero from ``epochs`` on.
    """
    return float(base_lr) * max(0.0, 1.0 - float(epoch) / float(epochs)) ** float(power)


def poly_scheduler(optimizer: torch.optim.Optimizer, epochs: int, power: float):
    """:func:`poly_lr` as a scheduler of ``optimizer``, stepped once per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: poly_lr(1.0, e, epochs, power))


def grad_scaler(device: torch.device):
    """fp16's gradient scaler: ``torch.amp.GradScaler`` (torch >= 2.3), else the CUDA one that
    older torch versions (2.1, 2.2: the package admits them) have."""
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def is_better(value: float, best: float | None, higher: bool = True) -> bool:
    """The model selection rule: a validation value (not NaN) beats the best so far (or none)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if higher else value < best


class Trainer:
    """Train ``cfg.model`` (PSMamba-Net or a peer network) on ``train_data``, validating on ``val_data``.

    Construction checks everything that can fail before any output is written (the data's
    first pair, labels for a Dice loss), builds the model, the optimiser, the scheduler and, with
    ``resume``, restores them from ``ckpt`` (the ``last.pt`` dict).
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo, train_data, val_data, ckpt: dict[str, Any] | None = None):
        from psmamba.models import build_model

        self.cfg, self.info, self.device = cfg, info, info.device
        self.out = Path(cfg.run.out)
        self.resume = ckpt is not None
        self.train_data, self.val_data = train_data, val_data
        # the grid the network learnt on, for register (recorded in every checkpoint)
        self.ckpt_extra = {"image_size": list(cfg.data.resize)} if cfg.data.resize is not None else {}
        self.n_pairs = len(train_data)
        if self.n_pairs < 1:
            raise PsmambaError("the training split holds no pairs")
        first = train_data[0]
        has_labels = first.get("moving_labels") is not None and first.get("fixed_labels") is not None
        self.use_labels = bool(cfg.data.use_labels and has_labels)
        if cfg.loss.dice_weight > 0 and not self.use_labels:
            raise PsmambaError("loss.dice_weight > 0 needs label maps, but the training pairs have none")
        collate_pairs([first])  # shape/key problems fail here, before any output
        if not self.ckpt_extra:
            self.ckpt_extra = {"image_size": [int(s) for s in torch.as_tensor(first["fixed"]).shape[-3:]]}

        if self.device.type == "cuda":
            # one input size per run: let cuDNN pick its fastest convolution algorithms once
            torch.backends.cudnn.benchmark = not cfg.run.deterministic
        seed_all(cfg.run.seed)  # same initial weights on every rank
        try:
            self.model = build_model(cfg.model).to(self.device)  # PSMamba-Net or a peer network
        except PsmambaError:
            raise
        except Exception as exc:  # a peer's own check (heads vs width), or memory for a huge window
            raise PsmambaError(f"model {cfg.model_name}: cannot be built from this config ({first_line(exc)[:200]})") from None
        self._check_grid([int(s) for s in torch.as_tensor(first["fixed"]).shape[-3:]])
        per_step = cfg.optim.batch_size * cfg.optim.accumulate * info.world_size
        if per_step > self.n_pairs:
            raise PsmambaError(f"optim.batch_size x optim.accumulate x processes = {per_step} pairs a step, more than "
                               f"the {self.n_pairs} training pair(s) of an epoch")
        if cfg.loss.regularise == "velocity" and not getattr(self.model, "outputs_velocity", False):
            raise PsmambaError(f"loss.regularise=velocity: model {cfg.model_name!r} outputs no velocity field "
                               "(only mambamorph and mambamorph_feat do); use loss.regularise=ddf")
        self.objective = Objective(cfg.loss).to(self.device)
        o = cfg.optim
        self.optim = torch.optim.Adam(self.model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                      weight_decay=o.weight_decay, amsgrad=o.amsgrad)
        self.scheduler = poly_scheduler(self.optim, o.epochs, o.poly_power)
        self.scaler = grad_scaler(self.device) if cfg.run.amp == "fp16" and self.device.type != "cpu" else None
        seed_all(cfg.run.seed + info.rank)  # data-side randomness differs per rank

        self.epoch, self.start_step_in_epoch, self.global_step = 0, 0, 0
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.last_val: dict[str, float] = {}
        self.csv_rows: int | None = None
        self.schedule_changes: list[dict[str, Any]] = []
        self.rescheduled = False
        if ckpt is not None:
            self._restore(ckpt)
        self.start_epoch = self.epoch
        self.net = self.model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.stopped: str | None = None
        self.best_metric = "val_dice" if self.use_labels else "val_loss"
        self.csv_log: CsvLog | None = None
        self.tb: TensorBoardLog | None = None
        self.progress = None

    def _check_grid(self, size: list[int]) -> None:
        """The network can run on the training grid (PSMamba-Net: one axis above 16 voxels), checked
        before any output: the first forward pass failed after config.yaml and metrics.csv existed."""
        from psmamba.models.net import min_extent_of

        need = min_extent_of(self.model)
        if max(size) <= need:
            where = "data.resize" if self.cfg.data.resize is not None else "the training images"
            raise PsmambaError(f"{where} {'x'.join(map(str, size))}: model {self.cfg.model_name} needs one axis of "
                               f"more than {need} voxels")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        state = ckpt["training"]
        self.model.load_state_dict(ckpt["state_dict"], strict=True)
        self.optim.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.start_step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["step"])
        self.schedule_changes = list(state.get("metrics", {}).get("schedule_changes", []))
        was = int(state["config"].get("optim", {}).get("epochs", self.cfg.optim.epochs))
        if was != self.cfg.optim.epochs:
            self._reschedule(was)
        self.best = dict(state.get("best", {}))
        if self.best.get("metric") == "val_loss":  # chosen by loss before (see validate_and_select)
            self.best_metric = "val_loss"
        self.csv_rows = state.get("metrics", {}).get("csv_rows")
        self.history = list(state.get("metrics", {}).get("history", []))
        rngs = state.get("rng") or []
        if len(rngs) == self.info.world_size:
            restore_rng_state(rngs[self.info.rank])
        elif rngs:
            restore_rng_state(rngs[0])
            if self.info.is_main:
                warnings.warn(f"resuming {len(rngs)}-process run on {self.info.world_size}: RNG states of rank 0 reused")

    def _reschedule(self, was: int) -> None:
        """``--resume`` with another ``optim.epochs``: the poly decay of the new total, from now on.

        The restored optimiser holds the old schedule's rate (zero after its last epoch); every
        group gets ``base * poly(epoch, new total)`` and the change is recorded in ``last.pt``.
        The epochs before keep the rates they were trained with, so the weights differ from a run
        started with the new total (a schedule change, not an exact continuation).
        """
        o = self.cfg.optim
        factor = poly_lr(1.0, self.epoch, o.epochs, o.poly_power)
        for group, base in zip(self.optim.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optim.param_groups]
        self.rescheduled = True
        self.schedule_changes.append({"step": self.global_step, "epoch": self.epoch, "epochs_before": was,
                                      "epochs": int(o.epochs), "lr": self.optim.param_groups[0]["lr"]})
        if self.info.is_main:
            print(f"--resume: optim.epochs {was} -> {o.epochs} at step {self.global_step} (epoch {self.epoch + 1}): "
                  f"learning rate now {self.optim.param_groups[0]['lr']:.3g}, poly decay to epoch {o.epochs}",
                  flush=True)

    # ------------------------------------------------------------------ the loop
    def run_training(self, stop_signal) -> None:
        """Train until the last epoch or a stop (``run.max_steps``, ``run.max_minutes``, a signal)."""
        self.on_train_start()
        try:
            while self.epoch < self.cfg.optim.epochs and self.stopped is None:
                steps = self.on_epoch_start()
                for s in steps:
                    self.step_terms = self.train_step()
                    if self.on_step_end(s, stop_signal):
                        break
                self._close_progress()
                if self.stopped is None:
                    self.on_epoch_end()
        finally:
            self.on_train_end()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self) -> None:
        """Create the output folder, ``config.yaml``, ``metrics.csv`` and TensorBoard (rank 0)."""
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                save_train_config(self.cfg, self.out / "config.yaml")
            self.csv_log = CsvLog(self.out / "metrics.csv", keep_rows=self.csv_rows if self.resume else 0)
            purge = self.global_step + 1 if self.resume else None
            self.tb = TensorBoardLog(self.out / "tb", self.cfg.run.tensorboard, purge_step=purge)
        barrier(self.info)
        cfg, info = self.cfg, self.info
        self.pairs_per_step = cfg.optim.batch_size * cfg.optim.accumulate * info.world_size
        self.n_epoch_pairs = min(self.n_pairs, cfg.data.max_train_pairs or self.n_pairs)
        self.n_steps = steps_per_epoch(self.n_epoch_pairs, self.pairs_per_step)
        n_val = len(self.val_data) if self.val_data is not None else 0
        self.val_idx = _val_indices(n_val, cfg.data.max_val_pairs, cfg.run.seed) if n_val else []
        self.t_start = time.monotonic()
        self.pairs_done = 0
        # built once: its worker processes (if any) live for the whole run
        self.loader = MicroBatches(self.train_data, cfg.data.num_workers, pin=self.device.type == "cuda")

    def on_epoch_start(self) -> list[int]:
        """This epoch's pair order and micro-batch stream; returns the steps left in it."""
        cfg, info = self.cfg, self.info
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(self.epoch)
        order = epoch_order(self.n_pairs, self.epoch, cfg.run.seed)[: self.n_epoch_pairs]
        first_step = self.start_step_in_epoch if self.epoch == self.start_epoch else 0
        self.lr_now = self.optim.param_groups[0]["lr"]
        steps = list(range(first_step, self.n_steps))
        batches = [mb for s in steps for mb in rank_batches(
            order, s, batch_size=cfg.optim.batch_size, accumulate=cfg.optim.accumulate,
            world_size=info.world_size, rank=info.rank)]
        self.stream = self.loader.epoch(self.epoch, batches)
        if info.is_main and cfg.run.progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=self.n_steps, initial=first_step, desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}",
                                 unit="step", dynamic_ncols=True, leave=False)
        self.net.train()
        # sums over the log window, kept on the device: reading them (a host-device sync) happens
        # only when a row is logged
        self.run_sums = torch.zeros(len(STEP_TERMS), dtype=torch.float64, device=self.device)
        self.run_n = 0
        return steps

    def train_step(self) -> torch.Tensor:
        """One optimiser step on the next ``optim.accumulate`` micro-batches."""
        cfg = self.cfg
        batches = (to_device(next(self.stream), self.device, self.use_labels) for _ in range(cfg.optim.accumulate))
        terms = train_step(
            self.net, self.objective, self.optim, batches, accumulate=cfg.optim.accumulate, amp=cfg.run.amp,
            scaler=self.scaler, grad_clip=cfg.optim.grad_clip, clip_params=self.model.parameters(),
            no_sync=self.net.no_sync if self.info.distributed else None,
        )
        self.global_step += 1
        self.pairs_done += self.pairs_per_step
        self.run_sums += terms
        self.run_n += 1
        return terms

    def on_step_end(self, s: int, stop_signal) -> bool:
        """Log, check the stops (a planned one validates first), checkpoint; True ends the epoch."""
        cfg = self.cfg
        if self.global_step % cfg.run.log_every == 0 or s == self.n_steps - 1:
            self.log_train()
        if self.progress is not None:
            self.progress.update(1)
        reason = None
        at_max_steps = cfg.run.max_steps is not None and self.global_step >= cfg.run.max_steps  # same on every rank
        if at_max_steps or not self.info.distributed or self._agree_on_stops(s):
            signal = stop_signal.received is not None
            late = cfg.run.max_minutes is not None and time.monotonic() - self.t_start >= 60 * cfg.run.max_minutes
            if self.info.distributed:  # every rank leaves at the same step, for the same reason
                signal, late = any_rank(signal, self.info), any_rank(late, self.info)
            if signal:
                reason = "signal"
            elif at_max_steps:
                reason = "max_steps"
            elif late:
                reason = "time"
        if reason is not None:
            self.stopped = reason
            if reason != "signal":  # a planned stop ends like an epoch: validated
                self.validate_and_select()
            self.save_last(self.epoch, s + 1)
            return True
        if cfg.run.checkpoint_every and self.global_step % cfg.run.checkpoint_every == 0 and s + 1 < self.n_steps:
            self.save_last(self.epoch, s + 1)
        return False

    def _agree_on_stops(self, s: int) -> bool:
        """Whether the ranks of a distributed run compare their stop requests after step ``s``
        (an all-reduce whose answer the host must wait for): every :data:`STOP_AGREE_EVERY`
        steps and at the end of an epoch, not after every step. A signal or the time limit
        therefore stops a distributed run up to that many steps late."""
        return self.global_step % STOP_AGREE_EVERY == 0 or s == self.n_steps - 1

    def on_epoch_end(self) -> None:
        """Validate (every ``run.val_every`` epochs and after the last), decay the lr, write last.pt."""
        if (self.epoch + 1) % self.cfg.run.val_every == 0 or self.epoch + 1 == self.cfg.optim.epochs:
            self.validate_and_select()
        self.scheduler.step()  # the next epoch's poly-decayed learning rate
        self.epoch += 1
        self.save_last(self.epoch, 0)

    def on_train_end(self) -> None:
        self._close_progress()
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        for log in (self.csv_log, self.tb):
            if log is not None:
                log.close()

    def _close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    # ------------------------------------------------------------------ logging
    def log_train(self) -> None:
        """A ``train`` row (means over the steps since the last one) to the CSV and TensorBoard."""
        means = all_reduce_mean((self.run_sums / max(self.run_n, 1)).tolist(), self.info)
        rate = self.pairs_done / max(time.monotonic() - self.t_start, 1e-9)
        if self.info.is_main:
            vals = dict(zip(STEP_TERMS, means))
            row = {"time": round(self.csv_log.time_before + time.monotonic() - self.t_start, 3), "epoch": self.epoch + 1,
                   "step": self.global_step, "split": "train", **vals, "lr": self.lr_now, "pairs_per_s": rate}
            self.csv_log.write(row)
            self.tb.scalars("train", {**vals, "lr": self.lr_now, "pairs_per_s": rate}, self.global_step)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{vals['loss']:.4f}", pairs_s=f"{rate:.2f}")
        self.run_sums.zero_()
        self.run_n = 0

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_step(self, index: int) -> tuple[dict[str, float], Any]:
        """Loss, folding % and (with labels) Dice of one validation pair; and its batch/output."""
        from psmamba import metrics, spatial

        batch = to_device(collate_pairs([self.val_data[index]]), self.device, self.use_labels)
        with autocast(self.device, self.cfg.run.amp):
            out = self.model(batch["moving"], batch["fixed"])
        warped, ddf = out.warped.float(), out.ddf.float()
        loss, _ = self.objective(warped, ddf, batch["fixed"], batch.get("moving_labels"), batch.get("fixed_labels"),
                                 velocity=velocity_of(out), num_classes=batch.get("num_classes"))
        res = {"loss": float(loss), "folding_percent": float(metrics.folding_percent(ddf[0].cpu()))}
        if "moving_labels" in batch and "fixed_labels" in batch:
            warped_labels = spatial.warp(batch["moving_labels"], ddf, mode="nearest")
            fixed_labels = batch["fixed_labels"][0, 0].cpu().numpy()
            # the labels of both maps, as register/evaluate score (not those of the warp's result)
            shared, _ = metrics.shared_labels(fixed_labels, batch["moving_labels"][0, 0].cpu().numpy())
            # no code in both maps (two protocols, or labels lost to resizing): no Dice for this
            # pair, as register/evaluate leave such labels out (an empty list was an error here)
            d = metrics.mean_dice(fixed_labels, warped_labels[0, 0].cpu().numpy(), labels=shared) if shared else math.nan
            if not math.isnan(float(d)):
                res["dice"] = float(d)
        return res, (batch, warped, ddf)

    def validate(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Mean loss / Dice / folding % over the validation subset, and TensorBoard slices."""
        was_training = self.model.training
        self.model.eval()
        rows, images = [], {}
        want_images = self.cfg.run.images and self.tb is not None and self.tb.writer is not None
        for n, i in enumerate(self.val_idx):
            res, (batch, warped, ddf) = self.validation_step(i)
            rows.append(res)
            if want_images and n == 0:
                images = _slice_images(batch["moving"], batch["fixed"], warped, ddf)
        if was_training:
            self.model.train()

        def mean(key: str) -> float:
            vals = [r[key] for r in rows if key in r]
            return float(np.mean(vals)) if vals else math.nan

        return {"loss": mean("loss"), "dice": mean("dice"), "folding_percent": mean("folding_percent")}, images

    def validate_and_select(self) -> None:
        """Validate (rank 0), log, and write ``best.pt`` when the selection metric improved."""
        if self.val_data is None or not self.val_idx:
            return
        if self.info.is_main:
            res, images = self.validate()
            row = {"time": round(self.csv_log.time_before + time.monotonic() - self.t_start, 3), "epoch": self.epoch + 1,
                   "step": self.global_step, "split": "val", **res, "lr": self.optim.param_groups[0]["lr"]}
            self.csv_log.write(row)
            self.tb.scalars("val", res, self.global_step)
            self.tb.images(images, self.global_step)
            self.history.append({k: row[k] for k in ("epoch", "step", "loss", "dice", "folding_percent", "lr")})
            self.last_val = res
            if self.best_metric == "val_dice" and math.isnan(res["dice"]) and not self.best:
                # no validation pair's label maps share a code (two protocols): no Dice to select
                # by, and no best.pt would ever be written; decided once, at the first validation
                warnings.warn("validation: no pair's label maps share a label code, so there is no validation "
                              "Dice; best.pt is chosen by validation loss")
                self.best_metric = "val_loss"
            if self._improved(res):
                self.best.update({"metric": self.best_metric, "value": self._metric(res),
                                  "epoch": self.epoch + 1, "step": self.global_step})
                self.save_best(res)
        barrier(self.info)

    def _metric(self, res: dict[str, float]) -> float:
        return res["dice"] if self.best_metric == "val_dice" else res["loss"]

    def _improved(self, res: dict[str, float]) -> bool:
        return is_better(self._metric(res), self.best.get("value"), higher=self.best_metric == "val_dice")

    # ------------------------------------------------------------------ checkpoints
    def save_best(self, res: dict[str, float]) -> None:
        from psmamba.models import save_checkpoint

        save_checkpoint(self.out / "best.pt", self.model, train_summary={
            "config": config_to_dict(self.cfg), "best": dict(self.best), "val": dict(res)}, **self.ckpt_extra)

    def save_last(self, epoch: int, step_in_epoch: int) -> None:
        """``last.pt``: everything to resume exactly (a collective: every rank takes part)."""
        rngs = _gather_rng(self.info)
        if self.info.is_main:
            save_training_state(
                self.out / "last.pt", self.model, config=config_to_dict(self.cfg), optimizer=self.optim,
                scheduler=self.scheduler, scaler=self.scaler, epoch=epoch, step=self.global_step,
                step_in_epoch=step_in_epoch, best=self.best,
                metrics={"csv_rows": self.csv_log.rows, "history": self.history, "last_val": self.last_val,
                         "schedule_changes": self.schedule_changes},
                world_size=self.info.world_size, rng_states=rngs, extra=self.ckpt_extra,
            )
            if self.rescheduled:  # config.yaml follows last.pt's new schedule once it is written
                save_train_config(self.cfg, self.out / "config.yaml")
                self.rescheduled = False


# --------------------------------------------------------------------------- helpers
class MicroBatches:
    """The training micro-batches of each epoch, from one loader built for the whole run.

    ``epoch(e, batches)`` yields the collated micro-batches listed in ``batches`` (lists of pair
    indices, in the order given), after ``dataset.set_epoch(e)`` where the data set has it.
    With ``num_workers > 0`` one ``DataLoader`` with persistent workers serves every epoch
    (starting worker processes each epoch costs seconds and a copy of the data set each): its
    batch sampler hands out this epoch's list, and every index travels as ``(epoch, index)``,
    so a worker calls ``set_epoch`` on its own copy of the data set before reading (a call in
    the main process would not reach it). Without workers, batches are read in this process.
    Either way the batches, their order and their content are those listed. ``pin``: page-
    locked host memory, so the copy to a GPU runs asynchronously.
    """

    def __init__(self, dataset, num_workers: int, pin: bool) -> None:
        self.dataset, self.num_workers, self.pin = dataset, int(num_workers), bool(pin)
        self._sampler = _EpochBatchSampler()
        self._loader = None
        if self.num_workers > 0:
            self._loader = torch.utils.data.DataLoader(
                _EpochItems(dataset), batch_sampler=self._sampler, num_workers=self.num_workers,
                collate_fn=collate_pairs, pin_memory=self.pin, persistent_workers=True,
            )

    def epoch(self, epoch: int, batches: list[list[int]]):
        """Yield the micro-batches ``batches`` of ``epoch``, in order."""
        if self._loader is not None:
            self._sampler.batches = [[(int(epoch), i) for i in idx] for idx in batches]
            yield from self._loader
            return
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        for idx in batches:
            batch = collate_pairs([self.dataset[i] for i in idx])
            yield {k: v.pin_memory() if self.pin and torch.is_tensor(v) else v for k, v in batch.items()}

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


class _EpochBatchSampler:
    """A batch sampler whose batches the training loop sets before each epoch."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class _EpochItems(torch.utils.data.Dataset):
    """``dataset`` indexed by ``(epoch, index)``: moves the data set (in whichever process
    reads it) to ``epoch`` first, so per-epoch data (:class:`~psmamba.data.training.SynthEpochs`)
    reaches persistent loader workers."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def _val_indices(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or n <= limit:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed) + 7919)  # fixed for the whole run
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order), collected on all ranks."""
    state = capture_rng_state()
    if not info.distributed:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _slice_images(moving, fixed, warped, ddf) -> dict[str, np.ndarray]:
    """Middle slices (first axis) for TensorBoard: moving | warped | fixed | |warped - fixed|,
    and a square grid deformed by the field. Each ``(1, H, W')`` float in [0, 1]."""
    from psmamba import spatial
    from psmamba.data.preprocess import minmax_scale

    d = fixed.shape[2] // 2
    m, w, f = (minmax_scale(t[0, 0, d].detach().float().cpu().numpy()) for t in (moving, warped, fixed))
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
