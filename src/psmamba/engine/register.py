"""Register one pair of images: validate -> scale -> linear stage -> method -> outputs.

:func:`register_pair` is the engine behind ``psmamba register``, ``psmamba.register`` (and the
demo and ``psmamba evaluate``). A :class:`Pipeline` (:func:`build_pipeline`, from a method name
such as ``"default"``: ``affine+network+io`` with a network (the shipped one unless another is
given), ``affine+io`` without one) runs in steps,
each a function of its own:

1. **Validate** (:func:`_load_inputs`, :func:`psmamba.checks.check_inputs`) everything that can
   be checked before any work: files exist and load, 3-D, finite, non-singular affines, not
   constant, large enough, label maps and masks on their image's grid, label maps sharing a
   label, every flag's value; the output folder can be written (a temporary folder is created
   beside it right away).
2. **Scale** (:func:`_prepare`): each image's 0.5/99.5 percentiles (inside its mask) to [0, 1],
   clipped, or a given intensity window (CT); tensors on the device, each on its own grid.
3. **Linear stage** (:func:`_linear_stage`): rigid or rigid + affine registration in world space
   (:func:`psmamba.affine.affine_register`, LNCC or mutual information), when the pipeline has one.
4. **Method on the fixed grid** (:mod:`psmamba.engine.methods`): the moving image resampled once
   through the affine onto the fixed grid, then a named object ``method(moving, fixed) -> ddf``
   (a network runs in its own space: the pair resampled into the box it was trained in, or
   resized to its grid, and its field carried back; ``io`` is diffeomorphic instance optimisation,
   :class:`~psmamba.engine.methods.Diffeomorphic`), and the inverse of its field.
5. **Outputs** (:func:`_finish`): the moving image and labels read ONCE from their own voxels
   through the whole map (trilinear / nearest), Jacobian determinant, folding %, SDlogJ, Dice
   before/after; when ``out_dir`` is given, everything is written into a temporary folder moved
   into place only after everything succeeded: ``warped.nii.gz``, ``ddf.nii.gz``,
   ``ddf_inverse.nii.gz``, ``affine.txt``, ``warped_labels.nii.gz``, ``jacobian.nii.gz``,
   ``summary.json``, ``overview.png``, and with ``itk=True`` ``warp_itk.nii.gz`` and
   ``warp_itk_inverse.nii.gz``.

The displacement field ``ddf.nii.gz`` is the WHOLE map (affine and deformable) in voxels of the
fixed grid, Learn2Reg layout ``(D, H, W, 3)``: fixed voxel ``p`` takes its value from the moving
image resampled onto the fixed grid through the headers at ``p + ddf[p]``. When both images share
a grid this is exactly the Learn2Reg convention; otherwise the map to the moving file's voxels is
``A_m^-1 A_f (p + ddf[p])``. ``ddf_inverse.nii.gz`` lies on the MOVING grid (with its affine), in
the mirror convention: moving voxel ``r`` takes its value from the fixed image resampled onto the
moving grid through the headers at ``r + ddf_inverse[r]`` (labels drawn on the fixed image
carried onto the moving one). ``affine.txt`` is the linear stage alone, an ITK text transform.
``warp_itk.nii.gz`` is the same whole map as ``ddf.nii.gz`` in ITK's form (displacements in LPS
mm, :func:`psmamba.io.save_itk_warp`): ``antsApplyTransforms -t warp_itk.nii.gz`` alone carries the
moving image onto the fixed grid; ``warp_itk_inverse.nii.gz`` (moving grid) carries fixed-space
images onto the moving one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from psmamba.checks import check_inputs, check_label_list, check_number, check_same_grid, image_name
from psmamba.errors import PsmambaError
from psmamba.files import StagingDir, atomic_write_text
from psmamba.io import as_image, warn_plain_analyze

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from psmamba.engine.methods import RegistrationMethod
    from psmamba.io import Image

__all__ = ["RegistrationResult", "Pipeline", "build_pipeline", "register_pair", "OUTPUT_FILES", "MIN_SIZE"]

#: The files ``register_pair(..., out_dir=...)`` writes (``warped_labels`` only with moving labels,
#: ``affine.txt`` only when a rigid/affine stage ran, ``warp_itk*`` only with ``itk=True``).
OUTPUT_FILES = (
    "warped.nii.gz",
    "ddf.nii.gz",
    "ddf_inverse.nii.gz",
    "affine.txt",
    "warp_itk.nii.gz",
    "warp_itk_inverse.nii.gz",
    "warped_labels.nii.gz",
    "jacobian.nii.gz",
    "summary.json",
    "overview.png",
)

#: Anything :func:`register_pair` accepts as an image: a path, a loaded :class:`psmamba.io.Image`
#: or a 3-D numpy array (taken with an identity affine, i.e. 1 mm voxels).
ImageLike = Union[str, os.PathLike, "Image", np.ndarray]

#: The fewest voxels a side an image needs (the affine pyramid's coarsest level; the ``io``
#: pyramid drops levels that would be smaller).
MIN_SIZE = 8

# --------------------------------------------------------------------------- result
@dataclass
class RegistrationResult:
    """Everything :func:`register_pair` computed, on the FIXED image's grid.

    Attributes:
        warped: ``(D, H, W)`` float32, the moving image warped onto the fixed grid (its own
            intensities, not the [0, 1] scaled ones the network saw).
        ddf: ``(3, D, H, W)`` float32 voxel displacements on the fixed grid (psmamba's
            convention; :attr:`ddf_l2r` gives the Learn2Reg layout ``(D, H, W, 3)``).
        jacobian: ``(D, H, W)`` float32 Jacobian determinant of ``identity + ddf``.
        affine: ``(4, 4)`` the fixed image's affine (every output carries it).
        fixed: ``(D, H, W)`` the fixed image.
        moving: ``(D, H, W)`` the moving image resampled onto the fixed grid, before registration.
        warped_labels: ``(D, H, W)`` integer moving labels warped (nearest), or None.
        moving_labels: ``(D, H, W)`` moving labels on the fixed grid before registration, or None.
        fixed_labels: ``(D, H, W)`` fixed labels, or None.
        summary: JSON-ready dict of settings, timings (s), folding %, SDlogJ and Dice.
        out_dir: where the outputs were written, or None.
    """

    warped: np.ndarray
    ddf: np.ndarray
    jacobian: np.ndarray
    affine: np.ndarray
    fixed: np.ndarray
    moving: np.ndarray
    warped_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None
    fixed_labels: np.ndarray | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    ddf_inverse: np.ndarray | None = None
    moving_affine: np.ndarray | None = None
    linear: Any = None

    @property
    def matrix(self) -> np.ndarray | None:
        """The linear stage's ``(4, 4)`` fixed world -> moving world matrix (RAS mm), or None."""
        return None if self.linear is None else np.asarray(self.linear.matrix)

    @property
    def ddf_l2r(self) -> np.ndarray:
        """The field in the Learn2Reg layout ``(D, H, W, 3)`` (voxels of the fixed grid)."""
        return np.ascontiguousarray(np.moveaxis(self.ddf, 0, -1))

    @property
    def dice_before(self) -> float | None:
        """Mean Dice of the unregistered labels (None without both label maps)."""
        d = self.summary.get("dice_before")
        return None if d is None else d["mean"]

    @property
    def dice_after(self) -> float | None:
        """Mean Dice of the warped labels (None without both label maps)."""
        d = self.summary.get("dice_after")
        return None if d is None else d["mean"]

    def save(self, out_dir: str | os.PathLike, overview: bool = True, itk: bool = False) -> Path:
        """Write the outputs into ``out_dir`` atomically (see :data:`OUTPUT_FILES`); ``itk``: also
        the whole map and its inverse as ITK / ANTs displacement field transforms.

        Files are first written into a temporary folder beside ``out_dir`` and moved into
        place only when all of them were written, so a failure leaves nothing behind.
        """
        with StagingDir(out_dir, owned=OUTPUT_FILES) as staging:
            self._write(staging.tmp, overview=overview, itk=itk)
            self.out_dir = staging.commit()
        return self.out_dir

    def _write(self, folder: Path, overview: bool = True, itk: bool = False) -> list[str]:
        from psmamba import io

        written = []
        io.save_image(folder / "warped.nii.gz", self.warped.astype(np.float32), self.affine)
        written.append("warped.nii.gz")
        io.save_ddf(folder / "ddf.nii.gz", self.ddf, self.affine)  # written as (D, H, W, 3)
        written.append("ddf.nii.gz")
        if self.ddf_inverse is not None:  # on the MOVING grid, with its affine
            aff = self.affine if self.moving_affine is None else self.moving_affine
            io.save_ddf(folder / "ddf_inverse.nii.gz", self.ddf_inverse, aff)
            written.append("ddf_inverse.nii.gz")
        if self.linear is not None:
            self.linear.save_itk(folder / "affine.txt")
            written.append("affine.txt")
        if itk:  # the whole map (fixed grid) and its inverse (moving grid), LPS mm, for ANTs/ITK/Slicer
            io.save_itk_warp(folder / "warp_itk.nii.gz", self.ddf, self.affine)
            written.append("warp_itk.nii.gz")
            if self.ddf_inverse is not None:
                aff = self.affine if self.moving_affine is None else self.moving_affine
                io.save_itk_warp(folder / "warp_itk_inverse.nii.gz", self.ddf_inverse, aff)
                written.append("warp_itk_inverse.nii.gz")
        if self.warped_labels is not None:
            io.save_labels(folder / "warped_labels.nii.gz", self.warped_labels, self.affine)
            written.append("warped_labels.nii.gz")
        io.save_image(folder / "jacobian.nii.gz", self.jacobian.astype(np.float32), self.affine)
        written.append("jacobian.nii.gz")
        if overview:
            from psmamba.viz import save_overview

            save_overview(
                folder / "overview.png",
                fixed=self.fixed,
                moving=self.moving,
                warped=self.warped,
                ddf=self.ddf,
                jacobian=self.jacobian,
                warped_labels=self.warped_labels,
                affine=self.affine,
                title=_overview_title(self.summary),
            )
            written.append("overview.png")
        self.summary["outputs"] = written + ["summary.json"]
        _write_json(folder / "summary.json", self.summary)
        return written


