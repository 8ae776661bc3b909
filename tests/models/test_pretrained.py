"""The shipped network (psmamba.models.pretrained): checksum, strict loading, the default pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from psmamba.errors import PsmambaError
from psmamba.models import pretrained


def test_the_shipped_network_is_installed_checked_and_loads_strictly():
    assert pretrained.DEFAULT in pretrained.SHIPPED
    entry = pretrained.SHIPPED[pretrained.DEFAULT]
    path = pretrained.verify()  # the SHA-256 recorded in the code
    assert path == entry.path and path.stat().st_size <= 20e6
    assert pretrained.sha256_of(path) == entry.sha256
    model, ckpt = pretrained.load_shipped()
    assert tuple(ckpt["image_size"]) == entry.grid
    assert ckpt["shipped"]["weights_dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if torch.is_floating_point(v))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    from psmamba.models import get_config

    assert ckpt["config"] == get_config(entry.preset).to_dict() | {"mamba_backend": ckpt["config"]["mamba_backend"]}
    assert not model.training
    # it predicts a finite, non-trivial field at its grid
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand((1, 1, *entry.grid), generator=g), torch.rand((1, 1, *entry.grid), generator=g)
    with torch.no_grad():
        ddf = model(x, y).ddf
    assert ddf.shape == (1, 3, *entry.grid) and torch.isfinite(ddf).all() and ddf.abs().max() > 0


@pytest.fixture
def copy_of_shipped(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    entry = pretrained.SHIPPED[pretrained.DEFAULT]
    shutil.copy(entry.path, folder / entry.file)
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", folder)
    return folder / entry.file


def test_a_damaged_shipped_file_is_refused_in_one_line(copy_of_shipped):
    data = bytearray(copy_of_shipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy_of_shipped.write_bytes(bytes(data))
    with pytest.raises(PsmambaError, match="damaged or replaced") as err:
        pretrained.load_shipped()
    assert str(copy_of_shipped) in str(err.value) and "\n" not in str(err.value)


def test_a_missing_shipped_file_is_named(copy_of_shipped):
    copy_of_shipped.unlink()
    assert not pretrained.available()
    with pytest.raises(PsmambaError, match="missing"):
        pretrained.verify()


def test_without_a_shipped_network_the_default_is_affine_io_and_network_needs_a_checkpoint(monkeypatch):
    from psmamba.engine.register import build_pipeline

    monkeypatch.setattr(pretrained, "DEFAULT", None)
    assert build_pipeline(None).name == "affine+io"
    with pytest.raises(PsmambaError, match="--checkpoint"):
        build_pipeline("network+io")


def test_the_default_pipeline_runs_the_shipped_network():
    from psmamba.engine.register import build_pipeline

    plan = build_pipeline(None)
    assert plan.name == "affine+network+io"
    net = plan.method.stages[0]
    assert net.checkpoint == f"shipped:{pretrained.DEFAULT}" and net.guard
    assert net.grid == pretrained.SHIPPED[pretrained.DEFAULT].grid
    alone = build_pipeline("network").method
    assert alone.name == "network" and not alone.guard  # asked for alone: its field as it is
    assert build_pipeline("affine+io").name == "affine+io"


def test_register_records_the_shipped_network_and_its_check(tmp_path):
    import psmamba
    from psmamba.io import Image

    rng = np.random.default_rng(0)
    base = np.zeros((40, 48, 40), np.float32)
    base[8:32, 10:38, 8:32] = 1.0
    base[14:26, 18:30, 14:26] = 2.0
    from scipy.ndimage import gaussian_filter, shift

    fixed = gaussian_filter(base, 1.0) + 0.01 * rng.standard_normal(base.shape).astype(np.float32)
    moving = shift(fixed, (1.5, -1.0, 0.5), order=1)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    res = psmamba.register(Image(fixed, aff, None, None), Image(moving.astype(np.float32), aff, None, None),
                           out=tmp_path / "o", overview=False)
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["method"] == "affine+network+io"
    assert s["checkpoint"] == f"shipped:{pretrained.DEFAULT}"
    assert np.isfinite(res.ddf).all()


def test_network_guard_keeps_a_field_only_when_it_improves_the_similarity():
    from psmamba.engine.methods import Network
    from psmamba.spatial import warp

    class Shift(torch.nn.Module):  # a "network" that always predicts the same shift
        def __init__(self, d):
            super().__init__()
            self.d = d

        def forward(self, moving, fixed):
            from psmamba.models.net import RegistrationOutput

            ddf = torch.zeros((1, 3, *fixed.shape[2:]))
            ddf[:, 0] = self.d
            return RegistrationOutput(warp(moving, ddf), ddf)

    g = torch.Generator().manual_seed(0)
    fixed = torch.nn.functional.avg_pool3d(torch.rand((1, 1, 24, 24, 24), generator=g), 3, 1, 1)
    moving = warp(fixed, torch.full((1, 3, 24, 24, 24), 0.0).index_fill_(1, torch.tensor([0]), -2.0))
    good = Network(Shift(2.0), guard=True)
    assert torch.equal(good(moving, fixed), Shift(2.0)(moving, fixed).ddf) and good.check["accepted"]
    bad = Network(Shift(2.0), guard=True)
    assert bad(fixed, fixed).abs().max() == 0 and not bad.check["accepted"]  # an image against itself
    assert Network(Shift(2.0))(fixed, fixed).abs().max() == 2.0  # no guard: the field as predicted


def test_export_writes_half_precision_weights_that_load_strictly(tmp_path):
    from psmamba.models import build_model, load_checkpoint, save_checkpoint

    model = build_model("baseline_conv", channels=1, sir_iters=1)
    save_checkpoint(tmp_path / "best.pt", model, image_size=[16, 16, 16], train_summary={"best": {"value": 0.5}})
    out = pretrained.export_weights(tmp_path / "best.pt", tmp_path / "w" / "net.pt")
    loaded, ckpt = load_checkpoint(out)
    assert ckpt["image_size"] == [16, 16, 16] and ckpt["train_summary"]["best"]["value"] == 0.5
    for k, v in model.state_dict().items():
        assert torch.allclose(loaded.state_dict()[k], v.half().float()), k
    save_checkpoint(tmp_path / "bare.pt", model)
    with pytest.raises(PsmambaError, match="image_size"):
        pretrained.export_weights(tmp_path / "bare.pt", tmp_path / "w" / "bare.pt")



def test_export_destinations_fail_in_one_line(tmp_path, capsys):
    """Folders, files in the way and the checkpoint itself (fp16 over the fp32 training file,
    silently) were tracebacks or accepted; the command's errors said "error:", not "psmamba: error:"."""
    from psmamba.models import build_model, save_checkpoint

    save_checkpoint(tmp_path / "best.pt", build_model("baseline_conv", channels=1, sir_iters=1), image_size=[16] * 3)
    (tmp_path / "afile").write_text("x")
    before = (tmp_path / "best.pt").read_bytes()
    for out, needle in ((tmp_path, "must name a file, not a folder"), ("", "OUT is empty"),
                        (tmp_path / "afile" / "x.pt", "afile is not a folder"),
                        (tmp_path / "best.pt", "is CHECKPOINT itself")):
        assert pretrained._main(["export", str(tmp_path / "best.pt"), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("psmamba: error: export") and needle in err and "\n" not in err, err
    assert (tmp_path / "best.pt").read_bytes() == before


def test_network_inverse_is_computed_on_its_grid_and_undoes_the_field():
    from psmamba.engine.methods import Network
    from psmamba.spatial import warp

    class Smooth(torch.nn.Module):  # a "network" predicting a smooth field on its grid
        def forward(self, moving, fixed):
            from psmamba.models.net import RegistrationOutput

            size = fixed.shape[2:]
            z = torch.linspace(0, 3.14159, size[0]).view(-1, 1, 1)
            ddf = torch.zeros((1, 3, *size))
            ddf[:, 0] = 1.5 * torch.sin(z).expand(*size)
            ddf[:, 1] = 0.8
            return RegistrationOutput(warp(moving, ddf), ddf)

    net = Network(Smooth(), grid=(12, 14, 12))
    img = torch.rand((1, 1, 36, 42, 36))
    fwd = net(img, img)
    assert fwd.shape == (1, 3, 36, 42, 36) and net.inverse is not None and net.inverse.shape == fwd.shape
    back = fwd + warp(net.inverse, fwd, padding="border")  # inverse o forward
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    # the field reaches 4.5 voxels; its inverse, found on the 3x coarser grid, is off by < 0.15 voxel
    assert back[inner].abs().max() < 0.15 and back[inner].abs().mean() < 0.03, back[inner].abs().max()


def test_network_space_places_the_training_grid_on_the_fixed_field_of_view():
    from psmamba.engine.methods import NetworkSpace, training_space

    model, ckpt = pretrained.load_shipped()
    space = model.psmamba_space  # load_model reads it from the checkpoint's training config
    assert space == training_space(ckpt) and space.shape == pretrained.SHIPPED[pretrained.DEFAULT].grid
    # the demo's 160x192x160 1-mm grid (voxel centres 159 x 191 x 159 mm apart) in 48x64x48 voxels
    assert np.allclose(space.extent, (159.0, 191.0, 159.0)) and np.allclose(space.spacing, (159 / 47, 191 / 63, 159 / 47))
    finer = space.resized((96, 128, 96))  # --model-size: the same extent, more voxels
    assert np.allclose(finer.extent, space.extent) and finer.shape == (96, 128, 96)
    # placed centre on centre, RAS axes, whatever the fixed file's voxel order
    lia = np.array([[-1.0, 0, 0, 90], [0, 0, 1, -126], [0, -1, 0, 72], [0, 0, 0, 1]])
    a_n = space.place(lia, (182, 218, 182))
    centre = lia @ np.array([90.5, 108.5, 90.5, 1.0])
    assert np.allclose(a_n @ np.array([23.5, 31.5, 23.5, 1.0]), centre)
    assert np.allclose(a_n[:3, :3], np.diag(space.spacing))
    # networks trained on other data keep resizing (no space); bad spaces are refused
    assert training_space({"image_size": [32, 32, 32], "train_summary": {"config": {"data": {"source": "folder"}}}}) is None
    assert training_space({"image_size": [32, 40, 32], "train_summary": {"config": {"data": {"source": "demo", "size": "small"}}}}) \
        == NetworkSpace((64, 80, 64), (2.5, 2.5, 2.5)).resized((32, 40, 32))
    with pytest.raises(PsmambaError, match="network space"):
        NetworkSpace((48, 64, 1), (1.0, 1.0, 1.0))


def _reoriented(data, affine, codes):
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(codes))
    return (np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt)),
            affine @ nib.orientations.inv_ornt_aff(ornt, data.shape), ornt)


