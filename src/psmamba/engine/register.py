"""Register one pair of images: validate -> resample -> method -> outputs.

:func:`register_pair` is the engine behind ``psmamba register`` (and the demo and
``psmamba evaluate``). It is a pipeline of four steps, each a function of its own:

1. **Validate** (:func:`_load_inputs`) everything that can be checked cheaply before any work:
   the input files exist and load, label maps match their image's grid, the output folder can
   be written (a temporary folder is created beside it right away).
2. **Resample** (:func:`_resample`): the moving image (and its labels, nearest neighbour) onto
   the FIXED image's voxel grid through both affines (fixed voxel ``p`` -> world ``A_f p`` ->
   moving voxel ``A_m^-1 A_f p``; images that already share a grid are left untouched), and
   both images min-max scaled to [0, 1] (the paper's preprocessing).
3. **Method** (:mod:`psmamba.engine.methods`): a named object ``method(moving, fixed) -> ddf``
   on the fixed grid (a network resizes to its own grid and back): the identity, a network,
   a network fine-tuned on the pair, a network's field refined on the pair, or instance
   optimisation. :func:`~psmamba.engine.methods.method_from_options` builds it from the
   command line's flags; ``method=`` takes one directly.
4. **Outputs** (:func:`_finish`): the moving image warped with the field (trilinear, its own
   intensities) and its labels (nearest); Jacobian determinant, folding %, SDlogJ, Dice
   before/after when both label maps are given; and, when ``out_dir`` is given, all written
   with the fixed image's affine into a temporary folder moved into place only after everything
   succeeded: ``warped.nii.gz``, ``ddf.nii.gz``, ``warped_labels.nii.gz``, ``jacobian.nii.gz``,
   ``summary.json`` (with the method's name and settings), ``overview.png``.

The displacement field ``ddf.nii.gz`` is in voxels of the fixed grid, Learn2Reg layout
``(D, H, W, 3)``: fixed voxel ``p`` takes its value from the moving image (resampled onto the
fixed grid) at ``p + ddf[p]``. When both images share a grid this is exactly the Learn2Reg
convention; otherwise the full map to the moving file's voxels is
``A_m^-1 A_f (p + ddf[p])``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from psmamba.errors import PsmambaError
from psmamba.files import StagingDir, atomic_write_text
from psmamba.io import as_image

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from psmamba.engine.methods import RegistrationMethod
    from psmamba.io import Image

__all__ = ["RegistrationResult", "register_pair", "OUTPUT_FILES"]

#: The files ``register_pair(..., out_dir=...)`` writes (``warped_labels`` only with moving labels).
OUTPUT_FILES = (
    "warped.nii.gz",
    "ddf.nii.gz",
    "warped_labels.nii.gz",
    "jacobian.nii.gz",
    "summary.json",
    "overview.png",
)

#: Anything :func:`register_pair` accepts as an image: a path, a loaded :class:`psmamba.io.Image`
#: or a 3-D numpy array (taken with an identity affine, i.e. 1 mm voxels).
ImageLike = Union[str, os.PathLike, "Image", np.ndarray]

# --------------------------------------------------------------------------- result
@dataclass
class RegistrationResult:
    """Everything :func:`register_pair` computed, on the FIXED image's grid.

    Attributes:
        warped: ``(D, H, W)`` float32, the moving image warped onto the fixed grid (its own
            intensities, not the [0, 1] scaled ones the network saw).
        ddf: ``(3, D, H, W)`` float32 voxel displacements on the fixed grid (psmamba's
            convention; :attr:`ddf_l2r` gives the Learn2Reg layout ``(D, H, W, 3)``).
        jacobian: ``(D, H, W)`` float32 Jacobian determinant of ``identity + ddf``.
        affine: ``(4, 4)`` the fixed image's affine (every output carries it).
        fixed: ``(D, H, W)`` the fixed image.
        moving: ``(D, H, W)`` the moving image resampled onto the fixed grid, before registration.
        warped_labels: ``(D, H, W)`` integer moving labels warped (nearest), or None.
        moving_labels: ``(D, H, W)`` moving labels on the fixed grid before registration, or None.
        fixed_labels: ``(D, H, W)`` fixed labels, or None.
        summary: JSON-ready dict of settings, timings (s), folding %, SDlogJ and Dice.
        out_dir: where the outputs were written, or None.
    """

    warped: np.ndarray
    ddf: np.ndarray
    jacobian: np.ndarray
    affine: np.ndarray
    fixed: np.ndarray
    moving: np.ndarray
    warped_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None
    fixed_labels: np.ndarray | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def ddf_l2r(self) -> np.ndarray:
        """The field in the Learn2Reg layout ``(D, H, W, 3)`` (voxels of the fixed grid)."""
        return np.ascontiguousarray(np.moveaxis(self.ddf, 0, -1))

    @property
    def dice_before(self) -> float | None:
        """Mean Dice of the unregistered labels (None without both label maps)."""
        d = self.summary.get("dice_before")
        return None if d is None else d["mean"]

    @property
    def dice_after(self) -> float | None:
        """Mean Dice of the warped labels (None without both label maps)."""
        d = self.summary.get("dice_after")
        return None if d is None else d["mean"]

    def save(self, out_dir: str | os.PathLike, overview: bool = True) -> Path:
        """Write the outputs into ``out_dir`` atomically (see :data:`OUTPUT_FILES`).

        Files are first written into a temporary folder beside ``out_dir`` and moved into
        place only when all of them were written, so a failure leaves nothing behind.
        """
        with StagingDir(out_dir, owned=OUTPUT_FILES) as staging:
            self._write(staging.tmp, overview=overview)
            self.out_dir = staging.commit()
        return self.out_dir

    def _write(self, folder: Path, overview: bool = True) -> list[str]:
        from psmamba import io

        written = []
        io.save_image(folder / "warped.nii.gz", self.warped.astype(np.float32), self.affine)
        written.append("warped.nii.gz")
        io.save_ddf(folder / "ddf.nii.gz", self.ddf, self.affine)  # written as (D, H, W, 3)
        written.append("ddf.nii.gz")
        if self.warped_labels is not None:
            io.save_labels(folder / "warped_labels.nii.gz", self.warped_labels, self.affine)
            written.append("warped_labels.nii.gz")
        io.save_image(folder / "jacobian.nii.gz", self.jacobian.astype(np.float32), self.affine)
        written.append("jacobian.nii.gz")
        if overview:
            from psmamba.viz import save_overview

            save_overview(
                folder / "overview.png",
                fixed=self.fixed,
                moving=self.moving,
                warped=self.warped,
                ddf=self.ddf,
                jacobian=self.jacobian,
                warped_labels=self.warped_labels,
                affine=self.affine,
                title=_overview_title(self.summary),
            )
            written.append("overview.png")
        self.summary["outputs"] = written + ["summary.json"]
        _write_json(folder / "summary.json", self.summary)
        return written


def _overview_title(summary: dict[str, Any]) -> str:
    parts = [f"{summary.get('method', '')}"]
    if summary.get("dice_after") is not None:
        parts.append(
            f"Dice {summary['dice_before']['mean']:.3f} -> {summary['dice_after']['mean']:.3f}"
        )
    parts.append(f"folding {summary.get('folding_percent', float('nan')):.3f}%")
    parts.append(f"SDlogJ {summary.get('sdlogj', float('nan')):.3f}")
    return "   ".join(parts)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=True) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj



# --------------------------------------------------------------------------- inputs
def _name(img) -> str | None:
    p = getattr(img, "path", None)
    return None if p is None else str(p)


def _check_same_grid(img, ref, what: str, ref_what: str) -> None:
    """Labels must lie on their image's grid: same shape, affines equal to 1e-3."""
    if tuple(img.data.shape) != tuple(ref.data.shape):
        raise PsmambaError(
            f"{what} {_name(img) or ''} has shape {tuple(img.data.shape)} but {ref_what} "
            f"{_name(ref) or ''} has shape {tuple(ref.data.shape)}".replace("  ", " ")
        )
    if not np.allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=1e-3):
        raise PsmambaError(
            f"{what} {_name(img) or ''} and {ref_what} {_name(ref) or ''} have different affines "
            "(the label map is not on the image's grid)".replace("  ", " ")
        )


