"""What ``backend="auto"`` picks, for each device, dtype and set of importable packages.

No GPU, mamba_ssm or triton is needed: the GPU is faked through the ``_on_gpu`` seam of
:mod:`psmamba.nn.scan`, the packages through the availability probes or ``sys.modules``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
import warnings

import pytest
import torch

from psmamba.errors import PsmambaError
from psmamba.nn import scan as scan_mod
from psmamba.nn.scan import resolve_backend, selective_scan


@pytest.fixture
def env(monkeypatch):
    """Set which packages import and whether tensors count as on a GPU; fresh warn-once flag."""

    def set_env(gpu: bool, mamba: bool, triton: bool) -> None:
        monkeypatch.setattr(scan_mod, "_on_gpu", lambda u: gpu)
        monkeypatch.setattr(scan_mod, "_mamba_ssm_available", lambda: mamba)
        monkeypatch.setattr(scan_mod, "_triton_available", lambda: triton)

    monkeypatch.setattr(scan_mod, "_warned_slow_gpu", False)
    return set_env


@pytest.fixture
def clean_probes(monkeypatch):
    """Probe the real import machinery afresh, and forget what was probed afterwards."""
    monkeypatch.setattr(scan_mod, "_PROBES", {})
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)


U32 = torch.zeros(1, 2, 3)
U64 = torch.zeros(1, 2, 3, dtype=torch.float64)
H0 = torch.zeros(1, 2, 4)


@pytest.mark.parametrize(
    "mamba,triton,u,h0,expected",
    [
        (True, True, U32, None, "cuda"),
        (True, False, U32, None, "cuda"),
        (True, True, U64, None, "triton"),  # mamba_ssm refuses float64
        (True, True, U32, H0, "triton"),  # mamba_ssm takes no initial state
        (False, True, U32, None, "triton"),
        (False, True, U64, None, "triton"),
    ],
)
def test_auto_on_gpu(env, mamba, triton, u, h0, expected):
    env(gpu=True, mamba=mamba, triton=triton)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow-path warning when a fast backend exists
        assert resolve_backend("auto", u, h0) == expected


def test_auto_on_gpu_float64_compute_dtype_skips_mamba_ssm(env):
    # float32 u but a float64 A: selective_scan computes in float64, so not mamba_ssm
    env(gpu=True, mamba=True, triton=True)
    assert resolve_backend("auto", U32, dtype=torch.float64) == "triton"
    assert resolve_backend("auto", U32, dtype=torch.float32) == "cuda"


@pytest.mark.parametrize("mamba,u", [(False, U32), (True, U64)])
def test_auto_on_gpu_without_fast_backend_warns_once(env, mamba, u):
    env(gpu=True, mamba=mamba, triton=False)
    with pytest.warns(RuntimeWarning, match="slow reference scan on a GPU: install triton or mamba_ssm"):
        assert resolve_backend("auto", u) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", u) == "reference"  # once only


@pytest.mark.parametrize("mamba,triton", [(True, True), (False, False)])
def test_auto_on_cpu_unchanged(env, mamba, triton):
    env(gpu=False, mamba=mamba, triton=triton)
    expected = "cpu" if scan_mod._REGISTRY["cpu"].available() else "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for u in (U32, U64):
            assert resolve_backend("auto", u) == expected
            assert resolve_backend("auto", u, H0) == expected


def test_selective_scan_auto_on_fake_gpu_dispatches_to_triton(env, monkeypatch):
    # the whole path through selective_scan: a fake "triton" backend records the call
    env(gpu=True, mamba=False, triton=True)
    calls = []

    def fake(u, delta, A, B, C, D, h0):
        calls.append(u.dtype)
        return scan_mod._scan_loop(u, delta, A, B, C, D, h0)

    monkeypatch.setitem(scan_mod._REGISTRY, "triton", scan_mod._Backend(fn=fake, is_available=lambda: True))
    u = torch.randn(1, 2, 5)
    delta = torch.rand(1, 2, 5) * 0.1
    A = -torch.rand(2, 3)
    B, C = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    selective_scan(u, delta, A.double(), B, C)
    assert calls == [torch.float64]


# --- the mamba_ssm probe against the import machinery, with fake packages -------------------


def _fake_package(name: str, package: bool = True) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    return module


def _install_fake_mamba(monkeypatch, interface: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "mamba_ssm", _fake_package("mamba_ssm"))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops", _fake_package("mamba_ssm.ops"))
    if interface is not None:
        monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)


def test_probe_working_mamba_ssm(clean_probes, monkeypatch):
    interface = _fake_package("mamba_ssm.ops.selective_scan_interface", package=False)
    interface.selective_scan_fn = lambda *a, **k: None
    _install_fake_mamba(monkeypatch, interface)
    assert scan_mod._mamba_ssm_available()
    assert "cuda" in scan_mod.available_backends()


class _BrokenExtensionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds mamba_ssm's scan interface, whose import fails as a broken CUDA build does."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mamba_ssm.ops.selective_scan_interface":
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("selective_scan_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")


@pytest.mark.parametrize("failure", ["import_error", "os_error"])
def test_broken_mamba_ssm_falls_back(clean_probes, monkeypatch, env, failure):
    if failure == "import_error":
        _install_fake_mamba(monkeypatch, None)
        monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)  # ImportError
    else:
        _install_fake_mamba(monkeypatch, None)
        monkeypatch.setattr(sys, "meta_path", [_BrokenExtensionFinder(), *sys.meta_path])
    assert not scan_mod._mamba_ssm_available()
    assert "cuda" not in scan_mod.available_backends()
    # auto on a (fake) GPU falls back instead of failing
    monkeypatch.setattr(scan_mod, "_on_gpu", lambda u: True)
    monkeypatch.setattr(scan_mod, "_triton_available", lambda: True)
    assert resolve_backend("auto", U32) == "triton"
    # asking for "cuda" by name is an actionable one-line error
    u = torch.randn(1, 2, 4)
    with pytest.raises(PsmambaError, match="mamba_ssm"):
        selective_scan(u, u.abs(), -torch.ones(2, 3), torch.randn(1, 3, 4), torch.randn(1, 3, 4), backend="cuda")


def test_probe_absent_mamba_ssm(clean_probes, monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # find_spec raises / import fails
    assert not scan_mod._mamba_ssm_available()


# --- the Mamba layer's pieces on a GPU: mamba_ssm takes no h0 ------------------------------


@pytest.mark.parametrize(
    "backend,mamba,triton,expected",
    [
        ("auto", True, True, ("cuda", "triton")),  # first piece on mamba_ssm, the rest on triton
        ("auto", False, True, ("triton", "triton")),
        ("auto", True, False, None),  # only the slow reference could continue: one piece
        ("cuda", True, True, None),  # an explicit cuda: one piece
        ("triton", True, True, ("triton", "triton")),
        ("reference", True, True, ("reference", "reference")),
    ],
)
def test_piece_backends_on_gpu(env, backend, mamba, triton, expected):
    env(gpu=True, mamba=mamba, triton=triton)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking is not running: no slow-path warning
        assert scan_mod.piece_backends(backend, U32) == expected


def _fake_fused(name, calls):
    """A fused backend computing by the reference scan, recording (name, whether h0 came)."""

    def fn(u, delta, A, B, C, D, h0, z=None, delta_bias=None, delta_softplus=False):
        calls.append((name, h0 is not None))
        if name == "cuda" and h0 is not None:
            raise AssertionError("mamba_ssm takes no h0")
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]
        if delta_softplus:
            delta = torch.nn.functional.softplus(delta)
        y, h = scan_mod._scan_reference(u, delta, A, B, C, D, h0)
        return (y * torch.nn.functional.silu(z) if z is not None else y), h

    return scan_mod._Backend(fn=fn, is_available=lambda: True, fused=True)


@pytest.mark.parametrize("training", [True, False])
def test_mamba_layer_on_a_gpu_with_mamba_ssm_runs_long_sequences_in_pieces(env, monkeypatch, training):
    from psmamba import runtime
    from psmamba.nn.mamba import Mamba

    env(gpu=True, mamba=True, triton=True)
    calls = []
    for name in ("cuda", "triton"):
        monkeypatch.setitem(scan_mod._REGISTRY, name, _fake_fused(name, calls))
    torch.manual_seed(0)
    layer = Mamba(d_model=4, d_state=3)
    reference = Mamba(d_model=4, d_state=3, backend="reference")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 19, 4)
    grad = torch.enable_grad() if training else torch.no_grad()
    with runtime.use(mamba_train_chunk=8, mamba_inference_chunk=8), grad:
        assert layer.chunk_length(x, training) == 8
        out = layer(x.clone().requires_grad_(training))
        if training:
            out.square().sum().backward()
    # three pieces: the first on "cuda" without a state, the others on "triton" from one
    first_pass = calls[:3]
    assert first_pass == [("cuda", False), ("triton", True), ("triton", True)]
    with runtime.use(mamba_train_chunk=0, mamba_inference_chunk=0), torch.no_grad():
        torch.testing.assert_close(out.detach(), reference(x), rtol=1e-5, atol=1e-6)
    # an explicit "cuda" keeps one piece
    layer.backend = "cuda"
    with runtime.use(mamba_train_chunk=8, mamba_inference_chunk=8):
        assert layer.chunk_length(x, training) == 19
