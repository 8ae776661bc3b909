"""What a training step costs a GPU beyond its kernels: no host-device syncs in the step (input
checks, the Dice loss's class count, the stop agreement of a distributed run) and one data
loader for the whole run. Run on the CPU: the accelerator branches are reached by faking what
decides them, and every host read is made to fail where none may happen."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from psmamba import losses
from psmamba.data.training import collate_pairs
from psmamba.engine import trainer as trainer_mod
from psmamba.engine.objective import Objective
from psmamba.errors import PsmambaError, check_on_device


# --------------------------------------------------------------------------- input checks
def test_check_on_device_raises_at_once_on_the_cpu():
    check_on_device(torch.tensor(True), "fine")
    with pytest.raises(PsmambaError, match="^x contains NaN$"):
        check_on_device(torch.isfinite(torch.tensor([1.0, float("nan")])).all(), "x contains NaN")


def test_check_on_device_is_an_asynchronous_assert_where_the_host_must_not_wait(monkeypatch):
    # the CUDA branch (and the one taken while compiling): torch._assert_async, never a read of
    # the value on the host; on a CPU tensor _assert_async fails at once, with the message
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []
    real = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async", lambda *a: (calls.append(a), real(*a)))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("read on the host"))
    check_on_device(torch.tensor(True), "fine")
    with pytest.raises(RuntimeError, match="moving contains NaN"):
        check_on_device(torch.tensor(False), "moving contains NaN")
    assert len(calls) == 2


def test_collate_checks_images_on_the_host_and_counts_the_classes():
    g = torch.Generator().manual_seed(0)
    item = lambda i, top: {  # noqa: E731
        "moving": torch.rand(1, 4, 5, 6, generator=g), "fixed": torch.rand(1, 4, 5, 6, generator=g),
        "moving_labels": torch.randint(0, top, (1, 4, 5, 6), generator=g),
        "fixed_labels": torch.full((1, 4, 5, 6), top, dtype=torch.int64), "moving_id": f"m{i}", "fixed_id": f"f{i}",
    }
    batch = collate_pairs([item(0, 3), item(1, 7)])
    assert batch["num_classes"] == 8
    bad = item(2, 3)
    bad["fixed"][0, 1, 2, 3] = float("inf")
    with pytest.raises(PsmambaError, match="^fixed volume f2 contains NaN or infinite values$"):
        collate_pairs([item(0, 3), bad])


def test_dice_objective_with_the_batch_class_count_reads_nothing_on_the_host(monkeypatch):
    g = torch.Generator().manual_seed(1)
    shape = (1, 1, 6, 7, 8)
    fixed, warped = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    ddf = torch.randn(1, 3, *shape[2:], generator=g)
    mlab, flab = torch.randint(0, 4, shape, generator=g), torch.randint(0, 5, shape, generator=g)
    cfg = SimpleNamespace(similarity="mse", window=3, regulariser="diffusion", reg_weight=0.1, dice_weight=1.0)
    objective = Objective(cfg)
    expected, _ = objective(warped, ddf, fixed, mlab, flab)  # the class count read off the labels
    # the accelerator branch of one_hot (taken here through the compile switch) and the
    # objective with num_classes from the batch: no tensor value is read on the host
    monkeypatch.setattr(losses, "_compiling", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a: pytest.fail("read on the host"))
    total, parts = objective(warped, ddf, fixed, mlab, flab, num_classes=5)
    monkeypatch.undo()
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-7)
    assert float(parts["dice_loss"]) > 0


# --------------------------------------------------------------------------- DDP stop agreement
def _fake_trainer(distributed: bool, n_steps: int, max_steps=None, max_minutes=None):
    cfg = SimpleNamespace(run=SimpleNamespace(log_every=10**9, max_steps=max_steps, max_minutes=max_minutes,
                                              checkpoint_every=0))
    t = SimpleNamespace(cfg=cfg, info=SimpleNamespace(distributed=distributed), n_steps=n_steps, global_step=0,
                        progress=None, t_start=0.0, stopped=None, epoch=0, saved=[])
    t.log_train = lambda: None
    t.validate_and_select = lambda: None
    t.save_last = lambda epoch, step: t.saved.append(step)
    t._agree_on_stops = lambda s: trainer_mod.Trainer._agree_on_stops(t, s)
    return t


def test_distributed_ranks_agree_on_stops_every_few_steps_not_every_step(monkeypatch):
    asked = []
    monkeypatch.setattr(trainer_mod, "any_rank", lambda flag, info: asked.append(flag) or flag)
    n = 3 * trainer_mod.STOP_AGREE_EVERY + 4
    t = _fake_trainer(True, n_steps=n)
    signal = SimpleNamespace(received=None)
    for s in range(n):
        t.global_step += 1
        assert not trainer_mod.Trainer.on_step_end(t, s, signal)
    # three agreements every STOP_AGREE_EVERY steps, one at the end of the epoch; two flags each
    # (a signal, the time limit), so that every rank stops for the same reason
    assert len(asked) == 2 * 4
    # a signal on this rank stops at the next agreement, on every rank alike
    t = _fake_trainer(True, n_steps=n)
    signal.received = 15
    stops = []
    for s in range(n):
        t.global_step += 1
        if trainer_mod.Trainer.on_step_end(t, s, signal):
            stops.append(s)
            break
    assert stops == [trainer_mod.STOP_AGREE_EVERY - 1] and t.stopped == "signal"
    # max_steps is the same step everywhere: it stops there, without waiting for an agreement
    # step (the ranks still compare their signals there: a signal wins, on every rank)
    asked.clear()
    t = _fake_trainer(True, n_steps=n, max_steps=3)
    signal.received = None
    results = []
    for s in range(3):
        t.global_step += 1
        results.append(trainer_mod.Trainer.on_step_end(t, s, signal))
    assert results == [False, False, True] and t.stopped == "max_steps" and len(asked) == 2


def test_a_single_process_run_checks_its_stops_every_step(monkeypatch):
    monkeypatch.setattr(trainer_mod, "any_rank", lambda flag, info: pytest.fail("no collective in one process"))
    t = _fake_trainer(False, n_steps=50)
    signal = SimpleNamespace(received=None)
    t.global_step = 1
    assert not trainer_mod.Trainer.on_step_end(t, 0, signal)
    signal.received = 2
    t.global_step = 2
    assert trainer_mod.Trainer.on_step_end(t, 1, signal) and t.stopped == "signal"


# --------------------------------------------------------------------------- one loader per run
class _EpochData(torch.utils.data.Dataset):
    """Items that say which process read them in which epoch."""

    def __init__(self, n: int = 7) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        v = torch.full((1, 2, 2, 2), float(100 * self.epoch + i))
        return {"moving": v, "fixed": v + 0.5, "moving_id": f"{self.epoch}:{i}:{os.getpid()}"}


def _read(loader, epoch, batches):
    return [(b["moving"][:, 0, 0, 0, 0].tolist(), [m.split(":")[2] for m in b["moving_id"]])
            for b in loader.epoch(epoch, batches)]


def test_the_loader_is_built_once_and_serves_each_epoch_its_batches_in_order():
    plans = {0: [[3, 1], [0, 6], [5, 2]], 1: [[4], [2, 0], [6, 1], [3, 5]]}
    plain = trainer_mod.MicroBatches(_EpochData(), num_workers=0, pin=False)
    loader = trainer_mod.MicroBatches(_EpochData(), num_workers=2, pin=False)
    try:
        built = loader._loader
        pids = set()
        for epoch, batches in plans.items():
            got = _read(loader, epoch, batches)
            want = _read(plain, epoch, batches)
            expect = [[float(100 * epoch + i) for i in idx] for idx in batches]
            assert [v for v, _ in got] == [v for v, _ in want] == expect
            pids |= {p for _, ps in got for p in ps}
            assert loader._loader is built
        # the same two worker processes served both epochs (persistent), none of them this one
        assert len(pids) == 2 and str(os.getpid()) not in pids
    finally:
        loader.close()
