"""psmamba.checks: each validator accepts good input and rejects each bad case with one line naming it."""

from __future__ import annotations

import gzip
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from psmamba.checks import (
    LabelOverlap,
    check_affine,
    check_image,
    check_inputs,
    check_label_overlap,
    check_number,
    check_same_grid,
    check_volume_file,
    image_name,
)
from psmamba.errors import PsmambaError
from psmamba.io import Image


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("value", [float("nan"), -0.1, 0.0, float("inf"), "0.1", True])
def test_check_number_rejects_bad_learning_rates(value):
    with pytest.raises(PsmambaError) as e:
        check_number("--lr", value, positive=True)
    assert _one_line(e).startswith("--lr must be a finite number > 0, got ")


def test_check_number_accepts_and_converts():
    assert check_number("--lr", 0.1, positive=True) == 0.1
    assert check_number("--lr", None, positive=True) is None
    assert check_number("--lambda", 0.0, nonnegative=True) == 0.0
    assert check_number("--lambda", np.float32(2.5), nonnegative=True) == 2.5
    it = check_number("--iters", 3.0, integer=True, nonnegative=True)
    assert it == 3 and isinstance(it, int)
    assert check_number("--x", float("inf"), finite=False, positive=True) == float("inf")
    assert check_number("--sigma-field", 32, nonnegative=True, maximum=32) == 32
    with pytest.raises(PsmambaError, match=r"^--sigma-field must be a finite number >= 0 and <= 32, got 1000000000.0$"):
        check_number("--sigma-field", 1e9, nonnegative=True, maximum=32)


@pytest.mark.parametrize("flag,value,kw,needle", [
    ("--lambda", -1.0, {"nonnegative": True}, "--lambda must be a finite number >= 0, got -1.0"),
    ("--lambda", float("nan"), {"nonnegative": True}, "--lambda must be a finite number >= 0, got nan"),
    ("--iters", -5, {"integer": True, "nonnegative": True}, "--iters must be an integer >= 0, got -5"),
    ("--iters", 2.5, {"integer": True}, "--iters must be an integer, got 2.5"),
    ("--max-pairs", 0, {"integer": True, "positive": True}, "--max-pairs must be an integer > 0, got 0"),
    ("--model-size", 1, {"integer": True, "minimum": 2}, "--model-size must be an integer >= 2, got 1"),
])
def test_check_number_messages(flag, value, kw, needle):
    with pytest.raises(PsmambaError) as e:
        check_number(flag, value, **kw)
    assert _one_line(e) == needle


# --------------------------------------------------------------------------- images
def _blob(n=12):
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float32)
    return np.exp(-((z - n / 2) ** 2 + (y - n / 2) ** 2 + (x - n / 2) ** 2) / n)


def test_check_image_accepts_arrays_tensors_and_images():
    a = _blob()
    check_image(a, "fixed image")
    check_image(torch.from_numpy(a), "fixed image", min_size=12)
    check_image(Image(a, np.eye(4), None, "f.nii.gz"), image_name("fixed image", Image(a, np.eye(4), None, "f.nii.gz")))
    check_image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), "moving image")


def test_check_image_counts_nan_and_inf():
    a = _blob()
    a[0, 0, :3] = np.nan
    a[1, 1, 1] = -np.inf
    with pytest.raises(PsmambaError) as e:
        check_image(a, "fixed image f.nii.gz")
    assert _one_line(e) == "fixed image f.nii.gz: the image holds 3 NaN and 1 Inf voxel value(s) of 1728"


