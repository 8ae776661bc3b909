"""Pair lists, subject-wise splits, the lazy pair Dataset and loader, and synthetic pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from psmamba.data.dataset import PairDataset, make_loader
from psmamba.data.pairs import all_pairs, atlas_pairs, id_pairs, read_pair_list, split_subjects
from psmamba.data.preprocess import CropOrPad, MinMax, Pipeline
from psmamba.data.synth import SynthConfig, SynthPairDataset, random_ddf, random_label_map, synth_pair
from psmamba.data.volume import ArrayVolumeRef, Volume
from psmamba.errors import PsmambaError


def test_all_and_atlas_pairs():
    ids = [f"S{i:02d}" for i in range(1, 31)]
    pairs = all_pairs(ids)
    assert len(pairs) == 30 * 29 and len(set(pairs)) == len(pairs)
    assert pairs[0] == ("S01", "S02") and all(m != f for m, f in pairs)
    assert len(all_pairs(ids[:10])) == 90  # the paper's LPBA40 test set: 10x9
    assert atlas_pairs("S01", ids[:4]) == [("S02", "S01"), ("S03", "S01"), ("S04", "S01")]
    assert atlas_pairs("S01", ids[:3], "from_atlas") == [("S01", "S02"), ("S01", "S03")]
    assert len(atlas_pairs("S01", ids[:3], "both")) == 4
    with pytest.raises(PsmambaError):
        atlas_pairs("S01", ids, "sideways")


def test_read_pair_list(tmp_path):
    (tmp_path / "p.csv").write_text("moving,fixed\na,b\nb,a\n")
    assert id_pairs(read_pair_list(tmp_path / "p.csv"), known_ids=["a", "b"]) == [("a", "b"), ("b", "a")]
    (tmp_path / "p.json").write_text(json.dumps([{"moving": "a", "fixed": "b"}, ["b", "c"]]))
    rows = read_pair_list(tmp_path / "p.json")
    assert [(r.moving, r.fixed) for r in rows] == [("a", "b"), ("b", "c")]
    with pytest.raises(PsmambaError, match="p.json pair 2: names volume 'c'"):
        id_pairs(rows, known_ids=["a", "b"])
    (tmp_path / "q.json").write_text(json.dumps([{"moving": "a"}]))
    with pytest.raises(PsmambaError, match="q.json pair 1: needs 'moving' and 'fixed'"):
        read_pair_list(tmp_path / "q.json")



def test_pair_lists_saved_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors start the file with a BOM: "no 'moving' column" before."""
    (tmp_path / "p.csv").write_text("moving,fixed\na,b\n", encoding="utf-8-sig")
    assert id_pairs(read_pair_list(tmp_path / "p.csv"), known_ids=["a", "b"]) == [("a", "b")]
    (tmp_path / "p.json").write_text(json.dumps([["a", "b"]]), encoding="utf-8-sig")
    assert [(r.moving, r.fixed) for r in read_pair_list(tmp_path / "p.json")] == [("a", "b")]


def test_split_by_subject_never_mixes_and_is_seeded():
    ids = [f"sub{s}_scan{k}" for s in range(10) for k in range(3)]
    subjects = {i: i.split("_")[0] for i in ids}
    a = split_subjects(ids, subjects, val=0.2, test=0.3, seed=7)
    assert a == split_subjects(ids, subjects, val=0.2, test=0.3, seed=7)
    assert a != split_subjects(ids, subjects, val=0.2, test=0.3, seed=8)
    parts = {k: {subjects[i] for i in v} for k, v in a.items()}
    assert len(parts["test"]) == 3 and len(parts["val"]) == 2 and len(parts["train"]) == 5
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert sorted(sum(a.values(), [])) == sorted(ids)
    assert len(split_subjects(ids, subjects, val=1, test=2)["test"]) == 6  # counts of subjects, 3 scans each
    with pytest.raises(PsmambaError):
        split_subjects(ids, subjects, val=6, test=6)


def _refs(n=3, shape=(10, 12, 8)):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.uniform(0, 100, shape).astype(np.float32)
        lab = rng.integers(0, 4, shape).astype(np.uint8)
        out.append(ArrayVolumeRef(Volume(f"v{i}", img, np.eye(4) * [2, 2, 2, 1], lab if i != 2 else None)))
    return out


def test_pair_dataset_items_and_loader(tmp_path):
    refs = _refs()
    pipe = Pipeline([CropOrPad((8, 8, 8), centre="volume"), MinMax()])
    ds = PairDataset(refs, all_pairs(["v0", "v1", "v2"]), pipeline=pipe, cache_dir=tmp_path, keep_in_memory=1)
    assert len(ds) == 6
    item = ds[0]
    assert item["moving"].shape == (1, 8, 8, 8) and item["moving"].dtype == torch.float32
    assert item["fixed"].shape == (1, 8, 8, 8)
    assert item["moving_labels"].dtype == torch.int64 and item["moving_labels"].shape == (1, 8, 8, 8)
    assert item["moving_id"] == "v0" and item["fixed_id"] == "v1"
    assert item["moving_affine"].shape == (4, 4) and item["moving_affine"].dtype == torch.float64
    assert float(item["moving"].max()) == pytest.approx(1.0)
    assert "moving_labels" not in ds[1]  # v0 -> v2: v2 has no labels, so neither side is served
    assert len(ds._lru) <= 1  # streaming: at most keep_in_memory volumes are held
    loader = make_loader(PairDataset(refs[:2], all_pairs(["v0", "v1"]), pipeline=pipe, cache_dir=tmp_path),
                         batch_size=2, seed=1)
    batch = next(iter(loader))
    assert batch["moving"].shape == (2, 1, 8, 8, 8) and len(batch["moving_id"]) == 2
    order = [b["moving_id"] for b in make_loader(ds, seed=3)]
    assert order == [b["moving_id"] for b in make_loader(ds, seed=3)]  # seeded shuffle
    with pytest.raises(PsmambaError, match="'v7'"):
        PairDataset(refs, [("v0", "v7")])
    with pytest.raises(IndexError):
        ds[6]


