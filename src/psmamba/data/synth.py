"""Synthetic registration pairs in the SynthMorph manner (Hoffmann et al. 2021), in torch.

From one label map (given, or drawn from smooth noise), each side of a pair is made by

1. a random smooth deformation: a stationary velocity field drawn as Gaussian noise on a
   coarse grid, upsampled and integrated by scaling and squaring (diffeomorphic), applied to
   the label map with nearest-neighbour sampling; optionally composed with a random affine
   map about the centre (rotation, scaling, shear, translation: ``affine_*`` ranges);
2. a random intensity per label (Gaussian mixture: one mean and one spread per label); label 0
   may be made black (``zero_background``: skull-stripped images have an empty background);
3. a Gaussian blur of random width; optionally a resolution change (``resolution_prob``):
   down-sampled by a random factor per axis and back (thick slices, low-resolution scans);
4. a multiplicative bias field (exp of smooth coarse noise);
5. min-max to [0, 1], a random gamma, and additive noise.

The moving and fixed images share the anatomy (the label map) but not the shape or the
contrast, so a network trained on them must learn contrast-agnostic registration; no real
image is needed. Everything is drawn from one ``torch.Generator`` (``seed``), on the device
of the inputs: the same seed on the same device gives the same pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from psmamba.errors import PsmambaError

__all__ = [
    "SynthConfig",
    "SynthPair",
    "SynthPairDataset",
    "augment_image",
    "random_affine_ddf",
    "random_ddf",
    "random_deformation",
    "random_label_map",
    "synth_pair",
    "synthesize_image",
]


@dataclass
class SynthConfig:
    """Ranges of the random draws (voxel units; intensities on a [0, 1] scale).

    Attributes:
        num_labels: labels of a generated label map (when none is given).
        label_scale: coarse-grid factor of the noise that shapes generated labels (1/N of the size).
        svf_std: the velocity field's std is drawn from ``U(0, svf_std)`` voxels per side.
        svf_scale: the velocity noise lives on a grid ``1/svf_scale`` of the image size.
        integrate_steps: scaling-and-squaring steps.
        mean_range: per-label mean intensity range.
        std_range: per-label intensity spread range.
        blur_sigma: blur width drawn from ``U(0, blur_sigma)`` voxels.
        bias_std: log bias field std drawn from ``U(0, bias_std)``.
        bias_scale: the bias noise lives on a grid ``1/bias_scale`` of the image size.
        gamma_std: ``image ** exp(N(0, gamma_std))``.
        noise_std: additive noise std drawn from ``U(0, noise_std)``.
        affine_rotation: rotation angles (degrees, about each axis) drawn from ``U(-a, a)``.
        affine_scale: log scale per axis drawn from ``U(-s, s)`` (0.1: about +-10 %).
        affine_shear: shear terms drawn from ``U(-h, h)``.
        affine_shift: translation per axis drawn from ``U(-t, t)`` voxels.
        resolution_prob: probability of a resolution change of an image.
        resolution_max: its factor per axis is drawn from ``U(1, resolution_max)``.
        zero_background: probability that label 0 is given intensity 0 (no spread).

    The ``affine_*``, ``resolution_*`` and ``zero_background`` draws are only made when they
    are switched on, so the defaults give the same pairs as before they existed.
    """

    num_labels: int = 16
    label_scale: int = 8
    svf_std: float = 3.0
    svf_scale: int = 16
    integrate_steps: int = 7
    mean_range: tuple[float, float] = (0.1, 1.0)
    std_range: tuple[float, float] = (0.0, 0.08)
    blur_sigma: float = 1.0
    bias_std: float = 0.3
    bias_scale: int = 24
    gamma_std: float = 0.25
    noise_std: float = 0.03
    affine_rotation: float = 0.0
    affine_scale: float = 0.0
    affine_shear: float = 0.0
    affine_shift: float = 0.0
    resolution_prob: float = 0.0
    resolution_max: float = 1.0
    zero_background: float = 0.0

    def __post_init__(self) -> None:
        from psmamba.config import _check_types

        _check_types(self, "data.options")  # types, and finite numbers: svf_std .nan gave null fields
        if self.num_labels < 1:
            raise PsmambaError(f"data.options.num_labels must be >= 1, got {self.num_labels}")
        for name in ("label_scale", "svf_scale", "bias_scale"):
            if getattr(self, name) < 1:
                raise PsmambaError(f"data.options.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("svf_std", "blur_sigma", "bias_std", "gamma_std", "noise_std", "affine_rotation",
                     "affine_scale", "affine_shear", "affine_shift"):
            if getattr(self, name) < 0:
                raise PsmambaError(f"data.options.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("resolution_prob", "zero_background"):
            if not 0 <= getattr(self, name) <= 1:
                raise PsmambaError(f"data.options.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.resolution_max < 1:
            raise PsmambaError(f"data.options.resolution_max must be >= 1, got {self.resolution_max}")

    @property
    def has_affine(self) -> bool:
        return any(v > 0 for v in (self.affine_rotation, self.affine_scale, self.affine_shear, self.affine_shift))


class SynthPair(NamedTuple):
    """A synthetic pair: images ``(B, 1, D, H, W)`` float in [0, 1], label maps ``(B, 1, D, H, W)`` long,
    and the fields that made them from the common label map, ``(B, 3, D, H, W)`` voxels."""

    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor
    fixed_labels: torch.Tensor
    moving_ddf: torch.Tensor
    fixed_ddf: torch.Tensor


def _uniform(lo: float, hi: float, shape, g: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device, dtype=dtype)


def _smooth_noise(shape: tuple[int, ...], channels: int, batch: int, scale: int, g: torch.Generator,
                  device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise on a grid ``scale`` times coarser, upsampled trilinearly: ``(B, C, D, H, W)``."""
    coarse = [max(2, math.ceil(s / scale)) for s in shape]
    noise = torch.randn((batch, channels, *coarse), generator=g, device=device, dtype=dtype)
    return F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)


