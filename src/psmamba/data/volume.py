"""One volume in memory (:class:`Volume`) and a lazy handle to one on disk (:class:`VolumeRef`).

Readers return :class:`VolumeRef` objects: cheap descriptions (paths, subject, label
protocol) that load on demand, so a data set of hundreds of scans is listed without
reading it and a :class:`~psmamba.data.dataset.PairDataset` streams pairs.

Orientation convention: ``Volume.image[i, j, k]`` is the voxel at index ``(i, j, k)`` and
``Volume.affine`` maps that index to world millimetres (nibabel's RAS+ world), exactly as
in the file until a preprocessing step changes both together
(see :mod:`psmamba.data.preprocess`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psmamba.data.labels import LabelMap
from psmamba.errors import PsmambaError

__all__ = ["Volume", "VolumeRef", "FileVolumeRef", "ArrayVolumeRef", "NpzVolumeRef", "file_fingerprint"]

# World-position disagreement (mm) between an image and its label map that we accept as
# rounding noise in the headers; anything larger means the files do not belong together.
_AFFINE_TOLERANCE_MM = 1e-2


@dataclass
class Volume:
    """An image with optional labels on the same grid.

    Attributes:
        id: unique name in its source (``"S01"``, ``"OASIS-TRT-20-3"``).
        image: ``(D, H, W)`` float32 intensities.
        affine: ``(4, 4)`` voxel index -> world mm.
        labels: ``(D, H, W)`` integer labels (``0`` background) or ``None``.
        label_names: ``{label: name}`` for the labels this volume's protocol defines.
        subject: the person the scan belongs to; splits never put one subject in two parts.
        meta: free-form provenance (source files, notes).
    """

    id: str
    image: np.ndarray
    affine: np.ndarray
    labels: np.ndarray | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    subject: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image)
        if self.image.ndim != 3:
            raise PsmambaError(f"volume {self.id}: image must be 3-D (D, H, W), got shape {self.image.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise PsmambaError(f"volume {self.id}: affine must be (4, 4), got {self.affine.shape}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
            if self.labels.shape != self.image.shape:
                raise PsmambaError(
                    f"volume {self.id}: labels shape {self.labels.shape} differs from image shape {self.image.shape}"
                )
        if self.subject is None:
            self.subject = self.id

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def replace(self, **changes: Any) -> "Volume":
        """A copy with some fields changed (arrays are not copied)."""
        return dataclasses.replace(self, **changes)


def file_fingerprint(path: str | os.PathLike | None) -> list | None:
    """``[absolute path, mtime_ns, size]`` of a file (of both halves of an Analyze pair)."""
    if path is None:
        return None
    from psmamba.io import analyze_pair

    p = Path(path).resolve()
    parts = [p]
    if p.name.lower().endswith((".hdr", ".img", ".hdr.gz", ".img.gz")):
        hdr, img = analyze_pair(p)  # the other half, whichever is gzipped
        other = img if hdr == p else hdr
        parts.append(other if other is not None else p.with_name(p.name + ".missing-half"))
    out: list = []
    for q in parts:
        try:
            st = q.stat()
            out.append([str(q), st.st_mtime_ns, st.st_size])
        except OSError:
            out.append([str(q), None, None])
    return out


class VolumeRef:
    """A volume that is read when asked: ``load()`` returns a :class:`Volume`.

    Subclasses set ``id``, ``subject`` and ``label_map`` and implement :meth:`load` and
    :meth:`fingerprint` (what identifies the content for the on-disk cache).
    """

    id: str
    subject: str
    label_map: LabelMap | None = None
    has_labels: bool = False

    def load(self) -> Volume:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """One line: what files this volume comes from."""
        return self.id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class FileVolumeRef(VolumeRef):
    """An image file and an optional label file (NIfTI ``.nii``/``.nii.gz`` or Analyze ``.hdr/.img``).

    Args:
        id: unique name in the source.
        image_path: the image file.
        label_path: the label file on the same grid, or ``None``.
        subject: the person (defaults to ``id``).
        label_map: protocol turning the file's codes into ``1..K``; ``None`` keeps the codes.
        label_names: names when there is no ``label_map``.
        meta: extra provenance copied into ``Volume.meta``.
    """

    def __init__(
        self,
        id: str,
        image_path: str | os.PathLike,
        label_path: str | os.PathLike | None = None,
        subject: str | None = None,
        label_map: LabelMap | None = None,
        label_names: Mapping[int, str] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.id = str(id)
        self.image_path = Path(image_path)
        self.label_path = Path(label_path) if label_path is not None else None
        self.subject = str(subject) if subject is not None else self.id
        self.label_map = label_map
        self.label_names = dict(label_names or {})
        self.meta = dict(meta or {})
        self.has_labels = self.label_path is not None

    def describe(self) -> str:
        tail = f" + {self.label_path}" if self.label_path else ""
        return f"{self.id}: {self.image_path}{tail}"

    def fingerprint(self) -> dict:
        return {
            "kind": "file",
            "id": self.id,
            "image": file_fingerprint(self.image_path),
            "labels": file_fingerprint(self.label_path),
            "label_map": self.label_map.describe() if self.label_map else None,
        }

    def load(self, remap: bool = True) -> Volume:
        """Read the files (through :mod:`psmamba.io`), check they match, map the label codes.

        Args:
            remap: apply ``label_map`` (codes -> ``1..K``); ``False`` returns the raw codes.

        Raises:
            PsmambaError: missing/corrupt/4-D file, non-finite intensities, label shape or
                affine different from the image, unknown label code; the message names the file.
        """
        from psmamba import io

        from psmamba.checks import check_affine

        img = io.load_image(self.image_path, what="image")
        check_affine(img.affine, f"image {self.image_path}")  # a broken header is the image's fault, not its labels'
        data = np.asarray(img.data, dtype=np.float32)
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise PsmambaError(f"{self.image_path}: {bad} voxels are NaN or infinite; fix or mask the image first")
        labels = None
        names = dict(self.label_names)
        if self.label_path is not None:
            lab = io.load_labels(self.label_path)
            labels = np.asarray(lab.data)
            if labels.shape != data.shape:
                raise PsmambaError(
                    f"{self.label_path}: label shape {tuple(labels.shape)} differs from image shape "
                    f"{tuple(data.shape)} of {self.image_path.name}"
                )
            check_same_grid(img.affine, lab.affine, data.shape, self.label_path, self.image_path)
            if remap and self.label_map is not None:
                labels = self.label_map.apply(labels, self.label_path)
                names = self.label_map.label_names
            elif not names:
                names = {int(c): f"label {int(c)}" for c in np.unique(labels) if c != 0}
        return Volume(
            id=self.id,
            image=data,
            affine=np.asarray(img.affine, dtype=np.float64),
            labels=labels,
            label_names=names,
            subject=self.subject,
            meta={"image_path": str(self.image_path), "label_path": str(self.label_path) if self.label_path else None,
                  **self.meta},
        )


def check_same_grid(a: np.ndarray, b: np.ndarray, shape, b_path, a_path) -> None:
    """Raise if two affines put the corners of a grid more than a rounding error apart."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    gap = np.abs(corners @ a.T - corners @ b.T).max()
    if gap > _AFFINE_TOLERANCE_MM:
        raise PsmambaError(
            f"{b_path}: its affine puts voxels {gap:.3g} mm away from those of {Path(a_path).name}; "
            "the label map and image are not on the same grid"
        )


