"""ITK / ANTs affine transform files: write and read a 4x4 world matrix.

A module of its own rather than part of :mod:`psmamba.io`: ``io`` reads and writes voxel
volumes through nibabel, a transform file is a different format (plain text, or ITK's
MATLAB v4 ``.mat``) with its own coordinate convention, and this module needs no nibabel.

Conventions
-----------
* psmamba's matrix ``T`` maps a FIXED world point to a MOVING world point, RAS+ mm (see
  :mod:`psmamba.affine`). ITK stores the same direction -- a transform maps points of the
  fixed (output) space to the moving (input) space, the direction ``itk::ResampleImageFilter``
  and ``sitk.Resample(moving, fixed, transform)`` pull along -- but in **LPS+** mm: ITK's x and
  y axes point the other way. So ``T_lps = F @ T_ras @ F`` with ``F = diag(-1, -1, 1, 1)``
  (``F`` is its own inverse), and the same on reading.
* ITK's ``AffineTransform_double_3_3`` is ``y = A (x - c) + c + t``: ``Parameters`` are the 9
  entries of ``A`` row by row, then ``t``; ``FixedParameters`` are the centre ``c``. The map
  is the same for any ``c`` (``t`` compensates); written here with ``c`` = the given centre
  (LPS), by default the origin.

Files: ``.txt`` / ``.tfm`` are the text format (``#Insight Transform File V1.0``); ``.mat`` is
ITK's MATLAB v4 binary (what ``antsRegistration`` writes as ``0GenericAffine.mat``), read and
written with :mod:`scipy.io`.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import numpy as np

from psmamba.errors import PsmambaError, require_file

__all__ = ["ras_to_lps", "lps_to_ras", "write_itk_affine", "read_itk_affine", "TRANSFORM_SUFFIXES"]

TRANSFORM_SUFFIXES = (".txt", ".tfm", ".mat")
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
# ITK classes whose 12 parameters are "matrix row-major, translation" about FixedParameters
_MATRIX_OFFSET = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_3_3$")
# ITK's rigid and similarity classes (what SimpleITK's initialisers and registrations write), read
# into the same 12 parameters
_RIGID_LIKE = re.compile(r"^(Euler3DTransform|VersorRigid3DTransform|Similarity3DTransform)_(double|float)_3_3$")


def _rotation_xyz(ax: float, ay: float, az: float, zyx: bool) -> np.ndarray:
    """ITK Euler3DTransform's matrix: ``Rz Rx Ry`` (``Rz Ry Rx`` with ComputeZYX)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx if zyx else rz @ rx @ ry


def _versor(v: np.ndarray) -> np.ndarray:
    """The rotation of ITK's versor (the unit quaternion's vector part; w >= 0 follows)."""
    x, y, z = v
    w = np.sqrt(max(0.0, 1.0 - float(v @ v)))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _as_matrix_offset(kind: str, params: np.ndarray, fixed: np.ndarray, p: Path) -> tuple[np.ndarray, np.ndarray]:
    """A rigid/similarity transform's parameters -> the 12 of ``AffineTransform`` and the centre."""
    name = kind.split("_")[0]
    counts = {"Euler3DTransform": 6, "VersorRigid3DTransform": 6, "Similarity3DTransform": 7}[name]
    if params.shape != (counts,) or fixed.size not in ((3, 4) if name == "Euler3DTransform" else (3,)):
        raise PsmambaError(f"transform file {p}: {name} expects {counts} parameters and 3 fixed parameters, "
                           f"got {params.size} and {fixed.size}")
    if name == "Euler3DTransform":
        a = _rotation_xyz(*params[:3], zyx=bool(fixed.size == 4 and fixed[3]))
    else:
        if float(params[:3] @ params[:3]) > 1.0 + 1e-9:
            raise PsmambaError(f"transform file {p}: the versor {params[:3].tolist()} is longer than 1")
        a = _versor(params[:3]) * (params[6] if name == "Similarity3DTransform" else 1.0)
    return np.concatenate([a.reshape(-1), params[3:6]]), fixed[:3]


def ras_to_lps(matrix) -> np.ndarray:
    """A 4x4 world -> world map in RAS+ coordinates, expressed in LPS+ (and vice versa)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise PsmambaError(f"matrix must be 4x4, got shape {m.shape}")
    return _FLIP @ m @ _FLIP


lps_to_ras = ras_to_lps  # the flip is its own inverse


def _suffix(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix not in TRANSFORM_SUFFIXES:
        raise PsmambaError(
            f"transform file {p}: unsupported type {suffix or '(none)'} (expected {', '.join(TRANSFORM_SUFFIXES)})"
        )
    return suffix


def _params(matrix, center) -> tuple[np.ndarray, np.ndarray]:
    """RAS 4x4 -> ITK ``(Parameters (12,), FixedParameters (3,))`` in LPS."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise PsmambaError(f"matrix must be a finite 4x4 array, got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise PsmambaError(f"matrix: last row must be 0 0 0 1, got {m[3].tolist()}")
    lps = ras_to_lps(m)
    a, offset = lps[:3, :3], lps[:3, 3]
    c = np.zeros(3) if center is None else np.asarray(center, dtype=np.float64).reshape(-1)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise PsmambaError(f"center must be 3 finite numbers (RAS mm), got {center!r}")
    c = c * _FLIP.diagonal()[:3]
    # y = A x + offset = A (x - c) + c + t  =>  t = offset - c + A c
    t = offset - c + a @ c
    return np.concatenate([a.reshape(-1), t]), c


