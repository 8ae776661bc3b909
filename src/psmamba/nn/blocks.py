"""Building blocks of PSMamba-Net (``shared/spec/architecture.md``, sections 1-3).

Every block here is shape-preserving over the spatial axes and works on ``(B, C, D, H, W)``
volumes unless stated otherwise. The blocks are:

* :class:`ConvNormAct` / :func:`ConvIN`: Conv3d (with bias) -> InstanceNorm3d (no affine) -> activation.
* :class:`SE`: squeeze-and-excitation with ``max(1, ch // r)`` hidden units.
* :class:`RMSNorm`: ``x * rsqrt(mean(x^2) + eps) * (1 + g)`` with ``g`` initialised to ones.
* :class:`LevelProjection`: the per-level Linear(C, C) -> RMSNorm, channels-last.
* :class:`SFE`: the spatial feature extraction of the spatial Mamba block.
* :class:`SMB`: SFE -> token mixer with residual -> InstanceNorm -> MLP. The token mixer is the
  Mamba layer (:class:`MambaMixer`) in the paper's block; :class:`MambaBlock` drops the SFE and
  :class:`TransformerBlock` swaps the Mamba layer for multi-head self-attention
  (:class:`AttentionMixer`). :class:`ConvBlock` (two ConvIN layers) is the ablations' "conv" block.

Conv biases in front of a non-affine InstanceNorm
-------------------------------------------------
The reference code gives every convolution a bias, including the ones directly followed by an
``InstanceNorm3d`` without affine parameters. Instance norm subtracts each channel's mean, so
those biases have no effect on the output and receive an exactly-zero gradient (up to rounding).
They are kept so that the parameter count and checkpoints match the reference (8,408,047 + 16);
:func:`inert_parameters` lists them.

Token order (flattening)
------------------------
:func:`to_tokens` flattens ``(B, C, D, H, W)`` to ``(B, L, C)`` with ``L = D * H * W`` in C order
(the last spatial axis, W, varies fastest), exactly ``x.flatten(2).transpose(1, 2)``; the Mamba
layer scans this sequence in ONE direction, from token 0 to token L-1 (as the reference does).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from psmamba.nn.fast import instance_norm_act, level_projection, pointwise_conv, pointwise_mlp

__all__ = [
    "ConvNormAct",
    "ConvIN",
    "SE",
    "RMSNorm",
    "LevelProjection",
    "SFE",
    "MambaMixer",
    "AttentionMixer",
    "SMB",
    "MambaBlock",
    "TransformerBlock",
    "ConvBlock",
    "to_tokens",
    "from_tokens",
    "inert_parameters",
]

#: standard deviation of the N(0, 1e-5) initialisation of the projections and registration heads
TINY_INIT_STD = 1e-5

#: epsilon of every instance norm (``nn.InstanceNorm3d``'s default). The norms have no affine
#: parameters and no running statistics, so they have no state: the blocks call
#: :func:`~psmamba.nn.fast.instance_norm_act` with this epsilon instead of holding a module.
INSTANCE_NORM_EPS = 1e-5


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B, L, C)`` with ``L = D*H*W`` in C order (W fastest)."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(t: torch.Tensor, spatial: tuple[int, int, int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_tokens`: ``(B, L, C)`` -> ``(B, C, D, H, W)`` for ``spatial = (D, H, W)``."""
    b, _, c = t.shape
    return t.transpose(1, 2).reshape(b, c, *spatial)


class ConvNormAct(nn.Module):
    """Conv3d (with bias, 'same' padding) -> InstanceNorm3d (no affine) -> activation.

    Shapes: ``(B, in_ch, D, H, W)`` -> ``(B, out_ch, D, H, W)``.

    ``conv.bias`` is inert (see the module docstring); it is kept for parameter parity.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=True)
        self.act = act if act is not None else nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = pointwise_conv(x, self.conv)  # a plain conv unless 1x1x1 on channels-last data
        return instance_norm_act(y, self.act, eps=INSTANCE_NORM_EPS, inplace=True)


def ConvIN(in_ch: int, out_ch: int) -> ConvNormAct:  # noqa: N802  (named as in the spec)
    """The spec's ``ConvIN``: Conv3d k3 s1 p1 -> InstanceNorm3d -> LeakyReLU(0.1)."""
    return ConvNormAct(in_ch, out_ch, 3, nn.LeakyReLU(0.1))


def _conv_in_relu(in_ch: int, out_ch: int, kernel_size: int) -> ConvNormAct:
    """The SFE's unit: Conv3d -> InstanceNorm3d -> ReLU."""
    return ConvNormAct(in_ch, out_ch, kernel_size, nn.ReLU())


