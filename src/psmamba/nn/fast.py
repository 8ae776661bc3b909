"""Channels-last fast paths for the model's per-voxel steps, with PyTorch fallbacks.

The model keeps its activations in ``torch.channels_last_3d`` memory format (channels
innermost). That makes the token view of the Mamba layer free, turns 1x1x1 convolutions into
one GEMM over the voxels, and lets the numba kernels of :mod:`psmamba.nn._fast_cpu` run
instance norm + activation, the level projection and trilinear warping in one or two passes
during inference on the CPU.

Each function here returns the same numbers as its plain PyTorch statement (to float
rounding) and falls back to that statement whenever the fast path does not apply: autograd
on, a CUDA tensor, a dtype other than float32/float64, channels-first data, or the runtime
setting ``fast_cpu`` off (``psmamba.runtime.use(fast_cpu=False)``, or ``PSMAMBA_FAST_CPU=0`` in
the environment; the tests compare both paths this way).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from psmamba import runtime

__all__ = [
    "CHANNELS_LAST",
    "avg_pool2",
    "instance_norm_act",
    "instance_norm_cl",
    "level_projection",
    "pointwise_conv",
    "pointwise_mlp",
    "warp_trilinear_cpu",
]

CHANNELS_LAST = torch.channels_last_3d


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    if not runtime.current().fast_cpu:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
            return False
        if grad and t.requires_grad:
            return False
    return True


def _is_cl(x: torch.Tensor) -> bool:
    return x.ndim == 5 and x.is_contiguous(memory_format=CHANNELS_LAST)


def _numba_threads():
    """Context that runs the numba kernels on as many threads as torch may use."""
    from psmamba.nn._numba import NumbaThreads, threads

    return NumbaThreads(threads())


def _chunks(length: int) -> int:
    """Slabs of voxels per batch item for the norm kernels: a few per thread, at least 4096
    voxels each (parallel work granularity; the float64 sums make any split equally exact)."""
    from psmamba.nn._numba import threads

    return max(1, min(8 * threads(), length // 4096))


def instance_norm_act(
    x: torch.Tensor, act: nn.Module | None = None, eps: float = 1e-5, inplace: bool = False
) -> torch.Tensor:
    """``act(instance_norm(x))`` (no affine, biased variance, as ``nn.InstanceNorm3d``).

    ``act``: ``None``, ``nn.ReLU`` or ``nn.LeakyReLU`` take the fused path; any other module
    is applied after the plain norm. ``inplace=True`` lets the fast path overwrite ``x``
    (callers pass it for a temporary they own).
    """
    kind = None
    slope = 0.0
    if act is None:
        kind = 0
    elif type(act) is nn.ReLU:
        kind = 1
    elif type(act) is nn.LeakyReLU:
        kind, slope = 2, float(act.negative_slope)
    length = math.prod(x.shape[2:]) if x.ndim == 5 else 0
    if kind is None or not _is_cl(x) or length < 2 or not _kernel_ok(x):
        y = instance_norm_cl(x, eps) if _norm_keeps_layout(x) else F.instance_norm(x, eps=eps)
        return y if act is None else act(y)
    from psmamba.nn._fast_cpu import norm_apply_kernel, norm_stats_kernel, tile_width

    b, c = x.shape[:2]
    xv = x.detach().permute(0, 2, 3, 4, 1).reshape(b, length, c)  # a view: x is channels-last
    out = x if inplace else torch.empty_like(x)
    ov = out.detach().permute(0, 2, 3, 4, 1).reshape(b, length, c)
    mean = torch.empty(b, c, dtype=torch.float64)
    rstd = torch.empty(b, c, dtype=torch.float64)
    nchunk, width = _chunks(length), tile_width(c)
    with _numba_threads():
        norm_stats_kernel(xv.numpy(), nchunk, width, mean.numpy(), rstd.numpy(), float(eps))
        norm_apply_kernel(
            xv.numpy(), mean.to(x.dtype).numpy(), rstd.to(x.dtype).numpy(), kind, slope, nchunk, width, ov.numpy()
        )
    return out


def _norm_keeps_layout(x: torch.Tensor) -> bool:
    """Whether the plain (autograd / GPU) instance norm of ``x`` runs as :func:`instance_norm_cl`:
    for channels-last data off the CPU (a seam: tests fake it on the CPU).

    ``F.instance_norm`` makes its input contiguous (channels-first) and returns that layout,
    so the next convolution, whose weights are channels-last, converts back: two copies of the
    activation per norm. The flip costs on the CPU too (benchmarks/README.md, "Kernel-level
    figures"), but the CPU path keeps ``F.instance_norm``: its rounding differs from batch
    norm's, and the recorded golden training run (tests/engine/test_golden.py) pins it.
    """
    return _is_cl(x) and x.device.type != "cpu"


def instance_norm_cl(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.instance_norm(x, eps=eps)`` (no affine, biased variance) that keeps channels-last.

    Instance norm of one sample is batch norm in training mode without running statistics,
    and PyTorch's batch norm keeps the channels-last layout (native CUDA and CPU kernels); a
    batch runs sample by sample (each slice ``x[i:i+1]`` of a channels-last batch is itself
    channels-last). Works with autograd. ``x``: ``(B, C, D, H, W)``.
    """
    if x.shape[0] == 1:
        return F.batch_norm(x, None, None, training=True, eps=eps)
    return torch.cat([F.batch_norm(x[i : i + 1], None, None, training=True, eps=eps) for i in range(x.shape[0])])


def pointwise_conv(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` for a 1x1x1 ``conv``; on channels-last ``x`` one GEMM over the voxels
    (oneDNN's 1x1x1 path was several times slower on millions of voxels). Works with autograd."""
    if conv.kernel_size != (1, 1, 1) or conv.groups != 1 or not _is_cl(x):
        return conv(x)
    w = conv.weight.reshape(conv.out_channels, conv.in_channels)
    return F.linear(x.permute(0, 2, 3, 4, 1), w, conv.bias).permute(0, 4, 1, 2, 3)


def pointwise_mlp(x: torch.Tensor, conv1: nn.Conv3d, act: nn.Module, conv2: nn.Conv3d, chunk: int = 16384) -> torch.Tensor:
    """``conv2(act(conv1(x)))`` for 1x1x1 convolutions (the SMB's MLP).

    In inference on channels-last CPU data the voxels go through in chunks of ``chunk``, so
    the 2x wider hidden activations stay in cache instead of making a round trip through
    memory (benchmarks/README.md has the figure).
    """
    if not (_is_cl(x) and _kernel_ok(x, conv1.weight, conv2.weight)) or x.dtype != conv1.weight.dtype:
        return pointwise_conv(act(pointwise_conv(x, conv1)), conv2)
    b, c = x.shape[:2]
    length = math.prod(x.shape[2:])
    tokens = x.permute(0, 2, 3, 4, 1).reshape(b, length, c)  # views: x is channels-last
    out = torch.empty(
        b, conv2.out_channels, *x.shape[2:], dtype=x.dtype
    ).contiguous(memory_format=CHANNELS_LAST)
    out_t = out.permute(0, 2, 3, 4, 1).reshape(b, length, conv2.out_channels)
    w1 = conv1.weight.reshape(conv1.out_channels, conv1.in_channels)
    w2t = conv2.weight.reshape(conv2.out_channels, conv2.in_channels).t()
    b2 = conv2.bias if conv2.bias is not None else torch.zeros(conv2.out_channels, dtype=x.dtype)
    for i in range(b):
        for s in range(0, length, chunk):
            hidden = act(F.linear(tokens[i, s : s + chunk], w1, conv1.bias))
            torch.addmm(b2, hidden, w2t, out=out_t[i, s : s + chunk])
    return out


def level_projection(x: torch.Tensor, linear: nn.Linear, norm: nn.Module) -> torch.Tensor | None:
    """The fused ``norm(linear(x))`` of :class:`~psmamba.nn.blocks.LevelProjection` (``norm`` its
    RMSNorm, gain ``1 + weight``) on channels-last ``x``, or ``None`` when the fast path does
    not apply."""
    if not _is_cl(x) or not _kernel_ok(x, linear.weight, norm.weight) or linear.weight.dtype != x.dtype:
        return None
    gain, eps = 1.0 + norm.weight, norm.eps
    from psmamba.nn._fast_cpu import proj_rms_kernel

    c = x.shape[1]
    out = torch.empty_like(x)
    xv = x.detach().permute(0, 2, 3, 4, 1).reshape(-1, c)
    ov = out.permute(0, 2, 3, 4, 1).reshape(-1, linear.out_features)
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, dtype=x.dtype)
    with _numba_threads():
        proj_rms_kernel(
            xv.numpy(), linear.weight.detach().contiguous().numpy(), bias.detach().contiguous().numpy(),
            gain.detach().to(x.dtype).contiguous().numpy(), float(eps), ov.numpy(),
        )
    return out


def avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool3d(x, 2)``; on channels-last CPU data in inference by a numba kernel
    (PyTorch's channels-last pooling was several times slower than its channels-first one)."""
    if not _is_cl(x) or not _kernel_ok(x) or min(x.shape[2:]) < 2:
        return F.avg_pool3d(x, 2)
    from psmamba.nn._fast_cpu import avg_pool2_kernel

    b, c, d, h, w = x.shape
    out = torch.empty(b, c, d // 2, h // 2, w // 2, dtype=x.dtype).contiguous(memory_format=CHANNELS_LAST)
    with _numba_threads():
        avg_pool2_kernel(x.detach().permute(0, 2, 3, 4, 1).numpy(), out.permute(0, 2, 3, 4, 1).numpy())
    return out


def warp_trilinear_cpu(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor | None:
    """Trilinear warp with zeros outside by the numba kernel, or ``None`` when it does not apply.

    ``image (B, C, D, H, W)`` float, ``ddf (B or 1, 3, D, H, W)`` voxels, both on the CPU,
    no autograd. The result has ``image``'s memory format.
    """
    if not _kernel_ok(image, ddf) or image.dtype != ddf.dtype:
        return None
    from psmamba.nn._fast_cpu import warp_kernel

    out = torch.empty_like(image)  # keeps channels-last / channels-first
    with _numba_threads():
        warp_kernel(
            image.detach().permute(0, 2, 3, 4, 1).numpy(),
            ddf.detach().permute(0, 2, 3, 4, 1).numpy(),
            out.permute(0, 2, 3, 4, 1).numpy(),
        )
    return out


class AvgPool2(nn.AvgPool3d):
    """``nn.AvgPool3d(2)`` with the channels-last fast path of :func:`avg_pool2`."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool2(x)
