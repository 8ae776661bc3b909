"""The selective scan of Mamba v1, behind a small registry of interchangeable backends.

The recurrence (per batch ``b``, channel ``e`` and state ``n``; ``t = 1..L``)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h_0 = h0 (zeros by default)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t

Layout (that of ``mamba_ssm.selective_scan_fn``, so the CUDA kernel is a drop-in backend):

* ``u``, ``delta``: ``(B, E, L)``  (``delta`` is already positive: softplus is applied by the caller)
* ``A``: ``(E, N)`` (negative for a decaying state)
* ``B``, ``C``: ``(B, N, L)`` (input-dependent, shared by all ``E`` channels)
* ``D``: ``(E,)`` or ``None``; ``h0``: ``(B, E, N)`` or ``None``
* returns ``y`` ``(B, E, L)`` and, with ``return_state=True``, ``(y, h_L)`` with ``h_L`` ``(B, E, N)``.

Fused steps of a Mamba layer (the arguments of ``mamba_ssm.selective_scan_fn``):
``delta_bias`` ``(E,)`` and ``delta_softplus`` make the step sizes ``softplus(delta +
delta_bias)`` from a raw ``delta``, and ``z`` ``(B, E, L)`` gates the output, ``y * silu(z)``.
A backend registered with ``fused=True`` (``"triton"``, ``"cuda"``) computes them inside its
kernels (``delta`` and the ungated ``y`` never reach memory); for the others
:func:`selective_scan` applies them in PyTorch around the scan.

Backends
--------
``"loop"``
    A plain float64 loop over time: the test oracle (slow; autograd works through it).
``"reference"``
    Pure PyTorch, differentiable by autograd, fast enough for small volumes: a chunk-parallel
    scan that only multiplies and adds (no log-space tricks, so no overflow for any ``delta*A``).
``"cpu"``
    The fast numba kernels of :mod:`psmamba.nn._scan_cpu` (forward and backward).
``"cuda"``
    ``mamba_ssm``'s kernel; needs ``mamba_ssm`` installed and the tensors on a GPU.
``"triton"``
    The Triton kernels of :mod:`psmamba.nn._scan_triton` (forward and backward, takes ``h0``);
    needs triton and the tensors on a GPU, or ``TRITON_INTERPRET=1`` for CPU tensors (tests).
``"auto"``
    On a GPU: ``"cuda"`` when ``mamba_ssm`` (with its compiled extension) imports, the dtype is
    not float64 (``mamba_ssm`` refuses it) and no ``h0`` is given; else ``"triton"`` when triton
    imports; else ``"reference"``, with a warning once. On a CPU: ``"cpu"`` (numba), else
    ``"reference"``. A sequence run in pieces (the Mamba layer's long levels) continues each
    piece from the previous one's state, which ``mamba_ssm`` cannot take: there ``"auto"`` runs
    the first piece on ``"cuda"`` and the others on ``"triton"`` (:func:`piece_backends`).

:func:`register_backend` is the seam for new backends; :func:`available_backends` lists the
ones usable in this environment. The ``"cpu"`` and ``"triton"`` backends are
``torch.library`` custom ops with fake implementations and an autograd formula, so
``torch.compile(model, fullgraph=True)`` traces through a scan as one opaque node.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from collections.abc import Callable
from typing import Optional

import torch

from psmamba.errors import PsmambaError

__all__ = [
    "selective_scan",
    "register_backend",
    "available_backends",
    "registered_backends",
    "resolve_backend",
    "piece_backends",
    "BackendFn",
]

# A backend takes (u, delta, A, B, C, D, h0) with the shapes above (D, h0 possibly None),
# already validated and in one floating dtype, and returns (y, h_last).
BackendFn = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        Optional[torch.Tensor],
        Optional[torch.Tensor],
    ],
    "tuple[torch.Tensor, torch.Tensor]",
]


class _Backend:
    """A registered backend: the function (possibly imported lazily) and an availability test."""

    def __init__(
        self,
        fn: BackendFn | None = None,
        loader: Callable[[], BackendFn] | None = None,
        is_available: Callable[[], bool] | None = None,
        fused: bool = False,
    ) -> None:
        self._fn = fn
        self._loader = loader
        self._is_available = is_available
        self.fused = fused

    def available(self) -> bool:
        if self._is_available is None:
            return True
        try:
            return bool(self._is_available())
        except Exception:  # an availability probe must never crash the caller
            return False

    def get(self) -> BackendFn:
        if self._fn is None:
            assert self._loader is not None
            self._fn = self._loader()
        return self._fn


_REGISTRY: dict[str, _Backend] = {}


def register_backend(
    name: str,
    fn: BackendFn | None = None,
    *,
    loader: Callable[[], BackendFn] | None = None,
    is_available: Callable[[], bool] | None = None,
    fused: bool = False,
) -> None:
    """Register (or replace) a scan backend under ``name``.

    Args:
        name: the value users pass as ``backend=``; ``"auto"`` is reserved.
        fn: ``fn(u, delta, A, B, C, D, h0) -> (y, h_last)`` with the module's shape contract;
            ``D`` and ``h0`` may be ``None``. All tensors share one floating dtype and device.
        loader: instead of ``fn``, a function returning it on first use (keeps imports lazy).
        is_available: optional test telling whether the backend can run in this environment.
        fused: ``fn`` also takes the keywords ``z``, ``delta_bias`` and ``delta_softplus`` (see
            the module docstring) and applies them itself; otherwise ``selective_scan`` does.
    """
    if name == "auto":
        raise PsmambaError("register_backend: the name 'auto' is reserved")
    if (fn is None) == (loader is None):
        raise PsmambaError(f"register_backend({name!r}): give exactly one of fn or loader")
    _REGISTRY[name] = _Backend(fn=fn, loader=loader, is_available=is_available, fused=fused)


def registered_backends() -> list[str]:
    """Names of every registered backend, usable here or not."""
    return sorted(_REGISTRY)


def available_backends() -> list[str]:
    """Names of the backends usable in this environment (``"cuda"`` only with ``mamba_ssm``,
    ``"triton"`` only with triton; either may still need the tensors on a GPU)."""
    return sorted(name for name, b in _REGISTRY.items() if b.available())


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    h0: torch.Tensor | None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> None:
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "h0": h0, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not torch.is_tensor(t):
            raise PsmambaError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise PsmambaError(f"selective_scan: {name} must be floating point, got {t.dtype}")
        if t.device != u.device:
            raise PsmambaError(f"selective_scan: {name} is on {t.device} but u is on {u.device}")
    if u.ndim != 3:
        raise PsmambaError(f"selective_scan: u must be (B, E, L), got shape {tuple(u.shape)}")
    batch, e, length = u.shape
    if delta.shape != u.shape:
        raise PsmambaError(f"selective_scan: delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != e:
        raise PsmambaError(f"selective_scan: A must be (E, N) with E={e}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, n, length):
            raise PsmambaError(
                f"selective_scan: {name} must be (B, N, L) = {(batch, n, length)}, got {tuple(t.shape)}"
            )
    if D is not None and tuple(D.shape) != (e,):
        raise PsmambaError(f"selective_scan: D must be (E,) = ({e},), got {tuple(D.shape)}")
    if h0 is not None and tuple(h0.shape) != (batch, e, n):
        raise PsmambaError(f"selective_scan: h0 must be (B, E, N) = {(batch, e, n)}, got {tuple(h0.shape)}")
    if z is not None and z.shape != u.shape:
        raise PsmambaError(f"selective_scan: z must match u {tuple(u.shape)}, got {tuple(z.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (e,):
        raise PsmambaError(f"selective_scan: delta_bias must be (E,) = ({e},), got {tuple(delta_bias.shape)}")


# --------------------------------------------------------------------------------------------
# "loop": the oracle
# --------------------------------------------------------------------------------------------


def _scan_loop(u, delta, A, B, C, D, h0):
    """Step the recurrence one token at a time in float64 (the definition, nothing clever)."""
    f64 = torch.float64
    u64, d64, A64, B64, C64 = (t.to(f64) for t in (u, delta, A, B, C))
    batch, e, length = u.shape
    h = torch.zeros(batch, e, A.shape[1], dtype=f64, device=u.device) if h0 is None else h0.to(f64)
    ys = []
    for t in range(length):
        dt = d64[:, :, t, None]  # (B, E, 1)
        h = torch.exp(dt * A64) * h + (dt * u64[:, :, t, None]) * B64[:, None, :, t]
        ys.append((h * C64[:, None, :, t]).sum(-1))  # (B, E)
    y = torch.stack(ys, dim=-1) if ys else u64.new_zeros(batch, e, 0)
    if D is not None:
        y = y + D.to(f64)[:, None] * u64
    return y, h


# --------------------------------------------------------------------------------------------
# "reference": chunk-parallel scan in plain PyTorch
# --------------------------------------------------------------------------------------------


def _scan_reference(u, delta, A, B, C, D, h0, chunk: int | None = None):
    """Chunk-parallel scan: ``T`` steps over all chunks at once, ``L/T`` steps of carry.

    The sequence is cut into ``nc`` chunks of ``T`` steps (``T ~ sqrt(L)``, so the Python loop has
    about ``3 sqrt(L)`` steps instead of ``L``):

    1. every chunk is scanned from a zero state, all chunks in parallel, keeping only its end
       state; its total decay is ``exp(A * sum(delta over the chunk))`` (exponent <= 0 for A < 0);
    2. the true start state of each chunk follows from a short sequential carry
       ``S_c = decay_c * S_{c-1} + end_c`` over the ``nc`` chunks;
    3. every chunk is scanned again from its true start state, producing ``y``.

    Only products and sums of the recurrence itself appear (no ``exp(-S)`` factors that could
    overflow), so it agrees with the loop to rounding. The padded tail has ``delta = 0``: decay
    1 and no input, so the final state is untouched. Without autograd the working memory is
    ``O(B * E * N * nc)``; with autograd, PyTorch keeps the per-step states (``O(L E N)``), which
    is why this backend is for small volumes and the ``"cpu"`` backend exists.
    """
    batch, e, length = u.shape
    n = A.shape[1]
    if length == 0:
        y = u.new_zeros(batch, e, 0)
        h = u.new_zeros(batch, e, n) if h0 is None else h0
        return y, h
    T = chunk if chunk is not None else max(1, math.isqrt(length - 1) + 1)
    nc = -(-length // T)
    pad = nc * T - length
    if pad:
        # delta = 0 and u = 0 on the padded tail: the state passes through unchanged.
        u_p = torch.nn.functional.pad(u, (0, pad))
        d_p = torch.nn.functional.pad(delta, (0, pad))
        B_p = torch.nn.functional.pad(B, (0, pad))
        C_p = torch.nn.functional.pad(C, (0, pad))
    else:
        u_p, d_p, B_p, C_p = u, delta, B, C
    # Chunked views, time innermost: (B, E, nc, T) and (B, N, nc, T).
    u_c = u_p.reshape(batch, e, nc, T)
    d_c = d_p.reshape(batch, e, nc, T)
    B_c = B_p.reshape(batch, n, nc, T)
    C_c = C_p.reshape(batch, n, nc, T)
    du_c = d_c * u_c  # (B, E, nc, T)
    A_ = A[None, :, None, :]  # (1, E, 1, N)

    def step(h, t):
        # h: (B, E, nc, N); one time step inside every chunk at once.
        decay = torch.exp(d_c[..., t, None] * A_)  # (B, E, nc, N)
        inp = du_c[..., t, None] * B_c[:, None, :, :, t].transpose(-1, -2)  # (B, E, nc, N)
        return decay * h + inp

    # 1. local end states from zero.
    h = u.new_zeros(batch, e, nc, n)
    for t in range(T):
        h = step(h, t)
    end_local = h  # (B, E, nc, N)
    chunk_decay = torch.exp(d_c.sum(-1)[..., None] * A_)  # (B, E, nc, N)

    # 2. start state of every chunk by a sequential carry.
    s = u.new_zeros(batch, e, n) if h0 is None else h0
    starts = []
    for c in range(nc):
        starts.append(s)
        s = chunk_decay[:, :, c] * s + end_local[:, :, c]
    h_last = s
    h = torch.stack(starts, dim=2)  # (B, E, nc, N)

    # 3. rescan each chunk from its true start, reading out y.
    C_t = C_c.permute(0, 2, 3, 1)  # (B, nc, T, N)
    ys = []
    for t in range(T):
        h = step(h, t)
        ys.append((h * C_t[:, None, :, t, :]).sum(-1))  # (B, E, nc)
    y = torch.stack(ys, dim=-1).reshape(batch, e, nc * T)[..., :length]
    if D is not None:
        y = y + D[:, None] * u
    return y, h_last


# --------------------------------------------------------------------------------------------
# "cuda": mamba_ssm's kernel
# --------------------------------------------------------------------------------------------


def _constant_for_compile(fn):
    """Let ``torch.compile`` call ``fn`` once while tracing and use its result as a constant
    instead of tracing into it (imports and ``find_spec`` would break the graph). This is what
    ``torch._dynamo.assume_constant_result`` does, without importing dynamo (seconds) here."""
    fn._dynamo_marked_constant = True
    return fn


#: results of the availability probes (importing mamba_ssm is slow); clear to probe again
_PROBES: dict[str, bool] = {}


def _probe(name: str, modules: tuple[str, ...]) -> bool:
    """Whether every module in ``modules`` imports (cached under ``name``)."""
    if name not in _PROBES:
        try:
            ok = importlib.util.find_spec(modules[0].split(".")[0]) is not None
            for module in modules if ok else ():
                importlib.import_module(module)
        except Exception:  # a broken build raises anything: ImportError, OSError, RuntimeError
            ok = False
        _PROBES[name] = ok
    return _PROBES[name]


@_constant_for_compile
def _mamba_ssm_available() -> bool:
    """Whether ``mamba_ssm``'s selective scan really imports, its compiled extension too.

    A ``mamba_ssm`` whose CUDA build is broken is installed but fails on import (ImportError,
    OSError for an undefined symbol, ...): it counts as absent, so ``auto`` falls back.
    """
    return _probe("mamba_ssm", ("mamba_ssm", "mamba_ssm.ops.selective_scan_interface"))


@_constant_for_compile
def _triton_available() -> bool:
    """Whether triton (and ``triton.language``) imports."""
    return _probe("triton", ("triton", "triton.language"))


def _load_triton() -> BackendFn:
    try:
        module = importlib.import_module("psmamba.nn._scan_triton")
    except Exception as exc:
        raise PsmambaError(
            f"selective_scan backend 'triton' needs triton: pip install triton ({exc})"
        ) from None
    return module.scan_triton


def _load_cuda() -> BackendFn:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or a broken CUDA build raising anything
        raise PsmambaError(
            "selective_scan backend 'cuda' needs mamba_ssm: pip install 'psmamba[cuda]' "
            f"(mamba-ssm, causal-conv1d) on a machine with an NVIDIA GPU ({exc})"
        ) from None

    def scan_cuda(u, delta, A, B, C, D, h0, z=None, delta_bias=None, delta_softplus=False):
        if not u.is_cuda:
            raise PsmambaError(
                f"selective_scan backend 'cuda' needs the tensors on a GPU, they are on {u.device}; "
                "use backend='cpu' or 'auto'"
            )
        if h0 is not None:
            raise PsmambaError("selective_scan backend 'cuda' (mamba_ssm) does not take an initial state h0")
        y, h_last = selective_scan_fn(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            D, z=None if z is None else z.contiguous(), delta_bias=delta_bias,
            delta_softplus=bool(delta_softplus), return_last_state=True,
        )
        return y, h_last

    return scan_cuda


def _load_cpu() -> BackendFn:
    module = importlib.import_module("psmamba.nn._scan_cpu")
    return module.scan_cpu


@_constant_for_compile
def _cpu_available() -> bool:
    return (
        importlib.util.find_spec("numba") is not None
        and importlib.util.find_spec("psmamba.nn._scan_cpu") is not None
    )


register_backend("loop", _scan_loop)
register_backend("reference", _scan_reference)
register_backend("cpu", loader=_load_cpu, is_available=_cpu_available)
register_backend("cuda", loader=_load_cuda, is_available=lambda: _mamba_ssm_available(), fused=True)
register_backend("triton", loader=_load_triton, is_available=lambda: _triton_available(), fused=True)


@_constant_for_compile
def _ensure_loaded(name: str) -> bool:
    """Import the backend ``name`` (its loader runs once); a separate step so that
    ``torch.compile`` runs the import while tracing instead of tracing into it."""
    _REGISTRY[name].get()
    return True


def _on_gpu(u: torch.Tensor) -> bool:
    """Whether ``u`` lives on a GPU (a seam: tests fake a GPU tensor through it)."""
    return u.is_cuda


_warned_slow_gpu = False


def _available(name: str) -> bool:
    return name in _REGISTRY and _REGISTRY[name].available()


def _warn_slow_gpu_once() -> None:
    global _warned_slow_gpu
    if not _warned_slow_gpu:
        _warned_slow_gpu = True
        warnings.warn(
            "slow reference scan on a GPU: install triton or mamba_ssm", RuntimeWarning, stacklevel=3
        )


def resolve_backend(
    backend: str, u: torch.Tensor, h0: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> str:
    """The concrete backend name that ``backend`` means for tensors like ``u``.

    ``"auto"`` on a GPU: ``"cuda"`` when ``mamba_ssm`` imports, the compute dtype (``dtype``,
    default ``u.dtype``) is not float64 and there is no ``h0``; else ``"triton"`` when triton
    imports; else ``"reference"`` (warning once that it is slow). On a CPU: ``"cpu"`` when
    numba is available, else ``"reference"``.
    """
    return _resolve(backend, u, h0 is not None, dtype, warn=True)


def _resolve(backend: str, u: torch.Tensor, with_state: bool, dtype: torch.dtype | None, warn: bool) -> str:
    if backend != "auto":
        if backend not in _REGISTRY:
            raise PsmambaError(
                f"selective_scan: unknown backend {backend!r}; choose one of "
                f"{['auto', *registered_backends()]}"
            )
        return backend
    if _on_gpu(u):
        dtype = u.dtype if dtype is None else dtype
        if dtype != torch.float64 and not with_state and _available("cuda"):
            return "cuda"
        if _available("triton"):
            return "triton"
        if warn:
            _warn_slow_gpu_once()
        return "reference"
    if u.device.type == "cpu" and _available("cpu"):
        return "cpu"
    return "reference"


def piece_backends(backend: str, u: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[str, str] | None:
    """The backends of a sequence like ``u`` run in pieces: ``(first piece, later pieces)`` (the
    later ones continue from the state ``h0`` the previous piece returned), or ``None`` when it
    must run in one piece because no usable backend takes ``h0``.

    ``"cuda"`` (``mamba_ssm``) takes no ``h0``: an explicit ``"cuda"`` runs in one piece, and so
    does ``"auto"`` where it means ``"cuda"`` and triton is missing (the ``"reference"`` scan
    would be far slower). Where triton imports, ``"auto"`` gives ``("cuda", "triton")``: the
    first piece on mamba_ssm, the rest, which carry a state, on triton.
    """
    first = _resolve(backend, u, False, dtype, warn=False)
    later = _resolve(backend, u, True, dtype, warn=False)
    if later == "cuda" or (first == "cuda" and later == "reference"):
        return None
    return first, later


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    backend: str = "auto",
    return_state: bool = False,
    *,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the Mamba v1 selective scan ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``.

    Args:
        u: input ``(B, E, L)``.
        delta: positive step sizes ``(B, E, L)`` (softplus already applied).
        A: state matrix diagonal ``(E, N)``, normally ``-exp(A_log)``.
        B: input projection ``(B, N, L)``.
        C: output projection ``(B, N, L)``.
        D: skip weights ``(E,)`` or ``None`` (no skip term).
        h0: initial state ``(B, E, N)`` or ``None`` (zeros).
        backend: ``"auto"``, ``"reference"``, ``"loop"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or a
            registered name.
        return_state: also return the final state ``h_L``.
        z: gate ``(B, E, L)`` or ``None``: the output is ``y * silu(z)``.
        delta_bias: ``(E,)`` added to ``delta`` (then a raw ``dt``) or ``None``.
        delta_softplus: take ``softplus(delta + delta_bias)`` as the step sizes.

    Returns:
        ``y`` ``(B, E, L)`` in ``u``'s dtype, or ``(y, h_L)`` with ``h_L`` ``(B, E, N)`` in the
        compute dtype (float64 if any input is float64, else float32).

    Raises:
        PsmambaError: bad shapes, dtypes, devices or an unusable backend.
    """
    _check_inputs(u, delta, A, B, C, D, h0, z, delta_bias)
    cdt = _compute_dtype(u, delta, A, B, C, D, h0)
    name = resolve_backend(backend, u, h0, dtype=cdt)
    entry = _REGISTRY[name]
    # (for "cuda" and "triton" an unavailable backend's loader raises its actionable message)
    _ensure_loaded(name)
    fn = entry.get()
    args = [None if t is None else t.to(cdt) for t in (u, delta, A, B, C, D, h0)]
    fuse = z is not None or delta_bias is not None or delta_softplus
    if fuse and entry.fused:
        y, h_last = fn(*args, z=None if z is None else z.to(cdt),
                       delta_bias=None if delta_bias is None else delta_bias.to(cdt), delta_softplus=bool(delta_softplus))
        y = y.to(u.dtype)
    else:
        if delta_bias is not None:
            args[1] = args[1] + delta_bias.to(cdt)[:, None]
        if delta_softplus:
            args[1] = torch.nn.functional.softplus(args[1])
        y, h_last = fn(*args)
        y = y.to(u.dtype)
        if z is not None:
            y = y * torch.nn.functional.silu(z)
    if return_state:
        return y, h_last
    return y
