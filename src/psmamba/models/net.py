"""PSMamba-Net: dual-stream encoder, per-level projections, SIR at level 5, coarse-to-fine cascade.

The forward pass (``shared/spec/architecture.md``, section 5), with ``T_k`` = warp on level k's
grid and ``up`` = :func:`psmamba.spatial.upsample_ddf` (trilinear x2 upsampling with
``align_corners=True`` AND the vectors multiplied by 2, because a voxel of level k is two
voxels of level k-1)::

    F1..F5 = enc(fixed); M1..M5 = enc(moving)              # one encoder, shared weights
    phi  = SIR(proj5(F5), proj5(M5))                        # K passes of one level-5 block
    flow = up(phi)
    for k in 4, 3, 2:
        w    = dec_k(proj_k(F_k), proj_k(T_k(M_k, flow)))  # raw moving features warped, then projected
        flow = up(T_k(flow, w) + w)                         # compose, then go one level finer
    w    = dec_1(proj_1(F_1), proj_1(T_1(M_1, flow)))
    flow = T_1(flow, w) + w
    warped = T_1(moving, flow)

Composition of a residual ``w`` onto a field ``phi`` is ``phi o (id + w) + w``
(:func:`psmamba.spatial.compose`). In the ``_diff`` variant every residual ``w`` of levels
4..1 is replaced by ``integrate_svf(w, 7)`` before it is composed, and the level-5 SIR result
is integrated once after its last pass.

Any input size: both images are zero-padded at the far end of each axis up to a multiple of 16
(:func:`psmamba.spatial.pad_to_multiple`; padding at the far end keeps voxel indices and hence
displacements unchanged), the field is computed on the padded grid and cropped back, and the
ORIGINAL moving image is warped with the cropped field (so the padded zeros never leak in
except where the field points outside the volume, where warping pads with zeros anyway).

Conventions and choices where the spec leaves room
--------------------------------------------------
* Token order: every Mamba layer sees its level's grid flattened in C order (W fastest, then
  H, then D) and scans it in ONE direction (token 0 -> L-1), as the reference does.
* Padding: zeros at the far end of each axis up to a multiple of 16; an input whose axes are
  all <= 16 voxels is refused (its coarsest grid would be one voxel, where instance norm is
  undefined).
* "N(0, 1e-5)" initialisations (projections, registration heads) use 1e-5 as the standard
  deviation.
* SE blocks use ``max(1, ch // 16)`` hidden units (+16 parameters over the reference).
* The ``_diff`` encoder stem (Conv3d 1 -> c + LeakyReLU, no norm) uses slope 0.1 like ConvIN.
* Warps and compositions pad with zeros (the reference's choice) everywhere.
* The encoder runs both streams in one batched call (identical to two calls, see
  :class:`~psmamba.models.encoder.DualStreamEncoder`).
* The transformer ablation block uses 8 heads by default (32 channels per head at D = 256) and
  no positional encoding; see :class:`~psmamba.nn.blocks.AttentionMixer`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from psmamba import spatial
from psmamba.errors import PsmambaError, check_on_device
from psmamba.config import ModelConfig
from psmamba.models.decoder import DecoderBlock
from psmamba.models.encoder import NUM_LEVELS, DualStreamEncoder
from psmamba.models.refinement import SubstrateIterativeRefinement
from psmamba.nn.blocks import SFE, LevelProjection
from psmamba.nn.fast import CHANNELS_LAST

__all__ = ["PSMambaNet", "RegistrationOutput", "PAD_MULTIPLE", "check_pair", "min_extent_of"]

#: the input grid must be divisible by 2^(levels - 1)
PAD_MULTIPLE = 2 ** (NUM_LEVELS - 1)


def _check_backend(name: str) -> None:
    from psmamba.nn.scan import registered_backends

    known = ["auto", *registered_backends()]
    if name not in known:
        raise PsmambaError(f"model config: unknown mamba_backend {name!r}; choose one of {known}")


class RegistrationOutput(NamedTuple):
    """What :meth:`PSMambaNet.forward` returns.

    Attributes:
        warped: ``(B, 1, D, H, W)``, the moving image resampled with ``ddf`` (trilinear).
        ddf: ``(B, 3, D, H, W)``, voxel displacements on the fixed image's grid (channel i
            along spatial axis i): the fixed voxel ``p`` corresponds to moving ``p + ddf(p)``.
    """

    warped: torch.Tensor
    ddf: torch.Tensor


def min_extent_of(model: nn.Module) -> int:
    """The voxels that one axis of ``model``'s input grid must exceed: PSMamba-Net's
    :data:`PAD_MULTIPLE`, a peer's ``min_extent``, else 0 (checked before a run, by its grid alone)."""
    return int(getattr(model, "min_extent", PAD_MULTIPLE if isinstance(model, PSMambaNet) else 0))


