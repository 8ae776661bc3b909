"""Process-level settings for running PSMamba-Net: one explicit, recordable value.

:class:`Runtime` holds every switch that changes how (not what) the model computes:

==========================  ==============================  ====================================================
field                       environment input               meaning
==========================  ==============================  ====================================================
``fast_cpu``                ``PSMAMBA_FAST_CPU`` (``0``)    the numba fast paths of :mod:`psmamba.nn.fast` may run
``keep_freed_memory``       ``PSMAMBA_KEEP_MEMORY`` (``0``) glibc keeps freed tensor memory for reuse (see below)
``threads``                 (none)                          torch's intra-op threads set by :meth:`Runtime.apply`;
                                                            ``None`` leaves torch's own count (numba follows it)
``mamba_inference_chunk``   (none)                          tokens per piece of a Mamba layer without autograd
``mamba_train_chunk``       (none)                          tokens per checkpointed piece of a Mamba layer in training
==========================  ==============================  ====================================================

The current value is :func:`current` (read from the environment on first use); :func:`use`
changes it inside a ``with`` block (tests use it to compare the fast and plain paths, or to
force small chunks); :meth:`Runtime.as_dict` is what run summaries and benchmark files
record. The chunk sizes change memory and speed only: any chunking gives the one-piece
numbers to rounding.

Keeping freed memory
--------------------
:func:`keep_freed_memory` makes glibc's ``malloc`` keep the memory of freed tensors for reuse.
The ``psmamba`` command calls it before its inference-type sub-commands (``register``,
``evaluate``, ``demo``), and ``benchmarks/bench_model.py`` in its measuring processes (it
records whether it did). Library users may call it (or :meth:`Runtime.apply`) themselves; it
changes the whole process and cannot be undone.

Why: PyTorch allocates CPU tensors with ``malloc``. glibc serves every block above its mmap
threshold (at most 32 MiB) with fresh pages from ``mmap`` and gives them back on ``free``, so
each new large tensor is faulted in and zeroed by the kernel page by page on first touch; a
full-size forward pass allocates dozens of such tensors. With mmap turned off for ``malloc``
(``M_MMAP_MAX = 0``) and a high trim threshold, freed blocks stay in the heap and the next
tensor reuses them. The cost is memory: the process keeps its peak heap, and fragmentation
raises a training step's peak, which is why ``psmamba train`` does not call it
(``benchmarks/README.md`` has the measurements).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from psmamba.errors import PsmambaError

__all__ = ["Runtime", "current", "use", "keep_freed_memory", "freed_memory_kept"]


@dataclass(frozen=True)
class Runtime:
    """How PSMamba-Net runs in this process (see the module docstring for each field)."""

    fast_cpu: bool = True
    keep_freed_memory: bool = True
    threads: int | None = None
    #: tokens per piece without autograd; 0 = the whole sequence in one piece
    mamba_inference_chunk: int = 2**16
    #: tokens per checkpointed piece in training (recomputed in the backward pass); 0 = one
    #: piece, nothing recomputed
    mamba_train_chunk: int = 2**18

    def __post_init__(self) -> None:
        for name in ("fast_cpu", "keep_freed_memory"):
            if not isinstance(getattr(self, name), bool):
                raise PsmambaError(f"Runtime: {name} must be True or False, got {getattr(self, name)!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise PsmambaError(f"Runtime: threads must be None or a positive integer, got {self.threads!r}")
        for name in ("mamba_inference_chunk", "mamba_train_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PsmambaError(f"Runtime: {name} must be an integer >= 0 (0 = one piece), got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Runtime:
        """The defaults, with the switches the environment sets (``os.environ`` by default):
        ``PSMAMBA_FAST_CPU=0`` and ``PSMAMBA_KEEP_MEMORY=0`` turn those features off."""
        env = os.environ if environ is None else environ
        return cls(
            fast_cpu=env.get("PSMAMBA_FAST_CPU", "1") != "0",
            keep_freed_memory=env.get("PSMAMBA_KEEP_MEMORY", "1") != "0",
        )

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain, JSON-ready dict (for run summaries and benchmark records)."""
        return dataclasses.asdict(self)

    def apply(self) -> None:
        """The process-level effects: torch's thread count (when ``threads`` is set) and
        :func:`keep_freed_memory` (when ``keep_freed_memory``). Does not make ``self`` current."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        if self.keep_freed_memory:
            _keep_freed_memory_glibc()


_current: Runtime | None = None


def current() -> Runtime:
    """The settings in force (from the environment on first use, then as :func:`use` sets them)."""
    global _current
    if _current is None:
        _current = Runtime.from_env()
    return _current


@contextlib.contextmanager
def use(**changes: Any) -> Iterator[Runtime]:
    """``with use(fast_cpu=False): ...`` runs the block with those fields changed in :func:`current`
    (restored afterwards, also on an error). Only the value changes: nothing is applied to the
    process (see :meth:`Runtime.apply`). Yields the settings in force inside the block."""
    global _current
    before = current()
    try:
        changed = dataclasses.replace(before, **changes)
    except TypeError as exc:  # an unknown field
        raise PsmambaError(f"runtime.use: {exc}") from None
    _current = changed
    try:
        yield changed
    finally:
        _current = before


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def freed_memory_kept() -> bool:
    """Whether freed memory is kept for reuse in this process (see :func:`keep_freed_memory`)."""
    return _applied


def keep_freed_memory() -> bool:
    """Let freed tensor memory be reused instead of returned to the OS (glibc only), unless
    ``current().keep_freed_memory`` is off (``PSMAMBA_KEEP_MEMORY=0``).

    Sets glibc's ``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to 2 GiB - 1 with ``mallopt``.
    Returns whether that is in force; False (and nothing done) when turned off, on other C
    libraries and on other operating systems. Safe to call more than once.
    """
    if not _applied and not current().keep_freed_memory:
        return False
    return _keep_freed_memory_glibc()


def _keep_freed_memory_glibc() -> bool:
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own symbol: not musl or others
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = bool(ok)
    return _applied
