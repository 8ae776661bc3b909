"""psmamba train / psmamba.engine.train: protocol defaults, exact resume, early one-line failures.

Every run here trains the conv-baseline preset with c = 1 on six 24x16x16 NIfTI volumes (three
for training: 6 ordered pairs per epoch), one thread, so a step takes a fraction of a second.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from psmamba.cli import main
from psmamba.config import TrainConfig, config_to_dict, load_train_config
from psmamba.engine.distributed import epoch_order, rank_batches, steps_per_epoch
from psmamba.engine.trainer import poly_lr
from psmamba.errors import PsmambaError

from _folders import SHAPE, make_folder  # noqa: E402  (tests/ is on sys.path under pytest)


def tiny_config(root: Path, cache: Path, **sections) -> dict:
    cfg = {
        "model": {"preset": "baseline_conv", "channels": 1},
        # 6 subjects: 3 train (6 ordered pairs), 2 validation, 1 test
        "data": {"source": "folder", "root": str(root), "val_fraction": 0.34, "max_val_pairs": 1,
                 "options": {"cache_dir": str(cache), "test": 0.17}},
        "optim": {"epochs": 2},
        "run": {"threads": 1, "progress": False, "log_every": 1, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("scans"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir, cache_dir) -> Path:
    """An uninterrupted 2-epoch run through the CLI; the other tests compare against it."""
    base = tmp_path_factory.mktemp("ref")
    cfg = write_yaml(base / "cfg.yaml", tiny_config(data_dir, cache_dir))
    assert main(["train", "--config", str(cfg), "--out", str(base / "run")]) == 0
    return base / "run"


# --------------------------------------------------------------------------- config
def test_defaults_are_the_paper_protocol():
    cfg = TrainConfig()
    assert (cfg.loss.similarity, cfg.loss.window, cfg.loss.regulariser, cfg.loss.reg_weight) == ("lncc", 9, "diffusion", 1.0)
    assert cfg.loss.dice_weight == 0.0
    assert (cfg.optim.lr, cfg.optim.amsgrad, cfg.optim.poly_power, cfg.optim.epochs) == (1e-4, True, 0.8, 30)
    assert (cfg.optim.batch_size, cfg.optim.accumulate, cfg.data.pairs) == (1, 1, "all")
    assert cfg.run.amp == "none" and cfg.run.device == "auto"
    assert cfg.model_config().channels == 4 and cfg.model_config().sir_iters == 3


def test_poly_lr_matches_the_paper_formula():
    # lr_m = lr * (1 - (m - 1) / M) ** 0.8, m = 1..M
    for m in range(1, 31):
        assert poly_lr(1e-4, m - 1, 30) == pytest.approx(1e-4 * (1 - (m - 1) / 30) ** 0.8, rel=1e-12)


def test_overrides_parse_yaml_values_and_unknown_keys_name_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"optim": {"lr": 0.001}, "model": "paper_diff"})
    cfg = load_train_config(path, ["optim.epochs=3", "run.amp=bf16", "data.resize=[32, 40, 32]", "model.channels=2"])
    assert cfg.optim.lr == 0.001 and cfg.optim.epochs == 3 and cfg.run.amp == "bf16"
    assert cfg.data.resize == [32, 40, 32]
    assert cfg.model_config().diff is True and cfg.model_config().channels == 2
    bad = write_yaml(tmp_path / "bad.yaml", {"optim": {"learning_rate": 1e-4}})
    with pytest.raises(PsmambaError) as err:
        load_train_config(bad)
    msg = str(err.value)
    assert "optim.learning_rate" in msg and str(bad) in msg and "\n" not in msg
    with pytest.raises(PsmambaError, match="model.chanels"):
        load_train_config(None, ["model.chanels=2"])
    with pytest.raises(PsmambaError, match="unknown key 'trainer'"):
        load_train_config(write_yaml(tmp_path / "top.yaml", {"trainer": {}}))
    with pytest.raises(PsmambaError, match="loss.window must be odd"):
        load_train_config(None, ["loss.window=8"])


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),  # a ZeroDivisionError at step 1 before
    ("optim.poly_power=.nan", "optim.poly_power must be a finite number, got nan"),
    ("optim.betas=[a, b]", "optim.betas must be a finite number, got 'a'"),  # a bare ValueError before
    ("run.out=[1]", "run.out must be a text, got [1]"),
    ("run.tensorboard=maybe", "run.tensorboard must be true or false, got 'maybe'"),
    ("data.val_fraction=[0.2]", "data.val_fraction must be a finite number, got [0.2]"),
    ("loss.reg_weight=yes", "loss.reg_weight must be a finite number, got True"),  # YAML 1.1: yes is true
    ("data.num_workers=1.5", "data.num_workers must be an integer, got 1.5"),
    ("data.size=huge", "data.size must be one of small, full; got 'huge'"),  # named neither key nor file
])
def test_every_config_value_has_its_type(override, needle):
    with pytest.raises(PsmambaError) as err:
        load_train_config(None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_yaml_1_1_readings_are_what_was_meant(tmp_path):
    """A folder named 2024 is read as a number, 3e-4 (no dot: YAML 1.1) as a text."""
    cfg = load_train_config(None, ["run.out=2024", "data.source=folder", "data.root=17"])
    assert cfg.run.out == "2024" and cfg.data.root == "17"
    cfg = load_train_config(None, ["optim.lr=3e-4", "optim.betas=[9e-1, 0.99]"])  # the README's example
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.99)
    cfg = load_train_config(write_yaml(tmp_path / "c.yaml", {"optim": {"lr": "1e-4"}, "run": {"max_minutes": "5e1"}}))
    assert cfg.optim.lr == 1e-4 and cfg.run.max_minutes == 50.0


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_train_config(None, ["optim.betas=[0.8, 0.9]", "data.options={shape: [32, 32, 32]}", "data.source=synth"])
    path = write_yaml(tmp_path / "round.yaml", config_to_dict(cfg))
    assert config_to_dict(load_train_config(path)) == config_to_dict(cfg)


@pytest.mark.parametrize("sections, needle", [
    ({"data": {"resize": [7, 7, 7]}}, "data.resize 7x7x7: model baseline_conv needs one axis of more than 16 voxels"),
    ({"optim": {"batch_size": 1000}}, "= 1000 pairs a step, more than the 6 training pair(s)"),  # 23 GB before
    ({"model": {"preset": "transmorph", "embed_dim": 10}}, "model transmorph: cannot be built from this config"),
])
def test_run_time_failures_come_before_any_output(tmp_path, data_dir, cache_dir, capsys, sections, needle):
    """They came at the first forward pass, after config.yaml and metrics.csv: a rerun was then
    refused as 'already holds a training run', and --resume found no last.pt."""
    cfg = tiny_config(data_dir, cache_dir)
    if sections.get("model", {}).get("preset") == "transmorph":
        cfg["model"] = {}
    for name, values in sections.items():
        cfg[name].update(values)
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_threads_beyond_the_cores_and_a_start_without_checkpoint(tmp_path):
    import os

    with pytest.raises(PsmambaError, match="run.threads must be at most the"):  # a segfault before
        load_train_config(None, [f"run.threads={(os.cpu_count() or 1) + 1}"])
    from psmamba.engine.train import check_output_dir

    (tmp_path / "metrics.csv").write_text("step\n")
    with pytest.raises(PsmambaError, match="stopped before its first checkpoint.*delete the folder"):
        check_output_dir(tmp_path, resume=False)
    with pytest.raises(PsmambaError, match="no training checkpoint .* start it again in a new --out"):
        check_output_dir(tmp_path, resume=True)


# --------------------------------------------------------------------------- pair order
def test_pair_order_is_seeded_per_epoch_and_sharding_is_split_invariant():
    assert epoch_order(10, 0, seed=1) == epoch_order(10, 0, seed=1)
    assert epoch_order(10, 0, seed=1) != epoch_order(10, 1, seed=1)
    assert sorted(epoch_order(10, 3, seed=1)) == list(range(10))
    order = epoch_order(7, 0, seed=0)
    assert steps_per_epoch(7, 2) == 4
    for step in range(4):
        one = rank_batches(order, step, batch_size=1, accumulate=2, world_size=1, rank=0)  # 1 process, accumulate 2
        batched = rank_batches(order, step, batch_size=2, accumulate=1, world_size=1, rank=0)  # 1 process, batch 2
        two = [rank_batches(order, step, batch_size=1, accumulate=1, world_size=2, rank=r) for r in (0, 1)]
        assert [i for mb in one for i in mb] == batched[0] == [two[0][0][0], two[1][0][0]]
    # the last step wraps around to the start of the order instead of running short
    assert rank_batches(order, 3, batch_size=2, accumulate=1, world_size=1, rank=0)[0] == [order[6], order[0]]


# --------------------------------------------------------------------------- runs
def test_two_epochs_end_to_end(reference_run):
    run = reference_run
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.csv"):
        assert (run / name).is_file(), name
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    rows = csv_rows(run / "metrics.csv")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [int(r["step"]) for r in train] == list(range(1, 13))  # 6 pairs per epoch, 2 epochs
    assert len(val) == 2 and all(0.0 <= float(r["dice"]) <= 1.0 for r in val)
    assert all(np.isfinite(float(r["loss"])) and float(r["pairs_per_s"]) > 0 for r in train)
    # per-epoch poly decay
    assert [float(r["lr"]) for r in train] == pytest.approx([1e-4] * 6 + [poly_lr(1e-4, 1, 2)] * 6, rel=1e-5)
    # best.pt is an ordinary model checkpoint, loadable with strict=True, carrying the selection
    from psmamba.models import load_checkpoint

    model, ckpt = load_checkpoint(run / "best.pt")
    assert model.config.channels == 1 and ckpt["train_summary"]["best"]["metric"] == "val_dice"
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["training"]
    assert (last["epoch"], last["step"], last["step_in_epoch"]) == (2, 12, 0)
    assert "optimizer" in last and "scheduler" in last and len(last["rng"]) == 1
    assert last["optimizer"]["param_groups"][0]["amsgrad"] is True


def test_stop_mid_epoch_then_resume_gives_the_same_weights(tmp_path, data_dir, cache_dir, reference_run):
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(data_dir, cache_dir))
    out = tmp_path / "run"
    # stop after 8 of 12 steps: in the middle of epoch 2
    assert main(["train", "--config", str(cfg), "--out", str(out), "--set", "run.max_steps=8"]) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["training"]
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, 8, 2)
    # continue from the stored config (no --config): max_steps is not carried over
    assert main(["train", "--out", str(out), "--resume"]) == 0
    ref, got = weights(reference_run / "last.pt"), weights(out / "last.pt")
    assert ref.keys() == got.keys()
    # Not bit for bit: a process that resumes at step 9 runs those steps "cold" while the
    # uninterrupted one runs them after 8 others, and PyTorch's CPU kernels then differ in the
    # last bits (two cold uninterrupted runs agree exactly; measured 2e-5 after 4 steps on this
    # chaotic c = 1 net). A skipped or repeated step shows in the per-step losses checked below.
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-4, msg=k)
    ref_opt = torch.load(reference_run / "last.pt", weights_only=True)["training"]["optimizer"]["state"]
    got_opt = torch.load(out / "last.pt", weights_only=True)["training"]["optimizer"]["state"]
    for i in ref_opt:
        torch.testing.assert_close(got_opt[i]["max_exp_avg_sq"], ref_opt[i]["max_exp_avg_sq"], rtol=1e-2, atol=1e-6)
    # the CSV holds each step once, with the same losses
    ref_rows = [r for r in csv_rows(reference_run / "metrics.csv") if r["split"] == "train"]
    got_rows = [r for r in csv_rows(out / "metrics.csv") if r["split"] == "train"]
    assert [(r["step"], r["loss"], r["lr"]) for r in got_rows] == [(r["step"], r["loss"], r["lr"]) for r in ref_rows]
    # the time column continues across the resume (it restarted at 0)
    times = [float(r["time"]) for r in csv_rows(out / "metrics.csv")]
    assert times == sorted(times), times


def _wait_for_rows(csv_path: Path, n: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
        if csv_path.is_file() and sum(1 for r in csv_rows(csv_path) if r["split"] == "train") >= n:
            return
        time.sleep(0.05)
    raise AssertionError("training did not reach the expected step in time")


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)], ids=["sigterm", "sigkill"]
)
def test_killed_mid_epoch_then_resume_gives_the_same_weights(sig, tmp_path, data_dir, cache_dir, reference_run):
    """A real process killed during epoch 1: SIGTERM finishes the step and saves last.pt
    (exit 130); SIGKILL leaves the last periodic checkpoint (checkpoint_every=1), intact because
    checkpoints are written atomically. Either way --resume ends on the reference weights."""
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(data_dir, cache_dir, run={"checkpoint_every": 1}))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "psmamba", "train", "--config", str(cfg), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        _wait_for_rows(out / "metrics.csv", 2, proc)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["training"]
    assert 1 <= state["step"] < 12  # stopped part-way
    assert main(["train", "--out", str(out), "--resume"]) == 0
    ref, got = weights(reference_run / "last.pt"), weights(out / "last.pt")
    for k in ref:  # not bit for bit: see test_stop_mid_epoch_then_resume_gives_the_same_weights
        torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-4, msg=k)
    steps = [int(r["step"]) for r in csv_rows(out / "metrics.csv") if r["split"] == "train"]
    assert steps == list(range(1, 13))


def test_fit_accepts_in_memory_pairs_and_dice_supervision(tmp_path):
    from psmamba.engine.train import fit

    g = torch.Generator().manual_seed(0)
    vols = [torch.nn.functional.avg_pool3d(torch.rand(1, 1, *SHAPE, generator=g), 5, 1, 2)[0] for _ in range(2)]
    pairs = [{"moving": vols[i], "fixed": vols[1 - i], "moving_labels": (vols[i] > vols[i].mean()).long(),
              "fixed_labels": (vols[1 - i] > vols[1 - i].mean()).long()} for i in range(2)]
    cfg = tiny_config(tmp_path, tmp_path, optim={"epochs": 1}, loss={"dice_weight": 1.0},
                      run={"out": str(tmp_path / "mem"), "images": True, "tensorboard": True, "amp": "bf16"})
    with pytest.warns(UserWarning, match="CUDA only"):  # mixed precision is for CUDA; fp32 here
        result = fit(cfg, train_data=pairs, val_data=pairs[:1])
    assert result.steps == 2 and result.stopped is None and result.best_metric == "val_dice"
    train = [r for r in csv_rows(tmp_path / "mem" / "metrics.csv") if r["split"] == "train"]
    assert all(float(r["dice_loss"]) > 0 for r in train)
    # TensorBoard holds the CSV's scalars plus the slice and grid images
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "mem" / "tb"))
    events.Reload()
    for tag in ("train/loss", "train/lr", "train/pairs_per_s", "train/dice_loss", "val/dice", "val/folding_percent"):
        assert tag in events.Tags()["scalars"], tag
    assert {"val/slices", "val/grid"} <= set(events.Tags()["images"])
    # data.resize: the network learns on another grid, recorded for register
    cfg = tiny_config(tmp_path, tmp_path, optim={"epochs": 1}, data={"resize": [20, 12, 12]},
                      run={"out": str(tmp_path / "small")})
    fit(cfg, train_data=pairs[:1])
    assert torch.load(tmp_path / "small" / "last.pt", weights_only=True)["image_size"] == [20, 12, 12]


def test_the_paper_architecture_trains(tmp_path):
    """One step of the real thing (SMB blocks, Mamba layers, K = 2 refinement passes), tiny."""
    from psmamba.engine.train import fit

    g = torch.Generator().manual_seed(0)
    vols = [torch.rand(1, 17, 16, 16, generator=g) for _ in range(2)]
    cfg = tiny_config(tmp_path, tmp_path, model={"preset": "paper", "channels": 1, "sir_iters": 2},
                      optim={"epochs": 1}, run={"out": str(tmp_path / "paper")})
    result = fit(cfg, train_data=[{"moving": vols[0], "fixed": vols[1]}])
    assert result.steps == 1
    row = csv_rows(tmp_path / "paper" / "metrics.csv")[0]
    assert np.isfinite(float(row["loss"])) and -1.0 <= float(row["similarity"]) <= 0.0
    from psmamba.models import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "paper" / "last.pt")
    assert model.config.sir_block == "smb" and model.config.sir_iters == 2


def test_synthetic_pairs_are_new_each_epoch_and_reproducible(tmp_path):
    from psmamba.data.training import SynthEpochs
    from psmamba.engine.train import fit

    a, b = SynthEpochs(3, seed=5, shape=SHAPE), SynthEpochs(3, seed=5, shape=SHAPE)
    first = a[0]["moving"].clone()
    assert torch.equal(first, b[0]["moving"])  # same seed, same pair
    a.set_epoch(1)
    assert not torch.equal(first, a[0]["moving"])  # a new epoch draws new pairs
    b.set_epoch(1)
    assert torch.equal(a[0]["moving"], b[0]["moving"])
    cfg = tiny_config(tmp_path, tmp_path, data={"source": "synth", "root": None, "synth_pairs": 2,
                                                "max_val_pairs": 1, "options": {"shape": list(SHAPE)}},
                      optim={"epochs": 1}, run={"out": str(tmp_path / "synth")})
    result = fit(cfg)
    assert result.steps == 2 and result.best_checkpoint is not None


# --------------------------------------------------------------------------- early failures
def _fails_cleanly(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("psmamba: error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_unknown_key_fails_early_without_output(tmp_path, capsys, data_dir, cache_dir):
    cfg = tiny_config(data_dir, cache_dir)
    cfg["optim"]["lrate"] = 1e-3
    path = write_yaml(tmp_path / "typo.yaml", cfg)
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "out")], "optim.lrate", str(path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, needle", [
    ("shape", "differs from image shape"),
    ("empty", "holds no label"),
])
def test_an_unusable_volume_fails_before_training_without_output(tmp_path, capsys, damage, needle):
    """A label map of another shape (or one with no label) in the data: training ran steps, then
    failed at that volume and left a folder that blocked the rerun; now nothing is written."""
    root = make_folder(tmp_path / "scans")
    bad = root / "sub5_seg.nii.gz"
    lab = np.asarray(nib.load(str(bad)).dataobj)
    lab = lab[:, :, :-2] if damage == "shape" else np.zeros_like(lab)
    nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2.0, 2.0, 1.0])), str(bad))
    cfg = tiny_config(root, tmp_path / "cache", data={"val_fraction": 0.0, "options": {"cache_dir": str(tmp_path / "cache"), "test": 0.0}})
    path = write_yaml(tmp_path / "c.yaml", cfg)
    err = _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "out")], needle)
    assert "sub5_seg" in err
    assert not (tmp_path / "out").exists()


def test_validation_pairs_with_no_shared_label_do_not_stop_training(tmp_path):
    """Validation maps of two protocols (codes 3 and 4): `labels names no label code` after the
    training steps, leaving a folder that blocked the rerun. Now such a pair has no Dice, and
    with no Dice at all best.pt is chosen by validation loss (it was never written)."""
    root = make_folder(tmp_path / "scans")
    for k, code in ((4, 3), (5, 4)):
        path = root / f"sub{k}_seg.nii.gz"
        img = nib.load(str(path))
        lab = np.asarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.where(lab > 0, code, 0).astype(np.int16), img.affine), str(path))
    rows = ["image,label,split"] + [f"sub{k}.nii.gz,sub{k}_seg.nii.gz,{'train' if k < 3 else 'test' if k == 3 else 'val'}"
                                    for k in range(6)]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(root / "list.csv", tmp_path / "cache", optim={"epochs": 1},
                      data={"source": "manifest", "val_fraction": 0.0})
    path = write_yaml(tmp_path / "c.yaml", cfg)
    with pytest.warns(UserWarning, match="best.pt is chosen by validation loss"):
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    val = [r for r in csv_rows(tmp_path / "out" / "metrics.csv") if r["split"] == "val"]
    assert val and all(r["dice"] in ("", "nan") for r in val)
    best = torch.load(tmp_path / "out" / "best.pt", map_location="cpu", weights_only=False)  # chosen by loss
    assert best["train_summary"]["best"]["metric"] == "val_loss"


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_run_failing_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys, data_dir, cache_dir,
                                                                 monkeypatch, out_exists):
    """A failure after the first steps (here: in validation) left config.yaml and metrics.csv,
    and the rerun was refused ('stopped before its first checkpoint ... delete the folder')."""
    from psmamba.engine.trainer import Trainer

    def boom(self):
        raise PsmambaError("validation failed")

    monkeypatch.setattr(Trainer, "validate_and_select", boom)
    out = tmp_path / "run"
    if out_exists:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    path = write_yaml(tmp_path / "c.yaml", tiny_config(data_dir, cache_dir))
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(out)], "validation failed")
    assert (sorted(p.name for p in out.iterdir()) == ["notes.txt"]) if out_exists else not out.exists()
    monkeypatch.undo()
    assert main(["train", "--config", str(path), "--out", str(out), "--set", "optim.epochs=1"]) == 0


def test_missing_data_folder_fails_early_without_output(tmp_path, capsys, cache_dir):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "no-such-folder", cache_dir))
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "out")], "no-such-folder")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_fails_early(tmp_path, capsys, data_dir, cache_dir):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(data_dir, cache_dir))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(blocker / "run")], "not a folder")
    if os.geteuid() != 0:  # root writes anywhere: the permission case only means something for users
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(locked / "run")], "not writable")
            assert not (locked / "run").exists()
        finally:
            locked.chmod(0o700)


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path, capsys, data_dir, cache_dir, reference_run):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(data_dir, cache_dir))
    before = sorted(p.name for p in reference_run.iterdir())
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(reference_run)], "--resume")
    assert sorted(p.name for p in reference_run.iterdir()) == before
    _fails_cleanly(capsys, ["train", "--out", str(tmp_path / "none"), "--resume"], "last.pt")
    # a resumed run must train the same thing
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(reference_run), "--resume",
                            "--set", "optim.lr=0.5"], "optim.lr")
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(reference_run), "--resume",
                            "--set", "model.channels=2"], "model settings differ")
    from psmamba.engine.train import _check_resumable

    # the same network written differently (a default spelt out, another scan backend) resumes:
    # it was refused before, the model sections compared as texts
    stored = config_to_dict(load_train_config(path))
    spelt = load_train_config(path, ["model.d_state=16", "model.mamba_backend=reference"])
    _check_resumable(spelt, stored, reference_run / "last.pt", 1)


@pytest.mark.parametrize("damage, needle", [
    (lambda t, c: t.pop("config"), "training.config is not a mapping"),
    (lambda t, c: t.pop("optimizer"), "training.optimizer is not a mapping"),
    (lambda t, c: t.update(epoch="two"), "training.epoch is not a whole number"),
    (lambda t, c: c.pop("state_dict"), "no state_dict"),
])
def test_resume_from_a_damaged_last_pt_fails_in_one_line(tmp_path, capsys, reference_run, damage, needle):
    """KeyError/AttributeError/ValueError tracebacks before, some after the data was built."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    damage(ckpt["training"], ckpt)
    torch.save(ckpt, run / "last.pt")
    before = sorted(p.name for p in run.iterdir())
    _fails_cleanly(capsys, ["train", "--out", str(run), "--resume"], "a damaged training checkpoint", needle)
    assert sorted(p.name for p in run.iterdir()) == before


