"""NIfTI/Analyze I/O: round trips keep data, dtype and affine; bad files give one-line errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from psmamba import io
from psmamba.errors import PsmambaError
from psmamba.io import load_ddf, load_image, load_labels, save_ddf, save_image, save_labels
from psmamba.spatial import ddf_from_l2r

SUFFIXES = [".nii", ".nii.gz", ".hdr", ".img"]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8, np.int32])
def test_image_round_trip_keeps_data_dtype_and_affine(tmp_path, suffix, dtype, rng, oblique_affine):
    data = (rng.random((5, 6, 7)) * 200 - (0 if dtype == np.uint8 else 100)).astype(dtype)
    path = save_image(tmp_path / f"img{suffix}", data, oblique_affine)
    image = load_image(path)
    assert image.data.dtype == dtype
    assert np.array_equal(image.data, data)
    assert np.array_equal(image.affine, oblique_affine)  # values chosen exact in float32
    assert image.spacing == (1.5, 2.0, 3.0)
    assert image.path == path
    # an Analyze/NIfTI pair is two files; nothing else (no temporary file) is left behind
    expected = ["img.hdr", "img.img"] if suffix in (".hdr", ".img") else [f"img{suffix}"]
    assert listing(tmp_path) == expected


def test_save_accepts_tensors_with_singleton_axes(tmp_path, oblique_affine):
    x = torch.rand(1, 1, 4, 5, 6)
    image = load_image(save_image(tmp_path / "t.nii.gz", x, torch.from_numpy(oblique_affine)))
    assert image.data.dtype == np.float32 and np.array_equal(image.data, x[0, 0].numpy())


def test_template_header_never_rescales_the_data(tmp_path, rng, oblique_affine):
    # a CT-like file stored as int16 with a slope/intercept
    raw = rng.integers(0, 1000, (4, 4, 4)).astype(np.int16)
    ct = nib.Nifti1Image(raw, oblique_affine)
    ct.header.set_slope_inter(2.0, -1024.0)
    nib.save(ct, tmp_path / "ct.nii.gz")
    source = load_image(tmp_path / "ct.nii.gz")
    assert np.allclose(source.data, raw * 2.0 - 1024.0)  # nibabel's scaling applied on read
    out = rng.random((4, 4, 4)).astype(np.float32)
    back = load_image(save_image(tmp_path / "out.nii.gz", out, source.affine, header=source.header))
    assert back.data.dtype == np.float32 and np.array_equal(back.data, out)


def test_reads_plain_analyze_pairs(tmp_path, rng):
    data = rng.integers(0, 50, (6, 5, 4)).astype(np.int16)
    img = nib.AnalyzeImage(data, np.diag([1.2, 1.0, 1.5, 1.0]))
    nib.save(img, tmp_path / "S01.delineation.structure.label.hdr")
    for name in ("S01.delineation.structure.label.hdr", "S01.delineation.structure.label.img"):
        image = load_labels(tmp_path / name)
        assert np.array_equal(image.data, data)
        assert image.spacing == pytest.approx((1.2, 1.0, 1.5))
        # Analyze 7.5 stores no orientation: we keep nibabel's reading of it (x flipped, origin
        # from the header), never a reorientation of the voxels
        assert np.array_equal(image.affine, nib.load(tmp_path / name).affine)
        assert image.affine[0, 0] < 0


def test_labels_round_trip_and_dtype_choice(tmp_path, oblique_affine):
    labels = np.zeros((4, 5, 6), dtype=np.int64)
    labels[1:3, 1:3, 1:3] = 2035  # a DKT code
    labels[0, 0, 0] = 7
    back = load_labels(save_labels(tmp_path / "lab.nii.gz", labels, oblique_affine))
    assert back.data.dtype == np.int16 and np.array_equal(back.data, labels)
    small = load_labels(save_labels(tmp_path / "small.nii", labels.clip(0, 200).astype(np.float64), oblique_affine))
    assert small.data.dtype == np.uint8 and np.array_equal(small.data, labels.clip(0, 200))
    with pytest.raises(PsmambaError, match="integer"):
        save_labels(tmp_path / "bad.nii.gz", labels + 0.5, oblique_affine)
    assert not (tmp_path / "bad.nii.gz").exists()


def test_float_stored_label_maps(tmp_path):
    whole = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(whole, np.eye(4)), tmp_path / "whole.nii.gz")
    image = load_labels(tmp_path / "whole.nii.gz")
    assert np.issubdtype(image.data.dtype, np.integer) and np.array_equal(image.data, whole)
    nib.save(nib.Nifti1Image(whole + 0.25, np.eye(4)), tmp_path / "prob.nii.gz")
    with pytest.raises(PsmambaError, match=r"prob\.nii\.gz.*integer"):
        load_labels(tmp_path / "prob.nii.gz")


def test_negative_label_codes_are_refused_from_files_arrays_and_images(tmp_path):
    """-2 as background scored as a label (Dice 0, warped labels holding -2) before."""
    from psmamba.checks import check_volume_file

    lab = np.zeros((8, 8, 8), np.int16)
    lab[2:5, 2:5, 2:5], lab[0] = 1, -2
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "neg.nii.gz")
    msg = r"neg\.nii\.gz: a label map must hold codes >= 0 \(0 is the background\)"
    with pytest.raises(PsmambaError, match=msg):
        load_labels(tmp_path / "neg.nii.gz")
    with pytest.raises(PsmambaError, match=msg):
        check_volume_file(tmp_path / "neg.nii.gz", "labels", labels=True)
    with pytest.raises(PsmambaError, match=r"^fixed labels: a label map must hold codes >= 0"):
        io.as_image(lab, "fixed labels", labels=True)
    img = io.Image(lab, np.eye(4), None, "mine.nii")
    with pytest.raises(PsmambaError, match=r"^fixed labels mine\.nii: a label map must hold codes >= 0"):
        io.as_image(img, "fixed labels", labels=True)
    ok = io.as_image(np.abs(lab).astype(np.float32), "fixed labels", labels=True)  # whole floats: converted
    assert ok.data.dtype == np.uint8 and np.array_equal(ok.data, np.abs(lab))


def test_in_memory_inputs_are_checked_as_files_are():
    with pytest.raises(PsmambaError, match=r"^fixed image must hold real numbers, got dtype complex64$"):
        io.as_image(np.zeros((8, 8, 8), np.complex64), "fixed image")
    with pytest.raises(PsmambaError, match=r"^fixed mask: a label map must hold integer values"):
        io.as_image(np.full((8, 8, 8), 0.5, np.float32), "fixed mask", labels=True)
    with pytest.raises(PsmambaError, match=r"^moving image must be a 3-D array, got shape \(8, 8\)$"):
        io.as_image(np.zeros((8, 8)), "moving image")


def test_ddf_is_written_in_learn2reg_layout(tmp_path, oblique_affine, torch_seed):
    ddf = torch.randn(1, 3, 4, 5, 6, dtype=torch.float64)
    path = save_ddf(tmp_path / "ddf.nii.gz", ddf, oblique_affine)
    raw = nib.load(path)  # what a Learn2Reg evaluation script reads
    assert raw.shape == (4, 5, 6, 3) and raw.get_data_dtype() == np.float32
    assert np.array_equal(raw.affine, oblique_affine)
    assert np.allclose(raw.get_fdata()[1, 2, 3], ddf[0, :, 1, 2, 3].numpy(), atol=1e-6)
    field = load_ddf(path)
    assert torch.allclose(ddf_from_l2r(field.data, dtype=torch.float64), ddf, atol=1e-6)
    assert np.allclose(load_ddf(save_ddf(tmp_path / "d2.nii", ddf[0].numpy(), oblique_affine)).data, field.data)
    with pytest.raises(PsmambaError, match="ddf"):
        save_ddf(tmp_path / "bad.nii.gz", torch.zeros(1, 2, 4, 4, 4), oblique_affine)


def assert_one_line_naming(info: pytest.ExceptionInfo, name: str) -> None:
    message = str(info.value)
    assert "\n" not in message and name in message, message


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(PsmambaError, match="not found") as info:
        load_image(tmp_path / "nope.nii.gz", what="fixed image")
    assert_one_line_naming(info, "nope.nii.gz")
    assert str(info.value).startswith("fixed image ")
    (tmp_path / "half.hdr").write_bytes(b"")
    with pytest.raises(PsmambaError, match=r"half\.img") as info:
        load_image(tmp_path / "half.hdr")
    with pytest.raises(PsmambaError, match="unsupported") as info:
        load_image(tmp_path / "scan.mha")
    assert_one_line_naming(info, "scan.mha")
    (tmp_path / "folder.nii").mkdir()
    with pytest.raises(PsmambaError, match="not a file"):
        load_image(tmp_path / "folder.nii")


@pytest.mark.parametrize("name", ["junk.nii.gz", "junk.nii"])
def test_corrupt_files(tmp_path, name):
    (tmp_path / name).write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(PsmambaError, match="cannot be read") as info:
        load_image(tmp_path / name)
    assert_one_line_naming(info, name)


def test_truncated_gzip(tmp_path, rng):
    nib.save(nib.Nifti1Image(rng.random((10, 10, 10)).astype(np.float32), np.eye(4)), tmp_path / "ok.nii.gz")
    blob = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PsmambaError, match="cannot be read") as info:
        load_image(tmp_path / "cut.nii.gz")
    assert_one_line_naming(info, "cut.nii.gz")


def test_dimensions(tmp_path, rng):
    nib.save(nib.Nifti1Image(rng.random((6, 7)).astype(np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(PsmambaError, match="3-D") as info:
        load_image(tmp_path / "slice.nii.gz")
    assert_one_line_naming(info, "slice.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((4, 5, 6, 2)).astype(np.float32), np.eye(4)), tmp_path / "fmri.nii.gz")
    with pytest.raises(PsmambaError, match=r"3-D.*\(4, 5, 6, 2\)") as info:
        load_image(tmp_path / "fmri.nii.gz")
    assert_one_line_naming(info, "fmri.nii.gz")
    single = rng.random((4, 5, 6, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(single, np.eye(4)), tmp_path / "one.nii.gz")
    assert np.array_equal(load_image(tmp_path / "one.nii.gz").data, single[..., 0])
    with pytest.raises(PsmambaError, match="3-D"):
        save_image(tmp_path / "x.nii.gz", np.zeros((3, 4)), np.eye(4))


def test_non_finite_images(tmp_path):
    data = np.ones((3, 3, 3), dtype=np.float32)
    data[1, 1, 1] = np.nan
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(PsmambaError, match="2 NaN/Inf") as info:
        load_image(tmp_path / "nan.nii.gz")
    assert_one_line_naming(info, "nan.nii.gz")
    with pytest.raises(PsmambaError, match="NaN/Inf"):
        save_image(tmp_path / "out.nii.gz", data, np.eye(4))
    assert listing(tmp_path) == ["nan.nii.gz"]


def test_bad_destinations_and_affines(tmp_path):
    data = np.zeros((3, 3, 3), dtype=np.float32)
    with pytest.raises(PsmambaError, match="does not exist") as info:
        save_image(tmp_path / "missing" / "out.nii.gz", data, np.eye(4))
    assert_one_line_naming(info, "out.nii.gz")
    with pytest.raises(PsmambaError, match="unsupported"):
        save_image(tmp_path / "out.png", data, np.eye(4))
    with pytest.raises(PsmambaError, match="4x4"):
        save_image(tmp_path / "out.nii.gz", data, np.eye(3))
    with pytest.raises(PsmambaError, match="singular"):
        save_image(tmp_path / "out.nii.gz", data, np.zeros((4, 4)))
    (tmp_path / "taken.nii.gz").mkdir()  # the destination is a folder: the rename fails
    with pytest.raises(PsmambaError, match="cannot be written") as info:
        save_image(tmp_path / "taken.nii.gz", data, np.eye(4))
    assert_one_line_naming(info, "taken.nii.gz")
    assert listing(tmp_path) == ["taken.nii.gz"]  # no temporary file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    old = np.full((3, 3, 3), 5, dtype=np.int16)
    target = save_labels(tmp_path / "labels.nii.gz", old, np.eye(4))
    real_save = nib.save

    def crash_halfway(img, filename):
        real_save(img, filename)  # the temporary file exists ...
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(io.nib, "save", crash_halfway)
    with pytest.raises(PsmambaError, match="disk full"):
        save_labels(target, np.zeros((3, 3, 3), dtype=np.int16), np.eye(4))
    monkeypatch.undo()
    assert listing(tmp_path) == ["labels.nii.gz"]
    assert np.array_equal(load_labels(target).data, old)


@pytest.mark.parametrize("names", [("x.hdr.gz", "x.img.gz"), ("x.hdr", "x.img.gz"), ("x.hdr.gz", "x.img"),
                                   ("X.HDR", "X.IMG")])
def test_analyze_pairs_gzipped_either_half_or_upper_case(tmp_path, names):
    """Both halves of a pair are found whichever is gzipped and in any letter case (LONI's LPBA40
    ships ``.img.gz`` beside a plain ``.hdr``); the data and nibabel's affine come through."""
    import gzip

    a = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    aff = np.diag([2.0, 1.5, 1.0, 1.0])
    nib.save(nib.AnalyzeImage(a, aff), str(tmp_path / "ref.hdr"))
    ref = nib.load(str(tmp_path / "ref.hdr"))
    for src, dst in zip(("ref.hdr", "ref.img"), names):
        raw = (tmp_path / src).read_bytes()
        (tmp_path / dst).write_bytes(gzip.compress(raw) if dst.lower().endswith(".gz") else raw)
    for name in names:
        img = load_image(tmp_path / name)
        assert np.array_equal(img.data, a) and np.allclose(img.affine, ref.affine)
    (tmp_path / names[1]).unlink()
    with pytest.raises(PsmambaError, match=r"X?x?\.img\[\.gz\] of the \.hdr/\.img pair is missing"):
        load_image(tmp_path / names[0])


