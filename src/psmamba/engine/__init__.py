"""Training, evaluation and registration as plain functions.

Nothing heavy is imported here: the names below are resolved on first use, so that
``import psmamba.engine`` stays cheap (no torch until a function is called).

* :func:`fit` (``psmamba.engine.train``): train a model from a :class:`TrainConfig`; the loop is
  :class:`Trainer` (``engine.trainer``), every step :func:`train_step` of an :class:`Objective`
  (``engine.objective``).
* :func:`load_train_config` / :class:`TrainConfig` (``psmamba.config``).
* :func:`save_training_state` / :func:`load_training_state` (``psmamba.engine.checkpointing``).
* registration methods as named objects (``engine.methods``), :func:`register_pair`
  (``engine.register``: validate -> resample -> method -> outputs), :func:`evaluate_pairs`
  (``engine.evaluate``) and its result files (``engine.results``).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> sub-module that defines it
_LAZY = {
    "fit": "train",
    "FitResult": "train",
    "TrainConfig": "psmamba.config",
    "DataConfig": "psmamba.config",
    "LossConfig": "psmamba.config",
    "OptimConfig": "psmamba.config",
    "RunConfig": "psmamba.config",
    "load_train_config": "psmamba.config",
    "apply_overrides": "psmamba.config",
    "Trainer": "trainer",
    "Objective": "objective",
    "train_step": "objective",
    "save_training_state": "checkpointing",
    "load_training_state": "checkpointing",
    "register_pair": "register",
    "RegistrationMethod": "methods",
    "method_from_options": "methods",
    "load_model": "methods",
    "RegistrationResult": "register",
    "evaluate_pairs": "evaluate",
    "EvaluationResult": "evaluate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'psmamba.engine' has no attribute {name!r}")
    path = module if module.startswith("psmamba.") else f"psmamba.engine.{module}"
    value = getattr(importlib.import_module(path), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
