"""Dual-PRNet++ (Kang et al., Medical Image Analysis 78, 2022), our implementation of
the version the ModeT authors published and the paper compared with ("PR++").

From ``shared/spec/peers.md``. A backbone (shared by both images)::

    e1..e5 = Conv+ReLU: 1 -> c @1, -> 2c @1/2, -> 2c @1/4, -> 4c @1/8, -> 4c @1/16 (stride 2)
    d1 = conv(cat(up(e5), e4)) 4c @1/8;  d2 = conv(cat(up(d1), e3)) 4c @1/4
    d3 = conv(cat(up(d2), e2)) 2c @1/2;  d4 = conv(cat(up(d3), e1)) 2c @1;  d5 = conv(d4) c @1

(``up`` = nearest x2, ``conv`` = Conv3d k3 + ReLU), then five PR++ blocks on the moving and
fixed features (m_i, f_i) of d1..d5::

    flow = B1(m1, f1)                                          @ 1/8
    for i = 2..5:  w = B_i(warp(m_i, up_i(flow)), f_i);  flow = R_i(flow) o w
    B(m, f): x = cat(m, corr(m, f), f); x = ReLU(Conv(Conv(x)));  w = head(x + ReLU(Conv(Conv(x))))

``up_i`` = :func:`~psmamba.spatial.upsample_ddf` (x2, vectors x2) where the grid doubles (blocks
2-4) and the identity for block 5 (same grid as block 4). ``R_i(flow) o w`` =
``warp(R_i(flow), w) + w`` where ``R_i`` resamples the coarse field on the finer grid
(trilinear, align_corners=True) WITHOUT multiplying the vectors by 2: a quirk of the public
code that we keep (the blocks do see the correctly scaled field). ``head`` = Conv -> 3,
N(0, 1e-5). ``corr``: for each of the 27 offsets ``o`` in {-2, 0, 2}^3, the mean over the 3x3x3
window around ``p`` of the channel dot product ``<m(q), f(q + o)>`` (fixed features outside
the grid are zero): the paper's 3-D correlation. (The public code instead takes the dot
product of the two box-filtered feature maps; the layer has no weights either way.)
Not diffeomorphic; the input must divide by 16.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import spatial
from psmamba.models.peers._common import ConvAct, PeerNet, registration_head
from psmamba.models.peers.hparams import PRNetPPConfig

__all__ = ["PRNetPP", "correlation3d"]

#: the correlation's offsets: {-2, 0, 2}^3, C order
CORRELATION_OFFSETS = tuple(itertools.product((-2, 0, 2), repeat=3))


def correlation3d(m: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` x 2 -> ``(B, 27, D, H, W)``: see the module docstring."""
    d, h, w = m.shape[2:]
    fp = F.pad(f, (2, 2, 2, 2, 2, 2))
    prods = torch.cat(
        [
            (m * fp[:, :, 2 + i : 2 + i + d, 2 + j : 2 + j + h, 2 + k : 2 + k + w]).sum(1, keepdim=True)
            for i, j, k in CORRELATION_OFFSETS
        ],
        dim=1,
    )  # (B, 27, D, H, W): the dot product per voxel and offset
    # box sum / 27 with zeros outside (padded first: avg_pool3d refuses a 2-voxel axis even with padding)
    return F.avg_pool3d(F.pad(prods, (1, 1, 1, 1, 1, 1)), 3, stride=1)


class PRPlusPlusBlock(nn.Module):
    """One PR++ block on features of ``channels`` (see the module docstring).

    Shapes: ``m, f (B, C, D, H, W)`` -> ``w (B, 3, D, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = 2 * channels + len(CORRELATION_OFFSETS)
        self.conv1 = nn.Sequential(nn.Conv3d(wide, wide, 3, padding=1), nn.Conv3d(wide, channels, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1), nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU()
        )
        self.head = registration_head(channels)

    def forward(self, m: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        x = self.conv1(torch.cat([m, correlation3d(m, f), f], dim=1))
        return self.head(x + self.conv2(x))


class PRNetPP(PeerNet):
    """PR++ from a :class:`~psmamba.models.peers.hparams.PRNetPPConfig`."""

    divisor = 16

    def __init__(self, config: PRNetPPConfig | None = None, name: str = "prnet_pp") -> None:
        cfg = config if config is not None else PRNetPPConfig()
        super().__init__(name, cfg)
        c = cfg.channels
        self.encoder = nn.ModuleList(
            [ConvAct(1, c, 1, 0.0), ConvAct(c, 2 * c, 2, 0.0), ConvAct(2 * c, 2 * c, 2, 0.0),
             ConvAct(2 * c, 4 * c, 2, 0.0), ConvAct(4 * c, 4 * c, 2, 0.0)]
        )  # fmt: skip
        self.decoder = nn.ModuleList(
            [ConvAct(8 * c, 4 * c, 1, 0.0), ConvAct(6 * c, 4 * c, 1, 0.0), ConvAct(6 * c, 2 * c, 1, 0.0),
             ConvAct(3 * c, 2 * c, 1, 0.0)]
        )  # fmt: skip
        self.last = ConvAct(2 * c, c, 1, 0.0)
        self.blocks = nn.ModuleList(PRPlusPlusBlock(w) for w in (4 * c, 4 * c, 2 * c, 2 * c, c))

    def _backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for conv in self.encoder:
            x = conv(x)
            skips.append(x)
        x = skips.pop()  # e5 @ 1/16
        outs = []
        for conv in self.decoder:
            x = conv(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skips.pop()], dim=1))
            outs.append(x)
        outs.append(self.last(x))
        return outs  # 4c @1/8, 4c @1/4, 2c @1/2, 2c @1, c @1

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        b = moving.shape[0]
        feats = self._backbone(torch.cat([moving, fixed], dim=0))
        flow = None
        for block, x in zip(self.blocks, feats):
            m, f = x[:b], x[b:]
            if flow is None:
                flow = block(m, f)
                continue
            finer = flow.shape[2:] != m.shape[2:]
            w = block(spatial.warp(m, spatial.upsample_ddf(flow) if finer else flow), f)
            resampled = spatial.resize_ddf(flow, m.shape[2:], scale=1.0) if finer else flow  # quirk: no x2
            flow = spatial.compose(resampled, w)
        return flow