def test_dice_loss_without_labels_fails_early(tmp_path, capsys, cache_dir):
    root = tmp_path / "nolabels"
    make_folder(root, n=3)
    for p in root.glob("*_seg.nii.gz"):
        p.unlink()
    path = write_yaml(tmp_path / "c.yaml", tiny_config(root, cache_dir, loss={"dice_weight": 1.0},
                                                       data={"val_fraction": 0.0, "options": {"cache_dir": str(cache_dir), "test": 0}}))
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "out")], "dice_weight")
    assert not (tmp_path / "out").exists()


def test_grad_scaler_falls_back_on_torch_without_torch_amp_gradscaler(monkeypatch):
    """torch 2.1/2.2 (admitted by the package) have no torch.amp.GradScaler: fp16 training uses
    torch.cuda.amp.GradScaler there instead of failing."""
    import warnings

    from psmamba.engine.trainer import grad_scaler

    assert isinstance(grad_scaler(torch.device("cpu")), torch.amp.GradScaler)
    monkeypatch.delattr(torch.amp, "GradScaler")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CUDA scaler disables itself without CUDA, with a warning
        assert isinstance(grad_scaler(torch.device("cuda")), torch.cuda.amp.GradScaler)


def test_resume_with_more_epochs_trains_longer_on_the_new_schedule(tmp_path, capsys, reference_run):
    """``--resume --set optim.epochs=N``: a finished run continues to N epochs with the poly decay
    of N epochs (its stored rate was zero); the change is recorded and config.yaml follows it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = weights(run / "last.pt")
    # not above the epochs already trained: nothing to do, said before anything changes
    _fails_cleanly(capsys, ["train", "--out", str(run), "--resume", "--set", "optim.epochs=1"],
                   "optim.epochs=1", "already trained 2 epochs", "above 2")
    assert all(torch.equal(before[k], v) for k, v in weights(run / "last.pt").items())
    assert main(["train", "--out", str(run), "--resume", "--set", "optim.epochs=4"]) == 0
    assert "optim.epochs 2 -> 4 at step 12" in capsys.readouterr().out
    train = [r for r in csv_rows(run / "metrics.csv") if r["split"] == "train"]
    assert [int(r["step"]) for r in train] == list(range(1, 25))
    expect = [1e-4] * 6 + [poly_lr(1e-4, 1, 2)] * 6 + [poly_lr(1e-4, 2, 4)] * 6 + [poly_lr(1e-4, 3, 4)] * 6
    assert [float(r["lr"]) for r in train] == pytest.approx(expect, rel=1e-5)
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["training"]
    assert (last["epoch"], last["step"], last["config"]["optim"]["epochs"]) == (4, 24, 4)
    change = last["metrics"]["schedule_changes"]
    assert [(c["step"], c["epochs_before"], c["epochs"]) for c in change] == [(12, 2, 4)]
    assert change[0]["lr"] == pytest.approx(poly_lr(1e-4, 2, 4), rel=1e-6)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 4
    assert not all(torch.equal(before[k], v) for k, v in weights(run / "last.pt").items())
    # resumed with a config file whose epochs differ (the original launch command, say): refused
    # as before, with the way to ask for a new schedule; nothing changes
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["optim"]["epochs"] = 2
    path = write_yaml(tmp_path / "orig.yaml", cfg)
    _fails_cleanly(capsys, ["train", "--config", str(path), "--out", str(run), "--resume"],
                   "optim.epochs is 2", "trained with 4", "--set optim.epochs=2")
    # resumed again as stored (4 epochs, all done): nothing more to train, nothing changes
    assert main(["train", "--out", str(run), "--resume"]) == 0
    again = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["training"]
    assert again["step"] == 24 and len(again["metrics"]["schedule_changes"]) == 1


def test_resume_mid_epoch_with_more_epochs_changes_the_rate_at_once(tmp_path, data_dir, cache_dir):
    """Stopped in the middle of epoch 2 of 2 and resumed with optim.epochs=3: the rest of epoch 2
    already runs at the 3-epoch schedule's rate, epoch 3 at its next one."""
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(data_dir, cache_dir))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--set", "run.max_steps=8"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--set", "optim.epochs=3"]) == 0
    train = [r for r in csv_rows(out / "metrics.csv") if r["split"] == "train"]
    assert [int(r["step"]) for r in train] == list(range(1, 19))
    expect = [1e-4] * 6 + [poly_lr(1e-4, 1, 2)] * 2 + [poly_lr(1e-4, 1, 3)] * 4 + [poly_lr(1e-4, 2, 3)] * 6
    assert [float(r["lr"]) for r in train] == pytest.approx(expect, rel=1e-5)
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["training"]
    assert (state["epoch"], state["step"]) == (3, 18)
    assert [(c["step"], c["epoch"]) for c in state["metrics"]["schedule_changes"]] == [(8, 1)]
