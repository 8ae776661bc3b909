"""The typed, validated configuration of PSMamba-Net (no torch import: cheap to load anywhere).

One :class:`ModelConfig` describes every variant of the network: the paper model, its
``_diff`` (diffeomorphic) variant and the ablations of the paper's Table 4 are values of it
(see :mod:`psmamba.models.presets`), never separate classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psmamba.errors import PsmambaError

__all__ = ["ModelConfig", "BLOCK_KINDS", "LEVEL_BLOCK_KINDS"]

#: blocks usable in the Substrate Iterative Refinement loop (the level-5 decoder block)
BLOCK_KINDS = ("smb", "mamba", "transformer", "conv")
#: blocks usable at levels 4..1 (a transformer over 10^5-10^6 tokens is not practical)
LEVEL_BLOCK_KINDS = ("smb", "conv")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`psmamba.models.PSMambaNet` (validated on construction).

    Attributes:
        channels: ``c`` of the spec; the encoder has ``2c, 4c, 8c, 16c, 32c`` channels at
            levels 1..5 (8..128 for the paper's ``c = 4``); decoder block k sees ``D = 2 C_k``.
        sir_iters: ``K``, the number of passes of the shared level-5 block (Substrate Iterative
            Refinement). ``K = 1`` is one plain pass (no refinement); the paper uses 3.
        diff: the ``_diff`` variant: residual fields are integrated by scaling and squaring
            (and the level-1 encoder starts with a plain conv + LeakyReLU 1 -> c).
        sir_block: the level-5 block: ``"smb"`` (paper), ``"mamba"`` (SMB without SFE),
            ``"transformer"`` (SMB with multi-head self-attention instead of the Mamba layer)
            or ``"conv"`` (two ConvIN layers).
        level_block: the block at levels 4..1: ``"smb"`` (paper) or ``"conv"``.
        d_state, d_conv, expand: Mamba layer settings (``dt_rank`` is always ``ceil(D / 16)``).
        mamba_backend: selective-scan backend (``"auto"``, ``"reference"``, ``"loop"``,
            ``"cpu"``, ``"cuda"`` or one registered with ``psmamba.nn.scan.register_backend``).
            A run-time choice: it does not change the weights.
        attn_heads: heads of the transformer block; must divide the level-5 width ``D = 64c``
            (256 for the paper's c = 4; the default 8 gives 32 channels per head).
        int_steps: scaling-and-squaring steps of the ``_diff`` variant (spec: 7).
        se_reduction: ``r`` of the squeeze-and-excitation blocks (spec: 16).
    """

    channels: int = 4
    sir_iters: int = 3
    diff: bool = False
    sir_block: str = "smb"
    level_block: str = "smb"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    mamba_backend: str = "auto"
    attn_heads: int = 8
    int_steps: int = 7
    se_reduction: int = 16

    def __post_init__(self) -> None:
        for name in ("channels", "sir_iters", "d_state", "d_conv", "expand", "attn_heads", "int_steps", "se_reduction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PsmambaError(f"model config: {name} must be an integer, got {value!r}")
            minimum = 0 if name == "int_steps" else 1
            if value < minimum:
                raise PsmambaError(f"model config: {name} must be >= {minimum}, got {value}")
        if not isinstance(self.diff, bool):
            raise PsmambaError(f"model config: diff must be true or false, got {self.diff!r}")
        if self.sir_block not in BLOCK_KINDS:
            raise PsmambaError(f"model config: sir_block must be one of {BLOCK_KINDS}, got {self.sir_block!r}")
        if self.level_block not in LEVEL_BLOCK_KINDS:
            raise PsmambaError(
                f"model config: level_block must be one of {LEVEL_BLOCK_KINDS}, got {self.level_block!r}"
            )
        # the name itself is checked against psmamba.nn.scan's registry when the model is built
        # (backends can be registered at run time, and this module must not import torch)
        if not isinstance(self.mamba_backend, str) or not self.mamba_backend:
            raise PsmambaError(f"model config: mamba_backend must be a backend name, got {self.mamba_backend!r}")
        if self.sir_block == "transformer" and self.level_width(5) % self.attn_heads:
            raise PsmambaError(
                f"model config: attn_heads={self.attn_heads} does not divide the level-5 width "
                f"{self.level_width(5)} (= 64 * channels)"
            )

    # ------------------------------------------------------------------ derived values
    def encoder_channels(self, level: int) -> int:
        """Channels ``C_k`` of encoder level ``k`` (1..5): ``2c * 2^(k-1)``."""
        return self.channels * 2**level

    def level_width(self, level: int) -> int:
        """Width ``D = 2 C_k`` of the decoder block at level ``k`` (fixed and moving concatenated)."""
        return 2 * self.encoder_channels(level)

    @property
    def refines(self) -> bool:
        """True when the level-5 block runs more than once (Substrate Iterative Refinement on)."""
        return self.sir_iters > 1

    # ------------------------------------------------------------------ dict round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` dict (JSON/YAML-safe); ``ModelConfig.from_dict`` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys are an error (a typo must not pass silently)."""
        if not isinstance(data, Mapping):
            raise PsmambaError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PsmambaError(f"model config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise PsmambaError(f"model config: unknown key(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)
