"""psmamba.deformable: diffeomorphic instance optimisation, its numba kernels against PyTorch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psmamba import deformable as D
from psmamba import metrics, spatial
from psmamba.errors import PsmambaError
from psmamba.losses import LNCC, box_sum

pytest.importorskip("numba")

METHODS = ("greedy", "svf")


def _textured(n: int, seed: int = 0) -> torch.Tensor:
    """Smoothed noise scaled to [0, 1]: structure at every voxel, as LNCC needs."""
    g = torch.Generator().manual_seed(seed)
    x = D.gaussian_smooth(torch.rand(1, 1, n, n, n, generator=g), 1.2, backend="torch")
    return (x - x.min()) / (x.max() - x.min())


def _smooth_map(n: int, amp: float, seed: int = 1) -> torch.Tensor:
    """A smooth diffeomorphism ``exp(v)`` whose velocity peaks at ``amp`` voxels."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    v = torch.nn.functional.interpolate(v, size=(n, n, n), mode="trilinear", align_corners=True)
    v = D.gaussian_smooth(v, 2.0, backend="torch")
    v = v / v.norm(dim=1).max() * amp
    return spatial.integrate_svf(v, 8, padding="border").float()


def _pair(n: int, amp: float):
    fixed = _textured(n)
    true = _smooth_map(n, amp)  # fixed = moving o (id + true): moving = fixed o (id + true)^-1
    moving = spatial.warp(fixed, D.invert_ddf(true, 60, backend="torch"), padding="border")
    return fixed, moving, true


# --------------------------------------------------------------------------- kernels vs torch
@pytest.mark.parametrize("window", [3, 5, 9])
def test_box_sum_kernel_matches_torch(window):
    from psmamba._deformable_cpu import box_sum_kernel

    x = torch.rand(1, 4, 7, 10, 12)
    out, tmp = torch.empty(4, 7, 10, 12), torch.empty(4, 7, 10, 12)
    box_sum_kernel(x[0].numpy(), window // 2, out.numpy(), tmp.numpy())
    torch.testing.assert_close(out, box_sum(x, window)[0], rtol=1e-5, atol=1e-4)
    # x as its own scratch (lncc_force saves memory so): the same sums, x overwritten
    y = x[0].clone()
    same = torch.empty_like(out)
    box_sum_kernel(y.numpy(), window // 2, same.numpy(), y.numpy())
    assert torch.equal(same, out)


@pytest.mark.parametrize("masked", [False, True])
def test_lncc_force_numba_matches_autograd(masked):
    torch.manual_seed(0)
    w, f = torch.rand(1, 1, 9, 11, 13), torch.rand(1, 1, 9, 11, 13) * 3 + 1
    mask = (torch.rand(1, 1, 9, 11, 13) > 0.4).float() if masked else None
    l1, f1 = D.lncc_force(w, f, 5, mask, backend="numba")
    l2, f2 = D.lncc_force(w, f, 5, mask, backend="torch")
    assert l1 == pytest.approx(l2, rel=1e-5)
    torch.testing.assert_close(f1, f2, rtol=1e-4, atol=1e-5)
    if not masked:  # the loss is the project's LNCC
        assert l1 == pytest.approx(float(LNCC(5)(w, f)), rel=1e-5)


def test_lncc_force_is_the_gradient_of_the_summed_loss():
    """force[c] = d(-sum cc)/dI * dI/dx_c: check d/dI against a finite difference, in float64."""
    torch.manual_seed(1)
    w, f = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64), torch.rand(1, 1, 6, 7, 8, dtype=torch.float64)
    _, force = D.lncc_force(w, f, 3, backend="numba")
    gimg = torch.gradient(w[0, 0], dim=(0, 1, 2))
    grad = force[0, 0] / gimg[0]  # recover d(-sum cc)/dI where the image gradient is not tiny
    p = (3, 2, 4)
    h = 1e-6
    wp, wm = w.clone(), w.clone()
    wp[0, 0][p] += h
    wm[0, 0][p] -= h
    total = lambda x: -float(LNCC(3).local_cc(x, f).sum())  # noqa: E731
    assert float(grad[p]) == pytest.approx((total(wp) - total(wm)) / (2 * h), rel=1e-4)


def test_gaussian_kernel_longer_than_a_row_writes_inside_it():
    """A kernel radius beyond the W axis wrote past the row's end (a crash of the whole process
    for --sigma-update 5 on a 32^3 image's 1/4 level): the voxels after each row must stay."""
    import numpy as np

    from psmamba._deformable_cpu import gauss_kernel

    x = np.random.default_rng(0).standard_normal((3, 8, 9, 10)).astype(np.float32)
    k = D.gaussian_taps(6.0).numpy()
    out_buf = np.full((3, 8, 9, 60), 7.0, np.float32)
    tmp_buf = np.full((3, 8, 9, 60), 7.0, np.float32)
    gauss_kernel(x, k, out_buf[..., :10], tmp_buf[..., :10])
    assert (out_buf[..., 10:] == 7.0).all() and (tmp_buf[..., 10:] == 7.0).all()
    ref = D.gaussian_smooth(torch.from_numpy(x)[None], 6.0, "torch")[0].numpy()
    np.testing.assert_allclose(out_buf[..., :10], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.5, 1.5, 6.0])  # 6.0: a kernel (37 taps) longer than every axis
