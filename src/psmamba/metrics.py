"""Evaluation metrics that registration papers report: Dice, HD95, Jacobian, folding, SDlogJ.

Inputs may be numpy arrays or torch tensors (moved to the CPU); results are numpy floats
(``np.float64``, which are also Python floats) or numpy arrays.

Conventions
-----------
* Label maps are integer-valued arrays of one shape (float arrays holding integers, as
  nibabel's ``get_fdata`` returns them, are accepted). Label 0 is background and is never
  scored unless asked for in ``labels``.
* Displacement fields are ``(3, D, H, W)`` or ``(1, 3, D, H, W)`` in voxels (the
  :mod:`psmamba.spatial` convention). The Jacobian determinant is the same whether the field is
  measured in voxels or mm (``det(S J S^-1) = det J`` for the spacing matrix ``S``), so no
  spacing is needed for it.

Which labels a registration is scored on
----------------------------------------
``psmamba register``/``evaluate`` score the labels found in BOTH the fixed and the moving label
map (:func:`shared_labels`; the moving map read on its own grid, before any warping), as the
Learn2Reg evaluation does: a structure that only one subject has cannot be matched, and the
set scored does not depend on the method's output (a method that erased a structure would
otherwise drop it from its own average). The labels left out are listed in ``summary.json``
(``labels_not_scored``). An explicit ``labels`` list is scored as given.

Rules for a label missing from a map (the functions below)
----------------------------------------------------------
* Dice and HD95 of a label absent from BOTH maps are ``NaN``: nothing to score; ``mean_dice``
  skips it (``nanmean``).
* Dice of a label present in only ONE map is ``0`` (complete miss): with the shared labels, a
  structure the warp lost.
* HD95 of a label present in only one map is the length of the volume's diagonal in mm, the
  largest distance possible in the grid, so averages stay finite and still punish the miss
  (psmamba's choice: the Learn2Reg code gives infinity there, and reports HD95 in voxels; here
  it is in mm, from the fixed image's spacing).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.ndimage

from psmamba.errors import PsmambaError

__all__ = [
    "dice",
    "shared_labels",
    "mean_dice",
    "jacobian_determinant",
    "folding_percent",
    "sdlogj",
    "sdlogj_l2r",
    "hd95",
]

#: det is clipped to [_DET_MIN, _DET_MAX] before the log (the Learn2Reg bounds).
_DET_MIN = 1e-9
_DET_MAX = 1e9


def _to_numpy(x, name: str) -> np.ndarray:
    try:
        import torch

        if torch.is_tensor(x):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if x is None:
        raise PsmambaError(f"{name} is missing")
    return np.asarray(x)


def _labels_pair(a, b, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a = _to_numpy(a, names[0])
    b = _to_numpy(b, names[1])
    if a.shape != b.shape:
        raise PsmambaError(f"{names[0]} {a.shape} and {names[1]} {b.shape} must have the same shape")
    return _as_int_labels(a, names[0]), _as_int_labels(b, names[1])


def _as_int_labels(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == bool:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise PsmambaError(f"{name} must hold integer labels, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
        raise PsmambaError(f"{name} must hold integer labels, found non-integer values")
    return a.astype(np.int64)


def shared_labels(fixed_labels, moving_labels) -> tuple[list[int], list[int]]:
    """``(codes in both maps, codes in only one)``, non-zero, sorted: the labels a registration of
    these two label maps is scored on, and the ones left out (see the module notes). The maps
    may lie on different grids (the moving one on its own)."""
    f = {v for v in _counts(_as_int_labels(_to_numpy(fixed_labels, "fixed_labels"), "fixed_labels")) if v != 0}
    m = {v for v in _counts(_as_int_labels(_to_numpy(moving_labels, "moving_labels"), "moving_labels")) if v != 0}
    return sorted(f & m), sorted(f ^ m)


def _label_list(a, b, labels: Iterable[int] | None) -> list[int]:
    """``labels`` as ints, or every non-zero code found in either map (label maps or their
    :func:`_counts`), sorted."""
    if labels is None:
        found = set(a if isinstance(a, dict) else _counts(a)) | set(b if isinstance(b, dict) else _counts(b))
        return sorted(v for v in found if v != 0)
    from psmamba.checks import check_label_list  # "12" was read as the labels 1 and 2

    return check_label_list(labels, "labels", background=True)


#: codes spanning fewer values than this are counted with one ``np.bincount`` pass (O(n), a table
#: of at most 32 MB); wider ranges by sorting (``np.unique``, O(n log n))
_BINCOUNT_MAX = 1 << 22


def _counts(a: np.ndarray) -> dict[int, int]:
    """``{code: voxels}`` of an integer array (codes present only)."""
    if a.size and np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if hi - lo < _BINCOUNT_MAX:
            flat = a.ravel().astype(np.intp, copy=False)
            c = np.bincount(flat - lo if lo else flat, minlength=hi - lo + 1)
            return {int(v) + lo: int(c[v]) for v in np.flatnonzero(c)}
    values, counts = np.unique(a, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def dice(fixed_labels, warped_labels, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice overlap ``2 |F_l & W_l| / (|F_l| + |W_l|)`` per label.

    Args:
        fixed_labels, warped_labels: integer label maps of one shape (any number of axes).
        labels: the label values to score; default: every non-zero value found in either map.

    Returns:
        ``{label: dice}`` in the order of ``labels`` (sorted when found). A label absent from
        both maps is ``NaN``; a label present in only one is ``0.0`` (see the module notes).
    """
    f, w = _labels_pair(fixed_labels, warped_labels, ("fixed_labels", "warped_labels"))
    # one counting pass per map instead of two boolean masks per label
    nf, nw = _counts(f), _counts(w)
    ni = _counts(f[f == w])
    wanted = _label_list(nf, nw, labels)
    out: dict[int, float] = {}
    for lab in wanted:
        total = nf.get(lab, 0) + nw.get(lab, 0)
        out[lab] = np.float64(np.nan) if total == 0 else np.float64(2.0 * ni.get(lab, 0) / total)
    return out