def _generator(seed: int | torch.Generator | None, device) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) if seed is not None else torch.seed())
    return g


def random_label_map(
    shape: tuple[int, int, int], num_labels: int = 16, scale: int = 8, batch: int = 1,
    seed: int | torch.Generator | None = 0, device: torch.device | str | None = None,
) -> torch.Tensor:
    """A label map from smooth noise: the arg-max of ``num_labels`` smooth random fields.

    Returns:
        ``(batch, 1, D, H, W)`` long tensor with labels ``0..num_labels-1`` (0 counts as a
        structure too: there is no background in a generated map).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise PsmambaError(f"random_label_map needs a 3-D shape, got {shape}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    g = _generator(seed, device)
    fields = _smooth_noise(shape, num_labels, batch, scale, g, device)
    return fields.argmax(dim=1, keepdim=True)


def random_ddf(
    shape: tuple[int, int, int], std: float | torch.Tensor, scale: int = 16, steps: int = 7, batch: int = 1,
    seed: int | torch.Generator | None = 0, device: torch.device | str | None = None, dtype=torch.float32,
) -> torch.Tensor:
    """A smooth diffeomorphic displacement ``(batch, 3, D, H, W)`` in voxels.

    Velocity: Gaussian noise of std ``std`` (a number, or one per batch item) on a grid
    ``scale`` times coarser, upsampled, then integrated with ``steps`` squarings
    (:func:`psmamba.spatial.integrate_svf`, border padding so edges are not pulled to zero).
    """
    from psmamba.spatial import integrate_svf

    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    g = _generator(seed, device)
    svf = _smooth_noise(shape, 3, batch, scale, g, device, dtype)
    std_t = torch.as_tensor(std, device=device, dtype=dtype).reshape(-1, 1, 1, 1, 1)
    return integrate_svf(svf * std_t, steps=steps, padding="border")


def random_affine_ddf(
    shape: tuple[int, int, int], config: SynthConfig, batch: int = 1, seed: int | torch.Generator | None = 0,
    device: torch.device | str | None = None, dtype=torch.float32,
) -> torch.Tensor:
    """The displacement ``(batch, 3, D, H, W)`` (voxels) of a random affine map about the grid centre.

    ``x -> c + A (x - c) + t`` with ``A = R S H``: rotations about the three axes drawn from
    ``U(-affine_rotation, affine_rotation)`` degrees, per-axis scales ``exp(U(-affine_scale,
    affine_scale))``, an upper-triangular shear of ``U(-affine_shear, affine_shear)`` terms, and
    ``t`` from ``U(-affine_shift, affine_shift)`` voxels. Voxel units on every axis (the grids
    here are near-isotropic).
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    g = _generator(seed, device)
    c = config
    ang = _uniform(-c.affine_rotation, c.affine_rotation, (batch, 3), g, device, torch.float64) * math.pi / 180
    log_s = _uniform(-c.affine_scale, c.affine_scale, (batch, 3), g, device, torch.float64)
    shear = _uniform(-c.affine_shear, c.affine_shear, (batch, 3), g, device, torch.float64)
    shift = _uniform(-c.affine_shift, c.affine_shift, (batch, 3), g, device, torch.float64)
    eye = torch.eye(3, dtype=torch.float64, device=device).expand(batch, 3, 3)
    mats = []
    for axis in range(3):  # rotation in the plane of the two other axes
        i, j = [a for a in range(3) if a != axis]
        r = eye.clone()
        cos, sin = torch.cos(ang[:, axis]), torch.sin(ang[:, axis])
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = cos, -sin, sin, cos
        mats.append(r)
    h = eye.clone()
    h[:, 0, 1], h[:, 0, 2], h[:, 1, 2] = shear[:, 0], shear[:, 1], shear[:, 2]
    a = mats[0] @ mats[1] @ mats[2] @ torch.diag_embed(torch.exp(log_s)) @ h  # (B, 3, 3)
    axes = [torch.arange(n, device=device, dtype=torch.float64) - (n - 1) / 2 for n in shape]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W), centred voxel coordinates
    y = torch.einsum("bij,jdhw->bidhw", a, x) + shift[:, :, None, None, None]
    return (y - x).to(dtype)


