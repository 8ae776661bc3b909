"""The spatial core: ONE coordinate convention for every displacement field in psmamba.

Convention (written down once, used everywhere)
-----------------------------------------------
* Volumes are ``(B, C, D, H, W)``.
* A displacement field ``ddf`` is ``(B, 3, D, H, W)`` in **voxels of its own grid**;
  channel ``i`` displaces spatial axis ``i`` (D, H, W order). The voxel at index
  ``p = (d, h, w)`` is mapped to ``p + ddf[:, :, d, h, w]``.
* ``warp(x, ddf)`` samples ``x`` at ``identity + ddf``: "pull" resampling, as in
  VoxelMorph, MONAI ``Warp`` and the PSMamba reference code. Voxel centres sit at -1 and +1
  of ``grid_sample``'s normalised grid (``align_corners=True``).
* ``compose(a, b) = warp(a, b) + b`` is the field of "first ``b``, then ``a``"
  (``x -> x + b(x) + a(x + b(x))``), the rule the reference code uses to add a new residual.

The only place that turns voxel displacements into ``grid_sample``'s normalised,
axis-reversed coordinates is :func:`_to_sampling_grid`. Under mixed precision every transform
here runs in float32 (:func:`float32_geometry`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from psmamba.errors import PsmambaError

__all__ = [
    "identity_grid",
    "warp",
    "compose",
    "resize_ddf",
    "resize_volume",
    "upsample_ddf",
    "integrate_svf",
    "ddf_to_l2r",
    "ddf_from_l2r",
    "ddf_to_mm",
    "ddf_from_mm",
    "pad_to_multiple",
    "crop_to",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def float32_geometry(fn):
    """Run a spatial transform in float32 whatever the autocast state.

    Under mixed precision (``torch.autocast`` with bf16/fp16) the networks' convolutions run in
    low precision, but voxel positions do not survive it: bf16 holds only whole steps near
    128-255 voxels. Every function of this module that builds sampling grids or touches fields
    therefore turns autocast off and takes its float16/bfloat16 tensor arguments as float32:
    fields, warps, compositions, resizing and scaling and squaring stay float32 (and so return
    float32).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        device_type = tensors[0].device.type if tensors else "cpu"
        args = tuple(a.float() if torch.is_tensor(a) and a.dtype in _LOW_PRECISION else a for a in args)
        kwargs = {k: (v.float() if torch.is_tensor(v) and v.dtype in _LOW_PRECISION else v) for k, v in kwargs.items()}
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


_MODES = ("bilinear", "nearest")
_PADDINGS = ("zeros", "border")


def _check_field(ddf: torch.Tensor, name: str = "ddf") -> None:
    if not torch.is_tensor(ddf):
        raise PsmambaError(f"{name} must be a torch.Tensor, got {type(ddf).__name__}")
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise PsmambaError(
            f"{name} must have shape (B, 3, D, H, W) (a 3-D displacement field), got {tuple(ddf.shape)}"
        )
    if not ddf.is_floating_point():
        raise PsmambaError(f"{name} must be a floating-point tensor, got {ddf.dtype}")


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Voxel coordinates of a ``(D, H, W)`` grid as a ``(1, 3, D, H, W)`` tensor.

    ``identity_grid(s)[0, i, d, h, w]`` is the index along axis ``i`` of voxel ``(d, h, w)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise PsmambaError(f"identity_grid needs a 3-D shape of positive sizes, got {shape}")
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _to_sampling_grid(ddf: torch.Tensor) -> torch.Tensor:
    """Voxel displacement ``(B, 3, D, H, W)`` -> ``grid_sample`` grid ``(B, D, H, W, 3)``.

    ``grid_sample`` wants normalised coordinates in [-1, 1] (``align_corners=True``: -1 and +1
    are the centres of the first and last voxel), last dimension ordered (W, H, D).
    """
    spatial = ddf.shape[2:]
    pos = identity_grid(spatial, device=ddf.device, dtype=ddf.dtype) + ddf  # (B, 3, D, H, W) voxels
    # an axis of size 1 has no extent: any scale keeps its single voxel at 0 -> -1 ... use 1.
    # One Python float per axis (no scale tensor copied from host memory, a sync on a GPU);
    # stacked last and in (W, H, D) order, as grid_sample reads (x, y, z).
    axes = [pos[:, i] * (2.0 / max(s - 1, 1)) - 1.0 for i, s in enumerate(spatial)]
    return torch.stack(axes[::-1], dim=-1)  # (B, D, H, W, 3)


