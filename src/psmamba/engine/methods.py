"""Registration methods as named objects: ``method(moving, fixed) -> ddf``.

Every method has a ``name`` (what ``summary.json``, the evaluation CSVs and the plots call it)
and ``settings()`` (what it ran with), and maps two images on one grid to a displacement field
on that grid:

* ``moving``, ``fixed``: ``(1, 1, D, H, W)`` float32 on the same grid, intensities in [0, 1];
* ``init``: optional ``(1, 3, D, H, W)`` field to start from (what an earlier stage found);
* returns ``(1, 3, D, H, W)`` voxel displacements on that grid, without gradient.

A method that works on a grid of its own (a network trained at 2 mm, say) resizes the images
to it and its field back (``align_corners=True``: :func:`psmamba.spatial.resize_volume` and
:func:`psmamba.spatial.resize_ddf`). A network whose training images lay on a known world grid
(:class:`NetworkSpace`: the shipped one, any network trained on the demo or pre-training data)
is given the pair resampled into that grid instead, when the caller passes the fixed grid's
``affine``: the same axes (R, A, S), voxel size and extent as in training, whatever the files'
voxel order, size or spacing. :class:`Chain` runs methods one after the other, each
starting from the previous field: ``Chain([Network(...), InstanceOptimisation(...)])`` is the
network's field refined on the pair (``network+io``).

:func:`method_from_options` turns the command line's options into one of these.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psmamba.engine.objective import Objective, train_step
from psmamba.errors import PsmambaError, first_line, require_file

__all__ = [
    "RegistrationMethod", "Identity", "GivenField", "Network", "NetworkFineTuned", "InstanceOptimisation", "Diffeomorphic",
    "Chain",
    "MethodSpec", "STAGES", "SPECIAL_METHODS", "parse_method", "deformable_method",
    "method_from_options", "load_model", "training_size", "train_config_of", "NetworkSpace", "training_space",
    "call_options",
    "LR_NETWORK", "LR_FIELD", "LAM_NETWORK", "LAM_FIELD",
]

# Defaults of the two kinds of test-time optimisation (Adam).
LR_NETWORK = 1e-4  # the paper's training learning rate: fine-tuning continues training
LR_FIELD = 0.1  # voxels per step at most; Adam's steps are about lr in size
LAM_NETWORK = 1.0  # the paper's lambda: fine-tuning continues training with its loss
# A free field has none of a network's implicit smoothness: on the demo's test_hard pairs
# (40 iterations) lambda = 3 kept Dice (0.666 vs 0.670) and cut folding from 0.155 % to 0.019 %
# and SDlogJ from 0.84 to 0.32; on its test pairs Dice was 0.750 vs 0.747.
LAM_FIELD = 3.0


class RegistrationMethod:
    """The interface (see the module docstring). ``grid``: the grid it works on (None: the images')."""

    name: str = "method"
    grid: tuple[int, int, int] | None = None

    #: whether :meth:`run` takes ``mask=`` (a fixed-grid weight map where the similarity counts)
    uses_mask: bool = False

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor, init: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, affine: Any = None) -> torch.Tensor:
        """The field on the images' grid. ``affine``: that grid's ``(4, 4)`` voxel -> world (RAS mm)
        matrix, when known (used by a :class:`Network` with a :class:`NetworkSpace`)."""
        size = tuple(int(s) for s in fixed.shape[2:])
        kw = {"mask": mask} if self.uses_mask else {}
        if self.grid is None or tuple(self.grid) == size:
            return self.run(moving, fixed, init, **kw)
        from psmamba.spatial import resize_ddf, resize_volume

        init_g = None if init is None else resize_ddf(init, self.grid)
        if mask is not None and self.uses_mask:
            kw["mask"] = resize_volume(mask, self.grid)
        ddf = self.run(resize_volume(moving, self.grid), resize_volume(fixed, self.grid), init_g, **kw)
        return resize_ddf(ddf, size)

    def run(self, moving: torch.Tensor, fixed: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What the method ran with (JSON-ready), for ``summary.json``."""
        return {"method": self.name, "grid": None if self.grid is None else list(self.grid)}

    def to(self, device: torch.device) -> RegistrationMethod:
        """Move what the method holds (a network) to ``device``."""
        return self


class Identity(RegistrationMethod):
    """No registration: the zero field (the "initial" row of the papers' tables)."""

    name = "identity"

    def run(self, moving, fixed, init):
        return torch.zeros((1, 3) + tuple(fixed.shape[2:]), device=fixed.device, dtype=fixed.dtype)


class GivenField(RegistrationMethod):
    """A displacement field computed elsewhere (another tool's result), returned as a method's:
    what ``psmamba evaluate --fields`` scores under the same protocol as psmamba's own methods.

    Args:
        ddf: a file :func:`psmamba.io.load_ddf` reads -- psmamba's ``ddf.nii.gz`` or a Learn2Reg
            field (voxel displacements of the fixed grid, the same convention), or an ITK / ANTs
            displacement field (``warp_itk.nii.gz``, ``antsApplyTransforms -o [warp.nii.gz,1]``;
            world mm, converted) -- the WHOLE map (affine and deformable) on the fixed grid; or
            an array / tensor ``(3, D, H, W)`` of voxel displacements.
        name: what the results call it (default ``"given field"``).

    :meth:`check` reads the file and checks it against the fixed image before any work; a voxel
    field's file must have the fixed image's affine or none (no orientation, or the identity), an
    ITK field's the fixed image's (its millimetres are read through it).
    """

    name = "given field"
    #: computed by another tool (register warns where the images' headers may be read otherwise)
    external = True

    def __init__(self, ddf: Any, name: str | None = None) -> None:
        self.ddf = ddf
        self._loaded: tuple[torch.Tensor, Any, bool] | None = None
        if name:
            self.name = name

    def load(self) -> tuple[torch.Tensor, Any, bool]:
        """``(field (3, D, H, W) float32 tensor, the file's affine or None when it has no
        orientation (an array: None), whether it came from an ITK/ANTs field)``, read once."""
        if self._loaded is None:
            self._loaded = self._read()
        return self._loaded

    def _read(self) -> tuple[torch.Tensor, Any, bool]:
        import numpy as np

        from psmamba import io

        if isinstance(self.ddf, (str, os.PathLike)):
            if isinstance(self.ddf, str) and not self.ddf.strip():
                raise PsmambaError("displacement field: the file name is empty")
            img = io.load_ddf(self.ddf)
            field = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img.data, -1, 0)))
            world, oriented = io.is_itk_field(img.header), io.has_orientation(img.header)
            if world and not oriented:
                raise PsmambaError(f"displacement field {self.ddf}: an ITK/ANTs field (millimetres) whose file has no "
                                   "orientation (qform and sform codes 0) cannot be read in voxels")
            return field, (img.affine if oriented else None), world
        field = torch.as_tensor(self.ddf, dtype=torch.float32).detach().cpu()
        if field.ndim == 5 and field.shape[0] == 1:
            field = field[0]
        if field.ndim != 4 or field.shape[0] != 3 or not bool(torch.isfinite(field).all()):
            raise PsmambaError(f"given field: expected finite (3, D, H, W) voxel displacements, got {tuple(field.shape)}")
        return field, None, False

    def check(self, fixed_shape: Sequence[int], fixed_affine: Any = None, fixed_name: str = "the fixed image"):
        """The field as ``(1, 3, D, H, W)`` after checking it lies on the fixed grid."""
        import numpy as np

        field, aff, world = self.load()
        what = f"displacement field {self.ddf}" if isinstance(self.ddf, (str, os.PathLike)) else "given field"
        if tuple(field.shape[1:]) != tuple(int(n) for n in fixed_shape):
            raise PsmambaError(f"{what}: grid {tuple(field.shape[1:])} is not {fixed_name}'s {tuple(fixed_shape)} "
                               "(the field must lie on the grid of the image it maps onto)")
        if aff is not None and fixed_affine is not None:
            same = np.allclose(aff, fixed_affine, atol=1e-3)
            if not same and (world or not np.allclose(aff, np.eye(4))):
                raise PsmambaError(f"{what}: its affine is not {fixed_name}'s (the field was written on another "
                                   "grid: a reoriented or resampled copy of the fixed image?)")
        return field[None]

    def __call__(self, moving, fixed, init=None, mask=None, affine=None):
        return self.check(fixed.shape[2:], affine).to(device=fixed.device, dtype=torch.float32)

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "ddf": str(self.ddf) if isinstance(self.ddf, (str, os.PathLike)) else "array"}


