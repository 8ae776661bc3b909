"""The default registration pipeline: affine, then diffeomorphic instance optimisation (``io``).

Synthetic anatomy with texture (a smooth random field inside a ball, three labelled regions),
32-40 voxels a side, so each registration takes seconds on one thread.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from psmamba.cli import main
from psmamba.engine.register import OUTPUT_FILES, register_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (36, 40, 36)


def anatomy(seed: int = 0, shape=SHAPE):
    """A textured 'organ' (a ball of radius ~13 voxels) with three labels; 1 mm voxels, centred affine."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + (xx * 1.2) ** 2)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    field /= field.std()
    inside = r < 13
    labels = np.zeros(shape, np.int16)
    labels[inside] = 1
    labels[inside & (field > 0.3)] = 2
    labels[inside & (r < 6)] = 3
    image = np.where(inside, 0.5 + 0.15 * field, 0.0) + 0.3 * (labels == 3) + 0.2 * (labels == 2)
    image = ndimage.gaussian_filter(image, 0.7).astype(np.float32)
    aff = np.eye(4)
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2
    return image, labels, aff


def moved(image, labels, degrees=10.0, shift=(3.0, -2.0, 2.0), scale=1.03):
    """The image and labels under a rigid motion with scaling about the centre (voxels changed, header kept)."""
    t = np.deg2rad(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]) * scale
    c = (np.asarray(image.shape) - 1) / 2
    off = c - rot @ c - np.asarray(shift)
    im = ndimage.affine_transform(image, rot, off, order=1)
    lab = ndimage.affine_transform(labels, rot, off, order=0)
    return im.astype(np.float32), lab.astype(np.int16)


def img(data, affine):
    from psmamba.io import Image

    return Image(data, affine, None, None)


def save(path, data, affine):
    if abs(np.linalg.det(np.asarray(affine)[:3, :3])) < 1e-9:  # nibabel cannot write it as a qform
        im = nib.Nifti1Image(data, np.eye(4))
        im.set_qform(None, code=0)
        im.set_sform(affine, code=1)
        nib.save(im, str(path))
        return path
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    f, fl, aff = anatomy(0)
    m, ml = moved(f, fl)
    return {"fixed": save(d / "f.nii.gz", f, aff), "moving": save(d / "m.nii.gz", m, aff),
            "fixed_labels": save(d / "fl.nii.gz", fl, aff), "moving_labels": save(d / "ml.nii.gz", ml, aff),
            "affine": aff, "arrays": (f, fl, m, ml)}


def test_default_pipeline_writes_every_output_and_registers(pair, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["register", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
               "--fixed-labels", str(pair["fixed_labels"]), "--moving-labels", str(pair["moving_labels"]),
               "--device", "cpu", "--no-overview", "--out", str(out)])
    assert rc == 0
    assert "affine stage" in capsys.readouterr().out
    for name in OUTPUT_FILES:
        assert (out / name).is_file() == (name != "overview.png" and "itk" not in name), name  # --itk not given
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "affine+network+io"  # the shipped network (psmamba.models.pretrained)
    assert s["dice_after"]["mean"] > s["dice_before"]["mean"] + 0.1
    assert s["dice_after"]["mean"] > 0.8, s["dice_after"]
    assert s["folding_percent"] <= 0.01
    # the affine in summary.json and in the ITK file are the same map
    from psmamba.transforms import read_itk_affine

    np.testing.assert_allclose(read_itk_affine(out / "affine.txt"), np.asarray(s["affine"]["matrix_ras"]), atol=1e-6)
    # the ddf is the whole map: warping the moving labels with it gives the written warped labels
    import torch

    from psmamba.spatial import ddf_from_l2r, warp

    ddf = ddf_from_l2r(np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj))
    ml = torch.from_numpy(pair["arrays"][3].astype(np.int64))[None, None]
    again = warp(ml, ddf, mode="nearest")[0, 0].numpy()
    written = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    assert (again == written).mean() > 0.995


def test_inverse_field_undoes_the_forward_map(pair):
    """Same grid: p -> p + ddf(p) -> that + ddf_inverse(that) comes back to p (inside the anatomy)."""
    import torch

    from psmamba.spatial import warp

    res = register_pair(pair["fixed"], pair["moving"], device="cpu")
    fwd = torch.from_numpy(res.ddf)[None]
    inv = torch.from_numpy(res.ddf_inverse)[None]
    back = fwd + warp(inv, fwd, padding="border")  # the displacement of inverse o forward
    err = back.norm(dim=1)[0].numpy()
    inside = pair["arrays"][1] > 0
    assert np.median(err[inside]) < 0.1 and np.percentile(err[inside], 95) < 0.5


def test_self_registration_moves_no_voxel_by_a_tenth():
    f, _, aff = anatomy(1)
    res = register_pair(img(f, aff), img(f.copy(), aff), device="cpu")
    assert res.summary["displacement_max_vox"] < 0.1


def test_one_extreme_voxel_changes_dice_by_less_than_a_hundredth(pair):
    f, fl, m, ml = pair["arrays"]
    aff = pair["affine"]
    base = register_pair(img(f, aff), img(m, aff), fixed_labels=img(fl, aff), moving_labels=img(ml, aff),
                         device="cpu")
    spiked = m.copy()
    spiked[5, 20, 18] = 1e6  # a metal artefact
    hit = register_pair(img(f, aff), img(spiked, aff), fixed_labels=img(fl, aff),
                        moving_labels=img(ml, aff), device="cpu")
    assert abs(hit.dice_after - base.dice_after) < 0.01, (base.dice_after, hit.dice_after)


