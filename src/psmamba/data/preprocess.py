"""Preprocessing as composable steps; every step keeps the affine consistent.

Each step maps a :class:`~psmamba.data.volume.Volume` to a new one and changes the voxel
array and the affine TOGETHER, so a voxel that holds a structure before the step maps to the
same world position (mm) after it, up to the resampling of that structure:

* :class:`Reorient` -- permute/flip axes to one canonical orientation (``"RAS"``: array axis 0
  runs to the Right, 1 to Anterior, 2 to Superior), via nibabel's orientation tools.
* :class:`Resample` -- to a target spacing; trilinear for images (with Gaussian
  anti-aliasing when shrinking), nearest for labels; the grid keeps its centre.
* :class:`CropOrPad` -- to a target size around the centre of the non-zero bounding box
  (the paper's 160x192x160 crop), zero padding where the window leaves the volume.
* :class:`MinMax`, :class:`Percentile`, :class:`CTWindow` -- intensity scaling to [0, 1].
* :class:`RemapLabels` -- source codes to ``1..K`` with a :class:`~psmamba.data.labels.LabelMap`.

:class:`Pipeline` chains steps and describes them for the cache key; :func:`preset` gives the
paper's settings for each data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from psmamba.data.labels import LabelMap, as_label_map
from psmamba.data.volume import Volume
from psmamba.errors import PsmambaError

__all__ = [
    "Step",
    "Reorient",
    "Resample",
    "CropOrPad",
    "MinMax",
    "Percentile",
    "CTWindow",
    "RemapLabels",
    "Pipeline",
    "preset",
    "PRESETS",
    "resample_to_grid",
    "foreground_bbox",
    "shared_window",
]


class Step:
    """One preprocessing step: ``step(volume) -> volume``; ``describe()`` is part of the cache key."""

    def __call__(self, vol: Volume) -> Volume:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        d = asdict(self) if hasattr(self, "__dataclass_fields__") else {}
        return {"step": type(self).__name__, **d}


def _triple(value, name: str, kind=float) -> tuple:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    value = tuple(kind(v) for v in value)
    if len(value) != 3 or any(v <= 0 for v in value):
        raise PsmambaError(f"{name} must be a positive number or three positive numbers, got {value}")
    return value


# ---------------------------------------------------------------------- geometry
@dataclass
class Reorient(Step):
    """Permute and flip the array axes so they run along ``axcodes`` (default ``"RAS"``).

    Only whole-axis permutations and flips: no interpolation, values are untouched.
    """

    axcodes: str = "RAS"

    def __post_init__(self) -> None:
        codes = self.axcodes.upper()
        if len(codes) != 3 or sorted(codes.translate(str.maketrans("LPI", "RAS"))) != ["A", "R", "S"]:
            raise PsmambaError(f"Reorient: axcodes must name each of R/L, A/P, S/I once, got {self.axcodes!r}")
        self.axcodes = codes

    def __call__(self, vol: Volume) -> Volume:
        import nibabel.orientations as nio

        current = nio.io_orientation(vol.affine)
        target = nio.axcodes2ornt(tuple(self.axcodes))
        transform = nio.ornt_transform(current, target)
        if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            return vol
        image = np.ascontiguousarray(nio.apply_orientation(vol.image, transform))
        labels = None if vol.labels is None else np.ascontiguousarray(nio.apply_orientation(vol.labels, transform))
        # inv_ornt_aff maps new voxel indices to old ones; composing keeps every voxel's world position.
        affine = vol.affine @ nio.inv_ornt_aff(transform, vol.image.shape)
        return vol.replace(image=image, labels=labels, affine=affine)


def resample_to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample ``data`` (on ``affine``) at the voxel centres of another grid (world alignment).

    Args:
        data: ``(D, H, W)`` array.
        affine: its ``(4, 4)`` voxel -> world matrix.
        target_affine, target_shape: the grid to produce.
        order: 0 nearest (labels), 1 trilinear (images).
        cval: value outside ``data``.

    Returns:
        ``target_shape`` array, dtype of ``data`` for ``order=0``, float32 otherwise. A target
        grid equal to the source's returns the data unchanged.
    """
    from scipy import ndimage

    # target index -> world -> source index: one affine map, applied by scipy in index space.
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    if tuple(data.shape) == tuple(int(s) for s in target_shape) and np.allclose(m, np.eye(4), atol=1e-5):
        return data if order == 0 else np.asarray(data, dtype=np.float32)  # the same grid
    src = data if order == 0 else np.asarray(data, dtype=np.float32)
    lin, off = m[:3, :3], m[:3, 3]
    if np.allclose(lin, np.diag(np.diag(lin))):
        lin = np.diag(lin)  # diagonal: scipy takes a faster separable path
    return ndimage.affine_transform(
        src, lin, offset=off, output_shape=tuple(int(s) for s in target_shape), order=order,
        mode="constant", cval=cval, prefilter=False,
    )


