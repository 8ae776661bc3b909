"""PIViT (Ma et al., MICCAI 2023, pyramid-iterative vision transformer), our implementation.

From ``shared/spec/peers.md``::

    m2, m4, m8 = enc(moving); f2, f4, f8 = enc(fixed)     # 3 stride-2 Conv + LeakyReLU(0.1), 32 ch
    flow = 0                                             # @ 1/8
    for t = 1..3 (its own block each):
        w = Conv(LReLU(Conv(Swin(cat(warp(m8, flow), f8)))))     # 64 -> 64 -> 32 -> 3
        flow = warp(flow, w) + w
    for (m, f) in (m4, f4), (m2, f2):
        flow = upsample_ddf(flow)                                 # x2, vectors x2
        w = Conv(LReLU(Conv(cat(warp(m, flow), f))))              # 64 -> 32 -> 3
        flow = warp(flow, w) + w
    ddf = upsample_ddf(flow)                                      # predicted at 1/2, resized

``Swin`` = two blocks (dim 64, 1 head, window 8^3, the second shifted by 4, MLP 4, no qkv
bias, relative position bias). Every last conv (-> 3) is N(0, 1e-5) with a zero bias (the
spec is silent; VoxelMorph's habit, on which PIViT builds). Not diffeomorphic; the input must
divide by 8.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from psmamba import spatial
from psmamba.models.peers._common import ConvAct, PeerNet, registration_head
from psmamba.models.peers.hparams import PIViTConfig
from psmamba.models.peers.swin import SwinStage, init_swin

__all__ = ["PIViT"]


class _FlowHead(nn.Sequential):
    """Conv 2C -> C + LeakyReLU(0.1), Conv C -> 3 (N(0, 1e-5)): ``(B, 2C, ...)`` -> ``(B, 3, ...)``."""

    def __init__(self, channels: int) -> None:
        super().__init__(ConvAct(2 * channels, channels, 1, 0.1), registration_head(channels))


class _Iteration(nn.Module):
    """One refinement at 1/8: Swin stage on the concatenated tokens, then :class:`_FlowHead`.

    Shapes: ``(B, 2C, d, h, w)`` -> ``(B, 3, d, h, w)``.
    """

    def __init__(self, channels: int, window: int) -> None:
        super().__init__()
        self.swin = SwinStage(2 * channels, 2, 1, (window,) * 3)
        init_swin(self.swin)
        self.head = _FlowHead(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *grid = x.shape
        t = self.swin(x.flatten(2).transpose(1, 2), tuple(grid))  # (B, L, 2C)
        return self.head(t.transpose(1, 2).reshape(b, c, *grid))


class PIViT(PeerNet):
    """PIViT from a :class:`~psmamba.models.peers.hparams.PIViTConfig`."""

    divisor = 8

    def __init__(self, config: PIViTConfig | None = None, name: str = "pivit") -> None:
        cfg = config if config is not None else PIViTConfig()
        super().__init__(name, cfg)
        c = cfg.channels
        self.encoder = nn.ModuleList([ConvAct(1, c, 2, 0.1), ConvAct(c, c, 2, 0.1), ConvAct(c, c, 2, 0.1)])
        self.iterations = nn.ModuleList(_Iteration(c, cfg.window) for _ in range(cfg.iterations))
        self.decoders = nn.ModuleList(_FlowHead(c) for _ in range(2))  # 1/4, then 1/2

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        b = moving.shape[0]
        x = torch.cat([moving, fixed], dim=0)
        feats = []
        for conv in self.encoder:
            x = conv(x)
            feats.append(x)  # 1/2, 1/4, 1/8
        m8, f8 = feats[2][:b], feats[2][b:]
        flow = None
        for it in self.iterations:
            m = m8 if flow is None else spatial.warp(m8, flow)
            w = it(torch.cat([m, f8], dim=1))
            flow = w if flow is None else spatial.compose(flow, w)
        for level, head in zip((1, 0), self.decoders):
            m, f = feats[level][:b], feats[level][b:]
            flow = spatial.upsample_ddf(flow)
            w = head(torch.cat([spatial.warp(m, flow), f], dim=1))
            flow = spatial.compose(flow, w)
        return spatial.upsample_ddf(flow)
