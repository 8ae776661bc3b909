"""Numba kernels of the deformable instance optimisation (:mod:`psmamba.deformable`) on the CPU.

One optimisation step at a level touches every voxel a handful of times: resample the
moving image, five local moments and their box sums, the LNCC coefficients and four more box
sums for the gradient, the force (gradient times the image gradient), a Gaussian smoothing
of the 3-channel update and a composition of fields. In PyTorch each of these is several
passes over the volume with temporaries and autograd bookkeeping; here each is one or two
passes, parallel over slabs. No autograd: the gradient of LNCC is written out (see
:func:`lncc_coeff_kernel`).

Arrays are channels-first ``(C, D, H, W)`` C-contiguous float32/float64 (one pair at a time).
The PyTorch reference of every kernel is in :mod:`psmamba.deformable` (``backend="torch"``);
tests compare the two.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_JIT = dict(parallel=True, fastmath=True, cache=True, nogil=True)


# --------------------------------------------------------------------------- box sums
@njit(**_JIT)
def _box_w(x, r, out):
    """Zero-padded sums of ``2r + 1`` consecutive voxels along W (running sums in float64)."""
    nc, nd, nh, nw = x.shape
    for unit in prange(nc * nd):
        c = unit // nd
        d = unit % nd
        for h in range(nh):
            row = x[c, d, h]
            dst = out[c, d, h]
            s = 0.0
            for k in range(min(r, nw - 1) + 1):
                s += row[k]
            for i in range(nw):
                dst[i] = s
                j = i + r + 1
                if j < nw:
                    s += row[j]
                j = i - r
                if j >= 0:
                    s -= row[j]


@njit(**_JIT)
def _box_h(x, r, out):
    """Zero-padded box sums along H; rows of W voxels are summed as vectors."""
    nc, nd, nh, nw = x.shape
    for unit in prange(nc * nd):
        c = unit // nd
        d = unit % nd
        acc = np.zeros(nw)
        for k in range(min(r, nh - 1) + 1):
            acc += x[c, d, k]
        for i in range(nh):
            dst = out[c, d, i]
            for w in range(nw):
                dst[w] = acc[w]
            j = i + r + 1
            if j < nh:
                src = x[c, d, j]
                for w in range(nw):
                    acc[w] += src[w]
            j = i - r
            if j >= 0:
                src = x[c, d, j]
                for w in range(nw):
                    acc[w] -= src[w]


@njit(**_JIT)
def _box_d(x, r, out):
    """Zero-padded box sums along D, running over planes; parallel over (channel, H row)."""
    nc, nd, nh, nw = x.shape
    for unit in prange(nc * nh):
        c = unit // nh
        h = unit % nh
        acc = np.zeros(nw)
        for k in range(min(r, nd - 1) + 1):
            acc += x[c, k, h]
        for i in range(nd):
            dst = out[c, i, h]
            for w in range(nw):
                dst[w] = acc[w]
            j = i + r + 1
            if j < nd:
                src = x[c, j, h]
                for w in range(nw):
                    acc[w] += src[w]
            j = i - r
            if j >= 0:
                src = x[c, j, h]
                for w in range(nw):
                    acc[w] -= src[w]


@njit(nogil=True, cache=True)
def box_sum_kernel(x, r, out, tmp):
    """``out`` = the ``(2r+1)^3`` box sum of every channel of ``x`` (zeros outside); ``tmp`` scratch
    of ``x``'s shape, which may be ``x`` itself (``x`` is then overwritten: no extra memory);
    ``out`` must be neither ``x`` nor ``tmp``.

    Equal to ``psmamba.losses.box_sum(x, 2r + 1)`` up to float rounding.
    """
    _box_w(x, r, out)
    _box_h(out, r, tmp)
    _box_d(tmp, r, out)


# --------------------------------------------------------------------------- LNCC and its gradient
@njit(**_JIT)
def lncc_moments_kernel(img, ref, mom):
    """``mom[0..4] = I, J, I*I, J*J, I*J`` for ``I = img[0]``, ``J = ref[0]`` (each (1, D, H, W))."""
    _, nd, nh, nw = img.shape
    for d in prange(nd):
        for h in range(nh):
            for w in range(nw):
                i = img[0, d, h, w]
                j = ref[0, d, h, w]
                mom[0, d, h, w] = i
                mom[1, d, h, w] = j
                mom[2, d, h, w] = i * i
                mom[3, d, h, w] = j * j
                mom[4, d, h, w] = i * j


@njit(**_JIT)
def lncc_coeff_kernel(sums, mask, use_mask, n, eps, vmin, coef):
    """From the box sums of the moments: ``cc`` per voxel and the four maps the gradient needs.

    Windows where either image is flat (``vI`` or ``vJ`` below ``vmin``) are left out: their
    ``cc`` and coefficients are 0 (as ANTs' CC metric does), so no window's ``eps`` rewards a
    change of local contrast and an image registered to itself feels no force.

    With ``cross = S_IJ - S_I S_J / n``, ``vI = S_II - S_I^2 / n``, ``vJ`` likewise and
    ``D = vI vJ + eps``, ``cc = cross^2 / D``. Differentiating ``cc(y)`` with respect to
    ``I(x)`` for a voxel ``x`` of the window of ``y``: ``d cross = J(x) - S_J(y) / n`` and
    ``d vI = 2 (I(x) - S_I(y) / n)``, so ``dcc(y)/dI(x) = a(y) (J(x) - S_J(y)/n) +
    2 b(y) (I(x) - S_I(y)/n)`` with ``a = 2 cross / D`` and ``b = -cross^2 vJ / D^2``. The box
    is symmetric, so summing over the windows that contain ``x`` is again a box sum:
    ``coef = (m a, m a S_J / n, m b, m b S_I / n)`` (``m`` the mask, or 1).
    Returns ``(sum(m cc), sum(m))`` (accumulated in float64).
    """
    _, nd, nh, nw = sums.shape
    part = np.zeros((nd, 2))
    for d in prange(nd):
        pc = 0.0
        pm = 0.0
        for h in range(nh):
            for w in range(nw):
                si = sums[0, d, h, w]
                sj = sums[1, d, h, w]
                cross = sums[4, d, h, w] - si * sj / n
                vi = sums[2, d, h, w] - si * si / n
                vj = sums[3, d, h, w] - sj * sj / n
                den = vi * vj + eps
                m = mask[0, d, h, w] if use_mask else 1.0
                if vi < vmin or vj < vmin:
                    coef[0, d, h, w] = 0.0
                    coef[1, d, h, w] = 0.0
                    coef[2, d, h, w] = 0.0
                    coef[3, d, h, w] = 0.0
                    pm += m
                    continue
                a = m * 2.0 * cross / den
                b = -m * cross * cross * vj / (den * den)
                coef[0, d, h, w] = a
                coef[1, d, h, w] = a * sj / n
                coef[2, d, h, w] = b
                coef[3, d, h, w] = b * si / n
                pc += m * cross * cross / den
                pm += m
        part[d, 0] = pc
        part[d, 1] = pm
    return part[:, 0].sum(), part[:, 1].sum()


@njit(**_JIT)
def lncc_force_kernel(img, ref, bsum, scale, force):
    """``force[c] = g * dI/dx_c`` (central differences) with ``g = scale * dsum(cc)/dI``.

    ``bsum`` are the box sums of :func:`lncc_coeff_kernel`'s ``coef``. The image gradient is
    numpy's ``gradient`` (central inside, one-sided at the faces): ``force`` is the gradient of
    the loss with respect to a small displacement ``s`` composed on the right of the current
    map (``m(phi(x + s(x)))``), the update of greedy and log-domain schemes.
    """
    _, nd, nh, nw = img.shape
    for d in prange(nd):
        for h in range(nh):
            for w in range(nw):
                i = img[0, d, h, w]
                g = scale * (
                    ref[0, d, h, w] * bsum[0, d, h, w] - bsum[1, d, h, w]
                    + 2.0 * (i * bsum[2, d, h, w] - bsum[3, d, h, w])
                )
                if nd == 1:
                    gd = 0.0
                elif d == 0:
                    gd = img[0, 1, h, w] - i
                elif d == nd - 1:
                    gd = i - img[0, d - 1, h, w]
                else:
                    gd = 0.5 * (img[0, d + 1, h, w] - img[0, d - 1, h, w])
                if nh == 1:
                    gh = 0.0
                elif h == 0:
                    gh = img[0, d, 1, w] - i
                elif h == nh - 1:
                    gh = i - img[0, d, h - 1, w]
                else:
                    gh = 0.5 * (img[0, d, h + 1, w] - img[0, d, h - 1, w])
                if nw == 1:
                    gw = 0.0
                elif w == 0:
                    gw = img[0, d, h, 1] - i
                elif w == nw - 1:
                    gw = i - img[0, d, h, w - 1]
                else:
                    gw = 0.5 * (img[0, d, h, w + 1] - img[0, d, h, w - 1])
                force[0, d, h, w] = g * gd
                force[1, d, h, w] = g * gh
                force[2, d, h, w] = g * gw


# --------------------------------------------------------------------------- Gaussian smoothing
@njit(**_JIT)
def _conv_d(x, k, out):
    nc, nd, nh, nw = x.shape
    r = (k.shape[0] - 1) // 2
    for unit in prange(nc * nd):
        c = unit // nd
        d = unit % nd
        dst = out[c, d]
        for h in range(nh):
            for w in range(nw):
                dst[h, w] = 0.0
        for t in range(-r, r + 1):
            dd = min(max(d + t, 0), nd - 1)  # replicate the faces
            src = x[c, dd]
            kt = k[t + r]
            for h in range(nh):
                for w in range(nw):
                    dst[h, w] += kt * src[h, w]


@njit(**_JIT)
def _conv_h(x, k, out):
    nc, nd, nh, nw = x.shape
    r = (k.shape[0] - 1) // 2
    for unit in prange(nc * nd):
        c = unit // nd
        d = unit % nd
        for h in range(nh):
            dst = out[c, d, h]
            for w in range(nw):
                dst[w] = 0.0
            for t in range(-r, r + 1):
                hh = min(max(h + t, 0), nh - 1)
                src = x[c, d, hh]
                kt = k[t + r]
                for w in range(nw):
                    dst[w] += kt * src[w]


@njit(**_JIT)
def _conv_w(x, k, out):
    nc, nd, nh, nw = x.shape
    r = (k.shape[0] - 1) // 2
    for unit in prange(nc * nd):
        c = unit // nd
        d = unit % nd
        for h in range(nh):
            src = x[c, d, h]
            dst = out[c, d, h]
            for w in range(nw):
                dst[w] = 0.0
            # the taps as shifted rows: interior voxels without clamping (vectorised), then
            # the r voxels at each end with the faces replicated; lo/hi kept in [0, nw] for a
            # kernel longer than the row (every voxel then reads a face)
            for t in range(-r, r + 1):
                kt = k[t + r]
                lo = min(max(0, -t), nw)
                hi = max(min(nw, nw - t), lo)
                for w in range(lo, hi):
                    dst[w] += kt * src[w + t]
                for w in range(0, lo):
                    dst[w] += kt * src[0]
                for w in range(hi, nw):
                    dst[w] += kt * src[nw - 1]


@njit(nogil=True, cache=True)
def gauss_kernel(x, k, out, tmp):
    """Separable smoothing of every channel of ``x`` with the 1-D kernel ``k`` along D, H and W
    (faces replicated); the result lands in ``out`` (``tmp`` is scratch; neither may be ``x``)."""
    _conv_w(x, k, out)
    _conv_h(out, k, tmp)
    _conv_d(tmp, k, out)


# --------------------------------------------------------------------------- resampling
@njit(inline="always", fastmath=True, nogil=True, cache=True)
def _cell(z, y, x, nd, nh, nw):
    """Trilinear cell of the point ``(z, y, x)`` clamped to the grid (``grid_sample``'s border
    padding, ``align_corners=True``): lower corner, upper corner and fractions."""
    z = min(max(z, 0.0), nd - 1.0)
    y = min(max(y, 0.0), nh - 1.0)
    x = min(max(x, 0.0), nw - 1.0)
    z0 = min(int(z), max(nd - 2, 0))
    y0 = min(int(y), max(nh - 2, 0))
    x0 = min(int(x), max(nw - 2, 0))
    return z0, y0, x0, min(z0 + 1, nd - 1), min(y0 + 1, nh - 1), min(x0 + 1, nw - 1), z - z0, y - y0, x - x0


@njit(inline="always", fastmath=True, nogil=True, cache=True)
def _trilinear(a, z0, y0, x0, z1, y1, x1, fz, fy, fx):
    """``a`` (D, H, W) read in the cell found by :func:`_cell`."""
    v00 = a[z0, y0, x0] * (1 - fx) + a[z0, y0, x1] * fx
    v01 = a[z0, y1, x0] * (1 - fx) + a[z0, y1, x1] * fx
    v10 = a[z1, y0, x0] * (1 - fx) + a[z1, y0, x1] * fx
    v11 = a[z1, y1, x0] * (1 - fx) + a[z1, y1, x1] * fx
    return (v00 * (1 - fy) + v01 * fy) * (1 - fz) + (v10 * (1 - fy) + v11 * fy) * fz


@njit(**_JIT)
def sample_kernel(src, disp, sign, add, out):
    """``out[c](p) = sign * src[c](p + disp(p)) (+ disp[c](p) if add)``, trilinear, border-clamped.

    ``src`` (C, D, H, W), ``disp`` (3, D, H, W) in voxels of the same grid, ``out`` like
    ``src``. Coordinates are clamped to ``[0, n - 1]`` per axis (``grid_sample``'s
    ``padding_mode="border"`` with ``align_corners=True``). ``add`` (C = 3) gives the
    composition ``src o (id + disp) = disp + src(p + disp)`` (:func:`psmamba.spatial.compose`
    with ``padding="border"``); ``sign = -1`` the fixed-point step of a field inversion.
    """
    nc, nd, nh, nw = src.shape
    for d in prange(nd):
        for h in range(nh):
            for w in range(nw):
                z0, y0, x0, z1, y1, x1, fz, fy, fx = _cell(
                    d + disp[0, d, h, w], h + disp[1, d, h, w], w + disp[2, d, h, w], nd, nh, nw)
                for c in range(nc):
                    v = sign * _trilinear(src[c], z0, y0, x0, z1, y1, x1, fz, fy, fx)
                    if add:
                        v += disp[c, d, h, w]
                    out[c, d, h, w] = v


# --------------------------------------------------------------------------- small field steps
@njit(**_JIT)
def max_norm_kernel(x):
    """The largest vector length of a ``(3, D, H, W)`` field."""
    _, nd, nh, nw = x.shape
    best = np.zeros(nd)
    for d in prange(nd):
        b = 0.0
        for h in range(nh):
            for w in range(nw):
                n2 = x[0, d, h, w] ** 2 + x[1, d, h, w] ** 2 + x[2, d, h, w] ** 2
                if n2 > b:
                    b = n2
        best[d] = b
    return np.sqrt(best.max())


@njit(**_JIT)
def axpy_kernel(a, x, y, use_y, out):
    """``out = a * x (+ y)`` elementwise on ``(C, D, H, W)`` arrays; ``out`` may be ``x`` or ``y``."""
    nc, nd, nh, nw = x.shape
    for unit in prange(nc * nd):
        c = unit // nd
        d = unit % nd
        for h in range(nh):
            for w in range(nw):
                v = a * x[c, d, h, w]
                if use_y:
                    v += y[c, d, h, w]
                out[c, d, h, w] = v


# --------------------------------------------------------------------------- affine maps of fields
@njit(**_JIT)
def affine_field_kernel(field, a, b, out):
    """``out[:, r] = B (q + field(q)) - r`` with ``q = A r``, for every voxel ``r`` of ``out``'s grid.

    ``A``, ``B`` ``(3, 4)`` affine maps of voxel coordinates (float64); ``field`` ``(3, d, h, w)``
    on its own grid, read trilinearly at ``q`` with border clamping (as :func:`sample_kernel`);
    ``out`` ``(3, D, H, W)``. With ``A`` the identity ``field`` is read at its voxels exactly:
    ``B (p + u(p)) - p`` is an affine applied after a displacement (:func:`psmamba.affine.affine_ddf`).
    One pass with the positions computed on the fly: no identity grid, no temporaries.
    """
    _, nd, nh, nw = field.shape
    _, od, oh, ow = out.shape
    for d in prange(od):
        for h in range(oh):
            for w in range(ow):
                q0 = a[0, 0] * d + a[0, 1] * h + a[0, 2] * w + a[0, 3]
                q1 = a[1, 0] * d + a[1, 1] * h + a[1, 2] * w + a[1, 3]
                q2 = a[2, 0] * d + a[2, 1] * h + a[2, 2] * w + a[2, 3]
                z0, y0, x0, z1, y1, x1, fz, fy, fx = _cell(q0, q1, q2, nd, nh, nw)
                p0 = q0 + _trilinear(field[0], z0, y0, x0, z1, y1, x1, fz, fy, fx)
                p1 = q1 + _trilinear(field[1], z0, y0, x0, z1, y1, x1, fz, fy, fx)
                p2 = q2 + _trilinear(field[2], z0, y0, x0, z1, y1, x1, fz, fy, fx)
                out[0, d, h, w] = b[0, 0] * p0 + b[0, 1] * p1 + b[0, 2] * p2 + b[0, 3] - d
                out[1, d, h, w] = b[1, 0] * p0 + b[1, 1] * p1 + b[1, 2] * p2 + b[1, 3] - h
                out[2, d, h, w] = b[2, 0] * p0 + b[2, 1] * p1 + b[2, 2] * p2 + b[2, 3] - w


# --------------------------------------------------------------------------- Jacobian determinant
# Not parallel: a metric runs in DataLoader workers and forked pools too, and numba's OpenMP layer
# kills a forked child once its parent has used it. No fastmath: every operation rounds as numpy's.
@njit(cache=True, nogil=True)
def jacobian_det_kernel(u, one, half, out):
    """``out = det(I + grad u)`` per voxel of a ``(3, D, H, W)`` field, ``numpy.gradient``'s
    differences (central inside, one-sided at the faces; each axis >= 2 voxels).

    The same value, bit for bit, as :func:`psmamba.metrics._jacobian_numpy` (its arithmetic in
    the field's precision, in the same order): ``one`` and ``half`` hold 1 and 0.5 in the field's
    dtype so that no operation is widened. One pass, no ``(3, 3, D, H, W)`` temporaries.
    """
    _, nd, nh, nw = u.shape
    o = one[0]
    hf = half[0]
    j = np.empty((3, 3), dtype=u.dtype)
    for d in range(nd):
        for h in range(nh):
            for w in range(nw):
                for c in range(3):
                    if d == 0:
                        g0 = u[c, 1, h, w] - u[c, 0, h, w]
                    elif d == nd - 1:
                        g0 = u[c, d, h, w] - u[c, d - 1, h, w]
                    else:
                        g0 = (u[c, d + 1, h, w] - u[c, d - 1, h, w]) * hf
                    if h == 0:
                        g1 = u[c, d, 1, w] - u[c, d, 0, w]
                    elif h == nh - 1:
                        g1 = u[c, d, h, w] - u[c, d, h - 1, w]
                    else:
                        g1 = (u[c, d, h + 1, w] - u[c, d, h - 1, w]) * hf
                    if w == 0:
                        g2 = u[c, d, h, 1] - u[c, d, h, 0]
                    elif w == nw - 1:
                        g2 = u[c, d, h, w] - u[c, d, h, w - 1]
                    else:
                        g2 = (u[c, d, h, w + 1] - u[c, d, h, w - 1]) * hf
                    j[c, 0] = g0
                    j[c, 1] = g1
                    j[c, 2] = g2
                    j[c, c] = j[c, c] + o
                a = j[1, 1] * j[2, 2] - j[1, 2] * j[2, 1]
                b = j[1, 0] * j[2, 2] - j[1, 2] * j[2, 0]
                e = j[1, 0] * j[2, 1] - j[1, 1] * j[2, 0]
                out[d, h, w] = j[0, 0] * a - j[0, 1] * b + j[0, 2] * e
