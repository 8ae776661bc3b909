"""The Mamba layer: mamba_ssm's parameters and initialisation, v1 semantics, chunked inference."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from psmamba import runtime
from psmamba.errors import PsmambaError
from psmamba.nn.mamba import Mamba, MambaState
from psmamba.nn.scan import selective_scan

# mamba_ssm.Mamba(d_model=16) state dict (d_state=16, d_conv=4, expand=2, dt_rank=ceil(16/16)=1),
# in its order: own parameters first, then the sub-modules in registration order.
MAMBA_SSM_D16 = [
    ("A_log", (32, 16)),
    ("D", (32,)),
    ("in_proj.weight", (64, 16)),
    ("conv1d.weight", (32, 1, 4)),
    ("conv1d.bias", (32,)),
    ("x_proj.weight", (33, 32)),
    ("dt_proj.weight", (32, 1)),
    ("dt_proj.bias", (32,)),
    ("out_proj.weight", (16, 32)),
]


def test_state_dict_matches_mamba_ssm():
    m = Mamba(16)
    got = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert got == MAMBA_SSM_D16


def test_dt_rank_auto_and_explicit():
    assert Mamba(32).dt_rank == 2
    assert Mamba(17).dt_rank == 2
    assert Mamba(256).dt_rank == 16
    assert Mamba(16, dt_rank=3).x_proj.weight.shape == (3 + 32, 32)


def test_initialisation_like_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, dt_min=0.001, dt_max=0.1)
    e, n = 128, 16
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, n + 1.0)).repeat(e, 1))
    torch.testing.assert_close(m.D, torch.ones(e))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: about half of the values below the geometric mean 0.01
    assert 0.3 < (dt < 0.01).float().mean() < 0.7
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.x_proj.bias is None
    assert m.conv1d.groups == e and m.conv1d.padding == (3,)
    c = Mamba(16, dt_init="constant", dt_scale=2.0)
    torch.testing.assert_close(c.dt_proj.weight, torch.full((32, 1), 2.0))
    assert Mamba(16, bias=True).in_proj.bias is not None


def plain_mamba_forward(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's slow path written out with the loop scan (an independent statement)."""
    length = x.shape[1]
    xz = m.in_proj(x).transpose(1, 2)  # (B, 2E, L)
    xs, z = xz.chunk(2, dim=1)
    xs = F.silu(m.conv1d(xs)[..., :length])
    x_dbl = m.x_proj(xs.transpose(1, 2))
    dt, b, c = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (m.dt_proj.weight @ dt.transpose(1, 2)) + m.dt_proj.bias[:, None]  # (B, E, L)
    y = selective_scan(
        xs, F.softplus(dt), -torch.exp(m.A_log), b.transpose(1, 2), c.transpose(1, 2), m.D, backend="loop"
    )
    y = y * F.silu(z)
    return m.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize("backend", ["reference", "loop", "auto"])
def test_forward_matches_plain_statement(backend):
    torch.manual_seed(1)
    m = Mamba(8, backend=backend).double()
    x = torch.randn(2, 45, 8, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, plain_mamba_forward(m, x), rtol=1e-9, atol=1e-10)


def test_backend_switchable_after_construction():
    torch.manual_seed(2)
    m = Mamba(8, backend="loop").double()
    x = torch.randn(1, 30, 8, dtype=torch.float64)
    a = m(x)
    m.backend = "reference"
    torch.testing.assert_close(m(x), a, rtol=1e-10, atol=1e-10)
    m.backend = "nope"
    with pytest.raises(PsmambaError, match="unknown backend"):
        m(x)


def test_chunked_inference_equals_one_piece():
    torch.manual_seed(3)
    m = Mamba(8, backend="reference").double()
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    with torch.no_grad():
        whole = m(x)
        with runtime.use(mamba_inference_chunk=7):  # 50 = 7 * 7 + 1: the last piece is shorter than d_conv
            pieces = m(x)
    torch.testing.assert_close(pieces, whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_forward_chunk_carries_one_state_layout(backend):
    """Pieces driven by hand through ``forward_chunk`` give the whole sequence's output, and the
    state has the one documented layout whichever path produced it."""
    if backend == "cpu":
        pytest.importorskip("numba")
    torch.manual_seed(5)
    m = Mamba(8, backend=backend)
    x = torch.randn(2, 50, 8)
    with torch.no_grad():
        whole = m(x)
        state, outs = None, []
        for start in range(0, 50, 7):
            y, state = m.forward_chunk(x[:, start : start + 7], state)
            assert isinstance(state, MambaState)
            assert state.conv.shape == (2, 16, 3) and state.ssm.shape == (2, 16, 16)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.ssm, m._forward_piece(x, None)[1].ssm.detach(), rtol=1e-4, atol=1e-5)