class Network(RegistrationMethod):
    """A trained network's prediction ``model(moving, fixed).ddf`` on its grid.

    Args:
        model: ``forward(moving, fixed) -> (warped, ddf)``, put in eval mode.
        grid: the grid it runs on (its training grid: :func:`training_size`); None: its space's
            grid when it has a space, else the images'.
        name: default ``"network"``; the evaluation names it after its checkpoint file.
        checkpoint: the file it came from, recorded in the settings.
        guard: keep the field only where it raises the pair's LNCC (:meth:`_accepted`).
        space: where its training images lay in the world (:class:`NetworkSpace`); ``"auto"``
            (default): the model's own (``load_model`` sets ``model.psmamba_space`` from the
            checkpoint, see :func:`training_space`); None: none. Given the fixed grid's ``affine``,
            the pair is resampled into this space (``grid``, when it differs, takes the space's
            extent with that many voxels); without a space, or without an affine, the images are
            resized to ``grid``.
    """

    def __init__(self, model: nn.Module, grid: Sequence[int] | None = None, name: str = "network",
                 checkpoint: str | os.PathLike | None = None, guard: bool = False,
                 space: NetworkSpace | str | None = "auto") -> None:
        self.model = model.eval()
        self.grid = None if grid is None else tuple(int(s) for s in grid)
        if isinstance(space, str):
            if space != "auto":
                raise PsmambaError(f"space must be a NetworkSpace, 'auto' or None, got {space!r}")
            space = getattr(model, "psmamba_space", None)
        if space is not None and self.grid is not None and self.grid != space.shape:
            space = space.resized(self.grid)
        self.space: NetworkSpace | None = space
        if space is not None and self.grid is None:
            self.grid = space.shape
        self.name = name
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.guard = bool(guard)
        self.check: dict[str, Any] | None = None
        #: the network grid's voxel -> world matrix of the last call (in its space), else None
        self.placed: Any = None
        #: the inverse of the last field (pipeline grid), computed on the network's grid, where
        #: it is 1/100 of the work at full size (see :meth:`__call__`)
        self.inverse: torch.Tensor | None = None
        self._inverse_run: torch.Tensor | None = None

    def __call__(self, moving, fixed, init=None, mask=None, affine=None):
        from psmamba.spatial import resize_ddf

        self._inverse_run = self.inverse = None
        self.placed = None
        if self.space is not None and affine is not None:
            return self._in_space(moving, fixed, init, affine)
        ddf = super().__call__(moving, fixed, init, mask)
        inv = self._inverse_run
        if inv is not None:
            self.inverse = inv if tuple(inv.shape) == tuple(ddf.shape) else resize_ddf(inv, tuple(ddf.shape[2:]))
        return ddf

    def _in_space(self, moving, fixed, init, affine):
        """:meth:`run` on the pair resampled into :attr:`space` (placed on the fixed grid's field of
        view), the field (and its inverse) carried back onto the fixed grid: fixed voxel ``p`` is
        displaced by ``L_f^-1 L_n d(q)`` at the network voxel ``q`` on ``p``'s world position
        (:func:`psmamba.deformable.affine_field`, border-clamped beyond the space)."""
        import numpy as np

        from psmamba.affine import resample_affine
        from psmamba.deformable import affine_field

        size = tuple(int(s) for s in fixed.shape[2:])
        a_f = np.asarray(affine, dtype=np.float64)
        a_n = self.space.place(a_f, size)
        to_net = np.linalg.inv(a_n) @ a_f  # fixed voxel -> network voxel
        to_fix = np.linalg.inv(a_f) @ a_n  # network voxel -> fixed voxel
        grid, eye = self.space.shape, np.eye(4)
        self.placed = a_n
        mv = resample_affine(moving, a_f, eye, a_n, grid)
        fx = resample_affine(fixed, a_f, eye, a_n, grid)
        init_n = None if init is None else affine_field(init, to_fix, to_net, grid)
        ddf = self.run(mv, fx, init_n)
        if init is not None and self.check is not None and not self.check["accepted"]:
            return init  # the guard kept the start: as given, not carried through the box and back
        if self._inverse_run is not None:
            self.inverse = affine_field(self._inverse_run, to_net, to_fix, size)
        return affine_field(ddf, to_net, to_fix, size)

    def to(self, device):
        self.model = self.model.to(device)
        return self

    def predict(self, model: nn.Module, moving, fixed) -> torch.Tensor:
        """``model(moving, fixed)``'s field: its ``.ddf``, or the second item of a ``(warped, ddf)``
        tuple; checked to be ``(1, 3, D, H, W)`` on the input grid and finite (a NaN field gave an
        all-NaN result with Dice 0 and 0 % folding, silently)."""
        with torch.no_grad():
            out = model(moving, fixed)
        ddf = getattr(out, "ddf", None)
        if ddf is None and isinstance(out, (tuple, list)) and len(out) == 2:
            ddf = out[1]
        who = f"the network ({self.checkpoint})" if self.checkpoint else "the network"
        want = (moving.shape[0], 3, *moving.shape[2:])
        if not torch.is_tensor(ddf) or tuple(ddf.shape) != tuple(want):
            got = tuple(ddf.shape) if torch.is_tensor(ddf) else type(out).__name__
            raise PsmambaError(f"{who} must return (warped, ddf) with ddf of shape {want}, got {got}")
        if not bool(torch.isfinite(ddf).all()):
            raise PsmambaError(f"{who} predicted a field holding NaN or infinite values (diverged weights?)")
        return ddf

    def run(self, moving, fixed, init):
        from psmamba.deformable import invert_ddf

        ddf = self.predict(self.model, moving, fixed)
        if self.guard:
            ddf = self._accepted(ddf, moving, fixed, init)
        if init is None:  # the inverse of this field alone (an init's would not be)
            with torch.no_grad():
                self._inverse_run = invert_ddf(ddf) if bool(ddf.abs().max() > 0) else torch.zeros_like(ddf)
        return ddf

    def _accepted(self, ddf, moving, fixed, init):
        """``ddf`` if it makes the pair more similar (LNCC, window 5, on the network's grid) than
        ``init`` (or no motion) does, else ``init`` (or zero): a pair the network was not trained
        for (an image registered to itself, another organ or contrast) is not made worse before
        the instance optimisation starts."""
        from psmamba.losses import LNCC
        from psmamba.spatial import warp

        start = torch.zeros_like(ddf) if init is None else init.to(ddf)
        with torch.no_grad():
            lncc = LNCC(window=5)
            before = float(lncc(moving if init is None else warp(moving, start), fixed))
            after = float(lncc(warp(moving, ddf), fixed))
        accepted = after < before
        self.check = {"lncc_before": before, "lncc_network": after, "accepted": accepted}
        return ddf if accepted else start

    def settings(self):
        out = {**super().settings(), "checkpoint": self.checkpoint}
        if self.space is not None:
            out["space"] = {"spacing_mm": [round(v, 4) for v in self.space.spacing], "axes": "RAS",
                            "placed": None if self.placed is None else [[round(float(v), 4) for v in row]
                                                                         for row in self.placed]}
        if self.guard:
            out["kept_if_lncc_improves"] = self.check
        return out


