"""Losses: LNCC against numpy and MONAI, regularisers against closed forms, Dice against MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from psmamba.errors import PsmambaError
from psmamba.losses import LNCC, MSE, BendingEnergy, DiceLoss, Diffusion, box_sum, one_hot
from psmamba.spatial import identity_grid, warp


def numpy_lncc_map(i: np.ndarray, j: np.ndarray, window: int, eps: float = 1e-5) -> np.ndarray:
    """The paper's / VoxelMorph's formula, written out with explicit zero-padded window sums.

    ``i``, ``j``: ``(D, H, W)`` float64. Uses the expanded form of the reference code
    (``cross = IJ - u_J I - u_I J + u_I u_J N``) rather than the simplified one in psmamba.
    """
    n = window**3
    h = window // 2

    def wsum(x):
        padded = np.pad(x, h)
        view = np.lib.stride_tricks.sliding_window_view(padded, (window,) * 3)
        return view.sum(axis=(-3, -2, -1))

    i_sum, j_sum = wsum(i), wsum(j)
    i2_sum, j2_sum, ij_sum = wsum(i * i), wsum(j * j), wsum(i * j)
    u_i, u_j = i_sum / n, j_sum / n
    cross = ij_sum - u_j * i_sum - u_i * j_sum + u_i * u_j * n
    i_var = i2_sum - 2 * u_i * i_sum + u_i * u_i * n
    j_var = j2_sum - 2 * u_j * j_sum + u_j * u_j * n
    return cross * cross / (i_var * j_var + eps)


@pytest.mark.parametrize("window", [5, 9])  # 9: two axes shorter than the window
def test_box_sum_equals_full_box_convolution(window, torch_seed):
    x = torch.rand(2, 3, 7, 8, 12, dtype=torch.float64)
    ones = torch.ones(3, 1, window, window, window, dtype=torch.float64)
    expected = F.conv3d(x, ones, padding=window // 2, groups=3)
    assert torch.allclose(box_sum(x, window), expected, atol=1e-10)


def test_box_sum_and_lncc_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_sum(t, 3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: box_sum(t, 3), (x,))
    y = torch.rand(1, 2, 4, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: LNCC(3)(a, b), (x, y))


@pytest.mark.parametrize("window", [9, 5])
def test_lncc_matches_numpy_paper_formula(window, rng):
    i = rng.random((11, 10, 12))
    j = 0.5 * i + rng.random((11, 10, 12))  # partly correlated
    expected = numpy_lncc_map(i, j, window)
    loss = LNCC(window)
    ti, tj = torch.from_numpy(i)[None, None], torch.from_numpy(j)[None, None]
    ours = loss.local_cc(ti, tj)[0, 0].numpy()
    assert np.allclose(ours, expected, rtol=1e-9, atol=1e-12)  # float64: same formula
    assert float(loss(ti, tj)) == pytest.approx(-expected.mean(), rel=1e-9)
    # float32 inputs: the loss value agrees to float32 accuracy
    assert float(loss(ti.float(), tj.float())) == pytest.approx(-expected.mean(), abs=1e-5)


def test_lncc_exact_relation_to_monai(rng):
    """MONAI: cross^2 / (max(vI, eps) max(vJ, eps)); paper: cross^2 / (vI vJ + eps).

    Both use the same zero-padded window sums, so ``ours * (vI vJ + eps)`` and
    ``monai * max(vI, eps) * max(vJ, eps)`` both equal ``cross^2`` at every voxel, even in
    near-flat windows where the two values themselves differ. On textured volumes (window
    variances ~10-60 >> eps) the values agree to ``eps / (vI vJ)`` relative (< 1e-7).
    """
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    monai_loss = LocalNormalizedCrossCorrelationLoss(
        spatial_dims=3, kernel_size=9, kernel_type="rectangular", reduction="none", smooth_nr=0.0, smooth_dr=1e-5
    )
    eps = 1e-5
    i = torch.from_numpy(rng.random((2, 1, 12, 11, 10)))
    j = torch.from_numpy(rng.random((2, 1, 12, 11, 10))) + 0.3 * i
    ours = LNCC(9, eps).local_cc(i, j)
    theirs = -monai_loss(i, j)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    assert float(LNCC(9)(i.float(), j.float())) == pytest.approx(float(monai_loss(i.float(), j.float()).mean()), abs=1e-5)

    # near-flat image: window variances below eps, the two smoothings now differ ...
    flat = 1e-4 * i
    ours = LNCC(9, eps).local_cc(flat, j)
    theirs = -monai_loss(flat, j)
    assert not torch.allclose(ours, theirs, rtol=1e-2)
    # ... but the exact relation through cross^2 still holds
    n = 9**3
    s_i, s_j = box_sum(flat, 9), box_sum(j, 9)
    v_i = box_sum(flat * flat, 9) - s_i * s_i / n
    v_j = box_sum(j * j, 9) - s_j * s_j / n
    lhs = ours * (v_i * v_j + eps)
    rhs = theirs * v_i.clamp_min(eps) * v_j.clamp_min(eps)
    assert torch.allclose(lhs, rhs, rtol=1e-6, atol=1e-20)


def test_lncc_range_and_sign(torch_seed):
    x = torch.rand(1, 1, 10, 10, 10)
    assert float(LNCC()(x, x)) == pytest.approx(-1.0, abs=1e-4)  # identical: perfect match
    y = torch.rand(1, 1, 10, 10, 10)
    assert float(LNCC()(x, x)) < float(LNCC()(x, y)) <= 0.0  # a loss: lower is better
    assert float(LNCC()(x, 2 * x)) == pytest.approx(-1.0, abs=1e-4)  # scale invariant


def test_lncc_gradient_and_dtype(torch_seed):
    x = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64)
    y = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    out = LNCC()(x, y)
    assert out.dtype == torch.float64
    out.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_losses_are_device_agnostic_on_meta_tensors():
    # "meta" tensors have no data: any constant created on a fixed device would fail here
    a = torch.empty(1, 1, 6, 6, 6, device="meta")
    f = torch.empty(1, 3, 6, 6, 6, device="meta", dtype=torch.float64)
    assert LNCC()(a, a).device.type == "meta"
    assert MSE()(a, a).device.type == "meta"
    assert Diffusion()(f).device.type == "meta" and Diffusion()(f).dtype == torch.float64
    assert BendingEnergy()(f).device.type == "meta"
    p = torch.empty(1, 3, 6, 6, 6, device="meta")
    assert DiceLoss()(p, p).device.type == "meta"


def test_lncc_rejects_bad_input():
    with pytest.raises(PsmambaError, match="odd"):
        LNCC(8)
    with pytest.raises(PsmambaError, match="same shape"):
        LNCC()(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(PsmambaError, match=r"\(B, C, D, H, W\)"):
        LNCC()(torch.rand(8, 8), torch.rand(8, 8))


def test_mse():
    a = torch.zeros(1, 1, 2, 2, 2)
    b = torch.full((1, 1, 2, 2, 2), 3.0)
    assert float(MSE()(a, b)) == 9.0
    with pytest.raises(PsmambaError):
        MSE()(a, b[..., :1])


def linear_field(matrix: np.ndarray, shape, dtype=torch.float64) -> torch.Tensor:
    """``u(x) = M x`` on the voxel grid, ``(1, 3, D, H, W)``."""
    grid = identity_grid(shape, dtype=dtype)
    m = torch.as_tensor(matrix, dtype=dtype)
    return torch.einsum("ij,bj...->bi...", m, grid)


def test_diffusion_closed_form_and_reference_formula(rng):
    m = rng.normal(size=(3, 3))
    u = linear_field(m, (5, 6, 7))
    # forward differences of M x are the columns of M: mean over components of M[i, k]^2,
    # summed over k and divided by 3 -> ||M||_F^2 / 9
    assert float(Diffusion()(u)) == pytest.approx((m**2).sum() / 9, rel=1e-12)
    assert float(Diffusion()(torch.ones(2, 3, 4, 4, 4))) == 0.0
    # the reference code's formula on a random field
    r = rng.normal(size=(2, 3, 5, 6, 7))
    d = [np.diff(r, axis=a) for a in (2, 3, 4)]
    expected = sum((x**2).mean() for x in d) / 3.0
    assert float(Diffusion()(torch.from_numpy(r))) == pytest.approx(expected, rel=1e-12)


def quadratic_field(shape, rng) -> tuple[torch.Tensor, np.ndarray]:
    """``u_i(x) = x^T Q_i x / 2`` with symmetric ``Q_i``: Hessian of component i is ``Q_i``."""
    q = rng.normal(size=(3, 3, 3))
    q = (q + q.transpose(0, 2, 1)) / 2
    x = identity_grid(shape, dtype=torch.float64)[0].numpy()  # (3, D, H, W)
    u = 0.5 * np.einsum("ijk,j...,k...->i...", q, x, x)
    return torch.from_numpy(u)[None], q


@pytest.mark.filterwarnings("ignore::UserWarning:monai")  # MONAI's own notices
def test_bending_energy_closed_form_and_monai(rng):
    from monai.losses import BendingEnergyLoss

    u, q = quadratic_field((6, 7, 8), rng)
    # sum_j u_ijj^2 + 2 sum_{j<k} u_ijk^2 = ||Q_i||_F^2, averaged over the 3 components
    expected = (q**2).sum() / 3
    assert float(BendingEnergy()(u)) == pytest.approx(expected, rel=1e-10)
    assert float(BendingEnergy()(linear_field(rng.normal(size=(3, 3)), (5, 5, 5)))) == pytest.approx(0, abs=1e-20)
    r = torch.from_numpy(rng.normal(size=(2, 3, 6, 7, 8)))
    assert float(BendingEnergy()(r)) == pytest.approx(float(BendingEnergyLoss()(r)), rel=1e-10)
    # a voxel-scale checkerboard bends a lot (u_ii = +-4)
    idx = identity_grid((6, 6, 6), dtype=torch.float64).sum(1, keepdim=True)
    checker = ((-1.0) ** idx).expand(1, 3, 6, 6, 6)
    assert float(BendingEnergy()(checker)) == pytest.approx(3 * 16, rel=1e-12)
    with pytest.raises(PsmambaError, match="3 voxels"):
        BendingEnergy()(torch.zeros(1, 3, 2, 5, 5))


def test_dice_loss_matches_monai_and_golden(torch_seed):
    from monai.losses import DiceLoss as MonaiDice

    pred = torch.softmax(torch.randn(2, 4, 6, 6, 6), dim=1)
    target = one_hot(torch.randint(0, 4, (2, 1, 6, 6, 6)), 4)
    ours = DiceLoss()(pred, target)
    theirs = MonaiDice(include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)(pred, target)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
    with_bg = MonaiDice(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(pred, target)
    assert float(DiceLoss(include_background=True)(pred, target)) == pytest.approx(float(with_bg), abs=1e-6)
    # integer targets are one-hot encoded to pred's channel count
    labels = target.argmax(1, keepdim=True)
    assert float(DiceLoss()(pred, labels)) == pytest.approx(float(ours), abs=1e-7)
    # golden: 2x2x2, class 1 predicted on 2 voxels, true on 4, overlap 2 -> dice 2*2/6
    t = torch.zeros(1, 1, 2, 2, 2, dtype=torch.int64)
    t[0, 0, 0] = 1
    p = torch.zeros(1, 2, 2, 2, 2)
    p[0, 1, 0, 0] = 1.0
    p[0, 0] = 1 - p[0, 1]
    assert float(DiceLoss(smooth=0.0)(p, t)) == pytest.approx(1 - 4 / 6, abs=1e-7)
    assert float(DiceLoss()(one_hot(t, 2), t)) == pytest.approx(0.0, abs=1e-7)


def test_dice_loss_drives_the_field():
    # label supervision: warp one-hot moving labels (bilinear) and back-propagate to the field
    moving = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int64)
    moving[..., 2:5, 2:5, 2:5] = 1
    fixed = torch.roll(moving, shifts=1, dims=2)
    ddf = torch.full((1, 3, 8, 8, 8), 0.3, requires_grad=True)
    loss = DiceLoss()(warp(one_hot(moving, 2), ddf), fixed)
    loss.backward()
    assert ddf.grad is not None and ddf.grad.abs().sum() > 0


def test_dice_loss_rejects_bad_input():
    with pytest.raises(PsmambaError, match="same shape"):
        DiceLoss()(torch.rand(1, 3, 4, 4, 4), torch.rand(1, 2, 4, 4, 4))
    with pytest.raises(PsmambaError, match=r"\[0, 3\)"):
        DiceLoss()(torch.rand(1, 3, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 5))


def test_lncc_of_float16_volumes_is_not_nan():
    """Its box-sum variances cancel to zero or below in float16 (NaN for any pair, even equal ones:
    fp16 mixed precision trained on NaN); computed in float32, returned in float16."""
    a = torch.rand(1, 1, 16, 16, 16)
    b = torch.rand(1, 1, 16, 16, 16)
    out = LNCC()(a.half(), b.half())
    assert out.dtype == torch.float16 and torch.isfinite(out)
    assert float(out) == pytest.approx(float(LNCC()(a, b)), abs=2e-3)
    assert float(LNCC()(a.half(), a.half())) == pytest.approx(-1.0, abs=1e-3)
