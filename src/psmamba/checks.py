"""Checks of every input before any work: numbers, images, affines, label maps, image files.

Each check raises :class:`psmamba.errors.PsmambaError` with ONE line that names the flag or the
file and says what is wrong; the command line prints it as ``psmamba: error: ...`` (exit 2).
The callers (``register``, ``evaluate``) run all of them before the first voxel is resampled,
so a bad input never costs the time of a registration and never leaves half an output behind.

* :func:`check_number` -- a numeric flag: finite, positive / non-negative, integer, a minimum.
* :func:`check_image` -- an image array: 3-D, finite (NaN/Inf counted), not constant, large
  enough (:func:`check_size`: ``min_size`` voxels a side, with the reason).
* :func:`check_affine` -- a voxel-to-world matrix: 4x4, finite, ``0 0 0 1`` last row,
  non-singular and not nearly so.
* :func:`check_same_grid` -- a label map on its image's grid (shape, affine to 1e-3 mm).
* :func:`check_label_overlap` -- two label maps share at least one non-zero label.
* :func:`check_inputs` -- all of the above for one registration's images and label maps.
* :func:`check_volume_file` -- an image or label FILE read once, slab by slab (bounded memory;
  a ``.nii.gz`` is decompressed whole, so a corrupt or truncated one fails its CRC here), with
  the checks above on what it holds; returns the facts later checks need (shape, affine,
  label codes) without keeping the voxels.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psmamba.errors import PsmambaError
from psmamba.io import _ROUND_OFF, NAN_HINT, _short, check_scalar_dtype

__all__ = [
    "check_number",
    "check_image",
    "check_size",
    "check_affine",
    "check_same_grid",
    "check_label_overlap",
    "check_inputs",
    "check_volume_file",
    "image_name",
    "LabelOverlap",
    "VolumeFacts",
    "METRICS_MIN_SIZE",
    "METRICS_WHY",
    "MAX_CONDITION",
]

#: The fewest voxels a side of the fixed grid the evaluation metrics need: SDlogJ as
#: Learn2Reg computes it crops 2 voxels per face (:func:`psmamba.metrics.sdlogj_l2r`).
METRICS_MIN_SIZE = 5
METRICS_WHY = "the metrics need 5 voxels a side (SDlogJ crops 2 voxels per face)"

#: The largest condition number of an affine's 3x3 part taken as a sane voxel grid. Real
#: grids stay below ~1e2 (a 0.2 mm x 10 mm slice is 50); 1e6 means the header is broken.
MAX_CONDITION = 1e6
#: Voxel axes shorter than this (mm) make an affine singular.
_TINY_MM = 1e-6
#: Voxels per slab when a file is checked (bounds the memory a check needs beyond the file).
_SLAB_VOXELS = 1 << 22


# --------------------------------------------------------------------------- numbers
def check_number(
    flag: str,
    value: Any,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    integer: bool = False,
    finite: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """``value`` of ``flag`` if it is a number that meets the conditions; None passes through.

    Args:
        flag: how the value is named in the error (``"--lr"``, ``"lam"``).
        value: the number (``None``, "not given", is returned as is).
        positive: ``> 0``; nonnegative: ``>= 0``; minimum: ``>= minimum``; maximum: ``<= maximum``.
        integer: a whole number (``3.0`` is accepted and returned as ``3``).
        finite: no NaN or infinity (default).

    Returns:
        The value (an ``int`` when ``integer``).

    Raises:
        PsmambaError: e.g. ``--lr must be a finite number > 0, got nan``.
    """
    if value is None:
        return None
    bounds = [b for b, on in (("> 0", positive), (">= 0", nonnegative and not positive),
                              (f">= {minimum:g}" if minimum is not None else "", minimum is not None),
                              (f"<= {maximum:g}" if maximum is not None else "", maximum is not None)) if on]
    kind = "an integer" if integer else ("a finite number" if finite else "a number")
    want = " ".join([kind] + bounds[:1] + [f"and {b}" for b in bounds[1:]])
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PsmambaError(f"{flag} must be {want}, got {value!r}")
    v = float(value)
    if (finite or integer) and not math.isfinite(v):
        raise PsmambaError(f"{flag} must be {want}, got {value!r}")
    if math.isnan(v) or (positive and not v > 0) or (nonnegative and not v >= 0) \
            or (minimum is not None and not v >= minimum) or (maximum is not None and not v <= maximum) \
            or (integer and v != int(v)):
        raise PsmambaError(f"{flag} must be {want}, got {value!r}")
    return int(v) if integer else value


# --------------------------------------------------------------------------- images
def image_name(what: str, img: Any = None) -> str:
    """``"fixed image /data/f.nii.gz"``: ``what`` and the image's file when it has one."""
    path = getattr(img, "path", None) if img is not None else None
    return f"{what} {path}" if path not in (None, "") else what


