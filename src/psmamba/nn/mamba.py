"""A Mamba (v1) layer with ``mamba_ssm.Mamba``'s parameters, running on any scan backend.

The parameter names, shapes and initialisation are those of ``mamba_ssm.Mamba`` (v1, the
"simple" module), so a state dict moves between the two with ``strict=True``:

==============  =====================================  =========================================
name            shape                                  initialisation
==============  =====================================  =========================================
in_proj.weight  (2E, D)                                nn.Linear default (no bias by default)
conv1d.weight   (E, 1, d_conv)                         nn.Conv1d default (depthwise, groups=E)
conv1d.bias     (E,)                                   nn.Conv1d default
x_proj.weight   (dt_rank + 2N, E)                      nn.Linear default, no bias
dt_proj.weight  (E, dt_rank)                           U(-s, s), s = dt_rank^-0.5 * dt_scale
dt_proj.bias    (E,)                                   softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
A_log           (E, N)                                 log(1..N) in every row (S4D-real)
D               (E,)                                   ones
out_proj.weight (D, E)                                 nn.Linear default (no bias by default)
==============  =====================================  =========================================

with ``E = expand * d_model`` and ``dt_rank = ceil(d_model / 16)`` when ``"auto"``. ``A_log``
and ``D`` carry ``_no_weight_decay = True`` as in ``mamba_ssm``.

The layer is only the token mixer: a block puts its own norm and residual around it (as
:class:`psmamba.nn.blocks.MambaMixer` does).

Long sequences: a sequence can run in pieces through :meth:`Mamba.forward_chunk`, each piece
continuing from the :class:`MambaState` the previous one returned (the scan state and the last
``d_conv - 1`` convolution inputs); :meth:`Mamba.forward` does so itself. Without autograd
(``torch.no_grad()`` or no parameter needing a gradient) the pieces have
``runtime.current().mamba_inference_chunk`` tokens, so a 4.9 M-token level never holds several
``(B, L, 2E)`` tensors at once; a block can drive the pieces itself to apply its per-token steps
piece by piece too. In training, pieces of ``mamba_train_chunk`` tokens are checkpointed
(``torch.utils.checkpoint``): only each piece's input and carried state are kept for the
backward pass, which recomputes the piece. Both equal the one-piece computation (to rounding);
the sizes are settings of :mod:`psmamba.runtime`.

Inference with the ``"cpu"`` backend runs fused numba kernels. Where the inner channels fill
whole 16-channel vectors for every thread (every level of the paper model on a few cores) they
are time-major: tokens stay ``(B, l, channels)``, each projection is one plain GEMM, and the scan
vectorises over channels (:meth:`Mamba._forward_piece_fused_tm`); otherwise channels-first with
vectors over the states (:meth:`Mamba._forward_piece_fused_cf`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import runtime
from psmamba.errors import PsmambaError
from psmamba.nn.scan import piece_backends, resolve_backend, selective_scan

__all__ = ["Mamba", "MambaState"]


class MambaState(NamedTuple):
    """What a Mamba layer carries from one piece of a sequence to the next (one layout for
    every backend and inference path).

    * ``conv``: the last ``d_conv - 1`` inputs of the causal convolution, ``(B, E, d_conv - 1)``;
    * ``ssm``: the scan state after the last token, ``(B, E, N)``, in the compute dtype
      (float32, or float64 for a float64 model).
    """

    conv: torch.Tensor
    ssm: torch.Tensor


def _linear_channels_first(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight @ x[b].T`` for every batch item: ``(B, l, d_in)`` -> ``(B, d_out, l)``, contiguous.

    One GEMM per batch item with the transposed operand handed to BLAS; ``torch.matmul`` with
    a 2-D weight would compute ``x @ W.T`` and then transpose it by copying (slow: at level 1
    that copy cost more than the GEMM itself).
    """
    if x.shape[0] == 1:
        return torch.mm(weight, x[0].t()).unsqueeze(0)
    return torch.stack([torch.mm(weight, x[b].t()) for b in range(x.shape[0])])


