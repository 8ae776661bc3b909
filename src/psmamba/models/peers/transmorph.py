"""TransMorph (Chen et al., Medical Image Analysis 82, 2022), our implementation.

From ``shared/spec/peers.md`` and the paper::

    x   = cat(moving, fixed)                                  # (B, 2, D, H, W)
    f48 = ConvIN(avgpool3(x))            @ 1/2                # conv skips
    f16 = ConvIN(x)                      @ 1
    s4, s8, s16, s32 = SwinEncoder(x)    @ 1/4 .. 1/32        # 96, 192, 384, 768 channels
    y   = up0(s32, s16); y = up1(y, s8); y = up2(y, s4)       # 384, 192, 96 channels
    y   = up3(y, f48);   y = up4(y, f16)                      # 48, 16 channels
    ddf = head(y)                                             # Conv 16 -> 3, N(0, 1e-5)

``ConvIN`` = Conv3d (no bias) -> InstanceNorm -> LeakyReLU(0.01); ``up*`` = trilinear x2 ->
concatenated skip -> 2 ConvIN; ``avgpool3`` = AvgPool3d(3, stride 2, padding 1). Plain
displacement (not diffeomorphic). The input must divide by 32 (patch 4, three mergings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from psmamba.models.peers._common import ConvNormLReLU, PeerNet, UpCatDecoderBlock, registration_head
from psmamba.models.peers.hparams import TransMorphConfig
from psmamba.models.peers.swin import SwinEncoder

__all__ = ["TransMorph"]


class TransMorph(PeerNet):
    """TransMorph from a :class:`~psmamba.models.peers.hparams.TransMorphConfig`."""

    divisor = 32

    def __init__(self, config: TransMorphConfig | None = None, name: str = "transmorph") -> None:
        cfg = config if config is not None else TransMorphConfig()
        super().__init__(name, cfg)
        e = cfg.embed_dim
        self.encoder = SwinEncoder(2, e, cfg.depths, cfg.heads, tuple(cfg.window), drop_path=cfg.drop_path)
        self.skip_half = ConvNormLReLU(2, e // 2)
        self.skip_full = ConvNormLReLU(2, 16)
        self.up0 = UpCatDecoderBlock(8 * e, 4 * e, 4 * e)
        self.up1 = UpCatDecoderBlock(4 * e, 2 * e, 2 * e)
        self.up2 = UpCatDecoderBlock(2 * e, e, e)
        self.up3 = UpCatDecoderBlock(e, e // 2, e // 2)
        self.up4 = UpCatDecoderBlock(e // 2, 16, 16)
        self.head = registration_head(16)

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], dim=1)
        f_half = self.skip_half(F.avg_pool3d(x, 3, stride=2, padding=1))
        f_full = self.skip_full(x)
        s4, s8, s16, s32 = self.encoder(x)
        y = self.up2(self.up1(self.up0(s32, s16), s8), s4)
        y = self.up4(self.up3(y, f_half), f_full)
        return self.head(y)
