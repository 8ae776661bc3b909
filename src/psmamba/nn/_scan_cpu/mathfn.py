"""Scalar math for the scan kernels, written so that LLVM vectorises it.

Without Intel SVML (which current numba/llvmlite wheels do not use) LLVM calls scalar ``expf``
once per state element, and the scan becomes exp-bound. :func:`_exp` is written in plain
arithmetic instead (range reduction to ``2^k * 2^f`` with a degree-6 polynomial for ``2^f`` on
``[-1/2, 1/2]`` and ``2^k`` built from its bits), so LLVM vectorises it. Its relative error is
~1e-7, the size of float32 rounding. float64 uses ``math.exp`` (the float64 path exists for
``gradcheck``, not for speed). :func:`_exp2` is the same for ``2^z`` with ``z <= 0``, and
:func:`_log1p01` a vectorisable ``log(1 + y)`` on ``[0, 1]`` (softplus in the fused kernels).

``_exp`` and ``_exp2`` are Python functions with numba overloads: call them from kernels.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["LOG2E", "LN2", "_exp", "_exp2", "_log1p01"]

# Near-minimax polynomial for 2^f on [-1/2, 1/2] (fitted by iteratively reweighted least squares
# on the relative error; max relative error 1.9e-9 in float64, ~1e-7 once evaluated in float32).
_P0 = 1.0000000005541696
_P1 = 0.6931472057372623
_P2 = 0.24022646890620336
_P3 = 0.05550328776974902
_P4 = 0.009618488958606888
_P5 = 0.001339993121610906
_P6 = 0.00015345811602529417
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret an int32 as float32 (a bitcast; numba has no scalar ``view``)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 32:
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=True)
def _pow2_f32(z):
    """``2^z`` for float32 ``z`` in [-126, 127]: ``2^k * 2^f`` with ``k = round(z)``,
    ``|f| <= 1/2``, the polynomial for ``2^f`` and ``2^k`` built from its bits."""
    k = np.floor(z + np.float32(0.5))
    f = z - k
    p = np.float32(_P6)
    p = p * f + np.float32(_P5)
    p = p * f + np.float32(_P4)
    p = p * f + np.float32(_P3)
    p = p * f + np.float32(_P2)
    p = p * f + np.float32(_P1)
    p = p * f + np.float32(_P0)
    return p * _bits_to_f32(np.int32((np.int32(k) + np.int32(127)) << np.int32(23)))


def _exp(x):  # pragma: no cover - replaced by the overload inside numba
    return math.exp(x)


@overload(_exp, inline="always")
def _exp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:

        def exp32(x):
            # exp(x) = 2^z, z = x log2(e). Clamping z keeps 2^k a normal float: exp(x < -87.3)
            # returns ~1e-38 instead of 0 (harmless here).
            z = x * np.float32(LOG2E)
            return _pow2_f32(min(max(z, np.float32(-126.0)), np.float32(127.0)))

        return exp32

    def exp_any(x):
        return math.exp(x)

    return exp_any


def _exp2(x):  # pragma: no cover - replaced by the overload inside numba
    return 2.0**x


@overload(_exp2, inline="always")
def _exp2_overload(z):
    """``2^z`` for ``z <= 0`` (the scan's decays, with ``log2(e)`` folded into ``A``): the
    float32 ``_exp`` without its scaling multiply and upper clamp (2 fewer operations per
    state update, which the bare update's speed shows: benchmarks/README.md)."""
    if isinstance(z, types.Float) and z.bitwidth == 32:

        def exp2_32(z):
            return _pow2_f32(max(z, np.float32(-126.0)))

        return exp2_32

    def exp2_any(z):
        return math.exp(z * LN2)

    return exp2_any

@njit(inline="always", fastmath=True)
def _log1p01(y):
    """log(1 + y) for y in [0, 1], vectorisable: 2 atanh(s) with s = y / (2 + y) <= 1/3
    (odd series to s^13; relative error below 2e-8)."""
    s = y / (y + 2)
    s2 = s * s
    p = s2 * (1 / 13) + (1 / 11)
    p = p * s2 + (1 / 9)
    p = p * s2 + (1 / 7)
    p = p * s2 + (1 / 5)
    p = p * s2 + (1 / 3)
    p = p * s2 + 1
    return 2 * s * p
