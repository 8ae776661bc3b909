"""Self-describing checkpoints: the model config travels with the weights.

A checkpoint is a ``torch.save``-d dict::

    {"format": "psmamba-checkpoint", "format_version": 1, "psmamba_version": "0.1.0",
     "config": {...ModelConfig.to_dict()...}, "state_dict": {...}, **extra}

:func:`load_checkpoint` rebuilds the model from ``config`` and loads the weights with
``strict=True``, so a checkpoint of another architecture fails loudly instead of half-loading.
A comparison network (:mod:`psmamba.models.peers`) stores ``{"model": name, **its config}``
as ``config``; a config without ``"model"`` is PSMamba-Net's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from psmamba import __version__
from psmamba.config import ModelConfig
from psmamba.errors import PsmambaError, first_line
from psmamba.files import atomic_save
from psmamba.models.net import PSMambaNet
from psmamba.models.peers import build_peer
from psmamba.models.peers._common import PeerNet

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "psmamba-checkpoint"
_FORMAT_VERSION = 1
_RESERVED = ("format", "format_version", "psmamba_version", "config", "state_dict")


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the model in .module, torch.compile in ._orig_mod
    while not isinstance(model, (PSMambaNet, PeerNet)):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise PsmambaError(f"save_checkpoint needs a PSMambaNet or a peer network, got {type(model).__name__}")
        model = inner
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> Path:
    """Write ``model`` (config + weights) and ``extra`` entries to ``path`` atomically.

    The file is first written to a temporary file in the same folder and then renamed over
    ``path`` (``os.replace``), so a crash never leaves a half-written checkpoint behind.

    Args:
        path: destination file (its folder must exist).
        model: a :class:`PSMambaNet` or a peer network (or a DDP / ``torch.compile`` wrapper).
        **extra: more entries to store (optimiser state, epoch, metrics...). Plain data
            (numbers, strings, lists, dicts, tensors) keeps the file loadable with
            ``weights_only=True``.

    Returns:
        The path written.
    """
    net = _unwrap(model)
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise PsmambaError(f"save_checkpoint: extra keys {clash} are reserved")
    path = Path(path)
    if not path.parent.is_dir():
        raise PsmambaError(f"{path}: folder {path.parent} does not exist")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": _FORMAT_VERSION,
        "psmamba_version": __version__,
        "config": net.checkpoint_config() if isinstance(net, PeerNet) else net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        **extra,
    }
    return atomic_save(payload, path)


def _non_finite(state: Mapping[str, Any]) -> str:
    """The floating-point tensors of ``state`` holding NaN/inf: ``"name, name (+N more)"``, or ``""``."""
    names = [k for k, v in state.items()
             if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    mamba_backend: str | None = None,
    weights_only: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in ``path`` and load its weights with ``strict=True``.

    Args:
        path: a file written by :func:`save_checkpoint`.
        map_location: where tensors go (as in ``torch.load``); the model is moved there too
            when it is a device.
        mamba_backend: replace the stored scan backend (a run-time choice: e.g. a model trained
            with ``"cuda"`` evaluated on a CPU). ``None`` keeps the stored one. Ignored for a
            peer network without Mamba layers.
        weights_only: passed to ``torch.load``; ``True`` (safe) refuses arbitrary pickled
            objects. Set ``False`` only for trusted files whose extras need it.

    Returns:
        ``(model, checkpoint)``: the model (a :class:`PSMambaNet` or a peer network, in eval
        mode) and the whole checkpoint dict.

    Raises:
        PsmambaError: one line naming the file, for a missing, corrupt or foreign file, a bad
            config or weights that do not fit the config.
    """
    path = Path(path)
    if not path.is_file():
        raise PsmambaError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # torch raises many types for a bad file (pickle, zip, runtime)
        raise PsmambaError(f"{path}: not a readable checkpoint, corrupt or not written by torch.save "
                           f"({first_line(exc)})") from None
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise PsmambaError(f"{path}: not a psmamba checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    if not isinstance(ckpt.get("config"), Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise PsmambaError(f"{path}: psmamba checkpoint without a config or state_dict")
    try:
        stored = dict(ckpt["config"])
        if "model" in stored:  # a comparison network
            if mamba_backend is not None and "mamba_backend" in stored:
                stored["mamba_backend"] = mamba_backend
            model: nn.Module = build_peer(stored["model"], stored)
        else:
            cfg = ModelConfig.from_dict(stored)
            if mamba_backend is not None:
                cfg = cfg.replace(mamba_backend=mamba_backend)
            model = PSMambaNet(cfg)
    except PsmambaError as exc:
        raise PsmambaError(f"{path}: {first_line(exc)}") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise PsmambaError(f"{path}: weights do not match the stored config ({_mismatch(model, ckpt['state_dict'], exc)})") from None
    bad = _non_finite(ckpt["state_dict"])
    if bad:
        raise PsmambaError(f"{path}: weights hold NaN or infinite values ({bad}); the training that wrote it "
                           "diverged or the file is damaged")
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, dict(ckpt)


def _mismatch(model: nn.Module, state: Mapping[str, Any], exc: Exception) -> str:
    """A one-line summary of why ``state`` does not fit ``model`` (at most 3 names per kind)."""
    have = model.state_dict()
    missing = sorted(set(have) - set(state))[:3]
    unexpected = sorted(set(state) - set(have))[:3]
    shapes = [
        f"{k}: {tuple(getattr(state[k], 'shape', ()))} vs {tuple(have[k].shape)}"
        for k in sorted(set(have) & set(state))
        if tuple(getattr(state[k], "shape", ())) != tuple(have[k].shape)
    ][:3]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if unexpected:
        parts.append(f"unexpected {unexpected}")
    if shapes:
        parts.append(f"shape mismatch {shapes}")
    return "; ".join(parts) if parts else first_line(exc)