def test_analyze_pairs_that_differ_in_case_or_compression_stay_apart(tmp_path):
    """``a.hdr/a.img`` beside ``A.hdr/A.img`` are two volumes; a given half is its own half; the
    file check (as ``evaluate`` runs it) reads a pair whose image alone is gzipped."""
    import gzip

    from psmamba.checks import check_volume_file
    from psmamba.data.sources import find_files

    aff = np.diag([2.0, 1.5, 1.0, 1.0])
    for name, value in (("a", 1), ("A", 2)):
        nib.save(nib.AnalyzeImage(np.full((3, 4, 5), value, np.int16), aff), str(tmp_path / f"{name}.hdr"))
    assert [p.name for p in find_files(tmp_path, "*")] == ["A.hdr", "a.hdr"]
    assert load_image(tmp_path / "a.hdr").data.max() == 1 and load_image(tmp_path / "A.hdr").data.max() == 2
    voxels = (np.arange(60, dtype=np.int16) + 100).reshape(5, 4, 3).T  # Analyze stores x fastest
    (tmp_path / "a.img.gz").write_bytes(gzip.compress(voxels.tobytes(order="F")))
    assert load_image(tmp_path / "a.img.gz").data.max() == 159 and load_image(tmp_path / "a.img").data.max() == 1
    (tmp_path / "a.img").unlink()
    info = check_volume_file(tmp_path / "a.hdr", "image")
    assert info.shape == (3, 4, 5) and (info.lo, info.hi) == (100, 159)
    assert np.array_equal(load_image(tmp_path / "a.hdr").data, voxels)


