"""The selective scan: every backend against the float64 loop of the recurrence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from psmamba.errors import PsmambaError
from psmamba.nn import scan as scan_mod
from psmamba.nn.scan import available_backends, register_backend, resolve_backend, selective_scan


def make_inputs(batch=2, e=5, n=16, length=53, dtype=torch.float64, seed=0, h0=True, grad=False):
    """Random inputs with the ranges a trained Mamba sees: dt in ~[1e-3, 0.5], A = -(1..N)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, e, length, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(batch, e, length, generator=g, dtype=dtype) - 4.0) + 1e-3
    # a few large steps so that exp(delta * A) reaches deep underflow territory too
    delta[:, 0, ::7] = 0.5
    a_log = torch.log(torch.arange(1, n + 1, dtype=dtype)).repeat(e, 1)
    a_log = a_log + 0.1 * torch.randn(e, n, generator=g, dtype=dtype)
    A = -torch.exp(a_log)
    B = torch.randn(batch, n, length, generator=g, dtype=dtype)
    C = torch.randn(batch, n, length, generator=g, dtype=dtype)
    D = torch.randn(e, generator=g, dtype=dtype)
    hinit = torch.randn(batch, e, n, generator=g, dtype=dtype) if h0 else None
    tensors = [u, delta, A, B, C, D] + ([hinit] if h0 else [])
    if grad:
        for t in tensors:
            t.requires_grad_(True)
    return u, delta, A, B, C, D, hinit


def naive_numpy_like(u, delta, A, B, C, D, h0):
    """An independent scalar-loop statement of the recurrence (a check of the 'loop' oracle)."""
    batch, e, length = u.shape
    n = A.shape[1]
    y = torch.zeros(batch, e, length, dtype=torch.float64)
    hl = torch.zeros(batch, e, n, dtype=torch.float64)
    for b in range(batch):
        for c in range(e):
            for s in range(n):
                h = 0.0 if h0 is None else float(h0[b, c, s])
                for t in range(length):
                    dt = float(delta[b, c, t])
                    h = math.exp(dt * float(A[c, s])) * h + dt * float(B[b, s, t]) * float(u[b, c, t])
                    y[b, c, t] += float(C[b, s, t]) * h
                hl[b, c, s] = h
            if D is not None:
                y[b, c] += float(D[c]) * u[b, c].double()
    return y, hl


def test_loop_matches_scalar_statement():
    args = make_inputs(batch=2, e=2, n=3, length=9)
    y, h = selective_scan(*args, backend="loop", return_state=True)
    y_ref, h_ref = naive_numpy_like(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 2, 53, 100, 257])
@pytest.mark.parametrize("with_h0", [True, False])
def test_reference_matches_loop_float64(length, with_h0):
    args = make_inputs(length=length, h0=with_h0, seed=length)
    y_l, h_l = selective_scan(*args, backend="loop", return_state=True)
    y_r, h_r = selective_scan(*args, backend="reference", return_state=True)
    torch.testing.assert_close(y_r, y_l, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_r, h_l, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_reference_any_chunk_size(chunk):
    u, delta, A, B, C, D, h0 = make_inputs(length=50, seed=3)
    y_l, h_l = scan_mod._scan_loop(u, delta, A, B, C, D, h0)
    y_r, h_r = scan_mod._scan_reference(u, delta, A, B, C, D, h0, chunk=chunk)
    torch.testing.assert_close(y_r, y_l, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_r, h_l, rtol=1e-10, atol=1e-10)


def test_reference_without_D():
    u, delta, A, B, C, _, h0 = make_inputs(length=20)
    y_l = selective_scan(u, delta, A, B, C, None, h0, backend="loop")
    y_r = selective_scan(u, delta, A, B, C, None, h0, backend="reference")
    torch.testing.assert_close(y_r, y_l, rtol=1e-10, atol=1e-10)


def test_reference_gradients_match_loop():
    names = ["u", "delta", "A", "B", "C", "D", "h0"]
    args_l = make_inputs(batch=2, e=3, n=4, length=37, grad=True, seed=5)
    args_r = [t.detach().clone().requires_grad_(True) for t in args_l]
    g = torch.Generator().manual_seed(11)
    w_y = torch.randn(2, 3, 37, generator=g, dtype=torch.float64)
    w_h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    for args, backend in ((args_l, "loop"), (args_r, "reference")):
        y, h = selective_scan(*args, backend=backend, return_state=True)
        ((y * w_y).sum() + (h * w_h).sum()).backward()
    for name, a, b in zip(names, args_l, args_r):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_reference_gradcheck_tiny():
    args = make_inputs(batch=1, e=2, n=3, length=6, grad=True, seed=2)
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan(*a, backend="reference", return_state=True), args
    )