def _overview_title(summary: dict[str, Any]) -> str:
    parts = [f"{summary.get('method', '')}"]
    if summary.get("dice_after") is not None:
        parts.append(
            f"Dice {summary['dice_before']['mean']:.3f} -> {summary['dice_after']['mean']:.3f}"
        )
    parts.append(f"folding {summary.get('folding_percent', float('nan')):.3f}%")
    parts.append(f"SDlogJ {summary.get('sdlogj', float('nan')):.3f}")
    return "   ".join(parts)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=True) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj



# --------------------------------------------------------------------------- inputs
def _name(img) -> str | None:
    p = getattr(img, "path", None)
    return None if p is None else str(p)


# --------------------------------------------------------------------------- the pipeline
@dataclass
class _Inputs:
    """Step 1's output: the loaded images, label maps and masks (None where not given)."""

    fixed: Any
    moving: Any
    moving_labels: Any = None
    fixed_labels: Any = None
    fixed_mask: Any = None
    moving_mask: Any = None


@dataclass
class _Prepared:
    """Step 2's output: intensity-scaled tensors on the device, on their own grids.

    ``fixed_np``, ``moving_np``, ``mlab_np`` are the "before registration" views on the fixed
    grid (the moving image and labels resampled through the headers alone).
    """

    fixed_np: np.ndarray
    moving_np: np.ndarray
    mlab_np: np.ndarray | None
    flab_np: np.ndarray | None
    fixed_s: Any  # (1, 1, D, H, W) scaled fixed image
    moving_s: Any  # (1, 1, d, h, w) scaled moving image, on the MOVING grid
    moving_t: Any  # (1, 1, d, h, w) the moving image's own intensities
    fixed_mask: Any  # (D, H, W) float {0, 1} or None
    moving_mask: Any  # (d, h, w) float {0, 1} or None
    a_f: np.ndarray
    a_m: np.ndarray