def test_gaussian_numba_matches_torch(sigma):
    x = torch.randn(1, 3, 8, 9, 10)
    torch.testing.assert_close(D.gaussian_smooth(x, sigma, "numba"), D.gaussian_smooth(x, sigma, "torch"),
                               rtol=1e-5, atol=1e-6)
    c = torch.full((1, 3, 8, 9, 10), 2.5)  # replicated faces: a constant stays constant
    torch.testing.assert_close(D.gaussian_smooth(c, sigma, "numba"), c)


def test_sample_numba_matches_torch_and_compose():
    torch.manual_seed(2)
    src, disp = torch.randn(1, 3, 7, 8, 9), torch.randn(1, 3, 7, 8, 9) * 4  # far outside: clamping
    torch.testing.assert_close(D.sample(src, disp, add=True, backend="numba"),
                               spatial.compose(src, disp, padding="border"), rtol=1e-5, atol=1e-5)
    img = torch.rand(1, 1, 7, 8, 9)
    torch.testing.assert_close(D.sample(img, disp, sign=-1.0, backend="numba"),
                               D.sample(img, disp, sign=-1.0, backend="torch"), rtol=1e-5, atol=1e-5)


def test_whole_run_numba_matches_torch():
    fixed, moving, _ = _pair(20, 2.0)
    cfg = D.DeformableConfig(levels=(2, 1), iterations=(5, 3), tol=0.0, min_size=6)
    a = D.register_deformable(fixed, moving, cfg, backend="numba")
    b = D.register_deformable(fixed, moving, cfg, backend="torch")
    torch.testing.assert_close(a.ddf, b.ddf, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(a.ddf_inverse, b.ddf_inverse, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- registration
@pytest.mark.parametrize("method", METHODS)
def test_recovers_a_known_smooth_deformation(method):
    fixed, moving, true = _pair(32, 3.0)
    r = D.register_deformable(fixed, moving, method=method, levels=(2, 1), iterations=(80, 40))
    warped = spatial.warp(moving, r.ddf, padding="border")
    ssd0, ssd1 = float((moving - fixed).pow(2).mean()), float((warped - fixed).pow(2).mean())
    assert ssd1 < 0.3 * ssd0
    err0, err1 = float(true.norm(dim=1).mean()), float((r.ddf - true).norm(dim=1).mean())
    assert err1 < 0.3 * err0
    assert [g.factor for g in r.log] == [2, 1] and all(g.loss_last < g.loss_first for g in r.log)
    assert set(r.summary()) == {"seconds", "levels"}


@pytest.mark.parametrize("method", METHODS)
def test_no_folding_on_a_large_deformation(method):
    """A hard pair (peak displacement ~ 6 voxels at 24^3): the maps stay folding-free."""
    fixed, moving, true = _pair(24, 6.0)
    r = D.register_deformable(fixed, moving, method=method, levels=(2, 1), iterations=(100, 60),
                              lr=3.0, sigma_field=0.0, min_size=6)
    assert float(metrics.jacobian_determinant(true[0]).min()) > 0
    assert float(r.ddf.norm(dim=1).max()) > 2.0  # it did move a lot
    assert metrics.folding_percent(r.ddf[0]) == 0.0
    if method == "svf":  # exp(-v); the greedy inverse is a fixed-point iteration, not guaranteed
        # inside: at the faces a map pointing far outside meets the border clamping of the
        # compositions (here the velocity reaches ~14 voxels on a 24-voxel grid)
        det = metrics.jacobian_determinant(r.ddf_inverse[0])[1:-1, 1:-1, 1:-1]
        assert float(det.min()) > 0


@pytest.mark.parametrize("method", METHODS)
def test_inverse_composed_with_forward_is_identity(method):
    fixed, moving, _ = _pair(24, 3.0)
    r = D.register_deformable(fixed, moving, method=method, levels=(2, 1), iterations=(60, 30), min_size=6)
    both = D.sample(r.ddf, r.ddf_inverse, add=True)  # first the inverse, then the forward map
    other = D.sample(r.ddf_inverse, r.ddf, add=True)
    inner = (slice(None), slice(None)) + (slice(2, -2),) * 3  # clamped faces are not invertible
    assert float(r.ddf.norm(dim=1).max()) > 1.0
    for err in (both[inner].norm(dim=1), other[inner].norm(dim=1)):
        assert float(err.mean()) < 0.03 and float(err.max()) < 0.2


@pytest.mark.parametrize("method", METHODS)
def test_self_registration_moves_nothing(method):
    x = _textured(24)
    r = D.register_deformable(x, x.clone(), method=method, levels=(2, 1), iterations=(50, 20), min_size=6)
    assert float(r.ddf.norm(dim=1).max()) < 0.1
    assert float(r.ddf_inverse.norm(dim=1).max()) < 0.1


def test_percentile_scaled_inputs_with_a_hot_voxel():
    """Inputs clipped to [0, 1] after percentile scaling (flat saturated regions) work."""
    fixed, moving, true = _pair(24, 2.0)
    fixed, moving = fixed * 1.4 - 0.2, moving * 1.4 - 0.2
    fixed[0, 0, 3, 3, 3] = 1e6
    lo, hi = np.percentile(fixed.numpy(), [0.5, 99.5])
    fixed = ((fixed - lo) / (hi - lo)).clamp(0, 1)
    moving = ((moving - lo) / (hi - lo)).clamp(0, 1)
    r = D.register_deformable(fixed, moving, levels=(2, 1), iterations=(60, 30), min_size=6)
    assert torch.isfinite(r.ddf).all()
    assert float((r.ddf - true).norm(dim=1).mean()) < 0.5 * float(true.norm(dim=1).mean())


def test_convergence_test_stops_early_on_an_easy_pair():
    fixed, moving, _ = _pair(24, 0.8)
    r = D.register_deformable(fixed, moving, levels=(2, 1), iterations=(500, 500), min_size=6)
    assert all(g.converged for g in r.log)
    assert all(g.iterations < 100 for g in r.log)
    r0 = D.register_deformable(fixed, moving, levels=(2, 1), iterations=(30, 30), tol=0.0, min_size=6)
    assert [g.iterations for g in r0.log] == [30, 30] and not any(g.converged for g in r0.log)


def test_init_ddf_is_the_starting_map():
    """Starting from the true map leaves little to do; the result includes the initial field."""
    fixed, moving, true = _pair(24, 3.0)
    for method in METHODS:
        r = D.register_deformable(fixed, moving, method=method, levels=(2, 1), iterations=(20, 10),
                                  init_ddf=true, min_size=6)
        assert float((r.ddf - true).norm(dim=1).mean()) < 0.3
        inner = (slice(None), slice(None)) + (slice(2, -2),) * 3
        assert float(D.sample(r.ddf, r.ddf_inverse, add=True)[inner].norm(dim=1).max()) < 0.15


def test_init_inverse_is_refined_not_trusted():
    """An approximate inverse of init_ddf (here: found on a 2x coarser grid) gives an inverse as
    good as inverting init_ddf from scratch; a wrong one is refined towards the true inverse."""
    fixed, moving, true = _pair(24, 3.0)
    coarse = D.invert_ddf(D._resize_field(true, (12, 12, 12)), 20)
    approx = D._resize_field(coarse, (24, 24, 24))
    inner = (slice(None), slice(None)) + (slice(2, -2),) * 3
    kw = dict(levels=(2, 1), iterations=(20, 10), init_ddf=true, min_size=6)
    ref = D.register_deformable(fixed, moving, **kw)
    r = D.register_deformable(fixed, moving, init_inverse=approx, **kw)
    assert torch.allclose(r.ddf, ref.ddf)  # the forward map does not depend on it
    err = float(D.sample(r.ddf, r.ddf_inverse, add=True)[inner].norm(dim=1).max())
    err_ref = float(D.sample(ref.ddf, ref.ddf_inverse, add=True)[inner].norm(dim=1).max())
    assert err < max(0.15, 1.5 * err_ref), (err, err_ref)
    with pytest.raises(PsmambaError, match="init_ddf"):
        D.register_deformable(fixed, moving, levels=(1,), iterations=(1,), init_inverse=approx, min_size=6)
    with pytest.raises(PsmambaError, match="init_inverse grid"):
        D.register_deformable(fixed, moving, levels=(1,), iterations=(1,), init_ddf=true, min_size=6,
                              init_inverse=torch.zeros(1, 3, 8, 8, 8))


def test_mask_restricts_the_similarity():
    fixed, moving, _ = _pair(24, 2.0)
    mask = torch.zeros(24, 24, 24)
    mask[:12] = 1
    r = D.register_deformable(fixed, moving, levels=(2, 1), iterations=(40, 20), fixed_mask=mask, min_size=6)
    # outside the mask (and away from its smoothing reach) the force is zero: no motion there
    far = r.ddf[0, :, 20:].norm(dim=0).max()
    near = r.ddf[0, :, :10].norm(dim=0).max()
    assert float(near) > 5 * float(far)


def test_masked_loss_is_the_mean_over_the_mask():
    w, f = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., :4, :, :] = 1
    loss, _ = D.lncc_force(w, f, 3, mask)
    cc = LNCC(3).local_cc(w, f)
    assert loss == pytest.approx(-float(cc[..., :4, :, :].mean()), rel=1e-5)


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"sigma_update": -0.5}, "sigma_update"),
        ({"sigma_field": float("nan")}, "sigma_field"),
        ({"sigma_field": 1e9}, "sigma_field must be at most 32"),  # a 48 GB kernel before
        ({"sigma_update": 33.0}, "sigma_update must be at most 32"),
        ({"max_step": float("inf")}, "max_step"),
        ({"window": 4}, "window"),
        ({"tol": -1e-3}, "tol"),
        ({"method": "demons"}, "method"),
        ({"levels": (1, 2), "iterations": (1, 1)}, "levels"),
        ({"levels": (4, 2, 1), "iterations": (10, 10)}, "iterations"),
        ({"iterations": (10, -1, 0)}, "iterations"),
        ({"patience": 0}, "patience"),
        ({"svf_steps": -1}, "svf_steps"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, word):
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(PsmambaError, match=word):
        D.register_deformable(x, x, **kwargs)


