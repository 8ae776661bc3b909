"""Distributed training for real: two CPU processes (gloo) launched by torchrun.

Same global batch, same result. Two ranks x 1 pair per step must end on the weights of one
process that accumulates the gradients of the same 2 pairs per step (and, to a looser
tolerance, of one process with batch 2):

* the two runs see the same pairs in the same steps (the order is a function of (seed, epoch)
  and each step's slice is split the same way: ``psmamba.engine.distributed.rank_batches``);
* each pair's loss is a mean over its own voxels and instance norm normalises each sample on
  its own, so the per-pair gradients do not depend on what else is in the batch;
* DDP averages ``(g0 + g1) / 2``; accumulation sums ``g0 / 2 + g1 / 2``. Halving is exact in
  binary floating point, so the two differ at most in the order of one addition.

Tolerance: |w_ddp - w_one| <= 1e-6 + 1e-5 |w_one| for every weight after 6 Adam steps (the
observed difference on this machine is 0: the weights are bitwise equal). Batch 2: see its test.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from psmamba.cli import main

from _folders import SHAPE, make_folder  # noqa: E402  (tests/ is on sys.path under pytest)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ddp")
    root = make_folder(base / "scans")
    cfg = {
        "model": {"preset": "baseline_conv", "channels": 1},
        "data": {"source": "folder", "root": str(root), "val_fraction": 0.34, "max_val_pairs": 1,
                 "options": {"cache_dir": str(base / "cache"), "test": 0.17}},
        "optim": {"epochs": 2},  # 6 training pairs per epoch, global batch 2: 3 steps per epoch
        "run": {"threads": 1, "progress": False, "log_every": 1, "tensorboard": False},
    }
    path = base / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def ddp_run(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp-run") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "psmamba", "train", "--config", str(config), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_gloo_processes_match_one_process_with_accumulation(config, ddp_run, tmp_path):
    one = tmp_path / "one"
    assert main(["train", "--config", str(config), "--out", str(one), "--set", "optim.accumulate=2"]) == 0
    ref, got = weights(one / "last.pt"), weights(ddp_run / "last.pt")
    assert ref.keys() == got.keys()
    # The conv biases in front of a non-affine instance norm get a gradient that is rounding
    # noise (exactly zero in exact arithmetic); Adam scales that noise up to lr-sized steps, so
    # they depend on the order of the gradient sums and are not compared.
    from psmamba.config import load_train_config
    from psmamba.models import build_model
    from psmamba.nn.blocks import inert_parameters

    inert = {name for name, _ in inert_parameters(build_model(load_train_config(config).model_config()))}
    assert inert and inert < ref.keys()
    for k in ref.keys() - inert:
        assert torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6), k
    moved = sum(float((ref[k] - weights_init(config, k)).abs().max()) for k in ref if ref[k].is_floating_point())
    assert moved > 0  # the runs trained (a no-op run would match trivially)
    state = torch.load(ddp_run / "last.pt", weights_only=True)["training"]
    assert (state["world_size"], state["step"], state["epoch"]) == (2, 6, 2)
    assert len(state["rng"]) == 2  # both ranks' generator states, for an exact resume


def test_only_rank_zero_writes(ddp_run):
    with (ddp_run / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == list(range(1, 7))
    assert sum(r["split"] == "val" for r in rows) == 2
    assert sorted(p.name for p in ddp_run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.csv"]


def test_one_process_with_batch_two_matches_closely(config, ddp_run, tmp_path):
    """Batch 2 sums the two pairs' gradients inside each convolution kernel, in another order,
    so only rounding differs. Adam turns rounding noise into full-size steps for weights whose
    gradient is zero in exact arithmetic (a conv bias before an instance norm), so the weights
    are compared through what they compute: the per-step losses (rtol 1e-5) and the field the
    final model predicts for a pair (max |difference| within 15 % of the field's maximum)."""
    from psmamba.models import load_checkpoint

    two = tmp_path / "batch2"
    assert main(["train", "--config", str(config), "--out", str(two), "--set", "optim.batch_size=2"]) == 0

    def losses(run: Path) -> list[float]:
        with (run / "metrics.csv").open(newline="") as fh:
            return [float(r["loss"]) for r in csv.DictReader(fh) if r["split"] == "train"]

    assert losses(two) == pytest.approx(losses(ddp_run), rel=1e-5)
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.avg_pool3d(torch.rand(2, 1, *SHAPE, generator=g), 5, 1, 2)
    (a, _), (b, _) = load_checkpoint(ddp_run / "last.pt"), load_checkpoint(two / "last.pt")
    with torch.no_grad():
        da, db = a(x[:1], x[1:]).ddf, b(x[:1], x[1:]).ddf
    assert float(da.abs().max()) > 1e-2  # a field worth comparing
    # float32 gradients of this loss differ from float64 by ~2e-3 (relative) whatever the
    # summation order, and Adam amplifies that for tiny gradients: observed 3e-4 voxels with
    # channels-first activations, 7.9e-3 (of a 0.08-voxel field) with channels-last
    assert float((da - db).abs().max()) <= 0.15 * float(da.abs().max())


_INIT: dict[str, torch.Tensor] = {}


def weights_init(config: Path, key: str) -> torch.Tensor:
    """Initial weights of the run (the engine seeds torch with run.seed before building)."""
    if not _INIT:
        from psmamba.config import load_train_config
        from psmamba.models import build_model

        torch.manual_seed(load_train_config(config).run.seed)
        _INIT.update(build_model(load_train_config(config).model_config()).state_dict())
    return _INIT[key]