@dataclass
class Pipeline:
    """A registration pipeline: an optional linear stage in world space, then a method on the fixed grid.

    Built by :func:`build_pipeline` from a method name; :func:`register_pair` takes one as
    ``method=`` (build it once to register many pairs with one loaded network).

    Attributes:
        name: what ``summary.json`` and the evaluation CSVs call it (``"affine+network+io"``).
        linear: ``None``, ``"rigid"`` or ``"affine"`` (:func:`psmamba.affine.affine_register`).
        method: the :class:`~psmamba.engine.methods.RegistrationMethod` run on the fixed grid
            after it (:class:`~psmamba.engine.methods.Identity` when there is none).
        similarity: of the linear stage, ``"lncc"`` or ``"mi"``.
    """

    name: str
    linear: str | None
    method: Any
    similarity: str = "lncc"
    #: the fewest voxels a side an image needs (see :func:`psmamba.checks.check_inputs`)
    min_size: int = 8
    min_size_why: str = "registration needs 8 voxels a side"

    def to(self, device) -> "Pipeline":
        self.method = self.method.to(device)
        return self

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "linear": self.linear, "similarity": self.similarity,
                "deformable": self.method.settings()}


def _load_inputs(fixed, moving, moving_labels, fixed_labels, fixed_mask=None, moving_mask=None) -> _Inputs:
    """Step 1: load every input and check that label maps and masks lie on their image's grid."""
    for what, obj in (("fixed image", fixed), ("moving image", moving)):
        if obj is None:
            raise PsmambaError(f"{what} is missing: give a path, a psmamba.io.Image or a 3-D array")
    inp = _Inputs(
        fixed=as_image(fixed, "fixed image"),
        moving=as_image(moving, "moving image"),
        moving_labels=as_image(moving_labels, "moving labels", labels=True),
        fixed_labels=as_image(fixed_labels, "fixed labels", labels=True),
        # masks: non-zero inside (any real values: a 0/0.5 or 0/255 mask alike), finite
        fixed_mask=as_image(fixed_mask, "fixed mask"),
        moving_mask=as_image(moving_mask, "moving mask"),
    )
    for what, img, ref, ref_what in (
        ("moving mask", inp.moving_mask, inp.moving, "moving image"),
        ("fixed mask", inp.fixed_mask, inp.fixed, "fixed image"),
    ):
        if img is not None:
            if not np.isfinite(np.asarray(img.data, dtype=np.float32)).all():
                raise PsmambaError(f"{image_name(what, img)} holds NaN or infinite values")
            check_same_grid(img, ref, image_name(what, img), image_name(ref_what, ref))
            if int(np.count_nonzero(np.asarray(img.data))) < 64:
                raise PsmambaError(f"{image_name(what, img)} selects {np.count_nonzero(np.asarray(img.data))} "
                                   "voxels: too few to register on")
    return inp


def _scale(x, mask, window, what: str, flag: str = "--fixed-window"):
    """Intensities to [0, 1]: a window ``(low, high)`` clipped, else the 0.5/99.5 percentiles (in the mask)."""
    from psmamba.affine import scale_intensity

    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not bool(((x > lo) & (x < hi)).any()):
            raise PsmambaError(f"{flag} {lo:g} {hi:g} holds none of the intensities of {what} "
                               f"({float(x.min()):g}..{float(x.max()):g}): every voxel would be clipped to one value")
        return ((x - lo) / (hi - lo)).clamp(0, 1)
    return scale_intensity(x, mask, name=what)


def _prepare(inp: _Inputs, dev, fixed_window=None, moving_window=None) -> _Prepared:
    """Step 2: tensors on the device, scaled to [0, 1]; the "before" views on the fixed grid."""
    import torch

    from psmamba.data.preprocess import resample_to_grid

    f_shape = tuple(int(s) for s in inp.fixed.data.shape)
    a_f = np.asarray(inp.fixed.affine, dtype=np.float64)
    a_m = np.asarray(inp.moving.affine, dtype=np.float64)
    fixed_np = np.asarray(inp.fixed.data, dtype=np.float32)
    moving_np = resample_to_grid(np.asarray(inp.moving.data), a_m, a_f, f_shape, order=1)
    mlab_np = None
    if inp.moving_labels is not None:
        mlab_np = resample_to_grid(np.asarray(inp.moving_labels.data), inp.moving_labels.affine, a_f, f_shape, order=0)
    flab_np = None if inp.fixed_labels is None else np.asarray(inp.fixed_labels.data)

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)

    fmask = None if inp.fixed_mask is None else (tensor(inp.fixed_mask.data) != 0).float()
    mmask = None if inp.moving_mask is None else (tensor(inp.moving_mask.data) != 0).float()
    fx = tensor(fixed_np)
    mv = tensor(inp.moving.data)
    fixed_s = _scale(fx, fmask, fixed_window, f"fixed image {_name(inp.fixed) or ''}".strip())
    moving_s = _scale(mv, mmask, moving_window, f"moving image {_name(inp.moving) or ''}".strip(), "--moving-window")
    return _Prepared(fixed_np, moving_np, mlab_np, flab_np, fixed_s[None, None], moving_s[None, None],
                     mv[None, None], fmask, mmask, a_f, a_m)