def mean_dice(fixed_labels, warped_labels, labels: Iterable[int] | None = None) -> float:
    """Mean of :func:`dice` over labels, skipping ``NaN`` (labels absent from both maps).

    ``NaN`` if no label is scored at all.
    """
    values = np.array(list(dice(fixed_labels, warped_labels, labels).values()), dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return np.float64(np.nan)
    return np.float64(np.nanmean(values))


def _field(ddf, name: str = "ddf") -> np.ndarray:
    arr = _to_numpy(ddf, name)
    if arr.ndim == 5:
        if arr.shape[0] != 1:
            raise PsmambaError(f"{name}: one field at a time, got batch {arr.shape[0]}")
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise PsmambaError(f"{name} must have shape (3, D, H, W) or (1, 3, D, H, W), got {arr.shape}")
    if min(arr.shape[1:]) < 2:
        raise PsmambaError(f"{name} needs at least 2 voxels per axis for derivatives, got {arr.shape[1:]}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():  # a NaN field counted as 0 % folding before
        raise PsmambaError(f"{name} holds NaN or infinite values")
    return arr


def _det_of(ddf, det) -> np.ndarray:
    """``det`` (checked against ``ddf``'s grid when both are given), else ``ddf``'s Jacobian determinant."""
    if det is None:
        return jacobian_determinant(ddf)
    det = np.asarray(det)
    if ddf is not None:  # the grid only: a NaN field shows in its det (no second pass over the field)
        shape = np.shape(ddf)
        grid = tuple(shape[-3:]) if len(shape) in (4, 5) else None
        if det.shape != grid:
            raise PsmambaError(f"det has shape {det.shape}, but the field's grid is {grid}")
    if not np.isfinite(det).all():
        raise PsmambaError("det holds NaN or infinite values")
    return det


def _det3(j: np.ndarray) -> np.ndarray:
    """Determinant of a ``(3, 3, ...)`` field of matrices (cofactor expansion, no copies)."""
    return (
        j[0, 0] * (j[1, 1] * j[2, 2] - j[1, 2] * j[2, 1])
        - j[0, 1] * (j[1, 0] * j[2, 2] - j[1, 2] * j[2, 0])
        + j[0, 2] * (j[1, 0] * j[2, 1] - j[1, 1] * j[2, 0])
    )


def jacobian_determinant(ddf) -> np.ndarray:
    """Jacobian determinant of the map ``x -> x + ddf(x)`` at every voxel.

    ``J[i, k] = delta_ik + d ddf_i / d x_k`` with ``numpy.gradient`` (central differences
    inside, one-sided at the faces), the reference protocol's computation.

    Args:
        ddf: ``(3, D, H, W)`` or ``(1, 3, D, H, W)`` voxel displacements.

    Returns:
        ``(D, H, W)`` float64 (float32 for a float32 field) determinants; ``<= 0`` means folding.
    """
    u = _field(ddf)
    if u.dtype in (np.float32, np.float64) and u.size >= _KERNEL_MIN_VOXELS:
        try:
            from psmamba._deformable_cpu import jacobian_det_kernel
        except ImportError:  # pragma: no cover - numba is a dependency
            return _jacobian_numpy(u)
        out = np.empty(u.shape[1:], dtype=u.dtype)
        jacobian_det_kernel(u, np.ones(1, u.dtype), np.full(1, 0.5, u.dtype), out)  # one thread: fork-safe
        return out
    return _jacobian_numpy(u)


#: fields at least this large (values) use the one-pass numba kernel (bit-identical, one thread,
#: several times faster and 1/10 of the memory at 160x192x160); smaller ones numpy (no compile)
_KERNEL_MIN_VOXELS = 3 * 32**3


def _jacobian_numpy(u: np.ndarray) -> np.ndarray:
    """:func:`jacobian_determinant` in numpy: nine derivative volumes, then :func:`_det3`."""
    jac = np.empty((3, 3) + u.shape[1:], dtype=u.dtype)
    for i in range(3):
        grads = np.gradient(u[i])  # d u_i / d x_k for k = 0, 1, 2
        for k in range(3):
            jac[i, k] = grads[k]
        jac[i, i] += 1.0
    return _det3(jac)


def folding_percent(ddf, det: np.ndarray | None = None) -> float:
    """Percentage of voxels of the whole volume whose Jacobian determinant is ``<= 0``.

    ``det``: the field's :func:`jacobian_determinant` when the caller has it already.
    """
    det = _det_of(ddf, det)
    return np.float64(100.0 * np.count_nonzero(det <= 0) / det.size)


def sdlogj(ddf, det: np.ndarray | None = None) -> float:
    """Standard deviation of ``log(det J)`` over the whole volume.

    ``det J`` is :func:`jacobian_determinant`, clipped to ``[1e-9, 1e9]`` before the log so
    folded voxels (``det <= 0``) count as a very large contraction (``log 1e-9 ~ -20.7``)
    instead of producing ``NaN``. Population standard deviation (``ddof = 0``). ``det``: the
    field's :func:`jacobian_determinant` when the caller has it already.
    """
    det = _det_of(ddf, det).astype(np.float64)
    return np.float64(np.log(np.clip(det, _DET_MIN, _DET_MAX)).std())


def sdlogj_l2r(ddf, det: np.ndarray | None = None) -> float:
    """SDlogJ exactly as the Learn2Reg challenge evaluation computes it.

    Read off the official L2R evaluation (``MDL-UzL/L2R``, ``evaluation/utils.py`` and
    ``evaluation.py``), reimplemented here:

    1. central differences ``(u[k+1] - u[k-1]) / 2`` of each component along each axis
       (``scipy.ndimage.correlate`` with zero padding; the padding only affects the faces,
       which step 2 removes, so inside this equals ``numpy.gradient``);
    2. ``det(I + grad u)`` with the outer **2** voxels of every face cropped
       (``[2:-2, 2:-2, 2:-2]``);
    3. ``log(clip(det + 3, 1e-9, 1e9))`` -- note the ``+ 3`` that the challenge's script adds
       before the log; it is kept so numbers compare with published Learn2Reg results,
       and it makes this value smaller than :func:`sdlogj` (about 4x for small deformations);
    4. population standard deviation.

    Args:
        ddf: ``(3, D, H, W)`` or ``(1, 3, D, H, W)`` voxel displacements, each axis >= 5.
        det: the field's :func:`jacobian_determinant` when the caller has it already (inside
            the crop ``numpy.gradient`` is the challenge's central difference: the same value).
    """
    u = _field(ddf)
    if min(u.shape[1:]) < 5:
        raise PsmambaError(f"sdlogj_l2r crops 2 voxels per face and needs >= 5 per axis, got {u.shape[1:]}")
    inner = (slice(2, -2),) * 3
    if det is not None and np.shape(det) != u.shape[1:]:
        raise PsmambaError(f"sdlogj_l2r: det {np.shape(det)} is not the field's grid {u.shape[1:]}")
    det = (jacobian_determinant(u) if det is None else np.asarray(det))[inner].astype(np.float64)
    return np.float64(np.log(np.clip(det + 3.0, _DET_MIN, _DET_MAX)).std())


def _spacing3(spacing) -> tuple[float, float, float]:
    try:
        s = np.asarray(_to_numpy(spacing, "spacing"), dtype=np.float64).ravel()
    except (TypeError, ValueError):
        s = np.empty(0)  # text or nested lists: refused below
    if s.size == 1:
        s = np.repeat(s, 3)
    if s.size != 3 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise PsmambaError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    return float(s[0]), float(s[1]), float(s[2])


def _bounding_boxes(labels: np.ndarray):
    """``label -> tuple of slices`` (or None when absent), from one pass over the map."""
    if labels.size and labels.min() >= 0 and labels.max() < 2**20:
        # scipy's find_objects: bounding boxes of all positive labels in one scan
        objects = scipy.ndimage.find_objects(labels.astype(np.int32, copy=False))

        def lookup(lab: int):
            if lab <= 0:
                return _mask_box(labels == lab)
            return objects[lab - 1] if lab - 1 < len(objects) else None

        return lookup
    return lambda lab: _mask_box(labels == lab)


def _mask_box(mask: np.ndarray):
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        others = tuple(j for j in range(mask.ndim) if j != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def hd95(a, b, spacing: Sequence[float] | float = 1.0, labels: Iterable[int] | None = None) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance in mm per label (MONAI's implementation).

    For each label, MONAI's ``compute_hausdorff_distance(percentile=95, spacing=spacing)``:
    surface (edge) voxels of both masks, Euclidean distances from each surface to the other
    with the voxel spacing, the 95th percentile of each direction (linear interpolation,
    ``torch.quantile``), the larger of the two.

    Args:
        a, b: integer label maps of one 3-D shape (e.g. fixed and warped moving labels).
        spacing: voxel size in mm along the three axes (or one number for all).
        labels: label values to score; default every non-zero value found in either map.

    Returns:
        ``{label: hd95_mm}``. ``NaN`` for a label absent from both maps; the volume's diagonal
        in mm for a label present in only one (see the module notes).
    """
    from monai.metrics import compute_hausdorff_distance  # heavy import, only when used

    fa, fb = _labels_pair(a, b, ("a", "b"))
    if fa.ndim != 3:
        raise PsmambaError(f"hd95 needs 3-D label maps, got shape {fa.shape}")
    sp = _spacing3(spacing)
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(fa.shape, sp))))
    boxes_a, boxes_b = _bounding_boxes(fa), _bounding_boxes(fb)
    out: dict[int, float] = {}
    for lab in _label_list(fa, fb, labels):
        box_a, box_b = boxes_a(lab), boxes_b(lab)
        if box_a is None and box_b is None:
            out[lab] = np.float64(np.nan)
            continue
        if (box_a is None) != (box_b is None):
            out[lab] = np.float64(diagonal)
            continue
        # distances are translation invariant: work on the union box plus one empty voxel per
        # side (so edge voxels on the box face are still edges), not on the whole volume
        box = tuple(
            slice(max(min(x.start, y.start) - 1, 0), min(max(x.stop, y.stop) + 1, n))
            for x, y, n in zip(box_a, box_b, fa.shape)
        )
        ma, mb = fa[box] == lab, fb[box] == lab
        with warnings.catch_warnings():
            # MONAI 1.5+ warns about its own internal use of a deprecated argument
            warnings.simplefilter("ignore", FutureWarning)
            value = compute_hausdorff_distance(
                ma[None, None], mb[None, None], include_background=True, percentile=95, spacing=list(sp)
            )
        out[lab] = np.float64(float(value.reshape(-1)[0]))
    return out
