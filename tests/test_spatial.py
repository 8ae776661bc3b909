"""Exact invariants of the spatial core, and cross-checks against MONAI.

Tolerances: float32 bilinear resampling through ``grid_sample``'s normalised coordinates loses
a few ulps of position (identity warp error ~5e-6 at 32^3 measured), so float32 comparisons use
``atol = 1e-5``; ``mode="nearest"`` on integer labels is compared exactly; float64 to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from psmamba.errors import PsmambaError
from psmamba.spatial import (
    compose,
    crop_to,
    ddf_from_l2r,
    ddf_from_mm,
    ddf_to_l2r,
    ddf_to_mm,
    identity_grid,
    integrate_svf,
    pad_to_multiple,
    resize_ddf,
    upsample_ddf,
    warp,
)


def constant_field(vector, shape, batch=1, dtype=torch.float32) -> torch.Tensor:
    """``(B, 3, D, H, W)`` field equal to ``vector`` everywhere."""
    v = torch.tensor(vector, dtype=dtype).view(1, 3, 1, 1, 1)
    return v.expand(batch, 3, *shape).clone()


def test_identity_grid_holds_voxel_indices():
    g = identity_grid((2, 3, 4))
    assert g.shape == (1, 3, 2, 3, 4)
    assert g[0, 0, 1, 2, 3] == 1 and g[0, 1, 1, 2, 3] == 2 and g[0, 2, 1, 2, 3] == 3


@pytest.mark.parametrize("shape", [(8, 9, 10), (17, 12, 5)])
def test_identity_warp_returns_input(shape, torch_seed):
    x = torch.rand(2, 3, *shape)
    zero = torch.zeros(2, 3, *shape)
    assert torch.allclose(warp(x, zero), x, atol=1e-5)
    assert torch.equal(warp(x, zero, mode="nearest"), x)
    xd = x.double()
    assert torch.allclose(warp(xd, zero.double()), xd, atol=1e-10)
    labels = torch.randint(0, 60, (2, 1, *shape), dtype=torch.int32)
    out = warp(labels, zero, mode="nearest")
    assert out.dtype == torch.int32 and torch.equal(out, labels)


def _cube_volume(shape, lo, hi, value=7):
    x = torch.zeros(shape, dtype=torch.int64)
    x[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return x


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_integer_shift_moves_labelled_cube_exactly(mode):
    shape = (12, 13, 14)
    lo, hi = (4, 5, 6), (8, 9, 10)
    shifts = [(2, -1, 3), (-3, 2, 0)]  # one per batch element
    cube = _cube_volume(shape, lo, hi).float()
    # two channels: the label cube and a ramp image, so channels must move together
    ramp = torch.arange(np.prod(shape), dtype=torch.float32).reshape(shape) / 100.0
    ramp = ramp * (cube > 0)  # keep it inside the cube so nothing leaves the volume
    image = torch.stack([torch.stack([cube, ramp])] * 2)  # (2, 2, D, H, W)
    ddf = torch.cat([constant_field(s, shape) for s in shifts])  # (2, 3, D, H, W)
    out = warp(image, ddf, mode=mode)
    for b, s in enumerate(shifts):
        # warp samples at p + s, so content found at q moves to q - s
        expected = torch.zeros_like(image[b])
        src = tuple(slice(lo[i], hi[i]) for i in range(3))
        dst = tuple(slice(lo[i] - s[i], hi[i] - s[i]) for i in range(3))
        expected[(slice(None), *dst)] = image[b][(slice(None), *src)]
        if mode == "nearest":
            assert torch.equal(out[b], expected)
        else:
            assert torch.allclose(out[b], expected, atol=1e-5)
    # integer labels keep their dtype and their codes under nearest
    labels = _cube_volume(shape, lo, hi, value=1035).to(torch.int32)[None, None]
    moved = warp(labels, constant_field(shifts[0], shape), mode="nearest")
    assert moved.dtype == torch.int32
    assert int((moved == 1035).sum()) == 4 * 4 * 4
    assert moved[0, 0, lo[0] - 2, lo[1] + 1, lo[2] - 3] == 1035


def test_ddf_batch_of_one_broadcasts(torch_seed):
    x = torch.rand(3, 1, 6, 6, 6)
    ddf = torch.rand(1, 3, 6, 6, 6)
    out = warp(x, ddf)
    for b in range(3):
        assert torch.allclose(out[b : b + 1], warp(x[b : b + 1], ddf), atol=1e-6)


def test_compose_translation_with_inverse_is_zero_in_interior():
    shape = (12, 12, 12)
    t = (2.0, -3.0, 1.5)
    a = constant_field([-v for v in t], shape)
    b = constant_field(t, shape)
    total = compose(a, b)  # first b then a: x -> x + t - t
    m = 4  # margin > |t| so that x + b(x) stays inside the volume
    assert torch.allclose(total[..., m:-m, m:-m, m:-m], torch.zeros(1), atol=1e-5)
    assert torch.allclose(compose(a, b, padding="border"), torch.zeros(1), atol=1e-5)


def test_compose_of_translations_adds_them():
    shape = (10, 10, 10)
    total = compose(constant_field((1.0, 0.5, -1.0), shape), constant_field((0.25, -1.0, 2.0), shape), padding="border")
    assert torch.allclose(total, constant_field((1.25, -0.5, 1.0), shape), atol=1e-5)


def test_integrate_svf_of_constant_field_is_that_translation():
    shape = (20, 20, 20)
    t = (1.5, -2.0, 0.75)
    svf = constant_field(t, shape)
    out = integrate_svf(svf, steps=7)
    # zero padding shortens vectors that sample outside the volume, and each squaring step's
    # trilinear interpolation carries that error about one voxel further in (measured at 24^3:
    # max error 6.5e-3 at margin 3, 2.3e-6 at margin 5, 2.4e-7 at margin 6)
    m = 6
    assert torch.allclose(out[..., m:-m, m:-m, m:-m], svf[..., m:-m, m:-m, m:-m], atol=1e-5)
    assert torch.allclose(integrate_svf(svf, steps=7, padding="border"), svf, atol=1e-5)
    assert torch.equal(integrate_svf(svf, steps=0), svf)


def test_resize_and_upsample_rescale_vectors():
    c = (1.0, -2.0, 0.5)
    ddf = constant_field(c, (4, 5, 6), batch=2)
    up = upsample_ddf(ddf)
    assert up.shape == (2, 3, 8, 10, 12)
    assert torch.allclose(up, constant_field([2 * v for v in c], (8, 10, 12), batch=2), atol=1e-6)
    r = resize_ddf(ddf, (6, 10, 9))
    factors = (5 / 3, 9 / 4, 8 / 5)  # (new - 1) / (old - 1): align_corners=True
    assert torch.allclose(r, constant_field([v * f for v, f in zip(c, factors)], (6, 10, 9), batch=2), atol=1e-6)
    r1 = resize_ddf(ddf, (8, 10, 12), scale=1.0)  # explicit factor: resample only
    assert torch.allclose(r1, constant_field(c, (8, 10, 12), batch=2), atol=1e-6)


def test_upsample_interpolates_linearly_with_aligned_corners():
    # a linear field stays linear and its end values stay at the end voxels (align_corners)
    d = torch.linspace(0, 3, 4).view(1, 1, 4, 1, 1).expand(1, 3, 4, 4, 4).clone()
    up = upsample_ddf(d)
    expected = 2 * torch.linspace(0, 3, 8).view(1, 1, 8, 1, 1).expand(1, 3, 8, 8, 8)
    assert torch.allclose(up, expected, atol=1e-6)


def test_pad_to_multiple_and_crop_to_round_trip(torch_seed):
    x = torch.rand(2, 3, 17, 20, 33)
    padded, size = pad_to_multiple(x, 16)
    assert padded.shape == (2, 3, 32, 32, 48) and size == (17, 20, 33)
    assert torch.equal(crop_to(padded, size), x)
    assert float(padded[:, :, 17:].abs().sum()) == 0.0  # padding only at the far end
    same, size2 = pad_to_multiple(torch.rand(1, 1, 16, 32, 16), 16)
    assert same.shape == (1, 1, 16, 32, 16) and size2 == (16, 32, 16)


@pytest.mark.filterwarnings("ignore::UserWarning:monai")  # MONAI's own notices
@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")])
def test_warp_matches_monai_warp(mode, padding, torch_seed):
    from monai.networks.blocks import Warp

    x = torch.rand(2, 2, 9, 10, 11)
    ddf = 3 * torch.randn(2, 3, 9, 10, 11)
    ours = warp(x, ddf, mode=mode, padding=padding)
    theirs = Warp(mode=mode, padding_mode=padding)(x, ddf)
    # same sampling convention (align_corners=True, channel i = axis i): agreement to float32 rounding
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning:monai")  # MONAI's own notices
def test_integrate_svf_matches_monai_dvf2ddf(torch_seed):
    from monai.networks.blocks import DVF2DDF

    svf = 4 * torch.nn.functional.avg_pool3d(torch.randn(2, 3, 12, 12, 12), 3, stride=1, padding=1)
    ours = integrate_svf(svf, steps=7)
    theirs = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="zeros")(svf)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_warp_gradcheck_image_and_field():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 4, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    # sample points 0.2..0.8 voxel away from every grid line: trilinear is smooth there
    frac = 0.2 + 0.6 * torch.rand(1, 3, 4, 4, 5, dtype=torch.float64, generator=g)
    whole = torch.randint(-1, 2, (1, 3, 4, 4, 5), generator=g).to(torch.float64)
    ddf = (whole + frac).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda im, d: warp(im, d), (x, ddf), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda im, d: warp(im, d, padding="border"), (x, ddf), eps=1e-6, atol=1e-6)


def test_bad_input_gives_psmamba_error():
    ddf = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(PsmambaError, match="image must have shape"):
        warp(torch.zeros(4, 4), ddf)
    with pytest.raises(PsmambaError, match="image must have shape"):
        warp(np.zeros((1, 1, 4, 4, 4)), ddf)
    with pytest.raises(PsmambaError, match="differ"):
        warp(torch.zeros(1, 1, 4, 4, 5), ddf)
    with pytest.raises(PsmambaError, match="batch"):
        warp(torch.zeros(2, 1, 4, 4, 4), torch.zeros(3, 3, 4, 4, 4))
    with pytest.raises(PsmambaError, match=r"\(B, 3, D, H, W\)"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(PsmambaError, match="mode"):
        warp(torch.zeros(1, 1, 4, 4, 4), ddf, mode="cubic")
    with pytest.raises(PsmambaError, match="nearest"):
        warp(torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64), ddf)
    with pytest.raises(PsmambaError):
        compose(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(PsmambaError):
        identity_grid((4, 4))
    with pytest.raises(PsmambaError):
        ddf_to_l2r(np.zeros((2, 4, 4, 4)))
    with pytest.raises(PsmambaError):
        ddf_from_l2r(np.zeros((4, 4, 4, 2)))
    with pytest.raises(PsmambaError):
        ddf_to_mm(ddf, np.eye(2))
    # one line each: the CLI prints the message as is
    with pytest.raises(PsmambaError) as info:
        warp(torch.zeros(4, 4), ddf)
    assert "\n" not in str(info.value)


def test_l2r_layout_round_trip(torch_seed):
    ddf = torch.randn(1, 3, 4, 5, 6)
    arr = ddf_to_l2r(ddf)
    assert arr.shape == (4, 5, 6, 3)
    assert np.array_equal(arr[1, 2, 3], ddf[0, :, 1, 2, 3].numpy())
    assert torch.equal(ddf_from_l2r(arr), ddf)
    assert np.array_equal(ddf_to_l2r(ddf[0].numpy()), arr)  # (3, D, H, W) numpy too
    assert torch.equal(ddf_from_l2r(arr[:, :, :, None, :]), ddf)  # NIfTI vector layout


def test_mm_conversion_round_trip_and_columns(oblique_affine, torch_seed):
    ddf = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64)
    mm = ddf_to_mm(ddf, oblique_affine)
    assert torch.allclose(ddf_from_mm(mm, oblique_affine), ddf, atol=1e-12)
    # one voxel along axis k is the affine's column k in mm (translation plays no part)
    unit = constant_field((0.0, 1.0, 0.0), (2, 2, 2), dtype=torch.float64)
    assert torch.allclose(ddf_to_mm(unit, oblique_affine)[0, :, 0, 0, 0], torch.tensor(oblique_affine[:3, 1]))


# --------------------------------------------------------------------------- mixed precision
def test_geometry_stays_float32_under_bf16_autocast():
    """bf16 holds voxel positions near 128-255 only in whole steps: warps, compositions, resizing
    and scaling and squaring run in float32 under autocast, whatever their inputs' dtype."""
    from psmamba import spatial

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 2, 8, 9, 10, generator=g).bfloat16()
    ddf = (torch.rand(1, 3, 8, 9, 10, generator=g) - 0.5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [
            spatial.warp(image, ddf), spatial.compose(ddf, ddf), spatial.resize_ddf(ddf, (5, 6, 7)),
            spatial.resize_volume(image, (5, 6, 7)), spatial.upsample_ddf(ddf), spatial.integrate_svf(ddf, steps=3),
        ]
    assert all(o.dtype == torch.float32 for o in outs), [o.dtype for o in outs]
    # the sampling positions are float32: a sub-voxel shift at a large coordinate survives
    ramp = torch.arange(256, dtype=torch.float32).view(1, 1, 1, 1, 256).expand(1, 1, 2, 2, 256).contiguous()
    shift = torch.zeros(1, 3, 2, 2, 256)
    shift[:, 2] = 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moved = spatial.warp(ramp, shift)
    torch.testing.assert_close(moved[0, 0, 0, 0, 200], torch.tensor(200.3), atol=1e-4, rtol=0)


def test_model_fields_and_warps_are_float32_under_bf16_autocast():
    """Every grid_sample / interpolate the model runs under CPU bf16 autocast sees float32 inputs."""
    from torch.overrides import TorchFunctionMode

    from psmamba.models import build_model

    seen: list[tuple[str, torch.dtype]] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (F.grid_sample, F.interpolate):
                seen.append((func.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model("paper", channels=1, mamba_backend="reference").eval()
    x = torch.rand(1, 1, 32, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Record():
        out = model(x, x.flip(-1))
    assert out.ddf.dtype == torch.float32 and out.warped.dtype == torch.float32
    assert seen and all(dtype == torch.float32 for _, dtype in seen), seen


# --------------------------------------------------------------------------- integer label warps
def _grid_sample_nearest_f64(labels, ddf, padding):
    """The former route: codes as float64 through grid_sample's nearest mode."""
    from psmamba.spatial import _to_sampling_grid

    grid = _to_sampling_grid(ddf.double())
    out = F.grid_sample(labels.double(), grid, mode="nearest", padding_mode=padding, align_corners=True)
    return out.round().to(labels.dtype)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_nearest_label_warp_matches_grid_sample_and_keeps_large_codes(padding, torch_seed):
    shape = (9, 6, 11)
    # codes beyond float32's 2^24 integers; the gather path copies them, so they come back exactly
    codes = torch.tensor([0, 2**24 + 1, 2**31 - 1, 3 * 2**40 + 7], dtype=torch.int64)
    labels = codes[torch.randint(0, 4, (2, 2, *shape))]
    ddf = torch.randn(2, 3, *shape) * 2.5  # many samples fall outside the grid
    out = warp(labels, ddf, mode="nearest", padding=padding)
    assert out.dtype == torch.int64
    assert set(out.unique().tolist()) <= set(codes.tolist())
    # the same voxels as grid_sample's nearest mode (random fields: no half-way positions);
    # compared through the voxel index, which float64 holds exactly
    index = torch.arange(labels.numel()).view(labels.shape)
    torch.testing.assert_close(warp(index, ddf, mode="nearest", padding=padding),
                               _grid_sample_nearest_f64(index, ddf, padding), rtol=0, atol=0)
    flat = labels.reshape(-1)
    picked = warp(index, ddf, mode="nearest", padding=padding)
    expect = flat[picked.reshape(-1)].view(labels.shape)
    if padding == "zeros":  # outside the grid grid_sample gives 0, which is also index 0's voxel
        outside = _grid_sample_nearest_f64(torch.ones_like(index), ddf, padding) == 0
        expect = expect.masked_fill(outside, 0)
    assert torch.equal(out, expect)


def test_nearest_label_warp_rounds_half_way_positions_to_even():
    shape = (4, 5, 6)
    labels = torch.arange(4 * 5 * 6, dtype=torch.int32).view(1, 1, *shape) + 2**24
    ddf = constant_field((0.0, 0.0, 0.5), shape)
    out = warp(labels, ddf, mode="nearest", padding="border")
    # voxel w goes to w + 0.5: rounded to the even of w, w + 1
    w = torch.arange(6)
    expect_w = torch.where(w % 2 == 0, w, w + 1).clamp(max=5)
    assert torch.equal(out[0, 0, 0, 0] - 2**24, expect_w.to(torch.int32))
    # -0.5: to the even neighbour below or above
    out = warp(labels, constant_field((0.0, 0.0, -0.5), shape), mode="nearest", padding="zeros")
    expect_w = torch.where(w % 2 == 0, w, w - 1)
    assert torch.equal(out[0, 0, 0, 0] - 2**24, expect_w.to(torch.int32))


def test_nearest_label_warp_ignores_shifts_along_a_one_voxel_axis():
    labels = torch.arange(1 * 4 * 5).view(1, 1, 1, 4, 5)
    ddf = constant_field((3.0, 0.0, 1.0), (1, 4, 5))
    out = warp(labels, ddf, mode="nearest")
    assert torch.equal(out, _grid_sample_nearest_f64(labels, ddf, "zeros"))


@pytest.mark.parametrize("old,new", [((8, 9, 10), (5, 3, 7)), ((5, 6, 7), (9, 11, 13)), ((4, 5, 3), (4, 10, 1))])
def test_label_resize_picks_the_nearest_voxel_exactly(old, new):
    from psmamba.spatial import resize_volume

    labels = torch.arange(int(np.prod(old)), dtype=torch.int64).view(1, 1, *old) + 2**40
    out = resize_volume(labels, new, labels=True)
    assert out.dtype == torch.int64 and out.shape[2:] == new
    # new voxel i sits at old position i (o - 1) / (n - 1); nearest, half to even
    idx = []
    for o, n in zip(old, new):
        pos = [i * (o - 1) / (n - 1) if n > 1 else 0.0 for i in range(n)]
        idx.append(torch.tensor([round(p) for p in pos]))  # Python's round is half to even
    expect = labels[:, :, idx[0]][:, :, :, idx[1]][:, :, :, :, idx[2]]
    assert torch.equal(out, expect)