class SE(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W2 leaky_relu(W1 mean(x)))`` per channel.

    ``W1``: Linear(ch, hidden, no bias), LeakyReLU(0.01), ``W2``: Linear(hidden, ch, no bias).
    ``hidden = max(1, ch // reduction)``: the reference uses ``ch // reduction``, which is 0 for
    8 channels (its SE then multiplies by a constant 0.5); we keep one hidden unit instead
    (16 more parameters in the paper model, as the spec asks).

    Shapes: ``(B, ch, D, H, W)`` -> same.
    """

    def __init__(self, ch: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, ch // reduction)
        self.fc1 = nn.Linear(ch, hidden, bias=False)
        self.act = nn.LeakyReLU(0.01)
        self.fc2 = nn.Linear(hidden, ch, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3, 4))  # (B, ch)
        s = torch.sigmoid(self.fc2(self.act(self.fc1(s))))
        return x * s[:, :, None, None, None]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the LAST axis: ``x * rsqrt(mean(x^2) + eps) * (1 + weight)``.

    ``weight`` is initialised to ones, so the gain is 2 at the start (as in the reference).
    Shapes: ``(..., dim)`` -> same.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class LevelProjection(nn.Module):
    """Per-level projection shared by both streams: channels-last Linear(C, C) -> RMSNorm(C).

    The Linear weight is drawn from N(0, 1e-5) and its bias is 0. We read "N(0, 1e-5)" as a
    STANDARD DEVIATION of 1e-5 (``torch.distributions.Normal(0, 1e-5)`` in the reference takes
    the scale, i.e. the standard deviation). With such weights the projected values (~1e-4)
    sit below RMSNorm's ``eps = 1e-6`` floor on the mean square, so at initialisation the norm
    acts as a nearly linear gain of about ``2 / sqrt(1e-6) = 2000``: the outputs are O(0.1), not
    tiny, and they become unit-RMS (times the gain) once the weights grow during training.

    Shapes: ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, channels)
        self.norm = RMSNorm(channels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=TINY_INIT_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = level_projection(x, self.linear, self.norm)
        if fused is not None:  # inference on channels-last CPU data
            return fused
        y = self.norm(self.linear(x.movedim(1, -1)))  # (B, D, H, W, C)
        return y.movedim(-1, 1)


class SFE(nn.Module):
    """Spatial feature extraction (section 3 of the spec), ``dim`` = D channels (even).

    ``x1 = relu(IN(conv3(x)))``, ``x1 = relu(IN(conv3(x1)))``; split x1 into ``u, v`` (D/2 each);
    ``u = relu(IN(conv3(u)))``; ``g = u * v`` (a plain product, no sigmoid);
    ``out = x + relu(IN(conv1x1(g)))``. All convolutions carry a bias. The norms have no
    affine parameters, so their channel count is no parameter (the reference declares D
    channels for the last-but-one, which normalises D/2; the same computation).

    Shapes: ``(B, D, d, h, w)`` -> same.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"SFE needs an even channel count, got {dim}")
        half = dim // 2
        self.conv1 = _conv_in_relu(dim, dim, 3)
        self.conv2 = _conv_in_relu(dim, dim, 3)
        self.conv_u = _conv_in_relu(half, half, 3)
        self.conv_out = _conv_in_relu(half, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv2(self.conv1(x))
        u, v = x1.chunk(2, dim=1)  # first D/2 channels are u, the rest v
        g = self.conv_u(u) * v
        return x + self.conv_out(g)


class MambaMixer(nn.Module):
    """Residual Mamba layer over the voxels as one sequence: ``x + Mamba(LayerNorm(tokens(x)))``.

    The block owns its norm and residual (as mamba.py's ``ResidualBlock``); without autograd it
    runs all three piece by piece through :meth:`psmamba.nn.mamba.Mamba.forward_chunk`. The
    volume is flattened in C order (W fastest, :func:`to_tokens`) and scanned in one direction
    only. ``dt_rank`` is ``ceil(dim / 16)`` (Mamba's "auto"); the selective-scan
    implementation is picked by ``backend`` (see :mod:`psmamba.nn.scan`).

    Shapes: ``(B, dim, D, H, W)`` -> same.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, backend: str = "auto") -> None:
        super().__init__()
        from psmamba.nn.mamba import Mamba  # torch-only module; never imports mamba_ssm eagerly

        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank="auto", backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = to_tokens(x)  # (B, L, dim)
        if torch.is_grad_enabled() and (t.requires_grad or any(p.requires_grad for p in self.parameters())):
            return from_tokens(t + self.mamba(self.norm(t)), x.shape[2:])  # the layer checkpoints its pieces
        # Inference: norm, Mamba and residual piece by piece, so neither the normalised
        # sequence nor the layer's output is ever held whole besides the result.
        length = t.shape[1]
        chunk = self.mamba.chunk_length(t, training=False)
        if chunk >= length:
            out = self.mamba.forward_chunk(self.norm(t))[0].add_(t)  # a new tensor of the layer
            return from_tokens(out, x.shape[2:])
        out = t.new_empty(t.shape)
        state = None
        for start in range(0, length, chunk):
            piece = t[:, start : start + chunk]
            y, state = self.mamba.forward_chunk(self.norm(piece), state)
            out[:, start : start + chunk] = y.add_(piece)
        return from_tokens(out, x.shape[2:])


class AttentionMixer(nn.Module):
    """Residual pre-norm multi-head self-attention over the voxels: ``x + MHSA(LayerNorm(tokens))``.

    Replaces the Mamba layer in the ablation "SIR-T". ``heads`` must divide ``dim``. No
    positional encoding is added (the spec names none): the SFE's zero-padded convolutions
    in front of it already make the features position-aware near the borders, and the
    coarsest grid is small. Cost is quadratic in the number of tokens (1,200 at 160x192x160).

    Shapes: ``(B, dim, D, H, W)`` -> same.
    """

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention heads ({heads}) must divide the channel count ({dim})")
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = to_tokens(x)  # (B, L, dim)
        n = self.norm(t)
        t = t + self.attn(n, n, n, need_weights=False)[0]
        return from_tokens(t, x.shape[2:])


class SMB(nn.Module):
    """Spatial Mamba block: ``MLP(IN(mixer(SFE(x))))`` on ``dim`` channels.

    * SFE (:class:`SFE`), or nothing when ``sfe=False``;
    * the token mixer with its own residual: the Mamba layer (``mixer="mamba"``, the paper) or
      pre-norm multi-head self-attention (``mixer="attention"``);
    * InstanceNorm3d(dim) (no affine), then 1x1x1 convolutions dim -> 2 dim -> GELU -> dim.
      No residual around the norm + MLP (as in the reference).

    Shapes: ``(B, dim, D, H, W)`` -> same.
    """

    def __init__(
        self,
        dim: int,
        *,
        sfe: bool = True,
        mixer: str = "mamba",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        backend: str = "auto",
        heads: int = 8,
    ) -> None:
        super().__init__()
        self.sfe = SFE(dim) if sfe else nn.Identity()
        if mixer == "mamba":
            self.mixer: nn.Module = MambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
        elif mixer == "attention":
            self.mixer = AttentionMixer(dim, heads=heads)
        else:
            raise ValueError(f"mixer must be 'mamba' or 'attention', got {mixer!r}")
        self.mlp = nn.Sequential(nn.Conv3d(dim, 2 * dim, 1), nn.GELU(), nn.Conv3d(2 * dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(self.sfe(x))
        x = instance_norm_act(x, None, eps=INSTANCE_NORM_EPS)
        conv1, act, conv2 = self.mlp
        return pointwise_mlp(x, conv1, act, conv2)


class MambaBlock(SMB):
    """The ablation "SIR-M" block: the SMB without its SFE (LayerNorm + Mamba, IN, MLP)."""

    def __init__(self, dim: int, **kwargs) -> None:
        kwargs.pop("heads", None)
        super().__init__(dim, sfe=False, mixer="mamba", **kwargs)


class TransformerBlock(SMB):
    """The ablation "SIR-T" block: the SMB with its Mamba layer replaced by pre-norm MHSA."""

    def __init__(self, dim: int, heads: int = 8, **kwargs) -> None:
        for key in ("d_state", "d_conv", "expand", "backend"):
            kwargs.pop(key, None)
        super().__init__(dim, sfe=True, mixer="attention", heads=heads, **kwargs)


class ConvBlock(nn.Module):
    """The ablations' "conv" block: two ConvIN(dim -> dim) layers in place of the SMB.

    Shapes: ``(B, dim, D, H, W)`` -> same.
    """

    def __init__(self, dim: int, **_ignored) -> None:
        super().__init__()
        self.conv1 = ConvIN(dim, dim)
        self.conv2 = ConvIN(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def inert_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every conv bias directly followed by a non-affine InstanceNorm.

    Their gradient is zero by construction (instance norm removes per-channel constants).
    """
    for name, sub in module.named_modules():
        if isinstance(sub, ConvNormAct) and sub.conv.bias is not None:
            yield (f"{name}.conv.bias" if name else "conv.bias"), sub.conv.bias

