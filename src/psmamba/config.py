"""Typed configurations (model, data, loss, optimiser, run) and their dict / YAML round trip.

No torch import: cheap to load anywhere. Every configuration is a dataclass validated in
``__post_init__``; an unknown key anywhere is an error naming the key and where it came from
(:func:`check_keys`, the one place that checks keys). YAML is read with ``yaml.safe_load`` only.

* :class:`ModelConfig`: one frozen config for every variant of PSMamba-Net (the paper model,
  its ``_diff`` variant and the ablations of the paper's Table 4 are values of it: see
  :mod:`psmamba.models.presets`), never separate classes.
* :class:`TrainConfig`: one training run, five sections::

      model:  {preset: paper, ...any ModelConfig field} or {preset: transmorph, ...its config's fields}
      data:   where the pairs come from (the demo example, a folder or published layout, synthetic)
      loss:   similarity, regulariser and optional Dice supervision
      optim:  Adam, the per-epoch poly decay, epochs, batch size, gradient accumulation
      run:    seed, device, mixed precision, validation, logging, checkpoints, debug stops

  Every default is the paper's protocol (``shared/spec/architecture.md`` section 7): LNCC with
  a 9^3 window plus lambda = 1 diffusion, Adam with lr 1e-4 and amsgrad,
  ``lr_m = lr (1 - (m-1)/M)^0.8`` per epoch, batch 1, every ordered pair of training volumes,
  30 epochs, fp32. A peer network's preset brings its own loss and optimiser defaults (the
  paper's Table 1: :data:`psmamba.models.peers.PEER_TRAINING`); values the config sets win.

    from psmamba.config import ModelConfig, save_yaml, load_yaml
    save_yaml("model.yaml", ModelConfig(sir_iters=5))
    cfg = ModelConfig.from_dict(load_yaml("model.yaml"))
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from psmamba.errors import PsmambaError, first_line

__all__ = [
    "ModelConfig", "BLOCK_KINDS", "LEVEL_BLOCK_KINDS",
    "DataConfig", "LossConfig", "OptimConfig", "RunConfig", "TrainConfig",
    "load_train_config", "save_train_config", "apply_overrides", "parse_override", "config_to_dict",
    "config_from_dict", "build_model_config", "preset_training_defaults",
    "check_keys", "to_dict", "from_dict", "save_yaml", "load_yaml", "read_yaml",
]

T = TypeVar("T")


# --------------------------------------------------------------------------- generic helpers
def check_keys(given: Iterable[str], known: type | Iterable[str], where: str, prefix: str = "",
               extra: Iterable[str] = ()) -> None:
    """Raise one line naming the first unknown key of ``given``.

    ``known`` is a dataclass (its fields) or the allowed names; ``extra`` names more allowed
    keys; ``prefix`` is put before the key in the message (``"optim."``); ``where`` names the
    source (a file, ``--set``, ``"model config"``).
    """
    names = {f.name for f in dataclasses.fields(known)} if dataclasses.is_dataclass(known) else set(known)
    names |= set(extra)
    for key in given:
        if key not in names:
            listed = ", ".join(sorted(names))
            raise PsmambaError(f"{where}: unknown key '{prefix}{key}' (known: {listed})")


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
    check_keys(data, cls, cls.__name__)
    return cls(**dict(data))


def save_yaml(path: str | os.PathLike, cfg: Any) -> Path:
    """Write a config (dataclass or mapping) as YAML, atomically (temp file + rename)."""
    import yaml

    from psmamba.files import atomic_write_text

    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))
    return path


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping (an empty file gives ``{}``); every error names the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PsmambaError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise PsmambaError(f"{p}: not valid YAML{where}: {first_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise PsmambaError(f"{p}: a config file must hold a mapping, got {type(raw).__name__}")
    return dict(raw)


#: the generic name of :func:`read_yaml`
load_yaml = read_yaml


# --------------------------------------------------------------------------- the model
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
        check_keys(data, cls, "model config")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        check_keys(changes, type(self), "model config")
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- training
DATA_SOURCES = ("demo", "folder", "manifest", "lpba40", "mindboggle", "abdomenct", "pickle", "synth", "pretrain")
SIMILARITIES = ("lncc", "mse", "none")
REGULARISERS = ("diffusion", "bending")
REGULARISED_FIELDS = ("ddf", "velocity")
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    """Where training and validation pairs come from.

    Attributes:
        source: ``demo`` (the built-in real example, :mod:`psmamba.data.demo`), ``folder`` (any
            folder of scans, matched by patterns), ``manifest`` (a CSV/JSON list), the published
            layouts ``lpba40`` / ``mindboggle`` / ``abdomenct``, ``pickle`` (``(image, label)``
            pickles), ``synth`` (SynthMorph-style pairs generated on the fly, no images) or
            ``pretrain`` (:mod:`psmamba.data.pretrain`: SynthMorph-style pairs from real atlas label
            maps mixed with augmented demo training pairs; validation on the demo's val pairs).
        root: the folder (or manifest file) for the file-based sources.
        size: for ``demo``: ``small`` (about 64^3, tests and the CPU) or ``full`` (160x192x160).
        options: extra keyword arguments for the reader / preprocessing / generator of
            :mod:`psmamba.data` (their names are checked when the data set is built).
        val_fraction: fraction of subjects held out for validation when the source has no split
            of its own (subjects, never pairs, are split, so no volume is in both).
        pairs: ``all`` (every ordered pair, N(N-1): the paper) or ``atlas`` (atlas to subject).
        use_labels: read label maps when the source has them (validation Dice, Dice loss).
        num_workers: DataLoader worker processes (0 = load in the training process).
        max_train_pairs: use only the first this-many pairs of each epoch's order (debugging).
        max_val_pairs: validate on at most this many pairs (a fixed, seeded subset).
        synth_pairs: pairs per epoch for ``source: synth`` and ``source: pretrain``.
        resize: train on this ``[D, H, W]`` grid: every pair is resampled to it on the fly (images
            trilinear, labels nearest, ``align_corners=True``) -- e.g. half resolution on a CPU.
            It is stored in the checkpoints as ``image_size``, so ``register`` runs the network
            on the same grid and resamples its field back to the images.
    """

    source: str = "demo"
    root: str | None = None
    size: str = "small"
    options: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.2
    pairs: str = "all"
    use_labels: bool = True
    num_workers: int = 0
    max_train_pairs: int | None = None
    max_val_pairs: int | None = None
    synth_pairs: int = 100
    resize: list[int] | None = None

    def __post_init__(self) -> None:
        _check_types(self, "data")
        _choice("data.source", self.source, DATA_SOURCES)
        _choice("data.size", self.size, ("small", "full"))  # the demo's sizes (source demo / pretrain)
        if self.resize is not None:
            ok = isinstance(self.resize, (list, tuple)) and len(self.resize) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in self.resize
            )
            if not ok:
                raise PsmambaError(f"data.resize must be three sizes >= 2 ([D, H, W]), got {self.resize!r}")
            self.resize = [int(v) for v in self.resize]
        _choice("data.pairs", self.pairs, ("all", "atlas"))
        if self.source in ("folder", "manifest", "lpba40", "mindboggle", "abdomenct", "pickle") and not self.root:
            raise PsmambaError(f"data.root is required for data.source={self.source!r}")
        if not isinstance(self.options, dict):
            raise PsmambaError(f"data.options must be a mapping, got {self.options!r}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise PsmambaError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        _nonneg_int("data.num_workers", self.num_workers)
        for name in ("max_train_pairs", "max_val_pairs"):
            value = getattr(self, name)
            if value is not None:
                _pos_int(f"data.{name}", value)
        _pos_int("data.synth_pairs", self.synth_pairs)


@dataclass
class LossConfig:
    """The training objective ``sim(warped, fixed) + reg_weight * reg(ddf) + dice_weight * Dice``.

    Attributes:
        similarity: ``lncc`` (negative local NCC, lower is better), ``mse`` or ``none`` (no
            image term: MambaMorph's Dice-only training, paper Table 1).
        window: LNCC box window (the paper: 9).
        regulariser: ``diffusion`` (the paper's gradient L2) or ``bending``.
        regularise: the field the regulariser sees: ``ddf`` (the displacement, the paper) or
            ``velocity`` (the stationary velocity field BEFORE integration, as MambaMorph's code
            does; only for a network that outputs it, see
            :class:`psmamba.models.peers._common.VelocityOutput`).
        reg_weight: lambda (the paper: 1).
        dice_weight: weight of the soft Dice loss between warped moving labels and fixed labels
            (0 = unsupervised, the paper). Needs labels in the data.

    A peer network's preset (``model.preset: transmorph``, ...) brings its own defaults for
    these fields (:data:`psmamba.models.peers.PEER_TRAINING`); a value set in the config wins.
    """

    similarity: str = "lncc"
    window: int = 9
    regulariser: str = "diffusion"
    regularise: str = "ddf"
    reg_weight: float = 1.0
    dice_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self, "loss")
        _choice("loss.similarity", self.similarity, SIMILARITIES)
        _choice("loss.regulariser", self.regulariser, REGULARISERS)
        _choice("loss.regularise", self.regularise, REGULARISED_FIELDS)
        _pos_int("loss.window", self.window)
        if self.window % 2 == 0:
            raise PsmambaError(f"loss.window must be odd (a box centred on each voxel), got {self.window}")
        for name in ("reg_weight", "dice_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise PsmambaError(f"loss.{name} must be a finite number >= 0, got {value!r}")
        if self.similarity == "none" and self.dice_weight == 0:
            raise PsmambaError("loss.similarity=none needs loss.dice_weight > 0 (else nothing matches the images)")


@dataclass
class OptimConfig:
    """Adam with the paper's per-epoch polynomial decay.

    ``lr_m = lr * (1 - (m - 1) / epochs) ** poly_power`` for epoch ``m = 1..epochs``.

    Attributes:
        batch_size: pairs per forward pass on each process (the paper: 1).
        accumulate: forward passes whose gradients are summed before one optimiser step. The
            global batch is ``batch_size * accumulate * world_size`` pairs per step.
        grad_clip: clip the gradient norm to this value (0 = off, the paper).
    """

    lr: float = 1e-4
    amsgrad: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    epochs: int = 30
    poly_power: float = 0.8
    batch_size: int = 1
    accumulate: int = 1
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self, "optim")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise PsmambaError(f"optim.lr must be > 0, got {self.lr!r}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise PsmambaError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        _pos_int("optim.epochs", self.epochs)
        _pos_int("optim.batch_size", self.batch_size)
        _pos_int("optim.accumulate", self.accumulate)
        for name in ("poly_power", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise PsmambaError(f"optim.{name} must be a number >= 0, got {value!r}")


@dataclass
class RunConfig:
    """Everything about one run that is not the model, the data or the objective.

    Attributes:
        out: output folder (``last.pt``, ``best.pt``, ``metrics.csv``, ``config.yaml``, ``tb/``).
        seed: seeds Python, NumPy and torch, the per-epoch pair order and the validation subset.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        amp: mixed precision on CUDA only: ``none`` (fp32, the paper), ``bf16`` or ``fp16``
            (with a gradient scaler). Ignored, with a warning, on the CPU.
        deterministic: ask torch for deterministic kernels (slower on CUDA).
        threads: torch intra-op threads on the CPU (0 = torch's default).
        val_every: validate every this-many epochs (the best checkpoint follows validation Dice,
            or the validation loss when the data has no labels).
        log_every: write a training row to the CSV / TensorBoard every this-many steps.
        checkpoint_every: also write ``last.pt`` every this-many optimiser steps inside an epoch
            (0 = only at the end of each epoch). A SIGINT/SIGTERM always writes it before exiting.
        max_steps: stop after this many optimiser steps in total: validate, write ``best.pt`` if
            better and ``last.pt`` (debugging, tests; ``--resume`` carries on exactly from there).
        max_minutes: likewise after this much wall time (the demo's budget).
        tensorboard: write TensorBoard logs when ``tensorboard`` is installed (the CSV is always written).
        progress: show a tqdm progress bar (rank 0 only).
        images: log a slice image of warped/fixed and a deformation grid every validation.
    """

    out: str = "runs/psmamba"
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    deterministic: bool = False
    threads: int = 0
    val_every: int = 1
    log_every: int = 10
    checkpoint_every: int = 0
    max_steps: int | None = None
    max_minutes: float | None = None
    tensorboard: bool = True
    progress: bool = True
    images: bool = True

    def __post_init__(self) -> None:
        _check_types(self, "run")
        _choice("run.device", self.device, DEVICES)
        _choice("run.amp", self.amp, AMP_MODES)
        # torch.manual_seed takes at most 2**64 - 1, and ranks add their index to the seed
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise PsmambaError(f"run.seed must be an integer in [0, 2**63), got {self.seed!r}")
        _nonneg_int("run.threads", self.threads)
        cores = os.cpu_count() or 1
        if self.threads > cores:  # torch.set_num_threads(100000) segfaults
            raise PsmambaError(f"run.threads must be at most the {cores} CPU cores of this machine, got {self.threads}")
        _pos_int("run.val_every", self.val_every)
        _pos_int("run.log_every", self.log_every)
        _nonneg_int("run.checkpoint_every", self.checkpoint_every)
        if self.max_steps is not None:
            _pos_int("run.max_steps", self.max_steps)
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0):
            raise PsmambaError(f"run.max_minutes must be > 0, got {self.max_minutes!r}")
        if not self.out:
            raise PsmambaError("run.out must name an output folder")


@dataclass
class TrainConfig:
    """One training run: model, data, loss, optimiser and run settings.

    ``model`` is a mapping: ``preset`` names one of :data:`psmamba.models.PRESETS` (default
    ``paper``) and every other key overrides a field of that preset's
    :class:`psmamba.models.ModelConfig`; the keys are checked against ``ModelConfig``.
    ``preset`` may also name a comparison network of :data:`psmamba.models.PEERS`
    (``transmorph``, ...): the other keys then override fields of its config, and its training
    settings of the paper's Table 1 (:data:`psmamba.models.peers.PEER_TRAINING`) are the
    defaults of ``loss`` and ``optim`` (:func:`config_from_dict` applies them; a value the
    config sets wins).
    """

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "paper"})
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, dict):
            raise PsmambaError(f"model must be a mapping (preset: NAME, field: value ...), got {self.model!r}")
        self.model = dict(self.model)
        self.model.setdefault("preset", "paper")

    def model_config(self):
        """The config of the network this run trains (preset plus overrides): a
        :class:`ModelConfig`, or a peer network's config (see :attr:`model_name`)."""
        return build_model_config(self.model)

    @property
    def model_name(self) -> str:
        """The preset: a PSMamba-Net preset or a peer network's name (``transmorph``, ...)."""
        return str(self.model.get("preset", "paper"))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON safe); :meth:`from_dict` inverts it."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from nested mappings; unknown keys are an error."""
        return config_from_dict(data, "config")


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


# --------------------------------------------------------------------------- model section
def build_model_config(section: Mapping[str, Any], source: str = "config"):
    """``{preset: NAME, key: value, ...}`` -> the network's config (unknown keys raise, naming ``source``).

    A PSMamba-Net preset gives a :class:`ModelConfig`; a peer network's name (a key of
    :data:`psmamba.models.PEERS`) gives that peer's config dataclass
    (:mod:`psmamba.models.peers.hparams`), the other keys overriding its fields.
    """
    from psmamba import models  # only when a model section is actually resolved

    section = dict(section)
    preset = section.pop("preset", "paper")
    presets = getattr(models, "PRESETS", {})
    if preset in models.PEERS:
        from psmamba.models.peers import peer_config

        try:
            return peer_config(preset, **section)
        except PsmambaError as exc:
            raise PsmambaError(f"{source}: model.preset {preset}: {first_line(exc)}") from None
    if preset not in presets:
        known = ", ".join([*sorted(presets), *sorted(models.PEERS)])
        raise PsmambaError(f"{source}: unknown model.preset {preset!r} (known: {known})")
    base = presets[preset]
    base = base if dataclasses.is_dataclass(base) else models.ModelConfig(**dict(base))
    check_keys(section, type(base), source, prefix="model.", extra=("preset",))
    try:
        return dataclasses.replace(base, **section)
    except (TypeError, ValueError) as exc:
        raise PsmambaError(f"{source}: bad model setting: {first_line(exc)}") from None


# --------------------------------------------------------------------------- dict / YAML
def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from nested mappings; unknown keys raise naming ``source``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise PsmambaError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    check_keys(raw, ("model", *_SECTIONS), source)
    model = raw.get("model") or {}
    if isinstance(model, str):  # "model: paper" is shorthand for "model: {preset: paper}"
        model = {"preset": model}
    if not isinstance(model, Mapping):
        raise PsmambaError(f"{source}: section 'model' must be a mapping or a preset name, got {model!r}")
    defaults = preset_training_defaults(model.get("preset", "paper"))
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, Mapping):
            raise PsmambaError(f"{source}: section {name!r} must be a mapping, got {section!r}")
        check_keys(section, cls, source, prefix=f"{name}.")
        section = {**defaults.get(name, {}), **section}  # the preset's defaults, then the config's values
        try:
            kwargs[name] = cls(**dict(section))
        except PsmambaError as exc:
            raise PsmambaError(f"{source}: {exc}") from None
        except TypeError as exc:  # e.g. a list where a number belongs
            raise PsmambaError(f"{source}: bad value in section {name!r}: {exc}") from None
    cfg = TrainConfig(model=dict(model), **kwargs)
    build_model_config(cfg.model, source)  # unknown model keys fail here, before anything runs
    return cfg


def preset_training_defaults(preset: Any) -> dict[str, dict[str, Any]]:
    """The ``loss`` / ``optim`` defaults a model preset brings: a peer network's training
    settings (:data:`psmamba.models.peers.PEER_TRAINING`, the paper's Table 1), ``{}`` for a
    PSMamba-Net preset (whose defaults are the dataclasses' own, the paper's protocol)."""
    from psmamba.models.peers import PEER_TRAINING  # no torch: the registry only

    if not isinstance(preset, str) or preset not in PEER_TRAINING:
        return {}
    return {section: dict(values) for section, values in PEER_TRAINING[preset].items()}


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON/``torch.save(weights_only=True)`` safe) of a config."""
    out: dict[str, Any] = {"model": dict(cfg.model)}
    for name in _SECTIONS:
        section = dataclasses.asdict(getattr(cfg, name))
        out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in section.items()}
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (``["optim", "lr"]``, ``0.0003``); values are parsed as YAML."""
    import yaml

    if "=" not in text:
        raise PsmambaError(f"--set expects KEY=VALUE (e.g. optim.lr=3e-4), got {text!r}")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise PsmambaError(f"--set: bad key {key!r} in {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (in place, returned); keys are checked later."""
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if isinstance(child, str) and part == "model":  # "model: paper" shorthand
                child = node[part] = {"preset": child}
            if not isinstance(child, dict):
                raise PsmambaError(f"--set {text}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides.

    Raises:
        PsmambaError: missing/unreadable file, invalid YAML, an unknown key or a bad value; the
            one-line message names the file (or ``--set``) and the key.
    """
    source = "defaults"
    raw: Any = {}
    if path is not None:
        source = str(Path(path))
        raw = read_yaml(path)
    if overrides:
        source = f"{source} + --set" if path is not None else "--set"
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source)


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temp file in the same folder + rename)."""
    save_yaml(path, config_to_dict(cfg))


# --------------------------------------------------------------------------- validation helpers
def _check_types(obj: Any, section: str) -> None:
    """Every field of the config dataclass ``obj`` has its annotated type: a YAML ``lr: .inf``,
    ``out: 3`` or ``betas: [a, b]`` is one line naming the key here, not a crash of the run later.
    ``float`` fields take whole numbers too and must be finite; ``bool`` is not an ``int``; a
    number where a text is expected is taken as its text (a folder named ``2024``)."""
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        coerced = _coerce(value, hints[f.name])
        if coerced is not value:
            setattr(obj, f.name, coerced)
        _check_value(f"{section}.{f.name}", coerced, hints[f.name])


def _coerce(value: Any, hint: Any) -> Any:
    """What YAML 1.1 reads differently from what is meant: ``3e-4`` (no dot) is a text, not a
    float (``--set optim.lr=3e-4``); a folder named ``2024`` is a number. Anything else as is."""
    import typing

    hint, _ = _unwrap_optional(hint)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(hint) in (list, tuple) and isinstance(value, (list, tuple)):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if args:
            out = [_coerce(v, args[0]) for v in value]
            if any(a is not b for a, b in zip(out, value)):
                return type(value)(out)
    return value


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; any other hint -> ``(hint, False)``."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return arms[0], len(arms) < len(args)
    return hint, False


def _check_value(name: str, value: Any, hint: Any) -> None:
    import typing

    hint, optional = _unwrap_optional(hint)
    if value is None and optional:
        return
    origin = typing.get_origin(hint)
    if hint is Any:
        return
    if hint is bool and not isinstance(value, bool):
        raise PsmambaError(f"{name} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PsmambaError(f"{name} must be an integer, got {value!r}")
    if hint is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise PsmambaError(f"{name} must be a finite number, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise PsmambaError(f"{name} must be a text, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise PsmambaError(f"{name} must be a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if args:
            for v in value:
                _check_value(name, v, args[0])
    if origin is dict and not isinstance(value, dict):
        raise PsmambaError(f"{name} must be a mapping, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PsmambaError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _pos_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PsmambaError(f"{name} must be an integer >= 1, got {value!r}")


def _nonneg_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PsmambaError(f"{name} must be an integer >= 0, got {value!r}")
