"""Read and write NIfTI (``.nii``, ``.nii.gz``) and Analyze (``.hdr``/``.img``) volumes with nibabel.

Orientation: none is changed, ever
----------------------------------
Every array here is in the **file's own voxel order**: ``data[i, j, k]`` is the voxel that the
file stores at index ``(i, j, k)``; nothing is reoriented or flipped. The 4x4 ``affine`` maps a
voxel index ``(i, j, k, 1)`` to world coordinates in millimetres, RAS+ (nibabel's convention:
+x towards the subject's Right, +y Anterior, +z Superior). Array axis 0 of a volume is axis ``D`` of a
``(B, C, D, H, W)`` tensor and channel ``i`` of a displacement field (see
:mod:`psmamba.spatial`). Outputs of a registration (warped image, warped labels, the field,
Jacobian maps) live on the fixed image's grid, so writing them with the FIXED image's affine
keeps every output aligned with the fixed image in any viewer.

Pairs are read whichever half is gzipped (``.hdr`` + ``.img.gz``, as LONI ships LPBA40) and in
any letter case (:func:`analyze_pair`). Plain Analyze 7.5 files (LPBA40's ``.hdr``/``.img``) store voxel sizes and an origin but no
orientation; their affine is nibabel's reading of them (x axis flipped, the radiological
convention that format assumes). ``.hdr``/``.img`` files written here are NIfTI pairs, which
store the full affine.

Writes are atomic: the volume is written to a hidden temporary file in the destination folder
and renamed over the destination (``os.replace``); on any error the temporary file is removed
and the destination is untouched. (An Analyze/NIfTI pair is two files, renamed one after the
other: ``.img`` first, then ``.hdr``.)

Errors are :class:`psmamba.errors.PsmambaError` with one line naming the file.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from psmamba.errors import PsmambaError

__all__ = [
    "Image",
    "load_image",
    "load_labels",
    "load_series",
    "load_ddf",
    "save_image",
    "save_labels",
    "save_series",
    "save_ddf",
    "save_itk_warp",
    "SUFFIXES",
    "READ_SUFFIXES",
    "as_image",
]

#: File name endings read and written here. ``.img`` and ``.hdr`` name the same pair.
SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img")
#: File name endings read (any case): also gzipped Analyze/NIfTI pairs, whose two halves may be
#: compressed apart (LONI's LPBA40 release ships ``S01....img.gz`` beside a plain ``.hdr``).
READ_SUFFIXES = (".nii.gz", ".nii", ".hdr.gz", ".img.gz", ".hdr", ".img")


@dataclass
class Image:
    """A volume read from disk.

    Attributes:
        data: the voxels in the file's voxel order and dtype (after nibabel's scaling, if the
            file has a slope/intercept): ``(D, H, W)`` for images and labels, ``(D, H, W, 3)``
            for a displacement field read by :func:`load_ddf`.
        affine: ``(4, 4)`` float64, voxel index -> world RAS+ mm.
        header: the nibabel header (``Nifti1Header``, ``Nifti1PairHeader`` or ``AnalyzeHeader``).
        path: the file read.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes (the header's zooms)."""
        if self.header is not None:
            zooms = self.header.get_zooms()
            if len(zooms) >= 3:
                return tuple(float(z) for z in zooms[:3])  # type: ignore[return-value]
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


# --------------------------------------------------------------------------- helpers
def _suffix(path: Path, suffixes: tuple[str, ...] = SUFFIXES) -> str:
    name = path.name.lower()
    for suffix in suffixes:
        if name.endswith(suffix):
            return suffix
    return ""


def _folder_listing(folder: Path, prefix: str = "") -> dict[str, list[Path]]:
    """``{lower-case name: [paths]}`` of the files in ``folder`` whose lower-case name starts with
    ``prefix`` (names that differ only in case share a key)."""
    out: dict[str, list[Path]] = {}
    try:
        for e in folder.iterdir():
            low = e.name.lower()
            if low.startswith(prefix):
                out.setdefault(low, []).append(e)
    except OSError:
        pass
    return out


def analyze_pair(p: Path, listing: dict[str, list[Path]] | None = None) -> tuple[Path | None, Path | None]:
    """The header and image files of the Analyze/NIfTI pair that ``p`` (either half) names:
    ``.hdr`` or ``.hdr.gz`` beside ``.img`` or ``.img.gz``, in any letter case (``None`` where
    one is missing or where several files in different cases could be it). ``p`` is its own
    half; for the other, a file spelt like ``p``'s stem wins, then one compressed like ``p``.
    ``listing``: :func:`_folder_listing` of ``p``'s folder, when the caller has it."""
    p = Path(p)
    suffix = _suffix(p, READ_SUFFIXES)
    stem = p.name[: -len(suffix)]
    if listing is None:
        listing = _folder_listing(p.parent, stem.lower())
    gz = suffix.endswith(".gz")

    def half(kind: str) -> Path | None:
        if suffix.startswith("." + kind):
            return p if p.is_file() else None
        cands = [q for ext in ("." + kind, "." + kind + ".gz") for q in listing.get(stem.lower() + ext, [])
                 if q.is_file()]
        exact = [q for q in cands if q.name.startswith(stem)]
        cands = exact or (cands if len({q.name[: len(stem)] for q in cands}) == 1 else [])
        cands.sort(key=lambda q: q.name.lower().endswith(".gz") != gz)
        return cands[0] if cands else None

    return half("hdr"), half("img")


def _load_pair(hdr: Path, img: Path):
    """nibabel image of an Analyze/NIfTI pair, whichever half is gzipped and whatever the letter
    case (``nib.load`` by name wants both halves compressed alike and named alike): the header
    bytes decide the class as ``nib.load`` would (NIfTI-1/2 pair by its magic, else SPM2 Analyze,
    whose optional ``.mat``/``.mat.gz`` beside it is read too). Both halves are read into memory
    (a gzipped half whole, so its CRC is checked); the image stays usable after this returns."""
    import gzip
    from io import BytesIO

    from nibabel.fileholders import FileHolder

    def read(q: Path) -> bytes:
        with (gzip.open(q, "rb") if q.name.lower().endswith(".gz") else open(q, "rb")) as fh:
            return fh.read()

    raw = read(hdr)
    if len(raw) >= 348 and raw[344:347] == b"ni1":
        klass = nib.Nifti1Pair
    elif len(raw) >= 4 and 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")):
        klass = nib.Nifti2Pair
    else:
        klass = nib.Spm2AnalyzeImage
    holders = {"header": FileHolder(fileobj=BytesIO(raw)), "image": FileHolder(fileobj=BytesIO(read(img)))}
    if klass is nib.Spm2AnalyzeImage:
        stem = hdr.name[: -len(_suffix(hdr, READ_SUFFIXES))]
        listing = _folder_listing(hdr.parent, stem.lower())
        mats = [q for ext in (".mat", ".mat.gz") for q in listing.get(stem.lower() + ext, [])]
        mats.sort(key=lambda q: not q.name.startswith(stem))
        # a missing .mat is fine: nibabel then uses the header's origin and voxel sizes
        holders["mat"] = (FileHolder(fileobj=BytesIO(read(mats[0]))) if mats
                          else FileHolder(filename=str(hdr.with_name(stem + ".mat"))))
    return klass.from_file_map(holders, mmap=False)


def _short(exc: BaseException) -> str:
    """First line of an exception message, with its type when the message is empty."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def check_file(p: Path, what: str) -> str:
    """``p`` is a readable volume file by name and presence (both halves of a ``.hdr``/``.img``
    pair); returns its suffix. Raises a one-line PsmambaError naming ``what`` and the file."""
    suffix = _suffix(p, READ_SUFFIXES)
    if not suffix:
        raise PsmambaError(f"{what} {p}: unsupported file type (expected one of {', '.join(READ_SUFFIXES)})")
    if suffix in (".hdr", ".img", ".hdr.gz", ".img.gz"):
        # an Analyze/NIfTI pair needs both halves (either may be gzipped)
        hdr, img = analyze_pair(p)
        stem = p.name[: -len(suffix)]
        for part, name in ((hdr, ".hdr"), (img, ".img")):
            if part is None:
                raise PsmambaError(f"{what} {p}: file not found ({stem}{name}[.gz] of the .hdr/.img pair is missing)")
    elif not p.exists():
        raise PsmambaError(f"{what} {p}: file not found")
    elif not p.is_file():
        raise PsmambaError(f"{what} {p}: not a file")
    return suffix


def open_image(path, what: str, mmap: bool = True) -> tuple[Any, Path]:
    """The nibabel image of a volume file and its path, the header read and the voxels not yet
    (an Analyze/NIfTI pair: both halves read, either gzipped); any failure -> one-line PsmambaError."""
    p = _as_path(path, what)
    suffix = check_file(p, what)
    try:
        if suffix in (".hdr", ".img", ".hdr.gz", ".img.gz"):
            return _load_pair(*analyze_pair(p)), p
        return nib.load(str(p), mmap=mmap), p
    except MemoryError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib and OS errors all mean "unreadable"
        raise PsmambaError(f"{what} {p}: cannot be read as NIfTI/Analyze ({_short(exc)})") from exc


def _read(path, what: str) -> tuple[Any, np.ndarray, Path]:
    """Open ``path`` with nibabel and read its voxels; any failure -> one-line PsmambaError."""
    # mmap=False: a private in-memory array, no open file handle kept behind it
    img, p = open_image(path, what, mmap=False)
    try:
        data = np.asanyarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as exc:
        raise PsmambaError(f"{what} {p}: cannot be read as NIfTI/Analyze ({_short(exc)})") from exc
    _warn_geometry(img.header, data.shape[:3], f"{what} {p}", p)
    return img, np.asarray(data), p


#: qform and sform farther apart than this (mm, at a corner of the grid) are said to disagree; a
#: qform is a float32 quaternion, which near a half turn (an LPS-stored scan) places a large grid's
#: corners a few hundredths of a mm away from the same matrix's sform
_QS_TOLERANCE_MM = 0.1
#: files warned about once already in this process (a shared atlas is read once per pair)
_WARNED: set[tuple[str, str]] = set()


def warn_once(key: tuple[str, str], message: str, stacklevel: int = 3) -> None:
    """``warnings.warn(message)`` the first time ``key`` (a kind of warning, a resolved path) is seen."""
    import warnings

    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, stacklevel=stacklevel)


def qform_sform_gap(header, shape=None) -> float | None:
    """How far apart (mm, the largest at the grid's corners) a NIfTI header's qform and sform place
    the voxels when both are set (codes > 0); None otherwise (one of them, or an Analyze header)."""
    try:
        q, qc = header.get_qform(coded=True)
        s, sc = header.get_sform(coded=True)
    except Exception:  # Analyze headers have neither
        return None
    if q is None or s is None or not qc or not sc:
        return None
    dims = list(shape if shape is not None else header.get_data_shape())[:3]
    dims = np.asarray(dims + [1] * (3 - len(dims)), dtype=np.float64) - 1  # a 2-D image: one voxel deep
    corners = np.array([[i, j, k, 1.0] for i in (0, dims[0]) for j in (0, dims[1]) for k in (0, dims[2])]).T
    return float(np.sqrt((((q - s) @ corners)[:3] ** 2).sum(0)).max())


def _warn_geometry(header, shape, name: str, path=None) -> None:
    """One warning per file whose qform and sform disagree: psmamba (nibabel) reads the sform,
    ITK-based tools (ANTs, SimpleITK, ITK-SNAP, 3D Slicer) may read the qform (a sheared sform,
    which ITK cannot represent, is said as such)."""
    gap = qform_sform_gap(header, shape)
    if gap is None or gap <= _QS_TOLERANCE_MM:
        return
    key = ("qform", os.path.realpath(path) if path is not None else name)
    s = np.asarray(header.get_sform(), dtype=np.float64)[:3, :3]
    cols = s / np.linalg.norm(s, axis=0)
    if np.abs(cols.T @ cols - np.eye(3)).max() > 1e-4:
        warn_once(key, f"{name}: its grid is sheared (sform); ITK-based tools (ANTs, ITK-SNAP, Slicer) can only read "
                  f"its nearest unsheared grid (the qform), up to {gap:.2f} mm away: transforms exchanged with them "
                  "are off by as much", stacklevel=4)
    else:
        warn_once(key, f"{name}: its qform and sform disagree by up to {gap:.2f} mm; psmamba reads the sform "
                  "(nibabel's rule), ITK-based tools (ANTs, ITK-SNAP, Slicer) may read the qform: fix the header "
                  "before exchanging transforms with them", stacklevel=4)


def warn_plain_analyze(img, what: str) -> None:
    """Once per file: a plain Analyze image (no orientation) whose transforms meet ITK-based tools,
    which orient such files otherwise than psmamba (nibabel)."""
    if plain_analyze(getattr(img, "header", None)):
        path = getattr(img, "path", None)
        warn_once(("analyze", os.path.realpath(path) if path is not None else what),
                  f"{what} {path or ''}: a plain Analyze file (no orientation): ITK-based tools (ANTs, SimpleITK) "
                  "orient it otherwise than psmamba (nibabel), so transforms exchanged with them do not match; "
                  "convert the images to NIfTI first", stacklevel=4)


def has_orientation(header) -> bool:
    """False for a NIfTI header with neither a qform nor an sform (codes 0: nibabel falls back to a
    default affine); True otherwise (Analyze files: nibabel's reading, see :func:`plain_analyze`)."""
    try:
        return bool(int(header["qform_code"]) or int(header["sform_code"]))
    except (KeyError, ValueError, TypeError):
        return True


def plain_analyze(header) -> bool:
    """An Analyze 7.5 header (no orientation: psmamba reads nibabel's default, ITK-based tools
    orient such files their own way)."""
    return header is not None and not isinstance(header, nib.Nifti1Header)


def _squeeze_to(data: np.ndarray, ndim: int) -> np.ndarray:
    """Drop trailing singleton axes beyond ``ndim`` (a 4-D file with one volume -> 3-D)."""
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    return data


#: said with a NaN/Inf error: SPM and others mark the background with NaN
NAN_HINT = "; if they mark the background (as SPM writes it), set them to 0 first (e.g. fslmaths IN -nan OUT)"


def _check_finite(data: np.ndarray, what: str, p: Path, read: bool = True) -> None:
    """No NaN/Inf voxels in ``data`` (``read``: of a file read, whose error says what to do)."""
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise PsmambaError(f"{what} {p}: holds {bad} NaN/Inf voxel value(s)" + (NAN_HINT if read else ""))


#: a label map's float values this close to a whole number are float round-off of that code
_ROUND_OFF = 1e-3


def _integer_labels(data: np.ndarray, what: str, p) -> np.ndarray:
    """Integer-valued array -> the smallest of uint8/int16/int32 that holds its values (``p``: the
    file, None for an array given in memory)."""
    what = what if p is None else f"{what} {p}"
    if data.dtype == bool:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        if bad:
            raise PsmambaError(f"{what}: a label map holds {bad} NaN/Inf value(s)")
        rounded = np.round(data)
        frac = data != rounded
        if frac.any():
            off = np.abs(data[frac] - rounded[frac])
            if off.max() > _ROUND_OFF:
                example = float(data[frac][np.argmax(off)])
                raise PsmambaError(
                    f"{what}: a label map must hold integer values, found {int(frac.sum())} "
                    f"non-integer voxel(s) (e.g. {example:.9g})"
                )
            # float round-off of whole numbers (a tool that stored the codes as float32 after
            # arithmetic, a scaling slope of 1.0000001): the codes are meant, and taken
            warn_once(("round-off", str(p) if p is not None else what),
                      f"{what}: {int(frac.sum())} voxel value(s) within {_ROUND_OFF:g} of a whole number (e.g. "
                      f"{float(data[frac].flat[0]):.9g}) read as that whole number", stacklevel=4)
            data = rounded
    elif not np.issubdtype(data.dtype, np.integer):
        raise PsmambaError(f"{what}: a label map must hold integers, got dtype {data.dtype}")
    if data.size == 0:
        return data.astype(np.uint8)
    lo, hi = data.min(), data.max()
    if lo < 0:
        raise PsmambaError(f"{what}: a label map must hold codes >= 0 (0 is the background), found "
                           f"{int(np.count_nonzero(data < 0))} voxel(s) below 0 (e.g. {lo:g})")
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return data.astype(dtype, copy=False) if data.dtype == dtype else data.astype(dtype)
    raise PsmambaError(f"{what}: label values {lo}..{hi} do not fit in int32")


# --------------------------------------------------------------------------- reading
def check_scalar_dtype(dtype: Any, name: str) -> None:
    """Voxels of one real number each (not complex, not an RGB record), else a one-line error."""
    if np.dtype(dtype).kind not in "biuf":
        raise PsmambaError(f"{name}: voxels of type {dtype} are not one real number each "
                           "(complex or RGB): convert it to a scalar image first")


def load_image(path, what: str = "image") -> Image:
    """Read a 3-D volume.

    Args:
        path: ``.nii``, ``.nii.gz``, or either half of an Analyze/NIfTI ``.hdr``/``.img`` pair.
        what: how the file is named in error messages (e.g. ``"fixed image"``).

    Returns:
        :class:`Image` with ``data`` ``(D, H, W)`` in the file's voxel order and dtype (a 4-D
        file whose 4th axis has length 1 is squeezed to 3-D).

    Raises:
        PsmambaError: file missing, unreadable or corrupt, not 3-D, or holding NaN/Inf.
    """
    return _read_scalar(path, what, series=False)


def _read_scalar(path, what: str, series: bool, labels: bool = False) -> Image:
    """A file's 3-D volume (``series``: or 4-D series) of real numbers, checked: trailing singleton
    axes dropped, finite values (``labels``: integer codes, as :func:`load_labels` reads them)."""
    img, data, p = _read(path, what)
    data = _squeeze_to(data, 3)
    if data.ndim != 3 and not (series and data.ndim == 4 and min(data.shape) >= 1):
        if not series:
            raise PsmambaError(f"{what} {p}: expected a 3-D volume, got shape {tuple(data.shape)}")
        raise PsmambaError(f"{what} {p}: expected a 3-D volume or a 4-D series of volumes, got shape "
                           f"{tuple(data.shape)}" + (" (a vector image, e.g. a displacement field?)"
                                                     if data.ndim == 5 else ""))
    check_scalar_dtype(data.dtype, f"{what} {p}")  # complex or RGB voxels: a numpy error deep inside before
    if labels:
        data = _integer_labels(data, what, p)
    else:
        _check_finite(data, what, p)
    return Image(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=p)


def load_labels(path, what: str = "labels") -> Image:
    """Read a 3-D label map: like :func:`load_image`, but the values must be integers.

    Float-stored maps holding whole numbers are accepted (many tools write them); the data
    comes back in the smallest of ``uint8``/``int16``/``int32`` that holds the values.

    Raises:
        PsmambaError: as :func:`load_image`, a non-integer or negative value (naming the file).
    """
    image = load_image(path, what)
    image.data = _integer_labels(image.data, what, image.path)
    return image


def load_series(path, what: str = "image", labels: bool = False) -> Image:
    """Read a 3-D volume or a 4-D series of volumes on one grid (an fMRI or diffusion series, the
    channels of a multi-contrast scan): ``data`` ``(D, H, W)`` or ``(D, H, W, T)``, ``header`` kept
    (its 4th voxel size, the repetition time, is what :func:`save_series` writes back).

    Trailing singleton axes are dropped; a 5-D file (a vector image such as a displacement field)
    is refused. ``labels``: integer codes, as :func:`load_labels` reads them.

    Raises:
        PsmambaError: as :func:`load_image`, naming the file.
    """
    return _read_scalar(path, what, series=True, labels=labels)


def load_ddf(path, what: str = "displacement field") -> Image:
    """Read a displacement field as voxel displacements in the Learn2Reg layout ``(D, H, W, 3)``.

    Two kinds of file are read:

    * psmamba's ``ddf.nii.gz`` / Learn2Reg fields: ``(D, H, W, 3)`` (or ``(D, H, W, 1, 3)``)
      voxel displacements on the file's own grid, read as they are;
    * ITK / ANTs displacement field transforms (``warp_itk.nii.gz`` of ``psmamba register --itk``,
      ``antsRegistration``'s ``1Warp.nii.gz``): ``(D, H, W, 1, 3)`` with the NIfTI intent
      ``vector`` (components in LPS mm, ITK's and ANTs' convention) or ``displacement vector``
      (components in RAS mm); converted to voxels of the file's grid, ``A^-1 v``.

    ``data`` comes back as float32 ``(D, H, W, 3)``; use :func:`psmamba.spatial.ddf_from_l2r`
    for the tensor layout.
    """
    img, data, p = _read(path, what)
    intent = _intent_code(img.header)
    name = str(img.header.get_intent()[2]) if intent else ""
    if intent not in (0, _INTENT_VECTOR, _INTENT_DISPVECT):
        raise PsmambaError(f"{what} {p}: NIfTI intent code {intent} ({img.header.get_intent()[0]}) is not a "
                           "displacement field psmamba reads (voxel displacements, or ITK/ANTs 'vector' / "
                           "'displacement vector' fields): convert it first")
    if name.upper().startswith("NREG"):  # NiftyReg writes positions (a deformation), not displacements
        raise PsmambaError(f"{what} {p}: a NiftyReg transformation ({name}) holds positions, not displacements: "
                           "convert it with reg_transform -disp first")
    check_scalar_dtype(data.dtype, f"{what} {p}")
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise PsmambaError(f"{what} {p}: expected shape (D, H, W, 3), got {tuple(data.shape)}")
    _check_finite(data, what, p, read=False)  # (a field: no background to fill)
    affine = np.asarray(img.affine, dtype=np.float64)
    if intent in (_INTENT_VECTOR, _INTENT_DISPVECT):  # world mm (ITK): back to voxels of this grid
        linear = affine[:3, :3]
        if abs(np.linalg.det(linear)) < 1e-12:
            raise PsmambaError(f"{what} {p}: its affine is singular (a world displacement cannot be read in voxels)")
        ras = data.astype(np.float64) * (_LPS if intent == _INTENT_VECTOR else 1.0)
        data = np.einsum("ij,...j->...i", np.linalg.inv(linear), ras)
    return Image(
        data=data.astype(np.float32, copy=False),
        affine=affine,
        header=img.header,
        path=p,
    )


#: NIfTI intent codes of vector fields: ``vector`` (ITK and ANTs write displacement fields with it,
#: components in LPS mm) and ``displacement vector`` (components in RAS mm, the NIfTI standard's
#: meaning; ITK >= 5.3 reads and writes it so)
_INTENT_VECTOR, _INTENT_DISPVECT = 1007, 1006
#: RAS <-> LPS for a vector's components (x and y point the other way)
_LPS = np.array([-1.0, -1.0, 1.0])


def _intent_code(header) -> int:
    try:
        return int(header.get_intent("code")[0])
    except Exception:  # Analyze headers have no intent; an unknown code reads as none
        return 0


def is_itk_field(header) -> bool:
    """Whether a header read by :func:`load_ddf` is an ITK / ANTs displacement field's (world
    millimetres, converted to voxels on reading), not a voxel field's."""
    return _intent_code(header) in (_INTENT_VECTOR, _INTENT_DISPVECT)


# --------------------------------------------------------------------------- writing
def _to_numpy(x, name: str) -> np.ndarray:
    try:
        import torch

        if torch.is_tensor(x):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(x)


def _volume(data, name: str, p: Path) -> np.ndarray:
    """Array or tensor ``(D, H, W)``, ``(1, D, H, W)`` or ``(1, 1, D, H, W)`` -> ``(D, H, W)``."""
    arr = _to_numpy(data, name)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise PsmambaError(f"{name} for {p}: expected a 3-D volume, got shape {tuple(_to_numpy(data, name).shape)}")
    return arr


def _affine(affine, p: Path) -> np.ndarray:
    try:
        a = np.asarray(_to_numpy(affine, "affine"), dtype=np.float64)
    except (TypeError, ValueError):
        raise PsmambaError(f"affine for {p}: must be a finite 4x4 matrix of numbers, got {type(affine).__name__}") from None
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise PsmambaError(f"affine for {p}: must be a finite 4x4 matrix, got shape {a.shape}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise PsmambaError(f"affine for {p}: its 3x3 part is singular")
    return a


def _as_path(path, what: str) -> Path:
    """``path`` as a Path; anything else (None, a number, an array) named in one line."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise PsmambaError(f"{what}: expected a file path, got {type(path).__name__}")
    return Path(path)


def _destination(path) -> tuple[Path, str]:
    p = _as_path(path, "output")
    suffix = _suffix(p)
    if not suffix:
        raise PsmambaError(f"output {p}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise PsmambaError(f"output {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PsmambaError(f"output {p}: folder {parent} is not writable")
    return p, suffix


def _atomic_save(img, path) -> Path:
    """``nib.save`` to a temporary name in the destination folder, then rename over ``path``."""
    p, suffix = _destination(path)
    token = uuid.uuid4().hex[:10]
    stem = p.name[: -len(suffix)]
    if suffix in (".hdr", ".img"):
        final = [p.with_name(stem + ".img"), p.with_name(stem + ".hdr")]  # data first, header last
        temp = [p.with_name(f".{stem}.{token}.tmp.img"), p.with_name(f".{stem}.{token}.tmp.hdr")]
        target = temp[1]
    else:
        final = [p]
        temp = [p.with_name(f".{stem}.{token}.tmp{suffix}")]
        target = temp[0]
    try:
        # nibabel picks the format (single file, gzip, or .hdr/.img pair) from the name
        nib.save(img, str(target))
        for src, dst in zip(temp, final):
            os.replace(src, dst)
    except BaseException as exc:
        for t in temp:
            try:
                t.unlink()
            except OSError:
                pass
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError, PsmambaError)):
            raise
        raise PsmambaError(f"output {p}: cannot be written ({_short(exc)})") from exc
    return p


def _nifti_header(header) -> nib.Nifti1Header | None:
    if header is None:
        return None
    try:
        hdr = nib.Nifti1Header.from_header(header)
    except Exception as exc:
        raise PsmambaError(f"header: cannot be used as a NIfTI header ({_short(exc)})") from exc
    return hdr


def _build(arr: np.ndarray, affine: np.ndarray, header=None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(arr, affine, header=_nifti_header(header))
    # the same grid in the sform and the qform: ITK-based tools (ANTs, ITK-SNAP, Slicer) read the
    # qform when both are set and cannot read an sform alone that is not orthonormal (a shear)
    img.set_sform(affine, code=int(img.header["sform_code"]) or 2)
    img.set_qform(affine, code=int(img.header["qform_code"]) or 1)
    # the data decides the stored type, never a template header (it may come from another file)
    img.set_data_dtype(arr.dtype)
    img.header.set_slope_inter(None, None)  # no scaling: values are stored as given
    img.header.set_xyzt_units("mm")
    return img


def _storable(arr: np.ndarray, p: Path) -> np.ndarray:
    """An image's voxels in a type NIfTI stores as they are: bool -> uint8, float16 -> float32,
    64-bit and uint32 integers -> int32 (when they fit)."""
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    if arr.dtype in (np.int64, np.uint64, np.uint32):
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise PsmambaError(f"image for {p}: integer values do not fit in int32")
        return arr.astype(np.int32)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise PsmambaError(f"image for {p}: unsupported dtype {arr.dtype}")
    return arr


def save_image(path, data, affine, header=None) -> Path:
    """Write a 3-D image atomically.

    Args:
        path: destination, ``.nii``, ``.nii.gz`` or ``.hdr``/``.img`` (written as a NIfTI pair,
            which keeps the full affine; plain Analyze 7.5 cannot store a rotation).
        data: ``(D, H, W)`` array or tensor (leading singleton batch/channel axes are dropped).
            Its dtype is kept (bool -> uint8, float16 -> float32, int64 -> int32 when it fits).
        affine: ``(4, 4)`` voxel -> world mm matrix, normally the fixed image's.
        header: optional template header (e.g. ``Image.header`` of the fixed image) for the
            remaining fields; dtype, scaling and the affine always come from ``data``/``affine``.

    Returns:
        The path written. Raises PsmambaError on bad input or when the file cannot be written.
    """
    p = _as_path(path, "output")
    arr = _storable(_volume(data, "image", p), p)
    _check_finite(arr, "image for", p, read=False)
    return _atomic_save(_build(np.ascontiguousarray(arr), _affine(affine, p), header), p)


def save_labels(path, labels, affine, header=None) -> Path:
    """Write an integer label map atomically (stored as uint8, int16 or int32, the smallest fit).

    Args:
        path: as :func:`save_image`.
        labels: ``(D, H, W)`` integer-valued array or tensor (floats holding whole numbers are
            accepted; any fractional value is an error).
        affine: ``(4, 4)``, normally the fixed image's.
        header: optional template header.
    """
    p = _as_path(path, "output")
    arr = _integer_labels(_volume(labels, "labels", p), "labels for", p)
    return _atomic_save(_build(np.ascontiguousarray(arr), _affine(affine, p), header), p)


def save_series(path, data, affine, header=None, labels: bool = False) -> Path:
    """Write a 3-D volume or a 4-D series ``(D, H, W, T)`` atomically, as :func:`save_image`
    (``labels``: as :func:`save_labels`); of ``header`` (the source series') the 4th voxel size
    (the repetition time) and its unit are kept, nothing else."""
    p = _as_path(path, "output")
    arr = _to_numpy(data, "image")
    if arr.ndim == 3:
        return (save_labels if labels else save_image)(p, arr, affine, header)
    if arr.ndim != 4 or min(arr.shape) < 1:
        raise PsmambaError(f"image for {p}: expected a 3-D volume or a 4-D series (D, H, W, T), got shape {tuple(arr.shape)}")
    if labels:
        arr = _integer_labels(arr, "labels for", p)
    else:
        arr = _storable(arr, p)
        _check_finite(arr, "image for", p, read=False)
    img = _build(np.ascontiguousarray(arr), _affine(affine, p))
    step, unit = _time_step(header)
    if step is not None:
        pixdim = img.header["pixdim"].copy()
        pixdim[4] = step
        img.header["pixdim"] = pixdim
        img.header.set_xyzt_units("mm", unit)
    return _atomic_save(img, p)


def _time_step(header) -> tuple[float | None, str]:
    """A series header's 4th voxel size (the repetition time) and its unit; (None, "unknown")
    without one. Only these are carried to a resampled series: slice timing, the encoding
    directions and the rest describe the source's grid, not the new one."""
    if header is None:
        return None, "unknown"
    try:
        zooms = header.get_zooms()
        step = float(zooms[3]) if len(zooms) > 3 else None
    except Exception:  # a header without voxel sizes
        return None, "unknown"
    try:
        unit = header.get_xyzt_units()[1]
    except Exception:  # Analyze: no units
        unit = "unknown"
    return (step if step is not None and np.isfinite(step) and step > 0 else None), unit


def save_ddf(path, ddf, affine) -> Path:
    """Write a displacement field atomically in the Learn2Reg layout: float32 ``(D, H, W, 3)`` voxels.

    Args:
        path: destination (``.nii.gz`` usually).
        ddf: ``(1, 3, D, H, W)`` or ``(3, D, H, W)`` voxel displacements on the fixed grid
            (the :mod:`psmamba.spatial` convention), tensor or array.
        affine: the fixed image's ``(4, 4)`` affine (a displacement in mm is
            ``affine[:3, :3] @ d``, see :func:`psmamba.spatial.ddf_to_mm`).
    """
    p = _as_path(path, "output")
    img = _build(_field_l2r(ddf, p), _affine(affine, p))
    img.header["descrip"] = DDF_DESCRIP  # what tells the file from a 3-volume series
    return _atomic_save(img, p)


#: the description (NIfTI ``descrip``) of the fields :func:`save_ddf` writes
DDF_DESCRIP = b"psmamba displacement field (voxels)"


def is_ddf_header(header) -> bool:
    """Whether a header is that of a displacement field written by :func:`save_ddf`."""
    try:
        return bytes(np.asarray(header["descrip"]).tobytes()).rstrip(b"\0").startswith(DDF_DESCRIP)
    except (KeyError, TypeError, ValueError):
        return False


def _field_l2r(ddf, p: Path) -> np.ndarray:
    """A ``(1, 3, D, H, W)`` / ``(3, D, H, W)`` voxel field to write at ``p``: checked, float32
    ``(D, H, W, 3)``."""
    from psmamba.spatial import ddf_to_l2r

    arr = _to_numpy(ddf, "ddf")
    if arr.ndim not in (4, 5) or arr.shape[-4] != 3 or (arr.ndim == 5 and arr.shape[0] != 1):
        raise PsmambaError(f"ddf for {p}: expected shape (1, 3, D, H, W) or (3, D, H, W), got {tuple(arr.shape)}")
    field = ddf_to_l2r(arr).astype(np.float32, copy=False)
    _check_finite(field, "ddf for", p, read=False)
    return field


def save_itk_warp(path, ddf, affine) -> Path:
    """Write a voxel displacement field as an ITK / ANTs displacement field transform.

    The file is what ``antsApplyTransforms -t``, SimpleITK's ``DisplacementFieldTransform``
    (after ``sitk.ReadImage``), ``ants.apply_transforms`` and 3D Slicer read: NIfTI, float32,
    shape ``(D, H, W, 1, 3)`` (ITK's vector image), intent ``vector``, the grid's affine, and at
    each voxel ``p`` the displacement in LPS mm: the point ``x`` (LPS) of voxel ``p`` maps to
    ``x + v[p]``. As every ITK transform it maps the points of the output (fixed) grid to the
    input (moving) image, the direction resampling pulls along.

    Args:
        path: destination (``.nii.gz`` or ``.nii``).
        ddf: ``(1, 3, D, H, W)`` or ``(3, D, H, W)`` voxel displacements of the grid of
            ``affine`` (psmamba's convention: voxel ``p`` reads the other image, resampled onto
            this grid through the headers, at ``p + ddf[p]``), tensor or array.
        affine: the grid's ``(4, 4)`` voxel -> world RAS+ mm matrix.

    :func:`load_ddf` reads the file back as voxel displacements.
    """
    p = _as_path(path, "output")
    if _suffix(p) not in (".nii.gz", ".nii"):
        raise PsmambaError(f"output {p}: an ITK displacement field is written as .nii.gz or .nii")
    field = _field_l2r(ddf, p)
    a = _affine(affine, p)
    m = (a[:3, :3] * _LPS[:, None]).tolist()  # voxel -> LPS mm, a component at a time in float32
    out = np.empty(field.shape[:3] + (1, 3), dtype=np.float32)
    for i in range(3):
        out[:, :, :, 0, i] = m[i][0] * field[..., 0] + m[i][1] * field[..., 1] + m[i][2] * field[..., 2]
    img = _build(out, a)
    img.header.set_intent("vector")
    return _atomic_save(img, p)


def _in_memory(arr: np.ndarray, what: str, labels: bool, kind: str, series: bool = False) -> np.ndarray:
    """A 3-D array (``series``: or a 4-D series) given in memory, checked as a file would be: real
    numbers; for ``labels`` integer codes >= 0 (converted as :func:`load_labels` converts a
    file's); a series' values finite (a 3-D image's are checked by the command that takes it)."""
    if arr.ndim != 3 and not (series and arr.ndim == 4):
        raise PsmambaError(f"{what} must be a 3-D {kind}" + (" or a 4-D series" if series else "")
                           + f", got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise PsmambaError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 4 and min(arr.shape) < 1:
        raise PsmambaError(f"{what}: an empty series, shape {arr.shape}")
    if labels:
        return _integer_labels(arr, what, None)
    if arr.ndim == 4 and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise PsmambaError(f"{what}: holds {int(arr.size - np.isfinite(arr).sum())} NaN/Inf voxel value(s)" + NAN_HINT)
    return arr


def as_image(obj: Any, what: str, labels: bool = False, series: bool = False) -> Image | None:
    """A path, an :class:`Image`, a :class:`psmamba.data.Volume` or a 3-D array -> an :class:`Image`.

    An array is taken with an identity affine (1 mm voxels); ``labels`` reads/keeps integer
    label codes; ``series``: a 4-D series ``(D, H, W, T)`` is taken too (:func:`load_series`);
    ``what`` names the input in the one-line errors. None passes through.
    """
    if obj is None:
        return None

    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser()
        if not path.exists():
            raise PsmambaError(f"{what} file {path} does not exist")
        if series:
            return load_series(path, what, labels=labels)
        return load_labels(path, what=what) if labels else load_image(path, what=what)
    if isinstance(obj, np.ndarray):
        arr = _in_memory(obj, what, labels, "array", series)
        return Image(data=arr, affine=np.eye(4), header=None, path=None)  # type: ignore[arg-type]
    if hasattr(obj, "data") and hasattr(obj, "affine"):
        arr = np.asarray(obj.data)
        if arr.ndim != 3 and not (series and arr.ndim == 4):
            raise PsmambaError(f"{what} must be a 3-D image, got shape {arr.shape}")
        from psmamba.checks import image_name  # (checks imports this module)

        checked = _in_memory(arr, image_name(what, obj), labels, "image", series)
        if checked is arr:
            return obj
        return Image(data=checked, affine=np.asarray(obj.affine, dtype=np.float64), header=getattr(obj, "header", None),
                     path=getattr(obj, "path", None))
    if hasattr(obj, "image") and hasattr(obj, "affine"):  # a psmamba.data.Volume
        arr = obj.labels if labels else obj.image
        if arr is None:
            raise PsmambaError(f"{what}: volume {getattr(obj, 'id', '')!r} has no label map")
        arr = _in_memory(np.asarray(arr), what, labels, "image")
        return Image(data=arr, affine=np.asarray(obj.affine, dtype=np.float64), header=None,
                        path=getattr(obj, "id", None))  # type: ignore[arg-type]
    raise PsmambaError(
        f"{what} must be a path, a psmamba.io.Image, a psmamba.data.Volume or a 3-D array, got {type(obj).__name__}"
    )