@dataclass
class Resample(Step):
    """Resample to ``spacing`` mm per array axis; the grid keeps its centre.

    New size ``n = round(size * old_spacing / spacing)``; the centre of the old and new grids
    coincide, so the field of view changes by less than a voxel. Images: trilinear, with a
    Gaussian pre-filter of ``sigma = (factor - 1) / 2`` voxels along axes that shrink by
    ``factor > 1`` (skimage's anti-aliasing rule). Labels: nearest. A step whose spacing
    already matches (within ``1e-3`` mm) returns the volume unchanged.
    """

    spacing: tuple[float, float, float] | float = 1.0
    antialias: bool = True

    def __post_init__(self) -> None:
        self.spacing = _triple(self.spacing, "Resample spacing")

    def __call__(self, vol: Volume) -> Volume:
        from scipy import ndimage

        old = np.array(vol.spacing)
        new = np.array(self.spacing, dtype=np.float64)
        if np.allclose(old, new, atol=1e-3):
            return vol
        factor = new / old  # > 1: fewer, larger voxels
        shape = np.array(vol.shape)
        new_shape = np.maximum(1, np.round(shape / factor).astype(int))
        # old index = factor * new index + offset, with the two grid centres aligned
        offset = (shape - 1) / 2.0 - factor * (new_shape - 1) / 2.0
        m = np.eye(4)
        m[:3, :3] = np.diag(factor)
        m[:3, 3] = offset
        new_affine = vol.affine @ m
        image = vol.image.astype(np.float32, copy=False)
        if self.antialias and np.any(factor > 1):
            sigma = np.maximum(0.0, (factor - 1) / 2.0)
            image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
        image = resample_to_grid(image, vol.affine, new_affine, new_shape, order=1)
        labels = None
        if vol.labels is not None:
            labels = resample_to_grid(vol.labels, vol.affine, new_affine, new_shape, order=0)
        return vol.replace(image=image, labels=labels, affine=new_affine)


