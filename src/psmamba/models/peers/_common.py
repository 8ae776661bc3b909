"""What every peer network shares: the forward contract and a few small layers.

:class:`PeerNet` owns the contract of :class:`psmamba.models.PSMambaNet` (the same input checks,
far-end zero padding up to the network's divisor, the field cropped back, the ORIGINAL moving
image warped with it); a peer only implements :meth:`PeerNet.field` on the padded grid.

All fields are voxel displacements in the project's one convention (:mod:`psmamba.spatial`):
channel i displaces axis i of ``(D, H, W)`` and ``warp(x, ddf)`` samples ``x`` at
``identity + ddf``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import spatial
from psmamba.models.net import RegistrationOutput, check_pair

__all__ = [
    "PeerNet",
    "VelocityOutput",
    "TINY_INIT_STD",
    "check_pair",
    "registration_head",
    "ConvAct",
    "ConvNormLReLU",
    "UpCatDecoderBlock",
    "NEIGHBOUR_OFFSETS",
    "neighbourhood_field",
    "coordinate_embedding",
]

#: standard deviation of the N(0, 1e-5) initialisation of the registration heads
TINY_INIT_STD = 1e-5

#: the 27 integer offsets of a 3x3x3 neighbourhood, C order (the D offset outermost)
NEIGHBOUR_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(itertools.product((-1, 0, 1), repeat=3))


class VelocityOutput(RegistrationOutput):
    """A :class:`~psmamba.models.net.RegistrationOutput` that also carries the stationary
    velocity field its ``ddf`` integrates, for a loss that regularises the field BEFORE
    integration (``loss.regularise: velocity``; MambaMorph's training, paper Table 1).

    It IS a ``RegistrationOutput``: it unpacks as ``(warped, ddf)`` like every network's output,
    so no caller changes; ``velocity`` ``(B, 3, D, H, W)`` is an attribute beside the two fields
    (``_replace`` and pytree rebuilds drop it to None: a loss that needs it then fails loudly).
    """

    velocity: torch.Tensor | None

    def __new__(cls, warped: torch.Tensor, ddf: torch.Tensor, velocity: torch.Tensor | None = None):
        self = super().__new__(cls, warped, ddf)
        self.velocity = velocity
        return self


class PeerNet(nn.Module):
    """Base class of the peer networks: ``forward(moving, fixed) -> RegistrationOutput``.

    Subclasses set :attr:`divisor` (the padded input must divide by it) and, where instance
    norm meets a one-voxel grid, :attr:`min_extent` (as PSMamba-Net's 16), and implement
    :meth:`field` (a network that predicts a velocity and integrates it overrides
    :meth:`fields` to return both, and sets :attr:`outputs_velocity`).

    Attributes:
        name: the registry name (``"transmorph"``, ...), stored in checkpoints.
        config: the peer's frozen config dataclass.
    """

    divisor: int = 16
    min_extent: int = 0
    #: whether :meth:`forward` returns a :class:`VelocityOutput` (the field before integration)
    outputs_velocity: bool = False

    def __init__(self, name: str, config: Any) -> None:
        super().__init__()
        self.name = name
        self.config = config

    def field(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` x 2 on the padded grid -> ddf ``(B, 3, D, H, W)`` on the same grid."""
        raise NotImplementedError

    def fields(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ddf, velocity or None)`` on the padded grid; the default: :meth:`field` and no velocity."""
        return self.field(moving, fixed), None

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Register ``moving`` onto ``fixed``.

        Args:
            moving: ``(B, 1, D, H, W)`` float image, any D, H, W.
            fixed: ``(B, 1, D, H, W)``, same shape.

        Returns:
            :class:`~psmamba.models.net.RegistrationOutput` ``(warped (B, 1, D, H, W),
            ddf (B, 3, D, H, W))``; a :class:`VelocityOutput` (the same two fields plus the
            cropped ``velocity``) when :attr:`outputs_velocity`.
        """
        check_pair(moving, fixed, self.min_extent)
        moving_p, size = spatial.pad_to_multiple(moving, self.divisor)
        fixed_p, _ = spatial.pad_to_multiple(fixed, self.divisor)
        ddf_p, velocity_p = self.fields(moving_p, fixed_p)
        ddf = spatial.crop_to(ddf_p, size).contiguous()
        warped = spatial.warp(moving, ddf)
        if velocity_p is None:
            return RegistrationOutput(warped=warped, ddf=ddf)
        return VelocityOutput(warped, ddf, spatial.crop_to(velocity_p, size))

    def checkpoint_config(self) -> dict[str, Any]:
        """``{"model": name, **config}``: what a checkpoint stores to rebuild this network."""
        return {"model": self.name, **self.config.to_dict()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, divisor={self.divisor}"


# --------------------------------------------------------------------------- small layers
def registration_head(in_ch: int, kernel_size: int = 3) -> nn.Conv3d:
    """Conv3d ``in_ch -> 3`` with weights N(0, 1e-5) (standard deviation) and a zero bias."""
    conv = nn.Conv3d(in_ch, 3, kernel_size, padding=kernel_size // 2)
    nn.init.normal_(conv.weight, 0.0, TINY_INIT_STD)
    nn.init.zeros_(conv.bias)
    return conv


class ConvAct(nn.Module):
    """Conv3d (k3, 'same' padding for stride 1, with bias) -> LeakyReLU(slope) (slope 0 = ReLU).

    Shapes: ``(B, in_ch, D, H, W)`` -> ``(B, out_ch, D / stride, H / stride, W / stride)``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, slope: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.slope = float(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


class ConvNormLReLU(nn.Module):
    """Conv3d k3 WITHOUT bias -> InstanceNorm3d (no affine) -> LeakyReLU(0.01).

    The TransMorph family's decoder unit (a bias in front of a non-affine instance norm would
    be inert, and that code has none). Shapes: ``(B, in_ch, ...)`` -> ``(B, out_ch, ...)``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(F.instance_norm(self.conv(x)), 0.01)


class UpCatDecoderBlock(nn.Module):
    """Trilinear x2 (``align_corners=False``), concatenated skips, two :class:`ConvNormLReLU`.

    Args:
        in_ch: channels of the coarse input.
        skip_ch: channels of all skips together (0 = none).
        out_ch: output channels.

    Shapes: ``x (B, in_ch, d, h, w)``, skips ``(B, *, 2d, 2h, 2w)`` -> ``(B, out_ch, 2d, 2h, 2w)``.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = ConvNormLReLU(in_ch + skip_ch, out_ch)
        self.conv2 = ConvNormLReLU(out_ch, out_ch)

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        x = torch.cat([x, *skips], dim=1) if skips else x
        return self.conv2(self.conv1(x))


# --------------------------------------------------------------------------- correlation layers
def neighbourhood_field(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each query over the 3x3x3 neighbourhood of keys; values are the offsets.

    For voxel ``p`` and head ``h``: ``a_o = softmax_o(<q_h(p), k_h(p + o)> + bias[h, o])`` over
    the 27 offsets ``o`` of :data:`NEIGHBOUR_OFFSETS`, keys outside the grid being zero; the
    output is ``sum_o a_o * o``, a displacement in voxels of this grid (no scale on the dot
    product: the callers' papers use none). The 27 dot products are shifted slices of one
    zero-padded key tensor.

    Args:
        q, k: ``(B, heads, head_dim, D, H, W)``.
        bias: ``(heads, 27)`` or ``None``.

    Returns:
        ``(B, heads, 3, D, H, W)``: one field per head.
    """
    if q.shape != k.shape or q.ndim != 6:
        raise ValueError(f"q and k must both be (B, heads, head_dim, D, H, W), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, heads, hd, d, h, w = q.shape
    kp = F.pad(k.reshape(b, heads * hd, d, h, w), (1, 1, 1, 1, 1, 1)).view(b, heads, hd, d + 2, h + 2, w + 2)
    logits = torch.stack(
        [(q * kp[..., 1 + i : 1 + i + d, 1 + j : 1 + j + h, 1 + l : 1 + l + w]).sum(2) for i, j, l in NEIGHBOUR_OFFSETS],
        dim=2,
    )  # (B, heads, 27, D, H, W)
    if bias is not None:
        logits = logits + bias.view(1, heads, 27, 1, 1, 1)
    attn = logits.softmax(dim=2)
    offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=q.device, dtype=attn.dtype)  # (27, 3)
    return torch.einsum("bhoxyz,oc->bhcxyz", attn, offsets)


def coordinate_embedding(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Im2Grid's fixed coordinate embedding ``(1, 6, D, H, W)``.

    Channels ``(cos t_D, sin t_D, cos t_H, sin t_H, cos t_W, sin t_W)`` with ``t_i = pi * p_i /
    (n_i - 1)``: each axis is mapped onto half a circle, so two voxels' embeddings have the dot
    product ``sum_i cos(t_i - t_i')``, largest for the same voxel. (The public code divides by
    ``n - 1`` also for a one-voxel axis, giving NaN; we use ``max(n - 1, 1)``.)
    """
    chans = []
    for axis, n in enumerate(shape):
        t = torch.arange(n, device=device, dtype=dtype) * (math.pi / max(n - 1, 1))
        view = [1, 1, 1]
        view[axis] = n
        for v in (t.cos(), t.sin()):
            chans.append(v.view(view).expand(*shape))
    return torch.stack(chans, dim=0).unsqueeze(0)
