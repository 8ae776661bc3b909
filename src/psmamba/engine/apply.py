"""Carry an image through a registration's map: ``psmamba apply``.

A registration's field -- ``register``'s ``ddf.nii.gz`` (moving onto fixed) or
``ddf_inverse.nii.gz`` (fixed onto moving), an ITK / ANTs displacement field (``warp_itk*.nii.gz``,
``antsApplyTransforms -o [warp.nii.gz,1]``) -- lies on a TARGET grid: target voxel ``p`` takes its
value from the world point ``A_t (p + ddf[p])`` (``A_t``: the target grid's affine; an ITK field's
millimetres are converted to voxels of its grid first, :func:`psmamba.io.load_ddf`). Any image in
the SOURCE's world space -- the moving image itself, its label map, another scan of the same
session co-registered in world coordinates -- is read at that point through its own header
(trilinear, or nearest-neighbour for a label map), whatever its grid: exactly how ``register``
makes ``warped.nii.gz`` and ``warped_labels.nii.gz`` (one interpolation, from the image's own
voxels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psmamba.errors import PsmambaError

__all__ = ["Field", "load_field", "apply_field"]


@dataclass
class Field:
    """A map read for :func:`apply_field`: ``ddf`` ``(3, D, H, W)`` voxel displacements of the
    target grid, whose ``(4, 4)`` affine is ``affine``; ``path``: the file (None in memory)."""

    ddf: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    itk: bool = False  # read from an ITK / ANTs field (world millimetres)


def load_field(field: Any, reference: Any = None) -> Field:
    """The map of ``field`` (a file :func:`psmamba.io.load_ddf` reads, or a :class:`Field`) on
    the target grid; ``reference`` (an image on the target grid, e.g. the fixed image of
    ``ddf.nii.gz``) gives that grid its affine when the field's file has none (a Learn2Reg field
    saved with the identity, or with no orientation at all), and is checked against it.

    Raises:
        PsmambaError: an unreadable field, a field too small to be a 3-D grid, a field without
            orientation and no reference, or a reference on another grid (one line each).
    """
    from psmamba import io
    from psmamba.engine.methods import GivenField

    if isinstance(field, Field):
        fld, given = field, GivenField(field.ddf)
    else:
        if isinstance(field, str) and not field.strip():
            raise PsmambaError("field (--field): the file name is empty")
        given = GivenField(field)  # read once, here; its grid check below reuses it
        ddf, aff, itk = given.load()
        path = Path(field).expanduser()
        if aff is None and reference is None:
            raise PsmambaError(f"field {path}: its file has no orientation (qform and sform codes 0): give "
                               "--reference, an image on its grid (the fixed image of a ddf.nii.gz)")
        fld = Field(ddf.numpy(), aff, path, itk)
    if min(fld.ddf.shape[1:]) < 2:
        raise PsmambaError(f"field {fld.path or ''}: grid {tuple(fld.ddf.shape[1:])} is not a 3-D grid "
                           "(at least 2 voxels a side)".replace("field :", "field:"))
    if reference is None:
        return fld
    ref = io.as_image(reference, "reference image")
    if fld.itk:
        io.warn_plain_analyze(ref, "reference image")
    name = f"the reference image {ref.path}" if ref.path is not None else "the reference image"
    given.check(ref.data.shape, ref.affine, name)
    return Field(fld.ddf, np.asarray(ref.affine, dtype=np.float64), fld.path, fld.itk)


def _output(out: str | os.PathLike, inputs: tuple[Any, ...] = ()) -> Path:
    """``out`` checked before any work: a NIfTI/Analyze name, not one of the ``inputs``, in a folder
    that exists or can be made (made only when the result is written)."""
    from psmamba import io

    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise PsmambaError(f"output (--out): expected a file name, got {out!r}")
    p = Path(out).expanduser()
    if not io._suffix(p):
        raise PsmambaError(f"output {p}: unsupported file type (expected one of {', '.join(io.SUFFIXES)})")
    if p.is_dir():
        raise PsmambaError(f"output {p}: is a folder (name the file to write)")
    for x in inputs:
        if isinstance(x, (str, os.PathLike)) and str(x).strip() and _same_file(p, Path(x).expanduser()):
            raise PsmambaError(f"output {p}: is an input of this command (name another file)")
    parent = p.parent if str(p.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PsmambaError(f"output {p}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PsmambaError(f"output {p}: folder {existing} is not writable")
    return p


def _halves(p: Path) -> list[Path]:
    """The files ``p`` names: itself, or both halves of an Analyze/NIfTI pair."""
    from psmamba import io

    suffix = io._suffix(p, io.READ_SUFFIXES)
    if suffix in (".hdr", ".img", ".hdr.gz", ".img.gz"):
        stem = p.name[: -len(suffix)]
        return [p.with_name(stem + ext) for ext in (".hdr", ".img", ".hdr.gz", ".img.gz")]
    return [p]


def _same_file(out: Path, x: Path) -> bool:
    """Whether writing ``out`` would replace the input ``x`` (or the other half of its pair)."""
    for a in _halves(out):
        for b in _halves(x):
            if a.exists() and b.exists() and os.path.samefile(a, b):
                return True
    return False


def _integer_looking(data: np.ndarray) -> int | None:
    """The number of distinct values of an integer-typed image with few of them (at most 128: a
    label map or a mask given as an image, where an 8-bit intensity image has more), else None."""
    from psmamba.metrics import _counts

    if not np.issubdtype(data.dtype, np.integer) or data.size == 0:
        return None
    n = len(_counts(data))
    return n if n <= 128 else None


def apply_field(field: Any, image: Any, *, reference: Any = None, labels: bool = False,
                out: str | os.PathLike | None = None, device: str = "cpu", padding: float = 0.0):
    """``image`` carried through ``field`` onto the field's (target) grid.

    Args:
        field: the map: a file (``ddf.nii.gz``, ``ddf_inverse.nii.gz``, an ITK / ANTs
            displacement field) or a :class:`Field` (see the module docstring).
        image: a path, :class:`psmamba.io.Image` or array in the source's world space, on any
            grid: a 3-D volume or a 4-D series ``(D, H, W, T)`` (fMRI, diffusion, channels), whose
            every volume goes through the same map (the series' repetition time is kept).
        reference: an image on the target grid (optional, see :func:`load_field`).
        labels: ``image`` is a label map: integer codes kept, nearest-neighbour (stored in the
            smallest integer type that holds them, as :func:`psmamba.io.load_labels` reads them).
        out: write the result there (``.nii.gz``, ``.nii``, ``.hdr``/``.img``; its folder is
            created), with the target grid's affine; atomically.
        device: where the resampling runs.
        padding: the value outside the image (0; label maps always 0).

    Returns:
        :class:`psmamba.io.Image` on the target grid (``path``: ``out`` or None).
    """
    import torch

    from psmamba import io
    from psmamba.engine.distributed import resolve_device
    from psmamba.engine.register import _apply, _sample_at
    from psmamba.spatial import identity_grid

    if not np.isfinite(padding):
        raise PsmambaError(f"padding must be a finite number, got {padding}")
    for flag, x in (("--image", image), ("--reference", reference)):
        if isinstance(x, str) and not x.strip():
            raise PsmambaError(f"{flag}: the file name is empty")
    out = None if out is None else _output(out, (field, image, reference))
    dev = resolve_device(device)
    fld = load_field(field, reference)
    img = _source(image, labels)
    if fld.itk:  # millimetres from an ITK-based tool: it must have read the images as psmamba does
        io.warn_plain_analyze(img, "label map" if labels else "image")
    n = None if labels else _integer_looking(np.asarray(img.data))
    if n is not None:
        import warnings

        where = f"{img.path} " if img.path is not None else "the image "
        warnings.warn(f"{where}holds {n} integer values: if it is a label map, apply it with labels=True "
                      "(--labels: nearest neighbour; trilinear mixes the codes)", stacklevel=2)
    shape = tuple(int(s) for s in fld.ddf.shape[1:])
    to_image = np.linalg.inv(np.asarray(img.affine, dtype=np.float64)) @ fld.affine
    data = np.asarray(img.data)
    series = data.ndim == 4  # (D, H, W, T): every volume through the same map
    vols = data if series else data[..., None]
    result = np.empty(shape + (vols.shape[3],), dtype=data.dtype if labels else np.float32)
    with torch.no_grad():
        ddf = torch.from_numpy(np.ascontiguousarray(fld.ddf, dtype=np.float32))[None].to(dev)
        pos = _apply(to_image, identity_grid(shape, device=dev) + ddf)
        del ddf
        _check_overlap(pos, data.shape[:3], img, labels)
        for t in range(vols.shape[3]):
            v = vols[..., t]
            if labels:
                vol = torch.from_numpy(np.ascontiguousarray(v.astype(np.int64)))[None, None].to(dev)
                result[..., t] = _sample_at(vol, pos, mode="nearest")[0, 0].cpu().numpy()
            else:
                vol = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None, None].to(dev)
                if padding:
                    vol = vol - padding  # grid_sample pads with zeros: shift so the outside reads `padding`
                result[..., t] = _sample_at(vol, pos)[0, 0].cpu().numpy()
    if padding and not labels:
        result += np.float32(padding)
    if not series:
        result = result[..., 0]
    written = None
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PsmambaError(f"output {out}: its folder cannot be made ({exc.strerror or exc})") from None
        written = io.save_series(out, result, fld.affine, header=img.header if series else None, labels=labels)
    return io.Image(data=result, affine=np.asarray(fld.affine, dtype=np.float64), header=None, path=written)


def _check_overlap(pos, shape, img, labels: bool) -> None:
    """A one-line error, before anything is written, when no voxel of the target grid reads inside
    the image (the result would be all padding): another world space than the map's source."""
    import torch

    inside = torch.ones(pos.shape[2:], dtype=torch.bool, device=pos.device)
    for axis, n in enumerate(shape):
        inside &= (pos[0, axis] > -0.5) & (pos[0, axis] < n - 0.5)
    if bool(inside.any()):
        return
    what = "label map" if labels else "image"
    name = f"{what} {img.path}" if img.path is not None else f"the {what}"
    raise PsmambaError(f"{name}: no voxel of the field's grid maps inside it (the result would be all padding): an "
                       "image of another space than the map's source (ddf.nii.gz carries moving-space images, "
                       "ddf_inverse.nii.gz fixed-space ones), or a wrong header?")


def _source(image: Any, labels: bool):
    """The image to carry: a 3-D volume or a 4-D series ``(D, H, W, T)`` (a file, an
    :class:`psmamba.io.Image` or an array), checked as :func:`psmamba.io.load_series` checks a file."""
    from psmamba import io

    what = "label map" if labels else "image"
    img = io.as_image(image, what, labels=labels, series=True)
    if io.is_ddf_header(img.header):
        raise PsmambaError(f"{what} {img.path}: is a displacement field (psmamba's ddf), not an image: a field is not "
                           "carried through another one component by component")
    return img
