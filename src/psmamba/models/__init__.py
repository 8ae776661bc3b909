"""PSMamba-Net as one configurable model.

Public API::

    from psmamba.models import build_model, PRESETS, ModelConfig
    model = build_model("paper")                   # or "paper_diff", "baseline_conv", ...
    peer = build_model("transmorph")               # a comparison network (psmamba.models.peers)
    out = model(moving, fixed)                     # RegistrationOutput(warped, ddf)
    save_checkpoint("model.pt", model, epoch=3)
    model, ckpt = load_checkpoint("model.pt")

Modules: :mod:`~psmamba.config` (``ModelConfig``), :mod:`~psmamba.models.encoder`,
:mod:`~psmamba.models.decoder`, :mod:`~psmamba.models.refinement` (SIR),
:mod:`~psmamba.models.net` (``PSMambaNet``), :mod:`~psmamba.models.presets`,
:mod:`~psmamba.models.checkpoint`; the paper's comparison networks: :mod:`~psmamba.models.peers`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from psmamba.config import ModelConfig
from psmamba.errors import PsmambaError
from psmamba.models.peers import PEERS, build_peer
from psmamba.models.presets import PRESETS, get_config

if TYPE_CHECKING:  # the torch-heavy names are imported on first use (PEP 562, see __getattr__)
    import torch.nn as nn

    from psmamba.models.checkpoint import load_checkpoint, save_checkpoint
    from psmamba.models.net import PSMambaNet, RegistrationOutput

__all__ = [
    "ModelConfig",
    "PSMambaNet",
    "RegistrationOutput",
    "PRESETS",
    "PEERS",
    "build_model",
    "get_config",
    "save_checkpoint",
    "load_checkpoint",
]

# Configs and presets import without torch (a CLI can validate a config file quickly);
# the network and checkpoint code load torch when first touched.
_LAZY = {
    "PSMambaNet": "psmamba.models.net",
    "RegistrationOutput": "psmamba.models.net",
    "save_checkpoint": "psmamba.models.checkpoint",
    "load_checkpoint": "psmamba.models.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'psmamba.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def build_model(name_or_config: str | ModelConfig | Mapping[str, Any] = "paper", **overrides: Any) -> nn.Module:
    """Build a freshly initialised :class:`PSMambaNet` or comparison network.

    Args:
        name_or_config: a preset name (see :data:`PRESETS`), a :class:`ModelConfig` or a dict
            of its fields; or a peer name (see :data:`PEERS`), or a peer's checkpoint config
            ``{"model": name, **fields}``; or a training config's model section
            ``{"preset": name, **fields}`` (either kind: :func:`psmamba.config.build_model_config`).
        **overrides: config fields to change, e.g. ``sir_iters=5`` or ``mamba_backend="reference"``.
    """
    if isinstance(name_or_config, Mapping) and "preset" in name_or_config:
        from psmamba.config import build_model_config

        section = {**name_or_config, **overrides}
        cfg = build_model_config(section, "model section")
        preset = section["preset"]
        return build_peer(preset, cfg) if preset in PEERS else build_model(cfg)
    if isinstance(name_or_config, str) and name_or_config in PEERS:
        return build_peer(name_or_config, **overrides)
    if isinstance(name_or_config, str) and name_or_config not in PRESETS:
        raise PsmambaError(
            f"unknown model preset {name_or_config!r}; presets: {sorted(PRESETS)}; comparison networks: {sorted(PEERS)}"
        )
    if isinstance(name_or_config, Mapping) and "model" in name_or_config:
        return build_peer(name_or_config["model"], name_or_config, **overrides)
    from psmamba.models.net import PSMambaNet

    return PSMambaNet(get_config(name_or_config, **overrides))