def foreground_bbox(data: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive index bounds ``(lo, hi)`` of voxels ``> threshold``, or ``None`` if there is none."""
    mask = data > threshold
    bounds_lo, bounds_hi = [], []
    for axis in range(data.ndim):
        other = tuple(a for a in range(data.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return None
        bounds_lo.append(hit[0])
        bounds_hi.append(hit[-1])
    return np.array(bounds_lo), np.array(bounds_hi)


@dataclass
class CropOrPad(Step):
    """Cut or zero-pad to ``size`` around a centre (the paper: 160x192x160 around the brain).

    Args:
        size: target ``(D, H, W)``.
        centre: ``"foreground"`` (centre of the bounding box of voxels ``> threshold`` in the
            image, or of non-zero labels with ``use_labels``) or ``"volume"`` (array centre).
        threshold: foreground threshold on the image.
        use_labels: take the bounding box from the labels instead of the image.
        start: the window's first voxel, the same for every volume (``centre`` then unused): one
            window for a data set whose volumes share a grid, so that they stay aligned voxel for
            voxel (see :func:`shared_window`).
    """

    size: tuple[int, int, int] = (160, 192, 160)
    centre: str = "foreground"
    threshold: float = 0.0
    use_labels: bool = False
    start: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self.size = _triple(self.size, "CropOrPad size", int)
        if self.start is not None:
            self.start = tuple(int(v) for v in self.start)  # type: ignore[assignment]
        if self.centre not in ("foreground", "volume"):
            raise PsmambaError(f"CropOrPad centre must be 'foreground' or 'volume', got {self.centre!r}")

    def window_start(self, vol: Volume) -> np.ndarray:
        """Index (in ``vol``) of the first voxel of the output window."""
        if self.start is not None:
            return np.asarray(self.start, dtype=int)
        shape = np.array(vol.shape)
        size = np.array(self.size)
        bbox = None
        if self.centre == "foreground":
            src = vol.labels if (self.use_labels and vol.labels is not None) else vol.image
            bbox = foreground_bbox(src, 0 if src is vol.labels else self.threshold)
        # centre in index units: middle of the bbox (its voxels lo..hi), else middle of the array
        mid = (bbox[0] + bbox[1]) / 2.0 if bbox is not None else (shape - 1) / 2.0
        return np.floor(mid - (size - 1) / 2.0 + 0.5).astype(int)

    def __call__(self, vol: Volume) -> Volume:
        start = self.window_start(vol)
        image = _window(vol.image, start, self.size)
        labels = None if vol.labels is None else _window(vol.labels, start, self.size)
        shift = np.eye(4)
        shift[:3, 3] = start  # new index 0 is old index `start`
        return vol.replace(image=image, labels=labels, affine=vol.affine @ shift)


def _window(a: np.ndarray, start: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``a[start : start + size]`` with zeros where the window leaves ``a``."""
    out = np.zeros(tuple(size), dtype=a.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, a.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = a[tuple(src)]
    return out


# ---------------------------------------------------------------------- intensities
def minmax_scale(x):
    """``(x - min) / (max - min)`` to [0, 1] (the paper's normalisation); a constant gives 0.

    The one min-max scaling of psmamba: a numpy array or a torch tensor (any device) in, the
    same kind out.
    """
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if float(hi - lo) > 0 else x - lo


@dataclass
class MinMax(Step):
    """:func:`minmax_scale` of the image, in float32."""

    def __call__(self, vol: Volume) -> Volume:
        out = minmax_scale(vol.image.astype(np.float32, copy=False))
        return vol.replace(image=out.astype(np.float32, copy=False))


@dataclass
class Percentile(Step):
    """Clip to the ``lower``/``upper`` percentiles of the non-zero voxels, then scale to [0, 1].

    Background zeros stay at the bottom of the range (robust to a few bright outliers).
    """

    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self) -> None:
        if not 0 <= self.lower < self.upper <= 100:
            raise PsmambaError(f"Percentile needs 0 <= lower < upper <= 100, got {self.lower}, {self.upper}")

    def __call__(self, vol: Volume) -> Volume:
        x = vol.image.astype(np.float32, copy=False)
        fg = x[x != 0]
        if fg.size == 0:
            return vol.replace(image=np.zeros_like(x))
        lo, hi = np.percentile(fg, [self.lower, self.upper])
        out = np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)
        return vol.replace(image=out.astype(np.float32, copy=False))


@dataclass
class CTWindow(Step):
    """Clip Hounsfield units to ``[low, high]`` and scale to [0, 1] (air -> 0 with the default)."""

    low: float = -500.0
    high: float = 800.0

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise PsmambaError(f"CTWindow needs low < high, got {self.low}, {self.high}")

    def __call__(self, vol: Volume) -> Volume:
        x = vol.image.astype(np.float32, copy=False)
        out = (np.clip(x, self.low, self.high) - self.low) / (self.high - self.low)
        return vol.replace(image=out.astype(np.float32, copy=False))


# ---------------------------------------------------------------------- labels
@dataclass
class RemapLabels(Step):
    """Map label codes to ``1..K`` with a :class:`LabelMap` (or a protocol name / code list).

    Sources apply their own protocol when loading; use this step for other mappings.
    """

    label_map: LabelMap | str | Sequence[int] = field(default="lpba40")

    def __post_init__(self) -> None:
        self.label_map = as_label_map(self.label_map)

    def __call__(self, vol: Volume) -> Volume:
        if vol.labels is None:
            return vol
        lm: LabelMap = self.label_map  # type: ignore[assignment]
        return vol.replace(labels=lm.apply(vol.labels, vol.id), label_names=lm.label_names)

    def describe(self) -> dict:
        return {"step": "RemapLabels", "label_map": self.label_map.describe()}  # type: ignore[union-attr]


# ---------------------------------------------------------------------- pipeline
class Pipeline(Step):
    """Steps applied in order: ``Pipeline([Reorient(), CropOrPad(...), MinMax()])(volume)``."""

    def __init__(self, steps: Sequence[Step] = ()) -> None:
        steps = list(steps)
        for s in steps:
            if not callable(s) or not hasattr(s, "describe"):
                raise PsmambaError(f"Pipeline step {s!r} is not a preprocessing Step")
        self.steps = steps

    def __call__(self, vol: Volume) -> Volume:
        for step in self.steps:
            vol = step(vol)
        return vol

    def describe(self) -> dict:
        return {"step": "Pipeline", "steps": [s.describe() for s in self.steps]}

    def __repr__(self) -> str:
        return "Pipeline([" + ", ".join(repr(s) for s in self.steps) + "])"