@dataclass
class _Stats:
    """What a pass over the voxels found."""

    n_nan: int = 0
    n_inf: int = 0
    n_fraction: int = 0  # finite non-integer values (labels only)
    example_fraction: float | None = None
    lo: float = math.inf  # over finite values
    hi: float = -math.inf
    codes: frozenset[int] | None = None  # label codes (labels only)


def _as_numpy(data: Any) -> np.ndarray:
    if hasattr(data, "detach") and hasattr(data, "cpu"):  # a torch tensor
        return data.detach().cpu().numpy()
    return np.asarray(data)


def _label_codes(arr: np.ndarray) -> set[int]:
    """The distinct integer values of ``arr`` (bincount when the values are small, else unique)."""
    if arr.size == 0:
        return set()
    if arr.dtype.kind in "ub" or (arr.dtype.kind == "i" and arr.min() >= 0):
        hi = int(arr.max())
        if hi < (1 << 16):
            return {int(c) for c in np.flatnonzero(np.bincount(arr.ravel().astype(np.intp, copy=False),
                                                                 minlength=hi + 1))}
    return {int(c) for c in np.unique(arr)}


def _scan(slabs: Iterable[np.ndarray], labels: bool) -> _Stats:
    """One pass over a volume's slabs: non-finite counts, finite range, label codes."""
    st = _Stats()
    codes: set[int] = set()
    for a in slabs:
        if a.size == 0:
            continue
        if a.dtype.kind in "fc":
            ok = np.isfinite(a)
            if not ok.all():
                nan = int(np.count_nonzero(np.isnan(a)))
                st.n_nan += nan
                st.n_inf += int(a.size - np.count_nonzero(ok)) - nan
                a = a[ok]
                if a.size == 0:
                    continue
            if labels:
                rounded = np.round(a)
                frac = np.abs(a - rounded) > _ROUND_OFF  # (closer: float round-off of a code, read as it)
                if frac.any():
                    st.n_fraction += int(np.count_nonzero(frac))
                    st.example_fraction = st.example_fraction if st.example_fraction is not None \
                        else float(a[frac].flat[0])
                    continue
                a = rounded
        st.lo = min(st.lo, float(a.min()))
        st.hi = max(st.hi, float(a.max()))
        if labels and not st.n_fraction:
            codes |= _label_codes(a if a.dtype.kind in "biu" else a.astype(np.int64))
    if labels:
        st.codes = frozenset(codes)
    return st


