"""Training losses: image similarity, field regularisers and a soft Dice for label supervision.

Every loss is a ``torch.nn.Module`` whose ``forward`` returns a scalar tensor to *minimise*,
computed on the device and in the dtype of its inputs (no kernels fixed at construction).

* :class:`LNCC` -- local normalised cross-correlation in the paper's (VoxelMorph) form,
  returned NEGATED (``-1`` is a perfect local linear match, ``0`` no correlation).
* :class:`MSE` -- mean squared intensity difference.
* :class:`Diffusion` -- the paper's gradient-L2 regulariser of a displacement field.
* :class:`BendingEnergy` -- second-derivative regulariser of a displacement field.
* :class:`DiceLoss` -- ``1 - soft Dice`` on one-hot labels / class probabilities.
* :class:`MutualInformation` -- Mattes-style mutual information with cubic B-spline Parzen
  windows (differentiable), returned NEGATED; for images of different modalities.

Fields are ``(B, 3, D, H, W)`` in voxels (see :mod:`psmamba.spatial`), so the regularisers
are in voxel units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from psmamba.errors import PsmambaError, check_on_device

__all__ = ["LNCC", "MSE", "Diffusion", "BendingEnergy", "DiceLoss", "MutualInformation", "one_hot", "box_sum"]


def _check_volume(x: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(x):
        raise PsmambaError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 5:
        raise PsmambaError(f"{name} must have shape (B, C, D, H, W), got {tuple(x.shape)}")


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    _check_volume(a, names[0])
    _check_volume(b, names[1])
    if a.shape != b.shape:
        raise PsmambaError(
            f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same shape"
        )


def _check_field(ddf: torch.Tensor, name: str = "ddf") -> None:
    _check_volume(ddf, name)
    if ddf.shape[1] != 3:
        raise PsmambaError(f"{name} must have shape (B, 3, D, H, W), got {tuple(ddf.shape)}")


def _window_sum_along(x: torch.Tensor, window: int, axis: int) -> torch.Tensor:
    """Zero-padded sums of ``window`` consecutive voxels along tensor dim ``axis``, same size.

    Sums of 1, 2, 4, 8, ... voxels are built by doubling (``s_2p[i] = s_p[i] + s_p[i + p]``)
    and the window is assembled from the binary digits of its width: 4 additions of shifted
    views for ``window = 9``. Every output is a sum of ``window`` local values, so windows over
    empty (zero) regions come out exactly 0 (running sums / cumsum would leave rounding noise).
    """
    half = window // 2
    pad = [0] * (2 * (x.ndim - 2))
    slot = 2 * (x.ndim - 1 - axis)  # F.pad lists the last dim first
    pad[slot] = pad[slot + 1] = half
    padded = F.pad(x, pad)
    n = x.shape[axis]
    result: torch.Tensor | None = None
    offset, block, power, rest = 0, 1, padded, window
    while rest:
        if rest & 1:  # this block length is a binary digit of the width: add it at ``offset``
            term = power.narrow(axis, offset, n)
            result = term if result is None else result + term
            offset += block
        rest >>= 1
        if rest:
            length = power.shape[axis] - block
            power = power.narrow(axis, 0, length) + power.narrow(axis, block, length)
            block *= 2
    assert result is not None
    return result


class _BoxSum(torch.autograd.Function):
    """Box sum with its own backward: the zero-padded box sum is self-adjoint
    (``<B x, g> = <x, B g>``), so the gradient is the box sum of the incoming gradient -- as
    cheap as the forward, where autograd through the shifted views would scatter into zeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: int) -> torch.Tensor:  # type: ignore[override]
        ctx.window = window
        for axis in (2, 3, 4):
            x = _window_sum_along(x, window, axis)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _BoxSum.apply(grad, ctx.window), None


