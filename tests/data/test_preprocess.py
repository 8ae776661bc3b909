"""Preprocessing keeps the affine consistent (a labelled point keeps its world position); the cache."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from psmamba.data.cache import default_cache_dir, prepare
from psmamba.data.labels import LPBA40
from psmamba.data.preprocess import (
    CropOrPad,
    CTWindow,
    MinMax,
    Percentile,
    Pipeline,
    RemapLabels,
    Reorient,
    Resample,
    foreground_bbox,
    preset,
)
from psmamba.data.volume import ArrayVolumeRef, FileVolumeRef, Volume
from psmamba.errors import PsmambaError

SHAPE = (20, 24, 14)
COEF = np.array([0.7, -0.4, 0.25])  # image = COEF . world + 3: trilinear sampling of it is exact


def _world(affine: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, idx)


def _volume(affine: np.ndarray) -> Volume:
    """A linear image of world position, a labelled point (label 7) and a labelled block (label 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), axis=-1)
    image = (_world(affine, idx.reshape(-1, 3)) @ COEF + 3.0).reshape(SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[6:12, 8:14, 5:9] = 3
    labels[13, 17, 10] = 7
    return Volume("v", image, affine, labels, {3: "block", 7: "point"})


def _centroid_world(vol: Volume, label: int) -> np.ndarray:
    return _world(vol.affine, np.argwhere(vol.labels == label).mean(axis=0))


def _check_linear_image(vol: Volume, margin: int = 0, atol: float = 1e-3) -> None:
    """Every (interior) voxel holds COEF . world(voxel) + 3: image and affine moved together."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij"), axis=-1)
    expect = _world(vol.affine, idx.reshape(-1, 3)) @ COEF + 3.0
    expect = expect.reshape(vol.shape)
    inner = tuple(slice(margin, s - margin) for s in vol.shape)
    np.testing.assert_allclose(vol.image[inner], expect[inner], atol=atol)


def test_reorient_keeps_world_positions(oblique_affine):
    vol = _volume(oblique_affine)
    assert "".join(nib.aff2axcodes(vol.affine)) != "RAS"
    out = Reorient("RAS")(vol)
    assert "".join(nib.aff2axcodes(out.affine)) == "RAS"
    assert out.shape == (24, 20, 14)  # axes permuted, none resampled
    _check_linear_image(out, atol=1e-4)
    np.testing.assert_allclose(_centroid_world(out, 7), _centroid_world(vol, 7), atol=1e-9)
    np.testing.assert_allclose(_centroid_world(out, 3), _centroid_world(vol, 3), atol=1e-9)
    assert Reorient("LPI")(out).shape == out.shape
    with pytest.raises(PsmambaError):
        Reorient("RRS")


@pytest.mark.parametrize("spacing", [1.0, 2.5, (1.0, 3.0, 2.0)])
def test_resample_keeps_world_positions(oblique_affine, spacing):
    vol = Reorient()(_volume(oblique_affine))
    out = Resample(spacing)(vol)
    target = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    np.testing.assert_allclose(out.spacing, target)
    # the field of view is kept to within one voxel, centred
    extent_old = np.array(vol.shape) * np.array(vol.spacing)
    extent_new = np.array(out.shape) * target
    assert np.all(np.abs(extent_new - extent_old) <= target + 1e-9)
    np.testing.assert_allclose(_world(out.affine, (np.array(out.shape) - 1) / 2),
                               _world(vol.affine, (np.array(vol.shape) - 1) / 2), atol=1e-9)
    _check_linear_image(out, margin=2, atol=2e-3)  # trilinear of a linear function is exact inside
    # the labelled block stays where it was (nearest neighbour: within half a new voxel)
    np.testing.assert_allclose(_centroid_world(out, 3), _centroid_world(vol, 3), atol=0.5 * target.max() + 1e-6)
    assert out.labels.dtype == np.uint8 and set(np.unique(out.labels)) <= {0, 3, 7}


def test_crop_or_pad_keeps_world_positions(oblique_affine):
    vol = Reorient()(_volume(oblique_affine))
    vol.image[vol.image < 0] = 0  # a foreground box for the crop to centre on
    for size in [(10, 9, 8), (40, 30, 32), (24, 20, 14)]:
        out = CropOrPad(size)(vol)
        assert out.shape == size
        np.testing.assert_allclose(_centroid_world(out, 7), _centroid_world(vol, 7), atol=1e-9) \
            if (out.labels == 7).any() else None
        # every voxel that came from the input holds the input's value at the same world point
        inside = out.image != 0
        idx = np.argwhere(inside)
        src = np.rint(nib.affines.apply_affine(np.linalg.inv(vol.affine) @ out.affine, idx)).astype(int)
        np.testing.assert_array_equal(out.image[inside], vol.image[tuple(src.T)])
    # centred on the foreground bounding box
    img = np.zeros((30, 30, 30), np.float32)
    img[4:10, 20:28, 0:30] = 1
    out = CropOrPad((6, 8, 10))(Volume("b", img, np.eye(4)))
    assert out.image.sum() == 6 * 8 * 10
    lo, hi = foreground_bbox(img)
    np.testing.assert_array_equal(lo, [4, 20, 0]) and np.testing.assert_array_equal(hi, [9, 27, 29])


def test_paper_pipeline_point_stays_put(oblique_affine):
    vol = _volume(oblique_affine)
    pipe = Pipeline([Reorient(), Resample(1.0), CropOrPad((24, 40, 48)), MinMax()])
    out = pipe(vol)
    assert out.shape == (24, 40, 48)
    assert out.image.min() == 0.0 and abs(out.image.max() - 1.0) < 1e-6
    np.testing.assert_allclose(_centroid_world(out, 3), _centroid_world(vol, 3), atol=0.5)
    # the single labelled voxel is still labelled at (within half a voxel of) its world point
    np.testing.assert_allclose(_centroid_world(out, 7), _centroid_world(vol, 7), atol=0.5 + 1e-6)
    desc = pipe.describe()
    assert [s["step"] for s in desc["steps"]] == ["Reorient", "Resample", "CropOrPad", "MinMax"]


def test_intensity_steps_and_remap():
    img = np.zeros((6, 6, 6), np.float32)
    img[1:5, 1:5, 1:5] = np.linspace(-1000, 1500, 64).reshape(4, 4, 4)
    vol = Volume("ct", img, np.eye(4))
    ct = CTWindow(-500, 800)(vol).image
    assert ct.min() == 0 and ct.max() == 1 and ct[0, 0, 0] == pytest.approx(500 / 1300)
    mm = MinMax()(vol).image
    assert mm.min() == 0 and mm.max() == 1
    pc = Percentile(5, 95)(vol).image
    assert pc.min() == 0 and pc.max() == 1 and np.sum(pc == 1) >= 3
    assert MinMax()(Volume("c", np.full((2, 2, 2), 5.0), np.eye(4))).image.max() == 0
    lab = np.array([21, 181, 0, 166], dtype=np.int16).reshape(1, 2, 2)
    out = RemapLabels("lpba40")(Volume("l", np.zeros((1, 2, 2)), np.eye(4), lab))
    assert out.labels.ravel().tolist() == [1, 0, 0, 54] and out.label_names == LPBA40.label_names
    with pytest.raises(PsmambaError):
        CTWindow(10, 0)
    with pytest.raises(PsmambaError):
        preset("unknown")
    assert [s.describe()["step"] for s in preset("abdomen").steps] == ["Reorient", "Resample", "CTWindow", "CropOrPad"]


def test_cache_reads_ready_arrays_and_notices_changes(tmp_path, monkeypatch):
    path = tmp_path / "a.nii.gz"
    data = np.random.default_rng(0).uniform(0, 5, (8, 9, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])), str(path))
    ref = FileVolumeRef("a", path)
    pipe = Pipeline([Reorient(), MinMax()])
    cache = tmp_path / "cache"
    first = prepare(ref, pipe, cache)
    files = list((cache / "volumes").glob("a-*.npz"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(FileVolumeRef, "load", lambda self, remap=True: calls.append(1) or 1 / 0)
    second = prepare(ref, pipe, cache)  # read from the cache: the file is not opened again
    assert calls == [] and np.array_equal(second.image, first.image) and np.array_equal(second.affine, first.affine)
    monkeypatch.undo()
    prepare(ref, Pipeline([MinMax()]), cache)  # other settings, other entry
    assert len(list((cache / "volumes").glob("a-*.npz"))) == 2
    os.utime(path, ns=(10**18, 10**18))  # a changed source file invalidates its entries
    prepare(ref, pipe, cache)
    assert len(list((cache / "volumes").glob("a-*.npz"))) == 3
    monkeypatch.setenv("PSMAMBA_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" and default_cache_dir(cache) == cache
    prepare(ArrayVolumeRef(Volume("m", data, np.eye(4))), None)
    assert len(list((tmp_path / "env" / "volumes").glob("m-*.npz"))) == 1


def _brains_on_one_grid(root, shifts, affine=None, shape=(40, 44, 40)):
    """Files of 'brains' (ellipsoids) on one grid, each shifted by its own voxels, with a mark at
    one world point (voxel (12, 14, 12) of the grid) in every label map."""
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    vols = []
    for k, (dz, dy, dx) in enumerate(shifts):
        a = affine if not callable(affine) else affine(k)
        r = ((z - 20 - dz) / 12) ** 2 + ((y - 22 - dy) / 14) ** 2 + ((x - 20 - dx) / 12) ** 2
        img = np.where(r < 1, 1.0 + 0.1 * k, 0.0).astype(np.float32)
        lab = (r < 1).astype(np.int16)
        lab[12, 14, 12] = 7
        nib.save(nib.Nifti1Image(img, a), str(root / f"s{k}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, a), str(root / f"s{k}_seg.nii.gz"))
        vols.append(FileVolumeRef(f"s{k}", root / f"s{k}.nii.gz", root / f"s{k}_seg.nii.gz"))
    return vols


def test_volumes_on_one_grid_share_one_crop_window(tmp_path):
    """Cropped around each one's own foreground, volumes of one grid moved against each other
    (training pairs arrays voxel for voxel); with the shared window they stay aligned."""
    from psmamba.data.preprocess import CropOrPad, MinMax, Pipeline, Reorient, shared_window

    vols = _brains_on_one_grid(tmp_path / "one", [(0, 0, 0), (3, -2, 1), (-2, 3, -3), (1, 1, 4)])
    own = Pipeline([Reorient(), CropOrPad((36, 40, 36)), MinMax()])
    shared = shared_window(own, vols)
    assert shared is not own and shared.steps[1].start is not None
    assert "start" in str(shared.describe())  # (part of the cache key)
    marks_own, marks_shared, affines = set(), set(), []
    for v in vols:
        a, b = own(v.load()), shared(v.load())
        marks_own.add(tuple(np.argwhere(a.labels == 7)[0]))
        marks_shared.add(tuple(np.argwhere(b.labels == 7)[0]))
        affines.append(b.affine)
    assert len(marks_own) > 1  # each its own window: the same world point at different voxels
    assert len(marks_shared) == 1 and all(np.allclose(a, affines[0]) for a in affines)
    # the window still holds every brain (placed on their mean centre)
    for v in vols:
        assert shared(v.load()).labels.astype(bool).sum() == v.load().labels.astype(bool).sum()
    # a broken volume among those read for the window is left to the data check (no error here)
    bad = tmp_path / "one" / "s0.nii.gz"
    arr = np.asarray(nib.load(str(bad)).dataobj).copy()
    arr[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(arr, nib.load(str(bad)).affine), str(bad))
    assert shared_window(own, vols).steps[1].start is not None
    # volumes on different grids keep their own windows
    def moved(k):
        a = np.diag([2.0, 2.0, 2.0, 1.0])
        a[0, 3] = 2.0 * k
        return a

    other = _brains_on_one_grid(tmp_path / "two", [(0, 0, 0), (1, 0, 0)], affine=moved)
    assert shared_window(own, other) is own
