"""The "triton" selective-scan backend under Triton's interpreter (CPU tensors), against the
float64 loop of the recurrence: output, final state and every gradient.

Triton reads ``TRITON_INTERPRET`` when ``triton.language`` is imported (its library functions
such as ``tl.sum`` are defined in the mode of that moment) and when a kernel is defined (the
backend defines its kernels on first use, :func:`psmamba.nn._scan_triton.kernels`). So:

* when this module is the first to import triton and there is no GPU, it sets
  ``TRITON_INTERPRET=1`` first and the cases run in this process (the variable stays set for
  the session; nothing else here uses triton on a CPU);
* otherwise (triton imported earlier, or a GPU present) the cases are skipped here and
  :func:`test_cases_in_a_fresh_interpreter_process` runs this file again in a subprocess with
  ``TRITON_INTERPRET=1``.

A fixture replaces the interpreter's per-element ``associative_scan`` loop by one that runs the
same left-to-right fold vectorised over the other axes (identical operations in the identical
order, 10-20x faster: :class:`psmamba.nn._scan_triton.fast_interpreter_scan`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numpy")
if "triton" not in sys.modules and not torch.cuda.is_available() and importlib.util.find_spec("triton"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from psmamba.errors import PsmambaError  # noqa: E402
from psmamba.nn._scan_triton import fast_interpreter_scan, interpreter_usable  # noqa: E402
from psmamba.nn.scan import selective_scan  # noqa: E402

IN_PROCESS = interpreter_usable()
cases = pytest.mark.skipif(not IN_PROCESS, reason="run by test_cases_in_a_fresh_interpreter_process")


@pytest.mark.skipif(IN_PROCESS, reason="the cases run in this process")
def test_cases_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 9, proc.stdout[-2000:]  # every case ran there

NAMES = ["u", "delta", "A", "B", "C", "D", "h0"]


@pytest.fixture(scope="module", autouse=True)
def fast_scan():
    with fast_interpreter_scan():
        yield


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


def make_inputs(batch=2, e=4, n=16, length=37, dtype=torch.float32, seed=0, h0=True, D=True):
    """Inputs in the ranges of a Mamba layer: delta = softplus(dt_bias + noise) with the bias
    putting delta log-uniform in [1e-3, 1e-1] (mamba_ssm's dt init), A = -exp(A_log) with
    A_log = log(1..N) (S4D-real) plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    dt0 = torch.exp(torch.rand(e, generator=g, dtype=torch.float64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))  # softplus^-1
    delta = F.softplus(dt_bias[None, :, None] + 0.3 * torch.randn(batch, e, length, generator=g, dtype=torch.float64))
    a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float64)).repeat(e, 1)
    A = -torch.exp(a_log + 0.05 * torch.randn(e, n, generator=g, dtype=torch.float64))
    u = torch.randn(batch, e, length, generator=g, dtype=torch.float64)
    B = torch.randn(batch, n, length, generator=g, dtype=torch.float64)
    C = torch.randn(batch, n, length, generator=g, dtype=torch.float64)
    Dv = torch.randn(e, generator=g, dtype=torch.float64) if D else None
    hinit = torch.randn(batch, e, n, generator=g, dtype=torch.float64) if h0 else None
    return [None if t is None else t.to(dtype).requires_grad_(True) for t in (u, delta, A, B, C, Dv, hinit)]


def clone(args):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in args]