def _linear_stage(plan: Pipeline, inp: _Inputs, prep: _Prepared, initial: np.ndarray | None = None):
    """Step 3a: rigid or affine registration in world space, from ``initial`` when given; the
    ``initial`` matrix itself when the plan has no linear stage (None without either)."""
    from psmamba.affine import AffineResult, affine_register

    if plan.linear is None:
        if initial is None:
            return None
        return AffineResult(matrix=initial, rigid_matrix=initial, init_matrix=initial, center=np.zeros(3),
                            similarity="given")
    return affine_register(
        (prep.fixed_s[0, 0], prep.a_f), (prep.moving_s[0, 0], prep.a_m),
        fixed_mask=prep.fixed_mask, moving_mask=prep.moving_mask, similarity=plan.similarity,
        affine=plan.linear == "affine", device=prep.fixed_s.device, init="com" if initial is None else initial,
    )


def _world_matrix(lin) -> np.ndarray:
    return np.eye(4) if lin is None else np.asarray(lin.matrix, dtype=np.float64)


def _apply(mat: np.ndarray, pos):
    """``mat`` (4x4) applied to voxel positions ``pos`` ``(1, 3, D, H, W)``."""
    import torch

    lin = torch.as_tensor(mat[:3, :3], dtype=pos.dtype, device=pos.device)
    off = torch.as_tensor(mat[:3, 3], dtype=pos.dtype, device=pos.device).view(1, 3, 1, 1, 1)
    return torch.einsum("ij,bj...->bi...", lin, pos) + off


def _sample_at(vol, pos, mode: str = "bilinear", padding: str = "zeros"):
    """``vol`` ``(1, C, d, h, w)`` read at voxel positions ``pos`` ``(1, 3, D, H, W)`` of its grid.

    Voxel centres at ``grid_sample``'s corners (``align_corners=True``, :mod:`psmamba.spatial`'s
    convention). Integer volumes (labels) are read nearest-neighbour in float32 when their codes
    are exact there (below 2**24), else float64, and returned in their dtype.
    """
    import torch
    import torch.nn.functional as F

    size = vol.shape[2:]
    scale = torch.tensor([2.0 / max(int(n) - 1, 1) for n in size], dtype=pos.dtype, device=pos.device)
    norm = pos * scale.view(1, 3, 1, 1, 1) - 1.0
    grid = norm.flip(1).permute(0, 2, 3, 4, 1)  # (1, D, H, W, 3) in (W, H, D) order
    if vol.is_floating_point():
        return F.grid_sample(vol.to(pos.dtype), grid, mode=mode, padding_mode=padding, align_corners=True)
    big = vol.numel() and int(vol.abs().max()) >= 1 << 24
    work = vol.to(torch.float64 if big else torch.float32)
    out = F.grid_sample(work, grid.to(work.dtype), mode="nearest", padding_mode=padding, align_corners=True)
    return out.round().to(vol.dtype)


def _aligned(prep: _Prepared, matrix: np.ndarray, f_shape):
    """The scaled moving image (and its mask) on the fixed grid through the world ``matrix``."""
    from psmamba.affine import resample_affine

    same = (tuple(prep.moving_s.shape[2:]) == tuple(f_shape) and np.array_equal(matrix, np.eye(4))
            and np.allclose(prep.a_m, prep.a_f, atol=1e-6))

    def onto_fixed(x, mode="bilinear"):
        return x if same else resample_affine(x, prep.a_m, matrix, prep.a_f, f_shape, mode=mode)

    moving = onto_fixed(prep.moving_s)
    mask = prep.fixed_mask
    if prep.moving_mask is not None:
        mm = onto_fixed(prep.moving_mask, mode="nearest")
        mask = mm if mask is None else mask * mm
    return moving, (None if mask is None else mask[None, None])


def _inverse_on_moving_grid(u_inv, matrix: np.ndarray, prep: _Prepared, m_shape):
    """The inverse of the whole map as a field on the MOVING grid, the mirror of ``ddf``'s convention.

    Moving voxel ``r`` -> fixed world through ``inv(T)``, then the deformable inverse ``u_inv``:
    fixed voxel ``pos(r)``; stored as ``inv(A_m) A_f pos(r) - r``, i.e. moving voxel ``r`` takes
    its value from the fixed image (resampled onto the moving grid through the headers) at
    ``r + ddf_inverse[r]``.
    """
    from psmamba.deformable import affine_field

    to_fixed = np.linalg.inv(prep.a_f) @ np.linalg.inv(matrix) @ prep.a_m
    return affine_field(u_inv, to_fixed, np.linalg.inv(prep.a_m) @ prep.a_f, m_shape)


