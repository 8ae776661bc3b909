"""Smoke tests of the benchmark harness (``benchmarks/``) on tiny volumes.

The real runs are ``python -m benchmarks [--quick]``; these check that the pieces fit and that
the fairness rules hold (same pair order for every network, validation-based selection, the
mambapy swap keeps the function, ANTs' field lands in psmamba's convention).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from benchmarks import common
from benchmarks.bench_accuracy import AccuracyData, _Vol, accuracy_markdown, run_accuracy, write_accuracy
from benchmarks.bench_speed import (
    SPEED_COLUMNS,
    _rows,
    child_probe,
    child_timing,
    expected_seconds,
    run_speed,
    speed_markdown,
    write_speed,
)
from benchmarks.peers import LEARNED, METHODS, PEER_NETS, VoxelMorphPeer, available, build_method
from psmamba.models import RegistrationOutput
from psmamba.spatial import warp


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Shift(nn.Module):
    """A one-parameter 'network': a constant displacement along axis 0."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.zeros(()))

    def forward(self, moving, fixed):
        ddf = torch.zeros(moving.shape[0], 3, *moving.shape[2:], dtype=moving.dtype)
        ddf = ddf + torch.stack([self.t, torch.zeros(()), torch.zeros(())]).view(1, 3, 1, 1, 1)
        return RegistrationOutput(warp(moving, ddf), ddf)


def _blob(shape=(24, 24, 24), centre=(12.0, 12.0, 12.0), radius=6.0) -> np.ndarray:
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    r2 = sum((g[i] - centre[i]) ** 2 for i in range(3))
    return np.exp(-r2 / (2 * radius**2)).astype(np.float32)


# --------------------------------------------------------------------------- common
def test_parse_size_and_fmt():
    assert common.parse_size("160x192x160") == (160, 192, 160)
    assert common.parse_size("64") == (64, 64, 64)
    with pytest.raises(ValueError):
        common.parse_size("1x2")
    assert common.fmt(float("nan")) == "-" and common.fmt(1.23456, 2) == "1.23"


def test_train_network_learns_and_selects_on_validation():
    fixed = torch.from_numpy(_blob((16, 16, 16), (8.0, 8.0, 8.0), 4.0))[None, None]
    moving = torch.from_numpy(_blob((16, 16, 16), (10.0, 8.0, 8.0), 4.0))[None, None]  # fixed p <- moving p + 2
    model = Shift()
    seen = []

    def val_fn(m) -> float:  # validation score: peaks at the second check, then drops
        seen.append(float(m.t.detach()))
        return [0.1, 0.9, 0.2][len(seen) - 1]

    rep = common.train_network(model, [(moving, fixed)], steps=30, lr=0.1, window=5, val_fn=val_fn, val_every=10)
    assert rep.losses[-1] < rep.losses[0]
    assert [v["step"] for v in rep.validation] == [10, 20, 30]
    assert rep.selected_step == 20
    assert float(model.t.detach()) == pytest.approx(seen[1])  # the selected checkpoint was loaded back
    assert 0.3 < seen[-1] < 3.0  # moving towards the true shift of +2 voxels


def test_machine_info_and_markdown_table():
    info = common.machine_info()
    assert info["logical_cores"] >= 1 and info["torch"] and "load_average" in info
    table = common.markdown_table(["a", "b"], [[1, "x|y"]])
    assert table.splitlines()[1] == "|---|---:|" and "x\\|y" in table


# --------------------------------------------------------------------------- peers
def test_voxelmorph_peer_pads_and_crops():
    torch.manual_seed(0)
    net = VoxelMorphPeer().eval()
    m, f = torch.rand(1, 1, 20, 24, 18), torch.rand(1, 1, 20, 24, 18)
    with torch.no_grad():
        out = net(m, f)
    assert out.ddf.shape == (1, 3, 20, 24, 18) and out.warped.shape == m.shape
    assert torch.allclose(out.warped, warp(m, out.ddf))