def _change_resolution(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D, H, W)`` down-sampled by ``factors[b]`` (3 per item, >= 1) and back, trilinearly."""
    shape = tuple(x.shape[2:])
    out = []
    for b in range(x.shape[0]):
        small = [max(2, round(n / float(f))) for n, f in zip(shape, factors[b])]
        if tuple(small) == shape:
            out.append(x[b : b + 1])
            continue
        low = F.interpolate(x[b : b + 1], size=small, mode="trilinear", align_corners=True)
        out.append(F.interpolate(low, size=shape, mode="trilinear", align_corners=True))
    return torch.cat(out, dim=0)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, 1, D, H, W)`` with one sigma (voxels) per batch item."""
    out = []
    for b in range(x.shape[0]):
        s = float(sigma[b])
        xb = x[b : b + 1]
        if s < 0.1:
            out.append(xb)
            continue
        r = max(1, int(math.ceil(3 * s)))
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = k / k.sum()
        for axis in range(3):
            view = [1, 1, 1, 1, 1]
            view[2 + axis] = -1
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
            xb = F.conv3d(F.pad(xb, pad, mode="replicate"), k.view(view))
        out.append(xb)
    return torch.cat(out, dim=0)


def synthesize_image(
    labels: torch.Tensor, config: SynthConfig | None = None, seed: int | torch.Generator | None = 0,
    num_labels: int | None = None,
) -> torch.Tensor:
    """A random-contrast image of a label map (steps 2-5 of the module doc).

    Args:
        labels: ``(B, 1, D, H, W)`` integer labels ``>= 0``.
        config: the ranges (default :class:`SynthConfig`).
        seed: an int or a ``torch.Generator`` on ``labels.device``.
        num_labels: size of the intensity table (default ``labels.max() + 1``).

    Returns:
        ``(B, 1, D, H, W)`` float32 in [0, 1].
    """
    cfg = config or SynthConfig()
    if labels.ndim != 5 or labels.shape[1] != 1 or labels.is_floating_point():
        raise PsmambaError(f"labels must be an integer (B, 1, D, H, W) tensor, got {labels.dtype} {tuple(labels.shape)}")
    device = labels.device
    g = _generator(seed, device)
    b = labels.shape[0]
    k = int(num_labels) if num_labels is not None else int(labels.max()) + 1
    means = _uniform(*cfg.mean_range, (b, k), g, device)
    stds = _uniform(*cfg.std_range, (b, k), g, device)
    idx = labels.long().clamp_min(0).view(b, -1)
    if cfg.zero_background > 0:  # a skull-stripped look: label 0 black, without spread
        black = torch.rand((b,), generator=g, device=device) < cfg.zero_background
        means[:, 0] = torch.where(black, torch.zeros_like(means[:, 0]), means[:, 0])
        stds[:, 0] = torch.where(black, torch.zeros_like(stds[:, 0]), stds[:, 0])
    mu = torch.gather(means, 1, idx).view_as(labels).float()
    sd = torch.gather(stds, 1, idx).view_as(labels).float()
    img = mu + sd * torch.randn(labels.shape, generator=g, device=device)
    return augment_image(img, cfg, seed=g)


