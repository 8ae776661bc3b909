"""MambaMorph (Guo et al., arXiv:2401.13934, 2024), our implementation.

TransMorph's layout with each Swin stage replaced by ONE Mamba layer (``shared/spec/peers.md``)::

    x  = cat(moving, fixed)            # MambaMorphFeat: cat(U(moving), U(fixed)), U a shared
                                       # 16-channel VoxelMorph U-Net (1 -> 16 at full size)
    f48 = ConvIN(avgpool3(x)) @ 1/2;  f16 = ConvIN(x) @ 1                # conv skips
    t  = LN(PatchEmbed4(x)) + sinusoidal 3-D position code               # 96 @ 1/4
    for C in 96, 192, 384:
        t = Mamba(LN(t))               # raster-flattened tokens, no residual
        s_C = LN(t)                    # the stage's output
        t = PatchMerging(t)            # LN(8C), Linear 8C -> 2C (after the first two stages)
    y = up1(s384, s192); y = up2(y, s96); y = up3(y, f48); y = up4(y, f16)   # 192, 96, 48, 16
    svf = head(y)                      # Conv 16 -> 3, N(0, 1e-5)
    ddf = integrate_svf(svf, 7)        # scaling and squaring at full size: diffeomorphic

The Mamba layers are :class:`psmamba.nn.mamba.Mamba` (d_state 16, d_conv 4, expand 2), so any
of psmamba's scan backends runs them. The input must divide by 16.

Not built: the public ``MambaMorphFeat``'s read-out head (a conv pair on the extracted
features, 4,115 parameters) feeds only an auxiliary contrastive feature loss that the paper's
Table 1 does not use; without that loss it receives no gradient. Our MambaMorphFeat therefore
has 7,590,531 trainable parameters against the public 7,594,646 (-0.05 %).
Training (Table 1): soft Dice on warped labels + 0.1 x gradient L2 of the field BEFORE
integration: :meth:`MambaMorph.forward` returns a
:class:`~psmamba.models.peers._common.VelocityOutput` (``(warped, ddf)`` plus the cropped
``velocity``), which the training objective regularises with ``loss.regularise: velocity``
(MambaMorph's preset default, :data:`psmamba.models.peers.PEER_TRAINING`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import spatial
from psmamba.models.peers._common import ConvNormLReLU, PeerNet, UpCatDecoderBlock, registration_head
from psmamba.models.peers.hparams import MambaMorphConfig
from psmamba.models.peers.swin import PatchEmbed, PatchMerging
from psmamba.models.net import _check_backend
from psmamba.models.peers.voxelmorph import VxmUNet
from psmamba.nn.mamba import Mamba

__all__ = ["MambaMorph", "sinusoidal_position_code"]

#: MambaMorphFeat's feature extractor: VoxelMorph U-Net widths (encoder, decoder)
FEATURE_UNET = ((16, 16), (16, 16, 16, 16))


def sinusoidal_position_code(grid: tuple[int, int, int], channels: int, device, dtype) -> torch.Tensor:
    """3-D sinusoidal position code ``(1, D * H * W, channels)`` in token order (W fastest).

    Each axis gets ``k = 2 * ceil(channels / 6)`` channels ``[sin(p f_0..), cos(p f_0..)]`` with
    ``f_j = 10000^(-2j / k)`` (the Transformer's frequencies); the three blocks (D, H, W)
    are concatenated and cut to ``channels``.
    """
    k = 2 * math.ceil(channels / 6)
    freq = 10000.0 ** (-torch.arange(0, k, 2, device=device, dtype=torch.float32) / k)  # (k/2,)
    blocks = []
    for axis, n in enumerate(grid):
        arg = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freq  # (n, k/2)
        emb = torch.cat([arg.sin(), arg.cos()], dim=-1)  # (n, k)
        view = [1, 1, 1, k]
        view[axis] = n
        blocks.append(emb.view(view).expand(*grid, k))
    code = torch.cat(blocks, dim=-1)[..., :channels]  # (D, H, W, channels)
    return code.reshape(1, -1, channels).to(dtype)


class MambaMorph(PeerNet):
    """MambaMorph / MambaMorphFeat from a :class:`~psmamba.models.peers.hparams.MambaMorphConfig`."""

    divisor = 16
    outputs_velocity = True

    def __init__(self, config: MambaMorphConfig | None = None, name: str = "mambamorph") -> None:
        cfg = config if config is not None else MambaMorphConfig()
        super().__init__(name, cfg)
        _check_backend(cfg.mamba_backend)
        e = cfg.embed_dim
        in_ch = 2
        self.features = None
        if cfg.features:
            self.features = VxmUNet(1, *FEATURE_UNET)
            in_ch = 2 * self.features.out_channels
        self.patch_embed = PatchEmbed(in_ch, e, 4)
        widths = [e, 2 * e, 4 * e]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in widths)
        self.mambas = nn.ModuleList(
            Mamba(c, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, backend=cfg.mamba_backend)
            for c in widths
        )
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in widths)
        self.merges = nn.ModuleList(PatchMerging(c) for c in widths[:-1])
        self.skip_half = ConvNormLReLU(in_ch, e // 2)
        self.skip_full = ConvNormLReLU(in_ch, 16)
        self.up1 = UpCatDecoderBlock(4 * e, 2 * e, 2 * e)
        self.up2 = UpCatDecoderBlock(2 * e, e, e)
        self.up3 = UpCatDecoderBlock(e, e // 2, e // 2)
        self.up4 = UpCatDecoderBlock(e // 2, 16, 16)
        self.head = registration_head(16)

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.fields(moving, fixed)[0]

    def fields(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ddf, velocity)`` on the padded grid: the velocity and its scaling-and-squaring integral."""
        v = self.velocity(moving, fixed)
        return spatial.integrate_svf(v, self.config.int_steps), v

    def velocity(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The stationary velocity field ``(B, 3, D, H, W)`` before integration, on the PADDED grid
        (inputs must already divide by :attr:`divisor`; :meth:`forward` pads for you)."""
        if self.features is not None:
            b = moving.shape[0]
            feats = self.features(torch.cat([moving, fixed], dim=0))  # one shared extractor
            x = torch.cat([feats[:b], feats[b:]], dim=1)
        else:
            x = torch.cat([moving, fixed], dim=1)
        f_half = self.skip_half(F.avg_pool3d(x, 3, stride=2, padding=1))
        f_full = self.skip_full(x)
        t, grid = self.patch_embed(x)  # (B, L, 96)
        t = t + sinusoidal_position_code(grid, t.shape[-1], t.device, t.dtype)
        outs = []
        for i, (norm, mamba, out_norm) in enumerate(zip(self.norms, self.mambas, self.out_norms)):
            t = mamba(norm(t))  # (B, L, C): one scan over the raster-ordered tokens
            outs.append(out_norm(t).transpose(1, 2).reshape(t.shape[0], -1, *grid))
            if i < len(self.merges):
                t, grid = self.merges[i](t, grid)
        y = self.up2(self.up1(outs[2], outs[1]), outs[0])
        y = self.up4(self.up3(y, f_half), f_full)
        return self.head(y)

    def set_mamba_backend(self, backend: str) -> None:
        """Switch the selective-scan backend of every Mamba layer (weights are unchanged)."""
        _check_backend(backend)
        self.config = self.config.replace(mamba_backend=backend)
        for m in self.mambas:
            m.backend = backend
