"""The ``"cpu"`` selective-scan backend: numba kernels, by concern.

* :mod:`.mathfn`: the vectorisable ``exp``/``2^x``/``log1p`` the kernels use;
* :mod:`.chunks`: every size that cuts the work (the time chunk :data:`CHECKPOINT_EVERY`,
  channel blocks, sync blocks, the time-major units);
* :mod:`.training`: the forward and backward kernels as two ``torch.library`` custom ops with
  a registered autograd formula (opaque to ``torch.compile``) behind :func:`scan_cpu` (the
  backend entry point of :func:`psmamba.nn.scan.selective_scan`);
* :mod:`.inference`: the fused kernels the Mamba layer runs without autograd, channels-first
  and time-major;
* numba/LLVM settings shared with the other kernels (compile options, vectoriser flags,
  threads) are in :mod:`psmamba.nn._numba`.

Sizes are read from :mod:`.chunks` at call time: patch them there (tests do), not here.
"""

from __future__ import annotations

from psmamba.nn._numba import KernelFlags as _KernelFlags  # noqa: F401  (benchmarks/bench_scan.py)
from psmamba.nn._numba import threads
from psmamba.nn._scan_cpu.chunks import CHECKPOINT_EVERY, TM_WIDTH, use_time_major
from psmamba.nn._scan_cpu.inference import conv_silu_cpu, conv_silu_tm_cpu, fused_scan_cpu, fused_scan_tm_cpu
from psmamba.nn._scan_cpu.mathfn import _exp  # noqa: F401  (benchmarks/bench_scan.py)
from psmamba.nn._scan_cpu.training import scan_cpu

__all__ = [
    "CHECKPOINT_EVERY",
    "TM_WIDTH",
    "conv_silu_cpu",
    "conv_silu_tm_cpu",
    "fused_scan_cpu",
    "fused_scan_tm_cpu",
    "scan_cpu",
    "threads",
    "use_time_major",
]