def box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of ``x`` over a ``window^3`` box centred on every voxel, zeros outside the volume.

    Equal to one ``conv3d`` with a ``ones(window^3)`` kernel and ``padding = window // 2`` (the
    reference code's zero-padded window, ``N = window^3`` voxels including the padding), but
    separable and computed with additions of shifted views: no kernel tensor to place on a
    device, and the backward costs the same as the forward (4-12x faster than separable
    ``avg_pool3d`` or ``conv3d`` on a CPU: ``benchmarks/README.md``).

    Args:
        x: ``(B, C, D, H, W)``; every channel is filtered on its own.
        window: odd box width in voxels.

    Returns:
        ``(B, C, D, H, W)``, same dtype and device as ``x``.
    """
    _check_volume(x, "x")
    if int(window) != window or window < 1 or window % 2 == 0:
        raise PsmambaError(f"box window must be a positive odd integer, got {window}")
    return _BoxSum.apply(x, int(window))


class LNCC(nn.Module):
    """Negative local normalised cross-correlation with a box window (the paper's similarity).

    For each voxel, over the ``window^3`` box around it (zero padding outside the volume,
    ``N = window^3`` always, as in the reference code)::

        cross = sum(I J) - sum(I) sum(J) / N      (N times the local covariance)
        var_I = sum(I^2) - sum(I)^2 / N           (N times the local variance)
        cc    = cross^2 / (var_I * var_J + eps)
        loss  = -mean(cc)   over batch, channels and voxels

    ``cc`` is the squared local correlation coefficient (in [0, 1] away from flat regions),
    so the loss lies in [-1, 0] and lower is better.

    Relation to MONAI's ``LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular")``:
    MONAI computes the same window sums but smooths differently,
    ``(cross^2 + smooth_nr) / (max(var_I, smooth_dr) * max(var_J, smooth_dr))``.
    Where both local variances are well above ``eps`` the two agree to
    ``eps / (var_I var_J)`` relative; in flat windows (``var ~ 0``) they differ.

    Args:
        window: odd box width in voxels (paper: 9).
        eps: added to the denominator (paper: 1e-5).
    """

    def __init__(self, window: int = 9, eps: float = 1e-5) -> None:
        super().__init__()
        if int(window) != window or window < 1 or window % 2 == 0:
            raise PsmambaError(f"LNCC window must be a positive odd integer, got {window}")
        self.window = int(window)
        self.eps = float(eps)

    def local_cc(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The per-voxel squared correlation ``cc`` map, ``(B, C, D, H, W)``."""
        _check_pair(pred, target, ("pred", "target"))
        n = float(self.window**3)
        dtype = pred.dtype
        if dtype == torch.float16:  # its 10-bit mantissa cancels var = S_II - S_I^2 / n to 0 or below: NaN
            pred, target = pred.float(), target.float()
        # one filtering pass for the five moments: stack them along the channel axis
        c = pred.shape[1]
        moments = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
        sums = box_sum(moments, self.window)
        s_p, s_t, s_pp, s_tt, s_pt = torch.split(sums, c, dim=1)
        cross = s_pt - s_p * s_t / n
        var_p = s_pp - s_p * s_p / n
        var_t = s_tt - s_t * s_t / n
        return (cross * cross / (var_p * var_t + self.eps)).to(dtype)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred``, ``target``: ``(B, C, D, H, W)`` (warped and fixed). Returns ``-mean(cc)``."""
        return -self.local_cc(pred, target).mean()

    def extra_repr(self) -> str:
        return f"window={self.window}, eps={self.eps}"


class MSE(nn.Module):
    """Mean squared difference ``mean((pred - target)^2)`` of two ``(B, C, D, H, W)`` volumes."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, ("pred", "target"))
        return (pred - target).pow(2).mean()


class Diffusion(nn.Module):
    """The paper's diffusion (gradient-L2) regulariser of a displacement field.

    ``(mean(dD^2) + mean(dH^2) + mean(dW^2)) / 3`` where ``dA`` is the forward difference of
    all three components along axis ``A`` (each mean over its own, one-shorter, grid).
    Input ``ddf``: ``(B, 3, D, H, W)`` in voxels. A constant field scores exactly 0.
    """

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        _check_field(ddf)
        total = ddf.new_zeros(())
        for axis in (2, 3, 4):
            n = ddf.shape[axis]
            if n > 1:  # an axis of one voxel has no difference
                total = total + torch.diff(ddf, dim=axis).pow(2).mean()
        return total / 3.0


class BendingEnergy(nn.Module):
    """Bending energy ``mean( sum_i u_ii^2 + 2 sum_{i<j} u_ij^2 )`` of a displacement field.

    Second derivatives use the compact central stencils
    ``u_ii = u[i+1] - 2 u[i] + u[i-1]`` and
    ``u_ij = (u[i+1, j+1] - u[i+1, j-1] - u[i-1, j+1] + u[i-1, j-1]) / 4``
    (exact for quadratic fields, and not blind to a voxel-scale checkerboard as the wide
    ``((u[i+2] - u[i]) - (u[i] - u[i-2])) / 4`` stencil is). The mean runs over the batch, the
    three components and the interior voxels (one voxel dropped at every face), so the value
    equals MONAI 1.6's ``BendingEnergyLoss()`` (``normalize=False``).

    Input ``ddf``: ``(B, 3, D, H, W)`` in voxels, each spatial size >= 3.
    """

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        _check_field(ddf)
        if min(ddf.shape[2:]) < 3:
            raise PsmambaError(f"BendingEnergy needs at least 3 voxels per axis, got {tuple(ddf.shape[2:])}")
        size = ddf.shape[2:]

        def at(*moves: tuple[int, int]) -> torch.Tensor:
            # u[p + offset] for every interior voxel p (one voxel dropped at every face);
            # ``moves`` are (axis, step) pairs that make up the offset
            off = [0, 0, 0]
            for axis, step in moves:
                off[axis] = step
            idx = [slice(1 + o, n - 1 + o) for o, n in zip(off, size)]
            return ddf[:, :, idx[0], idx[1], idx[2]]

        centre = at()
        energy = torch.zeros_like(centre)
        for i in range(3):
            uii = at((i, 1)) - 2 * centre + at((i, -1))
            energy = energy + uii.pow(2)
            for j in range(i + 1, 3):
                uij = (at((i, 1), (j, 1)) - at((i, 1), (j, -1)) - at((i, -1), (j, 1)) + at((i, -1), (j, -1))) / 4
                energy = energy + 2 * uij.pow(2)
        return energy.mean()


def _compiling() -> bool:
    return getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels ``(B, 1, D, H, W)`` with values in ``[0, num_classes)`` -> float ``(B, K, D, H, W)``."""
    _check_volume(labels, "labels")
    if labels.shape[1] != 1:
        raise PsmambaError(f"labels must have one channel (B, 1, D, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        labels = labels.round()
    labels = labels.long()
    if labels.numel() and labels.device.type == "cpu" and not _compiling():
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise PsmambaError(
                f"label values must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
            )
    elif labels.numel():  # on an accelerator: checked without making the host wait
        check_on_device(((labels >= 0) & (labels < num_classes)).all(), f"label values must lie in [0, {num_classes})")
    out = F.one_hot(labels[:, 0], num_classes)  # (B, D, H, W, K)
    return out.permute(0, 4, 1, 2, 3).to(torch.get_default_dtype())


class DiceLoss(nn.Module):
    """``1 - soft Dice`` for label-supervised registration.

    ``dice_{b,k} = (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over the voxels of
    sample ``b`` and class ``k``; the loss is ``1 - mean_{b,k} dice`` (the MONAI ``DiceLoss``
    formula with ``smooth_nr = smooth_dr = smooth``). A class absent from both ``pred`` and
    ``target`` of a sample scores 1 (no penalty).

    Inputs of ``forward(pred, target)``:
        pred: ``(B, K, D, H, W)`` class probabilities / soft one-hot labels in [0, 1], e.g. the
            one-hot moving labels warped with ``mode="bilinear"`` (differentiable in the field).
        target: ``(B, K, D, H, W)`` one-hot (or soft) fixed labels, or integer labels
            ``(B, 1, D, H, W)`` with values in ``[0, K)`` that are one-hot encoded here.

    Args:
        include_background: keep channel 0 (background) in the mean (default False).
        smooth: the additive smoothing.
    """

    def __init__(self, include_background: bool = False, smooth: float = 1e-5) -> None:
        super().__init__()
        self.include_background = bool(include_background)
        self.smooth = float(smooth)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_volume(pred, "pred")
        _check_volume(target, "target")
        k = pred.shape[1]
        if target.shape[1] == 1 and k > 1:
            target = one_hot(target, k)
        if target.shape != pred.shape:
            raise PsmambaError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
            )
        target = target.to(pred)
        if not self.include_background:
            if k < 2:
                raise PsmambaError("DiceLoss without background needs at least 2 channels in pred")
            pred, target = pred[:, 1:], target[:, 1:]
        dims = (2, 3, 4)
        inter = (pred * target).sum(dims)
        denom = pred.sum(dims) + target.sum(dims)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        return 1 - dice.mean()

    def extra_repr(self) -> str:
        return f"include_background={self.include_background}, smooth={self.smooth}"


def _cubic_bspline(u: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline ``beta3(u)``: support ``|u| < 2``, integral 1, and its integer
    shifts sum to 1 everywhere (a partition of unity), so every sample adds exactly 1 to a histogram."""
    a = u.abs()
    inner = (4 - 6 * a * a + 3 * a * a * a) / 6
    outer = (2 - a).clamp(min=0) ** 3 / 6
    return torch.where(a < 1, inner, outer)


class MutualInformation(nn.Module):
    """Negative mutual information from a Parzen-window joint histogram (Mattes et al. 2003).

    Intensities are expected in [0, 1] (values outside are clamped): ``bins`` histogram bins
    have their centres at ``k / (bins - 1)``, and two more bins on each side receive the tails of
    the windows, so each sample adds exactly 1 to the histogram. Both images use the cubic
    B-spline window ``beta3`` one bin wide (Mattes uses a box window for the fixed image; a
    smooth window on both keeps the loss differentiable in either argument)::

        P[a, b] = sum_x w(x) beta3(u_pred(x) - a) beta3(u_target(x) - b) / sum_x w(x)
        MI      = sum_ab P log(P / (P_pred P_target))
        loss    = -MI        (mean over the batch)

    ``u = (bins - 1) * intensity``. MI is invariant to any one-to-one intensity remapping up to
    the binning, which is why it aligns images of different modalities (MR to CT).

    Args:
        bins: number of intensity bins over [0, 1] (Mattes and ANTs: 32).
        eps: added inside the logarithms (empty bins).
    """

    def __init__(self, bins: int = 32, eps: float = 1e-10) -> None:
        super().__init__()
        if int(bins) != bins or bins < 4:
            raise PsmambaError(f"MutualInformation bins must be an integer >= 4, got {bins}")
        self.bins = int(bins)
        self.eps = float(eps)

    def _windows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N)`` intensities -> the 4 bins each sample touches and their weights.

        Returns ``(first, weights)``: ``first`` ``(B, N)`` long, the index of the first of four
        consecutive bins (of ``bins + 4``), and ``weights`` ``(B, N, 4)`` = ``beta3(u - k)`` for
        those bins (the cubic B-spline basis of the fractional part; rows sum to 1).
        """
        u = x.clamp(0, 1) * (self.bins - 1)
        i = u.detach().floor().clamp(max=self.bins - 2)  # u = bins - 1 falls in the last interval
        t = (u - i).unsqueeze(-1)
        t2, t3 = t * t, t * t * t
        w = torch.cat([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], dim=-1) / 6
        return i.long() + 1, w  # bin k of the padded histogram has centre k - 2; u's bins are i-1 .. i+2

    def joint_histogram(
        self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The normalised joint histogram ``(B, bins + 4, bins + 4)`` (rows: pred, columns: target).

        Each sample touches 4 x 4 bins, which are accumulated with one ``scatter_add`` (16
        products per sample rather than a dense ``N x (bins + 4)`` window matrix per image).
        """
        _check_pair(pred, target, ("pred", "target"))
        b = pred.shape[0]
        k = self.bins + 4
        ip, wp = self._windows(pred.reshape(b, -1))  # channels pooled with the voxels
        it, wt = self._windows(target.reshape(b, -1))
        if weight is None:
            w = pred.new_ones(ip.shape)
        else:
            if not torch.is_tensor(weight) or weight.numel() != pred.numel():
                raise PsmambaError(f"weight must have the shape of pred {tuple(pred.shape)}")
            w = weight.reshape(b, -1).to(pred)
        offs = torch.arange(4, device=pred.device)
        rows = (ip.unsqueeze(-1) + offs).unsqueeze(-1)  # (B, N, 4, 1)
        cols = (it.unsqueeze(-1) + offs).unsqueeze(-2)  # (B, N, 1, 4)
        index = (rows * k + cols).reshape(b, -1)  # (B, 16 N)
        vals = (wp.unsqueeze(-1) * (wt * w.unsqueeze(-1)).unsqueeze(-2)).reshape(b, -1)
        joint = pred.new_zeros(b, k * k).scatter_add(1, index, vals).view(b, k, k)
        total = w.sum(1).clamp(min=self.eps).view(b, 1, 1)
        return joint / total

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pred``, ``target``: ``(B, C, D, H, W)`` in [0, 1]; ``weight``: optional non-negative
        per-voxel weights of the same shape (a mask). Returns ``-MI`` in nats."""
        joint = self.joint_histogram(pred, target, weight)
        p_pred = joint.sum(2)
        p_target = joint.sum(1)
        eps = self.eps
        h_joint = -(joint * torch.log(joint + eps)).sum((1, 2))
        h_pred = -(p_pred * torch.log(p_pred + eps)).sum(1)
        h_target = -(p_target * torch.log(p_target + eps)).sum(1)
        return -(h_pred + h_target - h_joint).mean()

    def extra_repr(self) -> str:
        return f"bins={self.bins}, eps={self.eps}"