@float32_geometry
def warp(
    image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding: str = "zeros"
) -> torch.Tensor:
    """Resample ``image`` at ``identity + ddf``.

    Args:
        image: ``(B, C, D, H, W)`` (any C; float, or integer labels with ``mode="nearest"``).
        ddf: ``(B, 3, D, H, W)`` voxel displacements on the same grid as ``image``; a batch of 1
            is broadcast over the image batch.
        mode: ``"bilinear"`` (trilinear; images, features and fields) or ``"nearest"`` (labels).
        padding: ``"zeros"`` (the reference code) or ``"border"``.

    Returns:
        ``(B, C, D, H, W)`` in the dtype of ``image`` (labels keep their integer dtype).
    """
    _check_field(ddf)
    if mode not in _MODES:
        raise PsmambaError(f"warp mode must be one of {_MODES}, got {mode!r}")
    if padding not in _PADDINGS:
        raise PsmambaError(f"warp padding must be one of {_PADDINGS}, got {padding!r}")
    if not torch.is_tensor(image) or image.ndim != 5:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise PsmambaError(f"image must have shape (B, C, D, H, W), got {shape}")
    if image.shape[2:] != ddf.shape[2:]:
        raise PsmambaError(
            f"image grid {tuple(image.shape[2:])} and ddf grid {tuple(ddf.shape[2:])} differ"
        )
    if ddf.shape[0] != image.shape[0]:
        if ddf.shape[0] != 1:
            raise PsmambaError(f"image batch {image.shape[0]} and ddf batch {ddf.shape[0]} differ")
        ddf = ddf.expand(image.shape[0], -1, -1, -1, -1)
    if mode == "bilinear" and padding == "zeros" and image.is_floating_point():
        from psmamba.nn.fast import warp_trilinear_cpu

        fast = warp_trilinear_cpu(image, ddf.to(image.dtype))  # None unless CPU inference
        if fast is not None:
            return fast
    if not image.is_floating_point():
        if mode != "nearest":
            raise PsmambaError(f"integer images ({image.dtype}) can only be warped with mode='nearest'")
        return _warp_nearest_integer(image, ddf, padding)
    grid = _to_sampling_grid(ddf.to(image.dtype))
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)


def _nearest_index(ddf_axis: torch.Tensor, axis: int, size: int, padding: str):
    """Index of the voxel nearest to ``p + ddf`` along one axis, and where it lies inside.

    ``ddf_axis``: ``(B, D, H, W)`` displacements along ``axis`` (of ``size`` voxels). Rounds
    ``p + ddf`` half to even, as ``grid_sample``'s nearest mode does, but without forming
    ``p + ddf`` in floating point: ``k = floor(ddf)`` and ``f = ddf - k`` are exact, and the
    integer ``p + k`` moves up one when ``f > 1/2`` (or ``f = 1/2`` and ``p + k`` is odd).
    So the index is the same in float32 as in float64 for any grid size.

    Returns ``(index (B, D, H, W) int64, inside (B, D, H, W) bool or None)``; with
    ``padding="border"`` the index is clamped to the grid and ``inside`` is None (all inside).
    """
    if size == 1:  # an axis of one voxel has no extent (as in _to_sampling_grid): always voxel 0
        return torch.zeros(ddf_axis.shape, dtype=torch.long, device=ddf_axis.device), None
    shape = [1, 1, 1, 1]
    shape[axis + 1] = size
    p = torch.arange(size, device=ddf_axis.device).view(shape)
    k = torch.floor(ddf_axis)
    f = ddf_axis - k
    idx = p + k.long()
    idx = idx + ((f > 0.5) | ((f == 0.5) & (idx % 2 == 1))).long()
    if padding == "border":
        return idx.clamp_(0, size - 1), None
    inside = (idx >= 0) & (idx < size)
    return idx.clamp_(0, size - 1), inside