def _matrix(params: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """ITK parameters (LPS) -> RAS 4x4."""
    a = params[:9].reshape(3, 3)
    t, c = params[9:12], fixed
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = t + c - a @ c
    return lps_to_ras(lps)


def write_itk_affine(path, matrix, center=None) -> Path:
    """Write ``matrix`` (fixed world -> moving world, RAS+ mm) as an ITK affine transform file.

    Args:
        path: ``.txt`` / ``.tfm`` (text) or ``.mat`` (ITK's MATLAB v4 binary). Written
            atomically (a temporary file renamed over ``path``).
        matrix: ``(4, 4)`` float array, e.g. :attr:`psmamba.affine.AffineResult.matrix`.
        center: optional centre of rotation in RAS mm (stored, in LPS, as ``FixedParameters``).

    Returns:
        The path written.
    """
    p = Path(path)
    suffix = _suffix(p)
    params, fixed = _params(matrix, center)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise PsmambaError(f"transform file {p}: folder {parent} does not exist")
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:10]}.tmp{suffix}")
    try:
        if suffix == ".mat":
            from scipy.io import savemat

            savemat(str(tmp), {"AffineTransform_double_3_3": params.reshape(-1, 1),
                               "fixed": fixed.reshape(-1, 1)}, format="4")
        else:
            fmt = lambda v: " ".join(repr(float(x)) for x in v)  # noqa: E731  (repr: 17 digits, exact round trip)
            text = (
                "#Insight Transform File V1.0\n"
                "#Transform 0\n"
                "Transform: AffineTransform_double_3_3\n"
                f"Parameters: {fmt(params)}\n"
                f"FixedParameters: {fmt(fixed)}\n"
            )
            tmp.write_text(text, encoding="ascii")
        os.replace(tmp, p)
    except OSError as exc:
        raise PsmambaError(f"transform file {p}: cannot be written ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def read_itk_affine(path) -> np.ndarray:
    """Read an ITK affine transform file -> ``(4, 4)`` fixed world -> moving world, RAS+ mm.

    Accepts ``AffineTransform_{double,float}_3_3`` and ``MatrixOffsetTransformBase_*_3_3``, and
    ITK's rigid and similarity types ``Euler3DTransform``, ``VersorRigid3DTransform`` and
    ``Similarity3DTransform`` (text ``.txt``/``.tfm``, or ITK/ANTs ``.mat``). A file holding
    several transforms (a composite) is refused: only one is read.

    Raises:
        PsmambaError: missing or unreadable file, another transform type, wrong parameter counts.
    """
    p = Path(path)
    suffix = _suffix(p)
    require_file(p, "transform file")
    if suffix == ".mat":
        from scipy.io import loadmat

        try:
            content = loadmat(str(p))
        except Exception as exc:  # scipy raises several types for a corrupt file
            raise PsmambaError(f"transform file {p}: not a readable MATLAB file ({exc})") from None
        kinds = [k for k in content if _MATRIX_OFFSET.match(k) or _RIGID_LIKE.match(k)]
        if len(kinds) != 1 or "fixed" not in content:
            names = [k for k in content if not k.startswith("__")]
            raise PsmambaError(f"transform file {p}: no single 3-D affine transform in it (variables {names})")
        kind = kinds[0]
        params = np.asarray(content[kind], dtype=np.float64).reshape(-1)
        fixed = np.asarray(content["fixed"], dtype=np.float64).reshape(-1)
    else:
        try:
            lines = p.read_text(encoding="ascii", errors="replace").splitlines()
        except OSError as exc:
            raise PsmambaError(f"transform file {p}: cannot be read ({exc.strerror or exc})") from None
        if not lines or not lines[0].startswith("#Insight Transform File"):
            raise PsmambaError(f"transform file {p}: not an ITK transform file (no '#Insight Transform File' header)")
        fields: dict[str, list[str]] = {}
        for line in lines:
            if ":" in line and not line.startswith("#"):
                key, value = line.split(":", 1)
                fields.setdefault(key.strip(), []).append(value.strip())
        kinds = fields.get("Transform", [])
        if len(kinds) != 1:
            raise PsmambaError(f"transform file {p}: holds {len(kinds)} transforms {kinds}, expected one affine")
        kind = kinds[0]
        if not (_MATRIX_OFFSET.match(kind) or _RIGID_LIKE.match(kind)):
            raise PsmambaError(f"transform file {p}: transform type {kind} is not a 3-D affine, rigid or "
                               "similarity transform")
        try:
            params = np.array([float(v) for v in fields["Parameters"][0].split()])
            fixed = np.array([float(v) for v in fields["FixedParameters"][0].split()])
        except (KeyError, ValueError):
            raise PsmambaError(f"transform file {p}: missing or malformed Parameters/FixedParameters") from None
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise PsmambaError(f"transform file {p}: parameters hold NaN or Inf")
    if _RIGID_LIKE.match(kind):
        params, fixed = _as_matrix_offset(kind, params, fixed, p)
    if params.shape != (12,) or fixed.shape != (3,):
        raise PsmambaError(
            f"transform file {p}: expected 12 parameters and 3 fixed parameters, got {params.size} and {fixed.size}"
        )
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise PsmambaError(f"transform file {p}: parameters hold NaN or Inf")
    return _matrix(params, fixed)
