"""Process-level settings for running PSMamba-Net on the CPU.

:func:`keep_freed_memory` makes glibc's ``malloc`` keep the memory of freed tensors for reuse.
The ``psmamba`` command calls it before its inference-type sub-commands (``register``,
``evaluate``, ``demo``), and ``benchmarks/bench_model.py`` in its measuring processes (it
records whether it did). Library users may call it themselves; it changes the whole process.

Why: PyTorch allocates CPU tensors with ``malloc``. glibc serves every block above its mmap
threshold (at most 32 MiB) with fresh pages from ``mmap`` and gives them back on ``free``, so
each new large tensor is faulted in and zeroed by the kernel page by page on first touch. A
forward pass at 160x192x160 allocates dozens of 150-300 MB tensors: ``vmstat`` showed 10-25 %
of the CPU time in the kernel. With mmap turned off for ``malloc`` (``M_MMAP_MAX = 0``) and a
high trim threshold, freed blocks stay in the heap and the next tensor reuses them.

Measured (``python benchmarks/bench_model.py --sizes 96x112x96,160x192x160 --modes fwd,train
--memory kept,plain --repeats 3 --mem-cap-gb 21``, 2-core Xeon): the paper model's forward at
160x192x160 9.5 s / 3.3 GB peak RSS kept vs 14.2 s / 2.9 GB plain. The cost is memory: the
process keeps its peak heap, and fragmentation raised the 160x192x160 training step's peak
from 14.6 to 19.3 GB, which is why ``psmamba train`` does not call it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "freed_memory_kept"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has been applied in this process."""
    return _applied


def keep_freed_memory() -> bool:
    """Let freed tensor memory be reused instead of returned to the OS (glibc only).

    Sets glibc's ``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to 2 GiB - 1 with ``mallopt``.
    Does nothing (and returns False) on other C libraries and operating systems, or when
    the environment has ``PSMAMBA_KEEP_MEMORY=0``. Safe to call more than once.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("PSMAMBA_KEEP_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
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
