"""Numba kernels for the model's memory-bound inference steps on the CPU (no autograd).

At 160x192x160 the full-size level moves 5 million voxels x 8-32 channels through every
step. In PyTorch, instance norm + activation is three passes over the data plus two
temporaries, the level projection (Linear + RMSNorm over 8 channels) is six, and
``grid_sample`` spends most of its time on per-voxel index arithmetic. The kernels below do
each in one or two passes, parallel over slabs of voxels, on channels-last data.

Callers (:mod:`psmamba.nn.fast`) use them only when autograd is off, the tensors are float32
or float64 on the CPU, and numba imports; otherwise they take the PyTorch path, which gives
the same numbers to float rounding (tests compare the two).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from psmamba.nn._numba import JIT as _JIT

def tile_width(c: int) -> int:
    """Elements per inner loop: a multiple of ``c`` of about 1024 (LLVM vectorises a long
    inner loop; a loop over 8 or 16 channels with a runtime trip count runs scalar)."""
    return c * max(1, 1024 // c)


@njit(inline="always")
def _slab(unit, nchunk, length):
    """Batch item and voxel range ``[lo, hi)`` of parallel unit ``unit`` (``nchunk`` per item)."""
    step = (length + nchunk - 1) // nchunk
    lo = (unit % nchunk) * step
    return unit // nchunk, lo, min(length, lo + step)


@njit(**_JIT)
def norm_stats_kernel(x, nchunk, width, mean, rstd, eps):
    """Per-(batch, channel) mean and 1/std over the voxels of ``x`` (B, L, C), C-contiguous.

    Sums run in float64 over ``nchunk`` slabs per batch item (in parallel), each slab in
    tiles of ``width`` elements (a multiple of C), shifted by the first voxel's values
    (keeps E[x^2] - E[x]^2 accurate when the mean is large). Biased variance, as
    InstanceNorm3d. Writes ``mean`` and ``rstd`` (B, C) in float64.
    """
    nb, length, c = x.shape
    per = width // c
    part_s = np.zeros((nb * nchunk, width))
    part_q = np.zeros((nb * nchunk, width))
    for unit in prange(nb * nchunk):
        b, lo, hi = _slab(unit, nchunk, length)
        flat = x[b].reshape(length * c)
        shift = np.empty(width)
        for j in range(width):
            shift[j] = flat[j % c]
        s = part_s[unit]
        q = part_q[unit]
        t = lo
        while t + per <= hi:
            base = t * c
            for j in range(width):
                v = flat[base + j] - shift[j]
                s[j] += v
                q[j] += v * v
            t += per
        while t < hi:
            for k in range(c):
                v = flat[t * c + k] - shift[k]
                s[k] += v
                q[k] += v * v
            t += 1
    for b in range(nb):
        for k in range(c):
            s = 0.0
            q = 0.0
            for u in range(nchunk):
                for j in range(k, width, c):
                    s += part_s[b * nchunk + u, j]
                    q += part_q[b * nchunk + u, j]
            m = s / length
            var = max(q / length - m * m, 0.0)
            mean[b, k] = m + x[b, 0, k]
            rstd[b, k] = 1.0 / np.sqrt(var + eps)


@njit(**_JIT)
def norm_apply_kernel(x, mean, rstd, act, slope, nchunk, width, out):
    """``out = act((x - mean) * rstd)`` on (B, L, C) C-contiguous data; ``out`` may be ``x``.

    ``act``: 0 none, 1 ReLU, 2 LeakyReLU(``slope``).
    """
    nb, length, c = x.shape
    per = width // c
    for unit in prange(nb * nchunk):
        b, lo, hi = _slab(unit, nchunk, length)
        src = x[b].reshape(length * c)
        dst = out[b].reshape(length * c)
        m = np.empty(width, dtype=x.dtype)
        r = np.empty(width, dtype=x.dtype)
        for j in range(width):
            m[j] = mean[b, j % c]
            r[j] = rstd[b, j % c]
        t = lo
        while t < hi:
            n = min(per, hi - t) * c
            base = t * c
            if act == 1:
                for j in range(n):
                    v = (src[base + j] - m[j]) * r[j]
                    dst[base + j] = max(v, v - v)
            elif act == 2:
                for j in range(n):
                    v = (src[base + j] - m[j]) * r[j]
                    dst[base + j] = v if v > 0 else v * slope
            else:
                for j in range(n):
                    dst[base + j] = (src[base + j] - m[j]) * r[j]
            t += per


@njit(**_JIT)
def proj_rms_kernel(x, w, bias, gain, eps, out):
    """The level projection on (N, C) rows: ``y = x W^T + b``, ``out = y rsqrt(mean(y^2) + eps) gain``.

    Blocks of 256 rows are transposed into scratch first, so every inner loop runs over the
    256 rows of a block (vectorised) instead of over the few channels.
    """
    n, c = x.shape
    co = w.shape[0]
    blk = 256
    for bi in prange((n + blk - 1) // blk):
        r0 = bi * blk
        m = min(blk, n - r0)
        xt = np.empty((c, blk), dtype=x.dtype)
        yt = np.empty((co, blk), dtype=x.dtype)
        ss = np.zeros(blk, dtype=x.dtype)
        for r in range(m):
            for k in range(c):
                xt[k, r] = x[r0 + r, k]
        for o in range(co):
            yo = yt[o]
            bo = bias[o]
            for r in range(m):
                yo[r] = bo
            for k in range(c):
                wk = w[o, k]
                xk = xt[k]
                for r in range(m):
                    yo[r] += wk * xk[r]
            for r in range(m):
                ss[r] += yo[r] * yo[r]
        for r in range(m):
            ss[r] = 1 / np.sqrt(ss[r] / co + eps)
        for r in range(m):
            for o in range(co):
                out[r0 + r, o] = yt[o, r] * ss[r] * gain[o]


@njit(**_JIT)
def avg_pool2_kernel(x, out):
    """2x2x2 average pooling (stride 2, no padding, odd remainders dropped) of
    (B, D, H, W, C) data into (B, D//2, H//2, W//2, C); any strides."""
    nb, od, oh, ow, c = out.shape
    for unit in prange(nb * od):
        b = unit // od
        i = unit % od
        for j in range(oh):
            for k in range(ow):
                for ch in range(c):
                    s = (
                        x[b, 2 * i, 2 * j, 2 * k, ch] + x[b, 2 * i, 2 * j, 2 * k + 1, ch]
                        + x[b, 2 * i, 2 * j + 1, 2 * k, ch] + x[b, 2 * i, 2 * j + 1, 2 * k + 1, ch]
                        + x[b, 2 * i + 1, 2 * j, 2 * k, ch] + x[b, 2 * i + 1, 2 * j, 2 * k + 1, ch]
                        + x[b, 2 * i + 1, 2 * j + 1, 2 * k, ch] + x[b, 2 * i + 1, 2 * j + 1, 2 * k + 1, ch]
                    )
                    out[b, i, j, k, ch] = s * 0.125


@njit(**_JIT)
def warp_kernel(img, ddf, out):
    """Trilinear resampling of ``img`` (B, D, H, W, C) at ``p + ddf(p)``, zeros outside.

    ``ddf`` (Bd, D, H, W, 3) in voxels (Bd = B or 1, broadcast); ``out`` (B, D, H, W, C).
    Any strides (views of channels-first or channels-last tensors). The same sampling rule
    as ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)``: each of
    the 8 neighbours inside the grid contributes its trilinear weight, the others nothing.
    """
    nb, sd, sh, sw, c = img.shape
    nbd = ddf.shape[0]
    for unit in prange(nb * sd):
        b = unit // sd
        i = unit % sd
        bd = b if nbd > 1 else 0
        for j in range(sh):
            for k in range(sw):
                z = i + ddf[bd, i, j, k, 0]
                y = j + ddf[bd, i, j, k, 1]
                x = k + ddf[bd, i, j, k, 2]
                for ch in range(c):
                    out[b, i, j, k, ch] = 0
                # no neighbour inside the grid (also NaN, whose comparisons are all false)
                if not (z > -1 and z < sd and y > -1 and y < sh and x > -1 and x < sw):
                    continue
                z0 = int(np.floor(z))
                y0 = int(np.floor(y))
                x0 = int(np.floor(x))
                fz = z - z0
                fy = y - y0
                fx = x - x0
                for dz in range(2):
                    zz = z0 + dz
                    if zz < 0 or zz >= sd:
                        continue
                    wz = fz if dz else 1 - fz
                    for dy in range(2):
                        yy = y0 + dy
                        if yy < 0 or yy >= sh:
                            continue
                        wzy = wz * (fy if dy else 1 - fy)
                        for dx in range(2):
                            xx = x0 + dx
                            if xx < 0 or xx >= sw:
                                continue
                            wt = wzy * (fx if dx else 1 - fx)
                            for ch in range(c):
                                out[b, i, j, k, ch] += wt * img[b, zz, yy, xx, ch]
