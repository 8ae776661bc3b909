"""Affine registration: rigid (6 dof), then affine (12 dof), in world coordinates, in torch.

Conventions
-----------
* **Direction.** The result is a 4x4 matrix ``T`` (float64) that maps a point of the FIXED
  image's world space to the corresponding point of the MOVING image's world space:
  ``x_moving = T @ x_fixed``. This is the resampling ("pull") direction, the one ITK, ANTs
  and SimpleITK store in a transform file: the moving image warped onto the fixed grid is
  ``warped[p] = moving(inv(A_m) @ T @ A_f @ p)`` for fixed voxel ``p``, where ``A_f``, ``A_m``
  are the two images' voxel -> world affines.
* **World space** is the NIfTI / nibabel one: RAS+ millimetres (see :mod:`psmamba.io`). ITK
  works in LPS+; :mod:`psmamba.transforms` converts when it writes or reads an ITK file
  (``T_lps = F T_ras F`` with ``F = diag(-1, -1, 1, 1)``).
* **Centre.** Rotations and linear maps are parametrised about a centre ``c`` (the fixed
  image's intensity centre of mass, in world mm), which decouples them from the translation
  during the optimisation; ``T`` itself has the centre folded in (a plain 4x4). The ITK file
  stores ``c`` as its ``FixedParameters`` (any centre describes the same map).
* **Voxels.** Pyramid levels, sampling and displacement fields follow
  :mod:`psmamba.spatial`: voxel centres at the corners of ``grid_sample``'s normalised grid
  (``align_corners=True``). A level shrunk by ``f`` along an axis keeps every ``f``-th voxel,
  starting at voxel 0, so its affine is ``A @ diag(f, 1)``.

How a deformable stage composes with it: :func:`affine_ddf` gives the displacement on the
fixed grid, in fixed voxels, that :func:`psmamba.spatial.warp` applies to the moving image
*resampled onto the fixed grid through the two headers* (what ``register`` does first). Given
a later deformable field ``u`` found on the affinely warped image, ``affine_ddf(T, A_f,
shape, ddf=u)`` is the whole map ``p -> L(p + u(p)) - p`` (``L = inv(A_f) T A_f``), exact (no
resampling of the affine part). Equivalently, the moving image with header ``inv(T) @ A_m``
(:func:`moved_affine`) lies in register with the fixed image in world space: resampling it
onto the fixed grid through that header is the affinely registered image in ONE
interpolation, and keeps moving content that lies outside the fixed field of view before
the affine (a moving image first resampled onto the fixed grid has lost it).

Similarities (the loss is a mean over the fixed voxels of each pyramid level):

* ``"lncc"``: squared local correlation in ``window^3`` boxes, with a tiny eps and only in
  windows where the fixed image is not flat. Fixed voxels whose match falls outside the
  moving image see zeros; the mean still runs over all fixed voxels, so moving part of the
  fixed image out of view is never rewarded.
* ``"mi"``: Mattes mutual information (:class:`psmamba.losses.MutualInformation`), on a fixed
  random subset of at most 60k fixed voxels per level; outside the moving image is 0.

Inputs are scaled by their 0.5 and 99.5 percentiles to [0, 1] (clipped) before anything
else: one extreme voxel neither squashes the image nor moves the centre of mass.

Initialisation: the translation that superposes the intensity centres of mass. Moments
(principal axes) were not chosen: their axes have sign and order ambiguities (a brain's
left-right and anterior-posterior second moments differ by little), so a wrong 180 degree flip is
possible and needs a search to undo, while scanner images of one body part differ mostly by
a shift and a moderate rotation that the rigid stage recovers from the centre-of-mass start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from psmamba.errors import PsmambaError
from psmamba.losses import box_sum

__all__ = [
    "AffineResult",
    "affine_register",
    "affine_ddf",
    "voxel_matrix",
    "moved_affine",
    "resample_affine",
    "scale_intensity",
    "SIMILARITIES",
]

SIMILARITIES = ("lncc", "mi")
_INITS = ("com", "geometry", "none")
_FINE_VOXELS = 200_000  # voxels of the finest automatic level
_PATIENCE = 6  # iterations without a relative improvement of _TOL before the step halves
_TOL = 3e-4
# LNCC's eps (1e-5 in the losses) is large beside the variance products of a [0, 1] image's
# weak-contrast windows there, and it biases an affine fit: the loss then rewards raising the
# moving image's local variance (measured: an image registered to itself moved 0.3 voxel)
_LNCC_EPS = 1e-9
_MIN_SIZE = 8  # voxels a side of any pyramid level (LNCC windows, Gaussian supports)
_MI_POINTS = 60_000  # MI is estimated on at most this many fixed voxels per level (a fixed random subset)


# --------------------------------------------------------------------------- result
@dataclass
class AffineResult:
    """What :func:`affine_register` found.

    Attributes:
        matrix: ``(4, 4)`` float64, fixed world (RAS+ mm) -> moving world, the final affine.
        rigid_matrix: ``(4, 4)`` the rigid stage's result (same direction).
        init_matrix: ``(4, 4)`` the initial transform (centre-of-mass translation).
        center: ``(3,)`` the centre of rotation in fixed world mm (the ITK file's FixedParameters).
        similarity: ``"lncc"`` or ``"mi"``.
        history: one entry per stage and level: ``{"stage", "shrink", "shape", "losses"}``.
        time_s: wall time of the whole registration (input checks included).
    """

    matrix: np.ndarray
    rigid_matrix: np.ndarray
    init_matrix: np.ndarray
    center: np.ndarray
    similarity: str
    history: list[dict[str, Any]] = field(default_factory=list)
    time_s: float = 0.0

    def voxel_matrix(self, fixed_affine, moving_affine) -> np.ndarray:
        """Fixed voxel -> moving voxel ``inv(A_m) @ T @ A_f`` (4x4)."""
        return voxel_matrix(self.matrix, fixed_affine, moving_affine)

    def ddf(self, fixed_affine, fixed_shape, ddf: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """See :func:`affine_ddf`."""
        return affine_ddf(self.matrix, fixed_affine, fixed_shape, ddf=ddf, **kw)

    def save_itk(self, path) -> Any:
        """Write the matrix as an ITK text (or ``.mat``) transform file; see :mod:`psmamba.transforms`."""
        from psmamba.transforms import write_itk_affine

        return write_itk_affine(path, self.matrix, center=self.center)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict: the matrices as nested lists, final losses per level, time."""
        return {
            "matrix_ras": self.matrix.tolist(),
            "rigid_matrix_ras": self.rigid_matrix.tolist(),
            "center_ras": self.center.tolist(),
            "direction": "fixed world (RAS mm) -> moving world",
            "similarity": self.similarity,
            "levels": [
                {"stage": h["stage"], "shrink": h["shrink"], "iterations": len(h["losses"]),
                 "final_loss": h["losses"][-1] if h["losses"] else None}
                for h in self.history
            ],
            "time_s": self.time_s,
        }


# --------------------------------------------------------------------------- matrices
def _check_affine(a, name: str) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().numpy()
    try:
        m = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise PsmambaError(f"{name} must be a 4x4 matrix, got {type(a).__name__}") from None
    if m.shape != (4, 4):
        raise PsmambaError(f"{name} must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise PsmambaError(f"{name} holds NaN or Inf")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise PsmambaError(f"{name}: last row must be 0 0 0 1, got {m[3].tolist()}")
    lin = m[:3, :3]
    if abs(np.linalg.det(lin)) < 1e-9 * max(1.0, float(np.abs(lin).max()) ** 3):
        raise PsmambaError(f"{name} is singular (its 3x3 part has determinant {np.linalg.det(lin):.3g})")
    return m


def voxel_matrix(matrix, fixed_affine, moving_affine) -> np.ndarray:
    """Fixed voxel index -> moving voxel index: ``inv(A_m) @ T @ A_f`` (4x4 float64).

    With ``moving_affine = fixed_affine`` this is the map on the fixed grid that applies to the
    moving image once resampled onto the fixed grid through the headers.
    """
    t = _check_affine(matrix, "matrix")
    a_f = _check_affine(fixed_affine, "fixed_affine")
    a_m = _check_affine(moving_affine, "moving_affine")
    return np.linalg.inv(a_m) @ t @ a_f


def moved_affine(matrix, moving_affine) -> np.ndarray:
    """The moving image's header that puts it in register with the fixed image: ``inv(T) @ A_m``.

    Resampling the moving voxels with this header onto the fixed grid through world space
    (e.g. :func:`psmamba.data.preprocess.resample_to_grid`) gives the affinely registered image in
    one interpolation.
    """
    return np.linalg.inv(_check_affine(matrix, "matrix")) @ _check_affine(moving_affine, "moving_affine")


def affine_ddf(
    matrix,
    fixed_affine,
    fixed_shape: Sequence[int],
    ddf: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The affine map as a :mod:`psmamba.spatial` displacement field on the fixed grid.

    ``out[p] = L (p + u[p]) - p`` with ``L = inv(A_f) @ T @ A_f`` and ``u = ddf`` (zero when
    None), all in fixed voxels: ``warp(moving_on_fixed_grid, out)`` applies "first ``u``, then
    the affine" -- the whole map of an affine stage followed by a deformable one found on the
    affinely warped image. The affine part is evaluated exactly (not resampled), so it holds
    beyond the image border too.

    Args:
        matrix: ``(4, 4)`` fixed world -> moving world (:attr:`AffineResult.matrix`).
        fixed_affine: the fixed image's ``(4, 4)`` voxel -> world matrix.
        fixed_shape: ``(D, H, W)``.
        ddf: optional ``(1, 3, D, H, W)`` voxel field on the fixed grid.
        device, dtype: of the output (default: ``ddf``'s, else CPU float32).

    Returns:
        ``(1, 3, D, H, W)`` voxel displacements.
    """
    from psmamba.spatial import identity_grid

    shape = tuple(int(s) for s in fixed_shape)
    a_f = _check_affine(fixed_affine, "fixed_affine")
    lmat = np.linalg.inv(a_f) @ _check_affine(matrix, "matrix") @ a_f
    if ddf is not None:
        if not torch.is_tensor(ddf) or ddf.ndim != 5 or ddf.shape[:2] != (1, 3) or tuple(ddf.shape[2:]) != shape:
            got = tuple(ddf.shape) if hasattr(ddf, "shape") else type(ddf).__name__
            raise PsmambaError(f"ddf must have shape (1, 3) + {shape}, got {got}")
        from psmamba.deformable import affine_field

        return affine_field(ddf, np.eye(4), lmat, shape)
    pos = identity_grid(shape, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    lin = torch.as_tensor(lmat[:3, :3], dtype=pos.dtype, device=pos.device)
    off = torch.as_tensor(lmat[:3, 3], dtype=pos.dtype, device=pos.device).view(1, 3, 1, 1, 1)
    out = torch.einsum("ij,bj...->bi...", lin, pos) + off - identity_grid(shape, device=pos.device, dtype=pos.dtype)
    return out.to(dtype)


def _grid_theta(vox: np.ndarray, src_shape: Sequence[int], dst_shape: Sequence[int]) -> np.ndarray:
    """Destination voxel -> source voxel ``vox`` (4x4) as ``affine_grid``'s ``theta`` (3x4).

    ``grid_sample`` with ``align_corners=True`` reads normalised coordinates
    ``n = 2 p / (size - 1) - 1`` in reversed axis order (W, H, D) -- the convention of
    :func:`psmamba.spatial.warp`; here it is written as matrices:
    ``theta = P N_src vox inv(N_dst) P`` with ``P`` the axis reversal.
    """
    rev = np.eye(4)[[2, 1, 0, 3]]
    theta = rev @ _norm(src_shape) @ vox @ np.linalg.inv(_norm(dst_shape)) @ rev
    return theta[:3]


def resample_affine(
    moving: torch.Tensor,
    moving_affine,
    matrix,
    fixed_affine,
    fixed_shape: Sequence[int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """The moving image resampled onto the fixed grid through the world matrix, one interpolation.

    Fixed voxel ``p`` takes the moving value at voxel ``inv(A_m) @ T @ A_f @ p`` (trilinear,
    zero outside the moving image).

    Args:
        moving: ``(D', H', W')`` or ``(B, C, D', H', W')`` float tensor.
        moving_affine, fixed_affine: ``(4, 4)`` voxel -> world matrices.
        matrix: ``(4, 4)`` fixed world -> moving world.
        fixed_shape: ``(D, H, W)`` of the output grid.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``(D, H, W)`` or ``(B, C, D, H, W)`` (as the input), dtype of ``moving``.
    """
    squeeze = moving.ndim == 3
    x = moving[None, None] if squeeze else moving
    if x.ndim != 5:
        raise PsmambaError(f"moving must be (D, H, W) or (B, C, D, H, W), got {tuple(moving.shape)}")
    shape = tuple(int(s) for s in fixed_shape)
    theta = _grid_theta(voxel_matrix(matrix, fixed_affine, moving_affine), x.shape[2:], shape)
    work = x if x.is_floating_point() else x.to(torch.float32)
    th = torch.as_tensor(theta, dtype=work.dtype, device=x.device).expand(x.shape[0], 3, 4)
    grid = F.affine_grid(th, [x.shape[0], 1, *shape], align_corners=True)
    out = F.grid_sample(work, grid, mode=mode, padding_mode="zeros", align_corners=True)
    if not x.is_floating_point():
        out = out.round().to(x.dtype)
    return out[0, 0] if squeeze else out


# --------------------------------------------------------------------------- inputs
def _as_volume(obj, name: str, device) -> tuple[torch.Tensor, np.ndarray]:
    """Image / (array or tensor, affine) -> ``((D, H, W) float32 tensor, (4, 4) affine)``."""
    if hasattr(obj, "data") and hasattr(obj, "affine"):
        data, aff = obj.data, obj.affine
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        data, aff = obj
    else:
        raise PsmambaError(
            f"{name} must be a psmamba.io.Image or a (volume, 4x4 affine) pair, got {type(obj).__name__}"
        )
    aff = _check_affine(aff, f"{name} affine")
    t = data if torch.is_tensor(data) else torch.as_tensor(np.asarray(data))
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise PsmambaError(f"{name} must be a 3-D volume, got shape {tuple(data.shape)}")
    if t.is_complex():
        raise PsmambaError(f"{name} must hold real values, got {t.dtype}")
    t = t.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise PsmambaError(f"{name} holds NaN or Inf values")
    if min(t.shape) < _MIN_SIZE:
        raise PsmambaError(
            f"{name} of shape {tuple(t.shape)} is too small for affine registration "
            f"(at least {_MIN_SIZE} voxels per axis)"
        )
    return t, aff


def _as_mask(mask, shape, name: str, device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = mask.data if hasattr(mask, "data") else mask
    m = m if torch.is_tensor(m) else torch.as_tensor(np.asarray(m))
    while m.ndim > 3 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != tuple(shape):
        raise PsmambaError(f"{name} has shape {tuple(m.shape)}, its image {tuple(shape)}")
    m = (m.to(device) != 0).to(torch.float32)
    if float(m.sum()) < _MIN_SIZE**3 / 8:
        raise PsmambaError(f"{name} selects only {int(m.sum())} voxels")
    return m


def scale_intensity(x: torch.Tensor, mask: torch.Tensor | None = None, low: float = 0.5,
                    high: float = 99.5, name: str = "image") -> torch.Tensor:
    """Map the ``low`` and ``high`` percentiles (of the voxels in ``mask``) to 0 and 1, clip to [0, 1].

    Unlike min-max scaling, one extreme voxel (a metal artefact) moves neither end. When the
    two percentiles coincide (an image of more than ``high`` % one value), the image's minimum
    and maximum are used instead.

    Raises:
        PsmambaError: a constant image (naming ``name``).
    """
    vals = x[mask != 0] if mask is not None else x.reshape(-1)
    lo_all, hi_all = vals.min(), vals.max()
    if float(hi_all - lo_all) <= 0:
        raise PsmambaError(f"{name} is constant (every voxel is {float(lo_all):g}): nothing to register")
    sample = vals
    if sample.numel() > 1 << 20:  # a regular subsample of ~1M voxels gives the percentiles to ~0.1 %
        sample = sample[:: int(math.ceil(sample.numel() / (1 << 20)))]
    q = torch.quantile(sample.float(), torch.tensor([low / 100, high / 100], device=x.device))
    lo, hi = q[0], q[1]
    if float(hi - lo) <= 0:
        lo, hi = lo_all, hi_all
    return ((x - lo) / (hi - lo)).clamp(0, 1)


# --------------------------------------------------------------------------- pyramid
def _gauss_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _shrink(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Gaussian smoothing (sigma = f / 2 voxels along an axis shrunk by f), then every f-th voxel.

    ``x``: ``(1, C, D, H, W)``; the filter and the subsampling are one strided convolution per
    axis (replicate padding, so the border is not darkened).
    """
    for axis, f in enumerate(factors):
        f = int(f)
        if f == 1:
            continue
        k = _gauss_kernel(f / 2.0, x.device, x.dtype)
        r = k.numel() // 2
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        stride = [1, 1, 1]
        stride[axis] = f
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
        c = x.shape[1]
        xp = F.pad(x, pad, mode="replicate")
        x = F.conv3d(xp, k.view(shape).expand(c, 1, *shape[2:]).contiguous(), stride=stride, groups=c)
    return x


def _level_factors(affine: np.ndarray, shape: Sequence[int], shrink: int, voxel: float | None = None,
                   clamp: bool = True) -> list[int]:
    """Per-axis integer factors for a level of voxels about ``shrink`` times ``voxel`` mm (default:
    this grid's finest voxel size; the moving image's levels take the fixed image's, so both
    images of a level have about the same resolution in the world, whatever their grids).

    ``clamp``: an axis keeps at least ``_MIN_SIZE`` voxels (its factor lowered, down to 1), so a
    coarse or thin image (a 3 mm EPI, a slab of 20 slices onto a 1 mm brain) is shrunk less
    along the axes it cannot afford.
    """
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if shrink <= 1:
        return [1, 1, 1]
    target = shrink * (spacing.min() if voxel is None else voxel)
    factors = []
    for s, n in zip(spacing, shape):
        k = max(1, int(round(target / s)))
        while clamp and k > 1 and (int(n) - 1) // k + 1 < _MIN_SIZE:
            k -= 1
        factors.append(k)
    return factors


@dataclass
class _Level:
    shrink: int
    fixed: torch.Tensor  # (1, 1, D, H, W) in [0, 1]
    moving: torch.Tensor  # (1, 1, D', H', W')
    fixed_affine: np.ndarray
    moving_affine: np.ndarray
    fixed_weight: torch.Tensor | None  # (1, 1, D, H, W) 0/1
    moving_mask: torch.Tensor | None  # (1, 1, D', H', W') 0/1


def _make_levels(shrinks: Sequence[int], fx, fa, fm, mv, ma, mm) -> list[_Level]:
    """The pyramid, coarse to fine. Each level is built from the next finer one when its
    factors are multiples of that level's (e.g. 6 from 3), which filters a small grid
    instead of the full-resolution one; the extra smoothing is then ``ratio / 2`` voxels of the
    finer level (a total sigma a little above ``f / 2`` full-resolution voxels)."""

    def pyramid(x, a, m, voxel=None):
        out: dict[int, tuple] = {}
        prev = (1, [1, 1, 1], x[None, None], None if m is None else m[None, None])
        for f in sorted(shrinks):
            fac = _level_factors(a, x.shape, f, voxel)
            pf, pfac, px, pm = prev
            if all(k % q == 0 for k, q in zip(fac, pfac)):
                rel = [k // q for k, q in zip(fac, pfac)]
            else:  # not a multiple: from full resolution
                pfac, px, pm = [1, 1, 1], x[None, None], None if m is None else m[None, None]
                rel = fac
            xs = _shrink(px, rel)
            ms = None if pm is None else (_shrink(pm, rel) > 0.5).to(x.dtype)
            out[f] = (xs, a @ np.diag([*fac, 1.0]), ms)
            prev = (f, fac, xs, ms)
        return out

    fp = pyramid(fx, fa, fm)
    mp = pyramid(mv, ma, mm, float(np.sqrt((fa[:3, :3] ** 2).sum(0)).min()))  # the fixed levels' voxel size
    levels = []
    for f in shrinks:
        fixed_l, fixed_a, fixed_m = _crop_to_content(*fp[f])
        levels.append(_Level(f, fixed_l, mp[f][0], fixed_a, mp[f][1], fixed_m, mp[f][2]))
    return levels


def _crop_to_content(x: torch.Tensor, affine: np.ndarray, mask: torch.Tensor | None, margin: int = 4):
    """Crop a fixed level to the box of its nonzero voxels (or its mask) plus ``margin`` voxels.

    The loss is a sum over fixed voxels; where the fixed image is 0 beyond the box (the
    background that percentile scaling maps to 0, often half of a brain volume) LNCC adds
    nothing, so the box saves work without changing the optimum (MI keeps the margin as
    background samples). The affine's origin moves to the box's first voxel.
    """
    inside = (x[0, 0] > 0) if mask is None else (mask[0, 0] > 0)
    nz = torch.nonzero(inside)
    if nz.numel() == 0:
        return x, affine, mask
    lo = [max(0, int(v) - margin) for v in nz.min(0).values]
    hi = [min(n, int(v) + margin + 1) for v, n in zip(nz.max(0).values, x.shape[2:])]
    if [h - l for l, h in zip(lo, hi)] == list(x.shape[2:]) or min(h - l for l, h in zip(lo, hi)) < _MIN_SIZE:
        return x, affine, mask
    box = (slice(None), slice(None)) + tuple(slice(l, h) for l, h in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    return x[box].contiguous(), affine @ shift, None if mask is None else mask[box].contiguous()


# --------------------------------------------------------------------------- parametrisation
def _skew(w: torch.Tensor) -> torch.Tensor:
    z = w.new_zeros(())
    return torch.stack([
        torch.stack([z, -w[2], w[1]]),
        torch.stack([w[2], z, -w[0]]),
        torch.stack([-w[1], w[0], z]),
    ])


def _compose_matrix(lin: torch.Tensor, trans: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``x -> lin (x - c) + c + trans`` as a 4x4."""
    top = torch.cat([lin, (center + trans - lin @ center).unsqueeze(1)], dim=1)
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=lin.dtype, device=lin.device)
    return torch.cat([top, bottom], dim=0)


# --------------------------------------------------------------------------- main entry
def _check_schedule(shrink, iterations, name: str = "iterations") -> tuple[list[int], list[int]]:
    try:
        s = [int(f) for f in shrink]
    except (TypeError, ValueError):
        raise PsmambaError(f"shrink must be a sequence of integers >= 1, got {shrink!r}") from None
    if not s or min(s) < 1 or any(a <= b for a, b in zip(s, s[1:])):
        raise PsmambaError(f"shrink must be decreasing integers >= 1 (e.g. 4, 2), got {shrink!r}")
    if isinstance(iterations, (int, np.integer)):
        it = [int(iterations)] * len(s)
    else:
        try:
            it = [int(n) for n in iterations]
        except (TypeError, ValueError):
            raise PsmambaError(f"{name} must be an integer or one per level, got {iterations!r}") from None
    if len(it) != len(s) or min(it) < 0:
        raise PsmambaError(f"{name} must be {len(s)} non-negative counts (one per shrink level), got {iterations!r}")
    return s, it


def _level_size(shape: Sequence[int], affine: np.ndarray, f: int) -> list[int]:
    """A level's grid before any axis is spared (what :func:`_auto_shrink` chooses by)."""
    return [(n - 1) // k + 1 for n, k in zip(shape, _level_factors(affine, shape, f, clamp=False))]


def _auto_shrink(shape: Sequence[int], affine: np.ndarray) -> list[int]:
    """Two levels: the finest is the first shrink factor whose grid has at most ~200k voxels
    (factor 3, 54x64x54, for a 1 mm 160x192x160 brain; 2 for a 96x112x96 one), the coarse
    one is twice that factor, kept when it still has >= 10 voxels a side.

    An affine stage needs no finer grid: the error left is a fraction of that level's voxel
    (measured on brains: a few tenths of a millimetre), and a deformable stage follows.
    """
    fine = 1
    while int(np.prod(_level_size(shape, affine, fine))) > _FINE_VOXELS and min(_level_size(shape, affine, fine + 1)) >= _MIN_SIZE:
        fine += 1
    coarse = 2 * fine
    return [coarse, fine] if min(_level_size(shape, affine, coarse)) >= 10 else [fine]


def affine_register(
    fixed,
    moving,
    *,
    fixed_mask=None,
    moving_mask=None,
    similarity: str = "lncc",
    init: "str | np.ndarray" = "com",
    shrink: Sequence[int] | None = None,
    iterations: int | Sequence[int] | None = None,
    rigid_iterations: int | Sequence[int] | None = None,
    rigid: bool = True,
    affine: bool = True,
    lr: float = 0.5,
    window: int = 5,
    bins: int = 32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> AffineResult:
    """Rigid, then 12-dof affine registration of ``moving`` to ``fixed`` (coarse to fine).

    Args:
        fixed, moving: a :class:`psmamba.io.Image` or a ``(volume, affine)`` pair with a
            ``(D, H, W)`` array or tensor and its ``(4, 4)`` voxel -> world (RAS+ mm) matrix.
            The grids may differ in size, spacing and orientation.
        fixed_mask, moving_mask: optional volumes on their image's grid (nonzero = inside):
            the loss counts fixed voxels inside the fixed mask whose match lies in the moving mask.
        similarity: ``"lncc"`` (one modality; local correlation, ``window`` voxels at each
            level) or ``"mi"`` (Mattes mutual information, ``bins`` bins; across modalities).
        init: ``"com"`` superposes the intensity centres of mass; ``"geometry"`` the grid
            centres; ``"none"`` starts from the identity in world space (the headers); or a
            ``(4, 4)`` fixed world -> moving world matrix (RAS mm) to start from (a transform
            found before, e.g. read with :func:`psmamba.transforms.read_itk_affine`); a rigid
            stage alone (``affine=False``) starts from its rotation (the nearest one) and keeps
            where it sends the fixed image's centre.
        shrink: pyramid levels as shrink factors of the finest voxel size, coarse to fine
            (default: two levels chosen by size, see :func:`_auto_shrink`; a 1 mm
            160x192x160 image works at shrink 6 then 3).
        iterations: the most Adam steps per level (one count for all, or one per level), for
            each stage; default 150 at coarse levels, 30 at the last. A level ends earlier
            once converged: the step halves after 6 steps without a relative improvement of
            3e-4, and the level stops when it is below 1/16 of the start; the best parameters
            seen are kept.
        rigid_iterations: the rigid stage's schedule; default ``iterations`` except at the
            finest of several levels when the affine stage follows (it refines the rotation
            there too: on the demo's validation pairs, aligned and misaligned, the same Dice
            after the whole pipeline for about 0.7 s less, see ``benchmarks/ablations``).
        rigid, affine: run the 6-dof stage, the 12-dof stage (at least one).
        lr: Adam step at each level's start, in units of that level's voxel size (the
            parameters are scaled so a unit moves a point at the image's radius by one mm);
            halved at every plateau (see ``iterations``).
        window: LNCC window (voxels of each level, odd).
        bins: MI histogram bins.
        device: where to compute (default: the fixed volume's device if a tensor, else CPU).
        seed: the random subset of voxels MI is estimated on.

    Returns:
        :class:`AffineResult`; ``result.matrix`` maps fixed world points to moving world points.

    Raises:
        PsmambaError: naming the argument, before any work: a singular or non-finite affine, a
            volume that is not 3-D, holds NaN/Inf, is constant or is too small for the pyramid,
            a mask of the wrong shape, an unknown similarity or init, bad schedule values.
    """
    t0 = time.perf_counter()
    if similarity not in SIMILARITIES:
        raise PsmambaError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    init_given = None if isinstance(init, str) else check_init_matrix(init, "init")
    if init_given is None and init not in _INITS:
        raise PsmambaError(f"init must be one of {_INITS} or a 4x4 matrix, got {init!r}")
    if not (rigid or affine):
        raise PsmambaError("rigid and affine are both False: nothing to do")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise PsmambaError(f"lr must be a positive number, got {lr!r}")
    if int(window) != window or window < 1 or window % 2 == 0:
        raise PsmambaError(f"window must be a positive odd integer, got {window!r}")
    if device is None:
        data = getattr(fixed, "data", fixed[0] if isinstance(fixed, (tuple, list)) else None)
        device = data.device if torch.is_tensor(data) else torch.device("cpu")
    device = torch.device(device)

    fx, fa = _as_volume(fixed, "fixed", device)
    mv, ma = _as_volume(moving, "moving", device)
    fmask = _as_mask(fixed_mask, fx.shape, "fixed_mask", device)
    mmask = _as_mask(moving_mask, mv.shape, "moving_mask", device)
    levels_f = _auto_shrink(fx.shape, fa) if shrink is None else shrink
    if iterations is None:
        iterations = [150] * (len(levels_f) - 1) + [30]
    levels_f, iters = _check_schedule(levels_f, iterations)
    if rigid_iterations is not None:
        rigid_iters = _check_schedule(levels_f, rigid_iterations, "rigid_iterations")[1]
    elif affine and len(iters) > 1:  # the 12-dof stage refines the rotation at the finest level
        rigid_iters = iters[:-1] + [0]
    else:
        rigid_iters = iters
    fx = scale_intensity(fx, fmask, name="fixed")
    mv = scale_intensity(mv, mmask, name="moving")

    # ---- initialisation (world mm, float64 on the CPU)
    def centre(x, a, m):
        w = x if m is None else x * m
        if init_given is not None or init == "geometry" or float(w.sum()) <= 0:
            idx = (np.asarray(x.shape, dtype=np.float64) - 1) / 2
        else:
            axes = [torch.arange(s, device=x.device, dtype=torch.float64) for s in x.shape]
            tot = w.sum(dtype=torch.float64)
            idx = np.array([
                float((w.sum(dim=tuple(j for j in range(3) if j != i), dtype=torch.float64) * axes[i]).sum() / tot)
                for i in range(3)
            ])
        return (a @ np.append(idx, 1.0))[:3]

    c_f = centre(fx, fa, fmask)
    c_m = centre(mv, ma, mmask)
    if init_given is not None:  # x -> lin (x - c) + c + t with lin, t making the given matrix
        t_init = init_given[:3, 3] - c_f + init_given[:3, :3] @ c_f
        init_mat = init_given
        if not affine:  # a rigid result: the start's rotation (nearest, by SVD), keeping where c_f goes
            u, _, vt = np.linalg.svd(init_given[:3, :3])
            if np.linalg.det(u @ vt) < 0:
                raise PsmambaError("init: the start mirrors space; a rigid stage alone cannot start from it "
                                   "(use the affine stage)")
            init_mat = np.eye(4)
            init_mat[:3, :3] = u @ vt
            init_mat[:3, 3] = c_f + t_init - init_mat[:3, :3] @ c_f
    else:
        t_init = c_m - c_f if init != "none" else np.zeros(3)
        init_mat = np.eye(4)
        init_mat[:3, 3] = t_init
    # the radius that turns rotation / matrix parameters into mm of motion at the image's edge
    ext = np.abs(fa[:3, :3] @ (np.asarray(fx.shape, dtype=np.float64) - 1))
    radius = float(np.linalg.norm(ext) / 2 / math.sqrt(3))

    levels = _make_levels(levels_f, fx, fa, fmask, mv, ma, mmask)
    dtype = torch.float32
    center_t = torch.as_tensor(c_f, dtype=dtype, device=device)
    rng = torch.Generator().manual_seed(int(seed))
    if similarity == "mi":
        from psmamba.losses import MutualInformation

        sim_mi = MutualInformation(bins=bins)
    else:
        from psmamba.losses import LNCC

        sim_lncc = LNCC(window=int(window), eps=_LNCC_EPS)

    history: list[dict[str, Any]] = []
    lin0 = torch.as_tensor(init_mat[:3, :3], dtype=dtype, device=device)
    trans0 = torch.as_tensor(t_init, dtype=dtype, device=device)

    def run_stage(stage: str, lin_start: torch.Tensor, trans_start: torch.Tensor):
        n_par = 6 if stage == "rigid" else 12
        params = torch.zeros(n_par, dtype=dtype, device=device, requires_grad=True)

        def matrix_of(p):
            if stage == "rigid":
                lin = torch.linalg.matrix_exp(_skew(p[:3] / radius)) @ lin_start
                trans = trans_start + p[3:]
            else:
                lin = lin_start + p[:9].view(3, 3) / radius
                trans = trans_start + p[9:]
            return _compose_matrix(lin, trans, center_t)

        for lev, n_it in zip(levels, rigid_iters if stage == "rigid" else iters):
            if n_it == 0:
                continue
            loss_fn = _level_loss(lev, similarity, sim_mi if similarity == "mi" else sim_lncc, rng, dtype)
            vox = float(np.sqrt((lev.fixed_affine[:3, :3] ** 2).sum(0)).min())
            base_lr = step = lr * vox
            # Adam written out (12 parameters): torch.optim's first use imports torch._dynamo,
            # seconds on a busy CPU, longer than this whole level
            m1 = torch.zeros_like(params)
            m2 = torch.zeros_like(params)
            losses: list[float] = []
            best, best_params = math.inf, params.detach().clone()
            ref, since = math.inf, 0
            for k in range(1, n_it + 1):
                loss = loss_fn(matrix_of(params))
                value = float(loss.detach())
                losses.append(value)
                if value < best:  # the loss is of the parameters before this step: keep the best seen
                    best, best_params = value, params.detach().clone()
                if value < ref - _TOL * abs(ref if math.isfinite(ref) else value):
                    ref, since = value, 0
                else:
                    since += 1
                if since >= _PATIENCE:  # a plateau: halve the step; converged below 1/16 of the start
                    since = 0
                    step *= 0.5
                    if step < base_lr / 16:
                        break
                (grad,) = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    m1.mul_(0.9).add_(grad, alpha=0.1)
                    m2.mul_(0.999).addcmul_(grad, grad, value=0.001)
                    denom = (m2 / (1 - 0.999**k)).sqrt_().add_(1e-8)
                    params.sub_(step / (1 - 0.9**k) * m1 / denom)
            with torch.no_grad():
                params.copy_(best_params)
            history.append({"stage": stage, "shrink": lev.shrink, "shape": list(lev.fixed.shape[2:]),
                            "losses": losses})
        with torch.no_grad():
            m = matrix_of(params)
        return m[:3, :3].clone(), m[:3, 3] - center_t + m[:3, :3] @ center_t

    lin, trans = lin0, trans0
    rigid_mat = init_mat
    if rigid:
        lin, trans = run_stage("rigid", lin, trans)
        rigid_mat = _compose_matrix(lin, trans, center_t).detach().cpu().double().numpy()
    final = rigid_mat
    if affine:
        lin, trans = run_stage("affine", lin, trans)
        final = _compose_matrix(lin, trans, center_t).detach().cpu().double().numpy()
    if device.type != "cpu":
        acc = getattr(torch, "accelerator", None)
        if acc is not None and acc.is_available():
            acc.synchronize()
    return AffineResult(
        matrix=final,
        rigid_matrix=rigid_mat,
        init_matrix=init_mat,
        center=np.asarray(c_f, dtype=np.float64),
        similarity=similarity,
        history=history,
        time_s=time.perf_counter() - t0,
    )


def check_init_matrix(matrix: Any, what: str) -> np.ndarray:
    """A given fixed world -> moving world matrix: a finite, invertible 4x4 affine (float64)."""
    try:
        m = np.asarray(matrix.detach().cpu() if torch.is_tensor(matrix) else matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise PsmambaError(f"{what}: expected a 4x4 matrix of numbers, got {type(matrix).__name__}") from None
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise PsmambaError(f"{what}: expected a finite 4x4 matrix, got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise PsmambaError(f"{what}: the last row must be 0 0 0 1, got {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-6:
        raise PsmambaError(f"{what}: the matrix is singular (it flattens space)")
    return m


def _level_loss(lev: _Level, similarity: str, sim, rng: torch.Generator, dtype):
    """``loss(T)`` for one pyramid level: ``T`` (4x4 tensor, fixed world -> moving world)."""
    fshape = tuple(lev.fixed.shape[2:])
    mshape = tuple(lev.moving.shape[2:])
    device = lev.fixed.device
    # T-independent parts of affine_grid's theta: theta = (K_m @ T @ K_f)[:3]
    rev = np.eye(4)[[2, 1, 0, 3]]
    km = torch.as_tensor(rev @ _norm(mshape) @ np.linalg.inv(lev.moving_affine), dtype=dtype, device=device)
    kf = torch.as_tensor(lev.fixed_affine @ np.linalg.inv(_norm(fshape)) @ rev, dtype=dtype, device=device)
    weight = lev.fixed_weight
    mmask = lev.moving_mask
    denom = float(np.prod(fshape)) if weight is None else float(weight.sum().clamp(min=1.0))

    gate = None
    if similarity == "lncc":
        # windows where either image is flat (variance below 1e-3 of the fixed image's global
        # one) carry no information and are left out, as ANTs' CC does; with LNCC's eps tiny
        # beside the rest, cc is there the plain squared correlation, maximal (1) for an image
        # registered to itself: a larger eps, or flat windows kept, would reward changing the
        # local contrast and move it (measured: 2 % of scale on a smooth synthetic image)
        vmin = 1e-3 * float(lev.fixed.double().var()) * sim.window**3
        s1 = box_sum(lev.fixed, sim.window)
        var_f = box_sum(lev.fixed * lev.fixed, sim.window) - s1 * s1 / sim.window**3
        gate = (var_f > vmin).to(dtype)

        def moving_gate(warped: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                s = box_sum(warped, sim.window)
                return (box_sum(warped * warped, sim.window) - s * s / sim.window**3 > vmin).to(dtype)
    if similarity == "mi":
        n = int(np.prod(fshape))
        cand = torch.arange(n) if weight is None else torch.nonzero(weight.reshape(-1).cpu() > 0)[:, 0]
        if cand.numel() > _MI_POINTS:
            cand = cand[torch.randperm(cand.numel(), generator=rng)[:_MI_POINTS]]
        cand = cand.to(device)
        # normalised fixed coordinates of the points, reversed axis order, homogeneous: (N, 4)
        idx = torch.stack(torch.unravel_index(cand, fshape), dim=1).to(dtype)
        scale = torch.tensor([2.0 / (s - 1) for s in fshape], dtype=dtype, device=device)
        pts = torch.cat([(idx * scale - 1).flip(1), torch.ones_like(idx[:, :1])], dim=1)
        fvals = lev.fixed.reshape(-1)[cand].view(1, 1, -1, 1, 1)

        def loss(t: torch.Tensor) -> torch.Tensor:
            theta = (km @ t @ kf)[:3]
            g = (pts @ theta.T).view(1, -1, 1, 1, 3)
            mvals = F.grid_sample(lev.moving, g, mode="bilinear", padding_mode="zeros", align_corners=True)
            # outside the moving image is background (0 after scaling), as for LNCC: weighting by
            # the overlap instead would reward transforms that drop background samples (the
            # entropy of the rest rises), which moves even an image registered to itself
            w = None if mmask is None else F.grid_sample(mmask, g.detach(), mode="nearest", align_corners=True)
            return sim(mvals, fvals, weight=w)

        return loss

    def loss(t: torch.Tensor) -> torch.Tensor:
        theta = (km @ t @ kf)[:3].unsqueeze(0)
        g = F.affine_grid(theta, [1, 1, *fshape], align_corners=True)
        warped = F.grid_sample(lev.moving, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        cc = sim.local_cc(warped, lev.fixed)
        if gate is not None:
            cc = cc * gate * moving_gate(warped)
        # voxels that map outside the moving image see zeros (cc = 0). The mean runs over ALL
        # fixed voxels (in the mask): a mean over the overlap only would reward transforms that
        # push poorly matching voxels out of the moving image.
        if weight is not None:
            cc = cc * weight
        if mmask is not None:
            cc = cc * F.grid_sample(mmask, g.detach(), mode="nearest", align_corners=True)
        return -cc.sum() / denom

    return loss


def _norm(shape: Sequence[int]) -> np.ndarray:
    """Voxel index -> ``grid_sample``'s normalised coordinate (``align_corners=True``), same axis order."""
    n = np.eye(4)
    for i, s in enumerate(shape):
        n[i, i] = 2.0 / max(int(s) - 1, 1)
        n[i, 3] = -1.0
    return n