class NetworkFineTuned(Network):
    """The network fine-tuned on the pair: Adam (amsgrad) on a COPY of its weights for ``iters``
    steps of the training loss ``LNCC(window) + lam * Diffusion``, then its prediction."""

    def __init__(self, model: nn.Module, iters: int, lr: float = LR_NETWORK, lam: float = LAM_NETWORK,
                 window: int = 9, grid: Sequence[int] | None = None, name: str = "network+finetune",
                 checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__(model, grid, name, checkpoint)
        self.iters, self.lr, self.lam, self.window = int(iters), float(lr), float(lam), int(window)

    def run(self, moving, fixed, init):
        net = copy.deepcopy(self.model)  # the caller's (and the next pair's) weights stay intact
        net.train()
        objective = Objective.lncc_diffusion(self.window, self.lam).to(fixed.device)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=self.lr, amsgrad=True)
        batch = {"moving": moving, "fixed": fixed}
        for _ in range(self.iters):
            train_step(net, objective, opt, [batch])
        net.eval()
        return self.predict(net, moving, fixed)

    def settings(self):
        return {**super().settings(), "iters": self.iters, "lr": self.lr, "lambda_diffusion": self.lam,
                "lncc_window": self.window}


class Diffeomorphic(RegistrationMethod):
    """Diffeomorphic instance optimisation (``io``): :func:`psmamba.deformable.register_deformable`.

    A stationary velocity field (scaling and squaring) or greedy composition of smoothed
    updates, coarse to fine with a convergence test per level (see
    :class:`psmamba.deformable.DeformableConfig`, whose defaults it takes). Starting from
    ``init`` (a network's field), the result is ``init o exp(v)``. After each call
    :attr:`inverse` holds the inverse field of the last result (same grid), which the
    pipeline writes as ``ddf_inverse.nii.gz``.

    Args:
        config: a :class:`~psmamba.deformable.DeformableConfig` (default: its defaults).
        grid: the grid it works on (None: the images').
    """

    name = "io"
    uses_mask = True

    def __init__(self, config: Any = None, grid: Sequence[int] | None = None) -> None:
        from psmamba.deformable import DeformableConfig

        self.config = config or DeformableConfig()
        self.grid = None if grid is None else tuple(int(s) for s in grid)
        self.inverse: torch.Tensor | None = None
        #: an approximate inverse of the next call's ``init`` (a :class:`Chain` passes the
        #: previous stage's ``inverse``): refined instead of inverting ``init`` from scratch
        self.init_inverse: torch.Tensor | None = None
        self.log: list[dict[str, Any]] = []

    def run(self, moving, fixed, init, mask=None):
        from psmamba.deformable import register_deformable

        if init is not None and not bool(init.any()):  # e.g. a network's field its guard dropped
            init = None
        init_inv = self.init_inverse
        if init is None or init_inv is None or tuple(init_inv.shape) != tuple(init.shape):
            init_inv = None
        res = register_deformable(fixed, moving, self._fitted(fixed.shape[2:]), fixed_mask=mask, init_ddf=init,
                                  init_inverse=init_inv)
        self.inverse = res.ddf_inverse
        self.log = res.summary()["levels"]
        return res.ddf

    def _fitted(self, size: Sequence[int]):
        """The config with the pyramid levels too coarse for ``size`` dropped (their steps go to
        the next level kept), so a small image runs on fewer levels instead of failing."""
        import dataclasses

        from psmamba.deformable import pyramid_size

        cfg = self.config
        levels, iters, carry = [], [], 0
        for f, n in zip(cfg.levels, cfg.iterations):
            if f > 1 and min(pyramid_size(size, f)) < cfg.min_size:
                carry += n
                continue
            levels.append(f)
            iters.append(n + carry)
            carry = 0
        if not levels:  # cannot happen with a level 1; keep the finest
            levels, iters = [cfg.levels[-1]], [sum(cfg.iterations)]
        if tuple(levels) == cfg.levels:
            return cfg
        return dataclasses.replace(cfg, levels=tuple(levels), iterations=tuple(iters))

    def settings(self):
        import dataclasses

        return {**super().settings(), **dataclasses.asdict(self.config), "levels_run": self.log}