def rel_err(a, b):
    """Largest deviation relative to the largest magnitude of the reference."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run(args, backend, seed=1, **kw):
    """Output, final state and gradients of a random linear function of both."""
    if kw:
        from psmamba.nn._scan_triton import scan_triton

        y, h = scan_triton(*args, **kw)
    else:
        y, h = selective_scan(*args, backend=backend, return_state=True)
    g = torch.Generator().manual_seed(seed)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    w_h = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    ((y * w_y).sum() + (h * w_h).sum()).backward()
    return y.detach(), h.detach(), [None if t is None else t.grad for t in args]


@cases
@pytest.mark.parametrize(
    "config",
    [
        dict(chunk=16),  # L = 37: three chunks, the last one partial; one channel block
        dict(chunk=8, block_e=2, groups=2),  # five chunks, two channel blocks (one partial) in two groups
    ],
)
def test_triton_matches_loop_float32(config):
    args_t = make_inputs(e=3, dtype=torch.float32, seed=3)
    args_l = clone(args_t)
    y_t, h_t, g_t = run(args_t, "triton", **config)
    y_l, h_l, g_l = run(args_l, "loop")
    assert y_t.dtype == torch.float32 and h_t.dtype == torch.float32
    assert rel_err(y_t, y_l) < 1e-5
    assert rel_err(h_t, h_l) < 1e-5
    for name, a, b in zip(NAMES, g_t, g_l):
        assert a.dtype == torch.float32, name
        assert rel_err(a, b) < 1e-5, name


@cases
def test_triton_float64_matches_loop_to_rounding():
    # float64 inputs are computed in float64: agreement to ~1e-15 shows the algorithm exact
    args_t = make_inputs(batch=2, e=3, n=5, length=21, dtype=torch.float64, seed=4)
    args_l = clone(args_t)
    y_t, h_t, g_t = run(args_t, "triton", chunk=8)
    y_l, h_l, g_l = run(args_l, "loop")
    torch.testing.assert_close(y_t, y_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_t, h_l, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(NAMES, g_t, g_l):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)


@cases
def test_triton_through_registry_without_D_and_h0():
    args_t = make_inputs(batch=2, e=3, n=4, length=70, seed=5, h0=False, D=False)
    args_l = clone(args_t)
    y_t, h_t, g_t = run(args_t, "triton")  # the default chunk (64): two chunks
    y_l, h_l, g_l = run(args_l, "loop")
    assert rel_err(y_t, y_l) < 1e-5 and rel_err(h_t, h_l) < 1e-5
    for name, a, b in zip(NAMES, g_t, g_l):
        if b is None:
            assert a is None, name
        else:
            assert rel_err(a, b) < 1e-5, name


@cases
def test_triton_half_inputs_compute_in_float32():
    args = [None if t is None else t.detach() for t in make_inputs(batch=2, e=3, n=4, length=19, seed=6)]
    half = [None if t is None else t.to(torch.bfloat16) for t in args]
    y, h = selective_scan(*half, backend="triton", return_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y_ref, h_ref = selective_scan(*[None if t is None else t.float() for t in half], backend="loop", return_state=True)
    assert rel_err(h, h_ref) < 1e-5
    assert rel_err(y.float(), y_ref) < 1e-2  # y rounded to bfloat16


@cases
def test_triton_inference_no_grad():
    args = [None if t is None else t.detach() for t in make_inputs(batch=2, e=3, n=4, length=19, seed=7)]
    with torch.no_grad():
        y = selective_scan(*args, backend="triton")
    assert y.grad_fn is None
    assert rel_err(y, selective_scan(*args, backend="loop")) < 1e-5


@cases
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = [None if t is None else t.detach() for t in make_inputs(batch=1, e=2, n=4, length=5)]
    with pytest.raises(PsmambaError, match="TRITON_INTERPRET"):
        selective_scan(*args, backend="triton")


@cases
def test_triton_is_opaque_to_torch_compile(monkeypatch):
    # fullgraph=True fails on any graph break: the scan must trace as one custom op (its fake
    # implementation gives the shapes); aot_eager also traces the backward through it. The
    # backend is unloaded first, so its import (and the availability probes) happen while
    # tracing, as in a process whose first scan is compiled.
    from psmamba.nn import scan as scan_mod

    monkeypatch.setattr(scan_mod._REGISTRY["triton"], "_fn", None)
    monkeypatch.setattr(scan_mod, "_PROBES", {})
    args_c = make_inputs(batch=2, e=3, n=4, length=19, seed=8)
    args_e = clone(args_c)

    def f(u, delta, A, B, C, D, h0):
        y, h = selective_scan(u, delta, A, B, C, D, h0, backend="triton", return_state=True)
        return (y * y).sum() + h.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(*args_c).backward()
    f(*args_e).backward()
    for name, a, b in zip(NAMES, args_c, args_e):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=name)


@cases
def test_mamba_layer_triton_matches_reference():
    from psmamba.nn.mamba import Mamba

    torch.manual_seed(0)
    layer = {name: Mamba(d_model=8, d_state=4, backend=name) for name in ("reference", "triton")}
    layer["triton"].load_state_dict(layer["reference"].state_dict())
    x = torch.randn(2, 23, 8)
    outs, grads = {}, {}
    for name, m in layer.items():
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.square().sum().backward()
        outs[name] = out.detach()
        grads[name] = [xi.grad] + [p.grad for p in m.parameters()]
    assert rel_err(outs["triton"], outs["reference"]) < 1e-5
    for a, b in zip(grads["triton"], grads["reference"]):
        assert rel_err(a, b) < 1e-4


@cases
def test_mamba_layer_triton_carries_the_state_across_pieces():
    # the layer cuts long sequences into pieces and hands the scan state over as h0 (in
    # inference and in checkpointed training): with the triton backend this must give the
    # one-piece result, as with the others
    from psmamba import runtime
    from psmamba.nn.mamba import Mamba

    torch.manual_seed(1)
    whole = Mamba(d_model=4, d_state=4, backend="triton")
    pieces = Mamba(d_model=4, d_state=4, backend="triton")
    pieces.load_state_dict(whole.state_dict())
    x = torch.randn(2, 19, 4)  # three pieces of 8 tokens, the last one partial

    def run(m, chunk: int, grad: bool):
        with runtime.use(mamba_inference_chunk=chunk, mamba_train_chunk=chunk):
            if not grad:
                with torch.no_grad():
                    return m(x)
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            out.square().sum().backward()
            return out.detach(), [xi.grad] + [p.grad for p in m.parameters()]

    assert rel_err(run(pieces, 8, False), run(whole, 0, False)) < 1e-5
    outs, grads = [], []
    for m, chunk in ((whole, 0), (pieces, 8)):
        out, g = run(m, chunk, True)
        outs.append(out)
        grads.append(g)
    assert rel_err(outs[1], outs[0]) < 1e-5
    for a, b in zip(grads[1], grads[0]):
        assert rel_err(a, b) < 1e-4


def make_fused_inputs(batch=2, e=3, n=4, length=37, dtype=torch.float32, seed=0):
    """Raw steps ``dt`` around 0 and a bias putting ``softplus(dt + bias)`` in Mamba's
    [1e-3, 1e-1] (the steps where a plain ``log(1 + exp)`` loses digits), a gate ``z``."""
    args = make_inputs(batch=batch, e=e, n=n, length=length, dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    dt0 = torch.exp(torch.rand(e, generator=g, dtype=torch.float64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = dt0 + torch.log(-torch.expm1(-dt0))
    dt = 0.3 * torch.randn(batch, e, length, generator=g, dtype=torch.float64)
    z = 2 * torch.randn(batch, e, length, generator=g, dtype=torch.float64)
    u, _, A, B, C, D, h0 = (None if t is None else t.detach() for t in args)
    return [t.to(dtype).requires_grad_(True) for t in (u, dt, A, B, C, D, h0, z, bias)]


FUSED_NAMES = [*NAMES, "z", "delta_bias"]


def run_fused(args, backend, seed=1, **kw):
    u, dt, A, B, C, D, h0, z, bias = args
    if backend == "loop":  # the definition: softplus and gate in float64 PyTorch around the loop
        y, h = selective_scan(u, F.softplus(dt.double() + bias.double()[:, None]), A, B, C, D, h0,
                              backend="loop", return_state=True)
        y = y * F.silu(z.double())
    elif kw:
        from psmamba.nn._scan_triton import scan_triton

        y, h = scan_triton(u, dt, A, B, C, D, h0, z=z, delta_bias=bias, delta_softplus=True, **kw)
    else:
        y, h = selective_scan(u, dt, A, B, C, D, h0, backend=backend, return_state=True,
                              z=z, delta_bias=bias, delta_softplus=True)
    g = torch.Generator().manual_seed(seed)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    w_h = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    ((y * w_y).sum() + (h * w_h).sum()).backward()
    return y.detach(), h.detach(), [t.grad for t in args]


@cases
@pytest.mark.parametrize("config", [dict(chunk=16), dict(chunk=8, block_e=2, groups=2)])
def test_triton_fused_softplus_and_gate_match_loop_float32(config):
    # delta = softplus(dt + bias) and y * silu(z) inside the kernels, forward and backward
    args_t = make_fused_inputs(seed=11)
    args_l = clone(args_t)
    y_t, h_t, g_t = run_fused(args_t, "triton", **config)
    y_l, h_l, g_l = run_fused(args_l, "loop")
    assert rel_err(y_t, y_l) < 1e-5
    assert rel_err(h_t, h_l) < 1e-5
    for name, a, b in zip(FUSED_NAMES, g_t, g_l):
        assert a.dtype == torch.float32, name
        assert rel_err(a, b) < 1e-5, name


@cases
def test_triton_fused_float64_matches_loop_to_rounding_and_registry_path():
    args_t = make_fused_inputs(batch=2, e=3, n=5, length=21, dtype=torch.float64, seed=12)
    args_l = clone(args_t)
    y_t, h_t, g_t = run_fused(args_t, "triton")  # through selective_scan: the fused entry
    y_l, h_l, g_l = run_fused(args_l, "loop")
    torch.testing.assert_close(y_t, y_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_t, h_l, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(FUSED_NAMES, g_t, g_l):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)


@cases
def test_triton_fused_softplus_is_accurate_for_small_and_large_steps():
    # softplus far in both tails: delta ~ 1e-9 (a plain log(1 + exp(x)) would give 0) and
    # delta ~ x for large x; one channel each, compared through the final state
    from psmamba.nn._scan_triton import scan_triton

    length = 5
    dt = torch.tensor([[[-20.0] * length, [-6.9] * length, [30.0] * length]], dtype=torch.float32)
    u = torch.ones(1, 3, length)
    A = -torch.full((3, 1), 1e-3)
    B, C = torch.ones(1, 1, length), torch.ones(1, 1, length)
    _, h = scan_triton(u, dt, A, B, C, delta_softplus=True)
    _, h_ref = selective_scan(u.double(), F.softplus(dt.double()), A.double(), B.double(), C.double(),
                              backend="loop", return_state=True)
    assert rel_err(h[:, :1], h_ref[:, :1]) < 1e-5 and rel_err(h[:, 1:2], h_ref[:, 1:2]) < 1e-5
    assert rel_err(h[:, 2:], h_ref[:, 2:]) < 1e-6


def test_unfused_backends_apply_the_fused_steps_in_pytorch():
    # (no triton needed) the same arguments on a backend without fusion: PyTorch around the scan
    args = [t.detach() for t in make_fused_inputs(batch=1, e=2, n=3, length=9, dtype=torch.float64, seed=13)]
    u, dt, A, B, C, D, h0, z, bias = args
    y = selective_scan(u, dt, A, B, C, D, h0, backend="reference", z=z, delta_bias=bias, delta_softplus=True)
    y_ref = selective_scan(u, F.softplus(dt + bias[:, None]), A, B, C, D, h0, backend="loop") * F.silu(z)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