def test_check_image_constant_shape_and_size():
    with pytest.raises(PsmambaError, match=r"^moving image: the image is constant \(every voxel is 7\)"):
        check_image(np.full((8, 8, 8), 7.0, np.float32), "moving image")
    with pytest.raises(PsmambaError, match=r"expected a 3-D volume, got shape \(8, 8\)"):
        check_image(np.zeros((8, 8)), "moving image")
    with pytest.raises(PsmambaError, match="holds no voxels"):
        check_image(np.zeros((8, 0, 8)), "moving image")
    with pytest.raises(PsmambaError) as e:
        check_image(_blob(12), "fixed image f.nii.gz", min_size=16, why="the 3-level pyramid needs 16 voxels a side")
    assert _one_line(e) == ("fixed image f.nii.gz of shape 12x12x12 is too small: "
                            "the 3-level pyramid needs 16 voxels a side")
    with pytest.raises(PsmambaError, match="at least 13 voxels a side are needed"):
        check_image(_blob(12), "fixed image", min_size=13)


# --------------------------------------------------------------------------- affines
def test_check_affine_accepts_real_grids():
    a = np.diag([0.2, 0.2, 10.0, 1.0])  # thick slices: condition number 50
    rot = np.eye(4)
    rot[:3, :3] = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    assert check_affine(rot @ a, "fixed image").shape == (4, 4)
    check_affine(torch.eye(4), "fixed image")


@pytest.mark.parametrize("bad,needle", [
    (np.diag([1.0, 0.0, 1.0, 1.0]), "is singular (voxel sizes 1x0x1 mm, determinant 0)"),
    (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float), "is singular"),
    (np.diag([1.0, 1e-4, 1e3, 1.0]), "nearly singular (condition number 1e+07"),
    (np.diag([1.0, np.nan, 1.0, 1.0]), "holds NaN/Inf"),
    (np.eye(3), "must be a 4x4 matrix"),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], float), "last row"),
])
def test_check_affine_rejects(bad, needle):
    with pytest.raises(PsmambaError) as e:
        check_affine(bad, "moving image m.nii.gz")
    msg = _one_line(e)
    assert msg.startswith("moving image m.nii.gz: ") and needle in msg, msg


def test_check_same_grid():
    img = Image(np.zeros((4, 5, 6)), np.eye(4), None, "i.nii")
    check_same_grid(Image(np.zeros((4, 5, 6), np.int16), np.eye(4) + 1e-5, None, "l.nii"), img, "labels", "image")
    with pytest.raises(PsmambaError, match=r"labels has shape \(4, 5, 5\) but image has shape \(4, 5, 6\)"):
        check_same_grid(Image(np.zeros((4, 5, 5)), np.eye(4), None, "l.nii"), img, "labels", "image")
    with pytest.raises(PsmambaError, match="different affines"):
        check_same_grid(Image(np.zeros((4, 5, 6)), np.diag([2.0, 1, 1, 1]), None, "l.nii"), img, "labels", "image")


# --------------------------------------------------------------------------- label maps
def test_label_overlap_counts_and_errors():
    f = np.zeros((6, 6, 6), np.int16)
    f[:2], f[2:4], f[4:] = 1, 2, 5
    m = np.zeros_like(f)
    m[:3], m[3:] = 2, 7
    ov = check_label_overlap(f, m, "fixed labels", "moving labels")
    assert ov == LabelOverlap(shared=(2,), fixed_only=(1, 5), moving_only=(7,))
    assert ov.line() == "1 label(s) in both maps (2 only in the fixed map, 1 only in the moving map)"
    # codes instead of arrays; float maps of whole numbers; tensors
    assert check_label_overlap({0, 2, 3}, torch.from_numpy(m.astype(np.float32)), "f", "m").shared == (2,)
    with pytest.raises(PsmambaError) as e:
        check_label_overlap(f, m + 100 * (m > 0), "fixed labels fl.nii.gz", "moving labels ml.nii.gz")
    assert _one_line(e) == ("fixed labels fl.nii.gz (labels 1-2, 5) and moving labels ml.nii.gz (labels 102, 107) "
                            "share no label: every Dice would be 0 (are they of the same labelling protocol?)")
    with pytest.raises(PsmambaError, match="^moving labels: the label map holds no label"):
        check_label_overlap(f, np.zeros_like(m), "fixed labels", "moving labels")
    with pytest.raises(PsmambaError, match=r"none of the labels to score \(1, 7\) is in both"):
        check_label_overlap(f, m, "fixed labels", "moving labels", labels=[1, 7])
    assert check_label_overlap(f, m, "f", "m", labels=[2, 7]).shared == (2,)