class _Field(nn.Module):
    """A displacement field as the parameter: ``forward(moving, fixed) -> (warp(moving, ddf), ddf)``."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.ddf = nn.Parameter(init.clone())

    def forward(self, moving, fixed):
        from psmamba.models.net import RegistrationOutput
        from psmamba.spatial import warp

        return RegistrationOutput(warp(moving, self.ddf), self.ddf)


class InstanceOptimisation(RegistrationMethod):
    """The displacement field itself optimised with Adam on the pair, coarse to fine (``adam``).

    The first instance optimisation of psmamba (``--iters N`` without ``--method``); not
    diffeomorphic by construction, slower than :class:`Diffeomorphic` (``io``), kept for the
    scripts and results that use it.

    Adam on the field, loss ``LNCC + lam * Diffusion``, on grids at 1/4, 1/2 and 1 of the working
    grid (as many as keep at least 8 voxels a side), the iterations shared equally; each level
    starts from the previous level's field (or from ``init``), resized; the LNCC window shrinks
    with the grid so it covers about the same anatomy.
    """

    name = "adam"

    def __init__(self, iters: int, lr: float = LR_FIELD, lam: float = LAM_FIELD, window: int = 9,
                 grid: Sequence[int] | None = None) -> None:
        if int(iters) < 1:
            raise PsmambaError(f"instance optimisation needs iters >= 1, got {iters}")
        self.iters, self.lr, self.lam, self.window = int(iters), float(lr), float(lam), int(window)
        self.grid = None if grid is None else tuple(int(s) for s in grid)

    def run(self, moving, fixed, init):
        from psmamba.spatial import resize_ddf, resize_volume

        size = tuple(int(s) for s in fixed.shape[2:])
        factors = _pyramid_factors(size)
        per_level = [self.iters // len(factors)] * len(factors)
        per_level[-1] += self.iters - sum(per_level)
        ddf = None if init is None else init.detach()
        for f, n in zip(factors, per_level):
            lsize = tuple(max(2, int(math.ceil((s - 1) / f)) + 1) for s in size)  # corner-aligned grid
            batch = {"moving": resize_volume(moving, lsize), "fixed": resize_volume(fixed, lsize)}
            start = torch.zeros((1, 3) + lsize, device=fixed.device, dtype=fixed.dtype) if ddf is None \
                else resize_ddf(ddf, lsize)
            field = _Field(start)
            objective = Objective.lncc_diffusion(max(3, (self.window // f) | 1), self.lam).to(fixed.device)
            opt = torch.optim.Adam(field.parameters(), lr=self.lr)
            for _ in range(n):
                train_step(field, objective, opt, [batch])
            ddf = field.ddf.detach()
        assert ddf is not None
        return resize_ddf(ddf, size)

    def settings(self):
        return {**super().settings(), "iters": self.iters, "lr": self.lr, "lambda_diffusion": self.lam,
                "lncc_window": self.window}


def call_options(method: Any, mask: Any, affine: Any) -> dict[str, Any]:
    """The keywords of a call ``method(moving, fixed, init, **options)``: ``mask=``, and ``affine=``
    (the grid's voxel -> world matrix) when there is one and the method's ``__call__`` takes it
    (a subclass written before it existed may not)."""
    import inspect

    if affine is None:
        return {"mask": mask}
    try:
        params = inspect.signature(method.__call__).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "affine" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"mask": mask, "affine": affine} if takes else {"mask": mask}


def _pyramid_factors(size: Sequence[int], min_size: int = 8) -> list[int]:
    """Coarse-to-fine downsampling factors among 4, 2, 1 whose grid keeps >= min_size voxels a side."""
    return [f for f in (4, 2) if min(size) // f >= min_size] + [1]


class Chain(RegistrationMethod):
    """Methods one after the other, each starting from the previous one's field; named ``a+b``."""

    def __init__(self, stages: Sequence[RegistrationMethod]) -> None:
        if not stages:
            raise PsmambaError("a chain of registration methods needs at least one stage")
        self.stages = list(stages)
        self.name = "+".join(s.name for s in self.stages)

    def to(self, device):
        self.stages = [s.to(device) for s in self.stages]
        return self

    def __call__(self, moving, fixed, init=None, mask=None, affine=None):
        ddf, inv = init, None
        for stage in self.stages:
            if hasattr(stage, "init_inverse"):  # it can start from the previous stage's inverse
                stage.init_inverse = inv
            ddf = stage(moving, fixed, ddf, **call_options(stage, mask, affine))
            inv = getattr(stage, "inverse", None)
        return ddf

    @property
    def inverse(self) -> torch.Tensor | None:
        """The last stage's inverse field, when it computes one (see :class:`Diffeomorphic`)."""
        return getattr(self.stages[-1], "inverse", None)

    def settings(self):
        return {"method": self.name, "stages": [s.settings() for s in self.stages]}


# --------------------------------------------------------------------------- method names
#: The stages a method name (``--method``) is built from, joined by ``+`` in this order.
STAGES = ("rigid", "affine", "network", "io")
#: Names ``--method`` takes besides the ``+`` chains of :data:`STAGES`.
SPECIAL_METHODS = ("default", "identity")


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name: which stages run, in the pipeline's fixed order.

    Attributes:
        name: the canonical name (``"affine+network+io"``), written to ``summary.json`` and CSVs.
        linear: ``None``, ``"rigid"`` (6 dof) or ``"affine"`` (rigid, then 12 dof).
        network: whether a network predicts a field (needs weights).
        io: whether diffeomorphic instance optimisation refines the field.
    """

    name: str
    linear: str | None = None
    network: bool = False
    io: bool = False


def parse_method(name: str, have_network: bool = False, flag: str = "--method") -> MethodSpec:
    """``"default"``, ``"identity"`` or a ``+`` chain of :data:`STAGES` -> :class:`MethodSpec`.

    ``default`` is ``affine+network+io`` when a network is at hand (``have_network``), else
    ``affine+io``. A chain names each stage at most once, in the order of :data:`STAGES`
    (``rigid`` and ``affine`` exclusive): ``affine``, ``io``, ``network``, ``network+io``,
    ``affine+io``, ``rigid+network+io``, ...

    Raises:
        PsmambaError: an unknown or misordered name, or ``network`` without a network, naming ``flag``.
    """
    if not isinstance(name, str) or not name.strip():
        raise PsmambaError(f"{flag} must name a method, got {name!r}")
    name = name.strip().lower()
    if name == "default":
        name = "affine+network+io" if have_network else "affine+io"
    if name == "identity":
        return MethodSpec("identity")
    parts = name.split("+")
    known = ", ".join((*SPECIAL_METHODS, *STAGES))
    for part in parts:
        if part not in STAGES:
            raise PsmambaError(f"{flag}: unknown stage {part!r} in {name!r} (stages: {known}; join them with '+')")
    order = [STAGES.index(p) for p in parts]
    if order != sorted(set(order)):
        raise PsmambaError(f"{flag}: stages of {name!r} must appear once each, in the order {'+'.join(STAGES)}")
    if "rigid" in parts and "affine" in parts:
        raise PsmambaError(f"{flag}: {name!r} names both rigid and affine (affine starts with a rigid stage)")
    if "network" in parts and not have_network:
        raise PsmambaError(f"{flag} {name}: no network: give --checkpoint C (a psmamba checkpoint)")
    linear = "rigid" if "rigid" in parts else "affine" if "affine" in parts else None
    return MethodSpec("+".join(parts), linear, "network" in parts, "io" in parts)


def deformable_method(spec: MethodSpec, model: nn.Module | None = None, grid: Sequence[int] | None = None,
                      checkpoint: str | os.PathLike | None = None, config: Any = None) -> RegistrationMethod:
    """The fixed-grid part of ``spec`` (network, then ``io``) as one method (:class:`Identity` if none)."""
    stages: list[RegistrationMethod] = []
    if spec.network:
        if model is None:
            raise PsmambaError(f"method {spec.name}: no network was given")
        # before io, the network's field is an initialisation: kept only where it helps (Network.guard)
        stages.append(Network(model, grid, checkpoint=checkpoint, guard=spec.io))
    if spec.io:
        stages.append(Diffeomorphic(config))
    if not stages:
        return Identity()
    return stages[0] if len(stages) == 1 else Chain(stages)


# --------------------------------------------------------------------------- from options
def method_from_options(
    model: nn.Module | None = None, *, iters: int = 0, refine: str = "weights", lr: float | None = None,
    lam: float | None = None, window: int = 9, grid: Sequence[int] | None = None, name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> RegistrationMethod:
    """The method the command-line options name.

    * a network, ``iters == 0``: :class:`Network`;
    * a network, ``iters > 0``: ``refine="weights"`` :class:`NetworkFineTuned`,
      ``refine="field"`` the network's field refined on the pair's own grid (``Chain`` of
      :class:`Network` and :class:`InstanceOptimisation`);
    * no network: :class:`InstanceOptimisation` with ``iters > 0``, else :class:`Identity`.

    ``name`` names the network (default ``"network"``). ``lr``/``lam`` default to
    :data:`LR_NETWORK`/:data:`LAM_NETWORK` for fine-tuning and :data:`LR_FIELD`/:data:`LAM_FIELD`
    for a field.
    """
    if int(iters) < 0:
        raise PsmambaError(f"iters must be >= 0, got {iters}")
    if refine not in ("weights", "field"):
        raise PsmambaError(f"refine must be 'weights' or 'field', got {refine!r}")
    for flag, value in (("--lr", lr), ("--lambda", lam)):
        if value is not None and not (math.isfinite(value) and value >= (0 if flag == "--lambda" else 1e-300)):
            raise PsmambaError(f"{flag} must be a finite number {'>= 0' if flag == '--lambda' else '> 0'}, got {value}")
    if model is None:
        if iters > 0:
            return InstanceOptimisation(iters, lr or LR_FIELD, LAM_FIELD if lam is None else lam, window, grid)
        return Identity()
    net_name = name or "network"
    if iters > 0 and refine == "weights":
        return NetworkFineTuned(model, iters, lr or LR_NETWORK, LAM_NETWORK if lam is None else lam, window, grid,
                                name=f"{net_name}+finetune", checkpoint=checkpoint)
    network = Network(model, grid, name=net_name, checkpoint=checkpoint)
    if iters > 0:
        return Chain([network, InstanceOptimisation(iters, lr or LR_FIELD, LAM_FIELD if lam is None else lam, window)])
    return network


# --------------------------------------------------------------------------- checkpoints
def load_model(checkpoint: str | os.PathLike, device: Any = "cpu"):
    """Load a psmamba checkpoint -> ``(model, checkpoint_dict)``, model in eval mode on ``device``.

    Raises:
        PsmambaError: missing file, not a psmamba checkpoint, or weights of another model
            (strict loading fails); the message names the file.
    """
    from psmamba.engine.distributed import resolve_device

    path = Path(checkpoint).expanduser()
    require_file(path, "checkpoint")
    from psmamba.models import load_checkpoint

    try:
        # the scan backend is a run-time choice (it does not change the weights): "auto" takes
        # the CUDA kernel on a GPU with mamba_ssm and the CPU kernels elsewhere, so a model
        # trained on a GPU loads on a laptop and vice versa
        model, ckpt = load_checkpoint(path, map_location="cpu", mamba_backend="auto")
    except PsmambaError as exc:
        msg = first_line(exc, "cannot be loaded")
        raise PsmambaError(msg if str(path.name) in msg else f"checkpoint {path}: {msg}") from None
    except Exception as exc:  # pickle/zip/key errors: a corrupt file or another program's
        raise PsmambaError(f"checkpoint {path} is not a loadable psmamba checkpoint ({first_line(exc)[:200]})") from None
    model.eval()
    model.psmamba_space = training_space(ckpt)  # where its training images lay (None: unknown)
    return model.to(resolve_device(device)), ckpt


def train_config_of(ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The training configuration (a plain dict) a checkpoint carries, if any.

    ``psmamba train`` stores it under ``train_summary.config`` (``best.pt``) and
    ``training.config`` (``last.pt``).
    """
    if not isinstance(ckpt, dict):
        return None
    for section in ("train_summary", "training"):
        sub = ckpt.get(section)
        if isinstance(sub, dict) and isinstance(sub.get("config"), dict):
            return sub["config"]
    return None


def _size3(v: Any) -> tuple[int, int, int] | None:
    import numpy as np

    if isinstance(v, (list, tuple)) and len(v) == 3 and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0 for x in v
    ):
        return tuple(int(x) for x in v)  # type: ignore[return-value]
    return None