def _method_grid(method, f_shape) -> list[int]:
    stages = getattr(method, "stages", [method])
    grids = [s.grid for s in stages if getattr(s, "grid", None)]
    return [int(s) for s in (grids[0] if grids else f_shape)]


def _register(plan: Pipeline, inp: _Inputs, prep: _Prepared, inverse: bool = True,
              initial: np.ndarray | None = None):
    """Step 3: the linear stage, then the fixed-grid method; the whole map and (``inverse``) its inverse."""
    from psmamba.affine import affine_ddf
    from psmamba.deformable import invert_ddf
    from psmamba.engine.methods import call_options

    f_shape = tuple(int(s) for s in prep.fixed_np.shape)
    lin = _linear_stage(plan, inp, prep, initial)
    matrix = _world_matrix(lin)
    moving_al, mask = _aligned(prep, matrix, f_shape)
    u = plan.method(moving_al, prep.fixed_s, None, **call_options(plan.method, mask, prep.a_f)).detach().float()
    ddf = affine_ddf(matrix, prep.a_f, f_shape, ddf=u) if lin is not None else u
    if not inverse:
        return lin, ddf, None
    u_inv = getattr(plan.method, "inverse", None)
    if u_inv is None or tuple(u_inv.shape) != tuple(u.shape):
        u_inv = invert_ddf(u) if bool(u.abs().max() > 0) else u.clone()
    inverse = _inverse_on_moving_grid(u_inv.detach().float(), matrix, prep, prep.moving_t.shape[2:])
    return lin, ddf, inverse


def _finish(inp: _Inputs, prep: _Prepared, plan: Pipeline, lin, ddf_t, inv_t, dev, labels) -> RegistrationResult:
    """Step 4: warp (one interpolation from the moving file's voxels), metrics and the summary."""
    import torch

    from psmamba import metrics
    from psmamba.spatial import identity_grid

    f_shape = [int(s) for s in prep.fixed_np.shape]
    with torch.no_grad():
        pos = _apply(np.linalg.inv(prep.a_m) @ prep.a_f, identity_grid(tuple(f_shape), device=dev) + ddf_t)
        warped_t = _sample_at(prep.moving_t, pos)
        wlab_np = None
        if inp.moving_labels is not None:
            lab = np.asarray(inp.moving_labels.data)
            lab_t = torch.from_numpy(np.ascontiguousarray(lab.astype(np.int64)))[None, None].to(dev)
            wlab_np = _sample_at(lab_t, pos, mode="nearest")[0, 0].cpu().numpy().astype(lab.dtype)
    ddf_np = ddf_t[0].cpu().numpy().astype(np.float32)
    det = metrics.jacobian_determinant(ddf_np)  # once: folding and SDlogJ read it too
    jac = np.asarray(det, dtype=np.float32)
    method = plan.method
    settings = method.settings()
    summary: dict[str, Any] = {
        "fixed": _name(inp.fixed), "moving": _name(inp.moving),
        "moving_labels": _name(inp.moving_labels) if inp.moving_labels is not None else None,
        "fixed_labels": _name(inp.fixed_labels) if inp.fixed_labels is not None else None,
        "fixed_mask": _name(inp.fixed_mask) if inp.fixed_mask is not None else None,
        "moving_mask": _name(inp.moving_mask) if inp.moving_mask is not None else None,
        "method": plan.name,
        "method_settings": settings,
        "checkpoint": _find_setting(settings, "checkpoint"),
        "affine": None if lin is None else {**lin.summary(), "stage": plan.linear or "given"},
        "device": str(dev),
        "fixed_shape": f_shape,
        "moving_shape": [int(s) for s in inp.moving.data.shape],
        "model_grid": _method_grid(method, f_shape),
        "fixed_spacing": _spacing(inp.fixed), "moving_spacing": _spacing(inp.moving),
        "folding_percent": float(metrics.folding_percent(ddf_np, det=det)),
        "sdlogj": float(metrics.sdlogj(ddf_np, det=det)),
        "sdlogj_l2r": float(metrics.sdlogj_l2r(ddf_np, det=det)),
        "jacobian_min": float(jac.min()), "jacobian_max": float(jac.max()),
        "displacement_max_vox": float(np.sqrt((ddf_np**2).sum(0)).max()),
        "runtime": _runtime_settings(),
    }
    if prep.mlab_np is not None and prep.flab_np is not None:
        if labels is None:  # the labels of both maps (the moving one on its own grid), not of the result
            labels, one_side = metrics.shared_labels(prep.flab_np, np.asarray(inp.moving_labels.data))
            summary["labels_not_scored"] = one_side
        summary["dice_before"] = _dice_summary(metrics.dice(prep.flab_np, prep.mlab_np, labels=labels))
        summary["dice_after"] = _dice_summary(metrics.dice(prep.flab_np, wlab_np, labels=labels))
    return RegistrationResult(
        warped=warped_t[0, 0].cpu().numpy().astype(np.float32), ddf=ddf_np, jacobian=jac,
        affine=np.asarray(inp.fixed.affine, dtype=np.float64), fixed=prep.fixed_np, moving=prep.moving_np,
        warped_labels=wlab_np, moving_labels=prep.mlab_np, fixed_labels=prep.flab_np, summary=summary,
        ddf_inverse=None if inv_t is None else inv_t[0].cpu().numpy().astype(np.float32), moving_affine=prep.a_m,
        linear=lin,
    )


def _find_setting(settings: dict[str, Any], key: str) -> Any:
    """``key`` of a method's settings, looked up in its stages too (the first one set)."""
    if settings.get(key) is not None:
        return settings[key]
    for stage in settings.get("stages", []):
        if stage.get(key) is not None:
            return stage[key]
    return None


