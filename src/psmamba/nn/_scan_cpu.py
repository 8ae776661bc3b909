"""The ``"cpu"`` selective-scan backend: numba kernels, forward and backward.

Technique (chosen by measurement, see ``benchmarks/bench_scan.py``)
-------------------------------------------------------------------
* **Training: vectors over the N states.** Each channel's state ``h`` (``N = 16`` floats) is the
  vector: one time step is ``h = exp(dt*A) * h + (dt*u) * B_t`` and ``y = C_t . h + D u`` over
  the ``N`` lanes. ``u``, ``delta``, ``y`` stay in mamba_ssm's ``(B, E, L)`` layout (each
  channel's steps contiguous); ``B`` and ``C`` are read time-major, ``(B, L, N)``, one row per
  step.
* **A vectorisable exp.** Without Intel SVML (which current numba/llvmlite wheels do not use)
  LLVM calls scalar ``expf`` once per state element, and the scan becomes exp-bound. ``_exp``
  below is written in plain arithmetic (range reduction to ``2^k * 2^f`` with a degree-6
  polynomial for ``2^f`` on ``[-1/2, 1/2]`` and ``2^k`` built from its bits), so LLVM vectorises
  it. Its relative error is ~1e-7, the size of float32 rounding. float64 uses ``math.exp``
  (the float64 path exists for ``gradcheck``, not for speed).
* **No interleaving.** The kernels are compiled with LLVM's ``-force-vector-interleave=1``
  (see ``_VECTOR_FLAGS``): by default LLVM processes 32 elements per vector iteration, more
  than ``N = 16``, and the loops then ran scalar.
* **Threads over (batch, channel block) units.** Each unit scans the whole sequence for its
  channels, ``K`` steps at a time, running its channels one after the other inside a chunk
  so that the chunk's rows of ``B``/``C`` come from cache; the units run in a numba ``prange``.
* **Memory that does not grow with L x E x N.** The forward pass keeps the state only every
  ``K`` steps (checkpoints ``(B, L/K, E, N)``; none in inference). The backward pass walks
  the chunks from the last; inside a chunk it recomputes the states and decays from the
  checkpoint into per-unit buffers ``(K, N)``, runs the adjoint recurrence
  ``G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1}`` backwards (the only sequential part), then
  forms the gradients in vectorised passes. ``dB`` and ``dC`` are sums over channels, so each
  unit adds its channels' parts into its own rows of a bounded ``(units, S, N)`` buffer,
  summed once per sync block of ``S`` steps: no write races, few thread barriers.
* **Inference: time-major, vectors over channels.** Without autograd the Mamba layer keeps
  every tensor as the tokens arrive, ``(B, L, channels)``, so each projection is a plain GEMM,
  and calls two kernels: causal conv + SiLU, and ``softplus(dt_proj(.))`` + scan + ``SiLU(z)``
  gate in one pass. The scan's vectors run over a block of 16 channels (``TM_WIDTH``) and its
  inner loop over the N states: N independent recurrences per block and no horizontal sum per
  step. Compiled with the vector width forced to 16 (whole AVX-512 registers) and ``log2(e)``
  folded into ``A`` (``_exp2``), the bare update runs at 2.3-2.9 G state updates/s on this
  machine's 2 cores against 1.2-1.9 for the states-as-vectors kernel (measured side by side);
  the Mamba layer at level 1 (160x192x160) went from 4.6 s to 2.0-2.5 s.

Gradients (``a_t = exp(dt_t A)``; ``G_t`` = gradient of the loss w.r.t. ``h_t``)::

    dC[t, n]  = sum_e dy_t h_t                  dB[t, n] = sum_e G_t dt_t u_t
    d dt_t    = sum_n G_t (h_{t-1} a_t A + B_t u_t)
    dA[e, n]  = sum_t G_t h_{t-1} a_t dt_t
    du_t      = sum_n G_t dt_t B_t + D dy_t     dD = sum_t dy_t u_t
    dh0       = a_1 G_1

The first call compiles the kernels (tens of seconds per dtype on a 2-core machine);
``cache=True`` keeps the machine code on disk (``__pycache__``, or numba's user cache when
the package folder is read-only), so later processes load it in about a second.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core.compiler_lock import global_compiler_lock
from numba.extending import intrinsic, overload

__all__ = ["scan_cpu", "SelectiveScanCPU", "CHECKPOINT_EVERY"]

#: forward checkpoint interval and time-chunk length (steps); backward buffers are (K, N) per unit
CHECKPOINT_EVERY = 1024

# ---------------------------------------------------------------------------------------------
# exp that LLVM can vectorise
# ---------------------------------------------------------------------------------------------

# Near-minimax polynomial for 2^f on [-1/2, 1/2] (fitted by iteratively reweighted least squares
# on the relative error; max relative error 1.9e-9 in float64, ~1e-7 once evaluated in float32).
_P0 = 1.0000000005541696
_P1 = 0.6931472057372623
_P2 = 0.24022646890620336
_P3 = 0.05550328776974902
_P4 = 0.009618488958606888
_P5 = 0.001339993121610906
_P6 = 0.00015345811602529417
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


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
            z = x * np.float32(_LOG2E)
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
    state update; bare update 1.9 -> 2.3-2.9 G/s, measured)."""
    if isinstance(z, types.Float) and z.bitwidth == 32:

        def exp2_32(z):
            return _pow2_f32(max(z, np.float32(-126.0)))

        return exp2_32

    def exp2_any(z):
        return math.exp(z * _LN2)

    return exp2_any