# --------------------------------------------------------------------------- the pipeline
@dataclass
class _Inputs:
    """Step 1's output: the loaded images and label maps (None where not given)."""

    fixed: Any
    moving: Any
    moving_labels: Any = None
    fixed_labels: Any = None


@dataclass
class _Prepared:
    """Step 2's output: everything on the fixed grid."""

    fixed_np: np.ndarray  # (D, H, W) the fixed image
    moving_np: np.ndarray  # (D, H, W) the moving image resampled onto the fixed grid
    mlab_np: np.ndarray | None  # moving labels on the fixed grid
    flab_np: np.ndarray | None  # fixed labels
    moving: Any  # (1, 1, D, H, W) tensor of moving_np on the device
    moving_scaled: Any  # min-max scaled
    fixed_scaled: Any


def _load_inputs(fixed, moving, moving_labels, fixed_labels) -> _Inputs:
    """Step 1: load every input and check that label maps lie on their image's grid."""
    inp = _Inputs(
        fixed=as_image(fixed, "fixed image"),
        moving=as_image(moving, "moving image"),
        moving_labels=as_image(moving_labels, "moving labels", labels=True),
        fixed_labels=as_image(fixed_labels, "fixed labels", labels=True),
    )
    if inp.moving_labels is not None:
        _check_same_grid(inp.moving_labels, inp.moving, "moving labels", "moving image")
    if inp.fixed_labels is not None:
        _check_same_grid(inp.fixed_labels, inp.fixed, "fixed labels", "fixed image")
    return inp