def check_pair(moving: torch.Tensor, fixed: torch.Tensor, min_extent: int = 0) -> None:
    """The input checks of every registration network (one-line :class:`PsmambaError`).

    ``min_extent``: at least one axis must have MORE voxels than this (0 = any size). The
    NaN/infinity check does not make a GPU wait (:func:`psmamba.errors.check_on_device`).
    """
    for name, x in (("moving", moving), ("fixed", fixed)):
        if not torch.is_tensor(x):
            raise PsmambaError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 5 or x.shape[1] != 1:
            raise PsmambaError(f"{name} must have shape (B, 1, D, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise PsmambaError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if moving.shape != fixed.shape:
        raise PsmambaError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape")
    if max(moving.shape[2:]) <= min_extent:
        raise PsmambaError(
            f"input of size {tuple(moving.shape[2:])} is too small: at least one axis must exceed {min_extent} voxels"
        )
    for name, x in (("moving", moving), ("fixed", fixed)):
        # read at once on the CPU; on a GPU an asynchronous assert (no host-device sync per step)
        check_on_device(torch.isfinite(x).all(), f"{name} contains NaN or infinite values")


class PSMambaNet(nn.Module):
    """PSMamba-Net, every variant of it, built from a :class:`ModelConfig`.

    Sub-modules (each a module of its own, see their docstrings):

    * ``encoder``: :class:`~psmamba.models.encoder.DualStreamEncoder` (shared weights);
    * ``projections[k-1]``: :class:`~psmamba.nn.blocks.LevelProjection` of level k, shared by
      both streams;
    * ``sir``: :class:`~psmamba.models.refinement.SubstrateIterativeRefinement` holding the
      level-5 :class:`~psmamba.models.decoder.DecoderBlock` (``config.sir_block``);
    * ``decoders[k-1]`` for k = 1..4: the decoder blocks of levels 1..4 (``config.level_block``).
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else ModelConfig()
        if not isinstance(cfg, ModelConfig):
            raise PsmambaError(f"PSMambaNet needs a ModelConfig, got {type(cfg).__name__}")
        _check_backend(cfg.mamba_backend)
        self.config = cfg
        body_kw = dict(
            d_state=cfg.d_state,
            d_conv=cfg.d_conv,
            expand=cfg.expand,
            backend=cfg.mamba_backend,
            heads=cfg.attn_heads,
        )
        self.encoder = DualStreamEncoder(cfg.channels, cfg.diff, cfg.se_reduction)
        self.projections = nn.ModuleList(
            LevelProjection(cfg.encoder_channels(k)) for k in range(1, NUM_LEVELS + 1)
        )
        self.decoders = nn.ModuleList(
            DecoderBlock(cfg.encoder_channels(k), cfg.level_block, **body_kw) for k in range(1, NUM_LEVELS)
        )
        self.sir = SubstrateIterativeRefinement(
            DecoderBlock(cfg.encoder_channels(NUM_LEVELS), cfg.sir_block, **body_kw),
            iters=cfg.sir_iters,
            integrate=cfg.diff,
            int_steps=cfg.int_steps,
        )
        # Activations live in channels-last memory format (channels innermost): oneDNN's
        # convolutions are faster on it, the Mamba layer's token view is free and the fast
        # per-voxel kernels of psmamba.nn.fast need it. Conv weights in that format make every
        # convolution, the first one on a 1-channel image included, produce it. 1x1x1 kernels
        # run as GEMMs on a reshaped weight and keep plain strides (their gradients come back
        # plain; DDP wants each gradient in its parameter's layout). Parameter values, names
        # and checkpoints are unchanged.
        for m in self.modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1):
                m.weight.data = m.weight.data.contiguous(memory_format=CHANNELS_LAST)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        # the coarsest grid of a 16-voxel axis would be one voxel, where instance norm is undefined
        check_pair(moving, fixed, PAD_MULTIPLE)

    def _integrate(self, w: torch.Tensor) -> torch.Tensor:
        return spatial.integrate_svf(w, steps=self.config.int_steps) if self.config.diff else w

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Register ``moving`` onto ``fixed``.

        Args:
            moving: ``(B, 1, D, H, W)`` float image (any D, H, W; at least one above 16).
            fixed: ``(B, 1, D, H, W)``, same shape.

        Returns:
            :class:`RegistrationOutput` ``(warped (B, 1, D, H, W), ddf (B, 3, D, H, W))``.
        """
        self._check_inputs(moving, fixed)
        moving_p, size = spatial.pad_to_multiple(moving, PAD_MULTIPLE)
        fixed_p, _ = spatial.pad_to_multiple(fixed, PAD_MULTIPLE)
        moving_p = moving_p.contiguous(memory_format=CHANNELS_LAST)
        fixed_p = fixed_p.contiguous(memory_format=CHANNELS_LAST)

        fixed_feats, moving_feats = self.encoder(fixed_p, moving_p)  # 5 levels each, finest first
        proj5 = self.projections[NUM_LEVELS - 1]
        phi = self.sir(proj5(fixed_feats[-1]), proj5(moving_feats[-1]))  # (B, 3) on the 1/16 grid

        flow = phi
        for k in range(NUM_LEVELS - 1, 0, -1):  # levels 4, 3, 2, 1
            flow = spatial.upsample_ddf(flow)  # level k+1 -> level k grid, vectors x2
            proj = self.projections[k - 1]
            m = spatial.warp(moving_feats[k - 1], flow)  # raw moving features warped first, then projected
            w = self._integrate(self.decoders[k - 1](proj(fixed_feats[k - 1]), proj(m)))
            flow = spatial.compose(flow, w)  # T_k(flow, w) + w

        ddf = spatial.crop_to(flow, size).contiguous()
        warped = spatial.warp(moving, ddf)
        return RegistrationOutput(warped=warped, ddf=ddf)

    def set_mamba_backend(self, backend: str) -> None:
        """Switch the selective-scan backend of every Mamba layer (weights are unchanged)."""
        from psmamba.nn.mamba import Mamba

        _check_backend(backend)
        self.config = self.config.replace(mamba_backend=backend)
        for m in self.modules():
            if isinstance(m, Mamba):
                m.backend = backend

    # ------------------------------------------------------------------ introspection
    def parameter_breakdown(self) -> dict[str, int]:
        """Trainable parameters per part (the spec's section 6 lists the same parts).

        Keys: ``encoder``, ``projections``, ``decoder_level1`` .. ``decoder_level5`` (level 5 =
        the shared SIR block, counted once), ``level5_sfe``, ``mamba_layers`` (all Mamba layers,
        their LayerNorms excluded), ``total``.
        """

        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad)

        out = {"encoder": count(self.encoder), "projections": count(self.projections)}
        for k in range(1, NUM_LEVELS):
            out[f"decoder_level{k}"] = count(self.decoders[k - 1])
        out[f"decoder_level{NUM_LEVELS}"] = count(self.sir.block)
        out["level5_sfe"] = sum(count(m) for m in self.sir.block.modules() if isinstance(m, SFE))
        from psmamba.nn.mamba import Mamba

        out["mamba_layers"] = sum(count(m) for m in self.modules() if isinstance(m, Mamba))
        out["total"] = count(self)
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"channels={c.channels}, sir_iters={c.sir_iters}, diff={c.diff}, "
            f"sir_block={c.sir_block!r}, level_block={c.level_block!r}"
        )