def _warp_nearest_integer(labels: torch.Tensor, ddf: torch.Tensor, padding: str) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map by gathering its voxels (no float copy).

    The codes are copied, never converted: exact for every integer dtype and code (a float32
    round trip would be exact only up to 2^24, float64 is slow or absent on accelerators).
    Same voxels as ``grid_sample(..., mode="nearest", align_corners=True)`` on the codes, except
    exactly at half-way positions, which are rounded half to even here (grid_sample's own
    normalising arithmetic decides those by its rounding).

    Args:
        labels: ``(B, C, D, H, W)`` integer.
        ddf: ``(B, 3, D, H, W)`` float voxel displacements (batch already matched).
        padding: ``"zeros"`` (0 outside the grid) or ``"border"`` (the nearest edge voxel).
    """
    b, c, d, h, w = labels.shape
    iz, mz = _nearest_index(ddf[:, 0], 0, d, padding)
    iy, my = _nearest_index(ddf[:, 1], 1, h, padding)
    ix, mx = _nearest_index(ddf[:, 2], 2, w, padding)
    flat = ((iz * h + iy) * w + ix).view(b, 1, -1).expand(b, c, -1)  # (B, C, DHW)
    out = torch.gather(labels.reshape(b, c, -1), 2, flat).view(b, c, d, h, w)
    inside = [m for m in (mz, my, mx) if m is not None]
    if inside:
        out = out.masked_fill(~functools.reduce(torch.logical_and, inside).unsqueeze(1), 0)
    return out


@float32_geometry
def compose(a: torch.Tensor, b: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Field of "first ``b``, then ``a``": ``warp(a, b) + b`` (both ``(B, 3, D, H, W)``)."""
    _check_field(a, "a")
    _check_field(b, "b")
    return warp(a, b, mode="bilinear", padding=padding) + b


@float32_geometry
def resize_ddf(ddf: torch.Tensor, size: Sequence[int], scale: Sequence[float] | float | None = None) -> torch.Tensor:
    """Resample a field to a new grid AND rescale its vectors to the new voxel units.

    The field is interpolated trilinearly with ``align_corners=True`` (as the paper upsamples):
    the first and last voxel centres of both grids coincide, so the voxel size ratio is
    ``(old - 1) / (new - 1)`` and vectors are multiplied by ``scale = (new - 1) / (old - 1)``
    per axis by default. The paper's pyramid uses ``scale=2`` instead (:func:`upsample_ddf`).

    Args:
        ddf: ``(B, 3, D, H, W)``.
        size: the new ``(D', H', W')``.
        scale: factor(s) applied to channel i; default ``(size[i] - 1) / (old_i - 1)``
            (1 for an axis of one voxel).
    """
    _check_field(ddf)
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise PsmambaError(f"resize_ddf needs a 3-D target size, got {size}")
    old = ddf.shape[2:]
    if scale is None:
        scale = [(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(size, old)]
    elif isinstance(scale, (int, float)):
        scale = [float(scale)] * 3
    if len(scale) != 3:
        raise PsmambaError(f"scale needs one factor per axis, got {scale}")
    out = ddf.clone() if tuple(old) == size else F.interpolate(ddf, size=size, mode="trilinear", align_corners=True)
    # per channel with Python floats: no factor tensor copied to the device (a sync on a GPU)
    for i, factor in enumerate(scale):
        if float(factor) != 1.0:
            out[:, i] *= float(factor)
    return out


@float32_geometry
def resize_volume(x: torch.Tensor, size: Sequence[int], labels: bool = False) -> torch.Tensor:
    """Resample images or label maps ``(B, C, D, H, W)`` to the grid ``size`` spanning the same extent.

    The corner voxel centres of both grids coincide (``align_corners=True``), the correspondence
    :func:`resize_ddf` assumes, so a field predicted on the new grid maps back with it. Images
    are interpolated trilinearly (integer input is taken as float); label maps take the nearest
    voxel's code under the same correspondence and keep their dtype. A volume already on
    ``size`` is returned as is.
    """
    size = tuple(int(s) for s in size)
    if x.ndim != 5 or len(size) != 3 or min(size) < 1:
        raise PsmambaError(f"resize_volume needs (B, C, D, H, W) and a 3-D size, got {tuple(x.shape)} and {size}")
    if tuple(x.shape[2:]) == size:
        return x
    if labels:
        # nearest with the align_corners=True correspondence, one axis at a time: new voxel i
        # sits at old position i (old - 1) / (new - 1); its nearest old voxel (half to even, as
        # grid_sample) in integer arithmetic, and the codes copied, never converted
        out = x
        for axis, (new, old) in enumerate(zip(size, x.shape[2:])):
            out = out.index_select(2 + axis, _nearest_resize_index(old, new, x.device))
        return out
    src = x if x.is_floating_point() else x.float()
    return F.interpolate(src, size=size, mode="trilinear", align_corners=True)


def _nearest_resize_index(old: int, new: int, device) -> torch.Tensor:
    """For each of ``new`` voxels, the nearest of ``old`` voxels when the corner voxel centres
    of both grids coincide: ``round(i (old - 1) / (new - 1))`` half to even, in integers."""
    i = torch.arange(new, device=device)
    if new == 1 or old == 1:
        return torch.zeros_like(i)
    num, den = i * (old - 1), new - 1
    q, r = num // den, num % den
    return q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1))).long()


