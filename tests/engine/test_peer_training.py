"""Training the paper's peer networks through the engine: presets, Table 1 defaults, checkpoints.

``model.preset`` may name a peer (``transmorph``, ...); its loss, lambda and learning rate of the
paper's Table 1 (``PEER_TRAINING``) are then the defaults of ``loss`` / ``optim``, and a value the
config sets wins. Two tiny runs (VoxelMorph: NCC + lambda; MambaMorph: Dice on labels + 0.1 x the
velocity's gradient L2) go through ``psmamba train`` / ``fit``; their checkpoints then register
and evaluate through the same commands as PSMamba-Net's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from psmamba.cli import main
from psmamba.config import LossConfig, OptimConfig, config_from_dict, load_train_config
from psmamba.errors import PsmambaError
from psmamba.models import load_checkpoint
from psmamba.models.peers import PEER_TRAINING, PEERS
from psmamba.models.peers.hparams import TransMorphConfig

from _folders import make_folder  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_peer_config(root: Path, cache: Path, preset: str, out: Path, **sections) -> dict:
    cfg = {
        "model": {"preset": preset},
        # 6 subjects of 24x16x16: 3 train (6 ordered pairs), 2 validation, 1 test
        "data": {"source": "folder", "root": str(root), "val_fraction": 0.34, "max_val_pairs": 1,
                 "options": {"cache_dir": str(cache), "test": 0.17}},
        "optim": {"epochs": 1},
        "run": {"out": str(out), "threads": 1, "progress": False, "log_every": 1, "tensorboard": False,
                "max_steps": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("scans"))


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_peer_preset_brings_its_table_1_training(name):
    cfg = load_train_config(None, [f"model.preset={name}"])
    assert type(cfg.model_config()) is type(PEERS[name].config) and cfg.model_name == name
    for section, values in PEER_TRAINING[name].items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_explicit_settings_win_over_the_peer_defaults(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "transmatch", "drop_path": 0.1},
                                    "loss": {"reg_weight": 2.0}, "optim": {"poly_power": 0.8}}))
    cfg = load_train_config(path, ["optim.lr=0.001"])
    assert cfg.loss.reg_weight == 2.0 and cfg.optim.lr == 1e-3 and cfg.optim.poly_power == 0.8
    assert cfg.loss.similarity == "lncc" and cfg.optim.amsgrad is True  # the rest: TransMatch's
    assert cfg.model_config().drop_path == 0.1
    # PSMamba-Net's presets keep the dataclass defaults (the paper's protocol)
    paper = config_from_dict({"model": "paper"})
    assert paper.loss == LossConfig() and paper.optim == OptimConfig()
    # a resolved config (as stored in checkpoints) reads back to itself
    mm = config_from_dict({"model": {"preset": "mambamorph"}})
    assert config_from_dict(mm.to_dict()) == mm
    assert (mm.loss.similarity, mm.loss.regularise, mm.loss.dice_weight, mm.loss.reg_weight) == ("none", "velocity", 1.0, 0.1)


def test_bad_peer_settings_fail_naming_the_source():
    with pytest.raises(PsmambaError, match=r"--set: model.preset transmorph: .*unknown key.*chanels"):
        load_train_config(None, ["model.preset=transmorph", "model.chanels=3"])
    with pytest.raises(PsmambaError, match="unknown model.preset 'transmorf'.*transmorph"):
        load_train_config(None, ["model.preset=transmorf"])
    with pytest.raises(PsmambaError, match="similarity=none needs loss.dice_weight"):
        load_train_config(None, ["model.preset=mambamorph", "loss.dice_weight=0"])
    assert TransMorphConfig().window == (5, 6, 7)


def test_velocity_regularisation_needs_a_network_that_outputs_it(tmp_path, data_dir):
    cfg = tiny_peer_config(data_dir, tmp_path / "cache", "voxelmorph", tmp_path / "run", loss={"regularise": "velocity"})
    from psmamba.engine.train import fit

    with pytest.raises(PsmambaError, match="outputs no velocity field"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_the_objective_regularises_the_velocity_not_the_ddf():
    from psmamba.engine.objective import Objective

    g = torch.Generator().manual_seed(0)
    warped, fixed = torch.rand(1, 1, 8, 8, 8, generator=g), torch.rand(1, 1, 8, 8, 8, generator=g)
    ddf, velocity = torch.zeros(1, 3, 8, 8, 8), torch.rand(1, 3, 8, 8, 8, generator=g)
    labels = (fixed > 0.5).long()
    obj = Objective(LossConfig(similarity="none", regularise="velocity", reg_weight=0.1, dice_weight=1.0))
    total, parts = obj(warped, ddf, fixed, labels, labels, velocity=velocity)
    from psmamba.losses import Diffusion

    assert float(parts["similarity"]) == 0.0
    assert float(parts["regulariser"]) == pytest.approx(float(Diffusion()(velocity)))
    assert float(total) == pytest.approx(0.1 * float(parts["regulariser"]) + float(parts["dice_loss"]), rel=1e-6)
    with pytest.raises(PsmambaError, match="outputs its velocity"):
        obj(warped, ddf, fixed, labels, labels)


# --------------------------------------------------------------------------- training end to end
def test_two_peers_train_then_register_and_evaluate(tmp_path, data_dir):
    """VoxelMorph through ``psmamba train --set model.preset=...``, MambaMorph through ``fit``:
    2 steps each; their checkpoints name the peer, reload strictly, and ``evaluate`` /
    ``register --checkpoint`` run them on the run's own validation split."""
    from psmamba.engine.train import fit

    cache = tmp_path / "cache"
    base = tiny_peer_config(data_dir, cache, "paper", tmp_path / "unused")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(base))
    vxm_out = tmp_path / "voxelmorph"
    assert main(["train", "--config", str(cfg_path), "--set", "model.preset=voxelmorph", "--out", str(vxm_out)]) == 0
    mm_out = tmp_path / "mambamorph"
    result = fit(tiny_peer_config(data_dir, cache, "mambamorph", mm_out, model={"mamba_backend": "reference"}))
    assert result.steps == 2 and result.best_checkpoint is not None and result.best_metric == "val_dice"

    for name, out in (("voxelmorph", vxm_out), ("mambamorph", mm_out)):
        for file in ("best.pt", "last.pt"):
            model, ckpt = load_checkpoint(out / file)
            assert ckpt["config"]["model"] == name and type(model).__name__ == type(PEERS[name].config).__name__[:-6]
        stored = yaml.safe_load((out / "config.yaml").read_text())
        assert stored["model"]["preset"] == name
        for key, value in PEER_TRAINING[name]["loss"].items():
            assert stored["loss"][key] == value
        with (out / "metrics.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        train = [r for r in rows if r["split"] == "train"]
        assert len(train) == 2 and all(np.isfinite(float(r["loss"])) for r in train)
        if name == "mambamorph":  # Dice on labels + 0.1 x regulariser; no image term
            assert all(float(r["similarity"]) == 0.0 and float(r["dice_loss"]) > 0 for r in train)
            assert float(train[0]["lr"]) == pytest.approx(1e-4)
        else:
            assert all(-1.0 <= float(r["similarity"]) <= 0.0 and float(r["dice_loss"]) == 0 for r in train)

        # evaluate on the run's own validation split (the checkpoint knows its data set; its test split is 1 volume)
        res_csv = tmp_path / f"{name}.csv"
        assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--out", str(res_csv), "--quiet",
                     "--no-hd95", "--device", "cpu", "--split", "val"]) == 0
        with res_csv.with_name(f"{name}_pairs.csv").open(newline="") as fh:
            pairs = list(csv.DictReader(fh))
        assert pairs and all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in pairs)

    # register one pair with a peer's checkpoint
    reg = tmp_path / "reg"
    assert main(["register", "--fixed", str(data_dir / "sub0.nii.gz"), "--moving", str(data_dir / "sub1.nii.gz"),
                 "--moving-labels", str(data_dir / "sub1_seg.nii.gz"), "--fixed-labels", str(data_dir / "sub0_seg.nii.gz"),
                 "--checkpoint", str(mm_out / "best.pt"), "--out", str(reg), "--device", "cpu", "--no-overview"]) == 0
    summary = json.loads((reg / "summary.json").read_text())
    assert summary["dice_after"]["mean"] >= 0.0 and (reg / "ddf.nii.gz").is_file()
    # a resumed peer run needs the same (resolved) settings
    assert main(["train", "--config", str(cfg_path), "--set", "model.preset=voxelmorph", "--out", str(vxm_out),
                 "--resume", "--set", "run.max_steps=3"]) == 0
    assert torch.load(vxm_out / "last.pt", weights_only=True)["training"]["step"] == 3


def test_mambamorph_outputs_the_velocity_its_field_integrates():
    from psmamba import spatial
    from psmamba.models import RegistrationOutput, build_model
    from psmamba.models.peers._common import VelocityOutput

    torch.manual_seed(0)
    net = build_model("mambamorph", mamba_backend="reference").eval()
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = net(moving, fixed)
        warped, ddf = out  # still a (warped, ddf) pair
        assert isinstance(out, RegistrationOutput) and isinstance(out, VelocityOutput)
        assert out.velocity.shape == ddf.shape and float(out.velocity.abs().max()) > 0
        torch.testing.assert_close(spatial.integrate_svf(out.velocity, net.config.int_steps), ddf)
        # on a padded grid the velocity is cropped back like the field
        odd = net(moving[..., :15, :13, :14], fixed[..., :15, :13, :14])
        assert odd.velocity.shape == odd.ddf.shape == (1, 3, 15, 13, 14)
    assert not hasattr(build_model("voxelmorph")(moving, fixed), "velocity")
