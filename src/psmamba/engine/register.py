"""Register one pair of images: a trained network, test-time optimisation, or both.

:func:`register_pair` is the engine behind ``psmamba register`` (and the demo and
``psmamba evaluate``). The steps, in order:

1. **Validate** everything that can be checked cheaply before any work: the input files exist
   and load, label maps match their image's grid, the output folder can be written (a
   temporary folder is created beside it right away), the checkpoint loads into a psmamba
   model.
2. **World-space resampling**: the moving image (and its labels, nearest neighbour) is
   resampled onto the FIXED image's voxel grid through both affines
   (fixed voxel ``p`` -> world ``A_f p`` -> moving voxel ``A_m^-1 A_f p``). Images that
   already share a grid are left untouched.
3. **Model grid**: both images are min-max scaled to [0, 1] (the paper's preprocessing) and
   resized (trilinear, ``align_corners=True``) to the model grid: ``model_size`` if given,
   else the training size stored in the checkpoint, else the fixed grid itself (the network
   pads to a multiple of 16 and crops its field back).
4. **Registration** on the model grid, one of

   * the network's prediction (``checkpoint=`` or ``model=``, ``iters=0``);
   * the network fine-tuned on this pair (``iters > 0`` with a network, ``refine="weights"``):
     Adam on a COPY of the network weights, starting from the checkpoint, minimising the training
     loss ``LNCC(warped, fixed) + lambda * Diffusion(ddf)`` (the caller's model is not modified);
   * the network's field refined on this pair (``iters > 0`` with a network, ``refine="field"``):
     the instance optimisation below on the fixed grid, started from the network's prediction
     (resized to the fixed grid) instead of zero;
   * instance optimisation (``iters > 0``, no network): the displacement field itself is the
     parameter, optimised with the same loss coarse-to-fine (grids at 1/4, 1/2 and 1 of the
     model grid, as many as are at least 8 voxels a side, the iterations shared equally; each
     level starts from the previous level's field, upsampled; the LNCC window shrinks with
     the grid). Lambda defaults to 3 here instead of 1 (see ``_LAM_FIELD``);
   * the identity (no network, ``iters=0``): the unregistered baseline.
5. **Back to the fixed grid**: the field is resized to the fixed grid with its vectors
   rescaled (:func:`psmamba.spatial.resize_ddf`), then the (world-resampled, original
   intensity) moving image is warped with it (trilinear) and the labels nearest-neighbour.
6. **Metrics** on the fixed grid: Jacobian determinant, folding %, SDlogJ, Dice before/after
   when both label maps are given.
7. **Outputs** (when ``out_dir`` is given), all with the fixed image's affine, written into a
   temporary folder and moved into place only after everything succeeded: ``warped.nii.gz``,
   ``ddf.nii.gz``, ``warped_labels.nii.gz``, ``jacobian.nii.gz``, ``summary.json``,
   ``overview.png``.

The displacement field ``ddf.nii.gz`` is in voxels of the fixed grid, Learn2Reg layout
``(D, H, W, 3)``: fixed voxel ``p`` takes its value from the moving image (resampled onto the
fixed grid) at ``p + ddf[p]``. When both images share a grid this is exactly the Learn2Reg
convention; otherwise the full map to the moving file's voxels is
``A_m^-1 A_f (p + ddf[p])``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from psmamba.errors import PsmambaError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from psmamba.io import Image

__all__ = [
    "RegistrationResult",
    "register_pair",
    "resolve_device",
    "load_model",
    "resample_to_grid",
    "train_config_of",
    "training_size",
    "OUTPUT_FILES",
]

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

# Defaults of the two kinds of test-time optimisation (Adam).
_LR_NETWORK = 1e-4  # the paper's training learning rate: fine-tuning continues training
_LR_FIELD = 0.1  # voxels per step at most; Adam's steps are about lr in size
_LAM_NETWORK = 1.0  # the paper's lambda: fine-tuning continues training with its loss
# A free field has none of a network's implicit smoothness: on the demo's test_hard pairs
# (40 iterations) lambda = 3 kept Dice (0.666 vs 0.670) and cut folding from 0.155 % to 0.019 %
# and SDlogJ from 0.84 to 0.32; on its test pairs Dice was 0.750 vs 0.747.
_LAM_FIELD = 3.0


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
        staging = _Staging(out_dir)
        try:
            self._write(staging.tmp, overview=overview)
            self.out_dir = staging.commit()
        finally:
            staging.cleanup()
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
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_jsonable(obj), fh, indent=2, allow_nan=True)
        fh.write("\n")


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


# --------------------------------------------------------------------------- output staging
class _Staging:
    """A temporary folder beside the output folder; :meth:`commit` moves its files into place.

    Creating it is also the writability check, done before any computation (``os.access``
    says yes to root even for read-only folders, so it cannot be trusted here).
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out = Path(out_dir).expanduser().absolute()
        if self.out.exists() and not self.out.is_dir():
            raise PsmambaError(f"output folder {self.out} exists and is not a folder")
        # the nearest existing ancestor holds the staging folder, so the final move is a rename
        anchor = self.out.parent
        while not anchor.exists():
            anchor = anchor.parent
        if not anchor.is_dir():
            raise PsmambaError(f"cannot create output folder {self.out}: {anchor} is not a folder")
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=anchor))
        except OSError as exc:
            raise PsmambaError(
                f"output folder {self.out} is not writable ({exc.strerror or exc} in {anchor})"
            ) from None
        self._done = False

    def commit(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if not self.out.exists():
                os.replace(self.tmp, self.out)  # one rename: the folder appears complete
            else:
                new = {item.name for item in self.tmp.iterdir()}
                for item in sorted(self.tmp.iterdir()):
                    os.replace(item, self.out / item.name)
                # an output of an earlier run that this run does not write (e.g. warped labels
                # from a run that had labels) would no longer match the other files
                for name in OUTPUT_FILES:
                    if name not in new and (self.out / name).is_file():
                        (self.out / name).unlink()
        except OSError as exc:
            raise PsmambaError(f"cannot write output folder {self.out}: {exc.strerror or exc}") from None
        self._done = True
        return self.out

    def cleanup(self) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- helpers
def resolve_device(device: "str | torch.device | None" = "auto") -> "torch.device":
    """``"auto"`` -> the available accelerator (CUDA, ...) else the CPU; otherwise as given.

    Raises:
        PsmambaError: an unknown device name, or an accelerator that is not available.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        acc = getattr(torch, "accelerator", None)
        if acc is not None and acc.is_available():
            return acc.current_accelerator()
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise PsmambaError(f"--device must be auto, cpu or an accelerator such as cuda, got {device!r}") from None
    if dev.type != "cpu":
        mod = getattr(torch, dev.type, None)
        if mod is None or not hasattr(mod, "is_available") or not mod.is_available():
            raise PsmambaError(f"device {name!r} was asked for but is not available on this machine")
    return dev


def load_model(checkpoint: str | os.PathLike, device: "str | torch.device" = "cpu"):
    """Load a psmamba checkpoint -> ``(model, checkpoint_dict)``, model in eval mode on ``device``.

    Raises:
        PsmambaError: missing file, not a psmamba checkpoint, or weights of another model
            (strict loading fails); the message names the file.
    """
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise PsmambaError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise PsmambaError(f"checkpoint {path} is not a file")
    from psmamba.models import load_checkpoint

    try:
        # the scan backend is a run-time choice (it does not change the weights): "auto" takes
        # the CUDA kernel on a GPU with mamba_ssm and the CPU kernels elsewhere, so a model
        # trained on a GPU loads on a laptop and vice versa
        model, ckpt = load_checkpoint(path, map_location="cpu", mamba_backend="auto")
    except PsmambaError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot be loaded"
        raise PsmambaError(msg if str(path.name) in msg else f"checkpoint {path}: {msg}") from None
    except Exception as exc:  # pickle/zip/key errors: a corrupt file or another program's
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PsmambaError(f"checkpoint {path} is not a loadable psmamba checkpoint ({first})") from None
    model.eval()
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


def training_size(ckpt: dict[str, Any] | None) -> tuple[int, int, int] | None:
    """The image size the network was trained at, when the checkpoint tells.

    In order: a top-level ``image_size`` entry (three integers); the training configuration's
    data set when it fixes the size (``demo``: its grid; ``synth``: ``options.shape``).
    """
    if not isinstance(ckpt, dict):
        return None

    def size3(v: Any) -> tuple[int, int, int] | None:
        if isinstance(v, (list, tuple)) and len(v) == 3 and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0 for x in v
        ):
            return tuple(int(x) for x in v)  # type: ignore[return-value]
        return None

    if size3(ckpt.get("image_size")):
        return size3(ckpt.get("image_size"))
    data = (train_config_of(ckpt) or {}).get("data")
    if isinstance(data, dict):
        if data.get("source") == "demo":
            from psmamba.data.demo import DEMO_SIZES

            if data.get("size", "small") in DEMO_SIZES:
                return tuple(DEMO_SIZES[data.get("size", "small")][0])  # type: ignore[return-value]
        if data.get("source") == "synth":
            return size3((data.get("options") or {}).get("shape", (64, 64, 64)))
    return None


def _as_image(obj: ImageLike | None, what: str, labels: bool = False):
    """Path / Image / ndarray -> :class:`psmamba.io.Image` (None passes through)."""
    if obj is None:
        return None
    from psmamba import io

    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser()
        if not path.exists():
            raise PsmambaError(f"{what} file {path} does not exist")
        return io.load_labels(path) if labels else io.load_image(path, what=what)
    if isinstance(obj, np.ndarray):
        arr = np.asarray(obj)
        if arr.ndim != 3:
            raise PsmambaError(f"{what} must be a 3-D array, got shape {arr.shape}")
        if labels and not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise PsmambaError(f"{what} must hold integer label codes")
            arr = arr.astype(np.int32)
        return io.Image(data=arr, affine=np.eye(4), header=None, path=None)  # type: ignore[arg-type]
    if hasattr(obj, "data") and hasattr(obj, "affine"):
        arr = np.asarray(obj.data)
        if arr.ndim != 3:
            raise PsmambaError(f"{what} must be a 3-D image, got shape {arr.shape}")
        return obj
    if hasattr(obj, "image") and hasattr(obj, "affine"):  # a psmamba.data.Volume
        arr = obj.labels if labels else obj.image
        if arr is None:
            raise PsmambaError(f"{what}: volume {getattr(obj, 'id', '')!r} has no label map")
        arr = np.asarray(arr)
        if arr.ndim != 3:
            raise PsmambaError(f"{what} must be a 3-D image, got shape {arr.shape}")
        return io.Image(data=arr, affine=np.asarray(obj.affine, dtype=np.float64), header=None,
                        path=getattr(obj, "id", None))  # type: ignore[arg-type]
    raise PsmambaError(
        f"{what} must be a path, a psmamba.io.Image, a psmamba.data.Volume or a 3-D array, got {type(obj).__name__}"
    )


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


def resample_to_grid(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """Resample a volume onto another voxel grid through world coordinates.

    Destination voxel ``p`` takes the source value at voxel ``inv(src_affine) @ dst_affine @ p``
    (zero outside). ``order=1`` trilinear (images), ``order=0`` nearest (labels; dtype kept).
    ``scipy.ndimage.affine_transform`` does the sampling: it works in voxel indices, exactly
    the voxel-centre convention of :mod:`psmamba.spatial`. A grid equal to the source's is
    returned unchanged.

    Args:
        data: ``(D, H, W)`` source volume.
        src_affine, dst_affine: ``(4, 4)`` voxel-to-world matrices.
        dst_shape: ``(D', H', W')``.
    Returns:
        ``(D', H', W')`` array (float32 for ``order=1``, the source dtype for ``order=0``).
    """
    from scipy import ndimage

    dst_shape = tuple(int(s) for s in dst_shape)
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    if tuple(data.shape) == dst_shape and np.allclose(m, np.eye(4), atol=1e-5):
        return data if order == 0 else data.astype(np.float32, copy=False)
    if order == 0:
        out = ndimage.affine_transform(
            data, m, output_shape=dst_shape, order=0, mode="constant", cval=0, prefilter=False
        )
        return out.astype(data.dtype, copy=False)
    out = ndimage.affine_transform(
        data.astype(np.float32), m, output_shape=dst_shape, order=1, mode="constant", cval=0.0, prefilter=False
    )
    return out.astype(np.float32, copy=False)


def _minmax(x: "torch.Tensor") -> "torch.Tensor":
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if float(hi - lo) > 0 else x - lo


def _resize_image(x: "torch.Tensor", size: Sequence[int]) -> "torch.Tensor":
    """Trilinear, ``align_corners=True``: the convention :func:`psmamba.spatial.resize_ddf` uses."""
    import torch.nn.functional as F

    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="trilinear", align_corners=True)


def _resize_field(ddf: "torch.Tensor", size: Sequence[int]) -> "torch.Tensor":
    """Resize a voxel field between two grids that span the same extent (corner voxel centres).

    With ``align_corners=True`` the voxel size ratio of the two grids is ``(n_old - 1) / (n_new - 1)``,
    so the vectors are scaled by ``(n_new - 1) / (n_old - 1)`` (not ``n_new / n_old``).
    """
    from psmamba.spatial import resize_ddf

    size = tuple(int(s) for s in size)
    if tuple(int(s) for s in ddf.shape[2:]) == size:
        return ddf
    return resize_ddf(ddf, size)  # default scale: (n_new - 1) / (n_old - 1)


# --------------------------------------------------------------------------- optimisation
def _loss_fns(window: int, lam: float, device, dtype):
    from psmamba.losses import LNCC, Diffusion

    sim = LNCC(window=window).to(device=device, dtype=dtype)
    reg = Diffusion().to(device=device, dtype=dtype)
    return lambda warped, fixed, ddf: sim(warped, fixed) + lam * reg(ddf)


def _finetune_network(model, moving, fixed, iters: int, lr: float, lam: float, window: int) -> None:
    """Adam on the weights of ``model`` (a copy) for ``iters`` steps of LNCC + lambda diffusion."""
    import torch

    loss_fn = _loss_fns(window, lam, moving.device, moving.dtype)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, amsgrad=True)
    for _ in range(int(iters)):
        opt.zero_grad(set_to_none=True)
        out = model(moving, fixed)
        loss = loss_fn(out.warped, fixed, out.ddf)
        loss.backward()
        opt.step()


def _pyramid_factors(size: Sequence[int], min_size: int = 8) -> list[int]:
    """Coarse-to-fine downsampling factors among 4, 2, 1 whose grid keeps >= min_size voxels a side."""
    return [f for f in (4, 2) if min(size) // f >= min_size] + [1]


def _optimise_field(
    moving: "torch.Tensor",
    fixed: "torch.Tensor",
    iters: int,
    lr: float,
    lam: float,
    window: int,
    init: "torch.Tensor | None" = None,
) -> "torch.Tensor":
    """Instance optimisation of a voxel displacement field, coarse to fine.

    Args:
        moving, fixed: ``(1, 1, D, H, W)`` on the same grid, scaled to [0, 1].
        init: optional ``(1, 3, D, H, W)`` starting field (e.g. a network's prediction), resized
            to each level of the pyramid; default zero.
    Returns:
        ``(1, 3, D, H, W)`` voxel displacements (no gradient).
    """
    import torch

    from psmamba.spatial import warp

    size = tuple(int(s) for s in fixed.shape[2:])
    factors = _pyramid_factors(size)
    per_level = [int(iters) // len(factors)] * len(factors)
    per_level[-1] += int(iters) - sum(per_level)
    ddf = None if init is None else init.detach()
    for f, n in zip(factors, per_level):
        lsize = tuple(max(2, int(math.ceil((s - 1) / f)) + 1) for s in size)  # corner-aligned grid
        m = _resize_image(moving, lsize)
        x = _resize_image(fixed, lsize)
        init = torch.zeros((1, 3) + lsize, device=fixed.device, dtype=fixed.dtype) if ddf is None else _resize_field(ddf, lsize)
        param = torch.nn.Parameter(init.clone())
        # the LNCC window shrinks with the grid so it covers about the same anatomy
        loss_fn = _loss_fns(max(3, (window // f) | 1), lam, fixed.device, fixed.dtype)
        opt = torch.optim.Adam([param], lr=lr)
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(warp(m, param), x, param)
            loss.backward()
            opt.step()
        ddf = param.detach()
    assert ddf is not None
    return _resize_field(ddf, size)


# --------------------------------------------------------------------------- main entry
def register_pair(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    moving_labels: ImageLike | None = None,
    fixed_labels: ImageLike | None = None,
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

    This signature is stable (``psmamba demo`` and ``psmamba evaluate`` call it).

    Args:
        fixed: the fixed (target) image: a path (``.nii``, ``.nii.gz``, Analyze ``.hdr/.img``),
            a :class:`psmamba.io.Image`, a :class:`psmamba.data.Volume` (its image) or a 3-D
            array (identity affine: 1 mm voxels).
        moving: the moving image, likewise; its size, spacing and orientation may differ from
            the fixed image's (it is resampled onto the fixed grid through the two affines).
        moving_labels: label map on the moving image's grid (warped nearest-neighbour): a path,
            an Image, an integer array, or a :class:`psmamba.data.Volume` (its ``labels``).
        fixed_labels: label map on the fixed grid; with ``moving_labels`` gives Dice
            before and after registration.
        checkpoint: a psmamba checkpoint (``psmamba train``'s output). Exclusive with ``model``.
        model: an already loaded network ``forward(moving, fixed) -> (warped, ddf)``. It runs on
            the fixed grid unless ``model_size`` is given: pass
            ``model_size=training_size(checkpoint_dict)`` to keep a checkpoint's training size.
        iters: test-time optimisation steps: of the network's weights (a copy, starting from the
            checkpoint) when a network is given, else of the displacement field directly,
            coarse to fine. 0 with no network gives the identity (no registration).
        refine: with a network and ``iters > 0``: ``"weights"`` fine-tunes a copy of the
            network on the pair; ``"field"`` optimises the network's predicted field directly
            (coarse to fine, like instance optimisation; cheaper, and useful when the network
            is weak, e.g. after a short CPU training).
        lr: Adam learning rate; default 1e-4 for network weights, 0.1 (voxels) for a field.
        lam: weight of the diffusion regulariser; default 1 (the paper's) when fine-tuning a
            network, 3 when optimising a field directly (smoother fields at equal Dice).
        window: LNCC window (the paper's 9).
        device: ``"auto"`` (accelerator if available, else CPU), ``"cpu"``, ``"cuda"``, ...
        out_dir: when given, the outputs are written there atomically (see module docstring).
        model_size: ``(D, H, W)`` grid the network runs on; default: the training size stored in
            the checkpoint, else the fixed grid.
        overview: also draw ``overview.png`` when writing outputs.
        labels: the label codes Dice is computed on (default: see :func:`psmamba.metrics.dice`).

    Returns:
        A :class:`RegistrationResult` (arrays on the fixed grid, and the summary dict).

    Raises:
        PsmambaError: bad inputs, a bad checkpoint or an unwritable output folder, raised
            before any work is done; nothing is written in that case.
    """
    import torch

    t_start = time.perf_counter()
    if checkpoint is not None and model is not None:
        raise PsmambaError("give either checkpoint= or model=, not both")
    if int(iters) < 0:
        raise PsmambaError(f"iters must be >= 0, got {iters}")
    if refine not in ("weights", "field"):
        raise PsmambaError(f"refine must be 'weights' or 'field', got {refine!r}")
    if model_size is not None:
        model_size = tuple(int(s) for s in model_size)
        if len(model_size) != 3 or min(model_size) < 2:
            raise PsmambaError(f"model_size must be three sizes >= 2, got {model_size}")
    if lam is not None and lam < 0:
        raise PsmambaError(f"the diffusion weight must be >= 0, got {lam}")

    # ---- 1. validate: output folder first (cheap), then inputs, then the checkpoint
    staging = _Staging(out_dir) if out_dir is not None else None
    try:
        dev = resolve_device(device)
        fixed_img = _as_image(fixed, "fixed image")
        moving_img = _as_image(moving, "moving image")
        mlab_img = _as_image(moving_labels, "moving labels", labels=True)
        flab_img = _as_image(fixed_labels, "fixed labels", labels=True)
        if mlab_img is not None:
            _check_same_grid(mlab_img, moving_img, "moving labels", "moving image")
        if flab_img is not None:
            _check_same_grid(flab_img, fixed_img, "fixed labels", "fixed image")
        ckpt_dict = None
        if checkpoint is not None:
            model, ckpt_dict = load_model(checkpoint, device=dev)
        elif model is not None:
            model = model.to(dev).eval()
        field_mode = model is None or refine == "field"
        if lam is None:
            lam = _LAM_FIELD if field_mode else _LAM_NETWORK
        t_load = time.perf_counter()

        # ---- 2. the moving image (and labels) onto the fixed grid, through world space
        f_shape = tuple(int(s) for s in fixed_img.data.shape)
        f_aff = np.asarray(fixed_img.affine, dtype=np.float64)
        fixed_np = np.asarray(fixed_img.data, dtype=np.float32)
        moving_np = resample_to_grid(np.asarray(moving_img.data), moving_img.affine, f_shape, f_aff, order=1)
        if not np.any(moving_np) and np.any(np.asarray(moving_img.data)):
            raise PsmambaError(
                f"moving image {_name(moving_img) or ''} does not overlap the fixed image "
                f"{_name(fixed_img) or ''} in world coordinates (check the affines)".replace("  ", " ")
            )
        mlab_np = None
        if mlab_img is not None:
            mlab_np = resample_to_grid(np.asarray(mlab_img.data), mlab_img.affine, f_shape, f_aff, order=0)
        flab_np = None if flab_img is None else np.asarray(flab_img.data)

        # ---- 3. the model grid
        grid = model_size or (training_size(ckpt_dict) if model is not None else None) or f_shape
        dtype = torch.float32
        fx = torch.from_numpy(np.ascontiguousarray(fixed_np)).to(dev, dtype)[None, None]
        mv = torch.from_numpy(np.ascontiguousarray(moving_np)).to(dev, dtype)[None, None]
        fx_n = _resize_image(_minmax(fx), grid)
        mv_n = _resize_image(_minmax(mv), grid)
        t_prep = time.perf_counter()

        # ---- 4. register
        if model is not None:
            net = model
            if iters > 0 and refine == "weights":
                net = copy.deepcopy(model)  # the caller's (and the next pair's) weights stay intact
                net.train()
                _finetune_network(net, mv_n, fx_n, iters, lr or _LR_NETWORK, lam, window)
                net.eval()
            with torch.no_grad():
                ddf_grid = net(mv_n, fx_n).ddf
            if iters > 0 and refine == "field":
                # refined on the fixed grid itself (finer than a coarse training grid)
                ddf_grid = _optimise_field(_minmax(mv), _minmax(fx), iters, lr or _LR_FIELD, lam, window,
                                           init=_resize_field(ddf_grid, f_shape))
            method = ("network+tto" if refine == "weights" else "network+field-tto") if iters > 0 else "network"
        elif iters > 0:
            ddf_grid = _optimise_field(mv_n, fx_n, iters, lr or _LR_FIELD, lam, window)
            method = "instance-optimisation"
        else:
            ddf_grid = torch.zeros((1, 3) + tuple(grid), device=dev, dtype=dtype)
            method = "identity"
        # ---- 5. back to the fixed grid
        from psmamba.spatial import warp

        with torch.no_grad():
            ddf_t = _resize_field(ddf_grid.detach().to(dtype), f_shape)
            warped_t = warp(mv, ddf_t)
            wlab_np = None
            if mlab_np is not None:
                lab_t = torch.from_numpy(np.ascontiguousarray(mlab_np.astype(np.int64)))[None, None].to(dev)
                wlab_np = warp(lab_t, ddf_t, mode="nearest")[0, 0].cpu().numpy().astype(mlab_np.dtype)
        _synchronize(dev)  # accelerator kernels run asynchronously: time them to completion
        t_reg = time.perf_counter()

        # ---- 6. metrics
        from psmamba import metrics

        ddf_np = ddf_t[0].cpu().numpy().astype(np.float32)
        warped_np = warped_t[0, 0].cpu().numpy().astype(np.float32)
        jac = np.asarray(metrics.jacobian_determinant(ddf_np), dtype=np.float32)
        summary: dict[str, Any] = {
            "fixed": _name(fixed_img),
            "moving": _name(moving_img),
            "moving_labels": _name(mlab_img) if mlab_img is not None else None,
            "fixed_labels": _name(flab_img) if flab_img is not None else None,
            "method": method,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "iters": int(iters),
            "refine": (refine if model is not None else "field") if iters > 0 else None,
            "lr": (lr or (_LR_FIELD if field_mode else _LR_NETWORK)) if iters > 0 else None,
            "lambda_diffusion": float(lam),
            "lncc_window": int(window),
            "device": str(dev),
            "fixed_shape": list(f_shape),
            "moving_shape": [int(s) for s in moving_img.data.shape],
            "model_grid": [int(s) for s in grid],
            "fixed_spacing": _spacing(fixed_img),
            "moving_spacing": _spacing(moving_img),
            "folding_percent": float(metrics.folding_percent(ddf_np)),
            "sdlogj": float(metrics.sdlogj(ddf_np)),
            "sdlogj_l2r": float(metrics.sdlogj_l2r(ddf_np)),
            "jacobian_min": float(jac.min()),
            "jacobian_max": float(jac.max()),
            "displacement_max_vox": float(np.sqrt((ddf_np**2).sum(0)).max()),
        }
        if mlab_np is not None and flab_np is not None:
            summary["dice_before"] = _dice_summary(metrics.dice(flab_np, mlab_np, labels=labels))
            summary["dice_after"] = _dice_summary(metrics.dice(flab_np, wlab_np, labels=labels))
        t_metrics = time.perf_counter()
        summary["timings_s"] = {
            "load": t_load - t_start,
            "preprocess": t_prep - t_load,
            "register": t_reg - t_prep,
            "metrics": t_metrics - t_reg,
        }
        result = RegistrationResult(
            warped=warped_np,
            ddf=ddf_np,
            jacobian=jac,
            affine=f_aff,
            fixed=fixed_np,
            moving=moving_np,
            warped_labels=wlab_np,
            moving_labels=mlab_np,
            fixed_labels=flab_np,
            summary=summary,
        )
        # ---- 7. outputs
        if staging is not None:
            t_w = time.perf_counter()
            summary["timings_s"]["total"] = t_w - t_start  # written into summary.json
            result._write(staging.tmp, overview=overview)
            result.out_dir = staging.commit()
            summary["timings_s"]["write"] = time.perf_counter() - t_w
        summary["timings_s"]["total"] = time.perf_counter() - t_start
        return result
    finally:
        if staging is not None:
            staging.cleanup()


def _synchronize(dev: "torch.device") -> None:
    import torch

    acc = getattr(torch, "accelerator", None)
    if dev.type != "cpu" and acc is not None and acc.is_available():
        acc.synchronize()


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
