"""Unit tests of the network's building blocks (psmamba.nn.blocks), on tiny volumes."""

from __future__ import annotations

import math

import pytest
import torch

from psmamba import runtime
from psmamba.nn import blocks
from psmamba.nn.blocks import (
    SE,
    SFE,
    SMB,
    AttentionMixer,
    ConvBlock,
    ConvIN,
    LevelProjection,
    MambaBlock,
    MambaMixer,
    RMSNorm,
    TransformerBlock,
    from_tokens,
    inert_parameters,
    to_tokens,
)
from psmamba.nn.mamba import Mamba


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_convin_shape_layers_and_inert_bias():
    block = ConvIN(3, 5)
    x = torch.randn(2, 3, 6, 7, 8)
    y = block(x)
    assert y.shape == (2, 5, 6, 7, 8)
    assert block.conv.kernel_size == (3, 3, 3) and block.conv.padding == (1, 1, 1)
    assert not any(isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) for m in block.modules())
    assert isinstance(block.act, torch.nn.LeakyReLU) and block.act.negative_slope == 0.1
    # instance norm removes the conv bias: changing it leaves the output unchanged
    with torch.no_grad():
        block.conv.bias.add_(3.0)
    torch.testing.assert_close(block(x), y, atol=1e-5, rtol=1e-5)
    assert [name for name, _ in inert_parameters(block)] == ["conv.bias"]


@pytest.mark.parametrize("ch, hidden", [(8, 1), (16, 1), (32, 2), (128, 8)])
def test_se_hidden_units_and_gating(ch, hidden):
    se = SE(ch, reduction=16)
    assert se.fc1.out_features == hidden and se.fc1.bias is None and se.fc2.bias is None
    assert n_params(se) == 2 * ch * hidden
    x = torch.randn(2, ch, 3, 4, 5)
    y = se(x)
    gate = y / x  # the same factor for every voxel of a channel, in (0, 1)
    assert torch.allclose(gate, gate[..., :1, :1, :1].expand_as(gate), atol=1e-5)
    assert bool(((gate > 0) & (gate < 1)).all())


def test_rmsnorm_formula_and_init_gain():
    norm = RMSNorm(6)
    assert torch.equal(norm.weight, torch.ones(6))
    x = torch.randn(4, 6) * 3
    y = norm(x)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * 2.0
    torch.testing.assert_close(y, expected)
    # gain (1 + g) = 2 at initialisation: every row has RMS 2
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.full((4,), 2.0), atol=1e-4, rtol=1e-4)


def test_level_projection_init_and_shape():
    proj = LevelProjection(128)
    assert torch.count_nonzero(proj.linear.bias) == 0
    std = float(proj.linear.weight.detach().std())
    assert 0.8e-5 < std < 1.2e-5  # N(0, 1e-5) read as standard deviation 1e-5
    x = torch.randn(2, 128, 2, 3, 4)
    y = proj(x)
    assert y.shape == x.shape
    # channels-last Linear, then RMSNorm over the channels of each voxel
    with torch.no_grad():
        lin = torch.einsum("oc,bcdhw->bodhw", proj.linear.weight, x)
        expected = lin / torch.sqrt(lin.pow(2).mean(1, keepdim=True) + 1e-6) * 2.0
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
        # tiny weights: the eps floor dominates, values are O(0.1), neither tiny nor unit-RMS
        rms = y.pow(2).mean(1).sqrt()
        assert 0.01 < float(rms.mean()) < 1.5
    assert n_params(proj) == 128 * 128 + 128 + 128


def test_tokens_are_c_order_and_round_trip():
    x = torch.randn(2, 3, 4, 5, 6)
    t = to_tokens(x)
    assert t.shape == (2, 4 * 5 * 6, 3)
    d, h, w = 2, 3, 1
    assert torch.equal(t[:, (d * 5 + h) * 6 + w], x[:, :, d, h, w])  # W varies fastest
    assert torch.equal(from_tokens(t, x.shape[2:]), x)


