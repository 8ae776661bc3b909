"""ModeT (Wang et al., MICCAI 2023, "motion decomposition transformer"), our implementation.

From ``shared/spec/peers.md``::

    F1..F5 = enc(fixed); M1..M5 = enc(moving)                # Im2Grid's PyramidEncoder
    for level k = 5 .. 1, heads n_k = 8, 4, 2, 1, 1:
        q = LN(Linear_k(F_k)); key = LN(Linear_k(warp(M_k, flow)))   # n_k heads x 6
        w_h = sum_o softmax_o(<q_h(p), key_h(p + o)> + rpb_k[h, o]) * o   # one field per head
        k = 5, 4, 3 (n_k > 1): w = CWM_k(w_1..w_n) on the grid of level k - 1 (see below)
            flow = w at k = 5, else warp(upsample_ddf(flow), w) + w
        k = 2, 1: flow = warp(flow, w) + w, then upsample_ddf(flow) unless k = 1

``Linear_k``: C_k -> 6 n_k, weights N(0, 1e-5), bias 0; ``LN`` over all 6 n_k channels;
``rpb_k``: (n_k, 27), zero at init; the dot product is not scaled (``scale=1`` in the
paper's configuration). Competitive weighting ``CWM``: the 3 n_k head fields are upsampled x2
(trilinear, align_corners=True, vectors unchanged), 2 ConvIN with 6 n_k channels, Conv ->
n_k channels, softmax over heads; the output is 2 x the weighted sum of the upsampled fields
(x2: vectors in voxels of the finer grid). The public code also ships a CUDA extension that
only speeds up the 27 shifted dot products; we compute them in PyTorch. Not diffeomorphic;
the input must divide by 16 (one axis above 16 voxels).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import spatial
from psmamba.models.peers._common import TINY_INIT_STD, PeerNet, neighbourhood_field
from psmamba.models.peers.hparams import ModeTConfig
from psmamba.models.peers.im2grid import NUM_LEVELS, PyramidEncoder
from psmamba.nn.blocks import ConvIN

__all__ = ["ModeT"]


class HeadProjection(nn.Module):
    """``LayerNorm(Linear(C -> heads * head_dim))``, split into heads.

    Shapes: ``(B, C, D, H, W)`` -> ``(B, heads, head_dim, D, H, W)``.
    """

    def __init__(self, channels: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.linear = nn.Linear(channels, heads * head_dim)
        nn.init.normal_(self.linear.weight, 0.0, TINY_INIT_STD)
        nn.init.zeros_(self.linear.bias)
        self.norm = nn.LayerNorm(heads * head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.linear(x.movedim(1, -1))).movedim(-1, 1)  # (B, n * hd, D, H, W)
        return y.unflatten(1, (self.heads, -1))


class CompetitiveWeighting(nn.Module):
    """ModeT's CWM: fuse ``heads`` fields into one on the x2 finer grid (module docstring).

    Shapes: ``(B, heads, 3, d, h, w)`` -> ``(B, 3, 2d, 2h, 2w)`` in voxels of the finer grid.
    """

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.weights = nn.Sequential(
            ConvIN(3 * heads, 6 * heads), ConvIN(6 * heads, 6 * heads), nn.Conv3d(6 * heads, heads, 3, padding=1)
        )

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        b, n, _, *grid = fields.shape
        up = F.interpolate(fields.flatten(1, 2), scale_factor=2, mode="trilinear", align_corners=True)
        weight = self.weights(up).softmax(dim=1)  # (B, heads, 2d, 2h, 2w)
        return 2.0 * (up.unflatten(1, (n, 3)) * weight.unsqueeze(2)).sum(1)


class ModeT(PeerNet):
    """ModeT from a :class:`~psmamba.models.peers.hparams.ModeTConfig`."""

    divisor = 16
    min_extent = 16

    def __init__(self, config: ModeTConfig | None = None, name: str = "modet") -> None:
        cfg = config if config is not None else ModeTConfig()
        super().__init__(name, cfg)
        self.encoder = PyramidEncoder(cfg.channels)
        heads = {NUM_LEVELS - i: n for i, n in enumerate(cfg.heads)}  # level -> heads
        self.projections = nn.ModuleList(
            HeadProjection(cfg.channels * 2**k, heads[k], cfg.head_dim) for k in range(1, NUM_LEVELS + 1)
        )
        self.position_bias = nn.ParameterList(nn.Parameter(torch.zeros(heads[k], 27)) for k in range(1, NUM_LEVELS + 1))
        self.cwm = nn.ModuleDict({str(k): CompetitiveWeighting(heads[k]) for k in range(1, NUM_LEVELS + 1) if heads[k] > 1})

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        b = moving.shape[0]
        feats = self.encoder(torch.cat([fixed, moving], dim=0))
        flow = None  # on the grid of the level being processed
        for k in range(NUM_LEVELS, 0, -1):
            f, m = feats[k - 1][:b], feats[k - 1][b:]
            if flow is not None:
                m = spatial.warp(m, flow)
            proj = self.projections[k - 1]
            heads = neighbourhood_field(proj(f), proj(m), self.position_bias[k - 1])  # (B, n, 3, ...)
            if str(k) in self.cwm:  # fused on the next finer grid
                w = self.cwm[str(k)](heads)
                flow = w if flow is None else spatial.compose(spatial.upsample_ddf(flow), w)
            else:
                w = heads[:, 0]
                flow = w if flow is None else spatial.compose(flow, w)
                if k > 1:
                    flow = spatial.upsample_ddf(flow)
        return flow
