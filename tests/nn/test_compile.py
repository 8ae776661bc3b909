"""``torch.compile(..., fullgraph=True)`` goes through the scan: the ``"cpu"`` backend's numba
kernels are ``torch.library`` custom ops with fake implementations and an autograd formula,
so compile sees one opaque node (any graph break fails ``fullgraph=True``). ``aot_eager``
also traces the backward pass through the fake implementations. (The ``"triton"`` backend's
custom ops: tests/nn/test_scan_triton.py.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


def _grads(module, inputs):
    return [p.grad.clone() for p in module.parameters()] + [x.grad.clone() for x in inputs]


def test_mamba_layer_compiles_in_one_graph_and_matches_eager():
    from psmamba.nn.mamba import Mamba

    torch.manual_seed(0)
    layer = Mamba(d_model=8, d_state=4, backend="cpu")
    x = torch.randn(2, 19, 8)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_e = layer(xe)
    out_e.square().sum().backward()
    grads_e = _grads(layer, [xe])
    layer.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out_c = compiled(xc)
    out_c.square().sum().backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(layer, [xc]), grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_scan_op_keeps_no_checkpoints_without_autograd():
    from psmamba.nn._scan_cpu import scan_cpu

    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 3, 70, generator=g), torch.rand(1, 3, 70, generator=g) * 0.1
    A, B, C = -torch.rand(3, 4, generator=g), torch.randn(1, 4, 70, generator=g), torch.randn(1, 4, 70, generator=g)
    y, h = scan_cpu(u, delta, A, B, C, None, None)
    assert y.grad_fn is None and h.shape == (1, 3, 4)
    _, _, ckpt = torch.ops.psmamba.cpu_scan_fwd(u, delta, A, B, C, None, None, False)
    assert ckpt.shape[1] == 0


@pytest.mark.slow
def test_paper_model_compiles_in_one_graph():
    # minutes on a shared CPU (the whole network traced forward and backward)
    from psmamba.models import build_model

    torch.manual_seed(0)
    model = build_model("paper", channels=1, mamba_backend="cpu")
    moving, fixed = torch.rand(1, 1, 32, 16, 16), torch.rand(1, 1, 32, 16, 16)
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(moving, fixed)
    (out.warped.square().sum() + out.ddf.square().sum()).backward()
    eager = model(moving, fixed)
    torch.testing.assert_close(out.ddf, eager.ddf, rtol=1e-4, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
