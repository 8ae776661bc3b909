"""The five-level encoder and its dual-stream (shared-weight) use on fixed and moving images."""

from __future__ import annotations

import torch
import torch.nn as nn

from psmamba.nn.blocks import SE, ConvIN
from psmamba.nn.fast import AvgPool2

__all__ = ["Encoder", "DualStreamEncoder", "NUM_LEVELS"]

#: levels of the pyramid; the coarsest is 1/16 of the (padded) input size
NUM_LEVELS = 5


class Encoder(nn.Module):
    """One encoder stream: five levels of ``ConvIN, ConvIN, SE`` with AvgPool3d(2) in between.

    Level 1 (full size): ConvIN(1 -> 2c), ConvIN(2c -> 2c), SE(2c). With ``diff=True`` (the
    ``_diff`` variant) it starts with Conv3d(1 -> c) + LeakyReLU(0.1) (no norm) followed by
    ConvIN(c -> 2c), ConvIN(2c -> 2c), SE(2c).
    Levels 2..5: AvgPool3d(2) -> ConvIN(C -> 2C) -> ConvIN(2C -> 2C) -> SE(2C).

    Shapes: ``(B, 1, D, H, W)`` with D, H, W divisible by 16 -> a list of 5 tensors,
    level k being ``(B, c * 2^k, D / 2^(k-1), H / 2^(k-1), W / 2^(k-1))``.
    """

    def __init__(self, channels: int = 4, diff: bool = False, se_reduction: int = 16) -> None:
        super().__init__()
        c = int(channels)
        first: list[nn.Module] = []
        if diff:
            # the reference _diff encoder's stem; LeakyReLU slope 0.1 like its ConvIN blocks
            first += [nn.Conv3d(1, c, 3, padding=1), nn.LeakyReLU(0.1), ConvIN(c, 2 * c)]
        else:
            first += [ConvIN(1, 2 * c)]
        first += [ConvIN(2 * c, 2 * c), SE(2 * c, se_reduction)]
        levels = [nn.Sequential(*first)]
        width = 2 * c
        for _ in range(NUM_LEVELS - 1):
            levels.append(
                nn.Sequential(
                    AvgPool2(),
                    ConvIN(width, 2 * width),
                    ConvIN(2 * width, 2 * width),
                    SE(2 * width, se_reduction),
                )
            )
            width *= 2
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class DualStreamEncoder(nn.Module):
    """The siamese pair of streams: ONE :class:`Encoder` applied to the fixed and the moving image.

    Both images go through the same weights in a single call, stacked along the batch axis;
    this is exactly two separate calls because every operation of the encoder (convolution,
    instance norm, SE's global pooling) acts on each sample independently.

    Shapes: fixed, moving ``(B, 1, D, H, W)`` -> ``(fixed_feats, moving_feats)``, two lists of
    five ``(B, C_k, D_k, H_k, W_k)`` tensors (see :class:`Encoder`).
    """

    def __init__(self, channels: int = 4, diff: bool = False, se_reduction: int = 16) -> None:
        super().__init__()
        self.encoder = Encoder(channels, diff, se_reduction)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        b = fixed.shape[0]
        feats = self.encoder(torch.cat([fixed, moving], dim=0))  # (2B, C_k, ...) per level
        return [f[:b] for f in feats], [f[b:] for f in feats]
