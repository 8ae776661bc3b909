"""Triton kernels of the ``"triton"`` selective-scan backend (see :mod:`psmamba.nn._scan_triton`).

Imported only through :func:`psmamba.nn._scan_triton.kernels`, which re-imports this module
when ``TRITON_INTERPRET`` changed since the last import: ``triton.jit`` decides at decoration
time whether a kernel is compiled for the GPU or run by the interpreter.

Layouts (strides passed explicitly, so views such as the Mamba layer's ``(B, N, l)`` view of a
``(B, l, N)`` tensor are read in place): ``u``, ``dt``, ``dy`` ``(B, E, L)``; ``Bm``, ``Cm``
``(B, N, L)``; ``A`` ``(E, N)`` contiguous; ``y``, ``du``, ``ddt`` ``(B, E, L)`` contiguous;
chunk tensors ``(B, nc, E, N)`` and ``(B, nc, E)`` contiguous; ``dB``, ``dC`` partial sums
``(G, B, N, L)`` contiguous (one slice per channel group ``G``).

Fused steps (``constexpr`` switches): ``HAS_BIAS`` / ``SOFTPLUS`` turn the raw ``dt`` read from
memory into ``delta = softplus(dt + bias[e])`` as it is loaded (every kernel that reads
``delta`` does so; padded steps are set to 0 afterwards), and ``HAS_Z`` gates the output,
``y = (C h + D u) * silu(z)``: the forward writes the gated ``y``, the backward turns the
incoming gradient into that of the ungated output, ``dy * silu(z)``, and writes ``dz``. The
backward writes the gradient of the raw ``dt`` (``ddelta * sigmoid(dt + bias)``).

Every program handles one chunk of ``T`` time steps of one batch item and loops over the
channel blocks (``BE`` channels) of its channel group. Within a chunk the recurrence is a
``tl.associative_scan`` over the time axis of ``(BE, T, BN)`` tiles with the operator
``(a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2)``: only products of decays ``exp(dt A) <= 1``
and sums appear, as in the sequential loop (no ``exp(-sum)`` factors that could overflow).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)); log1p(e) = log(1 + e) * e / ((1 + e) - 1)
    # (Goldberg's correction: exact to a few ulps where a plain log(1 + e) loses the digits of
    # a small e, i.e. for the small steps delta ~ 1e-3 of a Mamba layer)
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    den = tl.where(w == 1.0, 1.0, w - 1.0)
    return tl.maximum(x, 0.0) + tl.where(w == 1.0, e, tl.log(w) * (e / den))


@triton.jit
def _delta(dt_ptr, bias_ptr, e, em, t, mask, sd_b_off, sd_e, sd_l, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``delta`` of the channels ``e`` at the steps ``t`` ((BE, T) tile; 0 where ``mask`` is off),
    and the pre-activation ``dt + bias`` (for the backward's sigmoid)."""
    raw = tl.load(dt_ptr + sd_b_off + e[:, None] * sd_e + t[None, :] * sd_l, mask=mask, other=0.0)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + e, mask=em, other=0.0)[:, None]
    if SOFTPLUS:
        dlt = tl.where(mask, _softplus(raw), 0.0)
    else:
        dlt = tl.where(mask, raw, 0.0)
    return dlt, raw