def test_too_small_for_the_pyramid_raises_naming_levels():
    x = torch.rand(1, 1, 20, 20, 20)
    with pytest.raises(PsmambaError, match="levels.*1/4.*min_size"):
        D.register_deformable(x, x)  # default levels (4, 2, 1): 1/4 of 20 voxels is 6 < 8


def test_bad_inputs_raise():
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(PsmambaError, match="moving"):
        D.register_deformable(x, torch.rand(1, 1, 16, 16, 15), levels=(1,), iterations=(1,))
    bad = x.clone()
    bad[0, 0, 1, 1, 1] = math.nan
    with pytest.raises(PsmambaError, match="fixed.*NaN"):
        D.register_deformable(bad, x, levels=(1,), iterations=(1,))
    with pytest.raises(PsmambaError, match="init_ddf"):
        D.register_deformable(x, x, levels=(1,), iterations=(1,), init_ddf=torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(PsmambaError, match="init_velocity"):
        D.register_deformable(x, x, method="greedy", levels=(1,), iterations=(1,),
                              init_velocity=torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(PsmambaError, match="unknown setting"):
        D.register_deformable(x, x, lambda_=1.0)


# --------------------------------------------------------------------------- full-size residual, affine maps
def test_full_size_residual_matches_the_whole_velocity_scheme():
    """The full-size level as a residual on the upsampled coarser map finds the same map as
    integrating the whole upsampled velocity at every step, and its velocity's exp is the map."""
    fixed, moving, true = _pair(32, 3.0)
    kw = dict(levels=(2, 1), iterations=(60, 10), tol=0.0)
    res = D.register_deformable(fixed, moving, **kw)
    whole = D.register_deformable(fixed, moving, full_residual=False, **kw)
    assert float((res.ddf - whole.ddf).norm(dim=1).mean()) < 0.05
    assert float((res.ddf - true).norm(dim=1).mean()) < 0.3 * float(true.norm(dim=1).mean())
    assert res.log[-1].loss_last < res.log[-1].loss_first  # the full-size steps improve the match
    assert float((D._exp(res.velocity, 8, "torch") - res.ddf).norm(dim=1).mean()) < 0.05
    with pytest.raises(PsmambaError, match="full_residual"):
        D.DeformableConfig(full_residual="yes")


def test_full_size_level_with_no_steps_is_the_upsampled_coarse_map():
    fixed, moving, _ = _pair(24, 3.0)
    r = D.register_deformable(fixed, moving, levels=(2, 1), iterations=(30, 0), min_size=6)
    whole = D.register_deformable(fixed, moving, levels=(2, 1), iterations=(30, 0), min_size=6, full_residual=False)
    assert r.log[-1].iterations == 0 and float(r.ddf.norm(dim=1).max()) > 1.0
    assert float((r.ddf - whole.ddf).norm(dim=1).mean()) < 0.02  # exp then upsample ~ upsample then exp
    inner = (slice(None), slice(None)) + (slice(2, -2),) * 3
    assert float(D.sample(r.ddf, r.ddf_inverse, add=True)[inner].norm(dim=1).max()) < 0.2


def _affine(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] += 0.1 * rng.standard_normal((3, 3))
    m[:3, 3] = rng.uniform(-2, 2, 3)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_field_numba_matches_torch(dtype):
    g = torch.Generator().manual_seed(3)
    field = D.gaussian_smooth(3 * torch.randn(1, 3, 10, 12, 9, generator=g), 1.0, backend="torch").to(dtype)
    a, b = _affine(1), _affine(2)
    x = D.affine_field(field, a, b, (11, 8, 13), backend="numba")
    y = D.affine_field(field, a, b, (11, 8, 13), backend="torch")
    assert x.shape == (1, 3, 11, 8, 13) and x.dtype == dtype
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_affine_field_with_identity_reads_the_field_at_its_voxels():
    """``A = I``: ``B (p + u(p)) - p`` exactly (an affine after a deformable map), borders included."""
    g = torch.Generator().manual_seed(4)
    field = 2 * torch.randn(1, 3, 7, 9, 8, generator=g, dtype=torch.float64)
    b = _affine(5)
    r = spatial.identity_grid((7, 9, 8), dtype=torch.float64)
    want = torch.einsum("ij,bj...->bi...", torch.as_tensor(b[:3, :3]), r + field)
    want = want + torch.as_tensor(b[:3, 3]).view(1, 3, 1, 1, 1) - r
    for backend in ("numba", "torch"):
        torch.testing.assert_close(D.affine_field(field, np.eye(4), b, (7, 9, 8), backend=backend), want)


def test_settings_from_yaml_or_numpy_and_starts_that_would_give_nan():
    cfg = D.DeformableConfig(window=5.0, patience=3.0, lr=np.float32(0.5))  # numba TypingError / refused before
    assert (cfg.window, cfg.patience, cfg.lr) == (5, 3, 0.5) and isinstance(cfg.window, int)
    with pytest.raises(PsmambaError, match=r"window must be an odd integer in \[3, 99\]"):
        D.DeformableConfig(window=10**30 + 1)
    f = torch.rand(1, 1, 32, 32, 32)
    with pytest.raises(PsmambaError, match="init_velocity holds NaN"):  # an all-NaN field before
        D.register_deformable(f, f, init_velocity=torch.full((1, 3, 32, 32, 32), float("nan")))
    with pytest.raises(PsmambaError, match=r"fixed_mask must hold weights in \[0, 1\]"):
        D.register_deformable(f, f, fixed_mask=-torch.ones_like(f))