def test_the_network_sees_the_same_brain_whatever_the_files_voxel_order_and_field_of_view():
    """The shipped network on a demo pair stored RAS, LIA (FreeSurfer's order) and with a wider
    field of view: the same world map and the same Dice (it saw rotated, shrunken brains before)."""
    from psmamba.data.demo import build_demo
    from psmamba.engine.register import register_pair
    from psmamba.io import Image

    demo = build_demo("small")
    moving, fixed = (demo.load(v) for v in demo.pairs["test_hard"][0])
    arrays = [np.asarray(x) for x in (fixed.image, moving.image, fixed.labels, moving.labels)]
    aff = demo.affine
    results = {}
    for name in ("RAS", "LIA", "wide"):
        if name == "RAS":
            data, a = arrays, aff
        elif name == "LIA":
            data = [_reoriented(x, aff, ("L", "I", "A"))[0] for x in arrays]
            a = _reoriented(arrays[0], aff, ("L", "I", "A"))[1]
        else:  # 12 more voxels of background on every side
            data = [np.pad(x, 12) for x in arrays]
            a = aff.copy()
            a[:3, 3] -= aff[:3, :3] @ np.array([12.0, 12.0, 12.0])
        img = [Image(np.asarray(x), a, None, f"{name}{i}") for i, x in enumerate(data)]
        res = register_pair(img[0], img[1], fixed_labels=img[2], moving_labels=img[3], method="network", overview=False)
        # the displacement in world mm at the original voxels
        world = np.einsum("ij,j...->i...", a[:3, :3], res.ddf)
        if name == "LIA":
            _, _, ornt = _reoriented(arrays[0], aff, ("L", "I", "A"))
            import nibabel as nib

            back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("L", "I", "A")),
                                                   nib.orientations.io_orientation(aff))
            world = np.stack([nib.orientations.apply_orientation(c, back) for c in world])
        elif name == "wide":
            world = world[:, 12:-12, 12:-12, 12:-12]
        results[name] = (world, res.dice_after, res.dice_before)
        assert res.summary["method_settings"]["space"]["axes"] == "RAS"
    ras, lia, wide = results["RAS"], results["LIA"], results["wide"]
    assert ras[1] > ras[2]  # it registers
    assert abs(lia[1] - ras[1]) < 1e-4 and np.abs(lia[0] - ras[0]).max() < 1e-3
    assert abs(wide[1] - ras[1]) < 2e-3 and np.abs(wide[0] - ras[0]).mean() < 0.05