# --------------------------------------------------------------------------- one registration
def test_check_inputs_of_one_registration(tmp_path):
    a, b = _blob(12), np.roll(_blob(12), 1, axis=0)
    lab = (a > 0.5).astype(np.int16) + (a > 0.8)
    img = lambda d, aff=None, p=None: Image(d, np.eye(4) if aff is None else aff, None, p)
    ov = check_inputs(img(a, p="f.nii"), img(b), img(lab), img(np.roll(lab, 1, axis=0)))
    assert ov.shared == (1, 2)
    assert check_inputs(img(a), img(b)) is None
    # files already checked (VolumeFacts) mix with loaded images
    facts = check_volume_file(_save(tmp_path / "l.nii.gz", lab), "fixed labels", labels=True)
    assert check_inputs(img(a), img(b), facts, img(lab)).shared == (1, 2)
    cases = [
        ((img(a, np.diag([1.0, 1.0, 0.0, 1.0]), "f.nii"), img(b)), {}, "fixed image f.nii: its voxel-to-world affine is singular"),
        ((img(a), img(b, np.diag([1.0, 0.0, 1.0, 1.0]), "m.nii")), {}, "moving image m.nii: its voxel-to-world"),
        ((img(a), img(np.ones_like(b), p="m.nii")), {}, "moving image m.nii: the image is constant"),
        ((img(a[:4]), img(b)), {}, "fixed image of shape 4x12x12 is too small: the metrics need 5"),
        ((img(a), img(b[:8])), {"min_size": 9, "why": "the pyramid needs 9"}, "moving image of shape 8x12x12 is too small: the pyramid needs 9"),
        ((img(a), img(b), img(lab[:11], p="fl.nii")), {}, "fixed labels fl.nii has shape (11, 12, 12) but fixed image"),
        ((img(a), img(b), img(lab), img(lab * 10)), {}, "share no label"),
        ((img(a), img(b), img(lab), img(lab)), {"labels": [5]}, "none of the labels to score (5)"),
        ((img(a), img(b), img(lab, np.diag([1.0, 1.0, 1.0, 1.0]) * 2, "fl.nii")), {}, "its affine's last row"),
    ]
    for args, kw, needle in cases:
        with pytest.raises(PsmambaError) as e:
            check_inputs(*args, **kw)
        assert needle in _one_line(e), (needle, str(e.value))


# --------------------------------------------------------------------------- files
def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_check_volume_file_facts(tmp_path, monkeypatch):
    from psmamba import checks

    monkeypatch.setattr(checks, "_SLAB_VOXELS", 50)  # many slabs: the pass over slabs is what is tested
    a = _blob(10)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    facts = check_volume_file(_save(tmp_path / "i.nii.gz", a, aff), "fixed image")
    assert facts.shape == (10, 10, 10) and np.allclose(facts.affine, aff) and facts.codes is None
    assert facts.lo == pytest.approx(float(a.min())) and facts.hi == pytest.approx(float(a.max()))
    lab = np.zeros((10, 10, 10), np.float32)  # float-stored label map of whole numbers
    lab[2:4], lab[7, 7, 7] = 3, 300
    facts = check_volume_file(_save(tmp_path / "l.nii", lab), "fixed labels", labels=True)
    assert facts.codes == {0, 3, 300}
    four = check_volume_file(_save(tmp_path / "4d.nii.gz", a[..., None]), "fixed image")
    assert four.shape == (10, 10, 10)
    # an Analyze/NIfTI pair
    nib.save(nib.Nifti1Pair(a, aff), str(tmp_path / "p.img"))
    assert check_volume_file(tmp_path / "p.hdr", "moving image").shape == (10, 10, 10)


