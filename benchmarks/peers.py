"""The methods the benchmarks compare, all behind one interface: ``forward(moving, fixed) -> (warped, ddf)``.

Every method is an ``nn.Module`` whose forward takes ``moving``, ``fixed`` ``(B, 1, D, H, W)``
and returns :class:`psmamba.models.RegistrationOutput` ``(warped, ddf)`` with ``ddf``
``(B, 3, D, H, W)`` in voxels of the fixed grid, psmamba's convention (channel ``i`` along
spatial axis ``i``; fixed voxel ``p`` takes the moving value at ``p + ddf(p)``). So
:func:`psmamba.engine.register.register_pair` and
:func:`psmamba.engine.evaluate.evaluate_pairs` score all of them the same way.

=================  ==========================================================================
name               what it is
=================  ==========================================================================
``paper``          PSMamba-Net, the paper's model (:func:`psmamba.models.build_model`)
``paper_diff``     its diffeomorphic ``_diff`` variant
``baseline_conv``  the paper's ablation baseline (plain conv decoder, no refinement)
``voxelmorph``     MONAI's ``VoxelMorph`` with its defaults (the CNN peer; VoxelMorph-diff:
                   UNet (16, 32, 32, 32, 32, 32), 7 scaling-and-squaring steps)
``paper_mambapy``  ``paper`` with every Mamba layer replaced by a ``mambapy`` ``MambaBlock``
                   of the same size carrying the SAME weights (the pure-PyTorch Mamba peer:
                   same network, only the Mamba implementation differs)
``ants_syn``       ANTs SyN through ``antspyx`` (``type_of_transform="SyN"``, its defaults:
                   affine + SyN with mutual information; the classical peer)
``transmorph``,    the paper's learned peers, psmamba's own implementations
``im2grid``, ...   (:data:`psmamba.models.peers.PEERS`, built with
                   :func:`psmamba.models.build_model`): ``transmorph``, ``im2grid``,
                   ``prnet_pp``, ``modet``, ``pivit``, ``mambamorph``, ``mambamorph_feat``,
                   ``transmatch``, and ``voxelmorph_psmamba`` (psmamba's ``voxelmorph`` peer,
                   renamed here because ``voxelmorph`` is MONAI's network above)
=================  ==========================================================================

``mambapy`` and ``antspyx`` are optional (``pip install mambapy antspyx``); :func:`available`
says whether a method can run here and why not.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from psmamba.errors import PsmambaError

__all__ = [
    "METHODS",
    "LEARNED",
    "PSMAMBA_PRESETS",
    "PEER_NETS",
    "available",
    "build_method",
    "VoxelMorphPeer",
    "AntsSyN",
    "mambapy_block_like",
    "swap_in_mambapy",
]

#: name -> human-readable label (table rows), in the order the tables list them
METHODS: dict[str, str] = {
    "paper": "PSMamba-Net (paper)",
    "paper_diff": "PSMamba-Net (paper_diff)",
    "baseline_conv": "conv baseline (baseline_conv)",
    "voxelmorph": "VoxelMorph (MONAI)",
    "paper_mambapy": "PSMamba-Net + mambapy layers",
    "ants_syn": "ANTs SyN (antspyx)",
    "transmorph": "TransMorph (psmamba peer)",
    "im2grid": "Im2Grid (psmamba peer)",
    "prnet_pp": "PR++ (psmamba peer)",
    "modet": "ModeT (psmamba peer)",
    "pivit": "PIViT (psmamba peer)",
    "mambamorph": "MambaMorph (psmamba peer)",
    "mambamorph_feat": "MambaMorph-Feat (psmamba peer)",
    "transmatch": "TransMatch (psmamba peer)",
    "voxelmorph_psmamba": "VoxelMorph (psmamba peer)",
}
#: the psmamba presets among the methods
PSMAMBA_PRESETS = ("paper", "paper_diff", "baseline_conv")
#: benchmark method name -> name of the comparison network in :data:`psmamba.models.peers.PEERS`
#: (psmamba's ``voxelmorph`` peer is ``voxelmorph_psmamba`` here: ``voxelmorph`` is MONAI's)
PEER_NETS: dict[str, str] = {
    "transmorph": "transmorph",
    "im2grid": "im2grid",
    "prnet_pp": "prnet_pp",
    "modet": "modet",
    "pivit": "pivit",
    "mambamorph": "mambamorph",
    "mambamorph_feat": "mambamorph_feat",
    "transmatch": "transmatch",
    "voxelmorph_psmamba": "voxelmorph",
}
#: methods with weights (trainable; they have a training step and FLOPs)
LEARNED = ("paper", "paper_diff", "baseline_conv", "voxelmorph", "paper_mambapy", *PEER_NETS)

_PAD = 16  # both networks halve the grid four times


def available(name: str) -> tuple[bool, str]:
    """``(True, "")`` when method ``name`` can run in this environment, else ``(False, reason)``."""
    if name not in METHODS:
        return False, f"unknown method {name!r}; choose from {', '.join(METHODS)}"
    if name == "paper_mambapy" and importlib.util.find_spec("mambapy") is None:
        return False, "mambapy is not installed (pip install mambapy)"
    if name == "ants_syn" and importlib.util.find_spec("ants") is None:
        return False, "antspyx is not installed (pip install antspyx)"
    return True, ""


# --------------------------------------------------------------------------- VoxelMorph
class VoxelMorphPeer(nn.Module):
    """MONAI's ``VoxelMorph`` behind psmamba's interface.

    MONAI's UNet needs sides divisible by 16, so the pair is zero-padded at the far end to a
    multiple of 16 (:func:`psmamba.spatial.pad_to_multiple`, exactly as PSMamba-Net pads) and
    the field is cropped back; the moving image is then warped with :func:`psmamba.spatial.warp`
    (MONAI's ``Warp`` and ``DVF2DDF`` use the same voxel convention; psmamba's spatial tests
    check that).

    Args:
        **kwargs: passed to ``monai.networks.nets.VoxelMorph`` (default: MONAI's defaults).

    Shapes: ``moving``, ``fixed`` ``(B, 1, D, H, W)`` -> ``warped`` same, ``ddf`` ``(B, 3, D, H, W)``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        from monai.networks.nets import VoxelMorph

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's Warp warns that it uses torch's grid_sample
            self.net = VoxelMorph(**kwargs)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
        from psmamba.models import RegistrationOutput
        from psmamba.spatial import crop_to, pad_to_multiple, warp

        if moving.ndim != 5 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(f"VoxelMorphPeer: moving and fixed must be (B, 1, D, H, W) alike, got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
        m, size = pad_to_multiple(moving, _PAD)
        f, _ = pad_to_multiple(fixed, _PAD)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's "Using PyTorch native grid_sample" on every call
            _, ddf = self.net(m, f)
        ddf = crop_to(ddf, size)
        return RegistrationOutput(warped=warp(moving, ddf), ddf=ddf)


# --------------------------------------------------------------------------- mambapy
def mambapy_block_like(layer: nn.Module, copy_weights: bool = True) -> nn.Module:
    """A ``mambapy.mamba.MambaBlock`` with the sizes (and, by default, the weights) of a psmamba ``Mamba``.

    Both follow ``mamba_ssm``'s parameter names and shapes (``in_proj``, ``conv1d``, ``x_proj``,
    ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so the state dict moves over with
    ``strict=True`` and the two layers compute the same function.

    Shapes: the block maps ``(B, L, d_model) -> (B, L, d_model)`` like the layer it copies.
    """
    from mambapy.mamba import MambaBlock, MambaConfig

    cfg = MambaConfig(
        d_model=layer.d_model, n_layers=1, dt_rank=layer.dt_rank, d_state=layer.d_state,
        expand_factor=layer.expand, d_conv=layer.d_conv,
        bias=layer.in_proj.bias is not None, conv_bias=layer.conv1d.bias is not None,
        pscan=True, use_cuda=False,  # the pure-PyTorch parallel scan: the peer being measured
    )
    block = MambaBlock(cfg)
    if copy_weights:
        block.load_state_dict(layer.state_dict(), strict=True)
    return block.to(device=layer.A_log.device, dtype=layer.A_log.dtype)


class MambapyLayer(nn.Module):
    """A mambapy block behind psmamba's Mamba layer calls: ``layer(x)`` is ``block(x)`` on the
    whole sequence (mambapy has no chunked inference), and :meth:`forward_chunk` runs that on
    one piece holding the whole sequence (:meth:`chunk_length` is always the full length).

    Shapes: ``(B, L, d_model)`` -> same.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)

    def chunk_length(self, x, training: bool) -> int:
        return x.shape[1]

    def forward_chunk(self, x, state=None):
        if state is not None:
            raise ValueError("the mambapy peer runs a sequence in one piece; it carries no state")
        return self.block(x), None


def swap_in_mambapy(model: nn.Module, copy_weights: bool = True) -> int:
    """Replace every :class:`psmamba.nn.mamba.Mamba` inside ``model`` by a mambapy block
    (in a :class:`MambapyLayer`), in place.

    Returns:
        How many layers were replaced.
    """
    from psmamba.nn.mamba import Mamba

    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, Mamba)]
    for parent, name, child in targets:
        setattr(parent, name, MambapyLayer(mambapy_block_like(child, copy_weights=copy_weights)))
    return len(targets)


# --------------------------------------------------------------------------- ANTs
class AntsSyN(nn.Module):
    """ANTs SyN (``antspyx``) as a module: ``forward(moving, fixed) -> (warped, ddf)``.

    Each call runs ``ants.registration(fixed, moving, type_of_transform)`` on the pair (batch
    items one by one), composes the resulting transforms (affine + SyN warp) into ONE
    displacement field with ``ants.apply_transforms(..., compose=...)``, and converts it from
    ANTs' physical millimetres to psmamba's voxels of the fixed grid. The images are handed
    to ANTs with ``spacing`` (mm) and an identity direction, so the conversion is a division
    by the spacing per axis. The returned ``warped`` is the moving image warped by that field
    with :func:`psmamba.spatial.warp` (it matches ANTs' own resampling to float32 precision).

    No gradients, no parameters. ``threads`` sets ITK's thread count (ANTs reads
    ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` at each call); ``seed`` fixes the random sampling
    of the affine stage.

    Shapes: ``(B, 1, D, H, W)`` -> ``warped`` ``(B, 1, D, H, W)``, ``ddf`` ``(B, 3, D, H, W)``.
    """

    def __init__(self, spacing: Sequence[float] | float = 1.0, type_of_transform: str = "SyN",
                 threads: int | None = None, seed: int | None = 1, **ants_kwargs: Any) -> None:
        super().__init__()
        sp = [float(spacing)] * 3 if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
        if len(sp) != 3 or min(sp) <= 0:
            raise PsmambaError(f"AntsSyN: spacing must be three positive numbers, got {spacing}")
        self.spacing = tuple(sp)
        self.type_of_transform = type_of_transform
        self.threads = threads
        self.seed = seed
        self.ants_kwargs = ants_kwargs
        self.last_seconds: float = 0.0  # the ANTs calls of the last forward

    def extra_repr(self) -> str:
        return f"type_of_transform={self.type_of_transform!r}, spacing={self.spacing}, threads={self.threads}"

    def _register_one(self, moving, fixed):
        import ants
        import numpy as np

        if self.threads:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(self.threads))
        if self.seed is not None:
            # what ants.config.set_ants_deterministic does, without forcing one thread
            ants.config._random_seed = int(self.seed)
        fi = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32), spacing=self.spacing)
        mi = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32), spacing=self.spacing)
        with tempfile.TemporaryDirectory(prefix="psmamba-ants-") as tmp:
            reg = ants.registration(fi, mi, type_of_transform=self.type_of_transform,
                                    outprefix=os.path.join(tmp, "reg_"), **self.ants_kwargs)
            field_file = ants.apply_transforms(fi, mi, reg["fwdtransforms"], compose=os.path.join(tmp, "comp_"))
            field = ants.image_read(field_file).numpy()  # (D, H, W, 3) in mm, physical axis i = array axis i
        ddf = np.moveaxis(field, -1, 0) / np.asarray(self.spacing, dtype=np.float32)[:, None, None, None]
        return np.ascontiguousarray(ddf, dtype=np.float32)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
        from psmamba.models import RegistrationOutput
        from psmamba.spatial import warp

        if moving.ndim != 5 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(f"AntsSyN: moving and fixed must be (B, 1, D, H, W) alike, got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
        t0 = time.perf_counter()
        fields = [
            torch.from_numpy(self._register_one(m[0].detach().cpu().float().numpy(), f[0].detach().cpu().float().numpy()))
            for m, f in zip(moving, fixed)
        ]
        self.last_seconds = time.perf_counter() - t0
        ddf = torch.stack(fields).to(device=moving.device, dtype=moving.dtype)
        return RegistrationOutput(warped=warp(moving, ddf), ddf=ddf)


# --------------------------------------------------------------------------- factory
def build_method(name: str, *, seed: int = 0, spacing: Sequence[float] | float = 1.0,
                 threads: int | None = None, mamba_backend: str = "auto") -> nn.Module:
    """A freshly initialised method (on the CPU; move it with ``.to(device)``).

    Args:
        name: one of :data:`METHODS`.
        seed: torch seed for the initial weights (the same seed gives the same weights, so
            ``paper`` and ``paper_mambapy`` built with one seed share every weight).
        spacing: voxel size in mm, for ANTs (the networks work in voxels).
        threads: ITK threads for ANTs (default: ITK's own choice).
        mamba_backend: selective-scan backend of psmamba's Mamba layers.

    Raises:
        PsmambaError: unknown method, or its optional package is missing.
    """
    ok, why = available(name)
    if not ok:
        raise PsmambaError(f"benchmark method {name}: {why}")
    torch.manual_seed(seed)
    if name in PSMAMBA_PRESETS or name == "paper_mambapy":
        from psmamba.models import build_model

        model = build_model("paper" if name == "paper_mambapy" else name, mamba_backend=mamba_backend)
        if name == "paper_mambapy":
            swap_in_mambapy(model)
        return model
    if name == "voxelmorph":
        return VoxelMorphPeer()
    if name in PEER_NETS:
        from psmamba.models import build_model

        net = PEER_NETS[name]
        return build_model(net, mamba_backend=mamba_backend) if net.startswith("mambamorph") else build_model(net)
    return AntsSyN(spacing=spacing, threads=threads)
