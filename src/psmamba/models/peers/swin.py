"""A 3-D Swin transformer (shifted-window attention) for TransMorph, TransMatch and PIViT.

Written from the Swin paper (Liu et al., ICCV 2021) and its 3-D use in TransMorph (Chen et al.,
MedIA 2022); the facts we follow are in ``shared/spec/peers.md``.

Tokens are ``(B, L, C)`` with ``L = D * H * W`` in C order (W fastest), as
:func:`psmamba.nn.blocks.to_tokens` flattens a volume. A block::

    x = x + drop_path(W-MSA(LN(x)))          # (shifted) window attention, relative position bias
    x = x + drop_path(MLP(LN(x)))            # Linear C -> 4C, GELU, Linear 4C -> C

Windows: the grid is zero-padded at the far end up to a multiple of the window (AFTER the
norm, so padded tokens are zeros that take part as keys; the public code does the same and
we keep it); odd blocks roll the grid by ``window // 2`` and mask attention between tokens
from different regions of the rolled grid (-100 before the softmax, as Swin). The window is
never shrunk to a small grid (the public code keeps it too). Cross attention (TransMatch):
queries from a second token set ``y``, keys and values from ``x``, one shared ``qkv`` Linear
and one shared ``norm1`` for both, the residual on ``x``.

Initialisation: Linear weights truncated normal (std 0.02), biases 0, LayerNorms 1 / 0,
relative position tables truncated normal (std 0.02).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DropPath", "WindowAttention", "SwinBlock", "SwinStage", "PatchEmbed", "PatchMerging", "SwinEncoder", "init_swin"]

Grid = tuple[int, int, int]


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``
    and scale the kept ones by ``1 / (1 - p)``; the identity in eval mode or for ``p = 0``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


def _partition(x: torch.Tensor, window: Grid) -> torch.Tensor:
    """``(B, D, H, W, C)`` (each axis a multiple of the window) -> ``(B * nW, a * b * c, C)``."""
    b, d, h, w, c = x.shape
    a, bb, cc = window
    x = x.view(b, d // a, a, h // bb, bb, w // cc, cc, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, a * bb * cc, c)


def _unpartition(windows: torch.Tensor, window: Grid, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`_partition`: ``(B * nW, N, C)`` -> ``(B, D, H, W, C)``."""
    a, bb, cc = window
    d, h, w = grid
    c = windows.shape[-1]
    x = windows.view(-1, d // a, h // bb, w // cc, a, bb, cc, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, d, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows of ``N = prod(window)`` tokens, relative position bias.

    Shapes: ``x (B', N, C)`` (keys and values; also queries unless ``y`` is given),
    ``y (B', N, C)`` or ``None``, ``mask (nW, N, N)`` or ``None`` -> ``(B', N, C)``.
    """

    def __init__(self, dim: int, heads: int, window: Grid, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"WindowAttention: {heads} heads do not divide dim {dim}")
        self.dim, self.heads, self.window = dim, heads, tuple(window)
        self.scale = (dim // heads) ** -0.5
        a, b, c = self.window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * a - 1) * (2 * b - 1) * (2 * c - 1), heads))
        coords = torch.stack(torch.meshgrid(torch.arange(a), torch.arange(b), torch.arange(c), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N), each in [-(w-1), w-1]
        rel = rel + torch.tensor([a - 1, b - 1, c - 1]).view(3, 1, 1)
        index = (rel[0] * (2 * b - 1) + rel[1]) * (2 * c - 1) + rel[2]  # (N, N) into the table
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        h, hd = self.heads, c // self.heads
        if y is None:
            q, k, v = self.qkv(x).view(bw, n, 3, h, hd).permute(2, 0, 3, 1, 4)  # 3 x (B', h, N, hd)
        else:  # cross attention: the query rows of the shared qkv weight on y, the rest on x
            wq, wkv = self.qkv.weight.split([c, 2 * c])
            bq, bkv = self.qkv.bias.split([c, 2 * c]) if self.qkv.bias is not None else (None, None)
            q = F.linear(y, wq, bq).view(bw, n, h, hd).transpose(1, 2)
            k, v = F.linear(x, wkv, bkv).view(bw, n, 2, h, hd).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B', h, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, h)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, h, n, n) + mask[None, :, None]).view(bw, h, n, n)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, window={self.window}"


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block (see the module docstring).

    Shapes: ``x (B, L, C)``, ``y (B, L, C)`` or ``None`` (self attention), ``grid = (D, H, W)``
    with ``L = D * H * W`` -> ``(B, L, C)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: Grid,
        shift: Grid = (0, 0, 0),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, self.window, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _windows(self, t: torch.Tensor, grid: Grid) -> torch.Tensor:
        b, _, c = t.shape
        x = t.view(b, *grid, c)
        pads: list[int] = [0, 0]  # channels last: F.pad takes the last axis first
        for n, w in reversed(list(zip(grid, self.window))):
            pads += [0, (w - n % w) % w]
        x = F.pad(x, pads)
        if any(self.shift):
            x = torch.roll(x, shifts=[-s for s in self.shift], dims=(1, 2, 3))
        return _partition(x, self.window)

    def forward(
        self, x: torch.Tensor, grid: Grid, y: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, length, c = x.shape
        padded = tuple(-(-n // w) * w for n, w in zip(grid, self.window))
        xw = self._windows(self.norm1(x), grid)
        yw = self._windows(self.norm1(y), grid) if y is not None else None
        out = _unpartition(self.attn(xw, yw, mask if any(self.shift) else None), self.window, padded)
        if any(self.shift):
            out = torch.roll(out, shifts=list(self.shift), dims=(1, 2, 3))
        out = out[:, : grid[0], : grid[1], : grid[2]].reshape(b, length, c)
        x = x + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def shifted_window_mask(grid: Grid, window: Grid, shift: Grid, device: torch.device) -> torch.Tensor:
    """``(nW, N, N)`` additive mask: -100 between tokens of different regions of the rolled grid.

    Along each axis the padded grid has three regions, ``[0, P - w)``, ``[P - w, P - s)`` and
    ``[P - s, P)``; after the roll by ``-s`` a window may hold tokens from two of them, which
    were not neighbours before the roll.
    """
    padded = [-(-n // w) * w for n, w in zip(grid, window)]
    ids = torch.zeros(padded, device=device)
    region = 0
    bounds = [((0, p - w), (p - w, p - s), (p - s, p)) for p, w, s in zip(padded, window, shift)]
    for d0, d1 in bounds[0]:
        for h0, h1 in bounds[1]:
            for w0, w1 in bounds[2]:
                ids[d0:d1, h0:h1, w0:w1] = region
                region += 1
    win = _partition(ids[None, ..., None], window)[..., 0]  # (nW, N)
    return (win[:, None, :] != win[:, :, None]).float() * -100.0


class SwinStage(nn.Module):
    """``depth`` blocks at one width, every other one shifted by ``window // 2``.

    Shapes: ``x (B, L, C)``, optional ``y (B, L, C)`` (cross attention: the same ``y`` for
    every block), ``grid`` -> ``(B, L, C)``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        window: Grid,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path: Sequence[float] = (),
    ) -> None:
        super().__init__()
        self.window = tuple(window)
        self.shift = tuple(w // 2 for w in window)
        rates = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, self.window, self.shift if i % 2 else (0, 0, 0), mlp_ratio, qkv_bias, rates[i])
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, grid: Grid, y: torch.Tensor | None = None) -> torch.Tensor:
        mask = shifted_window_mask(grid, self.window, self.shift, x.device).to(x.dtype) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            x = blk(x, grid, y, mask)
        return x


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = ``patch`` (with bias), then LayerNorm over channels.

    Shapes: ``(B, in_ch, D, H, W)`` -> ``(tokens (B, L, C), grid (D/p, H/p, W/p))``.
    """

    def __init__(self, in_ch: int, dim: int, patch: int = 4, norm: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_ch, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.proj(x)
        grid = tuple(int(s) for s in x.shape[2:])
        return self.norm(x.flatten(2).transpose(1, 2)), grid  # type: ignore[return-value]


class PatchMerging(nn.Module):
    """2x2x2 space-to-depth (8C channels), LayerNorm(8C), Linear 8C -> 2C without bias.

    Shapes: ``(B, L, C)`` on an even ``grid`` -> ``(B, L / 8, 2C)`` on ``grid / 2``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        b, _, c = x.shape
        d, h, w = grid
        x = x.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        x = x.reshape(b, (d // 2) * (h // 2) * (w // 2), 8 * c)
        return self.reduction(self.norm(x)), (d // 2, h // 2, w // 2)


class SwinEncoder(nn.Module):
    """Patch embedding, then ``len(depths)`` Swin stages with patch merging in between.

    Stage i has ``embed * 2^i`` channels at ``1 / (patch * 2^i)`` of the input; each stage's
    output passes its own LayerNorm before it is returned (the merging takes the un-normed
    tokens). Drop-path rates rise linearly from 0 to ``drop_path`` over all blocks.

    Shapes: ``(B, in_ch, D, H, W)`` (each axis divisible by ``patch * 2^(stages-1)``) -> a list
    of ``(B, embed * 2^i, D_i, H_i, W_i)``, finest first.
    """

    def __init__(
        self,
        in_ch: int,
        embed: int = 96,
        depths: Sequence[int] = (2, 2, 4, 2),
        heads: Sequence[int] = (4, 4, 8, 8),
        window: Grid = (5, 6, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path: float = 0.3,
        patch: int = 4,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_ch, embed, patch)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.norms = nn.ModuleList()
        start = 0
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            dim = embed * 2**i
            self.stages.append(SwinStage(dim, depth, nh, window, mlp_ratio, qkv_bias, rates[start : start + depth]))
            self.norms.append(nn.LayerNorm(dim))
            if i < len(depths) - 1:
                self.merges.append(PatchMerging(dim))
            start += depth
        init_swin(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        t, grid = self.patch_embed(x)
        outs = []
        for i, (stage, norm) in enumerate(zip(self.stages, self.norms)):
            t = stage(t, grid)
            outs.append(norm(t).transpose(1, 2).reshape(t.shape[0], -1, *grid))  # (B, C_i, grid_i)
            if i < len(self.merges):
                t, grid = self.merges[i](t, grid)
        return outs


def init_swin(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights, zero Linear biases, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