class Mamba(nn.Module):
    """Mamba v1 token mixer: ``(B, L, d_model) -> (B, L, d_model)``.

    Per token: ``in_proj`` gives ``x`` and ``z`` (``E`` each); ``x`` goes through a causal
    depthwise Conv1d and SiLU; ``x_proj`` gives ``dt`` (``dt_rank``), ``B`` and ``C`` (``N``
    each); ``delta = softplus(dt_proj(dt))``; ``y = selective_scan(x, delta, -exp(A_log), B, C, D)``;
    the output is ``out_proj(y * SiLU(z))``.

    Args:
        d_model: token width ``D``.
        d_state: state size ``N`` per channel.
        d_conv: causal convolution width.
        expand: ``E = expand * d_model``.
        dt_rank: rank of the ``dt`` projection, ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: ``mamba_ssm``'s dt initialisation.
        conv_bias: bias on the depthwise convolution.
        bias: bias on ``in_proj`` and ``out_proj``.
        backend: scan backend (see :mod:`psmamba.nn.scan`); may be changed later through the
            ``backend`` attribute.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(value, int) or value < 1:
                raise PsmambaError(f"Mamba: {name} must be a positive integer, got {value!r}")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise PsmambaError(f"Mamba: dt_rank must be 'auto' or a positive integer, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise PsmambaError(f"Mamba: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if dt_init not in ("random", "constant"):
            raise PsmambaError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend

        e = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * e, bias=bias)
        self.conv1d = nn.Conv1d(e, e, kernel_size=d_conv, groups=e, padding=d_conv - 1, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(e, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, e, bias=True)

        # dt initialisation of mamba_ssm: weights keep the variance of dt_proj's output at
        # dt_scale^2/3 ...
        std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            # ... and the bias makes softplus(bias) log-uniform in [dt_min, dt_max] (floored).
            dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            # softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), stable for small dt.
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation: A = -(1..N) in every channel, stored as its log.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(e, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(e))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(e, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"expand={self.expand}, dt_rank={self.dt_rank}, backend={self.backend!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix tokens along the sequence.

        Long sequences run in pieces (see the module docstring): without autograd of
        ``runtime.current().mamba_inference_chunk`` tokens through :meth:`forward_chunk`, in
        training of ``mamba_train_chunk`` tokens, each checkpointed.

        Args:
            x: ``(B, L, d_model)``.

        Returns:
            ``(B, L, d_model)``.
        """
        self._check_input(x)
        length = x.shape[1]
        training = self.needs_grad(x)
        chunk = self.chunk_length(x, training)
        if chunk >= length:
            return self.forward_chunk(x)[0]
        state = None
        if training:
            # Each piece is checkpointed (only its input and the carried state are kept; its
            # intermediates are recomputed in the backward pass), so the layer's saved memory
            # does not grow with L * E.
            from torch.utils.checkpoint import checkpoint

            outs = []
            for start in range(0, length, chunk):
                o, state = checkpoint(self.forward_chunk, x[:, start : start + chunk], state, use_reentrant=False)
                outs.append(o)
            return torch.cat(outs, dim=1)
        # Inference: only one piece's intermediates live at a time.
        out = x.new_empty(x.shape)
        for start in range(0, length, chunk):
            out[:, start : start + chunk], state = self.forward_chunk(x[:, start : start + chunk], state)
        return out

    def forward_chunk(
        self, x: torch.Tensor, state: MambaState | None = None
    ) -> tuple[torch.Tensor, MambaState]:
        """One piece of a longer sequence, continuing from ``state``.

        Running a sequence piece by piece, each call getting the state the previous one
        returned, gives the one-piece output (to rounding); a caller may apply per-token steps
        (a norm, a residual) to each piece around it. Without autograd on the ``"cpu"``
        backend this runs the fused inference kernels.

        Args:
            x: ``(B, l, d_model)``, the next ``l`` tokens.
            state: what the previous piece returned, or ``None`` at the start of the sequence
                (an explicit ``"cuda"`` backend takes only ``None``: mamba_ssm carries no state
                in; ``"auto"`` continues such a piece on ``"triton"``).

        Returns:
            ``(out (B, l, d_model), state)`` with the state after the last token.
        """
        self._check_input(x)
        if not self.needs_grad(x) and resolve_backend(self.backend, x) == "cpu":
            from psmamba.nn import _scan_cpu

            if _scan_cpu.use_time_major(self.d_inner, x.shape[0], _scan_cpu.threads()):
                return self._forward_piece_fused_tm(x, state)
            return self._forward_piece_fused_cf(x, state)
        return self._forward_piece(x, state)

    def needs_grad(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` records autograd (grad mode on and ``x`` or a parameter
        requiring a gradient): decides between training and inference pieces."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def chunk_length(self, x: torch.Tensor, training: bool) -> int:
        """Tokens per piece for the sequence ``x`` ``(B, L, d_model)``: the runtime's
        ``mamba_train_chunk`` or ``mamba_inference_chunk``, or ``L`` (one piece) where that is
        0 or no usable backend can carry the state between pieces.

        ``mamba_ssm`` (``"cuda"``) takes no initial state. With ``backend="auto"`` on a GPU the
        first piece still runs on it and the later pieces, which start from a state, on
        ``"triton"`` (:func:`psmamba.nn.scan.piece_backends`); only an explicit ``"cuda"``, or
        a GPU without triton, keeps the whole sequence in one piece (every intermediate of the
        4.9 M-token level 1 then stays for the backward pass).
        """
        settings = runtime.current()
        chunk = settings.mamba_train_chunk if training else settings.mamba_inference_chunk
        length = x.shape[1]
        if not chunk or chunk >= length:
            return length
        if piece_backends(self.backend, x) is None:
            return length
        return chunk

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise PsmambaError(f"Mamba: input must be (B, L, {self.d_model}), got {tuple(x.shape)}")

    def _forward_piece_fused_tm(
        self, x: torch.Tensor, state: MambaState | None
    ) -> tuple[torch.Tensor, MambaState]:
        """:meth:`_forward_piece` for inference on the CPU with the time-major fused numba kernels.

        Same numbers (to float rounding), no autograd, but everything time-major, as the
        tokens arrive: the kernels take the conv history ``(B, d_conv - 1, E)`` and the scan
        state ``(B, N, E)``, transposed views of the carried :class:`MambaState`. Every matmul
        is a plain ``(l, in) @ W^T`` and the scan's vectors run over channels (see
        :mod:`psmamba.nn._scan_cpu.inference`).
        """
        from psmamba.nn._scan_cpu import conv_silu_tm_cpu, fused_scan_tm_cpu

        batch, length, _ = x.shape
        e, k = self.d_inner, self.d_conv
        xz = F.linear(x, self.in_proj.weight, self.in_proj.bias)  # (B, l, 2E)
        if state is None:
            conv_hist, h0 = xz.new_zeros(batch, k - 1, e), None
        else:
            conv_hist, h0 = state.conv.transpose(1, 2), state.ssm.transpose(1, 2)  # time-major views
        new_hist = torch.cat([conv_hist, xz[:, max(0, length - (k - 1)) :, :e]], dim=1)[:, -(k - 1) :]
        xc = conv_silu_tm_cpu(xz, conv_hist, self.conv1d.weight, self.conv1d.bias)  # (B, l, E)
        xdbl = F.linear(xc, self.x_proj.weight)  # (B, l, dt_rank + 2N): dt_low, B_t, C_t
        hi = torch.promote_types(self.A_log.dtype, torch.float32)
        A = -torch.exp(self.A_log.to(hi))
        y, h_last = fused_scan_tm_cpu(
            xc, xdbl, self.dt_proj.weight, self.dt_proj.bias, A, self.D.to(hi), xz, h0
        )
        out = F.linear(y, self.out_proj.weight, self.out_proj.bias)  # (B, l, d_model)
        # back to the one state layout: (B, E, d_conv - 1) and (B, E, N) views
        return out, MambaState(new_hist.contiguous().transpose(1, 2), h_last.transpose(1, 2))

    def _forward_piece_fused_cf(
        self, x: torch.Tensor, state: MambaState | None
    ) -> tuple[torch.Tensor, MambaState]:
        """:meth:`_forward_piece` for inference on the CPU with the channels-first fused numba
        kernels (vectors over the N states): used where the time-major kernels of
        :meth:`_forward_piece_fused_tm` would not fill a vector per thread.

        Same contract and the same numbers (to float rounding); no autograd.
        """
        from psmamba.nn._scan_cpu import conv_silu_cpu, fused_scan_cpu

        batch, length, _ = x.shape
        e, n, k, r = self.d_inner, self.d_state, self.d_conv, self.dt_rank
        xz = _linear_channels_first(x, self.in_proj.weight)  # (B, 2E, l)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        xs = xz[:, :e]  # (B, E, l) view; z is the second half, read by the kernel
        conv_hist, h0 = (xs.new_zeros(batch, e, k - 1), None) if state is None else state
        new_hist = torch.cat([conv_hist, xs[..., max(0, length - (k - 1)) :]], dim=-1)[..., -(k - 1) :]
        xc = conv_silu_cpu(xz, conv_hist, self.conv1d.weight, self.conv1d.bias)  # (B, E, l)
        w_dt, w_b, w_c = self.x_proj.weight.split([r, n, n], dim=0)
        dt_low = torch.matmul(w_dt, xc)  # (B, dt_rank, l)
        xc_t = xc.transpose(1, 2)
        b_in = torch.matmul(xc_t, w_b.t())  # (B, l, N)
        c_out = torch.matmul(xc_t, w_c.t())
        hi = torch.promote_types(self.A_log.dtype, torch.float32)
        A = -torch.exp(self.A_log.to(hi))
        y, h_last = fused_scan_cpu(
            xc, dt_low, self.dt_proj.weight, self.dt_proj.bias, A, b_in, c_out, self.D.to(hi), xz, h0
        )
        out = torch.matmul(y.transpose(1, 2), self.out_proj.weight.t())  # (B, l, d_model)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return out, MambaState(new_hist.contiguous(), h_last)

    def _forward_piece(
        self, x: torch.Tensor, state: MambaState | None
    ) -> tuple[torch.Tensor, MambaState]:
        """One piece of the sequence with any scan backend, differentiable.

        Args:
            x: ``(B, l, d_model)``.
            state: the carried :class:`MambaState`, or ``None`` at the start of the sequence
                (a zero conv history, as the causal padding, and no initial scan state).

        Returns:
            ``(out (B, l, d_model), state after the piece)``.
        """
        batch, length, _ = x.shape
        e, n, k, r = self.d_inner, self.d_state, self.d_conv, self.dt_rank
        # Channels-first throughout, as mamba_ssm's own slow path: every matmul writes its
        # result directly in the layout the next step reads (BLAS takes the transposed
        # operands), so no (B, l, E) tensor is ever transposed by copying.
        xz = _linear_channels_first(x, self.in_proj.weight)  # (B, 2E, l)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        xs, z = xz[:, :e], xz[:, e:]  # (B, E, l) each, rows contiguous
        conv_hist, h0 = (xs.new_zeros(batch, e, k - 1), None) if state is None else state
        # Causal depthwise convolution: prepend the history instead of padding on both sides
        # and cropping (same numbers as conv1d(x)[..., :l], and it carries across pieces).
        xpad = torch.cat([conv_hist, xs], dim=-1)  # (B, E, k - 1 + l)
        new_hist = xpad[..., xpad.shape[-1] - (k - 1) :].clone()  # a copy: frees xpad
        xc = self.act(F.conv1d(xpad, self.conv1d.weight, self.conv1d.bias, groups=e))  # (B, E, l)
        del xpad, xs

        w_dt, w_b, w_c = self.x_proj.weight.split([r, n, n], dim=0)  # rows of x_proj
        dt = torch.matmul(w_dt, xc)  # (B, dt_rank, l)
        # raw steps (B, E, l): the scan forms delta = softplus(dt + dt_proj.bias) itself (inside
        # the kernels of the fused backends, "triton" and "cuda"; in PyTorch for the others)
        dt_raw = torch.matmul(self.dt_proj.weight, dt)
        # B and C time-major (B, l, N), handed over as (B, N, l) views: the scan backends read
        # one row of N values per time step.
        xc_t = xc.transpose(1, 2)  # (B, l, E) view
        b_in = torch.matmul(xc_t, w_b.t()).transpose(1, 2)  # (B, N, l) view of (B, l, N)
        c_out = torch.matmul(xc_t, w_c.t()).transpose(1, 2)
        # A and D at least in float32 (as mamba_ssm keeps them), float64 in a float64 model
        hi = torch.promote_types(self.A_log.dtype, torch.float32)
        A = -torch.exp(self.A_log.to(hi))  # (E, N)
        # y = scan(...) * SiLU(z) (B, E, l), the gate fused like the softplus
        y, h_last = selective_scan(
            xc, dt_raw, A, b_in, c_out, self.D.to(hi), h0=h0, backend=self.backend, return_state=True,
            z=z, delta_bias=self.dt_proj.bias, delta_softplus=True,
        )
        del dt_raw, dt, b_in, c_out
        out = torch.matmul(y.transpose(1, 2), self.out_proj.weight.t())  # (B, l, d_model)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return out, MambaState(new_hist, h_last)
