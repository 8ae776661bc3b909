"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A training checkpoint (``last.pt``) is a model checkpoint in the format of
:func:`psmamba.models.save_checkpoint` (model config + weights, loadable by
:func:`psmamba.models.load_checkpoint` for ``register``/``evaluate``) with the training state
added under the key ``"training"``::

    training = {
        "format": "psmamba-train/1",
        "config": {...},              # the resolved TrainConfig as a plain dict
        "optimizer": ..., "scheduler": ..., "scaler": ...,   # state_dicts (scaler: fp16 only)
        "epoch": int,                 # 0-based epoch the next step belongs to
        "step": int,                  # optimiser steps done in total
        "step_in_epoch": int,         # optimiser steps done inside ``epoch`` (sampler position)
        "rng": [{...}, ...],          # per rank: Python, NumPy, torch (CPU and every CUDA device)
        "best": {"metric": ..., "value": ..., "epoch": ...},
        "metrics": {...},             # the last validation and training numbers
        "world_size": int,
    }

Everything is stored as tensors, numbers, strings, lists, tuples and dicts so that
``torch.load(..., weights_only=True)`` reads it (no pickled objects).

Atomic writes (:mod:`psmamba.files`, through :func:`psmamba.models.save_checkpoint`): a run
killed mid-write leaves the previous checkpoint intact and never a truncated one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from psmamba.errors import PsmambaError, first_line

__all__ = [
    "TRAIN_FORMAT",
    "capture_rng_state",
    "restore_rng_state",
    "save_training_state",
    "load_training_state",
]

TRAIN_FORMAT = "psmamba-train/1"


# --------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may touch, ``weights_only``-safe."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": (py_version, list(py_state), py_gauss),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when the same devices exist)."""
    import numpy as np
    import torch

    if "python" in state:
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# --------------------------------------------------------------------------- training state
def save_training_state(
    path: str | Path,
    model,
    *,
    config: dict[str, Any],
    optimizer=None,
    scheduler=None,
    scaler=None,
    epoch: int,
    step: int,
    step_in_epoch: int,
    best: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    world_size: int = 1,
    rng_states: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a training checkpoint (a model checkpoint plus ``"training"``) atomically.

    Args:
        path: target file; its folder must exist.
        model: the bare model (unwrap DistributedDataParallel first).
        config: the resolved :class:`~psmamba.config.TrainConfig` as a plain dict.
        optimizer, scheduler, scaler: their ``state_dict()`` is saved when given.
        epoch, step, step_in_epoch: the position to resume from (see the module docstring).
        best, metrics: model selection record and the latest numbers.
        rng_states: the random generator states of every rank, in rank order (see
            :func:`capture_rng_state`); default: this process's state only.
        extra: more top-level entries of the model checkpoint (e.g. ``image_size``).
    """
    from psmamba.models import save_checkpoint

    training: dict[str, Any] = {
        "format": TRAIN_FORMAT,
        "config": config,
        "epoch": int(epoch),
        "step": int(step),
        "step_in_epoch": int(step_in_epoch),
        "best": dict(best or {}),
        "metrics": _plain(metrics or {}),
        "world_size": int(world_size),
    }
    if optimizer is not None:
        training["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        training["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        training["scaler"] = scaler.state_dict()
    training["rng"] = list(rng_states) if rng_states is not None else [capture_rng_state()]

    save_checkpoint(path, model, training=training, **dict(extra or {}))


def load_training_state(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_training_state`.

    Returns the whole checkpoint dict; ``ckpt["training"]`` holds the training state.

    Raises:
        PsmambaError: the file is missing, unreadable, or not a psmamba training checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise PsmambaError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated/corrupt/foreign files all land here
        raise PsmambaError(f"{path}: cannot read checkpoint ({first_line(exc)[:200]})") from None
    training = ckpt.get("training") if isinstance(ckpt, dict) else None
    if not isinstance(training, dict) or training.get("format") != TRAIN_FORMAT:
        raise PsmambaError(f"{path}: not a psmamba training checkpoint (no {TRAIN_FORMAT!r} state)")
    # what resuming reads, checked here: a damaged file is one line, not a KeyError after the data is built
    problems = [f"training.{k} is not a mapping" for k in ("config", "optimizer", "scheduler")
                if not isinstance(training.get(k), dict)]
    problems += [f"training.{k} is not a whole number >= 0" for k in ("epoch", "step", "step_in_epoch")
                 if isinstance(training.get(k), bool) or not isinstance(training.get(k), int) or training.get(k) < 0]
    if not isinstance(ckpt.get("state_dict"), dict):
        problems.append("no state_dict of weights")
    if problems:
        raise PsmambaError(f"{path}: a damaged training checkpoint ({'; '.join(problems[:3])}); resume from a copy, "
                           "or start the run again")
    return ckpt


def _plain(value: Any) -> Any:
    """Numbers/strings/lists/dicts only (numpy scalars and 0-d tensors become floats)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
