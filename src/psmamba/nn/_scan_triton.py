"""The ``"triton"`` selective-scan backend: Triton kernels, forward and backward.

Same contract as the other backends of :mod:`psmamba.nn.scan` (``(u, delta, A, B, C, D, h0)
-> (y, h_last)``, ``h0`` accepted, so the Mamba layer can carry the state across pieces on a
GPU as it does on a CPU). Computes in float32 (float64 for float64 inputs, which lets
``gradcheck`` run under the interpreter); ``y`` comes back in ``u``'s dtype, ``h_last`` in the
compute dtype. Fused into the kernels: the ``D u`` skip term and, when the caller hands them
over (the backend is registered as fusing, see :func:`psmamba.nn.scan.register_backend`), the
step sizes ``delta = softplus(dt + delta_bias)`` from the raw ``dt`` and the output gate
``y * silu(z)``, forward and backward: neither ``delta`` nor the ungated ``y`` is ever
written to memory, and the backward pass recomputes them where it needs them.

Runs where triton imports and the tensors are on a GPU, or on CPU tensors when
``TRITON_INTERPRET=1`` is set (Triton's interpreter: slow, for tests).

Technique: the sequence is cut into chunks of ``T`` steps (:data:`CHUNK`); a program handles
one chunk of one batch item and scans it as a ``tl.associative_scan`` over ``(channels, T,
N)`` tiles (see :mod:`psmamba.nn._scan_triton_kernels`). Forward: (1) every chunk's end state
from a zero start, all chunks in parallel; (2) a sequential carry over the chunks (only
``B x E x N`` values per step) giving each chunk's start state, kept as the checkpoint, and
``h_last``; (3) every chunk again from its start state, writing ``y``. Backward, the same
three passes on the adjoint ``G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1}`` from the last chunk;
the last pass recomputes the states from the checkpoints and forms all gradients. Memory
kept for the backward: the inputs and the chunk start states ``(B, L/T, E, N)``, never the
per-step states ``(B, E, L, N)``.

``torch.compile``: the forward and the backward are ``torch.library.custom_op``\\ s
(``psmamba::triton_scan_fwd``/``_bwd``) with a registered autograd formula and fake
(meta) implementations, so compile treats the scan as one opaque node (no graph break).
On a torch without ``torch.library.custom_op`` (< 2.4) an ``autograd.Function`` is used.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch

from psmamba.errors import PsmambaError

__all__ = ["scan_triton", "CHUNK", "interpreting", "interpreter_usable", "kernels", "fast_interpreter_scan"]

#: time steps per chunk (a power of two): the tile length of the kernels and the checkpoint
#: interval of the forward pass
CHUNK = 64
#: elements per (channels, T, N) tile that one program scans at a time
_TILE_ELEMENTS = 2048
_NUM_WARPS = 4

_KERNEL_MODULE = "psmamba.nn._scan_triton_kernels"
_kernels_mode: Optional[bool] = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` set), read now."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_usable() -> bool:
    """Whether Triton's interpreter can run kernels in this process: ``TRITON_INTERPRET`` is set
    now *and* was set when ``triton.language`` was imported (triton defines its own library
    functions, ``tl.sum`` and the like, in the mode of that moment)."""
    if not interpreting():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(tl, "cdiv", None), InterpretedFunction)


def kernels():
    """The kernel module, (re)imported so that its kernels match the current interpreter mode
    (``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined, not when it runs)."""
    global _kernels_mode
    mode = interpreting()
    if mode and not interpreter_usable():
        raise PsmambaError(
            "selective_scan backend 'triton': TRITON_INTERPRET=1 was set after triton was imported; "
            "set it before Python starts (or before the first import of triton)"
        )
    module = sys.modules.get(_KERNEL_MODULE)
    if module is None:
        module = importlib.import_module(_KERNEL_MODULE)
    elif _kernels_mode != mode:
        module = importlib.reload(module)
    _kernels_mode = mode
    return module


class fast_interpreter_scan:
    """Context: Triton's interpreter runs ``tl.associative_scan`` vectorised (tests, smoke runs).

    The interpreter's own ``ScanOps.generic_scan`` calls the combine function once per element
    from Python; this replacement runs the same left-to-right fold one step of the scanned
    axis at a time over whole slices of the other axes: the same operations in the same order
    (bit-identical results), 10-20x faster on the backend's tiles. It changes nothing on a GPU,
    and nothing where the triton version lacks that hook (the slow loop stays).
    """

    def __enter__(self):
        self._saved = None
        try:
            from triton.runtime import interpreter as interp
        except ImportError:
            return self
        ops = getattr(interp, "ScanOps", None)
        if ops is not None and hasattr(ops, "generic_scan"):
            self._saved = (ops, ops.generic_scan)
            ops.generic_scan = _vectorised_generic_scan
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            ops, original = self._saved
            ops.generic_scan = original
        return False


def _vectorised_generic_scan(self, input):
    """``ScanOps.generic_scan`` of the interpreter, one combine per step over whole slices."""
    import numpy as np

    datas = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in input]
    outs = [np.empty_like(d) for d in datas]
    acc = None
    for k in range(datas[0].shape[0]):
        cur = tuple(self.to_tensor(np.ascontiguousarray(d[k]), arg.dtype) for d, arg in zip(datas, input))
        if acc is None:
            acc = cur
        else:
            ret = self.combine_fn.fn(*acc, *cur)
            acc = ret if isinstance(ret, tuple) else (ret,)
        for o, a in zip(outs, acc):
            o[k] = a.handle.data
    return [
        self.to_tensor(np.ascontiguousarray(np.moveaxis(o, 0, self.axis)), arg.dtype)
        for o, arg in zip(outs, input)
    ]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _config(batch: int, e: int, n: int, length: int, chunk: int, block_e: int | None, groups: int | None, device):
    """Launch shape: (nc chunks, BN padded states, BE channels per block, G channel groups)."""
    if chunk < 1 or chunk & (chunk - 1):
        raise PsmambaError(f"selective_scan backend 'triton': chunk must be a power of two, got {chunk}")
    nc = -(-length // chunk)
    bn = _next_pow2(n)
    be = block_e if block_e is not None else max(1, min(_next_pow2(e), _TILE_ELEMENTS // (chunk * bn)))
    n_blocks = -(-e // be)
    if groups is None:
        if device.type == "cuda" and not interpreting():
            # enough programs to fill the GPU; each group adds a (B, N, L) slice of dB/dC partials
            sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
            groups = max(1, min(n_blocks, 8, -(-4 * sms // max(1, batch * nc))))
        else:
            groups = 1
    return nc, bn, be, max(1, min(int(groups), n_blocks))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Device:
    """``torch.cuda.device(t.device)`` for GPU tensors (Triton launches on the current device)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def _forward_impl(u, delta, A, B, C, D, h0, z, delta_bias, softplus: bool, chunk: int, block_e: int, groups: int):
    """Run the three forward passes; returns ``(y, h_last, start states (B, nc, E, N))``.

    ``delta`` is the raw ``dt`` when ``delta_bias``/``softplus`` are given (the kernels form
    ``softplus(dt + bias)``); ``y`` is gated by ``silu(z)`` when ``z`` is given."""
    if not (u.is_cuda or interpreting()):
        raise PsmambaError(
            f"selective_scan backend 'triton' needs the tensors on a GPU (or TRITON_INTERPRET=1 for "
            f"Triton's interpreter on the CPU), they are on {u.device}; use backend='auto'"
        )
    if importlib.util.find_spec("triton") is None:
        raise PsmambaError("selective_scan backend 'triton' needs triton: pip install triton")
    k = kernels()
    batch, e, length = u.shape
    n = A.shape[1]
    nc, bn, be, g = _config(batch, e, n, length, chunk, block_e or None, groups or None, u.device)
    dtype = u.dtype
    A = A.contiguous()
    y = torch.empty(batch, e, length, dtype=dtype, device=u.device)
    states = torch.empty(batch, nc, e, n, dtype=dtype, device=u.device)
    dts = torch.empty(batch, nc, e, dtype=dtype, device=u.device)
    h_last = torch.empty(batch, e, n, dtype=dtype, device=u.device)
    d_arg = D if D is not None else A  # any pointer; not read without HAS_D
    h0_arg = h0.contiguous() if h0 is not None else h_last
    z_arg = z if z is not None else u  # likewise: not read without HAS_Z
    bias_arg = delta_bias if delta_bias is not None else A
    strides = (*u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z_arg.stride())
    fused = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus))
    with _Device(u):
        for output in (False, True):
            if output:
                k.carry_kernel[(batch, -(-e // be))](
                    states, dts, A, h0_arg, h_last, nc, e, n,
                    HAS_INIT=h0 is not None, REVERSE=False, BE=be, BN=bn, num_warps=_NUM_WARPS,
                )
            k.fwd_chunk_kernel[(nc, batch, g)](
                u, delta, A, B, C, d_arg, z_arg, bias_arg, states, y, dts, length, e, n, *strides,
                T=chunk, BE=be, BN=bn, HAS_D=D is not None, OUTPUT=output, num_warps=_NUM_WARPS, **fused,
            )
    return y, h_last, states


def _backward_impl(u, delta, A, B, C, D, z, delta_bias, softplus: bool, states, dy, dh_last,
                   chunk: int, block_e: int, groups: int):
    """Run the three backward passes; returns ``(du, ddelta, dA, dB, dC, dD, dh0, dz, dbias)``
    (``ddelta`` that of the raw ``dt`` when fused; ``dz`` and ``dbias`` empty when absent)."""
    k = kernels()
    batch, e, length = u.shape
    n = A.shape[1]
    nc, bn, be, g = _config(batch, e, n, length, chunk, block_e or None, groups or None, u.device)
    dtype = u.dtype
    dev = u.device
    A = A.contiguous()
    gnext = torch.empty(batch, nc, e, n, dtype=dtype, device=dev)
    dts = torch.empty(batch, nc, e, dtype=dtype, device=dev)
    g0 = torch.empty(batch, e, n, dtype=dtype, device=dev)
    du = torch.empty(batch, e, length, dtype=dtype, device=dev)
    ddt = torch.empty_like(du)
    da_part = torch.empty(batch, nc, e, n, dtype=dtype, device=dev)
    db_part = torch.empty(g, batch, n, length, dtype=dtype, device=dev)
    dc_part = torch.empty_like(db_part)
    d_arg = D if D is not None else A
    z_arg = z if z is not None else u
    bias_arg = delta_bias if delta_bias is not None else A
    dz = torch.empty_like(du) if z is not None else du.new_empty(0)
    fused = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus))
    with _Device(u):
        k.bwd_local_kernel[(nc, batch, g)](
            delta, A, C, dy, z_arg, bias_arg, gnext, dts, length, e, n,
            *delta.stride(), *C.stride(), *dy.stride(), *z_arg.stride(),
            T=chunk, BE=be, BN=bn, num_warps=_NUM_WARPS, **fused,
        )
        k.carry_kernel[(batch, -(-e // be))](
            gnext, dts, A, dh_last.contiguous(), g0, nc, e, n,
            HAS_INIT=True, REVERSE=True, BE=be, BN=bn, num_warps=_NUM_WARPS,
        )
        k.bwd_chunk_kernel[(nc, batch, g)](
            u, delta, A, B, C, d_arg, dy, z_arg, bias_arg, states, gnext, du, ddt, da_part, db_part, dc_part,
            dz, length, e, n, batch,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *dy.stride(), *z_arg.stride(),
            T=chunk, BE=be, BN=bn, HAS_D=D is not None, num_warps=_NUM_WARPS, **fused,
        )
    dA = da_part.sum(dim=(0, 1))
    dB = db_part.sum(0) if g > 1 else db_part[0]
    dC = dc_part.sum(0) if g > 1 else dc_part[0]
    dy_pre = dy * torch.nn.functional.silu(z) if z is not None else dy  # gradient of the ungated y
    dD = (dy_pre * u).sum(dim=(0, 2))
    # h_0 enters only through h_1 = exp(delta_1 A) h_0 + ...: dh0 = a_1 G_1
    delta0 = delta[:, :, :1]
    if delta_bias is not None:
        delta0 = delta0 + delta_bias[:, None]
    if softplus:
        delta0 = torch.nn.functional.softplus(delta0)
    dh0 = torch.exp(delta0 * A[None]) * g0
    dbias = ddt.sum(dim=(0, 2)) if delta_bias is not None else du.new_empty(0)
    return du, ddt, dA, dB, dC, dD, dh0, dz, dbias


# ---------------------------------------------------------------------------------------------
# Autograd: custom ops (opaque to torch.compile), or an autograd.Function on an old torch
# ---------------------------------------------------------------------------------------------

_HAS_CUSTOM_OP = hasattr(torch, "library") and hasattr(torch.library, "custom_op")

if _HAS_CUSTOM_OP:

    @torch.library.custom_op("psmamba::triton_scan_fwd", mutates_args=())
    def _fwd_op(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: Optional[torch.Tensor], h0: Optional[torch.Tensor], z: Optional[torch.Tensor],
        delta_bias: Optional[torch.Tensor], softplus: bool, chunk: int, block_e: int, groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward_impl(u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups)

    @_fwd_op.register_fake
    def _(u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups):
        batch, e, length = u.shape
        n = A.shape[1]
        return (
            u.new_empty(batch, e, length),
            u.new_empty(batch, e, n),
            u.new_empty(batch, -(-length // chunk), e, n),
        )

    @torch.library.custom_op("psmamba::triton_scan_bwd", mutates_args=())
    def _bwd_op(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], softplus: bool,
        states: torch.Tensor, dy: torch.Tensor, dh_last: torch.Tensor, chunk: int, block_e: int, groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
               torch.Tensor, torch.Tensor]:
        return _backward_impl(u, delta, A, B, C, D, z, delta_bias, softplus, states, dy, dh_last, chunk, block_e, groups)

    @_bwd_op.register_fake
    def _(u, delta, A, B, C, D, z, delta_bias, softplus, states, dy, dh_last, chunk, block_e, groups):
        batch, e, length = u.shape
        n = A.shape[1]
        return (
            torch.empty_like(u), torch.empty_like(u), A.new_empty(e, n),
            u.new_empty(batch, n, length), u.new_empty(batch, n, length),
            u.new_empty(e), u.new_empty(batch, e, n),
            torch.empty_like(u) if z is not None else u.new_empty(0),
            u.new_empty(e) if delta_bias is not None else u.new_empty(0),
        )

    def _setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
        ctx.cfg = (chunk, block_e, groups)
        ctx.softplus = softplus
        ctx.has_h0 = h0 is not None

    def _backward(ctx, dy, dh_last, _dstates):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype)
        dh_last = (
            u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if dh_last is None else dh_last.to(u.dtype)
        )
        du, ddt, dA, dB, dC, dD, dh0, dz, dbias = _bwd_op(
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, states, dy, dh_last, *ctx.cfg
        )
        return (
            du, ddt, dA, dB, dC, dD if D is not None else None, dh0 if ctx.has_h0 else None,
            dz if z is not None else None, dbias if delta_bias is not None else None, None, None, None, None,
        )

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    def _apply(u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups):
        y, h_last, _ = _fwd_op(u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups)
        return y, h_last

else:  # pragma: no cover - torch < 2.4

    class _ScanFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups):
            y, h_last, states = _forward_impl(u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups)
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.cfg = (chunk, block_e, groups)
            ctx.softplus = softplus
            ctx.has_h0 = h0 is not None
            return y, h_last

        @staticmethod
        def backward(ctx, dy, dh_last):
            u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
            dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype).contiguous()
            dh_last = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if dh_last is None else dh_last.to(u.dtype)
            du, ddt, dA, dB, dC, dD, dh0, dz, dbias = _backward_impl(
                u, delta, A, B, C, D, z, delta_bias, ctx.softplus, states, dy, dh_last, *ctx.cfg
            )
            return (du, ddt, dA, dB, dC, dD if D is not None else None, dh0 if ctx.has_h0 else None,
                    dz if z is not None else None, dbias if delta_bias is not None else None, None, None, None, None)

    def _apply(u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups):
        return _ScanFn.apply(u, delta, A, B, C, D, h0, z, delta_bias, softplus, chunk, block_e, groups)


def scan_triton(u, delta, A, B, C, D=None, h0=None, *, z=None, delta_bias=None, delta_softplus: bool = False,
                chunk: int | None = None, block_e: int | None = None, groups: int | None = None):
    """Backend entry point for :func:`psmamba.nn.scan.selective_scan` (layout of that module).

    Args:
        u, delta, A, B, C, D, h0: as in :func:`psmamba.nn.scan.selective_scan`.
        z, delta_bias, delta_softplus: the fused steps, as in ``selective_scan``: ``delta`` is
            then the raw ``dt``, the kernels use ``softplus(dt + delta_bias)`` (either part
            optional) and return ``y * silu(z)``.
        chunk: steps per chunk, a power of two (default :data:`CHUNK`).
        block_e: channels per tile (default: a tile of about 2048 elements).
        groups: channel groups per chunk, i.e. programs per (chunk, batch item) (default: enough
            to fill the GPU; 1 under the interpreter).

    Returns:
        ``(y (B, E, L) in u's dtype, h_last (B, E, N) in the compute dtype)``.
    """
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    args = [None if t is None else t.to(cdt) for t in (u, delta, A, B, C, D, h0, z, delta_bias)]
    batch, e, length = u.shape
    if length == 0:
        h = u.new_zeros(batch, e, A.shape[1], dtype=cdt) if h0 is None else args[6]
        return u.new_zeros(batch, e, 0), h
    y, h_last = _apply(*args, bool(delta_softplus), int(chunk or CHUNK), int(block_e or 0), int(groups or 0))
    return y.to(u.dtype), h_last