def _runtime_settings() -> dict[str, Any]:
    """The process settings this registration ran with (:class:`psmamba.runtime.Runtime`)."""
    from psmamba import runtime

    return {**runtime.current().as_dict(), "freed_memory_kept": runtime.freed_memory_kept()}


def build_pipeline(
    method: "str | RegistrationMethod | Pipeline | None" = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    model: "torch.nn.Module | None" = None,
    iters: int = 0,
    refine: str = "weights",
    lr: float | None = None,
    lam: float | None = None,
    window: int = 9,
    model_size: Sequence[int] | None = None,
    device: "str | torch.device" = "cpu",
    similarity: str = "lncc",
    deformable: Any = None,
) -> Pipeline:
    """The :class:`Pipeline` that :func:`register_pair`'s options name (see its arguments).

    A :class:`Pipeline` is returned as is; a bare method object becomes a pipeline without a
    linear stage; a name is parsed by :func:`psmamba.engine.methods.parse_method`.
    """
    from psmamba.affine import SIMILARITIES
    from psmamba.engine.distributed import resolve_device

    if similarity not in SIMILARITIES:
        raise PsmambaError(f"--similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if isinstance(method, Pipeline):
        if checkpoint is not None or model is not None or iters:
            raise PsmambaError("give method= alone, or checkpoint=/model=/iters=, not both")
        return method.to(resolve_device(device))
    return _plan(method, checkpoint, model, iters, refine, lr, lam, window, model_size, resolve_device(device),
                 similarity, deformable)


def _plan(method, checkpoint, model, iters, refine, lr, lam, window, model_size, dev, similarity,
          deformable) -> Pipeline:
    """What ``register_pair``'s options ask for (a given method object is taken as is)."""
    from psmamba.engine.methods import (
        RegistrationMethod, deformable_method, load_model, method_from_options, parse_method, training_size,
    )

    check_number("--lr", lr, positive=True)
    check_number("--lambda", lam, nonnegative=True)
    iters = check_number("--iters", iters, integer=True, nonnegative=True)
    window = check_number("window", window, integer=True, positive=True)
    if window % 2 == 0:
        raise PsmambaError(f"window (the LNCC box of iters=) must be an odd integer, got {window}")
    if isinstance(method, RegistrationMethod):
        if checkpoint is not None or model is not None or iters:
            raise PsmambaError("give method= alone, or checkpoint=/model=/iters=, not both")
        return Pipeline(method.name, None, method.to(dev), similarity)
    if method is not None and not isinstance(method, str):
        raise PsmambaError(f"method must be a name or a RegistrationMethod, got {type(method).__name__}")
    if checkpoint is not None and model is not None:
        raise PsmambaError("give either checkpoint= or model=, not both")
    if method is not None and iters:
        raise PsmambaError("give --method or --iters, not both (--iters runs the Adam optimisation of earlier versions)")
    grid = model_size
    if checkpoint is None and model is None and not iters and parse_method(method or "default", True).network:
        from psmamba.models import pretrained  # no network given, one wanted: the shipped one

        if pretrained.available():
            model, ckpt = pretrained.load_shipped(device=dev)
            grid = model_size or training_size(ckpt)
            checkpoint = f"shipped:{pretrained.DEFAULT}"
    elif checkpoint is not None:
        model, ckpt = load_model(checkpoint, device=dev)
        grid = model_size or training_size(ckpt)
    elif model is not None:
        model = model.to(dev).eval()
    if iters:  # the earlier versions' methods: no linear stage, Adam on the field or the weights
        legacy = method_from_options(model, iters=iters, refine=refine, lr=lr, lam=lam, window=window,
                                     grid=grid, checkpoint=checkpoint)
        return Pipeline(legacy.name, None, legacy, similarity)
    if lam is not None:
        raise PsmambaError("--lambda weighs the diffusion loss of --iters (Adam); the io stage smooths instead "
                           "(--sigma-field)")
    spec = parse_method(method or "default", have_network=model is not None)
    if model is not None and not spec.network:
        raise PsmambaError(f"--method {spec.name} uses no network, but a checkpoint/model was given")
    _check_model_size(model_size, model if spec.network else None, spec.name)
    config = _deformable_config(deformable, lr)
    return Pipeline(spec.name, spec.linear, deformable_method(spec, model, grid, checkpoint, config), similarity)


def _check_model_size(size, model, method: str) -> None:
    """``model_size`` names the grid of a network stage that can run on it (checked before any work)."""
    if size is None:
        return
    text = "x".join(str(int(s)) for s in size)
    if model is None:
        raise PsmambaError(f"model_size (--model-size) {text} sets the grid the network runs on, and method "
                           f"{method} runs no network")
    from psmamba.models.net import min_extent_of

    need = min_extent_of(model)
    if max(int(s) for s in size) <= need:
        raise PsmambaError(f"model_size (--model-size) {text}: this network needs one axis of more than {need} voxels")


def _deformable_config(deformable, lr):
    """A DeformableConfig from a config, a dict of overrides, and ``--lr``."""
    import dataclasses

    from psmamba.deformable import DeformableConfig

    if isinstance(deformable, DeformableConfig):
        cfg = deformable
    else:
        over = dict(deformable or {})
        unknown = sorted(set(over) - set(DeformableConfig.__dataclass_fields__))
        if unknown:
            raise PsmambaError(f"unknown io setting(s) {unknown}; known: {sorted(DeformableConfig.__dataclass_fields__)}")
        cfg = DeformableConfig(**over)
    return cfg if lr is None else dataclasses.replace(cfg, lr=float(lr))


def _check_window(flag: str, window) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise PsmambaError(f"{flag} takes two numbers LOW HIGH, got {window!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise PsmambaError(f"{flag} needs finite LOW < HIGH, got {lo:g} {hi:g}")
    return lo, hi


def register_pair(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    moving_labels: ImageLike | None = None,
    fixed_labels: ImageLike | None = None,
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    method: "str | RegistrationMethod | Pipeline | None" = None,
    checkpoint: str | os.PathLike | None = None,
    model: "torch.nn.Module | None" = None,
    iters: int = 0,
    refine: str = "weights",
    lr: float | None = None,
    lam: float | None = None,
    window: int = 9,
    similarity: str = "lncc",
    fixed_window: Sequence[float] | None = None,
    moving_window: Sequence[float] | None = None,
    deformable: Any = None,
    device: "str | torch.device" = "auto",
    out_dir: str | os.PathLike | None = None,
    model_size: Sequence[int] | None = None,
    overview: bool = True,
    labels: Sequence[int] | None = None,
    itk: bool = False,
    inverse: bool = True,
    initial_transform: Any = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``; optionally write the outputs to ``out_dir``.

    Args:
        fixed, moving: the images: paths (NIfTI, Analyze), :class:`psmamba.io.Image`,
            :class:`psmamba.data.Volume` or 3-D arrays (:func:`psmamba.io.as_image`); the moving
            image may have any size, spacing and orientation.
        moving_labels, fixed_labels: label maps on their image's grid; with both, Dice before
            and after registration.
        fixed_mask, moving_mask: optional masks on their image's grid (non-zero inside): the
            intensity scaling and the similarity only count voxels inside.
        method: a name (:func:`psmamba.engine.methods.parse_method`): ``"default"`` (affine, then
            the network, then ``io``), ``"identity"``, ``"affine"``, ``"io"``,
            ``"affine+io"``, ``"network"``, ``"network+io"``, ... ; or a
            :class:`~psmamba.engine.methods.RegistrationMethod` run on the fixed grid (no
            linear stage). None: ``"default"``, unless ``iters`` asks for the Adam
            optimisation of earlier versions.
        checkpoint: a psmamba checkpoint (``psmamba train``'s output); the network runs on the
            grid it was trained at. Exclusive with ``model``. Neither: a method with a network
            stage runs the shipped network (:mod:`psmamba.models.pretrained`); before ``io`` its
            field is kept only if it improves the pair's LNCC.
        model: a loaded network ``forward(moving, fixed) -> (warped, ddf)`` (on ``model_size``).
        iters, refine, lam, window: the earlier versions' Adam optimisation (no linear stage):
            ``iters`` steps of a copy of the network's weights (``refine="weights"``) or of its
            field (``refine="field"``), or of the field alone without a network; ``lam`` weighs
            the diffusion loss, ``window`` is the LNCC window.
        lr: the step of ``io`` (:class:`psmamba.deformable.DeformableConfig` ``lr``), or Adam's
            learning rate with ``iters``.
        similarity: of the linear stage: ``"lncc"`` (one modality) or ``"mi"`` (across modalities).
        fixed_window, moving_window: ``(low, high)`` intensity windows (CT in HU, e.g. -500 800)
            clipped and scaled to [0, 1] instead of the default 0.5/99.5 percentile scaling.
        deformable: a :class:`~psmamba.deformable.DeformableConfig` or a dict of its fields for ``io``.
        device: ``"auto"`` (accelerator if available, else CPU), ``"cpu"``, ``"cuda"``, ...
        out_dir: when given, the outputs are written there atomically (see module docstring).
        model_size: ``(D, H, W)`` grid the network runs on (default: its training grid).
        overview: also draw ``overview.png`` when writing outputs.
        itk: also write ``warp_itk.nii.gz`` (the whole map, affine and deformable, on the fixed
            grid) and ``warp_itk_inverse.nii.gz`` (its inverse on the moving grid) as ITK / ANTs
            displacement field transforms (:func:`psmamba.io.save_itk_warp`).
        inverse: also find the inverse map (``ddf_inverse``; False: None, nothing written for
            it, and the time a method without its own inverse would spend on it saved).
        initial_transform: an affine found before (another tool's, an earlier run's
            ``affine.txt``): an ITK / ANTs transform file (``.txt``, ``.tfm``, ``.mat``:
            :func:`psmamba.transforms.read_itk_affine`) or a ``(4, 4)`` fixed world -> moving
            world matrix (RAS mm). The rigid/affine stage starts from it; a method without one
            (``io``, ``network+io``, ``identity``, a method object, ``iters``) uses it as its
            linear stage as it is.
        labels: the label codes Dice is computed on (default: the codes found in both the fixed
            and the moving label map, :func:`psmamba.metrics.shared_labels`; the others are
            listed in the summary's ``labels_not_scored``).

    Returns a :class:`RegistrationResult` (arrays on the fixed grid, and the summary dict).

    Raises:
        PsmambaError: bad inputs, a bad checkpoint or an unwritable output folder, raised
            before any work is done; nothing is written in that case.
    """
    from psmamba.engine.distributed import resolve_device

    t_start = time.perf_counter()
    if model_size is not None:
        model_size = tuple(int(s) for s in model_size)
        if len(model_size) != 3 or min(model_size) < 2:
            raise PsmambaError(f"model_size must be three sizes >= 2, got {model_size}")
    labels = check_label_list(labels, "labels")
    if out_dir is not None and not str(out_dir).strip():  # wrote into the working folder
        raise PsmambaError("out_dir (--out) is empty: name the output folder")
    if itk and out_dir is None:
        raise PsmambaError("itk=True writes the ITK displacement fields into out_dir: give out_dir, "
                           "or call result.save(folder, itk=True)")
    if isinstance(method, str) and not method.strip():  # ran the default pipeline
        raise PsmambaError("method (--method) is empty: name a method (default, io, affine+io, ...)")
    fixed_window = _check_window("--fixed-window", fixed_window)
    moving_window = _check_window("--moving-window", moving_window)
    initial = _initial_matrix(initial_transform)
    staging = StagingDir(out_dir, owned=OUTPUT_FILES) if out_dir is not None else None
    try:
        dev = resolve_device(device)
        inp = _load_inputs(fixed, moving, moving_labels, fixed_labels, fixed_mask, moving_mask)
        plan = build_pipeline(method, checkpoint=checkpoint, model=model, iters=iters, refine=refine, lr=lr,
                              lam=lam, window=window, model_size=model_size, device=dev, similarity=similarity,
                              deformable=deformable)
        overlap = check_inputs(inp.fixed, inp.moving, inp.fixed_labels, inp.moving_labels, labels=labels,
                               min_size=MIN_SIZE, why=f"registration needs {MIN_SIZE} voxels a side")
        if itk or initial is not None or getattr(plan.method, "external", False):
            # transforms exchanged with ITK-based tools: they orient plain Analyze files otherwise
            for what, img in (("fixed image", inp.fixed), ("moving image", inp.moving)):
                warn_plain_analyze(img, what)
        if initial is not None and plan.linear == "rigid" and np.linalg.det(initial[:3, :3]) < 0:
            raise PsmambaError("--initial-transform mirrors space; a rigid stage alone cannot start from it "
                               "(use --method affine...)")
        t_load = time.perf_counter()
        prep = _prepare(inp, dev, fixed_window, moving_window)
        if plan.linear is None and not np.any(prep.moving_np) and np.any(np.asarray(inp.moving.data)):
            raise PsmambaError(
                f"moving image {_name(inp.moving) or ''} does not overlap the fixed image "
                f"{_name(inp.fixed) or ''} in world coordinates (check the affines, or add an affine "
                "stage: --method affine+io)".replace("  ", " ")
            )
        t_prep = time.perf_counter()
        lin, ddf_t, inv_t = _register(plan, inp, prep, inverse, initial)
        _synchronize(dev)  # accelerator kernels run asynchronously: time them to completion
        t_reg = time.perf_counter()
        result = _finish(inp, prep, plan, lin, ddf_t, inv_t, dev, labels)
        if initial is not None:
            named = isinstance(initial_transform, (str, os.PathLike))
            result.summary["initial_transform"] = {"file": str(initial_transform) if named else None,
                                                   "matrix_ras": initial.tolist()}
        if overlap is not None:
            result.summary["label_overlap"] = {"shared": sorted(overlap.shared), "fixed_only": sorted(overlap.fixed_only),
                                               "moving_only": sorted(overlap.moving_only)}
        result.summary["timings_s"] = {
            "load": t_load - t_start, "preprocess": t_prep - t_load,
            "affine": None if lin is None else lin.time_s,
            "register": t_reg - t_prep, "metrics": time.perf_counter() - t_reg,
        }
        _write_outputs(result, staging, overview, t_start, itk)
        return result
    finally:
        if staging is not None:
            staging.cleanup()


def _initial_matrix(initial: Any) -> np.ndarray | None:
    """``initial_transform`` as a fixed world -> moving world matrix (RAS mm), read and checked."""
    if initial is None:
        return None
    from psmamba.affine import check_init_matrix

    if isinstance(initial, (str, os.PathLike)):
        from psmamba.transforms import read_itk_affine

        if not str(initial).strip():
            raise PsmambaError("--initial-transform: the file name is empty")

        try:
            matrix = read_itk_affine(Path(initial).expanduser())
        except PsmambaError as exc:
            raise PsmambaError(f"--initial-transform: {exc}") from None
        return check_init_matrix(matrix, f"--initial-transform {initial}")
    return check_init_matrix(initial, "initial_transform")


def _write_outputs(result: RegistrationResult, staging: StagingDir | None, overview: bool, t_start: float,
                   itk: bool = False) -> None:
    """Write the staged outputs and move them into place; the timings get ``write`` and ``total``."""
    timings = result.summary["timings_s"]
    if staging is not None:
        t_w = time.perf_counter()
        timings["total"] = t_w - t_start  # written into summary.json
        result._write(staging.tmp, overview=overview, itk=itk)
        result.out_dir = staging.commit()
        timings["write"] = time.perf_counter() - t_w
    timings["total"] = time.perf_counter() - t_start


def _synchronize(dev: "torch.device") -> None:
    """Wait for an accelerator's queued kernels (``torch.accelerator`` from torch 2.6, CUDA before)."""
    import torch

    if dev.type == "cpu":
        return
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        acc.synchronize()
    elif dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)


def _spacing(img) -> list[float]:
    sp = getattr(img, "spacing", None)
    if sp is None:
        sp = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(0))
    return [float(s) for s in sp]


def _dice_summary(per_label: dict[int, float]) -> dict[str, Any]:
    vals = [v for v in per_label.values() if v is not None and not math.isnan(v)]
    return {
        "mean": float(np.mean(vals)) if vals else float("nan"),
        "per_label": {int(k): float(v) for k, v in per_label.items()},
    }
