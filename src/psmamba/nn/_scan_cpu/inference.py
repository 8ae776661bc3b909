"""Inference scan of the ``"cpu"`` backend: the Mamba layer's neighbours fused in (no autograd).

Without autograd the Mamba layer calls two kernels per piece: causal conv + SiLU, and
``softplus(dt_proj(.))`` + scan + ``SiLU(z)`` gate in one pass (no intermediate ``(B, E, l)``
tensors), in one of two layouts:

* **Time-major, vectors over channels** (:func:`conv_silu_tm_cpu`, :func:`fused_scan_tm_cpu`):
  every tensor stays as the tokens arrive, ``(B, l, channels)``, so each projection is a plain
  GEMM. The scan's vectors run over a block of 16 channels (:data:`.chunks.TM_WIDTH`) and its
  inner loop over the N states: N independent recurrences per block and no horizontal sum per
  step. Compiled with the vector width forced to 16 (whole AVX-512 registers) and ``log2(e)``
  folded into ``A`` (``_exp2``); faster than the states-as-vectors kernel where every thread
  gets whole vectors (:func:`.chunks.use_time_major`; figures in ``benchmarks/README.md``).
* **Channels-first, vectors over the N states** (:func:`conv_silu_cpu`, :func:`fused_scan_cpu`),
  the training kernels' layout, for the other cases.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from psmamba.nn import _numba
from psmamba.nn._numba import JIT, KernelFlags, NumbaThreads
from psmamba.nn._numba import as_numpy as _np
from psmamba.nn._scan_cpu import chunks
from psmamba.nn._scan_cpu.mathfn import LOG2E, _exp, _exp2, _log1p01

__all__ = ["conv_silu_cpu", "fused_scan_cpu", "conv_silu_tm_cpu", "fused_scan_tm_cpu"]


# ---------------------------------------------------------------------------------------------
# Channels-first: u, y (B, E, l); xz (B, 2E, l); Bm, Cm (B, l, N); h (B, E, N).
# ---------------------------------------------------------------------------------------------


@njit(**JIT)
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


@njit(**JIT)
def _fused_scan_kernel(u, dt_low, w_dt, b_dt, A, Bm, Cm, D, xz, h0, y, h_last, every, nblk):
    """Inference scan with the Mamba layer's neighbours fused in (one pass, no autograd).

    ``delta = softplus(w_dt @ dt_low + b_dt)`` and the gate ``silu(z)`` are formed per
    channel and chunk in vectorised loops (own exp and log1p), then the scan runs and writes
    ``y = (C_t . h_t + D u_t) * silu(z_t)``, as mamba_ssm's kernel does. Layouts: u, y
    (B, E, l); z = xz[:, E:] with xz (B, 2E, l); dt_low (B, R, l); w_dt (E, R); b_dt, D (E,);
    A (E, N); Bm, Cm (B, l, N); h0, h_last (B, E, N). Units and chunks of ``every`` steps
    as the training forward kernel (:mod:`.training`).
    """
    nb, e, length = u.shape
    n_state = A.shape[1]
    rank = w_dt.shape[1]
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


def conv_silu_cpu(xz: torch.Tensor, hist: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``silu(causal depthwise conv)`` of the x half of ``xz`` (B, 2E, l) for inference, with
    hist (B, E, k-1), weight (E, 1, k), bias (E,) or None -> (B, E, l). No autograd."""
    e = xz.shape[1] // 2
    dtype = xz.dtype
    w = weight.detach().reshape(e, -1).to(dtype).contiguous()
    b = torch.zeros(e, dtype=dtype) if bias is None else bias.detach().to(dtype).contiguous()
    out = torch.empty(xz.shape[0], e, xz.shape[2], dtype=dtype)
    # compiled with LLVM's default flags: no-interleave (see KernelFlags) made it slower
    with NumbaThreads(_numba.threads()):
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
    threads = _numba.threads()
    w_dt, b_dt, A, D = (t.detach().to(dtype).contiguous() for t in (w_dt, b_dt, A, D))
    h0 = torch.zeros(nb, e, n, dtype=dtype) if h0 is None else h0.detach().to(dtype).contiguous()
    y = torch.empty(nb, e, length, dtype=dtype)
    h_last = torch.empty(nb, e, n, dtype=dtype)
    with NumbaThreads(threads), KernelFlags(("fused", dtype)):
        _fused_scan_kernel(
            _np(u.contiguous()), _np(dt_low.contiguous()), _np(w_dt), _np(b_dt), _np(A),
            _np(B_t.contiguous()), _np(C_t.contiguous()), _np(D), _np(xz.contiguous()), _np(h0),
            _np(y), _np(h_last), chunks.CHECKPOINT_EVERY, chunks.blocks(e, threads),
        )
    return y, h_last


# ---------------------------------------------------------------------------------------------
# Time-major: xz (B, l, 2E), xc, y (B, l, E), xdbl (B, l, R + 2N), h (B, N, E).
# The innermost loops run over a block of channels (vectors over channels: no horizontal sum
# per step, N independent recurrences per block).
# ---------------------------------------------------------------------------------------------


@njit(**JIT)
def _conv_silu_tm_kernel(xz, hist, wt, bias, out, blk):
    """``silu(causal depthwise conv)`` of the x half of ``xz``, time-major (inference).

    xz (B, l, 2E) (channels 0..E-1 are x); hist (B, k-1, E) the inputs before it; wt (k, E);
    bias (E,); out (B, l, E). Threads over blocks of ``blk`` steps; vectors over channels.
    """
    nb, length, e = out.shape
    k = wt.shape[0]
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


@njit(**JIT)
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


def conv_silu_tm_cpu(xz: torch.Tensor, hist: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``silu(causal depthwise conv)`` of the x half of ``xz`` (B, l, 2E), time-major, for
    inference; hist (B, k-1, E), weight (E, 1, k), bias (E,) or None -> (B, l, E). No autograd."""
    nb, length, e2 = xz.shape
    e = e2 // 2
    dtype = xz.dtype
    wt = weight.detach().reshape(e, -1).t().to(dtype).contiguous()
    b = torch.zeros(e, dtype=dtype) if bias is None else bias.detach().to(dtype).contiguous()
    out = torch.empty(nb, length, e, dtype=dtype)
    with NumbaThreads(_numba.threads()), KernelFlags(("conv_tm", dtype)):
        _conv_silu_tm_kernel(
            _np(xz.contiguous()), _np(hist.contiguous()), _np(wt), _np(b), _np(out), chunks.CONV_STEPS_PER_JOB
        )
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
    threads = _numba.threads()
    w_dt_t = w_dt.detach().t().to(dtype).contiguous()
    At2 = (A.detach().t() * LOG2E).to(dtype).contiguous()  # exp(dt A) = 2^(dt A log2(e))
    b_dt, D = (t.detach().to(dtype).contiguous() for t in (b_dt, D))
    h0 = torch.zeros(nb, n, e, dtype=dtype) if h0 is None else h0.detach().to(dtype).contiguous()
    y = torch.empty(nb, length, e, dtype=dtype)
    h_last = torch.empty(nb, n, e, dtype=dtype)
    with NumbaThreads(threads), KernelFlags(("fused_tm", dtype), wide=True):
        _fused_scan_tm_kernel(
            _np(xc.contiguous()), _np(xdbl.contiguous()), _np(w_dt_t), _np(b_dt), _np(At2), _np(D),
            _np(xz.contiguous()), _np(h0), _np(y), _np(h_last), chunks.TM_WIDTH,
        )
    return y, h_last