def test_training_uses_one_piece_and_gets_gradients():
    torch.manual_seed(4)
    m = Mamba(8, backend="reference")
    x = torch.randn(2, 23, 8)
    with runtime.use(mamba_inference_chunk=5):  # an inference setting: training ignores it
        m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_bad_input_shape():
    m = Mamba(8)
    with pytest.raises(PsmambaError, match=r"\(B, L, 8\)"):
        m(torch.zeros(2, 10, 7))
    with pytest.raises(PsmambaError):
        Mamba(0)


def test_cpu_backend_layer_matches_reference_and_chunks():
    pytest.importorskip("numba")
    torch.manual_seed(5)
    m = Mamba(16, backend="cpu")
    x = torch.randn(2, 300, 16)
    ref = Mamba(16, backend="reference")
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        a = m(x)
        torch.testing.assert_close(a, ref(x), rtol=1e-5, atol=1e-5)
        with runtime.use(mamba_inference_chunk=64):
            torch.testing.assert_close(m(x), a, rtol=1e-5, atol=1e-5)
    # training (one piece, autograd through the numba backward) gives the reference's gradients
    m(x).square().mean().backward()
    ref(x).square().mean().backward()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_checkpointed_training_pieces_equal_one_piece(backend):
    if backend == "cpu":
        pytest.importorskip("numba")
    torch.manual_seed(6)
    m = Mamba(8, backend=backend).double()
    x = torch.randn(2, 50, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for train_chunk in (0, 7):  # one piece; pieces of 7 (the last one shorter than d_conv)
        m.zero_grad()
        x.grad = None
        with runtime.use(mamba_train_chunk=train_chunk):
            out = m(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        grads.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("time_major", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_cpu_inference_equals_unfused(dtype, tol, time_major, monkeypatch):
    pytest.importorskip("numba")
    from psmamba.nn import _scan_cpu

    # both inference layouts; E = 40 also gives the time-major kernel a unit narrower than a vector
    monkeypatch.setattr(_scan_cpu, "use_time_major", lambda e, batch, threads: time_major)
    torch.manual_seed(7)
    m = Mamba(20, dt_rank=3, backend="cpu").to(dtype)  # E = 40, no multiple of the blocks
    x = torch.randn(2, 90, 20, dtype=dtype)
    with torch.no_grad():
        with runtime.use(mamba_inference_chunk=0):
            fused = m(x)
        with runtime.use(mamba_inference_chunk=2):  # pieces shorter than the conv history
            fused_pieces = m(x)
        m.backend = "reference"
        plain = m(x)
    scale = plain.abs().max()
    assert (fused - plain).abs().max() <= tol * scale
    assert (fused_pieces - plain).abs().max() <= tol * scale


def test_time_major_only_where_every_thread_gets_a_whole_vector():
    pytest.importorskip("numba")
    from psmamba.nn._scan_cpu.chunks import use_time_major

    assert use_time_major(32, 1, 2)  # level 1 of the paper model on 2 cores: 2 units of 16
    assert use_time_major(512, 1, 2)
    assert not use_time_major(16, 1, 2)  # d_model 8: one unit for 2 threads
    assert not use_time_major(32, 1, 16)  # many cores
    assert use_time_major(32, 8, 16)
    assert not use_time_major(40, 4, 2)  # not whole vectors


def test_wide_kernel_flags_drop_only_vectoriser_remarks(capfd):
    import os

    pytest.importorskip("numba")
    from psmamba.nn._numba import KernelFlags

    flags = KernelFlags(("test-remarks",), wide=True)
    flags._quiet_start()
    os.write(2, b"remark: <unknown>:0:0: loop not vectorized: call instruction cannot be vectorized\n")
    os.write(2, b"a real warning\n")
    flags._quiet_end()
    err = capfd.readouterr().err
    assert "a real warning" in err
    assert "loop not vectorized" not in err