class _WorldShift(torch.nn.Module):
    """A "network" that predicts one world translation (mm along R, A, S) in its grid's voxels."""

    def __init__(self, mm, spacing):
        super().__init__()
        self.vox = [m / s for m, s in zip(mm, spacing)]

    def forward(self, moving, fixed):
        from psmamba.models.net import RegistrationOutput

        ddf = torch.zeros((1, 3, *fixed.shape[2:]), dtype=fixed.dtype)
        for i, v in enumerate(self.vox):
            ddf[:, i] = v
        return RegistrationOutput(moving, ddf)


def test_a_network_in_its_space_returns_fixed_voxel_displacements_for_any_fixed_affine():
    from psmamba.engine.methods import Network, NetworkSpace

    space = NetworkSpace((10, 12, 10), (4.0, 3.0, 4.0))
    mm = np.array([5.0, -3.0, 2.0])
    rot = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    for lin in (np.diag([1.0, 1.0, 1.0]), np.diag([0.8, 1.2, 2.5]), np.array([[-1.0, 0, 0], [0, 0, 1.5], [0, -1.0, 0]]),
                rot @ np.diag([1.0, 1.5, 1.0])):
        a = np.eye(4)
        a[:3, :3] = lin
        a[:3, 3] = (7.0, -20.0, 3.0)
        net = Network(_WorldShift(mm, space.spacing), space=space)
        img = torch.rand((1, 1, 20, 22, 18))
        ddf = net(img, img, affine=a)
        world = np.einsum("ij,jdhw->idhw", lin, ddf[0].numpy())
        assert np.allclose(world, mm[:, None, None, None], atol=1e-4)
        inv = np.einsum("ij,jdhw->idhw", lin, net.inverse[0].numpy())
        assert np.allclose(inv, -mm[:, None, None, None], atol=1e-3)
    # no affine, or no space: the images' grid resized, as before
    plain = Network(_WorldShift(mm, space.spacing), grid=(10, 12, 10), space=None)
    assert plain.space is None and plain(img, img, affine=a).shape == (1, 3, 20, 22, 18)