def augment_image(image: torch.Tensor, config: SynthConfig | None = None,
                  seed: int | torch.Generator | None = 0) -> torch.Tensor:
    """Steps 3-5 of the module doc on any image: blur, resolution change, bias field, min-max to
    [0, 1], gamma, noise (for real images, whose contrast is kept).

    Args:
        image: ``(B, 1, D, H, W)`` float.
        config: the ranges (default :class:`SynthConfig`).
        seed: an int or a ``torch.Generator`` on ``image.device``.

    Returns:
        ``(B, 1, D, H, W)`` float32 in [0, 1].
    """
    cfg = config or SynthConfig()
    if image.ndim != 5 or image.shape[1] != 1:
        raise PsmambaError(f"augment_image needs a (B, 1, D, H, W) image, got {tuple(image.shape)}")
    device = image.device
    g = _generator(seed, device)
    b = image.shape[0]
    shape = tuple(image.shape[2:])
    img = _gaussian_blur(image.float(), _uniform(0, cfg.blur_sigma, (b,), g, device))
    if cfg.resolution_prob > 0:
        change = torch.rand((b, 1), generator=g, device=device) < cfg.resolution_prob
        factors = _uniform(1.0, cfg.resolution_max, (b, 3), g, device)
        img = _change_resolution(img, torch.where(change, factors, torch.ones_like(factors)))
    bias_std = _uniform(0, cfg.bias_std, (b, 1, 1, 1, 1), g, device)
    img = img * torch.exp(_smooth_noise(shape, 1, b, cfg.bias_scale, g, device) * bias_std)
    lo = img.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = img.amax(dim=(1, 2, 3, 4), keepdim=True)
    img = (img - lo) / (hi - lo).clamp_min(1e-6)
    gamma = torch.exp(cfg.gamma_std * torch.randn((b, 1, 1, 1, 1), generator=g, device=device))
    img = img.clamp_min(0) ** gamma
    noise = _uniform(0, cfg.noise_std, (b, 1, 1, 1, 1), g, device)
    img = img + noise * torch.randn(img.shape, generator=g, device=device)
    return img.clamp(0, 1)