_JIT = dict(parallel=True, fastmath=True, cache=True, nogil=True)

# The kernels' inner loops run over the N = 16 states, a trip count LLVM cannot see. Left to
# itself it vectorises them 8 wide and interleaves 4 times (32 elements per iteration), so a
# 16-long loop never enters the vector body and runs scalar. Compiling without interleaving
# (8 wide, two iterations for N = 16) doubles the speed (measured, the in-cache update of
# benchmarks/bench_scan.py: 0.59 -> 1.31 G updates per CPU-second). This is one of LLVM's
# global command-line options: it is set only while our kernels compile (under numba's
# compiler lock) and reset to LLVM's default (0 = "not forced") afterwards. (Forcing the
# width as well made LLVM print "loop not vectorized" warnings for every other loop.)
_VECTOR_FLAGS = ("-force-vector-interleave=1",)
# The time-major inference scan runs its vectors over a block of 16 channels: forcing the
# width to 16 lets LLVM use whole AVX-512 registers there (it prefers 256-bit vectors on its
# own). 1.52 -> 2.03 G updates/s for the bare scan update on this machine's Xeon, measured.
_WIDE_FLAGS = ("-force-vector-width=16",)
_DEFAULT_FLAGS = ("-force-vector-interleave=0", "-force-vector-width=0")
_compiled: set = set()


class _KernelFlags:
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
            for opt in _VECTOR_FLAGS + (_WIDE_FLAGS if self.wide else ()):
                llvm.set_option("", opt)
            if self.wide:
                self._quiet_start()
        return self

    def __exit__(self, *exc):
        if self.active:
            if self.wide:
                self._quiet_end()
            for opt in _DEFAULT_FLAGS:
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


# ---------------------------------------------------------------------------------------------
# Kernels. Layouts: u, dt, y, du, ddt (B, E, L); Bm, Cm, dB, dC (B, L, N); A (E, N); D (E,);
# h0, h_last (B, E, N); ckpt (B, chunks, E, N). The innermost loops run over the N states.
# ---------------------------------------------------------------------------------------------


