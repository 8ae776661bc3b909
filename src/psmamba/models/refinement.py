"""Substrate Iterative Refinement (SIR): K passes of ONE shared decoder block at the coarsest level."""

from __future__ import annotations

import torch
import torch.nn as nn

from psmamba import spatial
from psmamba.models.decoder import DecoderBlock

__all__ = ["SubstrateIterativeRefinement"]


class SubstrateIterativeRefinement(nn.Module):
    """The paper's SIR loop at level 5, with one block whose weights every pass shares.

    ::

        phi = block(f, m)
        repeat K - 1 times:
            w   = block(f, warp(m, phi))       # moving features re-warped by the current estimate
            phi = warp(phi, w) + w             # = spatial.compose(phi, w)
        if integrate: phi = integrate_svf(phi, int_steps)   # the _diff variant, once, at the end

    Composition rule: a new residual ``w`` is composed onto ``phi`` as ``phi o (id + w) + w``
    (the reference code's rule; the paper's eq. 13 writes a plain sum). ``K = 1`` is a single
    pass, i.e. no refinement.

    Args:
        block: the shared level-5 :class:`DecoderBlock`.
        iters: K >= 1.
        integrate: integrate the final (composed) field by scaling and squaring.
        int_steps: scaling-and-squaring steps.

    Shapes: ``f, m (B, C5, d, h, w)`` (projected level-5 features) -> ``phi (B, 3, d, h, w)``
    in voxels of the level-5 grid.
    """

    def __init__(self, block: DecoderBlock, iters: int = 3, integrate: bool = False, int_steps: int = 7) -> None:
        super().__init__()
        if int(iters) < 1:
            raise ValueError(f"SIR needs at least one pass, got iters={iters}")
        self.block = block
        self.iters = int(iters)
        self.integrate = bool(integrate)
        self.int_steps = int(int_steps)

    def forward(self, f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        phi = self.block(f, m)
        for _ in range(self.iters - 1):
            w = self.block(f, spatial.warp(m, phi))
            phi = spatial.compose(phi, w)
        if self.integrate:
            phi = spatial.integrate_svf(phi, steps=self.int_steps)
        return phi

    def extra_repr(self) -> str:
        return f"iters={self.iters}, integrate={self.integrate}, int_steps={self.int_steps}"