def _judge(st: _Stats, shape: tuple[int, ...], name: str, labels: bool, min_size: int | None,
           why: str | None, nan_hint: str = "") -> None:
    """The one-line error for what :func:`_scan` found, if anything is wrong."""
    if len(shape) != 3:
        raise PsmambaError(f"{name}: expected a 3-D volume, got shape {tuple(shape)}")
    if min(shape) == 0:
        raise PsmambaError(f"{name}: holds no voxels (shape {tuple(shape)})")
    if st.n_nan or st.n_inf:
        parts = [f"{n} {kind}" for n, kind in ((st.n_nan, "NaN"), (st.n_inf, "Inf")) if n]
        kind = "a label map" if labels else "the image"
        raise PsmambaError(f"{name}: {kind} holds {' and '.join(parts)} voxel value(s) of {math.prod(shape)}"
                           + nan_hint)
    if labels and st.n_fraction:
        raise PsmambaError(f"{name}: a label map must hold integer values, found {st.n_fraction} "
                           f"non-integer voxel(s) (e.g. {st.example_fraction:.9g})")
    if labels and st.lo < 0:
        raise PsmambaError(f"{name}: a label map must hold codes >= 0 (0 is the background), found {st.lo:g}")
    check_size(shape, name, min_size, why)
    if not labels and st.lo == st.hi:
        raise PsmambaError(f"{name}: the image is constant (every voxel is {st.lo:g}): nothing to register")


def check_size(shape: Sequence[int], name: str, min_size: int | None, why: str | None = None) -> None:
    """Every side of ``shape`` is at least ``min_size`` voxels (None: no limit); ``why`` is the
    reason said in the error, e.g. ``fixed image f.nii.gz of shape 12x12x12 is too small: the
    3-level pyramid needs 16 voxels a side``."""
    if min_size is not None and min(shape) < min_size:
        reason = why or f"at least {min_size} voxels a side are needed"
        raise PsmambaError(f"{name} of shape {'x'.join(str(int(s)) for s in shape)} is too small: {reason}")


def check_image(data: Any, name: str, *, min_size: int | None = None, why: str | None = None) -> None:
    """An image a registration can use: 3-D, finite, not constant, ``min_size`` voxels a side.

    Args:
        data: ``(D, H, W)`` array or tensor, or an object with ``.data`` (a
            :class:`psmamba.io.Image`: pass ``name=image_name("fixed image", img)``).
        name: how the image is named in the error (``"fixed image /data/f.nii.gz"``).
        min_size: the fewest voxels along every axis, if any.
        why: the reason for ``min_size``, said in the error (e.g. ``"the 3-level pyramid needs
            16 voxels a side"``).

    Raises:
        PsmambaError: e.g. ``fixed image f.nii.gz: the image holds 3 NaN and 1 Inf voxel
        value(s) of 4096``, ``... is constant ...``, ``... of shape 8x8x8 is too small: ...``.
    """
    arr = _as_numpy(getattr(data, "data", data))
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) != 3 or min(shape) == 0:
        _judge(_Stats(), shape, name, False, None, None)
    _judge(_scan([arr], labels=False), shape, name, False, min_size, why)


