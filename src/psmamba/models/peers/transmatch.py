"""TransMatch (Chen et al., IEEE Transactions on Medical Imaging 43, 2024), our implementation, LPBA40 config.

From ``shared/spec/peers.md`` and the paper::

    m4, m8, m16, m32 = SwinEncoder(moving); f4, f8, f16, f32 = SwinEncoder(fixed)  # ONE encoder
    M_s = cross_s(m_s, f_s)      # queries from fixed, keys/values from moving, residual on m_s
    F_s = cross_s(f_s, m_s)      # the same module, the other direction (s = 4, 8, 16)
    f48 = ConvIN(avgpool3(cat(moving, fixed)))                     @ 1/2
    y = up0(M32, M16, F16); y = up1(y, M8, F8); y = up2(y, M4, F4)  # 384, 192, 96 channels
    y = up3(y, f48)                                                 # 48 channels @ 1/2
    ddf = head(trilinear_x2(y))                                     # Conv 48 -> 3, N(0, 1e-5)

``cross_s`` = a Swin stage of ``cross_depth`` cross-attention blocks (``cross_heads`` heads,
the encoder's window) + LayerNorm. Plain displacement; the input must divide by 32.

Modules of the public code that never receive a gradient are NOT built: its second
("fixed") encoder, which it never calls (the fixed image goes through the moving one), the
16-channel full-size conv skip and the last decoder block (computed or built, never used),
the decoder blocks' unused alternative first convolutions, the fixed-direction cross stage at
1/32 (its output is unused) and three of the four output norms of every cross stage. What is
left is exactly the 70,793,235 parameters that receive a gradient there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba.models.peers._common import ConvNormLReLU, PeerNet, UpCatDecoderBlock, registration_head
from psmamba.models.peers.hparams import TransMatchConfig
from psmamba.models.peers.swin import SwinEncoder, SwinStage, init_swin

__all__ = ["TransMatch", "CrossStage"]


class CrossStage(nn.Module):
    """Cross-attention Swin stage + output LayerNorm.

    Shapes: ``x, y (B, C, D, H, W)`` -> ``(B, C, D, H, W)``: ``x`` attended by queries from ``y``.
    """

    def __init__(self, dim: int, depth: int, heads: int, window: tuple[int, int, int], drop_path: list[float]) -> None:
        super().__init__()
        self.stage = SwinStage(dim, depth, heads, window, drop_path=drop_path)
        self.norm = nn.LayerNorm(dim)
        init_swin(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, c, *grid = x.shape
        t = self.stage(x.flatten(2).transpose(1, 2), tuple(grid), y.flatten(2).transpose(1, 2))  # (B, L, C)
        return self.norm(t).transpose(1, 2).reshape(b, c, *grid)


class TransMatch(PeerNet):
    """TransMatch from a :class:`~psmamba.models.peers.hparams.TransMatchConfig`."""

    divisor = 32

    def __init__(self, config: TransMatchConfig | None = None, name: str = "transmatch") -> None:
        cfg = config if config is not None else TransMatchConfig()
        super().__init__(name, cfg)
        e, window = cfg.embed_dim, tuple(cfg.window)
        self.encoder = SwinEncoder(1, e, cfg.depths, cfg.heads, window, drop_path=cfg.drop_path)
        # the public code takes the first cross_depth rates of the encoder's schedule
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths)).tolist()[: cfg.cross_depth]
        self.cross = nn.ModuleList(
            CrossStage(e * 2**i, cfg.cross_depth, cfg.cross_heads, window, rates) for i in range(len(cfg.depths))
        )
        self.skip_half = ConvNormLReLU(2, e // 2)
        self.up0 = UpCatDecoderBlock(8 * e, 8 * e, 4 * e)
        self.up1 = UpCatDecoderBlock(4 * e, 4 * e, 2 * e)
        self.up2 = UpCatDecoderBlock(2 * e, 2 * e, e)
        self.up3 = UpCatDecoderBlock(e, e // 2, e // 2)
        self.head = registration_head(e // 2)

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        b = moving.shape[0]
        f_half = self.skip_half(F.avg_pool3d(torch.cat([moving, fixed], dim=1), 3, stride=2, padding=1))
        feats = self.encoder(torch.cat([moving, fixed], dim=0))  # both images through ONE encoder
        m = [f[:b] for f in feats]
        f = [f[b:] for f in feats]
        mc = [cross(ms, fs) for cross, ms, fs in zip(self.cross, m, f)]
        fc = [cross(fs, ms) for cross, ms, fs in zip(self.cross[:-1], m[:-1], f[:-1])]
        y = self.up0(mc[3], mc[2], fc[2])
        y = self.up1(y, mc[1], fc[1])
        y = self.up2(y, mc[0], fc[0])
        y = self.up3(y, f_half)
        return self.head(F.interpolate(y, scale_factor=2, mode="trilinear", align_corners=False))
