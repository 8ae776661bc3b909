"""On-disk cache of preprocessed volumes, so a second epoch or a second run reads ready arrays.

Location: the ``cache_dir`` argument, else the environment variable ``PSMAMBA_CACHE``, else
``~/.cache/psmamba``. Each preprocessed volume is one uncompressed ``.npz`` (fast to read)
under ``<cache>/volumes/``, named ``<id>-<key>.npz`` where ``key`` hashes

* what identifies the source content: every source file's absolute path, modification time
  (ns) and size (both halves of an Analyze pair), or a content hash for in-memory arrays,
* the label protocol and every preprocessing setting (:meth:`Pipeline.describe`),
* :data:`CACHE_VERSION`, bumped whenever the preprocessing code changes its output.

Touching or replacing a source file therefore invalidates its entry. Files are written to a
temporary name in the same folder and renamed, so a crash or a second process never leaves a
half-written entry that a reader could pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from psmamba.data.volume import Volume, VolumeRef
from psmamba.errors import PsmambaError
from psmamba.files import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from psmamba.data.preprocess import Pipeline

__all__ = ["CACHE_VERSION", "default_cache_dir", "cache_key", "save_volume_npz", "load_volume_npz", "prepare"]

CACHE_VERSION = 1


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$PSMAMBA_CACHE``, else ``~/.cache/psmamba``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PSMAMBA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "psmamba"


def cache_key(payload: dict) -> str:
    """20 hex digits of the SHA-256 of a JSON-able description."""
    blob = json.dumps({"version": CACHE_VERSION, **payload}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)[:80] or "volume"


def save_volume_npz(path: str | os.PathLike, vol: Volume, compress: bool = False) -> Path:
    """Write a volume atomically as an ``.npz`` (image, labels, affine, names, ids).

    Uncompressed by default (reading is a plain copy); ``compress=True`` trades write time for
    disk space (the built-in example data set uses it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "image": np.ascontiguousarray(vol.image, dtype=np.float32),
        "affine": np.asarray(vol.affine, dtype=np.float64),
        "info": np.array(json.dumps({
            "id": vol.id, "subject": vol.subject,
            "label_names": {str(k): v for k, v in vol.label_names.items()},
            "meta": vol.meta,
        }, default=str)),
    }
    if vol.labels is not None:
        arrays["labels"] = np.ascontiguousarray(vol.labels)
    atomic_write(path, lambda name: (np.savez_compressed if compress else np.savez)(name, **arrays), suffix=".npz")
    return path


def load_volume_npz(path: str | os.PathLike) -> Volume:
    """Read a volume written by :func:`save_volume_npz`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            image = z["image"]
            affine = z["affine"]
            labels = z["labels"] if "labels" in z.files else None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise PsmambaError(f"{path}: not a readable psmamba volume file ({exc.__class__.__name__}: {exc})") from None
    return Volume(
        id=info["id"], image=image, affine=affine, labels=labels,
        label_names={int(k): v for k, v in info.get("label_names", {}).items()},
        subject=info.get("subject"), meta=info.get("meta", {}),
    )


def prepare(
    ref: VolumeRef,
    pipeline: "Pipeline | None" = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Volume:
    """Load ``ref``, map its labels, run ``pipeline``; read from / write to the cache.

    Args:
        ref: the volume to prepare.
        pipeline: preprocessing steps (``None``: none).
        cache_dir: see :func:`default_cache_dir`.
        use_cache: ``False`` computes without reading or writing the cache.

    Returns:
        The preprocessed :class:`Volume`.
    """
    def compute() -> Volume:
        vol = ref.load()
        return pipeline(vol) if pipeline is not None else vol

    if not use_cache:
        return compute()
    payload = {"source": ref.fingerprint(), "pipeline": pipeline.describe() if pipeline is not None else None}
    key = cache_key(payload)
    path = default_cache_dir(cache_dir) / "volumes" / f"{_safe_name(ref.id)}-{key}.npz"
    if path.exists():
        try:
            vol = load_volume_npz(path)
            vol.id, vol.subject = ref.id, ref.subject
            return vol
        except PsmambaError:
            path.unlink(missing_ok=True)  # a damaged entry is rebuilt, not trusted
    vol = compute()
    try:
        save_volume_npz(path, vol)
    except OSError as exc:  # a read-only or full cache must not stop the run
        import warnings

        warnings.warn(f"psmamba: could not write the cache entry {path}: {exc}", stacklevel=2)
    return vol