def _resample(inp: _Inputs, dev) -> _Prepared:
    """Step 2: the moving image and labels onto the fixed grid (world space); tensors, scaled."""
    import torch

    from psmamba.data.preprocess import minmax_scale, resample_to_grid

    f_shape = tuple(int(s) for s in inp.fixed.data.shape)
    f_aff = np.asarray(inp.fixed.affine, dtype=np.float64)
    fixed_np = np.asarray(inp.fixed.data, dtype=np.float32)
    moving_np = resample_to_grid(np.asarray(inp.moving.data), inp.moving.affine, f_aff, f_shape, order=1)
    if not np.any(moving_np) and np.any(np.asarray(inp.moving.data)):
        raise PsmambaError(
            f"moving image {_name(inp.moving) or ''} does not overlap the fixed image "
            f"{_name(inp.fixed) or ''} in world coordinates (check the affines)".replace("  ", " ")
        )
    mlab_np = None
    if inp.moving_labels is not None:
        mlab_np = resample_to_grid(np.asarray(inp.moving_labels.data), inp.moving_labels.affine, f_aff, f_shape, order=0)
    flab_np = None if inp.fixed_labels is None else np.asarray(inp.fixed_labels.data)
    fx = torch.from_numpy(np.ascontiguousarray(fixed_np)).to(dev, torch.float32)[None, None]
    mv = torch.from_numpy(np.ascontiguousarray(moving_np)).to(dev, torch.float32)[None, None]
    return _Prepared(fixed_np, moving_np, mlab_np, flab_np, mv, minmax_scale(mv), minmax_scale(fx))


def _method_grid(method, f_shape) -> list[int]:
    first = method.stages[0] if hasattr(method, "stages") else method
    return [int(s) for s in (first.grid or f_shape)]


