"""psmamba apply: a registration's map carried onto other images, as register itself resamples."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from psmamba.cli import main
from psmamba.engine.apply import Field, apply_field
from psmamba.errors import PsmambaError

from .test_register import grid_affine, save, world_blobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture()
def registered(tmp_path):
    """A pair on two grids (the moving one coarser and mirrored), registered with labels and --itk."""
    fshape, mshape = (24, 24, 24), (18, 20, 17)
    faff = grid_affine(shape=fshape)
    maff = grid_affine(spacing=(1.3, 1.2, 1.4), shape=mshape, flip0=True)
    fimg, flab = world_blobs(fshape, faff)
    mimg, mlab = world_blobs(mshape, maff, shift_mm=(2.0, -1.5, 1.5), wobble=0.8)
    files = {"f": save(tmp_path / "f.nii.gz", fimg, faff), "m": save(tmp_path / "m.nii.gz", mimg, maff),
             "fl": save(tmp_path / "fl.nii.gz", flab, faff), "ml": save(tmp_path / "ml.nii.gz", mlab, maff)}
    out = tmp_path / "reg"
    assert main(["register", "--fixed", str(files["f"]), "--moving", str(files["m"]), "--fixed-labels",
                 str(files["fl"]), "--moving-labels", str(files["ml"]), "--method", "affine+io", "--itk",
                 "--io-iterations", "20", "10", "1", "--no-overview", "--device", "cpu", "--out", str(out)]) == 0
    return {**files, "out": out, "faff": faff, "maff": maff, "fshape": fshape, "mshape": mshape}


def test_apply_reproduces_registers_own_resampling(registered, tmp_path, capsys):
    r, out = registered, registered["out"]
    for field in ("ddf.nii.gz", "warp_itk.nii.gz"):  # psmamba's field and the ITK/ANTs one: the same map
        assert main(["apply", "--field", str(out / field), "--image", str(r["ml"]), "--labels",
                     "--out", str(tmp_path / "a" / "wl.nii.gz")]) == 0
        np.testing.assert_array_equal(data(tmp_path / "a" / "wl.nii.gz"), data(out / "warped_labels.nii.gz"))
        assert main(["apply", "--field", str(out / field), "--image", str(r["m"]), "--reference", str(r["f"]),
                     "--out", str(tmp_path / "a" / "w.nii.gz")]) == 0
        np.testing.assert_allclose(data(tmp_path / "a" / "w.nii.gz"), data(out / "warped.nii.gz"), atol=1e-5)
        assert "warning" not in capsys.readouterr().err
    img = nib.load(str(tmp_path / "a" / "wl.nii.gz"))
    np.testing.assert_allclose(img.affine, r["faff"], atol=1e-5)
    assert np.issubdtype(img.get_data_dtype(), np.integer)
    # the inverse map carries the fixed labels onto the moving grid, where they match the moving labels
    assert main(["apply", "--field", str(out / "ddf_inverse.nii.gz"), "--image", str(r["fl"]), "--labels",
                 "--out", str(tmp_path / "a" / "fl_on_m.nii.gz")]) == 0
    back = nib.load(str(tmp_path / "a" / "fl_on_m.nii.gz"))
    assert back.shape == r["mshape"]
    np.testing.assert_allclose(back.affine, r["maff"], atol=1e-5)
    from psmamba import metrics

    summary_after = __import__("json").loads((out / "summary.json").read_text())["dice_after"]["mean"]
    assert metrics.mean_dice(data(r["ml"]), np.asarray(back.dataobj)) > summary_after - 0.05


def test_an_image_on_another_grid_in_the_same_world(registered, tmp_path):
    """Another scan of the moving subject on its own grid (here the same anatomy sampled finer and
    unflipped) is read through its own header."""
    r = registered
    oshape = (30, 26, 28)
    oaff = grid_affine(spacing=(0.8, 0.9, 0.85), shape=oshape)
    other, _ = world_blobs(oshape, oaff, shift_mm=(2.0, -1.5, 1.5), wobble=0.8)
    res = apply_field(r["out"] / "ddf.nii.gz", save(tmp_path / "o.nii.gz", other, oaff))
    assert res.data.shape == r["fshape"] and res.path is None
    warped = data(r["out"] / "warped.nii.gz")
    assert np.corrcoef(res.data.ravel(), warped.ravel())[0, 1] > 0.98


def test_learn2reg_field_without_geometry_and_padding(tmp_path):
    """A voxel field saved with the identity affine takes the reference's; outside the image the
    result is --padding."""
    aff = grid_affine(spacing=(2.0, 2.0, 2.0), shape=(10, 10, 10))
    img = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32) + 1
    ddf = np.zeros((3, 10, 10, 10), np.float32)
    ddf[0] = 3.0  # everything reads three voxels further along axis 0
    from psmamba.io import save_ddf

    save_ddf(tmp_path / "l2r.nii.gz", ddf, np.eye(4))
    ref = save(tmp_path / "ref.nii.gz", img, aff)
    res = apply_field(tmp_path / "l2r.nii.gz", ref, reference=ref, padding=-5.0, out=tmp_path / "x" / "r.nii.gz")
    np.testing.assert_allclose(res.data[:7], img[3:], atol=1e-5)
    np.testing.assert_allclose(res.data[8:], -5.0)
    np.testing.assert_allclose(nib.load(str(tmp_path / "x" / "r.nii.gz")).affine, aff, atol=1e-5)
    # in memory: a Field and an Image (an array alone would be taken on 1 mm voxels)
    from psmamba.io import Image

    res2 = apply_field(Field(ddf, aff), Image(data=img, affine=aff, header=None, path=None))
    np.testing.assert_allclose(res2.data, res.data.clip(0), atol=1e-5)


def test_a_4d_series_goes_through_volume_by_volume(registered, tmp_path, capsys):
    """A 4-D series (fMRI, diffusion, channels) of the moving subject: every volume through the same
    map, each equal to that volume carried alone; the repetition time and its unit are kept."""
    r, out = registered, registered["out"]
    mimg = data(r["m"]).astype(np.float32)
    series = np.stack([mimg * (1 + 0.1 * t) + t for t in range(4)], axis=-1)
    img = nib.Nifti1Image(series, r["maff"])
    img.header.set_zooms(img.header.get_zooms()[:3] + (2.5,))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(tmp_path / "series.nii.gz"))
    assert main(["apply", "--field", str(out / "ddf.nii.gz"), "--image", str(tmp_path / "series.nii.gz"),
                 "--padding", "-1", "--out", str(tmp_path / "s" / "ws.nii.gz")]) == 0
    assert "24x24x24x4" in capsys.readouterr().out
    res = nib.load(str(tmp_path / "s" / "ws.nii.gz"))
    assert res.shape == r["fshape"] + (4,)
    assert res.header.get_zooms()[3] == pytest.approx(2.5) and res.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(res.affine, r["faff"], atol=1e-5)
    got = np.asarray(res.dataobj)
    for t in range(4):
        one = save(tmp_path / f"v{t}.nii.gz", series[..., t], r["maff"])
        np.testing.assert_array_equal(got[..., t], apply_field(out / "ddf.nii.gz", one, padding=-1.0).data)
    # label maps in a series (one per rater, say) stay integer codes, nearest neighbour
    lab = data(r["ml"])
    labs = np.stack([lab, lab], axis=-1)
    nib.save(nib.Nifti1Image(labs, r["maff"]), str(tmp_path / "labs.nii.gz"))
    wl = apply_field(out / "ddf.nii.gz", tmp_path / "labs.nii.gz", labels=True, out=tmp_path / "s" / "wl.nii.gz")
    np.testing.assert_array_equal(wl.data[..., 1], data(out / "warped_labels.nii.gz"))
    assert np.issubdtype(nib.load(str(tmp_path / "s" / "wl.nii.gz")).get_data_dtype(), np.integer)
    # in memory: an Image holding a series
    from psmamba.io import Image

    mem = apply_field(out / "ddf.nii.gz", Image(data=series, affine=r["maff"], header=None, path=None), padding=-1.0)
    np.testing.assert_allclose(mem.data[..., 2], got[..., 2], atol=1e-4)  # (the file stores its affine in float32)
    # refused before any output: a vector image (5-D), NaNs in any volume
    target = tmp_path / "bad" / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 1, 3), np.float32), np.eye(4)), str(tmp_path / "vec.nii.gz"))
    nan = series.copy()
    nan[0, 0, 0, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, r["maff"]), str(tmp_path / "nan.nii.gz"))
    for bad, words in (("vec.nii.gz", "a 3-D volume or a 4-D series"), ("nan.nii.gz", "1 NaN/Inf")):
        assert main(["apply", "--field", str(out / "ddf.nii.gz"), "--image", str(tmp_path / bad),
                     "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad in err[0] and words in err[0], err
    assert not target.parent.exists()


def test_bad_input_one_line_before_any_output(registered, tmp_path, capsys):
    r, out = registered, registered["out"]
    target = tmp_path / "bad" / "x.nii.gz"

    def fails(*argv):
        assert main(["apply", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("psmamba: error:"), err
        return err[0]

    ddf, m = str(out / "ddf.nii.gz"), str(r["m"])
    assert "expected shape (D, H, W, 3)" in fails("--field", m, "--image", m, "--out", str(target))
    assert "does not exist" in fails("--field", ddf, "--image", str(tmp_path / "no.nii.gz"), "--out", str(target))
    assert "unsupported file type" in fails("--field", ddf, "--image", m, "--out", str(tmp_path / "x.txt"))
    assert "is not the reference image" in fails("--field", ddf, "--image", m, "--reference", m, "--out", str(target))
    assert "integer values" in fails("--field", ddf, "--image", m, "--labels", "--out", str(target))
    assert "--padding" in fails("--field", ddf, "--image", m, "--padding", "nan", "--out", str(target))
    assert "label map's outside is 0" in fails("--field", ddf, "--image", str(r["ml"]), "--labels", "--padding", "1",
                                               "--out", str(target))
    assert "is an input of this command" in fails("--field", ddf, "--image", m, "--out", m)
    tiny = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1, 3), np.float32), np.eye(4)), str(tiny))
    assert "not a 3-D grid" in fails("--field", str(tiny), "--image", m, "--out", str(target))
    bare = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), None)
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    nib.save(bare, str(tmp_path / "bare.nii.gz"))
    assert "give --reference" in fails("--field", str(tmp_path / "bare.nii.gz"), "--image", m, "--out", str(target))
    assert "file name is empty" in fails("--field", "", "--image", m, "--out", str(target))
    # register's own field as the image (a 3-volume series by shape)
    assert "is a displacement field (psmamba's ddf), not an image" in fails("--field", ddf, "--image", ddf,
                                                                           "--out", str(target))
    # an image of another world space: nothing of it is read (the result would be all padding)
    far_aff = r["maff"].copy()
    far_aff[:3, 3] += 500.0
    far = save(tmp_path / "far.nii.gz", data(r["ml"]), far_aff)
    err = fails("--field", ddf, "--image", str(far), "--labels", "--out", str(target))
    assert "far.nii.gz: no voxel of the field's grid maps inside it" in err
    assert not target.parent.exists()  # no folder made for a result that was never written
    # a label map carried as an image works, with a warning that names the flag
    with pytest.warns(UserWarning, match="if it is a label map, apply it with labels=True .--labels"):
        assert main(["apply", "--field", ddf, "--image", str(r["ml"]), "--out", str(target)]) == 0
    with pytest.raises(PsmambaError, match="expected a file name"):
        apply_field(out / "ddf.nii.gz", r["m"], out="  ")
    # an 8-bit intensity image (many values) gets no label-map warning; a mask does
    import warnings

    rng = np.random.default_rng(0)
    u8 = save(tmp_path / "u8.nii.gz", rng.integers(0, 256, r["mshape"]).astype(np.uint8), r["maff"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_field(out / "ddf.nii.gz", u8)
    with pytest.warns(UserWarning, match="holds 2 integer values"):
        apply_field(out / "ddf.nii.gz", save(tmp_path / "mask.nii.gz", (data(r["ml"]) > 0).astype(np.uint8), r["maff"]))


def test_a_pair_half_is_an_input_and_warnings_come_once_per_file(registered, tmp_path, capsys):
    r, out = registered, registered["out"]
    ml = nib.load(str(r["ml"]))
    nib.save(nib.Nifti1Pair(np.asarray(ml.dataobj), ml.affine), str(tmp_path / "ML.hdr"))
    assert main(["apply", "--field", str(out / "ddf.nii.gz"), "--image", str(tmp_path / "ML.hdr"), "--labels",
                 "--out", str(tmp_path / "ML.img")]) == 2
    assert "is an input of this command" in capsys.readouterr().err
    assert main(["apply", "--field", str(out / "ddf.nii.gz"), "--image", "", "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "--image: the file name is empty" in capsys.readouterr().err
    # a file whose qform and sform disagree, read three times in one process: one warning
    img = nib.Nifti1Image(np.asarray(ml.dataobj), ml.affine)
    shifted = ml.affine.copy()
    shifted[:3, 3] += [5.0, 0.0, 0.0]
    img.set_qform(shifted, code=1)
    nib.save(img, str(tmp_path / "qs.nii.gz"))
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            apply_field(out / "ddf.nii.gz", tmp_path / "qs.nii.gz", labels=True)
    assert [str(w.message) for w in seen if "qform" in str(w.message)] == [
        f"image {tmp_path / 'qs.nii.gz'}: its qform and sform disagree by up to 5.00 mm; psmamba reads the sform "
        "(nibabel's rule), ITK-based tools (ANTs, ITK-SNAP, Slicer) may read the qform: fix the header before "
        "exchanging transforms with them".replace("image ", "label map ", 1)]
    # an ITK field applied to a plain Analyze image: ITK read that image otherwise
    nib.save(nib.AnalyzeImage(np.asarray(ml.dataobj).astype(np.int16), ml.affine), str(tmp_path / "an.hdr"))
    with pytest.warns(UserWarning, match="an.hdr: a plain Analyze file"):
        apply_field(out / "warp_itk.nii.gz", tmp_path / "an.hdr", labels=True)