def training_size(ckpt: dict[str, Any] | None) -> tuple[int, int, int] | None:
    """The image size the network was trained at, when the checkpoint tells.

    In order: a top-level ``image_size`` entry (three integers; ``psmamba train`` always writes
    it); the training configuration's data set when it fixes the size (``demo``: its grid;
    ``synth``: ``options.shape``), for checkpoints of earlier versions.
    """
    if not isinstance(ckpt, dict):
        return None
    if _size3(ckpt.get("image_size")):
        return _size3(ckpt.get("image_size"))
    data = (train_config_of(ckpt) or {}).get("data")
    if isinstance(data, dict):
        if data.get("source") == "demo":
            from psmamba.data.demo import DEMO_SIZES

            if data.get("size", "small") in DEMO_SIZES:
                return tuple(DEMO_SIZES[data.get("size", "small")][0])  # type: ignore[return-value]
        if data.get("source") == "synth":
            return _size3((data.get("options") or {}).get("shape", (64, 64, 64)))
    return None


@dataclass(frozen=True)
class NetworkSpace:
    """Where a network's training images lay in the world: a grid of ``shape`` voxels of
    ``spacing`` mm along the world axes R, A, S (NIfTI's RAS+), e.g. the shipped network's
    48x64x48 voxels of 3.4 x 3.0 x 3.4 mm over the demo's 160x192x160 mm MNI field of view.

    At registration the grid is placed on the fixed image's field of view (centre on centre):
    the network sees a brain with the axes, voxel size and extent it was trained on, whatever
    the files' voxel order (LIA, PIR, ...), size or spacing (:meth:`Network._in_space`).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        shape, spacing = _size3(list(self.shape)), tuple(float(v) for v in self.spacing)
        if shape is None or min(shape) < 2 or len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise PsmambaError(f"a network space needs 3 sizes >= 2 and 3 spacings > 0, got {self.shape}, {self.spacing}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)

    @property
    def extent(self) -> tuple[float, float, float]:
        """mm from the first voxel centre to the last, per axis."""
        return tuple((n - 1) * s for n, s in zip(self.shape, self.spacing))  # type: ignore[return-value]

    def resized(self, shape: Sequence[int]) -> NetworkSpace:
        """The same extent with ``shape`` voxels (``--model-size``)."""
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 2:
            raise PsmambaError(f"a network grid needs 3 sizes >= 2, got {shape}")
        return NetworkSpace(shape, tuple(e / (n - 1) for e, n in zip(self.extent, shape)))  # type: ignore[arg-type]

    def place(self, fixed_affine: Any, fixed_shape: Sequence[int]):
        """The ``(4, 4)`` voxel -> world matrix of this grid centred on the fixed grid's field of view."""
        import numpy as np

        a = np.asarray(fixed_affine, dtype=np.float64)
        centre = a[:3, :3] @ ((np.asarray(fixed_shape, dtype=np.float64) - 1) / 2) + a[:3, 3]
        out = np.diag([*self.spacing, 1.0])
        out[:3, 3] = centre - np.asarray(self.spacing) * (np.asarray(self.shape) - 1) / 2
        return out


def training_space(ckpt: dict[str, Any] | None) -> NetworkSpace | None:
    """The :class:`NetworkSpace` of a checkpoint's training images, when it is known: networks
    trained on the demo's or the pre-training mixture's RAS grid (``data.source: demo`` or
    ``pretrain``, resized to ``image_size``), the shipped one among them. None for other data
    (a folder of your scans: the network keeps resizing the fixed grid, as it was trained)."""
    shape = training_size(ckpt)
    data = (train_config_of(ckpt) or {}).get("data")
    if shape is None or not isinstance(data, dict) or data.get("source") not in ("demo", "pretrain"):
        return None
    import numpy as np

    from psmamba.data.atlases import atlas_grid
    from psmamba.data.demo import DEMO_SIZES

    size = data.get("size", "small")
    if size not in DEMO_SIZES or min(shape) < 2:
        return None
    # the grid the training pairs were made on: the demo grid resized to image_size
    return NetworkSpace(shape, tuple(float(v) for v in np.diag(atlas_grid(shape, size))[:3]))  # type: ignore[arg-type]