def _finish(inp: _Inputs, prep: _Prepared, method, ddf_t, dev, labels) -> RegistrationResult:
    """Step 4: warp, metrics and the summary (everything on the fixed grid)."""
    import torch

    from psmamba import metrics
    from psmamba.spatial import warp

    with torch.no_grad():
        warped_t = warp(prep.moving, ddf_t)
        wlab_np = None
        if prep.mlab_np is not None:
            lab_t = torch.from_numpy(np.ascontiguousarray(prep.mlab_np.astype(np.int64)))[None, None].to(dev)
            wlab_np = warp(lab_t, ddf_t, mode="nearest")[0, 0].cpu().numpy().astype(prep.mlab_np.dtype)
    ddf_np = ddf_t[0].cpu().numpy().astype(np.float32)
    jac = np.asarray(metrics.jacobian_determinant(ddf_np), dtype=np.float32)
    f_shape = [int(s) for s in prep.fixed_np.shape]
    settings = method.settings()
    summary: dict[str, Any] = {
        "fixed": _name(inp.fixed), "moving": _name(inp.moving),
        "moving_labels": _name(inp.moving_labels) if inp.moving_labels is not None else None,
        "fixed_labels": _name(inp.fixed_labels) if inp.fixed_labels is not None else None,
        "method": method.name,
        "method_settings": settings,
        "checkpoint": _find_setting(settings, "checkpoint"),
        "device": str(dev),
        "fixed_shape": f_shape,
        "moving_shape": [int(s) for s in inp.moving.data.shape],
        "model_grid": _method_grid(method, f_shape),
        "fixed_spacing": _spacing(inp.fixed), "moving_spacing": _spacing(inp.moving),
        "folding_percent": float(metrics.folding_percent(ddf_np)),
        "sdlogj": float(metrics.sdlogj(ddf_np)),
        "sdlogj_l2r": float(metrics.sdlogj_l2r(ddf_np)),
        "jacobian_min": float(jac.min()), "jacobian_max": float(jac.max()),
        "displacement_max_vox": float(np.sqrt((ddf_np**2).sum(0)).max()),
        "runtime": _runtime_settings(),
    }
    if prep.mlab_np is not None and prep.flab_np is not None:
        summary["dice_before"] = _dice_summary(metrics.dice(prep.flab_np, prep.mlab_np, labels=labels))
        summary["dice_after"] = _dice_summary(metrics.dice(prep.flab_np, wlab_np, labels=labels))
    return RegistrationResult(
        warped=warped_t[0, 0].cpu().numpy().astype(np.float32), ddf=ddf_np, jacobian=jac,
        affine=np.asarray(inp.fixed.affine, dtype=np.float64), fixed=prep.fixed_np, moving=prep.moving_np,
        warped_labels=wlab_np, moving_labels=prep.mlab_np, fixed_labels=prep.flab_np, summary=summary,
    )


def _find_setting(settings: dict[str, Any], key: str) -> Any:
    """``key`` of a method's settings, looked up in its stages too (the first one set)."""
    if settings.get(key) is not None:
        return settings[key]
    for stage in settings.get("stages", []):
        if stage.get(key) is not None:
            return stage[key]
    return None


def _runtime_settings() -> dict[str, Any]:
    """The process settings this registration ran with (:class:`psmamba.runtime.Runtime`)."""
    from psmamba import runtime

    return {**runtime.current().as_dict(), "freed_memory_kept": runtime.freed_memory_kept()}


def _build_method(method, checkpoint, model, iters, refine, lr, lam, window, model_size, dev):
    """The method of ``register_pair``'s options (a given ``method`` is taken as is)."""
    from psmamba.engine.methods import load_model, method_from_options, training_size

    if method is not None:
        if checkpoint is not None or model is not None or iters:
            raise PsmambaError("give method= alone, or checkpoint=/model=/iters=, not both")
        return method.to(dev)
    if checkpoint is not None and model is not None:
        raise PsmambaError("give either checkpoint= or model=, not both")
    grid, name = model_size, None
    if checkpoint is not None:
        model, ckpt = load_model(checkpoint, device=dev)
        grid = model_size or training_size(ckpt)
    elif model is not None:
        model = model.to(dev).eval()
    return method_from_options(model, iters=iters, refine=refine, lr=lr, lam=lam, window=window,
                               grid=grid, name=name, checkpoint=checkpoint)


