"""The training objective and the ONE optimiser step that every trainer of psmamba runs.

``psmamba train`` (:class:`psmamba.engine.trainer.Trainer`), test-time fine-tuning and field
refinement (:mod:`psmamba.engine.methods`) and the benchmarks all minimise an :class:`Objective`
through :func:`train_step`, so a benchmark trains exactly the way ``psmamba train`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["Objective", "train_step", "velocity_of", "autocast", "no_autocast", "to_device", "STEP_TERMS"]

#: the terms :func:`train_step` returns, in order
STEP_TERMS = ("loss", "similarity", "regulariser", "dice_loss")


class Objective(nn.Module):
    """``similarity(warped, fixed) + reg_weight * regulariser(field) [+ dice_weight * DiceLoss]``.

    Built from a :class:`psmamba.config.LossConfig` (or anything with its fields). Computed in
    float32 whatever the autocast dtype of the forward pass. The Dice term warps the one-hot
    moving labels with the field (trilinear, so it is differentiable) and compares them with
    the fixed labels; the number of classes is ``1 + max label`` of the pair. ``similarity:
    none`` drops the image term (its part is reported as 0); ``regularise: velocity``
    regularises the network's velocity field before integration instead of ``ddf``.

    ``forward(warped (B,1,D,H,W), ddf (B,3,D,H,W), fixed (B,1,D,H,W), moving_labels=None,
    fixed_labels=None, velocity=None, num_classes=None) -> (total, parts)`` where ``parts`` holds the
    detached terms ``similarity``, ``regulariser`` and ``dice_loss``; ``velocity`` ``(B,3,D,H,W)`` is
    required with ``regularise: velocity`` (a
    :class:`~psmamba.models.peers._common.VelocityOutput`'s attribute: :func:`velocity_of`);
    ``num_classes`` (``1 + max label`` of the pair, a Python int) spares reading it off device labels.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        from psmamba.losses import LNCC, MSE, BendingEnergy, DiceLoss, Diffusion

        kind = getattr(cfg, "similarity", "lncc")
        self.similarity = None if kind == "none" else LNCC(window=cfg.window) if kind == "lncc" else MSE()
        self.regulariser = Diffusion() if cfg.regulariser == "diffusion" else BendingEnergy()
        self.regularise = getattr(cfg, "regularise", "ddf")
        self.reg_weight = float(cfg.reg_weight)
        self.dice_weight = float(cfg.dice_weight)
        self.dice = DiceLoss() if self.dice_weight > 0 else None

    @classmethod
    def lncc_diffusion(cls, window: int, lam: float) -> Objective:
        """The paper's unsupervised loss ``LNCC(window) + lam * Diffusion``."""
        from psmamba.config import LossConfig

        return cls(LossConfig(similarity="lncc", window=int(window), regulariser="diffusion", reg_weight=float(lam)))

    def forward(self, warped, ddf, fixed, moving_labels=None, fixed_labels=None, velocity=None, num_classes=None):
        from psmamba import spatial
        from psmamba.losses import one_hot

        if self.regularise == "velocity" and velocity is None:
            from psmamba.errors import PsmambaError

            raise PsmambaError("loss.regularise=velocity needs a network that outputs its velocity field "
                               "(mambamorph, mambamorph_feat); use loss.regularise=ddf")
        with no_autocast(warped.device):
            warped, ddf, fixed = warped.float(), ddf.float(), fixed.float()
            if self.similarity is None:
                sim = torch.zeros((), device=warped.device)
            else:
                sim = self.similarity(warped, fixed)
            reg = self.regulariser(velocity.float() if self.regularise == "velocity" else ddf)
            total = sim + self.reg_weight * reg
            dice_loss = torch.zeros((), device=warped.device)
            if self.dice is not None and moving_labels is not None and fixed_labels is not None:
                # the class count fixes the one-hot's shape, so it must be a host number: from the
                # batch (collate_pairs computes it on the host) or, without it, read off the labels
                # (a host-device sync)
                k = int(num_classes) if num_classes is not None else int(max(moving_labels.max(), fixed_labels.max())) + 1
                if k >= 2:
                    soft = spatial.warp(one_hot(moving_labels, k), ddf)  # (B, K, D, H, W)
                    dice_loss = self.dice(soft, fixed_labels)
                    total = total + self.dice_weight * dice_loss
        parts = {"similarity": sim.detach(), "regulariser": reg.detach(), "dice_loss": dice_loss.detach()}
        return total, parts


def velocity_of(output: Any) -> torch.Tensor | None:
    """The velocity field a network's output carries (a ``VelocityOutput``), else None."""
    return getattr(output, "velocity", None)


def no_autocast(device: torch.device):
    """A context in which ``device``'s autocast is off (losses and geometry stay float32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on an accelerator; a null context on the CPU or with ``amp="none"``."""
    if amp == "none" or device.type == "cpu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Mapping[str, Any], device: torch.device, use_labels: bool = True) -> dict[str, Any]:
    """A batch's tensors on ``device`` (label maps dropped unless ``use_labels``)."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            if key.endswith("_labels") and not use_labels:
                continue
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


def train_step(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Mapping[str, Any]],
    *,
    accumulate: int = 1,
    amp: str = "none",
    scaler: Any = None,
    grad_clip: float = 0.0,
    no_sync: Callable[[], Any] | None = None,
    clip_params: Iterable[nn.Parameter] | None = None,
) -> torch.Tensor:
    """One optimiser step: forward, objective, backward over ``accumulate`` micro-batches, step.

    Args:
        model: ``forward(moving, fixed) -> RegistrationOutput(warped, ddf)`` (a network, a
            DDP wrapper of one, or a field being optimised directly).
        batches: ``accumulate`` batch dicts on the model's device: ``moving``, ``fixed``
            ``(B, 1, D, H, W)``, optional ``moving_labels`` / ``fixed_labels`` and
            ``num_classes`` (an int, as :func:`psmamba.data.training.collate_pairs` gives).
        amp: ``none``, ``bf16`` or ``fp16`` autocast of the forward pass (accelerators only).
        scaler: a gradient scaler (fp16).
        grad_clip: clip the gradient norm to this (0: off).
        no_sync: DDP's ``no_sync`` (gradients are reduced on the last micro-batch only).
        clip_params: the parameters to clip (default: the model's).

    Returns:
        The mean of :data:`STEP_TERMS` over the micro-batches, a float64 tensor on the device
        (reading it is the caller's choice: it syncs the device).
    """
    optimizer.zero_grad(set_to_none=True)
    sums = None
    for a, batch in enumerate(batches):
        sync = no_sync() if (no_sync is not None and a < accumulate - 1) else contextlib.nullcontext()
        with sync:
            with autocast(batch["moving"].device, amp):
                res = model(batch["moving"], batch["fixed"])
            loss, parts = objective(res.warped, res.ddf, batch["fixed"],
                                    batch.get("moving_labels"), batch.get("fixed_labels"), velocity=velocity_of(res),
                                    num_classes=batch.get("num_classes"))
            scaled = loss / accumulate
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        terms = torch.stack([loss.detach(), parts["similarity"], parts["regulariser"], parts["dice_loss"]]).double()
        sums = terms if sums is None else sums + terms
    if sums is None:
        raise ValueError("train_step needs at least one batch")
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(clip_params) if clip_params is not None else model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return sums / accumulate
