"""Typed configurations and their dict / YAML round trip.

Every configuration is a dataclass validated in ``__post_init__`` with ``to_dict()`` and
``from_dict()`` (unknown keys are an error). This module re-exports them and offers generic
helpers; YAML is read with ``yaml.safe_load`` only.

    from psmamba.config import ModelConfig, save_yaml, load_yaml
    save_yaml("model.yaml", ModelConfig(sir_iters=5))
    cfg = ModelConfig.from_dict(load_yaml("model.yaml"))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from psmamba.errors import PsmambaError
from psmamba.models.config import ModelConfig

__all__ = ["ModelConfig", "to_dict", "from_dict", "save_yaml", "load_yaml"]

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass (or a mapping) as a plain dict."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise PsmambaError(f"cannot turn a {type(cfg).__name__} into a config dict")


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build config class ``cls`` from ``data``; unknown keys are an error."""
    if hasattr(cls, "from_dict"):
        return cls.from_dict(data)  # type: ignore[attr-defined]
    if not isinstance(data, Mapping):
        raise PsmambaError(f"{cls.__name__} must be built from a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise PsmambaError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**dict(data))


def save_yaml(path: str | os.PathLike, cfg: Any) -> Path:
    """Write a config (dataclass or mapping) as YAML, atomically (temp file + rename)."""
    import yaml

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping (an empty file gives ``{}``); errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PsmambaError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid YAML"
        raise PsmambaError(f"{path}: invalid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise PsmambaError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return dict(data)


# Training configuration (defined in psmamba.engine.config; no torch import), re-exported here.
from psmamba.engine.config import (  # noqa: E402
    DataConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    load_train_config,
)

__all__ += ["TrainConfig", "DataConfig", "LossConfig", "OptimConfig", "RunConfig", "load_train_config"]