@float32_geometry
def upsample_ddf(ddf: torch.Tensor) -> torch.Tensor:
    """The paper's ``up(2 * phi)``: x2 trilinear upsampling (align_corners=True), vectors x2."""
    _check_field(ddf)
    return resize_ddf(ddf, [2 * s for s in ddf.shape[2:]], scale=2.0)


@float32_geometry
def integrate_svf(svf: torch.Tensor, steps: int = 7, padding: str = "zeros") -> torch.Tensor:
    """Scaling and squaring: the displacement of ``exp(svf)``.

    ``v = svf / 2**steps``, then ``steps`` times ``v = v + warp(v, v)`` (= ``compose(v, v)``).
    ``padding="zeros"`` is the reference code's and MONAI ``DVF2DDF``'s choice; it shrinks
    vectors that point out of the volume near the border. ``"border"`` avoids that.
    """
    _check_field(svf, "svf")
    if int(steps) < 0:
        raise PsmambaError(f"integrate_svf steps must be >= 0, got {steps}")
    v = svf / (2 ** int(steps))
    for _ in range(int(steps)):
        v = compose(v, v, padding=padding)
    return v


# --------------------------------------------------------------------------- layout conversions
def ddf_to_l2r(ddf: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(1, 3, D, H, W)`` or ``(3, D, H, W)`` voxel field -> Learn2Reg layout ``(D, H, W, 3)`` (numpy)."""
    arr = ddf.detach().cpu().numpy() if torch.is_tensor(ddf) else np.asarray(ddf)
    if arr.ndim == 5:
        if arr.shape[0] != 1:
            raise PsmambaError(f"ddf_to_l2r converts one field at a time, got batch {arr.shape[0]}")
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise PsmambaError(f"ddf_to_l2r needs a (3, D, H, W) field, got {arr.shape}")
    return np.ascontiguousarray(np.moveaxis(arr, 0, -1))


def ddf_from_l2r(arr: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Learn2Reg layout ``(D, H, W, 3)`` in voxels -> ``(1, 3, D, H, W)`` tensor."""
    arr = np.asarray(arr)
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector images are often stored (X, Y, Z, 1, 3)
        arr = arr[:, :, :, 0, :]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise PsmambaError(f"a Learn2Reg displacement field has shape (D, H, W, 3), got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0))).unsqueeze(0).to(dtype)


def _linear_part(affine) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    if a.shape not in ((4, 4), (3, 3)):
        raise PsmambaError(f"affine must be 4x4 (or 3x3), got {tuple(a.shape)}")
    return a[:3, :3]


def ddf_to_mm(ddf: torch.Tensor, affine) -> torch.Tensor:
    """Voxel displacements -> world displacements in mm (the affine's axes, RAS+ for nibabel).

    A displacement is a vector, so only the linear part ``affine[:3, :3]`` applies:
    ``d_mm = A @ d_vox``. Returns ``(B, 3, D, H, W)`` with channel i = world axis i.
    """
    _check_field(ddf)
    m = _linear_part(affine).to(device=ddf.device, dtype=ddf.dtype)
    return torch.einsum("ij,bj...->bi...", m, ddf)


def ddf_from_mm(ddf_mm: torch.Tensor, affine) -> torch.Tensor:
    """World displacements in mm -> voxel displacements of the grid with this affine."""
    _check_field(ddf_mm, "ddf_mm")
    m = torch.linalg.inv(_linear_part(affine)).to(device=ddf_mm.device, dtype=ddf_mm.dtype)
    return torch.einsum("ij,bj...->bi...", m, ddf_mm)


# --------------------------------------------------------------------------- padding helpers
def pad_to_multiple(
    x: torch.Tensor, multiple: int = 16, value: float = 0.0
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pad the spatial axes of ``(B, C, D, H, W)`` at the far end up to a multiple of ``multiple``.

    Returns the padded tensor and the original spatial size (for :func:`crop_to`). Padding
    only at the far end keeps voxel indices, hence displacements, unchanged.
    """
    if x.ndim != 5:
        raise PsmambaError(f"expected (B, C, D, H, W), got {tuple(x.shape)}")
    size = tuple(int(s) for s in x.shape[2:])
    target = [int(math.ceil(s / multiple) * multiple) for s in size]
    pads: list[int] = []
    for s, t in reversed(list(zip(size, target))):  # F.pad wants last axis first
        pads += [0, t - s]
    if any(pads):
        x = F.pad(x, pads, mode="constant", value=value)
    return x, size  # type: ignore[return-value]


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the first ``size`` voxels of each spatial axis."""
    d, h, w = (int(s) for s in size)
    return x[:, :, :d, :h, :w]