def test_sfe_shape_params_and_residual():
    dim = 16
    sfe = SFE(dim)
    # D->D k3 twice, D/2->D/2 k3, D/2->D k1, all with bias
    expected = 2 * (27 * dim * dim + dim) + (27 * (dim // 2) ** 2 + dim // 2) + (dim // 2 * dim + dim)
    assert n_params(sfe) == expected
    x = torch.randn(1, dim, 4, 5, 6)
    assert sfe(x).shape == x.shape
    # the last branch is relu(IN(conv1x1(g))); a zero conv makes IN output 0, so out == x
    with torch.no_grad():
        sfe.conv_out.conv.weight.zero_()
        sfe.conv_out.conv.bias.zero_()
    torch.testing.assert_close(sfe(x), x)
    with pytest.raises(ValueError):
        SFE(5)


def test_mamba_mixer_scans_one_direction_in_c_order():
    """Changing one voxel only changes the outputs at that token and after it (causal scan)."""
    mixer = MambaMixer(8, backend="reference").eval()
    x = torch.randn(1, 8, 3, 4, 5)
    idx = (1, 2, 3)
    flat = (idx[0] * 4 + idx[1]) * 5 + idx[2]
    x2 = x.clone()
    # not a constant across channels: LayerNorm would remove that before the Mamba layer
    x2[0, :, idx[0], idx[1], idx[2]] += torch.randn(8)
    with torch.no_grad():
        diff = (to_tokens(mixer(x2)) - to_tokens(mixer(x))).abs().amax(-1)[0]  # (L,)
    assert float(diff[:flat].max()) == 0.0
    assert float(diff[flat]) > 0 and float(diff[flat + 1 :].max()) > 0
    assert isinstance(mixer.mamba, Mamba)
    assert mixer.mamba.dt_rank == math.ceil(8 / 16)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mamba_mixer_norm_and_residual_piece_by_piece_like_the_whole(backend):
    """``x + Mamba(LayerNorm(x))``: the block's own norm and residual, in one piece, in pieces
    (inference drives the layer's chunks itself) and with autograd (checkpointed pieces)."""
    if backend == "cpu":
        pytest.importorskip("numba")
    mixer = MambaMixer(8, backend=backend)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 3, 4, 5) * 3 + 1  # 60 tokens
    t = to_tokens(x)
    with torch.no_grad():
        want = from_tokens(t + mixer.mamba(mixer.norm(t)), x.shape[2:])
        with runtime.use(mamba_inference_chunk=0):
            whole = mixer(x)
        with runtime.use(mamba_inference_chunk=7):  # 60 = 8 * 7 + 4
            pieces = mixer(x)
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pieces, want, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    with runtime.use(mamba_train_chunk=7):
        got = mixer(xg)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert mixer.norm.weight.grad is not None and mixer.norm.weight.grad.abs().sum() > 0


def test_attention_mixer_is_global_and_checks_heads():
    mixer = AttentionMixer(16, heads=8).eval()
    x = torch.randn(1, 16, 2, 3, 4)
    x2 = x.clone()
    x2[0, :, 1, 2, 3] += torch.randn(16)  # the LAST token
    with torch.no_grad():
        diff = (to_tokens(mixer(x2)) - to_tokens(mixer(x))).abs().amax(-1)[0]
    assert float(diff[0]) > 0  # attention sees the whole sequence (not causal)
    with pytest.raises(ValueError):
        AttentionMixer(16, heads=3)


def _mamba_params(dim: int, n: int = 16, expand: int = 2) -> int:
    e, r = expand * dim, math.ceil(dim / 16)
    return dim * 2 * e + e * 4 + e + e * (r + 2 * n) + r * e + e + e * n + e + e * dim


@pytest.mark.parametrize(
    "factory, has_sfe, mixer",
    [
        (lambda d: SMB(d, backend="reference"), True, MambaMixer),
        (lambda d: MambaBlock(d, backend="reference"), False, MambaMixer),
        (lambda d: TransformerBlock(d, heads=4), True, AttentionMixer),
    ],
)
def test_smb_variants_structure(factory, has_sfe, mixer):
    dim = 16
    block = factory(dim)
    assert isinstance(block.sfe, SFE) == has_sfe
    assert isinstance(block.mixer, mixer)
    x = torch.randn(2, dim, 3, 4, 5)
    assert block(x).shape == x.shape
    sfe = n_params(block.sfe)
    mlp = dim * 2 * dim + 2 * dim + 2 * dim * dim + dim
    if mixer is MambaMixer:
        assert n_params(block) == sfe + 2 * dim + _mamba_params(dim) + mlp
    else:
        assert n_params(block) == sfe + 2 * dim + 4 * dim * dim + 4 * dim + mlp


def test_conv_block_is_two_convin():
    block = ConvBlock(12)
    assert isinstance(block.conv1, blocks.ConvNormAct) and isinstance(block.conv2, blocks.ConvNormAct)
    assert n_params(block) == 2 * (27 * 12 * 12 + 12)
    x = torch.randn(1, 12, 3, 4, 5)
    assert block(x).shape == x.shape


def test_state_dict_keys_are_those_of_the_recorded_checkpoint():
    """The blocks hold no state beyond the old code's: the checkpoint written before the
    reshaping (tests/fixtures/golden_v0_best.pt) has exactly the keys of a freshly built model, and
    the full-size model keeps its parameter count."""
    from pathlib import Path

    from psmamba.models import build_model

    ckpt = torch.load(Path(__file__).parents[1] / "fixtures" / "golden_v0_best.pt", map_location="cpu", weights_only=True)
    model = build_model("paper", channels=ckpt["config"]["channels"])
    assert list(model.state_dict()) == list(ckpt["state_dict"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    assert n_params(build_model("paper")) == 8_408_063
