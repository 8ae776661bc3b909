"""numba and LLVM settings shared by the CPU kernels (:mod:`psmamba.nn._scan_cpu`,
:mod:`psmamba.nn._fast_cpu`): compile options, LLVM's vectoriser flags around a compilation
(and the quieting of its remarks), and the thread count.

The first call of a kernel compiles it (tens of seconds per dtype on a small machine);
``cache=True`` keeps the machine code on disk (``__pycache__``, or numba's user cache when the
package folder is read-only), so later processes load it in about a second.
"""

from __future__ import annotations

import os
import sys
import tempfile

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from numba.core.compiler_lock import global_compiler_lock

__all__ = ["JIT", "KernelFlags", "NumbaThreads", "threads", "as_numpy"]

#: numba options of every parallel kernel
JIT = dict(parallel=True, fastmath=True, cache=True, nogil=True)

# The scan kernels' inner loops run over the N = 16 states, a trip count LLVM cannot see. Left
# to itself it vectorises them 8 wide and interleaves 4 times (32 elements per iteration), so a
# 16-long loop never enters the vector body and runs scalar. Compiling without interleaving
# (8 wide, two iterations for N = 16) about doubles the speed (benchmarks/README.md). This is
# one of LLVM's global command-line options: it is set only while our kernels compile (under
# numba's compiler lock) and reset to LLVM's default (0 = "not forced") afterwards. (Forcing
# the width as well made LLVM print "loop not vectorized" warnings for every other loop.)
VECTOR_FLAGS = ("-force-vector-interleave=1",)
# The time-major inference scan runs its vectors over a block of 16 channels: forcing the
# width to 16 lets LLVM use whole AVX-512 registers there (it prefers 256-bit vectors on its
# own; faster, benchmarks/README.md).
WIDE_FLAGS = ("-force-vector-width=16",)
DEFAULT_FLAGS = ("-force-vector-interleave=0", "-force-vector-width=0")
_compiled: set = set()


class KernelFlags:
    """Context for a kernel call that may compile: our LLVM vector flags, then the defaults.

    With a forced vector width LLVM reports every loop it cannot vectorise (the outer loops)
    as a "loop not vectorized" remark on the process's stderr; ``wide=True`` forces the width
    and drops those remark lines (file descriptor 2 goes to a temporary file while the kernel
    compiles; any other line written meanwhile is passed on).
    """

    def __init__(self, key, wide: bool = False) -> None:
        self.key = key
        self.wide = wide
        self.active = key not in _compiled
        self._saved_fd = None
        self._capture = None

    def __enter__(self):
        if self.active:
            global_compiler_lock.acquire()
            for opt in VECTOR_FLAGS + (WIDE_FLAGS if self.wide else ()):
                llvm.set_option("", opt)
            if self.wide:
                self._quiet_start()
        return self

    def __exit__(self, *exc):
        if self.active:
            if self.wide:
                self._quiet_end()
            for opt in DEFAULT_FLAGS:
                llvm.set_option("", opt)
            global_compiler_lock.release()
            if exc[0] is None:
                _compiled.add(self.key)
        return False

    def _quiet_start(self) -> None:
        try:
            sys.stderr.flush()
            self._capture = tempfile.TemporaryFile()
            self._saved_fd = os.dup(2)
            os.dup2(self._capture.fileno(), 2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2: leave stderr alone
            self._saved_fd = None

    def _quiet_end(self) -> None:
        if self._saved_fd is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._capture.seek(0)
        text = self._capture.read().decode("utf-8", "replace")
        self._capture.close()
        kept = [line for line in text.splitlines(True) if "loop not vectorized" not in line]
        if kept:
            sys.stderr.write("".join(kept))


def threads() -> int:
    """Use as many numba threads as torch is allowed (respects torch.set_num_threads)."""
    return max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads()))


class NumbaThreads:
    """Temporarily set numba's thread count (restored on exit)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.old = None

    def __enter__(self):
        self.old = numba.get_num_threads()
        if self.old != self.n:
            numba.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.old is not None and self.old != self.n:
            numba.set_num_threads(self.old)
        return False


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """The array a kernel reads or writes: ``t``'s memory, no copy (CPU tensors only)."""
    return t.detach().numpy()