# The paper's settings (architecture.md section 7, data.md); all reorient to RAS first so that
# every data set arrives in one orientation.
PRESETS: dict[str, str] = {
    "lpba40": "RAS, 1 mm, crop/pad 160x192x160 around the brain, min-max",
    "mindboggle": "RAS, 1 mm, crop/pad 160x192x160 around the brain, min-max",
    "abdomen": "RAS, 2 mm, CT window [-500, 800] HU -> [0, 1], crop/pad 160x160x192 around the body",
    "brain": "RAS, crop/pad 160x192x160 around the brain, min-max (no resampling)",
    "minmax": "min-max only",
    "none": "no preprocessing",
}


def _grid_of(vol) -> tuple[tuple[int, ...], np.ndarray] | None:
    """A file volume's grid (shape, affine) from its image header alone; None when unknown."""
    path = getattr(vol, "image_path", None)
    if path is None:
        return None
    from psmamba.io import open_image

    try:
        img, _ = open_image(path, "image")
    except PsmambaError:  # unreadable here: the volume's own load says why, later
        return None
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def shared_window(pipeline: Pipeline, volumes: Sequence, most: int = 5) -> Pipeline:
    """``pipeline`` with one crop window for all ``volumes`` when they share a grid.

    A crop centred on each volume's own foreground (the paper's "around the brain") moves
    volumes that were on one grid (LPBA40's delineation space, Mindboggle's MNI152, Learn2Reg's
    AbdomenCTCT) by a few voxels against each other, and training, which pairs the arrays voxel
    for voxel, then learns those shifts. When every volume's header gives the same grid, the
    window is placed once: on the mean foreground centre of up to ``most`` volumes spread over
    the data set (read through the steps before the crop), and used for every volume. Volumes on
    different grids keep their own windows (align them to one grid first for training).
    """
    steps = list(pipeline.steps) if isinstance(pipeline, Pipeline) else []
    k = next((i for i, st in enumerate(steps) if isinstance(st, CropOrPad) and st.start is None), None)
    if k is None or len(volumes) < 2:
        return pipeline
    grids = [_grid_of(v) for v in volumes]
    if any(g is None for g in grids):
        return pipeline
    shape0, aff0 = grids[0]  # type: ignore[misc]
    if any(g[0] != shape0 or not np.allclose(g[1], aff0, atol=1e-3) for g in grids):  # type: ignore[index]
        return pipeline
    before, crop = Pipeline(steps[:k]), steps[k]
    picks = sorted({round(i * (len(volumes) - 1) / max(most - 1, 1)) for i in range(min(most, len(volumes)))})
    starts = []
    for i in picks:
        try:
            starts.append(crop.window_start(before(volumes[i].load())))
        except PsmambaError:  # a broken volume is reported where the data are checked, not here
            continue
    if not starts:
        return pipeline
    start = tuple(int(v) for v in np.floor(np.mean(starts, axis=0) + 0.5))
    fixed = CropOrPad(crop.size, crop.centre, crop.threshold, crop.use_labels, start=start)  # type: ignore[arg-type]
    return Pipeline(steps[:k] + [fixed] + steps[k + 1:])


def preset(name: str) -> Pipeline:
    """The preprocessing of a protocol: one of :data:`PRESETS`."""
    key = name.lower()
    if key in ("lpba40", "mindboggle"):
        return Pipeline([Reorient("RAS"), Resample(1.0), CropOrPad((160, 192, 160)), MinMax()])
    if key in ("abdomen", "abdomenctct"):
        # window first: the crop centres on the non-zero bounding box, and raw CT air is -1000
        return Pipeline([Reorient("RAS"), Resample(2.0), CTWindow(-500.0, 800.0), CropOrPad((160, 160, 192))])
    if key == "brain":
        return Pipeline([Reorient("RAS"), CropOrPad((160, 192, 160)), MinMax()])
    if key == "minmax":
        return Pipeline([MinMax()])
    if key == "none":
        return Pipeline([])
    raise PsmambaError(f"unknown preprocessing preset {name!r}; choose one of {sorted(PRESETS)}")