def test_mambapy_block_matches_psmamba_layer():
    pytest.importorskip("mambapy")
    from benchmarks.peers import mambapy_block_like, swap_in_mambapy
    from psmamba.models import build_model
    from psmamba.nn.mamba import Mamba

    torch.manual_seed(0)
    layer = Mamba(16, backend="reference")
    with torch.no_grad():  # make the state and the gate matter (the default init is close to a no-op)
        layer.dt_proj.bias.add_(1.0)
    block = mambapy_block_like(layer)
    x = torch.randn(2, 50, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), layer(x), rtol=1e-4, atol=1e-5)
    model = build_model("paper", channels=1, mamba_backend="reference").eval()
    n_layers = sum(isinstance(m, Mamba) for m in model.modules())
    mv, fx = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = model(mv, fx).ddf
        assert swap_in_mambapy(model) == n_layers > 0
        after = model(mv, fx).ddf  # the whole model runs with the swapped-in layers
    assert not any(isinstance(m, Mamba) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-6)


def test_build_method_names_and_availability():
    from psmamba.models.peers import PEERS

    assert set(METHODS) == {"paper", "paper_diff", "baseline_conv", "voxelmorph", "paper_mambapy", "ants_syn",
                            *PEER_NETS}
    assert sorted(PEER_NETS.values()) == sorted(PEERS) and set(PEER_NETS) <= set(LEARNED)  # every peer, once
    assert PEER_NETS["voxelmorph_psmamba"] == "voxelmorph"  # "voxelmorph" stays MONAI's network
    assert type(build_method("voxelmorph_psmamba")).__module__ == "psmamba.models.peers.voxelmorph"
    ok, why = available("nope")
    assert not ok and "unknown" in why
    a, b = build_method("baseline_conv", seed=5), build_method("baseline_conv", seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # same seed, same weights


@pytest.mark.slow
def test_ants_field_is_in_psmamba_convention():
    pytest.importorskip("ants")
    from benchmarks.peers import AntsSyN

    fixed = _blob((32, 32, 32), centre=(16.0, 16.0, 16.0), radius=5.0)
    moving = _blob((32, 32, 32), centre=(14.0, 16.0, 16.0), radius=5.0)  # fixed p <- moving p + (-2, 0, 0)
    out = AntsSyN(spacing=(2.0, 1.0, 1.0), type_of_transform="Translation", threads=1)(
        torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None])
    # a translation of -2 voxels along axis 0 (4 mm at 2 mm voxels), none along the others
    centre = out.ddf[0, :, 16, 16, 16]
    assert centre[0].item() == pytest.approx(-2.0, abs=0.2)
    assert abs(centre[1].item()) < 0.2 and abs(centre[2].item()) < 0.2
    assert float(((out.warped[0, 0].numpy() - fixed) ** 2).mean()) < 0.1 * float(((moving - fixed) ** 2).mean())