def test_check_volume_file_rejects(tmp_path, monkeypatch):
    from psmamba import checks

    monkeypatch.setattr(checks, "_SLAB_VOXELS", 50)

    def fails(path, needle, **kw):
        with pytest.raises(PsmambaError) as e:
            check_volume_file(path, "moving image", **kw)
        msg = _one_line(e)
        assert msg.startswith(f"moving image {path}") and needle in msg, msg

    a = _blob(10)
    good = _save(tmp_path / "good.nii.gz", a)
    raw = bytearray(good.read_bytes())
    for k, offset in enumerate((len(raw) // 2, len(raw) - 6, len(raw) - 2)):  # data, CRC, length
        bad = bytearray(raw)
        bad[offset] ^= 0xFF
        (tmp_path / f"c{k}.nii.gz").write_bytes(bytes(bad))
        fails(tmp_path / f"c{k}.nii.gz", "cannot be read as NIfTI/Analyze")
    (tmp_path / "t.nii.gz").write_bytes(bytes(raw[: len(raw) // 2]))
    fails(tmp_path / "t.nii.gz", "cannot be read")
    (tmp_path / "junk.nii").write_bytes(b"not a nifti file at all" * 20)
    fails(tmp_path / "junk.nii", "cannot be read")
    fails(tmp_path / "missing.nii.gz", "file not found")
    fails(tmp_path / "x.txt", "unsupported file type")
    nan = a.copy()
    nan[1, 2, 3] = np.nan
    fails(_save(tmp_path / "nan.nii.gz", nan), "holds 1 NaN voxel value(s) of 1000")
    fails(_save(tmp_path / "const.nii.gz", np.zeros((10, 10, 10), np.float32)), "constant")
    fails(_save(tmp_path / "small.nii.gz", _blob(4)), "too small: because", min_size=5, why="because")
    fails(_save(tmp_path / "2d.nii.gz", a[:, :, 0]), "expected a 3-D volume")
    fails(_save(tmp_path / "frac.nii.gz", a), "must hold integer values", labels=True)
    # a singular affine in the header (sform of a zero axis, as a broken converter writes)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(a.shape)
    hdr.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(a, None, header=hdr), str(tmp_path / "sing.nii.gz"))
    fails(tmp_path / "sing.nii.gz", "is singular")


def test_gzip_trailer_is_what_the_crc_check_adds(tmp_path):
    """The CRC failure above is real: nibabel alone returns the data of a file whose trailer
    is corrupt (it never reads it), so this check is not redundant with loading."""
    good = _save(tmp_path / "good.nii.gz", _blob(10))
    raw = bytearray(good.read_bytes())
    raw[-6] ^= 0xFF
    (tmp_path / "c.nii.gz").write_bytes(bytes(raw))
    assert np.asarray(nib.load(str(tmp_path / "c.nii.gz")).dataobj).shape == (10, 10, 10)
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(bytes(raw))
    assert math.isfinite(check_volume_file(good, "image").hi)


def test_a_file_argument_that_is_a_folder_or_a_device_is_said_so(tmp_path):
    """Pair lists, results files, transforms and checkpoints: missing, a folder, a device."""
    from psmamba.data.pairs import read_pair_list
    from psmamba.engine.methods import load_model
    from psmamba.engine.results import read_results
    from psmamba.transforms import read_itk_affine

    for read, what, name in ((read_pair_list, "pair list", "p.csv"), (read_results, "results file", "r.csv"),
                             (read_itk_affine, "transform file", "t.txt"), (load_model, "checkpoint", "c.pt")):
        with pytest.raises(PsmambaError, match=f"^{what} .*{name} does not exist$"):
            read(tmp_path / name)
        folder = tmp_path / "folder" / name  # a folder with a file's name
        folder.mkdir(parents=True)
        with pytest.raises(PsmambaError, match=f"^{what} .*{name} is a folder, not a file$"):
            read(folder)
        if os.path.exists("/dev/null") and what != "transform file":  # (refused by its missing suffix first)
            with pytest.raises(PsmambaError, match=f"^{what} /dev/null is not a regular file"):
                read("/dev/null")
