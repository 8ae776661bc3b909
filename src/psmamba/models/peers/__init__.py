"""The paper's comparison networks as psmamba models, our own implementations.

Every peer is a :class:`~psmamba.models.peers._common.PeerNet`:
``forward(moving, fixed) -> RegistrationOutput(warped, ddf)`` exactly like PSMamba-Net (any
input size: padded at the far end to the network's divisor, the field cropped back), built by
name::

    from psmamba.models import build_model
    net = build_model("transmorph")                  # or build_peer("transmorph", drop_path=0.0)

=================  ==========================================  ========  =======================
name               paper                                       divisor   trainable parameters
=================  ==========================================  ========  =======================
``transmorph``     Chen et al., MedIA 2022                     32        46,771,251
``im2grid``        Liu et al., MICCAI 2022                     16        886,003
``prnet_pp``       Kang et al., MedIA 2022 (Dual-PRNet++)      16        1,236,965
``modet``          Wang et al., MICCAI 2023                    16        1,029,670
``pivit``          Ma et al., MICCAI 2023                      8         664,873
``mambamorph``     Guo et al., arXiv 2024                      16        7,305,459
``mambamorph_feat``  (MambaMorphFeat)                          16        7,590,531
``transmatch``     Chen et al., IEEE TMI 2024                  32        70,793,235
``voxelmorph``     Balakrishnan et al., IEEE TMI 2019          16        327,331
=================  ==========================================  ========  =======================

A checkpoint of a peer stores ``{"model": name, **config.to_dict()}`` as its config
(:meth:`PeerNet.checkpoint_config`); :func:`build_peer` takes that dict back.
:data:`PEER_TRAINING` holds each peer's training settings from the paper's Table 1.

This module imports no torch: the registry names modules that are loaded on first build.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from psmamba.errors import PsmambaError
from psmamba.models.peers.hparams import (
    Im2GridConfig,
    MambaMorphConfig,
    ModeTConfig,
    PeerConfig,
    PIViTConfig,
    PRNetPPConfig,
    TransMatchConfig,
    TransMorphConfig,
    VoxelMorphConfig,
)

if TYPE_CHECKING:
    from psmamba.models.peers._common import PeerNet

__all__ = ["PEERS", "PEER_TRAINING", "PeerSpec", "build_peer", "is_peer", "peer_config"]


class PeerSpec(NamedTuple):
    """A registry entry: the default config and where the network class lives."""

    config: PeerConfig
    module: str
    cls: str


PEERS: dict[str, PeerSpec] = {
    "transmorph": PeerSpec(TransMorphConfig(), "psmamba.models.peers.transmorph", "TransMorph"),
    "im2grid": PeerSpec(Im2GridConfig(), "psmamba.models.peers.im2grid", "Im2Grid"),
    "prnet_pp": PeerSpec(PRNetPPConfig(), "psmamba.models.peers.prnet_pp", "PRNetPP"),
    "modet": PeerSpec(ModeTConfig(), "psmamba.models.peers.modet", "ModeT"),
    "pivit": PeerSpec(PIViTConfig(), "psmamba.models.peers.pivit", "PIViT"),
    "mambamorph": PeerSpec(MambaMorphConfig(), "psmamba.models.peers.mambamorph", "MambaMorph"),
    "mambamorph_feat": PeerSpec(MambaMorphConfig(features=True), "psmamba.models.peers.mambamorph", "MambaMorph"),
    "transmatch": PeerSpec(TransMatchConfig(), "psmamba.models.peers.transmatch", "TransMatch"),
    "voxelmorph": PeerSpec(VoxelMorphConfig(), "psmamba.models.peers.voxelmorph", "VoxelMorph"),
}


def _ncc(reg_weight: float, lr: float, amsgrad: bool, poly_power: float) -> dict[str, dict[str, Any]]:
    return {
        "loss": {
            "similarity": "lncc", "window": 9, "regulariser": "diffusion", "reg_weight": reg_weight, "dice_weight": 0.0,
        },
        "optim": {"lr": lr, "amsgrad": amsgrad, "poly_power": poly_power},
    }


#: Training defaults per peer. Loss, lambda and lr are the paper's Table 1 (NCC window 9 +
#: lambda x gradient L2; MambaMorph: soft Dice on labels + 0.1 x gradient L2; TransMatch: NCC
#: + 4 x gradient L2, lr 4e-4). The keys are those of ``psmamba.config.LossConfig`` /
#: ``OptimConfig``; ``amsgrad`` and ``poly_power`` (0 = constant lr) follow each public code
#: as ``shared/spec/peers.md`` reports it (TransMorph, Im2Grid, PR++, ModeT: Adam amsgrad,
#: poly 0.9; PIViT: Adam, constant; TransMatch: Adam amsgrad, constant; MambaMorph: Adam;
#: VoxelMorph: Adam, constant, as its code). MambaMorph has no image similarity
#: (``"similarity": "none"``) and regularises the field before integration
#: (``"regularise": "velocity"``: its output is a ``VelocityOutput``). These are the defaults of
#: a training config whose ``model.preset`` is the peer (:func:`psmamba.config.config_from_dict`).
PEER_TRAINING: dict[str, dict[str, dict[str, Any]]] = {
    "transmorph": _ncc(1.0, 1e-4, True, 0.9),
    "im2grid": _ncc(1.0, 1e-4, True, 0.9),
    "prnet_pp": _ncc(1.0, 1e-4, True, 0.9),
    "modet": _ncc(1.0, 1e-4, True, 0.9),
    "pivit": _ncc(1.0, 1e-4, False, 0.0),
    "transmatch": _ncc(4.0, 4e-4, True, 0.0),
    "voxelmorph": _ncc(1.0, 1e-4, False, 0.0),
    **{
        name: {
            "loss": {"similarity": "none", "regulariser": "diffusion", "reg_weight": 0.1, "dice_weight": 1.0,
                     "regularise": "velocity"},
            "optim": {"lr": 1e-4, "amsgrad": False, "poly_power": 0.0},
        }  # fmt: skip
        for name in ("mambamorph", "mambamorph_feat")
    },
}


def is_peer(name: Any) -> bool:
    """Whether ``name`` names a peer network (a str key of :data:`PEERS`)."""
    return isinstance(name, str) and name in PEERS


def peer_config(name: str, config: PeerConfig | Mapping[str, Any] | None = None, **overrides: Any) -> PeerConfig:
    """The validated config of peer ``name``: its default, or ``config`` (a config or a dict,
    e.g. a checkpoint's, whose ``"model"`` key must then be ``name``), with ``overrides``."""
    if not is_peer(name):
        raise PsmambaError(f"unknown peer network {name!r}; choose one of {sorted(PEERS)}")
    spec = PEERS[name]
    kind = type(spec.config)
    if config is None:
        cfg = spec.config
    elif isinstance(config, kind):
        cfg = config
    elif isinstance(config, Mapping):
        data = dict(config)
        stored = data.pop("model", name)
        if stored != name:
            raise PsmambaError(f"config of model {stored!r} given for peer {name!r}")
        cfg = kind.from_dict(data)
    else:
        raise PsmambaError(f"peer {name!r} needs a {kind.__name__} or a dict, got {type(config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg


def build_peer(name: str, config: PeerConfig | Mapping[str, Any] | None = None, **overrides: Any) -> PeerNet:
    """Build a freshly initialised peer network (see :func:`peer_config` for the arguments)."""
    cfg = peer_config(name, config, **overrides)
    spec = PEERS[name]
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    return cls(cfg, name=name)