def check_affine(affine: Any, name: str) -> np.ndarray:
    """A voxel-to-world affine psmamba can invert: 4x4, finite, last row ``0 0 0 1``, its 3x3
    part non-singular (voxel axes longer than 1e-6 mm) with a condition number below
    :data:`MAX_CONDITION`.

    Args:
        affine: ``(4, 4)`` matrix (array or tensor).
        name: the image or file it belongs to (``"moving image /data/m.nii.gz"``).

    Returns:
        The affine as float64 ``(4, 4)``.

    Raises:
        PsmambaError: e.g. ``moving image m.nii.gz: its voxel-to-world affine is singular ...``.
    """
    a = np.asarray(_as_numpy(affine), dtype=np.float64)
    if a.shape != (4, 4):
        raise PsmambaError(f"{name}: the affine must be a 4x4 matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise PsmambaError(f"{name}: its voxel-to-world affine holds NaN/Inf values (a broken header)")
    if not np.allclose(a[3], (0, 0, 0, 1)):
        raise PsmambaError(f"{name}: its affine's last row is {a[3].tolist()}, not [0, 0, 0, 1]")
    s = np.linalg.svd(a[:3, :3], compute_uv=False)  # descending
    sizes = "x".join(f"{v:.3g}" for v in np.linalg.norm(a[:3, :3], axis=0))
    if s[-1] <= _TINY_MM:
        raise PsmambaError(f"{name}: its voxel-to-world affine is singular (voxel sizes {sizes} mm, "
                           f"determinant {np.linalg.det(a[:3, :3]):.3g}): fix the header's pixdim/sform/qform")
    if s[0] / s[-1] > MAX_CONDITION:
        raise PsmambaError(f"{name}: its voxel-to-world affine is nearly singular (condition number "
                           f"{s[0] / s[-1]:.3g} > {MAX_CONDITION:g}, voxel sizes {sizes} mm): fix the header")
    return a


def check_same_grid(img: Any, ref: Any, name: str, ref_name: str) -> None:
    """``img`` (a label map) lies on ``ref``'s grid: same shape, affines equal to 1e-3.

    Both are objects with ``.shape`` and ``.affine`` (:class:`psmamba.io.Image`,
    :class:`VolumeFacts`).
    """
    if tuple(img.shape) != tuple(ref.shape):
        raise PsmambaError(f"{name} has shape {tuple(img.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if not np.allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=1e-3):
        raise PsmambaError(f"{name} and {ref_name} have different affines (the label map is not on the image's grid)")


# --------------------------------------------------------------------------- label maps
@dataclass(frozen=True)
class LabelOverlap:
    """The non-zero label codes of two label maps: in both, only in the fixed, only in the moving."""

    shared: tuple[int, ...]
    fixed_only: tuple[int, ...]
    moving_only: tuple[int, ...]

    def line(self) -> str:
        """``"35 labels in both maps (1 only in the fixed map, 0 only in the moving map)"``."""
        return (f"{len(self.shared)} label(s) in both maps ({len(self.fixed_only)} only in the fixed map, "
                f"{len(self.moving_only)} only in the moving map)")


def _codes_of(labels: Any) -> frozenset[int]:
    if isinstance(labels, (set, frozenset, list, tuple)):
        return frozenset(int(c) for c in labels)
    codes = getattr(labels, "codes", None)  # a VolumeFacts
    if codes is not None:
        return frozenset(codes)
    arr = _as_numpy(getattr(labels, "data", labels))
    return frozenset(_label_codes(arr if arr.dtype.kind in "biu" else arr.astype(np.int64)))


def check_label_overlap(
    fixed_labels: Any,
    moving_labels: Any,
    fixed_name: str,
    moving_name: str,
    *,
    labels: Sequence[int] | None = None,
) -> LabelOverlap:
    """Two label maps must share a non-zero label, or their Dice says nothing.

    Args:
        fixed_labels, moving_labels: label maps (arrays, tensors, :class:`psmamba.io.Image`) or
            their codes (a set of ints, a :class:`VolumeFacts`). 0 is background.
        fixed_name, moving_name: how they are named in the error.
        labels: the codes to be scored (``--labels``); default all non-zero codes.

    Returns:
        The overlap (:meth:`LabelOverlap.line` says it in words).

    Raises:
        PsmambaError: a map with no non-zero label, or no (selected) label in both maps.
    """
    from psmamba.data.labels import format_codes

    f = _codes_of(fixed_labels) - {0}
    m = _codes_of(moving_labels) - {0}
    for codes, name in ((f, fixed_name), (m, moving_name)):
        if not codes:
            raise PsmambaError(f"{name}: the label map holds no label (every voxel is 0)")
    shared = f & m
    if labels is not None:
        chosen = {int(c) for c in labels}
        if not shared & chosen:
            raise PsmambaError(f"none of the labels to score ({format_codes(chosen)}) is in both {fixed_name} "
                               f"(labels {format_codes(f)}) and {moving_name} (labels {format_codes(m)})")
    elif not shared:
        raise PsmambaError(f"{fixed_name} (labels {format_codes(f)}) and {moving_name} (labels {format_codes(m)}) "
                           "share no label: every Dice would be 0 (are they of the same labelling protocol?)")
    return LabelOverlap(tuple(sorted(shared)), tuple(sorted(f - m)), tuple(sorted(m - f)))


def check_label_list(labels: Any, flag: str = "--labels", background: bool = False) -> list[int] | None:
    """The label codes to score, as ints: a non-empty list of whole numbers > 0 (``background``:
    >= 0, code 0 scored as asked) (None: all)."""
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise PsmambaError(f"{flag} must be a list of label codes, got {labels!r}")
    codes = [check_number(flag, c, integer=True, positive=not background, nonnegative=background) for c in labels]
    if not codes:
        raise PsmambaError(f"{flag} names no label code (leave it out to score every label)")
    return codes


def check_label_codes(labels: Sequence[int] | None, present: Iterable[int], where: str,
                      flag: str = "--labels") -> None:
    """Every code of ``labels`` is in some label map of ``where`` (``present``: their codes), else
    a one-line error naming the unknown codes: a typo scores nothing, silently, otherwise."""
    from psmamba.data.labels import format_codes

    if labels is None:
        return
    present = {int(c) for c in present} - {0}
    unknown = sorted({int(c) for c in labels} - present)
    if unknown:
        raise PsmambaError(f"{flag}: label code(s) {format_codes(unknown)} in no label map of {where} "
                           f"(codes there: {format_codes(sorted(present))})")


# --------------------------------------------------------------------------- one registration
def check_inputs(
    fixed: Any,
    moving: Any,
    fixed_labels: Any = None,
    moving_labels: Any = None,
    *,
    labels: Sequence[int] | None = None,
    min_size: int | None = None,
    why: str | None = None,
) -> LabelOverlap | None:
    """All checks of one registration's inputs, in the order a user would fix them.

    Each input is a loaded :class:`psmamba.io.Image` (its voxels and affine are checked
    here: :func:`check_image`, :func:`check_affine`) or the :class:`VolumeFacts` of a file
    :func:`check_volume_file` already checked. Then: both images large enough (``min_size``
    voxels a side, and the fixed one :data:`METRICS_MIN_SIZE` for the metrics computed on its
    grid), each label map on its image's grid (:func:`check_same_grid`), and the two label
    maps sharing a label (:func:`check_label_overlap`, of ``labels`` when given).

    Args:
        fixed, moving: the images; fixed_labels, moving_labels: their label maps or None.
        labels: the codes to be scored (default: all).
        min_size, why: the fewest voxels a side the method needs, and the reason.

    Returns:
        The label overlap when both label maps are given, else None.

    Raises:
        PsmambaError: the first problem, one line naming the image (and its file).
    """
    def name(what: str, img: Any) -> str:
        return image_name(what, img)

    for img, what, is_labels in ((fixed, "fixed image", False), (moving, "moving image", False),
                                 (fixed_labels, "fixed labels", True), (moving_labels, "moving labels", True)):
        if img is not None and not isinstance(img, VolumeFacts):
            if not is_labels:
                check_image(img.data, name(what, img))
            check_affine(img.affine, name(what, img))
    if min_size is not None and min_size > METRICS_MIN_SIZE:
        check_size(fixed.shape, name("fixed image", fixed), min_size, why)
    else:
        check_size(fixed.shape, name("fixed image", fixed), METRICS_MIN_SIZE, METRICS_WHY)
    check_size(moving.shape, name("moving image", moving), min_size, why)
    for lab, img, role in ((fixed_labels, fixed, "fixed"), (moving_labels, moving, "moving")):
        if lab is not None:
            check_same_grid(lab, img, name(f"{role} labels", lab), name(f"{role} image", img))
    if fixed_labels is not None and moving_labels is None:  # silently unused before
        raise PsmambaError(f"{name('fixed labels', fixed_labels)} given without moving labels: Dice compares the "
                           "warped moving labels with them")
    if fixed_labels is None or moving_labels is None:
        if labels is not None:
            raise PsmambaError("labels to score were given, but not both label maps (fixed and moving)")
        return None
    return check_label_overlap(fixed_labels, moving_labels, name("fixed labels", fixed_labels),
                               name("moving labels", moving_labels), labels=labels)


# --------------------------------------------------------------------------- files
@dataclass(frozen=True)
class VolumeFacts:
    """What :func:`check_volume_file` learnt about a file (the voxels themselves are not kept).

    Attributes:
        path: the file.
        shape: ``(D, H, W)``.
        affine: ``(4, 4)`` float64, voxel -> world mm.
        codes: the label codes (label maps only; None for images).
        lo, hi: the range of its values.
    """

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    codes: frozenset[int] | None
    lo: float
    hi: float


def _open(p: Path, what: str):
    """The nibabel image of ``p``; a ``.gz`` file is decompressed whole here (CRC checked)."""
    from psmamba.io import READ_SUFFIXES, _suffix, open_image

    # the header only (voxels: memory-mapped or lazily); a pair, either half gzipped, any case, is
    # read as the loader reads it (its gzip CRC checked there)
    img, _ = open_image(p, what)
    pair = _suffix(p, READ_SUFFIXES) in (".hdr", ".img", ".hdr.gz", ".img.gz")
    if pair or not p.name.lower().endswith(".gz") or not hasattr(type(img), "from_bytes"):
        return img
    try:
        # nibabel reads only the bytes the voxels need, never the gzip trailer: a flipped bit
        # near the end would pass. Decompressing the whole stream checks its CRC.
        with gzip.open(p, "rb") as fh:
            return type(img).from_bytes(fh.read())
    except MemoryError:
        raise
    except Exception as exc:  # gzip, zlib and OS errors: "unreadable"
        raise PsmambaError(f"{what} {p}: cannot be read as NIfTI/Analyze ({_short(exc)})") from exc


def _slabs(img, p: Path, what: str) -> Iterator[np.ndarray]:
    """The voxels of ``img`` along its third axis, about :data:`_SLAB_VOXELS` at a time."""
    shape = img.shape
    step = max(1, _SLAB_VOXELS // max(1, int(shape[0]) * int(shape[1])))
    extra = (0,) * (len(shape) - 3)  # trailing singleton axes (a 4-D file of one volume)
    for k in range(0, int(shape[2]), step):
        try:
            yield np.asarray(img.dataobj[(slice(None), slice(None), slice(k, k + step)) + extra])
        except MemoryError:
            raise
        except Exception as exc:
            raise PsmambaError(f"{what} {p}: cannot be read as NIfTI/Analyze ({_short(exc)})") from exc


def check_volume_file(
    path: str | os.PathLike,
    what: str,
    *,
    labels: bool = False,
    min_size: int | None = None,
    why: str | None = None,
) -> VolumeFacts:
    """Read an image or label file once and check it as :func:`psmamba.io.load_image` /
    :func:`~psmamba.io.load_labels` would, plus :func:`check_image` (images) and
    :func:`check_affine`, keeping only its facts.

    The voxels are read slab by slab (a ``.nii.gz`` is first decompressed whole into memory,
    which also checks its CRC); nothing of the size of the volume as floats is kept.

    Args:
        path: ``.nii``, ``.nii.gz``, or either half of an ``.hdr``/``.img`` pair.
        what: how the file is named in errors (``"moving labels"``).
        labels: a label map (integer values; its codes are collected) instead of an image.
        min_size, why: as :func:`check_image` (images only).

    Raises:
        PsmambaError: missing, unreadable or corrupt file, not 3-D, NaN/Inf, a broken affine,
            a constant or too small image, a label map with non-integer or negative values.
    """
    p = Path(path).expanduser()
    img = _open(p, what)
    name = f"{what} {p}"
    shape = [int(s) for s in img.shape]
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) != 3 or min(shape) == 0:
        _judge(_Stats(), tuple(shape), name, labels, None, None)
    affine = check_affine(img.affine, name)
    from psmamba.io import _warn_geometry

    _warn_geometry(img.header, shape, name, p)  # as the loader would, once per file
    check_scalar_dtype(img.get_data_dtype(), name)
    st = _scan(_slabs(img, p, what), labels)
    _judge(st, tuple(shape), name, labels, None if labels else min_size, why, NAN_HINT)
    return VolumeFacts(p, tuple(shape), affine, st.codes, st.lo, st.hi)  # type: ignore[arg-type]
