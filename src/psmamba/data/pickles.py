"""``(image, label)`` pickles, the format many registration repositories share LPBA40/IXI in.

Each file holds a tuple or list ``(image, labels)`` (or ``(image,)``), or a dict with
``"image"`` and ``"label"``/``"labels"``/``"seg"``, of 3-D numpy arrays. Pickles carry no
affine: volumes get an identity affine (1 mm isotropic voxels) and a note says so.

Pickles can run code when loaded; this reader only accepts numpy arrays and plain
containers (a restricted unpickler), and refuses anything else with a clear error.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from psmamba.data.labels import LabelMap, as_label_map
from psmamba.data.sources import Skipped, SourceData
from psmamba.data.volume import Volume, VolumeRef, file_fingerprint
from psmamba.errors import PsmambaError

__all__ = ["read_pickles", "PickleVolumeRef", "load_pickle_arrays"]

# What a pickled numpy array needs to be rebuilt, and nothing that can run other code.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "numpy" and name.endswith("DType")) \
                or module in ("numpy.dtypes",):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are accepted)")


def load_pickle_arrays(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``(image, labels or None)`` from a pickle, safely.

    Raises:
        PsmambaError: unreadable file, foreign objects, or not a 3-D image (+ labels) pair.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f).load()
    except FileNotFoundError:
        raise PsmambaError(f"{path}: pickle not found") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError) as exc:
        raise PsmambaError(f"{path}: not a readable (image, label) pickle ({exc})") from None
    if isinstance(obj, Mapping):
        image = obj.get("image", obj.get("img"))
        labels = next((obj[k] for k in ("label", "labels", "seg", "segmentation") if k in obj), None)
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and 1 <= len(obj) <= 2:
        image = obj[0]
        labels = obj[1] if len(obj) == 2 else None
    elif isinstance(obj, np.ndarray):
        image, labels = obj, None
    else:
        raise PsmambaError(f"{path}: expected a pickled (image, label) tuple, got {type(obj).__name__}")
    if not isinstance(image, np.ndarray):
        raise PsmambaError(f"{path}: no image array found (expected (image, label) or {{'image': ...}})")
    image = np.squeeze(image)
    if image.ndim != 3:
        raise PsmambaError(f"{path}: image must be 3-D after dropping singleton axes, got shape {image.shape}")
    if labels is not None:
        labels = np.squeeze(np.asarray(labels))
        if labels.shape != image.shape:
            raise PsmambaError(f"{path}: label shape {labels.shape} differs from image shape {image.shape}")
        if labels.dtype.kind == "f":
            if not np.all(np.mod(labels, 1) == 0):
                raise PsmambaError(f"{path}: label array holds non-integer values")
            labels = labels.astype(np.int32)
        elif labels.dtype.kind not in "iub":
            raise PsmambaError(f"{path}: label array has dtype {labels.dtype}, expected integers")
    return image, labels


class PickleVolumeRef(VolumeRef):
    """One ``(image, label)`` pickle; identity affine (1 mm voxels)."""

    def __init__(self, path: Path, id: str, label_map: LabelMap | None = None, subject: str | None = None) -> None:
        self.path = Path(path)
        self.id = id
        self.subject = subject or id
        self.label_map = label_map
        self.has_labels = True  # known only after reading; a missing label array gives labels=None

    def describe(self) -> str:
        return f"{self.id}: {self.path}"

    def fingerprint(self) -> dict:
        return {"kind": "pickle", "id": self.id, "file": file_fingerprint(self.path),
                "label_map": self.label_map.describe() if self.label_map else None}

    def load(self, remap: bool = True) -> Volume:
        image, labels = load_pickle_arrays(self.path)
        image = np.asarray(image, dtype=np.float32)
        if not np.isfinite(image).all():
            raise PsmambaError(f"{self.path}: image holds NaN or infinite values")
        names: dict[int, str] = {}
        if labels is not None:
            if remap and self.label_map is not None:
                labels = self.label_map.apply(labels, self.path)
                names = self.label_map.label_names
            else:
                names = {int(c): f"label {int(c)}" for c in np.unique(labels) if c != 0}
        return Volume(self.id, image, np.eye(4), labels, names, self.subject,
                      meta={"pickle": str(self.path), "affine": "identity (pickles carry none)"})


#: sub-folder names (any letter case) that give their pickles a split, TransMorph-style
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def read_pickles(
    root: str | os.PathLike,
    image_glob: str | Sequence[str] = ("**/*.pkl", "**/*.pickle"),
    label_map: LabelMap | str | None = None,
) -> SourceData:
    """List ``(image, label)`` pickles in a folder and its sub-folders (or one pickle file).

    A pickle's id is its path below the folder without the suffix (``Train/subject_1``); pickles
    in ``Train/``, ``Val/`` and ``Test/`` sub-folders (any case) form those splits (the layout of
    TransMorph's preprocessed data sets), an ``atlas.pkl`` beside them none.

    Args:
        root: folder (searched with ``image_glob``) or a single file.
        image_glob: file patterns.
        label_map: a protocol for the codes (e.g. ``"lpba40"`` for raw LPBA40 codes); ``None``
            keeps the codes found.
    """
    from psmamba.data.sources import _glob, _junk

    root = Path(root)
    label_map = as_label_map(label_map)
    if root.is_file():
        files = [root]
        base = root.parent
    elif root.is_dir():
        pats = [image_glob] if isinstance(image_glob, str) else list(image_glob)
        files = sorted({p for pat in pats for p in _glob(root, pat) if p.is_file() and not _junk(p, root)})
        base = root
    else:
        raise PsmambaError(f"{root}: pickle folder not found")
    if not files:
        raise PsmambaError(f"{root}: no pickles found (expected files matching {image_glob!r})")
    volumes = []
    skipped: list[Skipped] = []
    splits: dict[str, list[str]] = {}
    for p in files:
        rel = p.relative_to(base)
        vid = rel.with_suffix("").as_posix()
        if any(v.id == vid for v in volumes):
            skipped.append(Skipped(str(p), f"a second file with id {vid}"))
            continue
        volumes.append(PickleVolumeRef(p, vid, label_map=label_map))
        split = SPLIT_FOLDERS.get(rel.parts[0].lower()) if len(rel.parts) > 1 else None
        if split:
            splits.setdefault(split, []).append(vid)
    return SourceData(
        layout="pickle", root=base, volumes=volumes, label_map=label_map, skipped=skipped, splits=splits,
        notes=["pickles carry no affine: identity affine, 1 mm isotropic voxels assumed"],
        preprocessing="minmax",
    )
