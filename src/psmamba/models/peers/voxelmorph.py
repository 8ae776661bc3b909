"""VoxelMorph (Balakrishnan et al., IEEE TMI 38(8), 2019; diffeomorphic integration: Dalca et
al., MICCAI 2018 / MedIA 2019), our implementation of ``VxmDense`` with its defaults.

MONAI's ``monai.networks.nets.VoxelMorph`` does not match the spec: its default U-Net has
three poolings and 244,323 parameters and it integrates at full size, while ``VxmDense`` has
four poolings, 327,331 parameters and integrates at half size. So the network is ours::

    U-Net on cat(moving, fixed): encoder 16, 32, 32, 32 (each Conv + LeakyReLU(0.2), then
    max-pool 2); decoder 32, 32, 32, 32 (Conv + LeakyReLU, nearest x2, concatenated skip),
    then Conv 32, 16, 16 at full size
    svf = Conv 16 -> 3 (N(0, 1e-5))
    ddf = resize_x2(integrate_svf(resize_half(svf), 7))   # vectors x1/2 then x2

:class:`VxmUNet` also serves MambaMorphFeat's feature extractor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import spatial
from psmamba.models.peers._common import ConvAct, PeerNet, registration_head
from psmamba.models.peers.hparams import VoxelMorphConfig

__all__ = ["VoxelMorph", "VxmUNet"]


class VxmUNet(nn.Module):
    """VoxelMorph's U-Net with one Conv + LeakyReLU(0.2) per level.

    ``len(encoder)`` levels go down (conv, keep as skip, max-pool 2); the first
    ``len(encoder)`` decoder widths come back up (conv, nearest x2, concatenate the skip of
    that size); the remaining decoder widths are plain convs at full size.

    Shapes: ``(B, in_ch, D, H, W)`` (each axis divisible by ``2^len(encoder)``) ->
    ``(B, decoder[-1], D, H, W)``.
    """

    def __init__(self, in_ch: int, encoder: Sequence[int], decoder: Sequence[int]) -> None:
        super().__init__()
        n = len(encoder)
        self.down = nn.ModuleList()
        width = in_ch
        for c in encoder:
            self.down.append(ConvAct(width, c))
            width = c
        self.up = nn.ModuleList()
        for c, skip in zip(decoder[:n], reversed(encoder)):
            self.up.append(ConvAct(width, c))
            width = c + skip
        self.tail = nn.ModuleList()
        for c in decoder[n:]:
            self.tail.append(ConvAct(width, c))
            width = c
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for conv in self.down:
            x = conv(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for conv in self.up:
            x = F.interpolate(conv(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
        for conv in self.tail:
            x = conv(x)
        return x


class VoxelMorph(PeerNet):
    """``VxmDense`` from a :class:`~psmamba.models.peers.hparams.VoxelMorphConfig`."""

    divisor = 16

    def __init__(self, config: VoxelMorphConfig | None = None, name: str = "voxelmorph") -> None:
        cfg = config if config is not None else VoxelMorphConfig()
        super().__init__(name, cfg)
        self.divisor = 2 ** len(cfg.encoder)
        self.unet = VxmUNet(2, cfg.encoder, cfg.decoder)
        self.head = registration_head(self.unet.out_channels)

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        svf = self.head(self.unet(torch.cat([moving, fixed], dim=1)))
        if self.config.int_steps == 0:
            return svf
        full = svf.shape[2:]
        half = spatial.resize_ddf(svf, [s // 2 for s in full], scale=0.5)
        return spatial.resize_ddf(spatial.integrate_svf(half, self.config.int_steps), full, scale=2.0)