def test_float32_reference_close_to_loop():
    args = make_inputs(length=300, dtype=torch.float32, seed=9)
    y_l = selective_scan(*args, backend="loop")
    y_r = selective_scan(*args, backend="reference")
    assert y_r.dtype == torch.float32 and y_l.dtype == torch.float32
    torch.testing.assert_close(y_r, y_l, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_one_line_errors():
    u, delta, A, B, C, D, h0 = make_inputs(length=10)
    with pytest.raises(PsmambaError, match="delta"):
        selective_scan(u, delta[..., :5], A, B, C)
    with pytest.raises(PsmambaError, match="A must be"):
        selective_scan(u, delta, A[:2], B, C)
    with pytest.raises(PsmambaError, match="B must be"):
        selective_scan(u, delta, A, B[:, :3], C)
    with pytest.raises(PsmambaError, match="h0 must be"):
        selective_scan(u, delta, A, B, C, D, h0[:, :1])
    with pytest.raises(PsmambaError, match="u must be"):
        selective_scan(u[0], delta, A, B, C)
    with pytest.raises(PsmambaError, match="unknown backend"):
        selective_scan(u, delta, A, B, C, backend="nope")


def test_cuda_backend_without_gpu_is_a_clear_error():
    u, delta, A, B, C, D, h0 = make_inputs(length=10)
    with pytest.raises(PsmambaError, match="cuda"):
        selective_scan(u, delta, A, B, C, D, backend="cuda")


def test_registry_seam():
    assert {"loop", "reference"} <= set(available_backends())
    calls = []

    def fake(u, delta, A, B, C, D, h0):
        calls.append(u.shape)
        return scan_mod._scan_loop(u, delta, A, B, C, D, h0)

    register_backend("test_fake", fake)
    try:
        args = make_inputs(length=8)
        y = selective_scan(*args, backend="test_fake")
        assert calls and y.shape == args[0].shape
    finally:
        scan_mod._REGISTRY.pop("test_fake")
    with pytest.raises(PsmambaError):
        register_backend("auto", fake)


def test_auto_on_cpu_never_picks_cuda():
    u = torch.zeros(1, 2, 3)
    assert resolve_backend("auto", u) in ("cpu", "reference")


# ---------------------------------------------------------------------------------------------
# The fast "cpu" backend (numba)
# ---------------------------------------------------------------------------------------------


def rel_err(a, b):
    """Largest deviation relative to the largest magnitude of the reference."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def cpu_scan():
    pytest.importorskip("numba")
    from psmamba.nn._scan_cpu import chunks

    return chunks  # the kernels' sizes, read at call time


def test_auto_picks_cpu_on_cpu(cpu_scan):
    assert "cpu" in available_backends()
    assert resolve_backend("auto", torch.zeros(1, 2, 3)) == "cpu"


@pytest.mark.parametrize("with_h0,sync_chunks", [(True, 1), (False, 2), (True, 8)])
def test_cpu_forward_and_grads_match_reference_float32(cpu_scan, with_h0, sync_chunks, monkeypatch):
    # chunks of 64 steps: L = 203 is no multiple of it, and three chunk boundaries are crossed;
    # the backward meets every 1, 2 or 8 chunks (several sync blocks, a last partial one)
    monkeypatch.setattr(cpu_scan, "CHECKPOINT_EVERY", 64)
    monkeypatch.setattr(cpu_scan, "sync_steps", lambda every, units, n: sync_chunks * every)
    args_c = make_inputs(batch=3, e=6, n=16, length=203, dtype=torch.float32, grad=True, h0=with_h0, seed=7)
    args_r = [None if t is None else t.detach().clone().requires_grad_(True) for t in args_c]
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(3, 6, 203, generator=g)
    w_h = torch.randn(3, 6, 16, generator=g)
    outs = {}
    for args, backend in ((args_c, "cpu"), (args_r, "reference")):
        y, h = selective_scan(*args, backend=backend, return_state=True)
        ((y * w_y).sum() + (h * w_h).sum()).backward()
        outs[backend] = (y.detach(), h.detach())
    assert rel_err(outs["cpu"][0], outs["reference"][0]) < 1e-5
    assert rel_err(outs["cpu"][1], outs["reference"][1]) < 1e-5
    for name, a, b in zip(["u", "delta", "A", "B", "C", "D", "h0"], args_c, args_r):
        if a is None:
            continue
        assert a.grad.dtype == torch.float32
        assert rel_err(a.grad, b.grad) < 1e-5, name


def test_cpu_matches_loop_float64_with_chunks(cpu_scan, monkeypatch):
    monkeypatch.setattr(cpu_scan, "CHECKPOINT_EVERY", 16)
    monkeypatch.setattr(cpu_scan, "sync_steps", lambda every, units, n: 2 * every)
    args_c = make_inputs(batch=2, e=5, n=7, length=53, grad=True, seed=8)
    args_l = [t.detach().clone().requires_grad_(True) for t in args_c]
    g = torch.Generator().manual_seed(2)
    w_y = torch.randn(2, 5, 53, generator=g, dtype=torch.float64)
    w_h = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    for args, backend in ((args_c, "cpu"), (args_l, "loop")):
        y, h = selective_scan(*args, backend=backend, return_state=True)
        ((y * w_y).sum() + (h * w_h).sum()).backward()
    for name, a, b in zip(["u", "delta", "A", "B", "C", "D", "h0"], args_c, args_l):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_cpu_gradcheck_float64(cpu_scan, monkeypatch):
    monkeypatch.setattr(cpu_scan, "CHECKPOINT_EVERY", 4)
    args = make_inputs(batch=2, e=3, n=4, length=10, grad=True, seed=4)
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan(*a, backend="cpu", return_state=True), args
    )


def test_cpu_without_D_and_h0_gives_none_grads(cpu_scan):
    u, delta, A, B, C, _, _ = make_inputs(length=30, dtype=torch.float32, grad=True, h0=False)
    y = selective_scan(u, delta, A, B, C, backend="cpu")
    y.square().sum().backward()
    assert all(t.grad is not None for t in (u, delta, A, B, C))


def test_cpu_inference_saves_no_checkpoints(cpu_scan):
    # no input needs a gradient: the forward must not allocate the (B, L/K, E, N) checkpoints
    args = make_inputs(length=40, dtype=torch.float32, seed=3)
    with torch.no_grad():
        y = selective_scan(*args, backend="cpu")
    torch.testing.assert_close(y, selective_scan(*args, backend="reference"), rtol=1e-5, atol=1e-5)
    assert y.grad_fn is None


def test_cpu_respects_torch_thread_count(cpu_scan):
    args = make_inputs(length=64, dtype=torch.float32, seed=6)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = selective_scan(*args, backend="cpu")
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y1, selective_scan(*args, backend="cpu"), rtol=1e-6, atol=1e-6)