# --------------------------------------------------------------------------- speed harness
def test_speed_children_and_report(tmp_path):
    sizes = [[24, 20, 20], [40, 20, 20]]  # padded to 32 and 48 along axis 0
    probe = child_probe({"method": "voxelmorph", "sizes": sizes[::-1], "train_sizes": [sizes[0]],
                         "inputs": "random", "threads": 1})
    assert probe["status"] == "ok" and list(probe["infer"]) == [str(s) for s in sizes]  # ascending
    small, train = probe["infer"][str(sizes[0])], probe["train"][str(sizes[0])]
    assert small["status"] == "ok" and train["status"] == "ok", (small, train)
    assert probe["params"] > 0 and small["flops"] > 0 and 0 < small["peak_rss_mib"] and small["seconds"] > 0
    assert probe["infer"][str(sizes[1])]["flops"] > small["flops"]  # more voxels, more FLOPs
    timing = child_timing({"methods_by_size": {str(sizes[0]): ["voxelmorph"]}, "train_sizes": [sizes[0]],
                           "inputs": "random", "repeats": 2, "train_repeats": 1, "threads": 1})
    key = str(sizes[0])
    assert timing["status"] == "ok" and not timing["errors"][key]
    assert len(timing["infer"][key]["voxelmorph"]["wall"]) == 2 and len(timing["train"][key]["voxelmorph"]["wall"]) == 1
    # a method never probed nor timed, and a skipped one, still get a row each
    result = {"settings": {"sizes": sizes, "methods": ["voxelmorph", "baseline_conv", "ants_syn"],
                           "repeats": 2, "train_sizes": [sizes[0]], "train_repeats": 1, "inputs": "random",
                           "threads": 1, "mem_limit_gib": None},
              "skipped": {"ants_syn": "not installed"}, "probes": [probe], "timings": [timing],
              "load_before": [1.0], "load_after": [1.0], "seconds": 1.0}
    result["rows"] = _rows(result, result["settings"]["methods"], [tuple(s) for s in sizes])
    assert [r["method"] for r in result["rows"]] == ["voxelmorph", "baseline_conv", "ants_syn"] * 2
    first = result["rows"][0]
    assert first["status"] == "ok" and first["infer_s"] > 0 and first["train_step_s"] > 0 and first["runs"] == 2
    assert result["rows"][3]["infer_s"] is None if "infer_s" in result["rows"][3] else True  # not timed at 40x20x20
    assert result["rows"][1]["status"] == "missing" and result["rows"][2]["status"] == "skipped"
    files = write_speed(result, common.machine_info(), "python -m benchmarks --test", tmp_path, "_t")
    assert all(p.is_file() and p.stat().st_size > 0 for p in files)
    md = speed_markdown(result, common.machine_info(), "cmd")
    assert "conv baseline" in md and "VoxelMorph" in md and "skipped" in md
    header = (tmp_path / "speed_t.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == SPEED_COLUMNS
    assert json.loads((tmp_path / "speed_t.json").read_text())["command"] == "python -m benchmarks --test"


def test_peak_rss_is_resettable():
    if not common.reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak-RSS mark (no /proc/self/clear_refs, or it has no effect)")
    import mmap

    base = common.peak_rss_mib()
    # 256 MiB mapped and touched directly (not through malloc, which may keep freed memory: the
    # CLI tests before this one set that up for the process); large margins, RSS counters may lag
    block = mmap.mmap(-1, 256 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[::4096] = 1
    high = common.peak_rss_mib()
    assert high > base + 128
    block.close()
    common.reset_peak_rss()
    assert common.peak_rss_mib() < high - 128


def test_speed_probe_reports_oom_instead_of_raising(monkeypatch):
    import benchmarks.bench_speed as bs

    def boom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB")

    monkeypatch.setattr(bs, "_build", boom)
    res = child_probe({"method": "voxelmorph", "sizes": [[24, 20, 20]], "inputs": "random"})
    assert res["status"] == "oom" and "allocate" in res["error"]


def test_speed_run_with_two_peers_at_two_sizes(tmp_path):
    """One run_speed (fresh probe processes, one round-robin timing process) over two of the
    paper's peers: every number at both sizes, training steps included."""
    sizes, methods = [(16, 16, 16), (24, 16, 16)], ["pivit", "voxelmorph_psmamba"]
    logs = []
    res = run_speed(sizes, methods, repeats=1, train_sizes=sizes, train_repeats=1, device="cpu", threads=1,
                    inputs="random", mem_limit_gib=6.0, timeout_s=600, log=logs.append)
    assert any("expect roughly" in line for line in logs)
    assert [(r["method"], r["size"]) for r in res["rows"]] == [(m, common.size_str(s)) for s in sizes for m in methods]
    for r in res["rows"]:
        assert r["status"] == "ok" and r["train_status"] == "ok", r
        assert r["params"] == sum(p.numel() for p in build_method(r["method"]).parameters() if p.requires_grad)
        assert r["gflops"] > 0 and r["infer_s"] > 0 and r["train_step_s"] > 0 and r["train_peak_rss_mib"] > 0
    for m in methods:  # more voxels, more FLOPs
        assert res["rows"][2 + methods.index(m)]["gflops"] > res["rows"][methods.index(m)]["gflops"]
    md = speed_markdown(res, common.machine_info(), "cmd")
    assert "PIViT (psmamba peer)" in md and "VoxelMorph (psmamba peer)" in md
    train_table = md.split("## Training step")[1]
    assert train_table.count("(psmamba peer) | 16x16x16") == 2 and train_table.count("(psmamba peer) | 24x16x16") == 2
    with pytest.raises(ValueError, match="train-sizes"):
        run_speed(sizes[:1], methods, train_sizes=sizes[1:], log=None)


def test_speed_probe_reports_training_oom_per_size(monkeypatch):
    """A training step that runs out of memory is reported as such, the larger size is not tried,
    inference still measured; the table says "out of memory (cap ...)"."""
    import benchmarks.bench_speed as bs

    def boom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB")

    monkeypatch.setattr(bs, "_train_step_fn", boom)
    sizes = [[16, 16, 16], [24, 16, 16]]
    probe = child_probe({"method": "voxelmorph_psmamba", "sizes": sizes, "train_sizes": sizes, "inputs": "random"})
    assert probe["status"] == "ok" and all(probe["infer"][str(s)]["status"] == "ok" for s in sizes)
    assert probe["train"][str(sizes[0])]["status"] == "oom" and "allocate" in probe["train"][str(sizes[0])]["error"]
    assert probe["train"][str(sizes[1])]["status"] == "oom" and "not run" in probe["train"][str(sizes[1])]["error"]
    result = {"settings": {"sizes": sizes, "methods": ["voxelmorph_psmamba"], "repeats": 0, "train_sizes": sizes,
                           "train_repeats": 1, "inputs": "random", "threads": 1, "mem_limit_gib": 16.0},
              "skipped": {}, "probes": [probe], "timings": [], "seconds": 1.0}
    result["rows"] = _rows(result, ["voxelmorph_psmamba"], [tuple(s) for s in sizes])
    assert [r["train_status"] for r in result["rows"]] == ["oom", "oom"]
    assert speed_markdown(result, common.machine_info(), "cmd").count("out of memory (cap 16 GiB)") == 2
    # inference out of memory at the larger size: no training step tried there
    calls = []
    monkeypatch.setattr(bs, "_train_step_fn", lambda *a, **k: lambda m, f: calls.append(tuple(m.shape)))
    real_probe = bs._probe_one
    monkeypatch.setattr(bs, "_probe_one", lambda model, name, m, f, device, train, flops: (
        {"status": "oom", "error": "inference: can't allocate memory"} if not train and m.shape[2] == 24
        else real_probe(model, name, m, f, device, train, flops)))
    probe = child_probe({"method": "voxelmorph_psmamba", "sizes": sizes, "train_sizes": sizes, "inputs": "random"})
    assert probe["train"][str(sizes[0])]["status"] == "ok" and calls == [(1, 1, 16, 16, 16)]
    assert probe["train"][str(sizes[1])]["status"] == "oom" and "inference at 24x16x16" in probe["train"][str(sizes[1])]["error"]


def test_speed_rows_use_own_process_step_when_shared_process_runs_out_of_memory(tmp_path):
    """The round-robin process holds every method: a training step that fitted in the method's own
    process (its probe) but not there is reported from the probe (or from the steps timed before
    the shared process ran out), marked as such; a step whose probe also ran out stays "oom"."""
    from benchmarks.bench_speed import OWN_PROCESS, main as speed_main

    key = str([16, 16, 16])
    probe = lambda m, status: {"method": m, "status": "ok", "params": 10, "infer": {key: {"status": "ok", "seconds": 0.1}},
                               "train": {key: {"status": status, "seconds": 7.5 if status == "ok" else None,
                                               "peak_rss_mib": 900.0}}}
    oom = "oom: RuntimeError: can't allocate memory"
    timing = {"status": "ok", "infer": {key: {m: {"wall": [0.1], "cpu": [0.2]} for m in ("paper", "baseline_conv", "pivit")}},
              "train": {key: {"baseline_conv": {"wall": [5.0], "cpu": [9.0]}}}, "errors": {},
              "train_errors": {key: {"paper": oom, "baseline_conv": oom, "pivit": oom}}}
    methods = ["paper", "baseline_conv", "pivit"]
    result = {"settings": {"sizes": [[16, 16, 16]], "methods": methods, "repeats": 1, "train_sizes": [[16, 16, 16]],
                           "train_repeats": 2, "inputs": "random", "threads": 1, "mem_limit_gib": 16.0},
              "skipped": {}, "probes": [probe("paper", "ok"), probe("baseline_conv", "ok"), probe("pivit", "oom")],
              "timings": [timing], "seconds": 1.0}
    rows = {r["method"]: r for r in _rows(result, methods, [(16, 16, 16)])}
    assert rows["paper"]["train_status"] == OWN_PROCESS and rows["paper"]["train_step_s"] == 7.5
    assert rows["paper"]["train_runs"] == 0 and "probe's single call" in rows["paper"]["note"]
    assert rows["baseline_conv"]["train_status"] == OWN_PROCESS and rows["baseline_conv"]["train_step_s"] == 5.0
    assert rows["baseline_conv"]["train_runs"] == 1
    assert rows["pivit"]["train_status"] == "oom" and rows["pivit"].get("train_step_s") is None
    md = speed_markdown({**result, "rows": list(rows.values())}, common.machine_info(), "cmd")
    assert md.count("ok in its own process") == 2 and "1 (probe)" in md and md.count("out of memory (cap 16 GiB)") == 1
    # --report rebuilds the rows of a saved result without measuring anything
    saved = {**result, "rows": [], "command": "cmd", "machine": common.machine_info()}
    (tmp_path / "speed_x.json").write_text(json.dumps(saved))
    assert speed_main(["--report", str(tmp_path / "speed_x.json")]) == 0
    again = json.loads((tmp_path / "speed_x.json").read_text())
    assert {r["method"]: r["train_status"] for r in again["rows"]} == {"paper": OWN_PROCESS, "baseline_conv": OWN_PROCESS, "pivit": "oom"}
    assert (tmp_path / "speed_x.md").is_file() and (tmp_path / "speed_x.png").is_file()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a speed benchmark result"):
        speed_main(["--report", str(tmp_path / "bad.json")])


def test_expected_seconds_scales_with_voxels():
    small = expected_seconds(["paper", "transmorph"], [(96, 112, 96)], [(96, 112, 96)], 3, 2)
    both = expected_seconds(["paper", "transmorph"], [(96, 112, 96), (160, 192, 160)], [(96, 112, 96), (160, 192, 160)], 3, 2)
    assert 0 < small < both and expected_seconds(["nope"], [(8, 8, 8)], [], 1, 1) is None


# --------------------------------------------------------------------------- accuracy harness
def _tiny_data() -> AccuracyData:
    rng = np.random.default_rng(0)
    vols = {}
    for i in range(6):
        c = 12.0 + rng.uniform(-1.5, 1.5, 3)
        img = _blob(centre=tuple(c), radius=5.0) + 0.3 * _blob(centre=tuple(c + 4), radius=3.0)
        lab = (img > 0.5).astype(np.int16) + (img > 0.8).astype(np.int16)
        vols[f"v{i}"] = _Vol(f"v{i}", img, lab, np.diag([2.0, 2.0, 2.0, 1.0]))
    pairs = {"train": [("v0", "v1"), ("v1", "v0"), ("v0", "v2")], "val": [("v3", "v4")], "test": [("v4", "v5"), ("v5", "v3")]}
    return AccuracyData("tiny blobs", vols, pairs, {1: "outer", 2: "inner"})


def test_accuracy_harness_end_to_end(tmp_path):
    res = run_accuracy(_tiny_data(), steps=2, iters=1, val_every=1, splits=("test",),
                       rows=("identity", "voxelmorph", "voxelmorph+io"), threads=1, log=None)
    assert res["training"]["voxelmorph"]["steps"] == 2
    # the 2-step budget ends inside the first epoch: validated once, at its (cut) end
    assert [v["step"] for v in res["training"]["voxelmorph"]["validation"]] == [2]
    assert {p["method"] for p in res["pair_rows"]} == {"identity", "voxelmorph", "voxelmorph+io"}
    assert len(res["pair_rows"]) == 6 and len(res["label_rows"]) == 12  # 2 pairs x 3 rows (x 2 labels)
    ident = [p for p in res["pair_rows"] if p["method"] == "identity"]
    assert all(math.isclose(p["dice_mean"], p["dice_before_mean"]) and p["folding_percent"] == 0 for p in ident)
    summ = {s["method"]: s for s in res["summaries"]["test"]}
    assert summ["voxelmorph"]["pairs"] == 2 and 0 <= summ["voxelmorph"]["dice"][0] <= 1
    assert set(res["per_label"]["test"]["identity"]) == {1, 2}
    files = write_accuracy(res, common.machine_info(), "python -m benchmarks --test", tmp_path, "_t")
    assert all(p.is_file() and p.stat().st_size > 0 for p in files)
    md = accuracy_markdown(res, common.machine_info(), "cmd")
    for text in ("no registration", "VoxelMorph + test-time refinement", "1 outer", "Budget", "val Dice by step"):
        assert text in md


def test_accuracy_rejects_unknown_rows():
    with pytest.raises(ValueError, match="unknown accuracy rows"):
        run_accuracy(_tiny_data(), rows=("identity", "magic"), log=None)


def test_bench_scan_and_bench_model_scripts_write_their_json(tmp_path):
    """The two issue-4 scripts run end to end as scripts (tiny settings) and save their figures."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scan_out, model_out = tmp_path / "scan.json", tmp_path / "model.json"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_scan.py"), "--quick", "--levels", "5",
                    "--backends", "cpu,reference", "--repeats", "1", "--out", str(scan_out)],
                   check=True, capture_output=True, text=True, timeout=600, env=env)
    scan = json.loads(scan_out.read_text())
    assert scan["limit"]["updates_per_s"] > 0
    rows = {(r["what"], r["backend"]): r for r in scan["results"]}
    assert {("scan", "cpu"), ("scan", "reference"), ("layer", "cpu")} <= rows.keys()
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())

    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_model.py"), "--sizes", "32x32x32",
                    "--modes", "fwd", "--repeats", "2", "--out", str(model_out)],
                   check=True, capture_output=True, text=True, timeout=600, env=env)
    model = json.loads(model_out.read_text())
    (res,) = model["results"]
    assert res["size"] == "32x32x32" and len(res["wall_s_each"]) == 2 and res["peak_rss_mb"] > 0
    assert "decoder L1" in res["forward_split_s"] and res["parameters"] == 8_408_063


def test_run_and_report_keeps_partial_results_until_the_outputs_are_written(tmp_path, capsys):
    run_and_report = common.run_and_report
    partial = tmp_path / "x.partial.json"

    def run(progress):
        progress({"rows": [1]})
        assert json.loads(partial.read_text()) == {"command": "c", "rows": [1]}
        return {"rows": [1, 2]}

    def write(res):
        (tmp_path / "x.json").write_text(json.dumps(res))
        return [tmp_path / "x.json"]

    assert run_and_report(tmp_path, "x", {"command": "c"}, run, write, lambda res: f"{len(res['rows'])} rows") == {"rows": [1, 2]}
    assert not partial.exists() and (tmp_path / "x.json").exists()
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'x.json'}", "2 rows"]

    def stops(progress):
        progress({"rows": [1]})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_and_report(tmp_path, "x", {"command": "c"}, stops, write, str)
    assert json.loads(partial.read_text())["rows"] == [1]  # what was measured is kept


def test_ablation_helpers(tmp_path):
    """benchmarks/ablations/_common: variant order, the io log found in a summary, rows as they come."""
    from benchmarks.ablations._common import Rows, levels_run, rotated

    assert rotated(("a", "b", "c"), 0) == ["a", "b", "c"] and rotated(("a", "b", "c"), 4) == ["b", "c", "a"]
    summary = {"deformable": {"stages": [{"method": "network"},
                                         {"method": "io", "levels_run": [{"factor": 4, "iterations": 12,
                                                                          "converged": True}]}]}}
    assert levels_run(summary) == [(4, 12, True)] and levels_run({"method": "affine"}) is None
    path = tmp_path / "r" / "rows.jsonl"
    with Rows(path) as out:
        out.add({"pair": "a", "dice": 0.5})
        assert json.loads(path.read_text().splitlines()[0]) == {"pair": "a", "dice": 0.5}  # written at once
        out.add({"pair": "b", "dice": 0.6})
    assert [r["pair"] for r in out.rows] == ["a", "b"] and len(path.read_text().splitlines()) == 2
