"""The channels-last fast paths (psmamba.nn.fast) against their plain PyTorch statements."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import runtime, spatial
from psmamba.nn import fast
from psmamba.nn.blocks import LevelProjection

CL = torch.channels_last_3d


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL)


@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.LeakyReLU(0.1)])
@pytest.mark.parametrize("shape", [(1, 16, 9, 10, 11), (2, 8, 5, 33, 7), (1, 3, 4, 4, 4)])
def test_instance_norm_act_matches_torch(act, shape):
    torch.manual_seed(0)
    x = _cl(torch.randn(shape) * 3 + 5)  # a large mean: the shifted sums must stay accurate
    want = F.instance_norm(x.contiguous())
    want = want if act is None else act(want)
    with torch.no_grad():
        got = fast.instance_norm_act(x, act)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # in place overwrites the input and returns it
    y = x.clone(memory_format=CL)
    with torch.no_grad():
        out = fast.instance_norm_act(y, act, inplace=True)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_instance_norm_act_falls_back_with_autograd_and_channels_first():
    torch.manual_seed(1)
    x = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    y = fast.instance_norm_act(_cl(x), nn.LeakyReLU(0.1))  # autograd on: the torch path
    y.sum().backward()
    assert x.grad is not None
    cf = torch.randn(1, 4, 6, 6, 6)
    torch.testing.assert_close(fast.instance_norm_act(cf, nn.ReLU()), F.relu(F.instance_norm(cf)))


def test_pointwise_conv_is_the_conv():
    torch.manual_seed(2)
    conv = nn.Conv3d(8, 16, 1)
    x = _cl(torch.randn(2, 8, 5, 6, 7))
    torch.testing.assert_close(fast.pointwise_conv(x, conv), conv(x.contiguous()), rtol=1e-5, atol=1e-6)
    assert fast.pointwise_conv(x, conv).is_contiguous(memory_format=CL)


def test_level_projection_fused_matches_torch():
    torch.manual_seed(3)
    proj = LevelProjection(8)
    with torch.no_grad():
        proj.linear.weight.normal_()
        proj.linear.bias.normal_()
        proj.norm.weight.uniform_(-1, 1)
    x = _cl(torch.randn(2, 8, 5, 6, 7))
    with torch.no_grad():
        got = proj(x)
        with runtime.use(fast_cpu=False):
            want = proj(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_avg_pool2_matches_torch():
    torch.manual_seed(4)
    x = _cl(torch.randn(2, 8, 8, 6, 11))  # an odd axis: the last plane is dropped, as torch does
    with torch.no_grad():
        got = fast.avg_pool2(x)
    torch.testing.assert_close(got, F.avg_pool3d(x.contiguous(), 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False])
def test_warp_kernel_matches_grid_sample(channels_last):
    torch.manual_seed(5)
    img = torch.randn(2, 5, 7, 8, 9, dtype=torch.float64)
    if channels_last:
        img = _cl(img)
    ddf = torch.randn(1, 3, 7, 8, 9, dtype=torch.float64) * 3  # many samples fall outside
    ddf[0, :, 0, 0, 0] = float("nan")
    ddf[0, 0, 1, 1, 1] = 1e30
    with torch.no_grad():
        got = spatial.warp(img, ddf)
        kernel = fast.warp_trilinear_cpu(img, ddf)
        with runtime.use(fast_cpu=False):
            want = spatial.warp(img, ddf)
    assert kernel is not None and torch.equal(kernel, got)  # spatial.warp took the kernel
    assert got.is_contiguous(memory_format=CL) == channels_last
    keep = torch.isfinite(want)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-10, atol=1e-10)
    assert got[:, :, 1, 1, 1].abs().max() == 0  # far outside: zeros


def test_model_forward_same_with_and_without_fast_paths():
    from psmamba.models import build_model

    torch.manual_seed(6)
    model = build_model("paper").eval()
    with torch.no_grad():  # make the field non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    a, b = torch.rand(1, 1, 20, 24, 18), torch.rand(1, 1, 20, 24, 18)
    with torch.no_grad():
        fast_out = model(a, b)
        with runtime.use(fast_cpu=False):
            plain_out = model(a, b)
    assert fast_out.ddf.is_contiguous()
    assert plain_out.ddf.abs().max() > 1e-3
    torch.testing.assert_close(fast_out.ddf, plain_out.ddf, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fast_out.warped, plain_out.warped, rtol=1e-3, atol=1e-4)


def test_gradients_have_their_parameters_layout():
    """DDP's gradient-layout contract: each grad has its parameter's strides (otherwise DDP warns
    "Grad strides do not match bucket view strides" and copies on every step)."""
    from psmamba.models import build_model

    torch.manual_seed(7)
    model = build_model("paper", channels=1)
    a, b = torch.rand(1, 1, 18, 20, 17), torch.rand(1, 1, 18, 20, 17)
    out = model(a, b)
    (out.warped.mean() + out.ddf.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.stride() == p.stride(), (name, p.stride(), p.grad.stride())


@pytest.mark.parametrize("batch", [1, 3])
def test_instance_norm_cl_is_instance_norm_and_keeps_channels_last(batch):
    torch.manual_seed(8)
    x = torch.randn(batch, 5, 6, 7, 4).contiguous(memory_format=fast.CHANNELS_LAST).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = fast.instance_norm_cl(x, eps=1e-5)
    y_ref = F.instance_norm(x_ref, eps=1e-5)
    assert y.is_contiguous(memory_format=fast.CHANNELS_LAST)
    assert not y_ref.is_contiguous(memory_format=fast.CHANNELS_LAST)  # the flip it avoids
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(y.shape)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_model_norms_keep_channels_last_where_the_norm_keeps_the_layout(monkeypatch):
    # the GPU branch (faked on the CPU): in training, every conv -> instance norm -> act unit whose
    # convolution gives channels-last returns channels-last (F.instance_norm hands back
    # channels-first, and the next convolution converts back); same numbers to rounding
    from psmamba.models import build_model
    from psmamba.nn.blocks import ConvNormAct

    torch.manual_seed(9)
    model = build_model("paper", channels=2)
    a, b = torch.rand(1, 1, 18, 20, 17), torch.rand(1, 1, 18, 20, 17)
    seen = []

    def conv_out(module, args, out):
        module._conv_cl = out.is_contiguous(memory_format=fast.CHANNELS_LAST)

    def unit_out(module, args, out):
        if getattr(module.conv, "_conv_cl", False):
            seen.append(out.is_contiguous(memory_format=fast.CHANNELS_LAST))
        module.conv._conv_cl = False

    units = [m for m in model.modules() if isinstance(m, ConvNormAct)]
    hooks = [h for m in units for h in (m.conv.register_forward_hook(conv_out), m.register_forward_hook(unit_out))]
    plain = model(a, b)
    assert seen and not all(seen)  # the flips of the F.instance_norm path
    seen.clear()
    monkeypatch.setattr(fast, "_norm_keeps_layout", lambda x: fast._is_cl(x))
    kept = model(a, b)
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    torch.testing.assert_close(kept.ddf, plain.ddf, rtol=1e-3, atol=1e-4)
    (kept.warped.mean() + kept.ddf.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride(), name
