"""Metrics: golden Dice numbers, Jacobians of affine and hand-made fields, HD95 hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from psmamba.errors import PsmambaError
from psmamba.metrics import (
    dice,
    folding_percent,
    hd95,
    jacobian_determinant,
    mean_dice,
    sdlogj,
    sdlogj_l2r,
    shared_labels,
)

# ------------------------------------------------------------------------------------- Dice
FIXED = np.array([1, 1, 2, 0, 1, 0, 0, 3]).reshape(2, 2, 2)
WARPED = np.array([1, 0, 2, 2, 1, 1, 0, 0]).reshape(2, 2, 2)


def test_dice_golden_2x2x2():
    d = dice(FIXED, WARPED)
    # label 1: |F| = 3, |W| = 3, overlap 2 -> 4/6; label 2: 1, 2, 1 -> 2/3; label 3 only in F -> 0
    assert list(d) == [1, 2, 3]
    assert d[1] == pytest.approx(4 / 6) and d[2] == pytest.approx(2 / 3) and d[3] == 0.0
    assert isinstance(d[1], float) and isinstance(d[1], np.floating)
    assert mean_dice(FIXED, WARPED) == pytest.approx(4 / 9)


@pytest.mark.parametrize("dtype, codes", [
    (np.uint8, [0, 1, 2, 255]), (np.int16, [0, -5, 7, 30000]), (np.int32, [0, 3, 1 << 22, (1 << 22) - 1]),
    (np.uint64, [0, 2, 1 << 40]), (np.int64, [0, -(1 << 40), 9]), (np.uint16, [0, 14175, 2035]),
])
def test_dice_counts_match_per_label_masks_for_any_codes(rng, dtype, codes):
    """Counting by ``bincount`` (small non-negative codes) or by sorting (others) gives the Dice
    of the definition, label by label, and shared_labels the codes present."""
    a = np.asarray(codes, dtype=dtype)[rng.integers(0, len(codes), (9, 8, 7))]
    b = np.asarray(codes, dtype=dtype)[rng.integers(0, len(codes), (9, 8, 7))]
    got = dice(a, b)
    want = {int(c): 2.0 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c))
            for c in sorted({int(v) for v in codes} - {0})}
    assert list(got) == list(want) and got == pytest.approx(want, rel=0, abs=0)
    assert shared_labels(a, b)[0] == sorted(want)
    only = b[b != np.asarray(codes[-1], dtype=dtype)]
    assert shared_labels(a, only) == (sorted(set(want) - {int(codes[-1])}), [int(codes[-1])] if codes[-1] else [])


def test_dice_absent_label_rules():
    d = dice(FIXED, WARPED, labels=[3, 5, 1])
    assert list(d) == [3, 5, 1]
    assert d[3] == 0.0  # present in one map only: a complete miss
    assert np.isnan(d[5])  # absent from both: not scored
    # mean skips the NaN: (0 + 4/6) / 2
    assert mean_dice(FIXED, WARPED, labels=[3, 5, 1]) == pytest.approx(1 / 3)
    assert np.isnan(mean_dice(FIXED, WARPED, labels=[7]))
    assert dice(FIXED, FIXED) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_dice_accepts_torch_and_float_labels_and_rejects_bad_input():
    d = dice(torch.from_numpy(FIXED)[None, None], torch.from_numpy(WARPED.astype(np.float64))[None, None])
    assert d[1] == pytest.approx(4 / 6)
    with pytest.raises(PsmambaError, match="same shape"):
        dice(FIXED, WARPED[:1])
    with pytest.raises(PsmambaError, match="integer"):
        dice(FIXED, WARPED + 0.5)


# ------------------------------------------------------------------------------- Jacobian
def affine_field(matrix: np.ndarray, shift, shape) -> np.ndarray:
    """Displacement of ``x -> M x + shift`` on the voxel grid: ``(M - I) x + shift``, (3, D, H, W)."""
    x = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", matrix - np.eye(3), x) + np.asarray(shift, dtype=np.float64).reshape(3, 1, 1, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_of_affine_field_is_matrix_determinant(seed):
    r = np.random.default_rng(seed)
    m = np.eye(3) + 0.3 * r.normal(size=(3, 3))
    u = affine_field(m, r.normal(size=3), (6, 7, 8))
    det = jacobian_determinant(u)
    assert det.shape == (6, 7, 8)
    # numpy.gradient is exact for linear functions, at the faces too
    assert np.allclose(det, np.linalg.det(m), atol=1e-12)
    assert np.allclose(jacobian_determinant(torch.from_numpy(u)[None]), np.linalg.det(m), atol=1e-12)


def test_folding_of_a_reflection_and_of_a_collapse():
    flip = np.diag([1.0, -1.0, 1.0])
    assert folding_percent(affine_field(flip, (0, 0, 0), (5, 5, 5))) == 100.0
    collapse = np.diag([0.0, 1.0, 1.0])  # det exactly 0 counts as folded (det <= 0)
    assert folding_percent(affine_field(collapse, (0, 0, 0), (5, 5, 5))) == 100.0
    assert folding_percent(np.zeros((3, 5, 5, 5))) == 0.0


def slab_field(profile) -> np.ndarray:
    """Field displacing only axis 0 by ``profile[x0]`` on a (len, 4, 5) grid."""
    u = np.zeros((3, len(profile), 4, 5))
    u[0] = np.asarray(profile, dtype=np.float64)[:, None, None]
    return u


def test_folding_percent_on_a_partly_folded_field():
    # det = 1 + d profile / dx0 (numpy.gradient): x0 = 0 (one-sided) .. 3 -> 1 - 1.5 < 0;
    # x0 = 4: 1 + (-6 + 4.5) / 2 = 0.25; x0 >= 5: 1. Folded: 4 of 10 slices -> 40 %.
    profile = [-1.5 * k for k in range(5)] + [-6.0] * 5
    det = jacobian_determinant(slab_field(profile))
    assert np.allclose(det[:4], -0.5) and np.allclose(det[4], 0.25) and np.allclose(det[5:], 1.0)
    assert folding_percent(slab_field(profile)) == pytest.approx(40.0)


def test_sdlogj_by_hand():
    # det: 2 on slices 0..3, 1.5 on slice 4, 1 on slices 5..9
    profile = [float(k) for k in range(5)] + [4.0] * 5
    logs = np.log(np.array([2.0] * 4 + [1.5] + [1.0] * 5))
    assert sdlogj(slab_field(profile)) == pytest.approx(logs.std(), rel=1e-12)
    assert sdlogj(affine_field(np.diag([1.2, 0.9, 1.1]), (1, 2, 3), (5, 6, 7))) == pytest.approx(0, abs=1e-12)
    # folded voxels are clipped to det = 1e-9 before the log: finite, and large
    folded = [-1.5 * k for k in range(5)] + [-6.0] * 5
    value = sdlogj(slab_field(folded))
    assert np.isfinite(value) and value > 5


def l2r_sdlogj_reference(disp: np.ndarray) -> float:
    """The Learn2Reg evaluation procedure, written out independently for the test.

    ``disp``: (3, D, H, W). Zero-padded central differences, ``J[j, i] = d u_i / d x_j + I``,
    crop 2 voxels per face, ``log(clip(det + 3, 1e-9, 1e9))``, standard deviation.
    """
    k = np.array([-0.5, 0.0, 0.5])
    grads = np.empty((3, 3) + disp.shape[1:])
    for j in range(3):
        shape = [1, 1, 1]
        shape[j] = 3
        for i in range(3):
            grads[j, i] = scipy.ndimage.correlate(disp[i], k.reshape(shape), mode="constant", cval=0.0)
    jac = grads + np.eye(3).reshape(3, 3, 1, 1, 1)
    jac = jac[:, :, 2:-2, 2:-2, 2:-2]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    return float(np.log(np.clip(det + 3, 1e-9, 1e9)).std())


@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (3, 3, 2, 4), (3, 9, 8, 2), (3, 33, 34, 35)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jacobian_kernel_is_bit_identical_to_numpy(rng, shape, dtype):
    """The one-pass numba kernel (fields of 3 x 32^3 values or more) gives numpy's determinants
    bit for bit, faces and 2-voxel axes included, on contiguous and strided fields."""
    from psmamba._deformable_cpu import jacobian_det_kernel
    from psmamba.metrics import _KERNEL_MIN_VOXELS, _jacobian_numpy

    u = (scipy.ndimage.gaussian_filter(rng.normal(size=shape), (0, 1, 1, 1)) * 4).astype(dtype)
    for field in (u, u[:, ::-1, :, ::-1], u.transpose(0, 1, 3, 2)):
        out = np.empty(field.shape[1:], dtype=dtype)
        jacobian_det_kernel(field, np.ones(1, dtype), np.full(1, 0.5, dtype), out)
        assert np.array_equal(out, _jacobian_numpy(field))
    assert (u.size >= _KERNEL_MIN_VOXELS) == (shape[1] > 32)  # the large field takes the kernel path
    assert np.array_equal(jacobian_determinant(u), _jacobian_numpy(u))


def _child_jacobian_sum(field):
    return float(jacobian_determinant(field).sum())


def test_jacobian_kernel_runs_in_a_forked_child_after_the_parent_used_it(rng):
    """DataLoader workers and fork pools compute metrics too: a parallel (OpenMP) kernel used by
    the parent would get a forked child killed; the one-thread kernel does not."""
    import multiprocessing
    import sys

    if sys.platform != "linux":
        pytest.skip("fork start method: Linux")
    u = (rng.normal(size=(3, 33, 34, 35)) * 0.3).astype(np.float32)
    want = float(jacobian_determinant(u).sum())  # the parent uses the kernel first
    with multiprocessing.get_context("fork").Pool(1) as pool:
        # a killed child loses its task: fail after a minute instead of waiting forever
        assert pool.apply_async(_child_jacobian_sum, (u,)).get(timeout=60) == want


def test_sdlogj_l2r_matches_learn2reg_procedure(rng):
    smooth = scipy.ndimage.gaussian_filter(rng.normal(size=(3, 12, 11, 10)), sigma=(0, 1.5, 1.5, 1.5)) * 4
    assert sdlogj_l2r(smooth) == pytest.approx(l2r_sdlogj_reference(smooth), rel=1e-10)
    # given the whole field's determinants (register passes them): the same value
    assert sdlogj_l2r(smooth, det=jacobian_determinant(smooth)) == sdlogj_l2r(smooth)
    with pytest.raises(PsmambaError, match="not the field's grid"):
        sdlogj_l2r(smooth, det=jacobian_determinant(smooth)[1:])
    # the challenge's "+3" makes it about 4x smaller than the plain SDlogJ for small deformations
    ratio = sdlogj(smooth) / sdlogj_l2r(smooth)
    assert 2.5 < ratio < 6
    assert sdlogj_l2r(affine_field(np.diag([1.1, 1.0, 0.9]), (0, 0, 0), (6, 6, 6))) == pytest.approx(0, abs=1e-12)


def test_field_metrics_reject_bad_input():
    with pytest.raises(PsmambaError, match=r"\(3, D, H, W\)"):
        jacobian_determinant(np.zeros((2, 4, 4, 4)))
    with pytest.raises(PsmambaError, match="batch"):
        folding_percent(np.zeros((2, 3, 4, 4, 4)))
    with pytest.raises(PsmambaError, match=">= 5"):
        sdlogj_l2r(np.zeros((3, 4, 8, 8)))


# ------------------------------------------------------------------------------------ HD95
def test_hd95_single_voxels_anisotropic_spacing():
    a = np.zeros((8, 8, 8), dtype=np.int16)
    b = np.zeros_like(a)
    a[2, 2, 2] = 3
    b[2, 2, 5] = 3
    assert hd95(a, b, spacing=(1.0, 1.0, 2.0)) == {3: pytest.approx(6.0)}  # 3 voxels x 2 mm
    assert hd95(a, b, spacing=(2.0, 2.0, 0.5))[3] == pytest.approx(1.5)


def test_hd95_percentile_ignores_a_lone_outlier():
    # A: a line of 10 voxels; B: the same line plus one voxel 11 voxels away along axis 0.
    # A->B distances are all 0; B->A distances are ten 0s and 11 voxels (22 mm at 2 mm).
    # 95th percentile with linear interpolation over 11 values: position 9.5 -> (0 + 22) / 2.
    a = np.zeros((16, 8, 12), dtype=np.uint8)
    a[4, 4, 0:10] = 1
    b = a.copy()
    b[15, 4, 5] = 1
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == {1: pytest.approx(11.0)}  # max would be 22


def test_hd95_absent_label_rules_and_bad_input():
    a = np.zeros((4, 5, 6), dtype=np.int32)
    a[1, 1, 1] = 2
    out = hd95(a, np.zeros_like(a), spacing=(1.0, 2.0, 3.0), labels=[2, 9])
    assert out[2] == pytest.approx(np.sqrt(4**2 + 10**2 + 18**2))  # diagonal in mm
    assert np.isnan(out[9])
    assert hd95(a, a, spacing=1.0) == {2: 0.0}
    with pytest.raises(PsmambaError, match="spacing"):
        hd95(a, a, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(PsmambaError, match="3-D"):
        hd95(a[0], a[0], spacing=1.0)


@pytest.mark.filterwarnings("ignore::UserWarning:monai")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_equals_monai_on_the_whole_volume(rng):
    # hd95 crops each label to its bounding box first; results must not change, also for
    # labels touching the volume's faces and for label 0 asked for explicitly
    from monai.metrics import compute_hausdorff_distance

    smooth = scipy.ndimage.gaussian_filter(rng.normal(size=(2, 18, 20, 16)), sigma=(0, 2, 2, 2))
    a = np.digitize(smooth[0], [-0.1, 0.0, 0.1]).astype(np.int16)  # labels 0..3, touching faces
    b = np.digitize(smooth[1] * 0.5 + smooth[0] * 0.5, [-0.1, 0.0, 0.1]).astype(np.int16)
    spacing = (1.0, 1.5, 2.0)
    ours = hd95(a, b, spacing=spacing, labels=[0, 1, 2, 3])
    for lab in (0, 1, 2, 3):
        full = compute_hausdorff_distance(
            (a == lab)[None, None], (b == lab)[None, None], include_background=True, percentile=95, spacing=list(spacing)
        )
        assert ours[lab] == pytest.approx(float(full.reshape(-1)[0]), rel=1e-6)


def test_shared_labels_and_a_warp_that_erases_a_structure_gains_nothing():
    """A registration is scored on the labels of both label maps (Learn2Reg's rule): a label of
    one subject alone is left out, and one the warp erased counts as a miss (Dice 0)."""
    from psmamba import metrics
    from psmamba.engine.register import register_pair

    fixed = np.zeros((16, 16, 16), np.int16)
    fixed[2:8, 2:8, 2:8], fixed[9:14, 9:14, 9:14] = 1, 2
    moving = fixed.copy()
    moving[2:5, 10:14, 2:5] = 3  # only the moving subject has structure 3
    assert metrics.shared_labels(fixed, moving) == ([1, 2], [3])
    img = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32) + fixed
    res = register_pair(img, img, moving_labels=moving, fixed_labels=fixed, method="identity", overview=False)
    assert set(res.summary["dice_after"]["per_label"]) == {1, 2} and res.summary["labels_not_scored"] == [3]
    assert res.summary["dice_after"]["mean"] == pytest.approx(1.0)
    erased = moving.copy()
    erased[erased == 2] = 0
    res = register_pair(img, img, moving_labels=erased, fixed_labels=fixed, method="identity", overview=False,
                        labels=[1, 2])  # an explicit list is scored as given: 2 missed -> Dice 0
    assert res.summary["dice_after"]["per_label"][2] == 0.0 and res.summary["dice_after"]["mean"] == pytest.approx(0.5)


def test_nan_fields_and_det_of_another_grid_are_refused():
    with pytest.raises(PsmambaError, match="ddf holds NaN"):  # 0 % folding before
        folding_percent(np.full((3, 8, 8, 8), np.nan, np.float32))
    with pytest.raises(PsmambaError, match="det has shape"):  # 100 % folding before
        folding_percent(np.zeros((3, 8, 8, 8), np.float32), det=np.zeros((4, 4, 4)))
    lab = np.zeros((8, 8, 8), np.int16)
    lab[2:5] = 1
    with pytest.raises(PsmambaError, match="labels must be a list of label codes"):  # read as 1 and 2 before
        dice(lab, lab, labels="12")


@pytest.mark.parametrize("spacing", ["x", [[1, 2], [3]], None])
def test_hd95_spacing_that_is_not_numbers_is_named(spacing):
    a = np.zeros((6, 6, 6), np.int32)
    a[2:4, 2:4, 2:4] = 1
    with pytest.raises(PsmambaError, match="spacing must be 3 positive numbers"):
        hd95(a, a, spacing=spacing)