def test_synth_pair_shapes_seed_and_consistency():
    cfg = SynthConfig(num_labels=6, svf_std=2.0, svf_scale=4, bias_scale=4)
    p = synth_pair(shape=(16, 20, 12), config=cfg, seed=5)
    for t in (p.moving, p.fixed):
        assert t.shape == (1, 1, 16, 20, 12) and t.dtype == torch.float32
        assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert p.moving_labels.dtype == torch.long and int(p.moving_labels.max()) < 6
    assert p.moving_ddf.shape == (1, 3, 16, 20, 12)
    q = synth_pair(shape=(16, 20, 12), config=cfg, seed=5)
    assert torch.equal(p.moving, q.moving) and torch.equal(p.fixed_labels, q.fixed_labels)
    r = synth_pair(shape=(16, 20, 12), config=cfg, seed=6)
    assert not torch.equal(p.moving, r.moving)
    assert not torch.equal(p.moving_labels, p.fixed_labels)  # two different deformations
    # the label maps are the common map warped by the returned fields
    from psmamba.spatial import warp

    base = random_label_map((16, 20, 12), 6, cfg.label_scale, seed=0)
    s = synth_pair(base, config=cfg, seed=1)
    assert torch.equal(s.fixed_labels, warp(base, s.fixed_ddf, mode="nearest", padding="border"))
    # the intensity follows the labels: voxels of one label are far more alike than the image
    img, lab = s.fixed[0, 0], s.fixed_labels[0, 0]
    within = np.mean([float(img[lab == k].std()) for k in torch.unique(lab) if int((lab == k).sum()) > 20])
    assert within < 0.6 * float(img.std())
    with pytest.raises(PsmambaError):
        synth_pair(torch.zeros(4, 4, 4))  # float labels
    with pytest.raises(PsmambaError):
        synth_pair()


def test_random_ddf_is_smooth_and_invertible():
    from psmamba.metrics import folding_percent

    ddf = random_ddf((24, 24, 24), std=2.0, scale=6, seed=0)
    assert ddf.shape == (1, 3, 24, 24, 24) and float(ddf.abs().max()) > 0.5
    assert folding_percent(ddf[0]) == 0.0  # diffeomorphic by construction


def test_synth_dataset():
    ds = SynthPairDataset(3, shape=(12, 12, 12), config=SynthConfig(num_labels=4, svf_scale=4, bias_scale=4), seed=2)
    a, b = ds[1], ds[1]
    assert torch.equal(a["moving"], b["moving"]) and a["moving"].shape == (1, 12, 12, 12)
    assert a["moving_labels"].shape == (1, 12, 12, 12)
    maps = [torch.randint(0, 3, (12, 12, 12))]
    ds2 = SynthPairDataset(2, label_maps=maps, config=SynthConfig(svf_scale=4, bias_scale=4))
    assert int(ds2[0]["fixed_labels"].max()) <= 2
    with pytest.raises(IndexError):
        ds[3]


def test_synth_options_must_be_finite_numbers():
    """svf_std .nan gave null deformations and a validation Dice of 1.0; errors name data.options.*."""
    from psmamba.data.synth import SynthConfig

    for kwargs, needle in (({"svf_std": float("nan")}, "data.options.svf_std must be a finite number, got nan"),
                           ({"noise_std": float("inf")}, "data.options.noise_std must be a finite number"),
                           ({"mean_range": (0.1, "x")}, "data.options.mean_range must be a finite number"),
                           ({"num_labels": 0}, "data.options.num_labels must be >= 1")):
        with pytest.raises(PsmambaError, match=needle):
            SynthConfig(**kwargs)


def test_split_sizes_from_numpy_scalars_and_splits_that_leave_nothing():
    import numpy as np

    from psmamba.data.pairs import split_subjects

    ids = [f"s{i}" for i in range(5)]
    assert len(split_subjects(ids, val=np.float32(0.4), test=0)["val"]) == 2  # read as 0 before
    assert split_subjects(ids, val=2, test=0, seed=np.int64(3)) == split_subjects(ids, val=2, test=0, seed=3)
    for kw, needle in (({"val": 5, "test": 0}, "none left to train on"), ({"val": 1.5}, "whole count"),
                       ({"val": float("nan")}, "fraction in"), ({"val": "1"}, "fraction in")):
        with pytest.raises(PsmambaError, match=needle):
            split_subjects(ids, **kw)