@njit(**_JIT)
def _forward_kernel(u, dt, A, Bm, Cm, D, h0, y, h_last, ckpt, every, nblk):
    """Scan each (batch, channel block) unit over the whole sequence, ``every`` steps at a time.

    Within a time chunk the unit runs its channels one after the other, so the chunk's rows of
    ``Bm``/``Cm`` (shared by all channels) are read from cache. ``ckpt`` receives the state at
    the start of every chunk when it has rows (training); with zero rows nothing is saved.
    """
    nb, e, length = u.shape
    n_state = A.shape[1]
    ch = (e + nblk - 1) // nblk
    save = ckpt.shape[1] > 0
    for unit in prange(nb * nblk):
        b = unit // nblk
        e_lo = (unit % nblk) * ch
        e_hi = min(e, e_lo + ch)
        h = np.empty((max(e_hi - e_lo, 0), n_state), dtype=u.dtype)
        for i in range(e_hi - e_lo):
            for n in range(n_state):
                h[i, n] = h0[b, e_lo + i, n]
        for t0 in range(0, length, every):
            t1 = min(length, t0 + every)
            for i in range(e_hi - e_lo):
                ee = e_lo + i
                hv = h[i]
                a_e = A[ee]
                d_e = D[ee]
                if save:
                    for n in range(n_state):
                        ckpt[b, t0 // every, ee, n] = hv[n]
                for t in range(t0, t1):
                    d = dt[b, ee, t]
                    x = u[b, ee, t]
                    dx = d * x
                    acc = d_e * x
                    for n in range(n_state):
                        v = _exp(d * a_e[n]) * hv[n] + dx * Bm[b, t, n]
                        hv[n] = v
                        acc += Cm[b, t, n] * v
                    y[b, ee, t] = acc
        for i in range(e_hi - e_lo):
            for n in range(n_state):
                h_last[b, e_lo + i, n] = h[i, n]


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


@njit(**_JIT)
def _conv_silu_kernel(xz, hist, w, bias, out):
    """Causal depthwise convolution of the x half of ``xz`` (inference; SiLU is the caller's).

    ``xz`` (B, 2E, l) is in_proj's output (channels 0..E-1 are x); hist (B, E, k-1) the
    inputs before it; w (E, k); bias (E,); out (B, E, l) = conv(hist ++ x).
    """
    nb, e, length = out.shape
    k = w.shape[1]
    for be in prange(nb * e):
        b = be // e
        c = be % e
        for t in range(min(k - 1, length)):  # the first outputs also read the history
            acc = bias[c]
            for j in range(k):
                src = t + j - (k - 1)
                if src >= 0:
                    acc += w[c, j] * xz[b, c, src]
                else:
                    acc += w[c, j] * hist[b, c, k - 1 + src]
            out[b, c, t] = acc
        row = xz[b, c]
        orow = out[b, c]
        wc = w[c]
        bc = bias[c]
        if k == 4:
            # Mamba's d_conv: the taps written out vectorise (a runtime-length inner loop
            # over the taps did not: 5x slower). SiLU is applied by the caller (torch's
            # vectorised silu_ was faster than an exp loop here, measured).
            w0, w1, w2, w3 = wc[0], wc[1], wc[2], wc[3]
            for t in range(3, length):
                orow[t] = bc + w0 * row[t - 3] + w1 * row[t - 2] + w2 * row[t - 1] + w3 * row[t]
        else:
            for t in range(k - 1, length):
                acc = bc
                for j in range(k):
                    acc += wc[j] * row[t + j - (k - 1)]
                orow[t] = acc


@njit(**_JIT)
def _fused_scan_kernel(u, dt_low, w_dt, b_dt, A, Bm, Cm, D, xz, h0, y, h_last, nblk):
    """Inference scan with the Mamba layer's neighbours fused in (one pass, no autograd).

    ``delta = softplus(w_dt @ dt_low + b_dt)`` and the gate ``silu(z)`` are formed per
    channel and chunk in vectorised loops (own exp and log1p), then the scan runs and writes
    ``y = (C_t . h_t + D u_t) * silu(z_t)``, as mamba_ssm's kernel does. Layouts: u, y
    (B, E, l); z = xz[:, E:] with xz (B, 2E, l); dt_low (B, R, l); w_dt (E, R); b_dt, D (E,);
    A (E, N); Bm, Cm (B, l, N); h0, h_last (B, E, N). Units and chunks as
    :func:`_forward_kernel`.
    """
    nb, e, length = u.shape
    n_state = A.shape[1]
    rank = w_dt.shape[1]
    every = 1024
    ch = (e + nblk - 1) // nblk
    one = np.ones(1, dtype=u.dtype)[0]
    for unit in prange(nb * nblk):
        b = unit // nblk
        e_lo = (unit % nblk) * ch
        e_hi = min(e, e_lo + ch)
        h = np.empty((max(e_hi - e_lo, 0), n_state), dtype=u.dtype)
        dbuf = np.empty(every, dtype=u.dtype)
        gbuf = np.empty(every, dtype=u.dtype)
        for i in range(e_hi - e_lo):
            for n in range(n_state):
                h[i, n] = h0[b, e_lo + i, n]
        for t0 in range(0, length, every):
            t1 = min(length, t0 + every)
            for i in range(e_hi - e_lo):
                ee = e_lo + i
                hv = h[i]
                a_e = A[ee]
                d_e = D[ee]
                zrow = xz[b, e + ee]
                # delta and the gate for the whole chunk (independent across steps)
                for s in range(t1 - t0):
                    dbuf[s] = b_dt[ee]
                for r in range(rank):
                    wr = w_dt[ee, r]
                    drow = dt_low[b, r]
                    for s in range(t1 - t0):
                        dbuf[s] += wr * drow[t0 + s]
                for s in range(t1 - t0):
                    pre = dbuf[s]
                    # softplus(x) = max(x, 0) + log1p(exp(-|x|))
                    dbuf[s] = max(pre, pre - pre) + _log1p01(_exp(-abs(pre)))
                    zz = zrow[t0 + s]
                    gbuf[s] = zz / (one + _exp(-zz))
                for t in range(t0, t1):
                    d = dbuf[t - t0]
                    x = u[b, ee, t]
                    dx = d * x
                    acc = d_e * x
                    for n in range(n_state):
                        v = _exp(d * a_e[n]) * hv[n] + dx * Bm[b, t, n]
                        hv[n] = v
                        acc += Cm[b, t, n] * v
                    y[b, ee, t] = acc * gbuf[t - t0]
        for i in range(e_hi - e_lo):
            for n in range(n_state):
                h_last[b, e_lo + i, n] = h[i, n]


# ---------------------------------------------------------------------------------------------
# Inference kernels, time-major: xz (B, l, 2E), xc, y (B, l, E), xdbl (B, l, R + 2N), h (B, N, E).
# The innermost loops run over a block of channels (vectors over channels: no horizontal sum
# per step, N independent recurrences per block).
# ---------------------------------------------------------------------------------------------

#: channels per unit of the inference scan: one AVX-512 vector of float32
TM_WIDTH = 16


@njit(**_JIT)
def _conv_silu_tm_kernel(xz, hist, wt, bias, out):
    """``silu(causal depthwise conv)`` of the x half of ``xz``, time-major (inference).

    xz (B, l, 2E) (channels 0..E-1 are x); hist (B, k-1, E) the inputs before it; wt (k, E);
    bias (E,); out (B, l, E). Threads over blocks of steps; vectors over channels.
    """
    nb, length, e = out.shape
    k = wt.shape[0]
    blk = 2048
    nbt = (length + blk - 1) // blk
    one = np.ones(1, dtype=out.dtype)[0]
    for job in prange(nb * nbt):
        b = job // nbt
        t0 = (job % nbt) * blk
        t1 = min(length, t0 + blk)
        for t in range(t0, t1):
            orow = out[b, t]
            for c in range(e):
                orow[c] = bias[c]
            for j in range(k):
                src = t + j - (k - 1)
                wj = wt[j]
                if src >= 0:
                    row = xz[b, src, :e]
                else:
                    row = hist[b, k - 1 + src]
                for c in range(e):
                    orow[c] += wj[c] * row[c]
            for c in range(e):
                v = orow[c]
                orow[c] = v / (one + _exp(-v))


@njit(**_JIT)
def _fused_scan_tm_kernel(xc, xdbl, w_dt_t, b_dt, At2, D, xz, h0, y, h_last, width):
    """Inference scan with the Mamba layer's neighbours fused in, time-major (no autograd).

    Per step and channel: ``delta = softplus(dt_low . w_dt + b_dt)`` (``dt_low``, ``B_t``,
    ``C_t`` are the first R, next N and last N values of the step's ``xdbl`` row), the scan
    update of the N states, and ``y = (C_t . h_t + D x_t) * silu(z_t)`` as mamba_ssm's kernel.
    xc, y (B, l, E); xdbl (B, l, R + 2N); w_dt_t (R, E); b_dt, D (E,); At2 (N, E) = log2(e) A^T;
    z = xz[..., E:] with xz (B, l, 2E); h0, h_last (B, N, E). Units: (batch, block of
    ``width`` <= TM_WIDTH channels), each scanning the whole sequence, in a numba prange.
    """
    nb, length, e = xc.shape
    n_state = At2.shape[0]
    rank = w_dt_t.shape[0]
    units = (e + width - 1) // width
    one = np.ones(1, dtype=xc.dtype)[0]
    for job in prange(nb * units):
        b = job // units
        lo = (job % units) * width
        wu = min(width, e - lo)
        # the unit's parameters and state, copied into small contiguous blocks
        h = np.empty((n_state, wu), dtype=xc.dtype)
        a = np.empty((n_state, wu), dtype=xc.dtype)
        wdt = np.empty((rank, wu), dtype=xc.dtype)
        bdt = b_dt[lo : lo + wu].copy()
        dsk = D[lo : lo + wu].copy()
        acc = np.empty(wu, dtype=xc.dtype)
        dx = np.empty(wu, dtype=xc.dtype)
        dd = np.empty(wu, dtype=xc.dtype)
        for n in range(n_state):
            for j in range(wu):
                h[n, j] = h0[b, n, lo + j]
                a[n, j] = At2[n, lo + j]
        for r in range(rank):
            for j in range(wu):
                wdt[r, j] = w_dt_t[r, lo + j]
        for t in range(length):
            xrow = xc[b, t, lo : lo + wu]
            zrow = xz[b, t, e + lo : e + lo + wu]
            drow = xdbl[b, t]
            for j in range(wu):
                dd[j] = bdt[j]
            for r in range(rank):
                dr = drow[r]
                for j in range(wu):
                    dd[j] += dr * wdt[r, j]
            for j in range(wu):
                pre = dd[j]
                # softplus(x) = max(x, 0) + log1p(exp(-|x|))
                d = max(pre, pre - pre) + _log1p01(_exp(-abs(pre)))
                x = xrow[j]
                dd[j] = d
                dx[j] = d * x
                acc[j] = dsk[j] * x
            for n in range(n_state):
                bn = drow[rank + n]
                cn = drow[rank + n_state + n]
                for j in range(wu):
                    v = _exp2(dd[j] * a[n, j]) * h[n, j] + dx[j] * bn
                    h[n, j] = v
                    acc[j] += cn * v
            yrow = y[b, t, lo : lo + wu]
            for j in range(wu):
                zz = zrow[j]
                yrow[j] = acc[j] * zz / (one + _exp(-zz))
        for n in range(n_state):
            for j in range(wu):
                h_last[b, n, lo + j] = h[n, j]


@njit(**_JIT)
def _backward_kernel(u, dt, A, Bm, Cm, D, ckpt, every, sync, nblk, dy, g_state,
                     du, ddt, dA64, dB, dC, dD64):
    """Adjoint scan from the end, recomputing the states of each chunk from its checkpoint.

    Time is walked in sync blocks of ``sync`` steps (a multiple of the checkpoint interval
    ``every``), newest first. In a block every unit runs, channel by channel and chunk by
    chunk (newest first), the recomputation and the adjoint, adding its channels' parts of
    dB and dC into its own rows; the units meet once per block (one thread barrier), where the
    previous block's parts are summed. Few barriers matter on a shared machine, where a
    barrier can wait a whole scheduler time slice for a descheduled thread.

    ``g_state`` (B, E, N) holds the gradient w.r.t. the final state on entry and the gradient
    w.r.t. ``h0`` on exit (it carries ``a_{t+1} G_{t+1}`` between chunks). Outputs: du, ddt
    (B, E, L); dB, dC (B, L, N); dA64 (B, E, N) and dD64 (B, E) in float64, summed over time
    here and over the batch by the caller (both must be zero on entry).
    """
    nb, e, length = u.shape
    n_state = A.shape[1]
    ch = (e + nblk - 1) // nblk
    nunits = nb * nblk
    nsync = (length + sync - 1) // sync
    # per-unit partial sums of dB and dC over the unit's channels, double-buffered: while the
    # units fill one set for block k, they also sum the other set (block k + 1) into dB, dC
    part_b = np.empty((2, nunits, sync, n_state), dtype=u.dtype)
    part_c = np.empty((2, nunits, sync, n_state), dtype=u.dtype)
    # per-unit recomputation buffers for one chunk: states h_{t-1}, h_t, decays exp(dt_t A), G_t
    hbuf = np.empty((nunits, every + 1, n_state), dtype=u.dtype)
    abuf = np.empty((nunits, every, n_state), dtype=u.dtype)
    gbuf = np.empty((nunits, every, n_state), dtype=u.dtype)
    gabuf = np.empty((nunits, 1, n_state), dtype=u.dtype)  # dA of one channel over one chunk

    for k in range(nsync - 1, -1, -1):
        t_lo = k * sync
        t_hi = min(length, t_lo + sync)
        c_lo = t_lo // every
        c_hi = (t_hi + every - 1) // every
        for unit in prange(nunits):
            b = unit // nblk
            e_lo = (unit % nblk) * ch
            e_hi = min(e, e_lo + ch)
            if k + 1 < nsync:  # this unit's share of the rows of the previous (later) block
                prev_steps = min(sync, length - (k + 1) * sync)
                rows = nb * prev_steps
                _reduce_parts(part_b[(k + 1) % 2], part_c[(k + 1) % 2], dB, dC, nblk, prev_steps,
                              (k + 1) * sync, rows * unit // nunits, rows * (unit + 1) // nunits)
            pb = part_b[k % 2, unit]
            pc = part_c[k % 2, unit]
            hb = hbuf[unit]
            ab = abuf[unit]
            ga = gabuf[unit, 0]
            gb = gbuf[unit]
            for r in range(t_hi - t_lo):
                for n in range(n_state):
                    pb[r, n] = 0.0
                    pc[r, n] = 0.0
            for i in range(e_hi - e_lo):
                ee = e_lo + i
                a_e = A[ee]
                g = g_state[b, ee]
                d_sum = 0.0
                for c in range(c_hi - 1, c_lo - 1, -1):
                    t0 = c * every
                    steps = min(every, length - t0)
                    r0 = t0 - t_lo  # row of t0 in this block's parts
                    for n in range(n_state):
                        hb[0, n] = ckpt[b, c, ee, n]
                        ga[n] = 0.0
                    # recompute the chunk's states and decays
                    for s in range(steps):
                        t = t0 + s
                        d = dt[b, ee, t]
                        dx = d * u[b, ee, t]
                        for n in range(n_state):
                            a = _exp(d * a_e[n])
                            ab[s, n] = a
                            hb[s + 1, n] = a * hb[s, n] + dx * Bm[b, t, n]
                    # The adjoint recurrence, newest step first: the only sequential part.
                    # g holds a_{t+1} G_{t+1} on entry to step t and a_t G_t on exit.
                    for s in range(steps - 1, -1, -1):
                        t = t0 + s
                        gy = dy[b, ee, t]
                        for n in range(n_state):
                            gn = g[n] + Cm[b, t, n] * gy  # G_t
                            gb[s, n] = gn
                            g[n] = ab[s, n] * gn
                    # Everything else is independent across steps (short loops, one written
                    # array each, which LLVM vectorises).
                    for s in range(steps):
                        t = t0 + s
                        d = dt[b, ee, t]
                        x = u[b, ee, t]
                        gy = dy[b, ee, t]
                        dx = d * x
                        s_da = gy - gy  # zero of the input dtype (a literal 0.0 would be float64)
                        s_gb = s_da
                        for n in range(n_state):
                            gh = gb[s, n] * hb[s, n] * ab[s, n]  # dL/d(dt_t A_n) = G_t h_{t-1} a_t
                            s_da += gh * a_e[n]
                            s_gb += gb[s, n] * Bm[b, t, n]
                        for n in range(n_state):
                            ga[n] += gb[s, n] * hb[s, n] * ab[s, n] * d
                        for n in range(n_state):
                            pc[r0 + s, n] += gy * hb[s + 1, n]
                        for n in range(n_state):
                            pb[r0 + s, n] += gb[s, n] * dx
                        ddt[b, ee, t] = s_da + s_gb * x
                        du[b, ee, t] = s_gb * d + D[ee] * gy
                        d_sum += gy * x
                    for n in range(n_state):
                        dA64[b, ee, n] += ga[n]
                dD64[b, ee] += d_sum
    # the first block's rows (no later block left to sum them)
    if nsync > 0:
        steps = min(sync, length)
        rows = nb * steps
        for unit in prange(nunits):
            _reduce_parts(part_b[0], part_c[0], dB, dC, nblk, steps, 0,
                          rows * unit // nunits, rows * (unit + 1) // nunits)


@njit(fastmath=True, cache=True, nogil=True)
def _reduce_parts(pb, pc, dB, dC, nblk, steps, t0, lo, hi):
    """dB[b, t0 + s] = sum over the units of batch item b of their parts, for rows lo..hi-1
    of the (b, s) rows of one chunk; pb, pc are (units, chunk, N)."""
    n_state = pb.shape[2]
    for idx in range(lo, hi):
        b = idx // steps
        s = idx % steps
        for n in range(n_state):
            dB[b, t0 + s, n] = pb[b * nblk, s, n]
            dC[b, t0 + s, n] = pc[b * nblk, s, n]
        for k in range(1, nblk):
            for n in range(n_state):
                dB[b, t0 + s, n] += pb[b * nblk + k, s, n]
                dC[b, t0 + s, n] += pc[b * nblk + k, s, n]


def _threads() -> int:
    """Use as many numba threads as torch is allowed (respects torch.set_num_threads)."""
    return max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads()))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class SelectiveScanCPU(torch.autograd.Function):
    """``(y, h_last) = scan(u, delta, A, B, C, D, h0)`` with the numba kernels (see module doc)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, h0):  # noqa: D102 - documented on the class
        nb, e, length = u.shape
        n = A.shape[1]
        dtype = u.dtype
        threads = _threads()
        nblk = _blocks(e, threads)
        u_c = u.detach().contiguous()
        dt_c = delta.detach().contiguous()
        A_c = A.detach().contiguous()
        Bt = B.detach().transpose(1, 2).contiguous()  # (B, L, N): one row per time step
        Ct = C.detach().transpose(1, 2).contiguous()
        D_c = torch.zeros(e, dtype=dtype) if D is None else D.detach().contiguous()
        h0_c = torch.zeros(nb, e, n, dtype=dtype) if h0 is None else h0.detach().contiguous()
        # grad mode is off inside forward; needs_input_grad says whether a backward will come
        training = any(ctx.needs_input_grad)
        every = CHECKPOINT_EVERY
        ckpt = torch.empty(nb, -(-length // every) if training else 0, e, n, dtype=dtype)
        y = torch.empty(nb, e, length, dtype=dtype)
        h_last = torch.empty(nb, e, n, dtype=dtype)
        with _NumbaThreads(threads), _KernelFlags(("forward", dtype)):
            _forward_kernel(
                _np(u_c), _np(dt_c), _np(A_c), _np(Bt), _np(Ct), _np(D_c), _np(h0_c),
                _np(y), _np(h_last), _np(ckpt), every, nblk,
            )
        if training:
            ctx.save_for_backward(u_c, dt_c, A_c, Bt, Ct, D_c, ckpt)
            ctx.every = every
            ctx.has_d = D is not None
            ctx.has_h0 = h0 is not None
        return y, h_last

    @staticmethod
    def backward(ctx, dy, dh_last):  # noqa: D102
        u_c, dt_c, A_c, Bt, Ct, D_c, ckpt = ctx.saved_tensors
        nb, e, length = u_c.shape
        n = A_c.shape[1]
        dtype = u_c.dtype
        threads = _threads()
        nblk = _blocks(e, threads)
        dy = torch.zeros_like(u_c) if dy is None else dy.to(dtype).contiguous()
        g_state = (  # written by the kernel: must own contiguous memory
            torch.zeros(nb, e, n, dtype=dtype)
            if dh_last is None
            else dh_last.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        )
        du = torch.empty_like(u_c)
        ddt = torch.empty_like(u_c)
        dB = torch.empty(nb, length, n, dtype=dtype)
        dC = torch.empty(nb, length, n, dtype=dtype)
        dA64 = torch.zeros(nb, e, n, dtype=torch.float64)
        dD64 = torch.zeros(nb, e, dtype=torch.float64)
        with _NumbaThreads(threads), _KernelFlags(("backward", dtype)):
            _backward_kernel(
                _np(u_c), _np(dt_c), _np(A_c), _np(Bt), _np(Ct), _np(D_c), _np(ckpt),
                ctx.every, _sync_steps(ctx.every, nb * nblk, n), nblk,
                _np(dy), _np(g_state), _np(du), _np(ddt),
                _np(dA64), _np(dB), _np(dC), _np(dD64),
            )
        g_D = dD64.sum(0).to(dtype) if ctx.has_d else None
        g_h0 = g_state if ctx.has_h0 else None
        return du, ddt, dA64.sum(0).to(dtype), dB.transpose(1, 2), dC.transpose(1, 2), g_D, g_h0


#: memory for the backward's per-unit dB/dC parts (bytes); sets the steps between barriers
SYNC_BUDGET = 32 * 2**20


def _sync_steps(every: int, units: int, n: int) -> int:
    """Steps per backward sync block: a multiple of ``every`` whose dB/dC parts (2 sets of
    2 x units x steps x N float32) fit in :data:`SYNC_BUDGET`."""
    per_step = 2 * 2 * units * n * 4
    return every * max(1, SYNC_BUDGET // (per_step * every))


def _blocks(e: int, threads: int) -> int:
    """Channel blocks per batch item: a few per thread for balance, several channels per block
    so that a time chunk of B and C is reused from cache by each of them."""
    return max(1, min(e, 2 * threads))


class _NumbaThreads:
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


def scan_cpu(u, delta, A, B, C, D, h0):
    """Backend entry point for :func:`psmamba.nn.scan.selective_scan` (CPU tensors only)."""
    from psmamba.errors import PsmambaError

    if u.device.type != "cpu":
        raise PsmambaError(f"selective_scan backend 'cpu' needs CPU tensors, they are on {u.device}")
    if u.dtype not in (torch.float32, torch.float64):
        raise PsmambaError(f"selective_scan backend 'cpu' computes in float32/float64, got {u.dtype}")
    return SelectiveScanCPU.apply(u, delta, A, B, C, D, h0)


def use_time_major(e: int, batch: int, threads: int) -> bool:
    """Whether inference takes the time-major kernels: only when the channels split into whole
    16-channel vectors (:data:`TM_WIDTH`) and that gives every thread a unit. Otherwise (fewer
    or odd channels, many cores) the channels-first kernels with vectors over the N states are
    faster: a time-major unit narrower than a vector runs scalar."""
    return e % TM_WIDTH == 0 and (e // TM_WIDTH) * batch >= threads


def conv_silu_tm_cpu(xz: torch.Tensor, hist: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``silu(causal depthwise conv)`` of the x half of ``xz`` (B, l, 2E), time-major, for
    inference; hist (B, k-1, E), weight (E, 1, k), bias (E,) or None -> (B, l, E). No autograd."""
    nb, length, e2 = xz.shape
    e = e2 // 2
    dtype = xz.dtype
    wt = weight.detach().reshape(e, -1).t().to(dtype).contiguous()
    b = torch.zeros(e, dtype=dtype) if bias is None else bias.detach().to(dtype).contiguous()
    out = torch.empty(nb, length, e, dtype=dtype)
    with _NumbaThreads(_threads()), _KernelFlags(("conv_tm", dtype)):
        _conv_silu_tm_kernel(_np(xz.contiguous()), _np(hist.contiguous()), _np(wt), _np(b), _np(out))
    return out


def fused_scan_tm_cpu(xc, xdbl, w_dt, b_dt, A, D, xz, h0):
    """Inference-only fused scan, time-major (see :func:`_fused_scan_tm_kernel`); no autograd.

    xc (B, l, E); xdbl (B, l, R + 2N) (dt_low, B_t, C_t); w_dt (E, R); b_dt, D (E,); A (E, N);
    xz (B, l, 2E) whose second half is z; h0 (B, N, E) or None.
    Returns ``(y (B, l, E), h_last (B, N, E))``.
    """
    nb, length, e = xc.shape
    n = A.shape[1]
    dtype = xc.dtype
    threads = _threads()
    w_dt_t = w_dt.detach().t().to(dtype).contiguous()
    At2 = (A.detach().t() * _LOG2E).to(dtype).contiguous()  # exp(dt A) = 2^(dt A log2(e))
    b_dt, D = (t.detach().to(dtype).contiguous() for t in (b_dt, D))
    h0 = torch.zeros(nb, n, e, dtype=dtype) if h0 is None else h0.detach().to(dtype).contiguous()
    y = torch.empty(nb, length, e, dtype=dtype)
    h_last = torch.empty(nb, n, e, dtype=dtype)
    with _NumbaThreads(threads), _KernelFlags(("fused_tm", dtype), wide=True):
        _fused_scan_tm_kernel(
            _np(xc.contiguous()), _np(xdbl.contiguous()), _np(w_dt_t), _np(b_dt), _np(At2), _np(D),
            _np(xz.contiguous()), _np(h0), _np(y), _np(h_last), TM_WIDTH,
        )
    return y, h_last


def conv_silu_cpu(xz: torch.Tensor, hist: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``silu(causal depthwise conv)`` of the x half of ``xz`` (B, 2E, l) for inference, with
    hist (B, E, k-1), weight (E, 1, k), bias (E,) or None -> (B, E, l). No autograd."""
    e = xz.shape[1] // 2
    dtype = xz.dtype
    w = weight.detach().reshape(e, -1).to(dtype).contiguous()
    b = torch.zeros(e, dtype=dtype) if bias is None else bias.detach().to(dtype).contiguous()
    out = torch.empty(xz.shape[0], e, xz.shape[2], dtype=dtype)
    # compiled with LLVM's default flags: no-interleave (see _KernelFlags) made it 4x slower
    with _NumbaThreads(_threads()):
        _conv_silu_kernel(_np(xz.contiguous()), _np(hist.contiguous()), _np(w), _np(b), _np(out))
    return torch.nn.functional.silu(out, inplace=True)


def fused_scan_cpu(u, dt_low, w_dt, b_dt, A, B_t, C_t, D, xz, h0):
    """Inference-only fused scan (see :func:`_fused_scan_kernel`); no autograd.

    u (B, E, l); dt_low (B, R, l); w_dt (E, R); b_dt (E,); A (E, N); B_t, C_t (B, l, N);
    D (E,); xz (B, 2E, l) whose second half is z; h0 (B, E, N) or None.
    Returns ``(y (B, E, l), h_last (B, E, N))``.
    """
    nb, e, length = u.shape
    n = A.shape[1]
    dtype = u.dtype
    threads = _threads()
    w_dt, b_dt, A, D = (t.detach().to(dtype).contiguous() for t in (w_dt, b_dt, A, D))
    h0 = torch.zeros(nb, e, n, dtype=dtype) if h0 is None else h0.detach().to(dtype).contiguous()
    y = torch.empty(nb, e, length, dtype=dtype)
    h_last = torch.empty(nb, e, n, dtype=dtype)
    with _NumbaThreads(threads), _KernelFlags(("fused", dtype)):
        _fused_scan_kernel(
            _np(u.contiguous()), _np(dt_low.contiguous()), _np(w_dt), _np(b_dt), _np(A),
            _np(B_t.contiguous()), _np(C_t.contiguous()), _np(D), _np(xz.contiguous()), _np(h0),
            _np(y), _np(h_last), _blocks(e, threads),
        )
    return y, h_last
