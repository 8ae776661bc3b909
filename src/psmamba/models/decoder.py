"""The decoder block of one pyramid level: features of both streams -> residual displacement."""

from __future__ import annotations

import torch
import torch.nn as nn

from psmamba.nn.blocks import TINY_INIT_STD, SMB, ConvBlock, ConvIN, MambaBlock, TransformerBlock

__all__ = ["DecoderBlock", "RegistrationHead", "make_body"]


def make_body(
    kind: str,
    dim: int,
    *,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    backend: str = "auto",
    heads: int = 8,
) -> nn.Module:
    """The ``dim``-channel block at the heart of a decoder block, by kind.

    ``"smb"``: the spatial Mamba block (SFE + Mamba + IN + MLP, the paper);
    ``"mamba"``: the same without the SFE; ``"transformer"``: the SMB with multi-head
    self-attention instead of the Mamba layer; ``"conv"``: two ConvIN(dim -> dim) layers.
    """
    mamba_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
    if kind == "smb":
        return SMB(dim, sfe=True, mixer="mamba", **mamba_kw)
    if kind == "mamba":
        return MambaBlock(dim, **mamba_kw)
    if kind == "transformer":
        return TransformerBlock(dim, heads=heads)
    if kind == "conv":
        return ConvBlock(dim)
    raise ValueError(f"unknown block kind {kind!r}")


class RegistrationHead(nn.Conv3d):
    """Conv3d(C -> 3, k3, p1) with weights from N(0, 1e-5) (standard deviation) and bias 0.

    Its output is a residual displacement in voxels of its level's grid; the tiny
    initialisation makes the whole model start near the identity transform.
    """

    def __init__(self, in_ch: int) -> None:
        super().__init__(in_ch, 3, 3, padding=1)
        nn.init.normal_(self.weight, mean=0.0, std=TINY_INIT_STD)
        nn.init.zeros_(self.bias)


class DecoderBlock(nn.Module):
    """``MambaDecoderBlock(f, m)`` of the spec: ``head(ConvIN(body(cat[f, m])))``.

    Args:
        channels: ``C`` of this level (the body works on ``D = 2C`` channels).
        kind: the body, see :func:`make_body`.

    Shapes: ``f, m (B, C, d, h, w)`` -> residual displacement ``w (B, 3, d, h, w)`` in voxels
    of this level's grid. Concatenation order is fixed first, moving second.
    """

    def __init__(self, channels: int, kind: str = "smb", **body_kwargs) -> None:
        super().__init__()
        self.kind = kind
        self.body = make_body(kind, 2 * channels, **body_kwargs)
        self.conv = ConvIN(2 * channels, channels)
        self.head = RegistrationHead(channels)

    def forward(self, f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        x = torch.cat([f, m], dim=1)  # (B, 2C, d, h, w)
        return self.head(self.conv(self.body(x)))
