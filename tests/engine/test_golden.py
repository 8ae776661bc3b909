"""No behaviour change across the "one engine" reshaping: today's code against values recorded
from the code before it (see ``tests/golden.py``), and an old checkpoint still loads."""

from __future__ import annotations


import numpy as np
import torch

import golden  # noqa: E402  (tests/ is on sys.path under pytest)


def test_seeded_training_gives_the_recorded_weights(tmp_path):
    recorded = torch.load(golden.GOLDEN, map_location="cpu", weights_only=True)["train_weights"]
    golden.in_fresh_process("train", tmp_path)
    now = golden.weights_of(tmp_path / "run")
    assert set(now) == set(recorded)
    for name, ref in recorded.items():
        # 20 Adam steps at lr 1e-4 move a weight by at most 2e-3; float32 rounding differences
        # (summation order) stay orders of magnitude below that
        torch.testing.assert_close(now[name], ref, rtol=1e-4, atol=2e-6, msg=name)


def test_seeded_instance_optimisation_gives_the_recorded_field(tmp_path):
    recorded = torch.load(golden.GOLDEN, map_location="cpu", weights_only=True)["register_ddf"]
    golden.in_fresh_process("register", tmp_path)
    ddf = torch.from_numpy(np.load(tmp_path / "ddf.npy"))
    torch.testing.assert_close(ddf, recorded, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_written_by_the_old_code_loads(tmp_path):
    from psmamba.models import load_checkpoint

    model, ckpt = load_checkpoint(golden.OLD_CHECKPOINT)
    assert ckpt["config"]["channels"] == 1
    x = torch.rand(1, 1, 24, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, x.flip(-1))
    assert out.ddf.shape == (1, 3, 24, 16, 16) and torch.isfinite(out.ddf).all()
    # the stored weights are the ones the model now holds (strict load, nothing re-initialised)
    for name, value in ckpt["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
