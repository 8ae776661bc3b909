"""Diffeomorphic instance optimisation of one image pair: the deformable stage of ``register``.

Two schemes, chosen with ``DeformableConfig.method`` (both are diffeomorphic by construction:
the map is only ever changed by composing it with small, smooth updates, or integrated from a
smooth velocity):

* ``"greedy"`` -- greedy composition with smoothed updates, as ANTs SyN and FireANTs' greedy
  registration do: at every step the LNCC force (the gradient of the loss with respect to a
  displacement composed on the right of the current map) is smoothed with a Gaussian
  (``sigma_update``, the "fluid" part), scaled by ``lr`` and capped at ``max_step`` voxels,
  composed with the map (``u <- u o (id + s)``), and the whole map is smoothed
  (``sigma_field``, the "elastic" part). The inverse map is found by fixed-point iteration
  ``w(y) = -u(y + w(y))`` at the end of every level, started from the previous level's.
* ``"svf"`` -- a stationary velocity field ``v`` integrated by scaling and squaring
  (``exp(v)``); the same smoothed force updates ``v`` (``v <- v + s``, the first-order
  Baker-Campbell-Hausdorff step of log-domain demons), ``v`` is smoothed with
  ``sigma_field``; the inverse is ``exp(-v)``.

Both run coarse to fine on a pyramid (``levels``: downsampling factors; by default up to 100
steps at 1/4, 30 at 1/2 and 2 at full size), each level stopping when the loss has improved by
less than ``tol`` (relative) over the last ``patience`` steps, or at ``iterations`` for that
level. After a coarser level, ``"svf"``'s full-size level optimises only a small residual
velocity on top of the coarser map, integrated on its own grid and upsampled once
(``full_residual``): the whole velocity is never integrated at full size, where one
composition of fields costs eight at 1/2 (see ``benchmarks/ablations``: the two full-size
steps raise the Dice of the demo's misaligned validation pairs by 0.004; the residual scheme
saves 2.7 s a pair against integrating the whole velocity, at the same Dice).

Conventions (:mod:`psmamba.spatial`): images ``(1, 1, D, H, W)``; the forward field ``ddf``
``(1, 3, D, H, W)`` is in voxels of the fixed grid and fixed voxel ``p`` samples the moving
image at ``p + ddf[p]``; ``ddf_inverse`` maps the other way (moving voxel ``q`` to the fixed
image at ``q + ddf_inverse[q]``), on the same grid (the pipeline resamples the moving image
onto the fixed grid first).

On the CPU (float32/float64) the inner loop runs in the numba kernels of
:mod:`psmamba._deformable_cpu` (``backend="numba"``, the default ``"auto"`` there); elsewhere
(CUDA, other dtypes) and with ``backend="torch"`` the same steps run as PyTorch operations.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from psmamba.errors import PsmambaError

__all__ = [
    "DeformableConfig",
    "DeformableResult",
    "LevelLog",
    "register_deformable",
    "lncc_force",
    "gaussian_smooth",
    "sample",
    "invert_ddf",
    "affine_field",
    "pyramid_size",
]

_METHODS = ("greedy", "svf")
#: scaling and squaring starts from ``v / 2^K`` no longer than this (voxels)
_SQUARING_START = 0.25
_BACKENDS = ("auto", "numba", "torch")
#: the widest smoothing of :class:`DeformableConfig` (voxels of a level grid)
_SIGMA_MAX = 32.0
#: the widest LNCC box of :class:`DeformableConfig` (voxels)
_WINDOW_MAX = 99


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DeformableConfig:
    """Settings of :func:`register_deformable` (validated on construction).

    Attributes:
        method: ``"svf"`` (stationary velocity field, scaling and squaring; the default) or
            ``"greedy"`` (composition of smoothed updates, SyN-like). On the demo's full-size
            brains both reach the same Dice; the SVF's inverse ``exp(-v)`` is folding-free by
            construction, the greedy inverse (fixed-point iteration) can fold where the map
            compresses strongly.
        levels: downsampling factors, coarse to fine; the grid of factor ``f`` has
            ``ceil((n - 1) / f) + 1`` voxels per axis (corner voxel centres kept).
        iterations: the most steps per level (same length as ``levels``; 0 skips a level's
            optimisation, its field is only carried over). Default 100, 30, 2.
        lr: step size: the update is ``-lr`` times the smoothed force (the gradient of the summed
            negative local squared correlation with respect to a displacement in voxels).
        max_step: the largest update of one step, in voxels of the level grid (the update is
            scaled down when its largest vector is longer; keeps each composed step invertible).
        sigma_update: Gaussian sigma (voxels of the level grid) of the update ("fluid"); at most 32.
        sigma_field: Gaussian sigma (voxels) applied to the whole field / velocity after each
            step ("elastic"); 0 turns it off; at most 32.
        window: LNCC box width in voxels of every level (odd, 3 to 99).
        tol: a level stops when ``(loss[k - patience] - loss[k]) / |loss[k]| < tol``; 0 turns
            the test off (every level runs its ``iterations``).
        patience: the window (steps) of that test.
        svf_steps: the most scaling-and-squaring steps of ``"svf"`` (fewer while the velocity
            is short: see :func:`squaring_steps`).
        inverse_iters: fixed-point steps of the inversion per level (``"greedy"``, and an
            ``init_ddf`` of ``"svf"``); the final full-size inversion takes ``inverse_iters_full``.
            (``"svf"`` with its residual full-size level inverts ``init_ddf`` on the coarser
            grid with these counts, then takes one full-size step.)
        min_size: the smallest level grid allowed, voxels per axis.
        backend: ``"auto"`` (numba on the CPU for float32/float64 when it imports), ``"numba"``
            or ``"torch"``.
        full_residual: ``"svf"``: after a coarser level, the full-size level optimises a small
            residual velocity on top of the coarser map integrated on its own grid and upsampled
            (True, the default: about half the full-size work, see :func:`_svf_full`), instead
            of the whole velocity upsampled and integrated at full size at every step (False).
    """

    method: str = "svf"
    levels: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (100, 30, 2)
    lr: float = 1.0
    max_step: float = 0.5
    sigma_update: float = 1.5
    sigma_field: float = 0.5
    window: int = 5
    tol: float = 1e-3
    patience: int = 10
    svf_steps: int = 8
    inverse_iters: int = 20
    inverse_iters_full: int = 5
    min_size: int = 8
    backend: str = "auto"
    full_residual: bool = True

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise PsmambaError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.backend not in _BACKENDS:
            raise PsmambaError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        levels = tuple(self.levels)
        if not levels or any(int(f) != f or f < 1 for f in levels):
            raise PsmambaError(f"levels must be positive integer factors, got {self.levels}")
        if list(levels) != sorted(levels, reverse=True) or len(set(levels)) != len(levels):
            raise PsmambaError(f"levels must run coarse to fine (decreasing factors), got {self.levels}")
        its = tuple(self.iterations)
        if len(its) != len(levels):
            raise PsmambaError(f"iterations needs one count per level ({len(levels)}), got {self.iterations}")
        if any(int(n) != n or n < 0 for n in its):
            raise PsmambaError(f"iterations must be integers >= 0, got {self.iterations}")
        object.__setattr__(self, "levels", tuple(int(f) for f in levels))
        object.__setattr__(self, "iterations", tuple(int(n) for n in its))
        for name, lo, strict in (
            ("lr", 0.0, True),
            ("max_step", 0.0, True),
            ("sigma_update", 0.0, False),
            ("sigma_field", 0.0, False),
            ("tol", 0.0, False),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                    or (v <= lo if strict else v < lo):
                raise PsmambaError(f"{name} must be a finite number {'>' if strict else '>='} {lo:g}, got {v!r}")
        for name in ("sigma_update", "sigma_field"):
            if getattr(self, name) > _SIGMA_MAX:
                raise PsmambaError(f"{name} must be at most {_SIGMA_MAX:g} voxels (the Gaussian spans 6 sigma; "
                                   f"wider smooths any image flat), got {getattr(self, name)!r}")
        if not isinstance(self.full_residual, bool):
            raise PsmambaError(f"full_residual must be True or False, got {self.full_residual!r}")
        w = self.window
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or int(w) != w \
                or not 3 <= w <= _WINDOW_MAX or w % 2 == 0:
            raise PsmambaError(f"window must be an odd integer in [3, {_WINDOW_MAX}], got {w!r}")
        object.__setattr__(self, "window", int(w))  # 5.0 reached numba as a float (a TypingError)
        for name, lo in (("patience", 1), ("svf_steps", 0), ("inverse_iters", 0), ("inverse_iters_full", 0), ("min_size", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or int(v) != v or v < lo:
                raise PsmambaError(f"{name} must be an integer >= {lo}, got {v!r}")
            object.__setattr__(self, name, int(v))


@dataclass(frozen=True)
class LevelLog:
    """What one pyramid level did: factor, grid, steps taken, loss at the first and last step,
    whether the convergence test stopped it, and its wall time (s)."""

    factor: int
    shape: tuple[int, int, int]
    iterations: int
    loss_first: float
    loss_last: float
    converged: bool
    seconds: float


@dataclass
class DeformableResult:
    """The maps found by :func:`register_deformable`, on the fixed grid.

    Attributes:
        ddf: ``(1, 3, D, H, W)`` forward displacement in voxels (fixed ``p`` -> moving ``p + ddf[p]``),
            the initial field included.
        ddf_inverse: ``(1, 3, D, H, W)`` the inverse map (moving ``q`` -> fixed ``q + ddf_inverse[q]``).
        velocity: ``(1, 3, D, H, W)`` the stationary velocity (``"svf"``), else None.
        log: one :class:`LevelLog` per level.
        seconds: wall time of the whole call.
    """

    ddf: torch.Tensor
    ddf_inverse: torch.Tensor
    velocity: torch.Tensor | None
    log: list[LevelLog] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready: per-level iterations, losses and times."""
        return {
            "seconds": self.seconds,
            "levels": [
                {"factor": g.factor, "shape": list(g.shape), "iterations": g.iterations,
                 "loss_first": g.loss_first, "loss_last": g.loss_last, "converged": g.converged,
                 "seconds": g.seconds}
                for g in self.log
            ],
        }