class ArrayVolumeRef(VolumeRef):
    """A :class:`Volume` already in memory (tests, generated data)."""

    def __init__(self, volume: Volume, label_map: LabelMap | None = None, token: str | None = None) -> None:
        self.volume = volume
        self.id = volume.id
        self.subject = volume.subject or volume.id
        self.label_map = label_map
        self.has_labels = volume.labels is not None
        self._token = token

    def fingerprint(self) -> dict:
        import hashlib

        if self._token is None:
            h = hashlib.sha256()
            h.update(self.volume.image.tobytes())
            h.update(self.volume.affine.tobytes())
            if self.volume.labels is not None:
                h.update(self.volume.labels.tobytes())
            self._token = h.hexdigest()
        return {"kind": "array", "id": self.id, "content": self._token,
                "label_map": self.label_map.describe() if self.label_map else None}

    def load(self, remap: bool = True) -> Volume:
        v = self.volume
        if remap and self.label_map is not None and v.labels is not None:
            return v.replace(labels=self.label_map.apply(v.labels, self.id), label_names=self.label_map.label_names)
        return v


class NpzVolumeRef(VolumeRef):
    """A volume stored by :func:`psmamba.data.cache.save_volume_npz` (the cache's own format)."""

    def __init__(self, path: str | os.PathLike, id: str | None = None, subject: str | None = None,
                 has_labels: bool = True) -> None:
        self.path = Path(path)
        self.id = id or self.path.stem
        self.subject = subject or self.id
        self.has_labels = has_labels

    def describe(self) -> str:
        return f"{self.id}: {self.path}"

    def fingerprint(self) -> dict:
        return {"kind": "npz", "id": self.id, "file": file_fingerprint(self.path)}

    def load(self, remap: bool = True) -> Volume:
        from psmamba.data.cache import load_volume_npz

        vol = load_volume_npz(self.path)
        vol.id = self.id
        vol.subject = self.subject
        return vol
