"""Named configurations: the paper model, its ``_diff`` variant and the rows of Table 4.

Every preset is a :class:`ModelConfig` value of the ONE model class; an ablation row is the pair
(block of the level-5 refinement loop, block of levels 4..1) plus the number of passes K:

=======================  ================  ================  ===  ===============================
preset                   level-5 block     levels 4..1       K    paper, Table 4 (LPBA40 Dice)
=======================  ================  ================  ===  ===============================
``baseline_conv``        conv              conv              1    baseline 0.724
``sir_transformer``      transformer       conv              3    SIR-T
``sir_mamba``            mamba (no SFE)    conv              3    SIR-M
``sir_smb``              smb               conv              3    SIR-SMB only 0.728
``smb_only``             smb               smb               1    SMB only 0.727
``sir_transformer_smb``  transformer       smb               3    SIR-T + SMB
``sir_mamba_smb``        mamba (no SFE)    smb               3    SIR-M + SMB
``sir_smb_smb``          smb               smb               3    SIR-SMB + SMB 0.731 (= paper)
``paper``                smb               smb               3    0.731
``paper_diff``           smb               smb               3    _diff 0.732
=======================  ================  ================  ===  ===============================

``smb_only`` reads "one pass, SMB" as: the decoder is SMB at every level, the level-5 block
included, and it runs once (no refinement); the spec leaves the level-5 block of that row open.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psmamba.errors import PsmambaError
from psmamba.config import ModelConfig

__all__ = ["PRESETS", "get_config"]

_PAPER = ModelConfig(channels=4, sir_iters=3, diff=False, sir_block="smb", level_block="smb")

PRESETS: dict[str, ModelConfig] = {
    "paper": _PAPER,
    "paper_diff": _PAPER.replace(diff=True),
    "baseline_conv": _PAPER.replace(sir_block="conv", level_block="conv", sir_iters=1),
    "sir_transformer": _PAPER.replace(sir_block="transformer", level_block="conv"),
    "sir_mamba": _PAPER.replace(sir_block="mamba", level_block="conv"),
    "sir_smb": _PAPER.replace(sir_block="smb", level_block="conv"),
    "smb_only": _PAPER.replace(sir_iters=1),
    "sir_transformer_smb": _PAPER.replace(sir_block="transformer"),
    "sir_mamba_smb": _PAPER.replace(sir_block="mamba"),
    "sir_smb_smb": _PAPER,
}


def get_config(name_or_config: str | ModelConfig | Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Resolve a preset name, a :class:`ModelConfig` or a dict to a config, then apply overrides.

    Example: ``get_config("paper", sir_iters=5, mamba_backend="reference")``.
    """
    if isinstance(name_or_config, ModelConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, str):
        if name_or_config not in PRESETS:
            raise PsmambaError(f"unknown model preset {name_or_config!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[name_or_config]
    elif isinstance(name_or_config, Mapping):
        cfg = ModelConfig.from_dict(name_or_config)
    else:
        raise PsmambaError(
            f"a model is named by a preset, a ModelConfig or a dict, got {type(name_or_config).__name__}"
        )
    return cfg.replace(**overrides) if overrides else cfg