def test_cache_fingerprint_covers_a_gzipped_image_half(tmp_path):
    import gzip

    from psmamba.data.volume import file_fingerprint

    nib.save(nib.AnalyzeImage(np.ones((2, 2, 2), np.int16), np.eye(4)), str(tmp_path / "x.hdr"))
    (tmp_path / "x.img.gz").write_bytes(gzip.compress((tmp_path / "x.img").read_bytes()))
    (tmp_path / "x.img").unlink()
    fp = file_fingerprint(tmp_path / "x.hdr")
    assert [Path(f[0]).name for f in fp] == ["x.hdr", "x.img.gz"] and fp[1][2] is not None


def test_complex_and_rgb_files_are_not_scalar_images(tmp_path):
    from psmamba.checks import check_volume_file

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.complex64), np.eye(4)), tmp_path / "cx.nii.gz")
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    for name in ("cx.nii.gz", "rgb.nii.gz"):
        for read in (lambda p: load_image(p, "fixed image"), lambda p: check_volume_file(p, "fixed image")):
            with pytest.raises(PsmambaError, match=f"{name}: voxels of type .* are not one real number each"):
                read(tmp_path / name)


@pytest.mark.parametrize("call", [
    lambda tmp: load_image(5, "fixed image"),
    lambda tmp: load_labels(None),
    lambda tmp: save_image(3, np.zeros((4, 4, 4), np.float32), np.eye(4)),
    lambda tmp: save_image(tmp / "a.nii.gz", np.zeros((4, 4, 4), np.float32), "eye"),
    lambda tmp: save_ddf(tmp / "d.nii.gz", np.zeros((3, 4, 4, 4), np.float32), [[1, 2], [3]]),
])
def test_a_path_or_affine_of_the_wrong_type_is_named(tmp_path, call):
    """Not a path (None, a number) or an affine that is not numbers: one PsmambaError naming
    it (a TypeError/ValueError from pathlib or numpy before), and nothing written."""
    with pytest.raises(PsmambaError, match="file path|affine for"):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_headers_itk_reads_otherwise_are_named(tmp_path):
    """A qform and an sform that disagree (psmamba reads the sform, ITK-based tools may read the
    qform) give one warning naming the file; psmamba writes both, equal, so ITK reads its files
    as psmamba does, even an sform with a slight shear ITK could not read alone."""
    import warnings

    from psmamba.io import load_image, qform_sform_gap, save_image

    data = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = [8.0, -6.0, 4.0]
    img.set_sform(np.eye(4), code=2)
    img.set_qform(shifted, code=1)
    nib.save(img, str(tmp_path / "qs.nii.gz"))
    with pytest.warns(UserWarning, match=r"qs.nii.gz: its qform and sform disagree by up to 10.77 mm"):
        load_image(tmp_path / "qs.nii.gz")
    sheared = np.diag([1.2, 1.0, 1.5, 1.0])
    sheared[0, 1] = 1e-3
    out = save_image(tmp_path / "out.nii.gz", data, sheared)
    hdr = nib.load(str(out)).header
    assert int(hdr["qform_code"]) > 0 and int(hdr["sform_code"]) > 0
    assert qform_sform_gap(hdr) < 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(out)  # psmamba's own files: no warning
    sitk = pytest.importorskip("SimpleITK")
    assert sitk.ReadImage(str(out)).GetSize() == (8, 9, 10)  # an sform alone with this shear: ITK refuses it


