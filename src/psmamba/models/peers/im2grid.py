"""Im2Grid (Liu et al., MICCAI 2022 workshops, "coordinate translator"), our implementation
of the version the ModeT authors published and the paper compared with.

From ``shared/spec/peers.md``::

    F1..F5 = enc(fixed); M1..M5 = enc(moving)              # one encoder, 8..128 channels
    for level k = 5 .. 1 (coarse to fine):
        q = P_k(F_k);  key = P_k(warp(M_k, flow))          # raw features warped, then projected
        w = sum_o softmax_o(<q(p), key(p + o)>) * o        # 27 offsets o in {-1, 0, 1}^3
        flow = w at level 5, else warp(flow, w) + w         # compose
        flow = upsample_ddf(flow) unless k = 1             # trilinear x2, vectors x2

``P_k(x) = Linear_k(x) + alpha_k * E`` with ``Linear_k: C_k -> 6`` (weight and bias zero at
init), ``alpha_k`` learnable (1 at init) and ``E`` the fixed 6-channel sin/cos coordinate
embedding of :func:`~psmamba.models.peers._common.coordinate_embedding`. The softmax is not
scaled. Not diffeomorphic. The input must divide by 16 (and one axis must exceed 16 voxels:
the level-5 instance norm needs more than one voxel).

Encoder (:class:`PyramidEncoder`, shared with ModeT): PSMamba-Net's ``_diff`` encoder without
SE blocks: Conv3d(1 -> c) + LeakyReLU(0.1), ConvIN(c -> 2c), ConvIN(2c -> 2c); then per level
AvgPool3d(2), ConvIN(C -> 2C), ConvIN(2C -> 2C).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import spatial
from psmamba.models.peers._common import PeerNet, coordinate_embedding, neighbourhood_field
from psmamba.models.peers.hparams import Im2GridConfig
from psmamba.nn.blocks import ConvIN

__all__ = ["Im2Grid", "PyramidEncoder", "NUM_LEVELS"]

NUM_LEVELS = 5


class PyramidEncoder(nn.Module):
    """Five levels, ``2c * 2^(k-1)`` channels at ``1 / 2^(k-1)`` (see the module docstring).

    Shapes: ``(B, 1, D, H, W)`` (divisible by 16) -> five ``(B, C_k, D_k, H_k, W_k)``, finest first.
    """

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Conv3d(1, c, 3, padding=1)
        levels = [nn.Sequential(ConvIN(c, 2 * c), ConvIN(2 * c, 2 * c))]
        width = 2 * c
        for _ in range(NUM_LEVELS - 1):
            levels.append(nn.Sequential(nn.AvgPool3d(2), ConvIN(width, 2 * width), ConvIN(2 * width, 2 * width)))
            width *= 2
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.leaky_relu(self.stem(x), 0.1)
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class CoordinateProjection(nn.Module):
    """``Linear(C -> 6)(x) + alpha * E`` (zero-initialised Linear, alpha = 1).

    Shapes: ``(B, C, D, H, W)`` -> ``(B, 1, 6, D, H, W)`` (one head of dimension 6).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, 6)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.alpha = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.movedim(1, -1)).movedim(-1, 1)  # (B, 6, D, H, W)
        y = y + self.alpha * coordinate_embedding(tuple(x.shape[2:]), x.device, x.dtype)
        return y.unsqueeze(1)


class Im2Grid(PeerNet):
    """Im2Grid from an :class:`~psmamba.models.peers.hparams.Im2GridConfig`."""

    divisor = 16
    min_extent = 16

    def __init__(self, config: Im2GridConfig | None = None, name: str = "im2grid") -> None:
        cfg = config if config is not None else Im2GridConfig()
        super().__init__(name, cfg)
        self.encoder = PyramidEncoder(cfg.channels)
        self.projections = nn.ModuleList(CoordinateProjection(cfg.channels * 2**k) for k in range(1, NUM_LEVELS + 1))

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        b = moving.shape[0]
        feats = self.encoder(torch.cat([fixed, moving], dim=0))  # shared weights, one call
        flow = None
        for k in range(NUM_LEVELS, 0, -1):
            f, m = feats[k - 1][:b], feats[k - 1][b:]
            if flow is not None:
                m = spatial.warp(m, flow)
            proj = self.projections[k - 1]
            w = neighbourhood_field(proj(f), proj(m))[:, 0]  # (B, 3, D_k, H_k, W_k)
            flow = w if flow is None else spatial.compose(flow, w)
            if k > 1:
                flow = spatial.upsample_ddf(flow)
        return flow
