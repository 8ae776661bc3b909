"""The prepared GPU benchmark (``benchmarks/bench_gpu.py``): its ``--smoke`` mode on the CPU,
and its guards (one failing measurement is recorded, the run goes on; the time budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_gpu

REPO = Path(__file__).resolve().parents[1]


def _run_smoke(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench_gpu.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--smoke", "--out", str(out), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "median" in proc.stdout and str(out) in proc.stdout  # the table was printed
    return result


def test_smoke_scan_and_layer_stages(tmp_path):
    pytest.importorskip("triton")
    result = _run_smoke(tmp_path, "--stages", "scan,layer")
    assert result["smoke"] and result["info"]["device_name"] == "cpu"
    rows = result["rows"]
    for stage in ("scan", "mamba_layer"):
        for backend in ("reference", "triton"):
            got = [r for r in rows if r["stage"] == stage and r["backend"] == backend]
            assert {r["mode"] for r in got} == {"forward", "forward+backward"}, (stage, backend)
            assert all(r["status"] == "ok" and r["time_s"] > 0 for r in got), got


@pytest.mark.slow
def test_smoke_all_stages(tmp_path):
    result = _run_smoke(tmp_path)
    models = [r for r in result["rows"] if r["stage"] == "model"]
    assert {r["model"].split(" ")[0] for r in models} == {"paper", "voxelmorph"}
    assert all(r["status"] == "ok" for r in models), models


def test_guarded_records_failures_and_budget():
    budget = bench_gpu.Budget(60.0)

    def oom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def broken():
        raise ValueError("bad shapes\nsecond line")

    assert bench_gpu.guarded({}, budget, 1.0, oom)["status"] == "oom"
    row = bench_gpu.guarded({}, budget, 1.0, broken)
    assert row["status"] == "error" and row["error"] == "ValueError: bad shapes"
    assert bench_gpu.guarded({}, budget, 1.0, lambda: {"time_s": 0.5}) == {"time_s": 0.5, "status": "ok"}
    assert bench_gpu.guarded({}, bench_gpu.Budget(0.0), 1.0, lambda: {})["status"].startswith("skipped")


def test_a_failing_stage_does_not_stop_the_others(tmp_path, monkeypatch, one_torch_thread):
    # main() in this process: keep its environment and thread count changes local to the test
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.setattr(bench_gpu, "bench_models", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(bench_gpu, "bench_scan", lambda *a, **k: [{"stage": "scan", "mode": "forward", "L": 1,
                                                                    "d_model": 1, "status": "ok"}])
    out = tmp_path / "r.json"
    assert bench_gpu.main(["--smoke", "--stages", "model,scan", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["stage"] == "model" and rows[0]["status"] == "error" and "ZeroDivisionError" in rows[0]["error"]
    assert rows[1]["stage"] == "scan" and rows[1]["status"] == "ok"


def test_levels_are_the_paper_model_at_160x192x160():
    # level l has (160 * 192 * 160) / 8^(l-1) tokens and d_model = 16 * 2^(l-1)
    assert bench_gpu.LEVELS == [(160 * 192 * 160 // 8 ** (i), 16 * 2**i) for i in range(5)]
