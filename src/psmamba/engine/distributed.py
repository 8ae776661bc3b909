"""Devices, DistributedDataParallel set-up and the deterministic pair order shared by all ranks.

Launch several processes with PyTorch's own launcher, on one machine or many::

    torchrun --nproc_per_node 4 -m psmamba train --config cfg.yaml            # one node, 4 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m psmamba train --config cfg.yaml            # two nodes

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them (``env://``) and picks NCCL on CUDA, gloo on the CPU.

The order of the pairs is a function of ``(seed, epoch)`` only (:func:`epoch_order`), and
:func:`rank_batches` cuts each optimiser step's slice of that order the same way for every
world size. So one process with ``accumulate = 2`` and two processes with ``accumulate = 1``
see exactly the same pairs in the same steps, and a resumed run restarts from the saved step
inside the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from psmamba.errors import PsmambaError

__all__ = [
    "DistInfo",
    "resolve_device",
    "init_distributed",
    "shutdown_distributed",
    "epoch_order",
    "steps_per_epoch",
    "rank_batches",
    "barrier",
    "any_rank",
    "all_reduce_mean",
]


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: ``rank`` of ``world_size``, its ``device``; ``is_main`` writes files."""

    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device
    backend: str | None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: Any = "auto", local_rank: int = 0):
    """The one device resolution of psmamba: a name (or ``torch.device``) -> ``torch.device``.

    ``"auto"`` (or None) takes CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else
    another available accelerator (``torch.accelerator``, torch >= 2.6), else the CPU. ``"cuda"``
    without an index is bound to this process's local rank; ``"cuda:1"``, ``"mps"`` ... are taken
    as given once checked to be available.

    Raises:
        PsmambaError: an unknown device name, or an accelerator this machine does not have.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        acc = getattr(torch, "accelerator", None)
        if acc is not None and acc.is_available():
            return acc.current_accelerator()
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise PsmambaError(f"--device must be auto, cpu or an accelerator such as cuda, got {device!r}") from None
    if dev.type == "cpu":
        return dev
    mod = getattr(torch, dev.type, None)
    if mod is None or not hasattr(mod, "is_available") or not mod.is_available():
        raise PsmambaError(f"--device {name} was asked for but torch sees no such device on this machine "
                           "(use --device auto or cpu)")
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return dev


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise PsmambaError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    With ``WORLD_SIZE`` unset or 1 this only resolves the device. Otherwise it initialises
    ``torch.distributed`` with ``init_method="env://"``, backend ``nccl`` for CUDA and ``gloo``
    for the CPU, and binds CUDA ranks to ``cuda:LOCAL_RANK``.
    """
    import datetime

    import torch
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local)
    if world <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, backend=None)
    if not dist.is_available():
        raise PsmambaError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method="env://", world_size=world, rank=rank,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def shutdown_distributed() -> None:
    """Leave the process group (no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop signal)."""
    if not info.distributed:
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    """Mean over ranks of a few floats (logging only: training itself never needs it)."""
    if not info.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


# --------------------------------------------------------------------------- pair order
def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """The order in which the ``n`` training pairs are visited in ``epoch`` (0-based).

    A permutation drawn from a generator seeded with ``(seed, epoch)`` only, so every rank and
    every resumed run computes the same order without saving it.
    """
    import torch

    if n < 1:
        raise PsmambaError("no training pairs: the training split is empty")
    if not shuffle:
        return list(range(n))
    g = torch.Generator()
    # one stream per (seed, epoch); the large odd multiplier keeps nearby seeds apart
    g.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Optimiser steps per epoch: ``ceil(n / global_batch)`` (the last step wraps around)."""
    return -(-int(n) // int(global_batch))


def rank_batches(
    order: list[int],
    step: int,
    *,
    batch_size: int,
    accumulate: int,
    world_size: int,
    rank: int,
) -> list[list[int]]:
    """The micro-batches (lists of pair indices) that ``rank`` runs for optimiser ``step``.

    Step ``s`` consumes the slice ``order[s*G : (s+1)*G]`` with ``G = batch_size * accumulate *
    world_size`` (wrapping around to the start of ``order`` when it runs out, as
    ``DistributedSampler`` pads, so that every rank does the same number of steps). Position
    ``a*(world_size*batch_size) + r*batch_size + b`` of the slice goes to accumulation step
    ``a``, rank ``r``, batch element ``b``: the same pairs meet in the same optimiser step
    whatever the split between processes, accumulation and batch.
    """
    g = batch_size * accumulate * world_size
    n = len(order)
    start = step * g
    chunk = [order[(start + i) % n] for i in range(g)]
    out = []
    for a in range(accumulate):
        base = a * world_size * batch_size + rank * batch_size
        out.append(chunk[base : base + batch_size])
    return out