def register_pair(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    moving_labels: ImageLike | None = None,
    fixed_labels: ImageLike | None = None,
    method: RegistrationMethod | None = None,
    checkpoint: str | os.PathLike | None = None,
    model: "torch.nn.Module | None" = None,
    iters: int = 0,
    refine: str = "weights",
    lr: float | None = None,
    lam: float | None = None,
    window: int = 9,
    device: "str | torch.device" = "auto",
    out_dir: str | os.PathLike | None = None,
    model_size: Sequence[int] | None = None,
    overview: bool = True,
    labels: Sequence[int] | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``; optionally write the outputs to ``out_dir``.

    Args:
        fixed, moving: the images: paths (NIfTI, Analyze), :class:`psmamba.io.Image`,
            :class:`psmamba.data.Volume` or 3-D arrays (:func:`psmamba.io.as_image`); the moving
            image may have any size, spacing and orientation (resampled through the affines).
        moving_labels, fixed_labels: label maps on their image's grid; with both, Dice before
            and after registration.
        method: a :class:`psmamba.engine.methods.RegistrationMethod`; or build one from the
            options below (:func:`~psmamba.engine.methods.method_from_options`):
        checkpoint: a psmamba checkpoint (``psmamba train``'s output); the network runs on the
            grid it was trained at. Exclusive with ``model``.
        model: a loaded network ``forward(moving, fixed) -> (warped, ddf)`` (on ``model_size``).
        iters: test-time optimisation steps: with a network, of a copy of its weights
            (``refine="weights"``) or of its field on the fixed grid (``refine="field"``); with
            no network, instance optimisation of the field. 0 with no network: the identity.
        lr, lam, window: Adam's learning rate, the diffusion weight and the LNCC window
            (defaults: :func:`~psmamba.engine.methods.method_from_options`).
        device: ``"auto"`` (accelerator if available, else CPU), ``"cpu"``, ``"cuda"``, ...
        out_dir: when given, the outputs are written there atomically (see module docstring).
        model_size: ``(D, H, W)`` grid the network runs on (default: its training grid).
        overview: also draw ``overview.png`` when writing outputs.
        labels: the label codes Dice is computed on (default: see :func:`psmamba.metrics.dice`).

    Returns a :class:`RegistrationResult` (arrays on the fixed grid, and the summary dict).

    Raises:
        PsmambaError: bad inputs, a bad checkpoint or an unwritable output folder, raised
            before any work is done; nothing is written in that case.
    """
    from psmamba.engine.distributed import resolve_device

    t_start = time.perf_counter()
    if model_size is not None:
        model_size = tuple(int(s) for s in model_size)
        if len(model_size) != 3 or min(model_size) < 2:
            raise PsmambaError(f"model_size must be three sizes >= 2, got {model_size}")
    staging = StagingDir(out_dir, owned=OUTPUT_FILES) if out_dir is not None else None
    try:
        dev = resolve_device(device)
        inp = _load_inputs(fixed, moving, moving_labels, fixed_labels)
        method = _build_method(method, checkpoint, model, iters, refine, lr, lam, window, model_size, dev)
        t_load = time.perf_counter()
        prep = _resample(inp, dev)
        t_prep = time.perf_counter()
        ddf_t = method(prep.moving_scaled, prep.fixed_scaled).detach().float()
        _synchronize(dev)  # accelerator kernels run asynchronously: time them to completion
        t_reg = time.perf_counter()
        result = _finish(inp, prep, method, ddf_t, dev, labels)
        result.summary["timings_s"] = {
            "load": t_load - t_start, "preprocess": t_prep - t_load,
            "register": t_reg - t_prep, "metrics": time.perf_counter() - t_reg,
        }
        _write_outputs(result, staging, overview, t_start)
        return result
    finally:
        if staging is not None:
            staging.cleanup()


def _write_outputs(result: RegistrationResult, staging: StagingDir | None, overview: bool, t_start: float) -> None:
    """Write the staged outputs and move them into place; the timings get ``write`` and ``total``."""
    timings = result.summary["timings_s"]
    if staging is not None:
        t_w = time.perf_counter()
        timings["total"] = t_w - t_start  # written into summary.json
        result._write(staging.tmp, overview=overview)
        result.out_dir = staging.commit()
        timings["write"] = time.perf_counter() - t_w
    timings["total"] = time.perf_counter() - t_start


def _synchronize(dev: "torch.device") -> None:
    """Wait for an accelerator's queued kernels (``torch.accelerator`` from torch 2.6, CUDA before)."""
    import torch

    if dev.type == "cpu":
        return
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        acc.synchronize()
    elif dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)


def _spacing(img) -> list[float]:
    sp = getattr(img, "spacing", None)
    if sp is None:
        sp = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(0))
    return [float(s) for s in sp]


def _dice_summary(per_label: dict[int, float]) -> dict[str, Any]:
    vals = [v for v in per_label.values() if v is not None and not math.isnan(v)]
    return {
        "mean": float(np.mean(vals)) if vals else float("nan"),
        "per_label": {int(k): float(v) for k, v in per_label.items()},
    }