def test_a_chain_passes_the_affine_only_to_stages_that_take_it_and_a_rejected_network_keeps_its_start():
    from psmamba.engine.methods import Chain, Identity, Network, NetworkSpace, RegistrationMethod

    class Old(RegistrationMethod):  # a stage written before affine= existed
        name = "old"

        def __call__(self, moving, fixed, init=None, mask=None):
            return init + 1.0

    class Start(RegistrationMethod):  # a start that varies along an axis
        name = "start"

        def run(self, moving, fixed, init):
            z = torch.linspace(-2, 2, fixed.shape[2]).view(1, 1, -1, 1, 1)
            return z.expand(1, 3, *fixed.shape[2:]).clone()

    space = NetworkSpace((8, 8, 8), (3.0, 3.0, 3.0))  # 21 mm: smaller than the image
    img = torch.nn.functional.avg_pool3d(torch.rand((1, 1, 24, 24, 24), generator=torch.Generator().manual_seed(0)), 3, 1, 1)
    a = np.eye(4)
    net = Network(_WorldShift((30.0, 0, 0), space.spacing), space=space, guard=True)  # a bad field: rejected
    chain = Chain([Start(), net, Old()])
    out = chain(img, img, affine=a)
    start = Start()(img, img)
    assert not net.check["accepted"] and torch.allclose(out, start + 1.0)
    assert torch.allclose(Chain([Identity(), Old()])(img, img), torch.ones((1, 3, 24, 24, 24)))
