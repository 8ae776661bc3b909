"""Typed, validated configs of the peer networks (no torch import: cheap to load anywhere).

One small frozen dataclass per network; a checkpoint stores ``{"model": name, **to_dict()}``
and :func:`psmamba.models.peers.build_peer` rebuilds the network from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from psmamba.errors import PsmambaError

__all__ = [
    "PeerConfig",
    "TransMorphConfig",
    "TransMatchConfig",
    "MambaMorphConfig",
    "Im2GridConfig",
    "ModeTConfig",
    "PRNetPPConfig",
    "PIViTConfig",
    "VoxelMorphConfig",
]

C = TypeVar("C", bound="PeerConfig")


@dataclass(frozen=True)
class PeerConfig:
    """Base of the peer configs: dict round trip and validated copies."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int) or value < (0 if f.name == "int_steps" else 1):
                    raise PsmambaError(f"{self.label()} config: {f.name} must be a positive integer, got {value!r}")
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                    raise PsmambaError(f"{self.label()} config: {f.name} must be a number in [0, 1), got {value!r}")
            elif f.type in ("bool", bool) and not isinstance(value, bool):
                raise PsmambaError(f"{self.label()} config: {f.name} must be true or false, got {value!r}")
            elif str(f.type).startswith("tuple"):
                if isinstance(value, list):  # YAML / JSON give lists
                    object.__setattr__(self, f.name, tuple(value))
                    value = tuple(value)
                if not isinstance(value, tuple) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
                ):
                    raise PsmambaError(f"{self.label()} config: {f.name} must be a list of positive integers, got {value!r}")

    @classmethod
    def label(cls) -> str:
        return cls.__name__.removesuffix("Config")

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` (tuples become lists: JSON/YAML-safe)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a mapping; unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(data, Mapping):
            raise PsmambaError(f"{cls.label()} config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PsmambaError(f"{cls.label()} config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return type(self).from_dict({**dataclasses.asdict(self), **changes})


@dataclass(frozen=True)
class TransMorphConfig(PeerConfig):
    """TransMorph (Chen et al. 2022): Swin encoder on the pair, conv decoder, plain displacement.

    ``window`` (5, 6, 7) is the official config; (5, 6, 5) changes only the relative-position
    tables. ``drop_path`` is the stochastic-depth rate of the last block.
    """

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 4, 2)
    heads: tuple[int, ...] = (4, 4, 8, 8)
    window: tuple[int, ...] = (5, 6, 7)
    drop_path: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.depths) != 4 or len(self.heads) != 4 or len(self.window) != 3:
            raise PsmambaError("TransMorph config: depths and heads need 4 values, window 3")


@dataclass(frozen=True)
class TransMatchConfig(PeerConfig):
    """TransMatch (Chen et al. 2023), LPBA40 config: one Swin encoder run on each image,
    cross-attention stages (``cross_depth`` blocks, ``cross_heads`` heads) at every scale."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 4, 2)
    heads: tuple[int, ...] = (4, 4, 8, 8)
    window: tuple[int, ...] = (5, 6, 5)
    cross_depth: int = 2
    cross_heads: int = 4
    drop_path: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.depths) != 4 or len(self.heads) != 4 or len(self.window) != 3:
            raise PsmambaError("TransMatch config: depths and heads need 4 values, window 3")


@dataclass(frozen=True)
class MambaMorphConfig(PeerConfig):
    """MambaMorph (Guo et al. 2024): one Mamba layer per stage in TransMorph's layout.

    ``features``: the ``MambaMorphFeat`` variant (a shared 16-channel U-Net feature extractor
    on each image first). ``mamba_backend`` is a run-time choice (it does not change weights).
    """

    features: bool = False
    embed_dim: int = 96
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    int_steps: int = 7
    mamba_backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.mamba_backend, str) or not self.mamba_backend:
            raise PsmambaError(f"MambaMorph config: mamba_backend must be a backend name, got {self.mamba_backend!r}")


@dataclass(frozen=True)
class Im2GridConfig(PeerConfig):
    """Im2Grid (Liu et al. 2022), the ModeT authors' version: ``channels`` = c of the encoder
    (2c .. 32c channels at levels 1..5)."""

    channels: int = 4


@dataclass(frozen=True)
class ModeTConfig(PeerConfig):
    """ModeT (Wang et al. 2023): heads per level from coarse to fine, ``head_dim`` each."""

    channels: int = 4
    head_dim: int = 6
    heads: tuple[int, ...] = (8, 4, 2, 1, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.heads) != 5:
            raise PsmambaError(f"ModeT config: heads needs 5 values (levels 5..1), got {list(self.heads)}")
        if self.heads[-1] != 1:
            # a level with several heads fuses them on the next finer grid; level 1 has none
            raise PsmambaError(f"ModeT config: the finest level must have 1 head, got {self.heads[-1]}")


@dataclass(frozen=True)
class PRNetPPConfig(PeerConfig):
    """Dual-PRNet++ (Kang et al. 2022), the ModeT authors' version: ``channels`` = the first
    encoder width (8: 8, 16, 16, 32, 32 channels)."""

    channels: int = 8


@dataclass(frozen=True)
class PIViTConfig(PeerConfig):
    """PIViT (Ma et al. 2023): ``iterations`` Swin refinements at 1/8, ``channels`` encoder width."""

    channels: int = 32
    iterations: int = 3
    window: int = 8


@dataclass(frozen=True)
class VoxelMorphConfig(PeerConfig):
    """VoxelMorph ``VxmDense`` defaults (Balakrishnan et al. 2019; Dalca et al. 2019 for the
    diffeomorphic integration): U-Net widths, ``int_steps`` squaring steps at half size
    (0 = a plain displacement)."""

    encoder: tuple[int, ...] = (16, 32, 32, 32)
    decoder: tuple[int, ...] = (32, 32, 32, 32, 32, 16, 16)
    int_steps: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.decoder) < len(self.encoder):
            raise PsmambaError("VoxelMorph config: decoder needs at least as many widths as encoder")