def test_affine_only_with_mutual_information_across_contrasts(pair, tmp_path):
    f, fl, m, ml = pair["arrays"]
    aff = pair["affine"]
    inverted = np.where(m > 0, 1.2 - m, 0).astype(np.float32)  # another "modality"
    res = register_pair(img(f, pair["affine"]), img(inverted, pair["affine"]),
                        fixed_labels=img(fl, aff), moving_labels=img(ml, aff), method="affine", similarity="mi", device="cpu",
                        out_dir=tmp_path / "a", overview=False)
    s = res.summary
    assert s["method"] == "affine" and s["affine"]["similarity"] == "mi"
    assert s["dice_after"]["mean"] > s["dice_before"]["mean"] + 0.1
    assert (tmp_path / "a" / "affine.txt").is_file()


def test_masks_restrict_the_similarity(pair, tmp_path):
    f, fl, m, ml = pair["arrays"]
    fmask = save(tmp_path / "fm.nii.gz", (fl > 0).astype(np.uint8), pair["affine"])
    mmask = save(tmp_path / "mm.nii.gz", (ml > 0).astype(np.uint8), pair["affine"])
    res = register_pair(pair["fixed"], pair["moving"], fixed_labels=pair["fixed_labels"],
                        moving_labels=pair["moving_labels"], fixed_mask=fmask, moving_mask=mmask, device="cpu")
    assert res.summary["fixed_mask"] == str(fmask)
    assert res.dice_after > res.dice_before + 0.1


def test_a_ct_window_replaces_percentile_scaling(pair):
    f, fl, m, ml = pair["arrays"]
    aff = pair["affine"]
    hu = lambda x: (x * 1500 - 1000).astype(np.float32)  # noqa: E731  intensities as Hounsfield units
    res = register_pair(img(hu(f), pair["affine"]), img(hu(m), pair["affine"]),
                        fixed_labels=img(fl, aff), moving_labels=img(ml, aff), fixed_window=(-500, 800), moving_window=(-500, 800),
                        device="cpu", method="affine")
    assert res.dice_after > res.dice_before + 0.1


# --------------------------------------------------------------------------- every parameter checked first
def _fails(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("psmamba: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, needle", [
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--iters", "5", "--lambda", "-1"], "--lambda"),
    (["--iters", "5", "--lambda", "nan"], "--lambda"),
    (["--lambda", "1"], "--lambda"),
    (["--method", "bogus"], "--method"),
    (["--method", "io+affine"], "--method"),
    (["--method", "network+io", "--checkpoint", "/no/such/net.pt"], "/no/such/net.pt"),
    (["--method", "io", "--iters", "3"], "--iters"),
    (["--affine-only", "--method", "io"], "--affine-only"),
    (["--io-iterations", "5", "5"], "--io-iterations"),
    (["--io-iterations", "5", "-5", "0"], "--io-iterations"),
    (["--sigma-field", "-1"], "--sigma-field"),
    (["--fixed-window", "800", "-500"], "--fixed-window"),
    (["--method", "network", "--model-size", "48", "64", "1"], "--model-size must be an integer >= 2, got 1"),
])
def test_bad_flags_fail_before_any_work(pair, tmp_path, capsys, extra, needle):
    out = tmp_path / "o"
    err = _fails(capsys, ["register", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
                          "--out", str(out), *extra])
    assert needle in err
    assert not out.exists()


def test_bad_images_are_named(pair, tmp_path, capsys):
    f, fl, m, ml = pair["arrays"]
    aff = pair["affine"]
    singular = aff.copy()
    singular[2, 2] = 0.0
    cases = {
        "flat.nii.gz": (np.full(SHAPE, 3.0, np.float32), aff, "constant"),
        "singular.nii.gz": (m, singular, "singular"),
        "nan.nii.gz": (np.where(m > 0.6, np.nan, m).astype(np.float32), aff, "NaN"),
        "tiny.nii.gz": (m[15:21, 15:21, 15:21].copy(), aff, "too small"),
    }
    for name, (data, a, needle) in cases.items():
        path = save(tmp_path / name, data, a)
        for role in ("--moving", "--fixed"):
            other = "--fixed" if role == "--moving" else "--moving"
            key = "fixed" if other == "--fixed" else "moving"
            err = _fails(capsys, ["register", role, str(path), other, str(pair[key]), "--out", str(tmp_path / "o")])
            assert name in err and needle in err, err
    assert not (tmp_path / "o").exists()
    # label maps of two protocols that share no code
    other = save(tmp_path / "other_seg.nii.gz", (ml > 0).astype(np.int16) * 7, aff)
    err = _fails(capsys, ["register", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
                          "--fixed-labels", str(pair["fixed_labels"]), "--moving-labels", str(other),
                          "--out", str(tmp_path / "o")])
    assert "other_seg.nii.gz" in err and "share no" in err
    # a mask that is not on its image's grid
    mask = save(tmp_path / "mask.nii.gz", np.ones((20, 20, 20), np.uint8), aff)
    err = _fails(capsys, ["register", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
                          "--fixed-mask", str(mask), "--out", str(tmp_path / "o")])
    assert "mask.nii.gz" in err