# --------------------------------------------------------------------------- backend helpers
def _use_numba(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    ok = all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
    if ok:
        try:
            import psmamba._deformable_cpu  # noqa: F401
        except ImportError:
            ok = False
    if backend == "numba" and not ok:
        raise PsmambaError("backend='numba' needs numba and float32/float64 tensors on the CPU")
    return ok


def _threads():
    from psmamba.nn._numba import NumbaThreads, threads

    return NumbaThreads(threads())


def _np(t: torch.Tensor):
    """The ``(C, D, H, W)`` numpy view of a contiguous ``(1, C, D, H, W)`` CPU tensor."""
    return t.detach()[0].numpy()


def _check_vol(x: torch.Tensor, name: str, channels: int | None = None) -> None:
    if not torch.is_tensor(x) or x.ndim != 5 or x.shape[0] != 1 or (channels is not None and x.shape[1] != channels):
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        want = f"(1, {channels}, D, H, W)" if channels else "(1, C, D, H, W)"
        raise PsmambaError(f"{name} must have shape {want}, got {shape}")


def gaussian_taps(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of width ``2 ceil(3 sigma) + 1`` (``[1.]`` for sigma 0)."""
    r = int(math.ceil(3.0 * sigma)) if sigma > 0 else 0
    if r == 0:
        return torch.ones(1, device=device, dtype=dtype)
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_smooth(x: torch.Tensor, sigma: float, backend: str = "auto") -> torch.Tensor:
    """Separable Gaussian smoothing of every channel of ``x`` ``(1, C, D, H, W)``, faces replicated.

    ``sigma`` in voxels; the kernel is cut at 3 sigma. Returns a new tensor.
    """
    _check_vol(x, "x")
    if sigma <= 0:
        return x.clone()
    k = gaussian_taps(sigma, x.device, x.dtype)
    r = (k.numel() - 1) // 2
    if _use_numba(backend, x):
        from psmamba._deformable_cpu import gauss_kernel

        xc = x.detach().contiguous()
        out = torch.empty_like(xc)
        tmp = torch.empty_like(xc)
        with _threads():
            gauss_kernel(_np(xc), k.numpy(), _np(out), _np(tmp))
        return out
    c = x.shape[1]
    y = x
    for axis in (2, 3, 4):
        shape = [1, 1, 1]
        shape[axis - 2] = k.numel()
        pad = [0] * 6
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = r  # F.pad lists the last axis first
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return y


def sample(src: torch.Tensor, disp: torch.Tensor, sign: float = 1.0, add: bool = False,
           backend: str = "auto") -> torch.Tensor:
    """``sign * src(p + disp(p))`` (``+ disp`` when ``add``), trilinear with border clamping.

    ``src (1, C, D, H, W)``, ``disp (1, 3, D, H, W)`` voxels on the same grid. ``add=True``
    with ``C = 3`` is :func:`psmamba.spatial.compose` ``(src, disp, padding="border")``.
    """
    _check_vol(src, "src")
    _check_vol(disp, "disp", 3)
    if add and src.shape[1] != 3:
        raise PsmambaError(f"composition needs a 3-channel field, got {tuple(src.shape)}")
    if _use_numba(backend, src, disp) and src.dtype == disp.dtype:
        from psmamba._deformable_cpu import sample_kernel

        s = src.detach().contiguous()
        d = disp.detach().contiguous()
        out = torch.empty_like(s)
        with _threads():
            sample_kernel(_np(s), _np(d), float(sign), bool(add), _np(out))
        return out
    from psmamba.spatial import warp

    out = warp(src, disp.to(src.dtype), padding="border")
    if sign != 1.0:
        out = out * sign
    return out + disp if add else out


def lncc_force(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    window: int,
    mask: torch.Tensor | None = None,
    eps: float | None = None,
    backend: str = "auto",
    flat: float | None = None,
) -> tuple[float, torch.Tensor]:
    """Loss and force of LNCC (the :class:`psmamba.losses.LNCC` formula, zero-padded box window).

    Windows where either image is flat are left out (cc 0, no force), as ANTs' CC metric does:
    with any constant in the denominator, a window of little contrast would reward raising the
    warped image's local contrast, and an image registered to itself would move.

    Args:
        warped, fixed: ``(1, 1, D, H, W)``.
        window: odd box width.
        mask: optional ``(1, 1, D, H, W)`` weights of the fixed space (the similarity is
            restricted to it).
        eps: the LNCC denominator's constant (default: ``1e-6 * vmin**2``, only a guard).
        flat: a window is flat when its variance is below ``flat`` times the fixed image's
            global variance (default 1e-3: a standard deviation of 3 % of the image's).

    Returns:
        ``(loss, force)``: ``loss = -sum(m cc) / sum(m)`` (-1 is a perfect match) and ``force``
        ``(1, 3, D, H, W)`` ``= d(-sum(m cc)) / dI * grad I`` (``np.gradient`` of the warped
        image), the gradient of the SUMMED loss with respect to a displacement composed on the
        right of the current map. The sum (not the mean) keeps the force per voxel independent
        of the image size, and LNCC makes it independent of the intensity scale.
    """
    _check_vol(warped, "warped", 1)
    _check_vol(fixed, "fixed", 1)
    if warped.shape != fixed.shape:
        raise PsmambaError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} differ")
    if mask is not None:
        _check_vol(mask, "mask", 1)
        mask = mask.to(warped)
    n = float(window**3)
    var_g = float(fixed.detach().double().var())
    vmin = n * (1e-3 if flat is None else float(flat)) * max(var_g, 1e-30)  # box sums hold n * variance
    eps = 1e-6 * vmin * vmin if eps is None else float(eps)
    if _use_numba(backend, warped, fixed):
        from psmamba._deformable_cpu import (
            box_sum_kernel,
            lncc_coeff_kernel,
            lncc_force_kernel,
            lncc_moments_kernel,
        )

        w = warped.detach().contiguous()
        f = fixed.detach().to(w.dtype).contiguous()
        shape = tuple(w.shape[2:])
        # 13 scalar volumes of memory at the peak (the largest of io's full-size level): the
        # moments' volumes serve as the box sums' scratch, then hold the gradient's coefficients,
        # whose box sums go where the moments' sums were
        mom = torch.empty((5,) + shape, dtype=w.dtype)
        sums = torch.empty_like(mom)
        m_np = mask.detach().contiguous()[0].numpy() if mask is not None else w[0].numpy()
        force = torch.empty((1, 3) + shape, dtype=w.dtype)
        r = window // 2
        with _threads():
            lncc_moments_kernel(w[0].numpy(), f[0].numpy(), mom.numpy())
            box_sum_kernel(mom.numpy(), r, sums.numpy(), mom.numpy())
            coef = mom[:4].numpy()
            cc_sum, m_sum = lncc_coeff_kernel(sums.numpy(), m_np, mask is not None, n, eps, vmin, coef)
            box_sum_kernel(coef, r, sums[:4].numpy(), coef)
            lncc_force_kernel(w[0].numpy(), f[0].numpy(), sums[:4].numpy(), -1.0, force[0].numpy())
        return -float(cc_sum) / max(float(m_sum), 1e-12), force
    from psmamba.losses import box_sum

    with torch.enable_grad():
        w = warped.detach().clone().requires_grad_(True)
        f = fixed.detach().to(w.dtype)
        sums = box_sum(torch.cat([w, f, w * w, f * f, w * f], dim=1), window)
        s_w, s_f, s_ww, s_ff, s_wf = torch.split(sums, 1, dim=1)
        cross = s_wf - s_w * s_f / n
        var_w = s_ww - s_w * s_w / n
        var_f = s_ff - s_f * s_f / n
        keep = ((var_w >= vmin) & (var_f >= vmin)).to(w.dtype)
        cc = keep * cross * cross / (var_w * var_f + eps)
        if mask is not None:
            cc = cc * mask
        total = -cc.sum()
        (grad,) = torch.autograd.grad(total, w)
    msum = float(mask.sum()) if mask is not None else float(w[0, 0].numel())
    gimg = torch.gradient(w.detach()[0, 0], dim=(0, 1, 2))
    force = torch.stack([grad[0, 0] * g for g in gimg]).unsqueeze(0)
    return float(total.detach()) / max(msum, 1e-12), force


def invert_ddf(ddf: torch.Tensor, iters: int = 20, init: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """The inverse of ``x -> x + ddf(x)`` by fixed-point iteration ``w(y) = -ddf(y + w(y))``.

    Converges where the map is a contraction away from the identity (``|grad ddf| < 1``), as
    the smooth, small-step maps of this module are. ``init``: a starting inverse (default
    ``-ddf``). ``(1, 3, D, H, W)`` in and out.
    """
    _check_vol(ddf, "ddf", 3)
    w = -ddf if init is None else init
    for _ in range(int(iters)):
        w = sample(ddf, w, sign=-1.0, backend=backend)
    return w


def _max_norm(x: torch.Tensor, backend: str) -> float:
    if backend == "numba":
        from psmamba._deformable_cpu import max_norm_kernel

        with _threads():
            return float(max_norm_kernel(_np(x)))
    return float(x.pow(2).sum(1).max().sqrt())


def squaring_steps(v: torch.Tensor, most: int, backend: str = "auto") -> int:
    """Scaling-and-squaring steps for ``v``: enough that ``v / 2^K`` moves no voxel more than
    1/4 voxel (a smooth field that small is invertible), at most ``most``."""
    top = _max_norm(v, "numba" if _use_numba(backend, v) else "torch")
    if top <= _SQUARING_START:
        return 0
    return min(int(most), int(math.ceil(math.log2(top / _SQUARING_START))))


def _exp(v: torch.Tensor, most: int, backend: str) -> torch.Tensor:
    """``exp(v)`` by scaling and squaring with border-clamped compositions (as
    :func:`psmamba.spatial.integrate_svf` with ``padding="border"``), the step count from
    :func:`squaring_steps`."""
    steps = squaring_steps(v, most, backend)
    if backend == "numba":
        from psmamba._deformable_cpu import axpy_kernel

        u = torch.empty_like(v)  # a new tensor: the caller's v is not modified
        with _threads():
            axpy_kernel(1.0 / 2**steps, _np(v), _np(v), False, _np(u))
    else:
        u = v / (2**steps)
    for _ in range(steps):
        u = sample(u, u, add=True, backend=backend)
    return u


def affine_field(field: torch.Tensor, a, b, shape: Sequence[int], backend: str = "auto") -> torch.Tensor:
    """``B (q + field(q)) - r`` with ``q = A r``, for every voxel ``r`` of a grid of ``shape``.

    ``field`` ``(1, 3, d, h, w)`` in voxels of its own grid, read trilinearly at ``q`` (border
    clamped); ``a``, ``b``: ``(4, 4)`` (or ``(3, 4)``) affine maps of voxel coordinates. The map
    "first ``A``, then ``field``, then ``B``", as a displacement field on the new grid: with
    ``A = I`` an affine after a deformable map (:func:`psmamba.affine.affine_ddf`); an inverse
    field carried onto another image's grid (``register``'s ``ddf_inverse``). On the CPU one
    numba pass (:func:`psmamba._deformable_cpu.affine_field_kernel`); else grid_sample.
    Returns ``(1, 3) + shape`` in ``field``'s dtype.
    """
    import numpy as np

    _check_vol(field, "field", 3)
    shape = tuple(int(s) for s in shape)
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float64)[:3])
    b = np.ascontiguousarray(np.asarray(b, dtype=np.float64)[:3])
    if _use_numba(backend, field):
        from psmamba._deformable_cpu import affine_field_kernel

        src = field.detach().contiguous()
        out = torch.empty((1, 3) + shape, dtype=src.dtype)
        with _threads():
            affine_field_kernel(_np(src), a, b, _np(out))
        return out
    from psmamba.spatial import identity_grid

    r = identity_grid(shape, device=field.device, dtype=torch.float64)

    def apply(m, pos):
        lin = torch.as_tensor(m[:, :3], dtype=pos.dtype, device=pos.device)
        off = torch.as_tensor(m[:, 3], dtype=pos.dtype, device=pos.device).view(1, 3, 1, 1, 1)
        return torch.einsum("ij,bj...->bi...", lin, pos) + off

    q = apply(a, r)
    size = field.shape[2:]
    scale = torch.tensor([2.0 / max(int(n) - 1, 1) for n in size], dtype=q.dtype, device=q.device)
    grid = (q * scale.view(1, 3, 1, 1, 1) - 1.0).flip(1).permute(0, 2, 3, 4, 1)
    u = F.grid_sample(field.detach().to(q.dtype), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return (apply(b, q + u) - r).to(field.dtype)


def pyramid_size(size: Sequence[int], factor: int) -> tuple[int, int, int]:
    """The level grid of ``factor``: ``ceil((n - 1) / factor) + 1`` voxels per axis (corners kept)."""
    return tuple(int(math.ceil((int(s) - 1) / factor)) + 1 for s in size)  # type: ignore[return-value]


def _resize_image(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="trilinear", align_corners=True)


def _resize_field(ddf: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    from psmamba.spatial import resize_ddf

    size = tuple(int(s) for s in size)
    if tuple(ddf.shape[2:]) == size:
        return ddf
    return resize_ddf(ddf, size)


def _as_volume(x, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if x is None:
        return None  # type: ignore[return-value]
    t = torch.as_tensor(x) if not torch.is_tensor(x) else x
    if t.ndim == 3:
        t = t[None, None]
    if t.ndim != 5 or t.shape[:2] != (1, 1):
        raise PsmambaError(f"{name} must be a (D, H, W) or (1, 1, D, H, W) volume, got {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise PsmambaError(f"{name} {tuple(t.shape[2:])} is not on the fixed grid {tuple(like.shape[2:])}")
        t = t.to(device=like.device, dtype=like.dtype)
    elif not t.is_floating_point():
        t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise PsmambaError(f"{name} holds NaN or infinite values")
    return t


# --------------------------------------------------------------------------- the optimiser
def _start_field(t: torch.Tensor, name: str, fx: torch.Tensor, finite: bool = True) -> torch.Tensor:
    """A starting field checked (``(1, 3)`` + the fixed grid, finite) and put on ``fx``'s device/dtype."""
    _check_vol(t, name, 3)
    size = tuple(int(s) for s in fx.shape[2:])
    if tuple(t.shape[2:]) != size:
        raise PsmambaError(f"{name} grid {tuple(t.shape[2:])} is not the fixed grid {size}")
    t = t.detach().to(fx)
    if finite and not bool(torch.isfinite(t).all()):
        raise PsmambaError(f"{name} holds NaN or infinite values")
    return t


def register_deformable(
    fixed,
    moving,
    config: DeformableConfig | None = None,
    *,
    fixed_mask=None,
    init_ddf: torch.Tensor | None = None,
    init_velocity: torch.Tensor | None = None,
    init_inverse: torch.Tensor | None = None,
    **overrides: Any,
) -> DeformableResult:
    """Diffeomorphic registration of ``moving`` onto ``fixed`` (one pair, same grid).

    Args:
        fixed, moving: ``(D, H, W)`` or ``(1, 1, D, H, W)`` tensors / arrays on one grid (e.g.
            the moving image already resampled through an affine), intensities on a common
            scale (e.g. percentile scaled to [0, 1]; LNCC is invariant to a linear rescaling).
        config: a :class:`DeformableConfig`; keyword ``overrides`` replace its fields
            (``register_deformable(f, m, lr=0.5)``).
        fixed_mask: optional ``(D, H, W)`` weights in [0, 1] on the fixed grid; the similarity is
            computed only there.
        init_ddf: optional ``(1, 3, D, H, W)`` starting field on the fixed grid (an affine as a
            displacement, a network's prediction). ``"greedy"`` starts from it; ``"svf"`` keeps it
            as a fixed first map: ``ddf = init_ddf o exp(v)``.
        init_velocity: ``"svf"`` only: the starting velocity ``(1, 3, D, H, W)``.
        init_inverse: ``"svf"`` with ``init_ddf``: an approximate inverse of ``init_ddf`` (e.g.
            a network's, found on its coarser grid), refined by ``inverse_iters_full``
            fixed-point steps instead of inverting ``init_ddf`` from scratch
            (``inverse_iters`` steps at full size).

    Returns:
        :class:`DeformableResult` (forward and inverse fields on the fixed grid, per-level log).

    Raises:
        PsmambaError: bad settings, shapes, non-finite inputs, or a level grid below
            ``min_size`` voxels per axis (raised before any work).
    """
    t0 = time.perf_counter()
    cfg = config or DeformableConfig()
    if overrides:
        unknown = set(overrides) - set(DeformableConfig.__dataclass_fields__)
        if unknown:
            raise PsmambaError(f"unknown setting(s) {sorted(unknown)} for register_deformable")
        cfg = replace(cfg, **overrides)
    fx = _as_volume(fixed, "fixed")
    mv = _as_volume(moving, "moving", like=fx)
    mask = _as_volume(fixed_mask, "fixed_mask", like=fx)
    if mask is not None and not bool(((mask >= 0) & (mask <= 1)).all()):  # NaN fails too
        raise PsmambaError("fixed_mask must hold weights in [0, 1] (a binary mask: 0 outside, 1 inside)")
    size = tuple(int(s) for s in fx.shape[2:])
    for f in cfg.levels:
        ls = pyramid_size(size, f)
        if min(ls) < cfg.min_size:
            raise PsmambaError(
                f"levels: the 1/{f} grid of a {'x'.join(map(str, size))} image is "
                f"{'x'.join(map(str, ls))}, below min_size={cfg.min_size} voxels per axis "
                "(drop that level or use a larger image)"
            )
    if init_ddf is not None:
        init_ddf = _start_field(init_ddf, "init_ddf", fx)
    if init_velocity is not None:
        if cfg.method != "svf":
            raise PsmambaError("init_velocity is for method='svf'; give init_ddf to the greedy method")
        init_velocity = _start_field(init_velocity, "init_velocity", fx)  # NaN gave an all-NaN field
    if init_inverse is not None:
        if init_ddf is None:
            raise PsmambaError("init_inverse is the inverse of init_ddf: give init_ddf too")
        init_inverse = _start_field(init_inverse, "init_inverse", fx)
    be = "numba" if _use_numba(cfg.backend, fx) else "torch"

    with torch.no_grad():
        if cfg.method == "greedy":
            ddf, inv, vel, log = _greedy(fx, mv, mask, cfg, init_ddf, be)
        else:
            ddf, inv, vel, log = _svf(fx, mv, mask, cfg, init_ddf, init_velocity, be, init_inverse)
    return DeformableResult(ddf=ddf, ddf_inverse=inv, velocity=vel, log=log, seconds=time.perf_counter() - t0)


class _Pyramid:
    """Images of every level, built fine to coarse by halving steps: before each resampling the
    finer image is smoothed with sigma = half the factor between the two grids (so the 1/4 image
    has seen sigma ~2.2 full-size voxels), far cheaper than smoothing the full image with a
    wide kernel for every level."""

    def __init__(self, fx, mv, mask, levels: Sequence[int], be: str):
        size = tuple(int(s) for s in fx.shape[2:])
        self.levels: dict[int, tuple] = {}
        f, m, k, prev = fx, mv, mask, 1
        for factor in sorted(levels):
            ls = pyramid_size(size, factor)
            if factor != prev:
                sigma = 0.5 * factor / prev
                f = _resize_image(gaussian_smooth(f, sigma, be), ls).contiguous()
                m = _resize_image(gaussian_smooth(m, sigma, be), ls).contiguous()
                k = None if k is None else _resize_image(k, ls).contiguous()
            self.levels[factor] = (f, m, k, ls)
            prev = factor

    def __getitem__(self, factor: int):
        return self.levels[factor]


class _Convergence:
    """Relative loss improvement over the last ``patience`` steps below ``tol`` -> stop."""

    def __init__(self, tol: float, patience: int):
        self.tol, self.patience, self.losses = tol, patience, []

    def done(self, loss: float) -> bool:
        self.losses.append(loss)
        if self.tol <= 0 or len(self.losses) <= self.patience:
            return False
        old, new = self.losses[-1 - self.patience], self.losses[-1]
        return (old - new) / max(abs(new), 1e-12) < self.tol


def _update(force: torch.Tensor, cfg: DeformableConfig, be: str) -> torch.Tensor:
    """``-lr * G(force)``, scaled down so that no vector exceeds ``max_step`` voxels."""
    s = gaussian_smooth(force, cfg.sigma_update, be)
    if be == "numba":
        # no torch operation inside the loop: torch's and numba's OpenMP pools spin-wait for
        # each other's cores on a 2-core machine (measured: a torch max took 9 ms instead of 0.2)
        from psmamba._deformable_cpu import axpy_kernel, max_norm_kernel

        with _threads():
            top = cfg.lr * float(max_norm_kernel(_np(s)))
            a = -cfg.lr * (cfg.max_step / top if top > cfg.max_step else 1.0)
            axpy_kernel(a, _np(s), _np(s), False, _np(s))
        return s
    s.mul_(-cfg.lr)
    top = _max_norm(s, be)
    if top > cfg.max_step:
        s.mul_(cfg.max_step / top)
    return s


def _add(v: torch.Tensor, s: torch.Tensor, be: str) -> torch.Tensor:
    """``v + s`` (in place into ``v`` on the numba path)."""
    if be == "numba":
        from psmamba._deformable_cpu import axpy_kernel

        with _threads():
            axpy_kernel(1.0, _np(s), _np(v), True, _np(v))
        return v
    return v + s


def _optimise_level(n_it: int, cfg: DeformableConfig, f, m, k, be: str, current, step):
    """One level's loop: warp ``m`` by ``current(it)``, LNCC force against ``f`` (mask ``k``), and
    ``step(update)`` with the smoothed, capped update, until ``n_it`` steps or the convergence
    test stops it. Returns ``(steps, first loss, last loss, stopped)``."""
    conv = _Convergence(cfg.tol, cfg.patience)
    first = last = float("nan")
    it = 0
    while it < n_it:
        loss, force = lncc_force(sample(m, current(it), backend=be), f, cfg.window, k, backend=be)
        if it == 0:
            first = loss
        last = loss
        if conv.done(loss):
            return it, first, last, True
        step(_update(force, cfg, be))
        it += 1
    return it, first, last, False


def _greedy(fx, mv, mask, cfg: DeformableConfig, init, be: str):
    size = tuple(int(s) for s in fx.shape[2:])
    u = None
    inv = None
    log: list[LevelLog] = []
    pyramid = _Pyramid(fx, mv, mask, cfg.levels, be)
    for factor, n_it in zip(cfg.levels, cfg.iterations):
        t = time.perf_counter()
        f, m, k, ls = pyramid[factor]
        if u is None:
            u = torch.zeros((1, 3) + ls, dtype=fx.dtype, device=fx.device) if init is None else _resize_field(init, ls).clone()
        else:
            u = _resize_field(u, ls)
        u = u.contiguous()
        if inv is not None:
            inv = _resize_field(inv, ls).contiguous()

        def step(s):
            nonlocal u
            u = sample(u, s, add=True, backend=be)  # u o (id + s)
            if cfg.sigma_field > 0:
                u = gaussian_smooth(u, cfg.sigma_field, be)

        it, first, last, stopped = _optimise_level(n_it, cfg, f, m, k, be, lambda _: u, step)
        n_inv = cfg.inverse_iters if factor > 1 else cfg.inverse_iters_full
        if inv is None and factor == 1:
            n_inv = max(n_inv, cfg.inverse_iters)  # no coarser start: iterate from -u
        inv = invert_ddf(u, n_inv, init=inv, backend=be)
        log.append(LevelLog(factor, ls, it, first, last, stopped, time.perf_counter() - t))
    assert u is not None and inv is not None
    if tuple(u.shape[2:]) != size:  # the finest level was coarser than the image
        u = _resize_field(u, size)
        inv = invert_ddf(u, cfg.inverse_iters_full, init=_resize_field(inv, size), backend=be)
    return u, inv, None, log


def _svf(fx, mv, mask, cfg: DeformableConfig, init, init_v, be: str, init_inv=None):
    size = tuple(int(s) for s in fx.shape[2:])
    v = init_v
    log: list[LevelLog] = []
    pyramid = _Pyramid(fx, mv, mask, cfg.levels, be)
    levels = list(zip(cfg.levels, cfg.iterations))
    # after a coarser level, the full-size level optimises a residual velocity (see _svf_full)
    residual = cfg.full_residual and len(levels) > 1 and levels[-1][0] == 1
    for factor, n_it in levels[:-1] if residual else levels:
        t = time.perf_counter()
        f, m, k, ls = pyramid[factor]
        v = torch.zeros((1, 3) + ls, dtype=fx.dtype, device=fx.device) if v is None else _resize_field(v, ls)
        v = v.contiguous().clone()  # updated in place below: never the caller's init_velocity
        pre = None if init is None else _resize_field(init, ls).contiguous()

        def current(_, pre=pre):
            u = _exp(v, cfg.svf_steps, be)
            return u if pre is None else sample(pre, u, add=True, backend=be)  # first exp(v), then pre

        def step(s):
            nonlocal v
            v = _add(v, s, be)  # log(exp(v) o exp(s)) ~ v + s
            if cfg.sigma_field > 0:
                v = gaussian_smooth(v, cfg.sigma_field, be)

        it, first, last, stopped = _optimise_level(n_it, cfg, f, m, k, be, current, step)
        log.append(LevelLog(factor, ls, it, first, last, stopped, time.perf_counter() - t))
    pre_inv = None
    if init is not None:  # (init o exp(v))^-1 = exp(-v) o init^-1
        n_inv = cfg.inverse_iters if init_inv is None else cfg.inverse_iters_full
        if residual:  # iterated on the coarser grid (1/8 of the work), one full-size step after
            assert v is not None
            ls = tuple(v.shape[2:])
            w = invert_ddf(_resize_field(init, ls).contiguous(), n_inv, backend=be,
                           init=None if init_inv is None else _resize_field(init_inv, ls).contiguous())
            pre_inv = invert_ddf(init, 1, init=_resize_field(w, size).contiguous(), backend=be)
        else:
            pre_inv = invert_ddf(init, n_inv, init=init_inv, backend=be)
    if residual:
        assert v is not None
        return _svf_full(pyramid, v, levels[-1][1], cfg, init, pre_inv, be, log)
    v = _resize_field(v, size).contiguous()
    u = _exp(v, cfg.svf_steps, be)
    inv = _exp(-v, cfg.svf_steps, be)
    if init is not None:
        u = sample(init, u, add=True, backend=be)
        inv = sample(inv, pre_inv, add=True, backend=be)
    return u, inv, v, log


def _svf_full(pyramid: _Pyramid, v_c: torch.Tensor, n_it: int, cfg: DeformableConfig, init, pre_inv, be: str,
              log: list[LevelLog]):
    """The full-size level of ``"svf"`` after a coarser one: the map is ``init o U o exp(r)``, with
    ``U = exp(v_c)`` integrated on the coarser grid and upsampled once, and only the small
    residual velocity ``r`` optimised at full size (from zero, updates and smoothing as at the
    other levels). ``exp(r)`` needs a few squarings where ``exp`` of the whole upsampled
    velocity needs 4-6 at every step, and the final maps need no full-size ``exp(v)`` (measured:
    the full-size level and the end of :func:`register_deformable` took 6.4 of 11.7 s on the
    demo's brains before). The inverse is ``exp(-r) o U^-1 o init^-1``, ``U^-1 = exp(-v_c)``
    upsampled the same way. Returns ``(ddf, inverse, velocity, log)``; the velocity is the
    upsampled ``v_c`` plus ``r`` (its ``exp`` approximates the map; kept for inspection).
    """
    t = time.perf_counter()
    f, m, k, size = pyramid[1]
    up = _resize_field(_exp(v_c, cfg.svf_steps, be), size).contiguous()
    q = up if init is None else sample(init, up, add=True, backend=be)  # first U, then init
    del up  # (with an init: three full-size volumes less for the rest of the level)
    r = torch.zeros_like(q)

    def step(s):
        nonlocal r
        r = _add(r, s, be)
        if cfg.sigma_field > 0:
            r = gaussian_smooth(r, cfg.sigma_field, be)

    it, first, last, stopped = _optimise_level(
        n_it, cfg, f, m, k, be, lambda i: q if i == 0 else sample(q, _exp(r, cfg.svf_steps, be), add=True, backend=be),
        step)
    log.append(LevelLog(1, size, it, first, last, stopped, time.perf_counter() - t))
    inv = _resize_field(_exp(-v_c, cfg.svf_steps, be), size).contiguous()
    if pre_inv is not None:
        inv = sample(inv, pre_inv, add=True, backend=be)  # first init^-1, then U^-1
    if it == 0:
        return q, inv, _resize_field(v_c, size), log
    u = sample(q, _exp(r, cfg.svf_steps, be), add=True, backend=be)
    inv = sample(_exp(-r, cfg.svf_steps, be), inv, add=True, backend=be)
    return u, inv, _add(_resize_field(v_c, size).clone(), r, be), log