@triton.jit
def fwd_chunk_kernel(
    u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, st_ptr, y_ptr, dts_ptr,
    L, E, N,
    su_b, su_e, su_l, sd_b, sd_e, sd_l, sb_b, sb_n, sb_l, sc_b, sc_n, sc_l, sz_b, sz_e, sz_l,
    T: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, OUTPUT: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Forward pass 1 (``OUTPUT=False``) or 3 (``OUTPUT=True``) over one chunk.

    Pass 1 scans the chunk from a zero state and writes its end state to ``st[b, c]`` and the
    sum of its steps ``dt`` to ``dts[b, c]`` (the chunk's decay is ``exp(A * dts)``).
    Pass 3 scans it from its true start state ``st[b, c]`` and writes ``y`` (with ``D u``, gated
    by ``silu(z)`` with ``HAS_Z``).
    """
    c = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2)
    n_groups = tl.num_programs(2)
    nc = tl.num_programs(0)
    tt = tl.arange(0, T)
    t = c * T + tt
    tm = t < L
    n = tl.arange(0, BN)
    nm = n < N
    bt = tl.load(b_ptr + b * sb_b + n[None, :] * sb_n + t[:, None] * sb_l, mask=tm[:, None] & nm[None, :], other=0.0)
    if OUTPUT:
        ct = tl.load(c_ptr + b * sc_b + n[None, :] * sc_n + t[:, None] * sc_l, mask=tm[:, None] & nm[None, :], other=0.0)
    for eb in range(g, tl.cdiv(E, BE), n_groups):
        e = eb * BE + tl.arange(0, BE)
        em = e < E
        m2 = em[:, None] & tm[None, :]
        sm = em[:, None] & nm[None, :]
        # padded steps, channels and states: dt = u = A = 0, i.e. decay 1 and no input
        dtv, _ = _delta(dt_ptr, bias_ptr, e, em, t, m2, b * sd_b, sd_e, sd_l, HAS_BIAS, SOFTPLUS)
        uv = tl.load(u_ptr + b * su_b + e[:, None] * su_e + t[None, :] * su_l, mask=m2, other=0.0)
        av = tl.load(a_ptr + e[:, None] * N + n[None, :], mask=sm, other=0.0)
        decay = tl.exp(dtv[:, :, None] * av[:, None, :])  # (BE, T, BN)
        inp = (dtv * uv)[:, :, None] * bt[None, :, :]
        acum, xcum = tl.associative_scan((decay, inp), 1, _combine)
        st_off = ((b * nc + c) * E + e[:, None]) * N + n[None, :]
        if OUTPUT:
            h_start = tl.load(st_ptr + st_off, mask=sm, other=0.0)
            h = xcum + acum * h_start[:, None, :]
            yv = tl.sum(h * ct[None, :, :], axis=2)  # (BE, T)
            if HAS_D:
                yv += tl.load(d_ptr + e, mask=em, other=0.0)[:, None] * uv
            if HAS_Z:
                zv = tl.load(z_ptr + b * sz_b + e[:, None] * sz_e + t[None, :] * sz_l, mask=m2, other=0.0)
                yv = yv * zv * _sigmoid(zv)
            tl.store(y_ptr + (b * E + e[:, None]) * L + t[None, :], yv, mask=m2)
        else:
            # the state after the chunk's last step (padded steps pass it through unchanged)
            h_end = tl.sum(tl.where((tt == T - 1)[None, :, None], xcum, 0.0), axis=1)
            tl.store(st_ptr + st_off, h_end, mask=sm)
            tl.store(dts_ptr + (b * nc + c) * E + e, tl.sum(dtv, axis=1), mask=em)


@triton.jit
def carry_kernel(
    st_ptr, dts_ptr, a_ptr, init_ptr, last_ptr, nc, E, N,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr,
):
    """The sequential carry across chunks: ``s <- exp(A dts[c]) s + st[c]``, in place.

    On entry ``st[b, c]`` holds each chunk's local result (from a zero carry); on exit the
    carry entering the chunk. Forward (``REVERSE=False``): the state before chunk ``c``;
    ``last`` = the final state. Backward (``REVERSE=True``, chunks from the last): the adjoint
    ``G`` at the first step of chunk ``c + 1``; ``last`` = ``G`` at step 0. ``init`` is
    ``h0``, resp. the gradient of ``h_last`` (zeros when absent).
    """
    b = tl.program_id(0)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    em = e < E
    n = tl.arange(0, BN)
    sm = em[:, None] & (n < N)[None, :]
    av = tl.load(a_ptr + e[:, None] * N + n[None, :], mask=sm, other=0.0)
    off = (b * E + e[:, None]) * N + n[None, :]
    if HAS_INIT:
        s = tl.load(init_ptr + off, mask=sm, other=0.0)
    else:
        s = tl.zeros([BE, BN], dtype=av.dtype)
    for i in range(nc):
        if REVERSE:
            c = nc - 1 - i
        else:
            c = i
        st_off = ((b * nc + c) * E + e[:, None]) * N + n[None, :]
        local = tl.load(st_ptr + st_off, mask=sm, other=0.0)
        ds = tl.load(dts_ptr + (b * nc + c) * E + e, mask=em, other=0.0)
        tl.store(st_ptr + st_off, s, mask=sm)
        s = tl.exp(ds[:, None] * av) * s + local
    tl.store(last_ptr + off, s, mask=sm)


@triton.jit
def bwd_local_kernel(
    dt_ptr, a_ptr, c_ptr, dy_ptr, z_ptr, bias_ptr, gst_ptr, dts_ptr,
    L, E, N,
    sd_b, sd_e, sd_l, sc_b, sc_n, sc_l, sy_b, sy_e, sy_l, sz_b, sz_e, sz_l,
    T: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Backward pass 1: the adjoint ``G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1}`` over one chunk
    from a zero carry, read at the chunk's first step into ``gst[b, c]``; ``dts[b, c]`` gets
    ``sum dt_{t+1}`` over the chunk (the factor ``exp(A dts)`` carries ``G`` across it)."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2)
    n_groups = tl.num_programs(2)
    nc = tl.num_programs(0)
    tt = tl.arange(0, T)
    t = c * T + tt
    tm = t < L
    tnm = (t + 1) < L  # dt_{t+1}; beyond the sequence dt = 0 (factor 1 onto dh_last)
    n = tl.arange(0, BN)
    nm = n < N
    ct = tl.load(c_ptr + b * sc_b + n[None, :] * sc_n + t[:, None] * sc_l, mask=tm[:, None] & nm[None, :], other=0.0)
    for eb in range(g, tl.cdiv(E, BE), n_groups):
        e = eb * BE + tl.arange(0, BE)
        em = e < E
        sm = em[:, None] & nm[None, :]
        dyv = tl.load(dy_ptr + b * sy_b + e[:, None] * sy_e + t[None, :] * sy_l, mask=em[:, None] & tm[None, :], other=0.0)
        if HAS_Z:  # the gradient of the ungated output
            zv = tl.load(z_ptr + b * sz_b + e[:, None] * sz_e + t[None, :] * sz_l, mask=em[:, None] & tm[None, :], other=0.0)
            dyv = dyv * zv * _sigmoid(zv)
        dtn, _ = _delta(dt_ptr, bias_ptr, e, em, t + 1, em[:, None] & tnm[None, :], b * sd_b, sd_e, sd_l, HAS_BIAS, SOFTPLUS)
        av = tl.load(a_ptr + e[:, None] * N + n[None, :], mask=sm, other=0.0)
        a_next = tl.exp(dtn[:, :, None] * av[:, None, :])
        cg = dyv[:, :, None] * ct[None, :, :]
        # reverse scan: R_t = cg_t + a_next_t R_{t+1}
        _, gr = tl.associative_scan((a_next, cg), 1, _combine, reverse=True)
        g_first = tl.sum(tl.where((tt == 0)[None, :, None], gr, 0.0), axis=1)
        tl.store(gst_ptr + ((b * nc + c) * E + e[:, None]) * N + n[None, :], g_first, mask=sm)
        tl.store(dts_ptr + (b * nc + c) * E + e, tl.sum(dtn, axis=1), mask=em)


@triton.jit
def bwd_chunk_kernel(
    u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dy_ptr, z_ptr, bias_ptr, st_ptr, gn_ptr,
    du_ptr, ddt_ptr, da_ptr, db_ptr, dc_ptr, dz_ptr,
    L, E, N, B,
    su_b, su_e, su_l, sd_b, sd_e, sd_l, sb_b, sb_n, sb_l, sc_b, sc_n, sc_l, sy_b, sy_e, sy_l, sz_b, sz_e, sz_l,
    T: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Backward pass 3 over one chunk: recompute the states from the chunk's start state,
    run the adjoint from ``G`` at the next chunk's first step, and form the gradients.

    With ``a_t = exp(dt_t A)`` and ``G_t`` the gradient w.r.t. ``h_t``::

        du_t  = dt_t sum_n G_t B_t + D dy_t      ddt_t = sum_n G_t (a_t h_{t-1} A + B_t u_t)
        dA    = sum_t G_t a_t h_{t-1} dt_t       dB_t  = sum_e G_t dt_t u_t
        dC_t  = sum_e dy_t h_t

    ``h_{t-1}`` comes from a scan of the elements shifted by one step (the first one is the
    identity, so the chunk's start state is ``h_{t0-1}``), then ``h_t = a_t h_{t-1} + x_t``.
    ``dA`` is written per chunk (``da[b, c]``), ``dB``/``dC`` per channel group. With ``HAS_Z``
    ``dy`` is first turned into the gradient of the ungated output and ``dz_t = dy_t (C_t h_t +
    D u_t) silu'(z_t)`` is written; with ``SOFTPLUS`` ``ddt`` is that of the raw ``dt``.
    """
    c = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2)
    n_groups = tl.num_programs(2)
    nc = tl.num_programs(0)
    tt = tl.arange(0, T)
    t = c * T + tt
    tm = t < L
    tpm = (tt >= 1) & (t - 1 < L)  # step t - 1 inside this chunk
    tnm = (t + 1) < L
    n = tl.arange(0, BN)
    nm = n < N
    bt = tl.load(b_ptr + b * sb_b + n[None, :] * sb_n + t[:, None] * sb_l, mask=tm[:, None] & nm[None, :], other=0.0)
    bp = tl.load(b_ptr + b * sb_b + n[None, :] * sb_n + (t[:, None] - 1) * sb_l,
                 mask=tpm[:, None] & nm[None, :], other=0.0)
    ct = tl.load(c_ptr + b * sc_b + n[None, :] * sc_n + t[:, None] * sc_l, mask=tm[:, None] & nm[None, :], other=0.0)
    db_acc = tl.zeros([T, BN], dtype=bt.dtype)
    dc_acc = tl.zeros([T, BN], dtype=bt.dtype)
    for eb in range(g, tl.cdiv(E, BE), n_groups):
        e = eb * BE + tl.arange(0, BE)
        em = e < E
        m2 = em[:, None] & tm[None, :]
        mp = em[:, None] & tpm[None, :]
        sm = em[:, None] & nm[None, :]
        dtv, pre = _delta(dt_ptr, bias_ptr, e, em, t, m2, b * sd_b, sd_e, sd_l, HAS_BIAS, SOFTPLUS)
        uv = tl.load(u_ptr + b * su_b + e[:, None] * su_e + t[None, :] * su_l, mask=m2, other=0.0)
        dyv = tl.load(dy_ptr + b * sy_b + e[:, None] * sy_e + t[None, :] * sy_l, mask=m2, other=0.0)
        if HAS_Z:
            zv = tl.load(z_ptr + b * sz_b + e[:, None] * sz_e + t[None, :] * sz_l, mask=m2, other=0.0)
            sz = _sigmoid(zv)
            dy_out = dyv
            dyv = dy_out * zv * sz  # the gradient of the ungated output
        dtp, _ = _delta(dt_ptr, bias_ptr, e, em, t - 1, mp, b * sd_b, sd_e, sd_l, HAS_BIAS, SOFTPLUS)
        up = tl.load(u_ptr + b * su_b + e[:, None] * su_e + (t[None, :] - 1) * su_l, mask=mp, other=0.0)
        dtn, _ = _delta(dt_ptr, bias_ptr, e, em, t + 1, em[:, None] & tnm[None, :], b * sd_b, sd_e, sd_l,
                        HAS_BIAS, SOFTPLUS)
        av = tl.load(a_ptr + e[:, None] * N + n[None, :], mask=sm, other=0.0)
        st_off = ((b * nc + c) * E + e[:, None]) * N + n[None, :]
        h_start = tl.load(st_ptr + st_off, mask=sm, other=0.0)
        g_next = tl.load(gn_ptr + st_off, mask=sm, other=0.0)
        # states h_{t-1}, h_t
        ap = tl.exp(dtp[:, :, None] * av[:, None, :])
        xp = (dtp * up)[:, :, None] * bp[None, :, :]
        acum, xcum = tl.associative_scan((ap, xp), 1, _combine)
        h_prev = xcum + acum * h_start[:, None, :]
        a_t = tl.exp(dtv[:, :, None] * av[:, None, :])
        h = a_t * h_prev + (dtv * uv)[:, :, None] * bt[None, :, :]
        # adjoint G_t
        a_next = tl.exp(dtn[:, :, None] * av[:, None, :])
        cg = dyv[:, :, None] * ct[None, :, :]
        ar, gr = tl.associative_scan((a_next, cg), 1, _combine, reverse=True)
        gt = gr + ar * g_next[:, None, :]
        gb = tl.sum(gt * bt[None, :, :], axis=2)  # (BE, T)
        du = gb * dtv
        if HAS_D:
            dv = tl.load(d_ptr + e, mask=em, other=0.0)[:, None]
            du += dv * dyv
        gah = gt * a_t * h_prev
        ddt = tl.sum(gah * av[:, None, :], axis=2) + gb * uv
        if SOFTPLUS:
            ddt = ddt * _sigmoid(pre)
        out_off = (b * E + e[:, None]) * L + t[None, :]
        tl.store(du_ptr + out_off, du, mask=m2)
        tl.store(ddt_ptr + out_off, ddt, mask=m2)
        if HAS_Z:
            y_pre = tl.sum(h * ct[None, :, :], axis=2)  # (BE, T): the ungated output, recomputed
            if HAS_D:
                y_pre += dv * uv
            tl.store(dz_ptr + out_off, dy_out * y_pre * sz * (1.0 + zv * (1.0 - sz)), mask=m2)
        tl.store(da_ptr + st_off, tl.sum(gah * dtv[:, :, None], axis=1), mask=sm)
        db_acc += tl.sum(gt * (dtv * uv)[:, :, None], axis=0)
        dc_acc += tl.sum(dyv[:, :, None] * h, axis=0)
    part_off = ((g * B + b) * N + n[None, :]) * L + t[:, None]
    pm = tm[:, None] & nm[None, :]
    tl.store(db_ptr + part_off, db_acc, mask=pm)
    tl.store(dc_ptr + part_off, dc_acc, mask=pm)