def random_deformation(
    shape: tuple[int, int, int], config: SynthConfig, batch: int = 1, seed: int | torch.Generator | None = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One side's random spatial transform ``(batch, 3, D, H, W)`` (voxels): the smooth field of
    :func:`random_ddf` (std drawn from ``U(0, svf_std)``), then the affine map of
    :func:`random_affine_ddf` when the config has one (``x -> affine(x + smooth(x))``)."""
    from psmamba.spatial import compose

    device = torch.device(device) if device is not None else torch.device("cpu")
    g = _generator(seed, device)
    std = _uniform(0, config.svf_std, (batch,), g, device)
    ddf = random_ddf(shape, std, config.svf_scale, config.integrate_steps, batch=batch, seed=g, device=device)
    if config.has_affine:
        # warp samples at x + ddf(x); "first the smooth field, then the affine map" composes them
        # so the affine part acts on the deformed coordinates
        aff = random_affine_ddf(shape, config, batch=batch, seed=g, device=device)
        ddf = compose(aff, ddf, padding="border")
    return ddf


def synth_pair(
    labels: torch.Tensor | None = None,
    shape: tuple[int, int, int] | None = None,
    config: SynthConfig | None = None,
    seed: int | torch.Generator | None = 0,
    device: torch.device | str | None = None,
) -> SynthPair:
    """One synthetic pair from a label map (or from a generated one).

    Args:
        labels: ``(B, 1, D, H, W)`` or ``(D, H, W)`` integer label map; ``None`` draws one
            of ``shape`` with :func:`random_label_map`.
        shape: grid of the generated label map (needed when ``labels`` is ``None``).
        config: random ranges (:class:`SynthConfig`).
        seed: an int or a ``torch.Generator`` (on the device of ``labels``).
        device: where to generate when ``labels`` is ``None`` (default CPU).

    Returns:
        :class:`SynthPair` with the moving and fixed images and label maps.
    """
    from psmamba.spatial import warp

    cfg = config or SynthConfig()
    if labels is None:
        if shape is None:
            raise PsmambaError("synth_pair needs a label map or a shape")
        device = torch.device(device) if device is not None else torch.device("cpu")
        g = _generator(seed, device)
        labels = random_label_map(shape, cfg.num_labels, cfg.label_scale, seed=g, device=device)
    else:
        if not torch.is_tensor(labels):
            labels = torch.as_tensor(labels)
        if labels.ndim == 3:
            labels = labels[None, None]
        if labels.ndim != 5 or labels.shape[1] != 1 or labels.is_floating_point():
            raise PsmambaError(
                f"synth_pair labels must be integer (B, 1, D, H, W) or (D, H, W), got {labels.dtype} {tuple(labels.shape)}"
            )
        if labels.numel() and int(labels.min()) < 0:
            raise PsmambaError("synth_pair labels must be >= 0")
        device = labels.device
        g = _generator(seed, device)
    labels = labels.long()
    b = labels.shape[0]
    shape = tuple(labels.shape[2:])
    k = int(labels.max()) + 1
    out = []
    for _ in range(2):  # moving, then fixed: each its own deformation and contrast
        ddf = random_deformation(shape, cfg, batch=b, seed=g, device=device)
        lab = warp(labels, ddf, mode="nearest", padding="border")
        img = synthesize_image(lab, cfg, seed=g, num_labels=k)
        out.append((img, lab, ddf))
    (mi, ml, md), (fi, fl, fd) = out
    return SynthPair(mi, fi, ml, fl, md, fd)


class SynthPairDataset(torch.utils.data.Dataset):
    """``length`` synthetic pairs; item ``i`` is generated from seed ``seed + i`` (reproducible).

    Items are dicts like :class:`~psmamba.data.dataset.PairDataset`'s: ``moving``, ``fixed``
    ``(1, D, H, W)`` float32, ``moving_labels``, ``fixed_labels`` ``(1, D, H, W)`` int64, ids.

    Args:
        length: number of pairs per epoch.
        shape: grid of generated label maps (when ``label_maps`` is empty).
        label_maps: optional real label maps ``(D, H, W)`` to draw from (item ``i`` uses map
            ``i % len(label_maps)``); otherwise label maps are generated.
        config: :class:`SynthConfig`.
        seed: base seed.
    """

    def __init__(self, length: int, shape: tuple[int, int, int] = (64, 64, 64),
                 label_maps: list[torch.Tensor] | None = None, config: SynthConfig | None = None,
                 seed: int = 0) -> None:
        if length < 1:
            raise PsmambaError(f"SynthPairDataset length must be >= 1, got {length}")
        self.length = int(length)
        self.shape = tuple(int(s) for s in shape)
        self.label_maps = [torch.as_tensor(m).long() for m in (label_maps or [])]
        self.config = config or SynthConfig()
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pairs")
        labels = None
        if self.label_maps:
            labels = self.label_maps[index % len(self.label_maps)]
        p = synth_pair(labels, shape=self.shape, config=self.config, seed=self.seed + index)
        return {
            "moving": p.moving[0].float(), "fixed": p.fixed[0].float(),
            "moving_labels": p.moving_labels[0], "fixed_labels": p.fixed_labels[0],
            "moving_id": f"synth-{index}-moving", "fixed_id": f"synth-{index}-fixed",
        }