def test_a_2d_file_with_both_qform_and_sform_is_refused_in_one_line(tmp_path):
    """SimpleITK writes 2-D NIfTI files with both codes set: the qform/sform comparison read a third
    axis that is not there (an IndexError traceback)."""
    img = nib.Nifti1Image(np.random.default_rng(0).random((20, 24)).astype(np.float32), np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = 5.0  # disagreeing too: the comparison itself must cope with two axes
    img.set_qform(shifted, code=1)
    img.set_sform(np.eye(4), code=1)
    nib.save(img, str(tmp_path / "slice.nii.gz"))
    for load, words in ((load_image, "expected a 3-D volume"), (io.load_series, "expected a 3-D volume or a 4-D series")):
        with pytest.warns(UserWarning, match="qform and sform disagree"), pytest.raises(PsmambaError, match=words):
            load(tmp_path / "slice.nii.gz")
        io._WARNED.clear()


def test_float_round_off_of_label_codes_is_read_as_the_codes(tmp_path):
    """Codes stored as float with round-off (17.00001) are those codes, with a warning, in the reader
    and in the up-front file check alike; a value farther from a whole number is refused, printed
    in full (it was printed as '17')."""
    from psmamba.checks import check_volume_file

    lab = np.zeros((10, 10, 10), np.float32)
    lab[2:6, 2:6, 2:6] = 17
    lab[6:9, 6:9, 6:9] = 2035
    noisy = lab + (lab > 0) * np.float32(1e-5) * 17
    nib.save(nib.Nifti1Image(noisy, np.eye(4)), str(tmp_path / "noisy.nii.gz"))
    check_volume_file(tmp_path / "noisy.nii.gz", "moving labels", labels=True)
    with pytest.warns(UserWarning, match=r"noisy.nii.gz: 91 voxel value\(s\) within 0.001 of a whole number"):
        got = load_labels(tmp_path / "noisy.nii.gz")
    np.testing.assert_array_equal(got.data, lab.astype(np.int16))
    off = lab.copy()
    off[2, 2, 2] = 17.01
    nib.save(nib.Nifti1Image(off, np.eye(4)), str(tmp_path / "off.nii.gz"))
    for read in (lambda: load_labels(tmp_path / "off.nii.gz"),
                 lambda: check_volume_file(tmp_path / "off.nii.gz", "moving labels", labels=True)):
        with pytest.raises(PsmambaError, match=r"off.nii.gz: a label map must hold integer values, found 1 "
                                               r"non-integer voxel\(s\) \(e.g. 17.0100002\)"):
            read()
