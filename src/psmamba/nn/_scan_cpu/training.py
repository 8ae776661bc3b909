"""Training scan of the ``"cpu"`` backend: numba forward and backward kernels and the autograd
formula around them (``torch.library`` custom ops, so ``torch.compile`` treats a scan as one
opaque node).

Technique (chosen by measurement, see ``benchmarks/bench_scan.py`` and ``benchmarks/README.md``)
--------------------------------------------------------------------------------------------
* **Vectors over the N states.** Each channel's state ``h`` (``N = 16`` floats) is the vector:
  one time step is ``h = exp(dt*A) * h + (dt*u) * B_t`` and ``y = C_t . h + D u`` over the
  ``N`` lanes. ``u``, ``delta``, ``y`` stay in mamba_ssm's ``(B, E, L)`` layout (each
  channel's steps contiguous); ``B`` and ``C`` are read time-major, ``(B, L, N)``, one row per
  step. The exp is the vectorisable one of :mod:`.mathfn`, and the kernels are compiled
  without LLVM's interleaving (:class:`psmamba.nn._numba.KernelFlags`).
* **Threads over (batch, channel block) units.** Each unit scans the whole sequence for its
  channels, ``K`` steps at a time, running its channels one after the other inside a chunk
  so that the chunk's rows of ``B``/``C`` come from cache; the units run in a numba ``prange``.
* **Memory that does not grow with L x E x N.** The forward pass keeps the state only every
  ``K`` steps (checkpoints ``(B, L/K, E, N)``; none in inference), ``K`` =
  :data:`.chunks.CHECKPOINT_EVERY`. The backward pass walks the chunks from the last; inside
  a chunk it recomputes the states and decays from the checkpoint into per-unit buffers
  ``(K, N)``, runs the adjoint recurrence ``G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1}``
  backwards (the only sequential part), then forms the gradients in vectorised passes. ``dB``
  and ``dC`` are sums over channels, so each unit adds its channels' parts into its own rows
  of a bounded ``(units, S, N)`` buffer, summed once per sync block of ``S`` steps: no write
  races, few thread barriers.

Gradients (``a_t = exp(dt_t A)``; ``G_t`` = gradient of the loss w.r.t. ``h_t``)::

    dC[t, n]  = sum_e dy_t h_t                  dB[t, n] = sum_e G_t dt_t u_t
    d dt_t    = sum_n G_t (h_{t-1} a_t A + B_t u_t)
    dA[e, n]  = sum_t G_t h_{t-1} a_t dt_t
    du_t      = sum_n G_t dt_t B_t + D dy_t     dD = sum_t dy_t u_t
    dh0       = a_1 G_1
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from psmamba.nn import _numba
from psmamba.nn._numba import JIT, KernelFlags, NumbaThreads
from psmamba.nn._numba import as_numpy as _np
from psmamba.nn._scan_cpu import chunks
from psmamba.nn._scan_cpu.mathfn import _exp

__all__ = ["scan_cpu"]

# Layouts: u, dt, y, du, ddt (B, E, L); Bm, Cm, dB, dC (B, L, N); A (E, N); D (E,);
# h0, h_last (B, E, N); ckpt (B, chunks, E, N). The innermost loops run over the N states.


@njit(**JIT)
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


@njit(**JIT)
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


def _kernel_inputs(u, delta, A, B, C, D):
    """Detached, contiguous kernel inputs: ``u, delta, A``, ``B``/``C`` as ``(B, L, N)`` (one row
    per time step) and ``D`` (zeros when None)."""
    D_c = torch.zeros(u.shape[1], dtype=u.dtype) if D is None else D.detach().contiguous()
    return (u.detach().contiguous(), delta.detach().contiguous(), A.detach().contiguous(),
            B.detach().transpose(1, 2).contiguous(), C.detach().transpose(1, 2).contiguous(), D_c)


def _forward_impl(u, delta, A, B, C, D, h0, keep: bool):
    """The forward kernel: ``(y, h_last, checkpoints)``; the checkpoints ``(B, L/every, E, N)``
    are kept for a backward pass only when ``keep`` (else an empty ``(B, 0, E, N)``)."""
    nb, e, length = u.shape
    n = A.shape[1]
    dtype = u.dtype
    threads = _numba.threads()
    nblk = chunks.blocks(e, threads)
    u_c, dt_c, A_c, Bt, Ct, D_c = _kernel_inputs(u, delta, A, B, C, D)
    h0_c = torch.zeros(nb, e, n, dtype=dtype) if h0 is None else h0.detach().contiguous()
    every = chunks.CHECKPOINT_EVERY
    ckpt = torch.empty(nb, -(-length // every) if keep else 0, e, n, dtype=dtype)
    y = torch.empty(nb, e, length, dtype=dtype)
    h_last = torch.empty(nb, e, n, dtype=dtype)
    with NumbaThreads(threads), KernelFlags(("forward", dtype)):
        _forward_kernel(
            _np(u_c), _np(dt_c), _np(A_c), _np(Bt), _np(Ct), _np(D_c), _np(h0_c),
            _np(y), _np(h_last), _np(ckpt), every, nblk,
        )
    return y, h_last, ckpt


def _backward_impl(u, delta, A, B, C, D, ckpt, dy, dh_last):
    """The backward kernel: ``(du, ddelta, dA, dB, dC, dD, dh0)`` (``dD`` zeros without ``D``)."""
    nb, e, length = u.shape
    n = A.shape[1]
    dtype = u.dtype
    threads = _numba.threads()
    nblk = chunks.blocks(e, threads)
    u_c, dt_c, A_c, Bt, Ct, D_c = _kernel_inputs(u, delta, A, B, C, D)
    every = chunks.CHECKPOINT_EVERY
    dy = dy.to(dtype).contiguous()
    g_state = dh_last.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)  # written by the kernel
    du = torch.empty_like(u_c)
    ddt = torch.empty_like(u_c)
    dB = torch.empty(nb, length, n, dtype=dtype)
    dC = torch.empty(nb, length, n, dtype=dtype)
    dA64 = torch.zeros(nb, e, n, dtype=torch.float64)
    dD64 = torch.zeros(nb, e, dtype=torch.float64)
    with NumbaThreads(threads), KernelFlags(("backward", dtype)):
        _backward_kernel(
            _np(u_c), _np(dt_c), _np(A_c), _np(Bt), _np(Ct), _np(D_c), _np(ckpt.contiguous()),
            every, chunks.sync_steps(every, nb * nblk, n), nblk,
            _np(dy), _np(g_state), _np(du), _np(ddt),
            _np(dA64), _np(dB), _np(dC), _np(dD64),
        )
    return du, ddt, dA64.sum(0).to(dtype), dB.transpose(1, 2), dC.transpose(1, 2), dD64.sum(0).to(dtype), g_state


# The forward and the backward are torch.library custom ops with fake (shape-only)
# implementations and a registered autograd formula: torch.compile sees one opaque node per
# scan (no graph break on the numba call). A torch without custom_op (< 2.4) gets an
# autograd.Function with the same two halves.
_HAS_CUSTOM_OP = hasattr(torch, "library") and hasattr(torch.library, "custom_op")

if _HAS_CUSTOM_OP:
    from typing import Optional

    @torch.library.custom_op("psmamba::cpu_scan_fwd", mutates_args=(), device_types="cpu")
    def _fwd_op(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: Optional[torch.Tensor], h0: Optional[torch.Tensor], keep: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward_impl(u, delta, A, B, C, D, h0, keep)

    @_fwd_op.register_fake
    def _(u, delta, A, B, C, D, h0, keep):
        nb, e, length = u.shape
        n = A.shape[1]
        every = chunks.CHECKPOINT_EVERY
        return u.new_empty(nb, e, length), u.new_empty(nb, e, n), u.new_empty(nb, -(-length // every) if keep else 0, e, n)

    @torch.library.custom_op("psmamba::cpu_scan_bwd", mutates_args=(), device_types="cpu")
    def _bwd_op(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: Optional[torch.Tensor], ckpt: torch.Tensor, dy: torch.Tensor, dh_last: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward_impl(u, delta, A, B, C, D, ckpt, dy, dh_last)

    @_bwd_op.register_fake
    def _(u, delta, A, B, C, D, ckpt, dy, dh_last):
        nb, e, length = u.shape
        n = A.shape[1]
        return (torch.empty_like(u), torch.empty_like(u), A.new_empty(e, n), u.new_empty(nb, n, length),
                u.new_empty(nb, n, length), u.new_empty(e), u.new_empty(nb, e, n))

    def _setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, h0, keep = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, output[2])
        ctx.has_h0 = h0 is not None

    def _backward(ctx, dy, dh_last, _dckpt):
        u, delta, A, B, C, D, ckpt = ctx.saved_tensors
        nb, e, _ = u.shape
        dy = torch.zeros_like(u) if dy is None else dy
        dh_last = u.new_zeros(nb, e, A.shape[1]) if dh_last is None else dh_last
        du, ddt, dA, dB, dC, dD, dh0 = _bwd_op(u, delta, A, B, C, D, ckpt, dy, dh_last)
        return du, ddt, dA, dB, dC, dD if D is not None else None, dh0 if ctx.has_h0 else None, None

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    def _apply(u, delta, A, B, C, D, h0, keep):
        y, h_last, _ = _fwd_op(u, delta, A, B, C, D, h0, keep)
        return y, h_last

else:  # pragma: no cover - torch < 2.4

    class SelectiveScanCPU(torch.autograd.Function):
        """``(y, h_last) = scan(u, delta, A, B, C, D, h0)`` with the numba kernels (see module doc)."""

        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, h0, keep):  # noqa: D102 - documented on the class
            y, h_last, ckpt = _forward_impl(u, delta, A, B, C, D, h0, keep)
            ctx.save_for_backward(u, delta, A, B, C, D, ckpt)
            ctx.has_h0 = h0 is not None
            return y, h_last

        @staticmethod
        def backward(ctx, dy, dh_last):  # noqa: D102
            u, delta, A, B, C, D, ckpt = ctx.saved_tensors
            nb, e, _ = u.shape
            dy = torch.zeros_like(u) if dy is None else dy
            dh_last = u.new_zeros(nb, e, A.shape[1]) if dh_last is None else dh_last
            du, ddt, dA, dB, dC, dD, dh0 = _backward_impl(u, delta, A, B, C, D, ckpt, dy, dh_last)
            return du, ddt, dA, dB, dC, dD if D is not None else None, dh0 if ctx.has_h0 else None, None

    def _apply(u, delta, A, B, C, D, h0, keep):
        return SelectiveScanCPU.apply(u, delta, A, B, C, D, h0, keep)


def scan_cpu(u, delta, A, B, C, D, h0):
    """Backend entry point for :func:`psmamba.nn.scan.selective_scan` (CPU tensors only)."""
    from psmamba.errors import PsmambaError

    if u.device.type != "cpu":
        raise PsmambaError(f"selective_scan backend 'cpu' needs CPU tensors, they are on {u.device}")
    if u.dtype not in (torch.float32, torch.float64):
        raise PsmambaError(f"selective_scan backend 'cpu' computes in float32/float64, got {u.dtype}")
    # checkpoints for a backward pass only when one can come
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, h0))
    return _apply(u, delta, A, B, C, D, h0, keep)
