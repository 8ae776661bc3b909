"""``psmamba register`` out of the box against ANTs SyN (and ConvexAdam, FireANTs): issue 13's benchmark.

Protocol (``python -m benchmarks.bench_register``; ``--quick`` for a smoke run):

* **Pairs**: the demo data set's (:mod:`psmamba.data.demo`) full-size (160x192x160, 1 mm)
  ``test`` pairs (the three real MNI templates, six ordered pairs) and ``test_hard`` pairs
  (deformed copies, six ordered pairs), and a MISALIGNED copy of each pair
  (``test_misaligned``, ``test_hard_misaligned``): the moving image's voxels are moved by a
  seeded random similarity-like motion about the image centre (rotation of 8-15 degrees about
  a random axis, translation of 5-10 mm in a random direction, a scale of 0.95-1.05 per axis;
  :func:`misalign`), the image trilinear and its labels nearest, the header unchanged. Dice of
  a misaligned pair compares the warped MISALIGNED moving labels with the fixed labels.
* **Methods** (:data:`METHODS`): psmamba's default pipeline
  (``psmamba.engine.register.register_pair(..., method="default")``: affine, the shipped
  network, then diffeomorphic instance optimisation; ``ran_as`` in the results records it); ANTs SyN through antspyx (``type_of_transform="SyN"``,
  its defaults: affine + SyN); ConvexAdam (``convexAdam.convex_adam_MIND.convex_adam_pt``, its
  defaults, deformable only) and FireANTs (affine, then greedy deformable with the settings of
  its README) where they are installed; a method that cannot run here is recorded as
  ``not available: <reason>``, never silently left out.
* **One fresh process per method and pair** (same interpreter, or ``--python NAME=PATH`` for a
  peer that needs its own environment, such as FireANTs with its pinned SimpleITK), with
  2 threads (torch, numba and ITK: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is set before
  antspyx is imported). Its **peak memory** is the process's resident high-water mark
  (``VmHWM``, what ``ru_maxrss`` reports) read right after the registration, so it includes
  the interpreter, torch and the pair's arrays (``rss_before_mib`` is what was resident just
  before the call). **Seconds** are the wall time from the pair's arrays in memory to the
  whole displacement field on the fixed grid (for psmamba: ``register_pair`` minus its own
  output metrics; for ANTs: registration plus composing its transforms into one field).
  Methods ALTERNATE: the order is rotated from one pair to the next, so a drift of the
  machine's speed hits every method alike.
* **Scoring**, the same code for every method: the moving labels warped nearest-neighbour
  with the method's field (:func:`psmamba.spatial.warp`), Dice per label (mean over the
  labels), HD95 (mm), folding % (det J <= 0) and SDlogJ of the field (:mod:`psmamba.metrics`).
* **Robustness** (psmamba only): the fixed image of the first ``test`` pair registered to
  itself (largest displacement, goal < 0.1 voxel), and the first ``test`` pair again with one
  moving voxel set to 1e6 (change of Dice, goal < 0.01).
* The issue's goals are evaluated from the figures of this one run and printed (and written
  at the end of ``register.md``) as PASS/FAIL with the numbers.

Nothing is tuned on these pairs: every method runs with its defaults.

Outputs (``benchmarks/results/``): ``register{tag}.json`` (everything), ``.csv`` (one row per
method and pair), ``.md`` (a table per split, the time ratios to ANTs, the goals) and
``.png`` (Dice against seconds); ``tag`` is ``_quick`` with ``--quick``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO_ROOT,
    RESULT_MARKER,
    RESULTS_DIR,
    fmt,
    load_average,
    machine_lines,
    markdown_table,
    run_and_report,
    write_csv,
    write_json,
    write_text,
)

__all__ = [
    "DEFAULT_METHODS",
    "GOALS",
    "METHODS",
    "SPLITS",
    "BenchData",
    "PairData",
    "demo_bench_data",
    "evaluate_goals",
    "main",
    "method_available",
    "method_order",
    "misalign",
    "motion_matrix",
    "plot_register",
    "register_markdown",
    "run_register_bench",
    "summarize",
    "write_register",
]

#: method name -> table label
METHODS: dict[str, str] = {
    "psmamba": "psmamba default (affine + network + io)",
    "ants_syn": "ANTs SyN (antspyx: affine + SyN)",
    "convexadam": "ConvexAdam (MIND, defaults)",
    "fireants": "FireANTs (affine + greedy)",
}
#: methods run unless --methods says otherwise. FireANTs is opt-in: on a CPU (its fused kernels
#: are CUDA-only) it took 260 s for ONE 64x80x64 pair on a loaded 2-core machine, so a full-size
#: pair (15 times the voxels) would take tens of minutes (see benchmarks/README.md).
DEFAULT_METHODS = ("psmamba", "ants_syn", "convexadam")
#: the four splits, in table order: (name, base demo split, misaligned?)
SPLITS: tuple[tuple[str, str, bool], ...] = (
    ("test", "test", False),
    ("test_hard", "test_hard", False),
    ("test_misaligned", "test", True),
    ("test_hard_misaligned", "test_hard", True),
)
#: the issue's goals (thresholds)
GOALS = {
    "folding_percent_max": 0.01,  # psmamba's mean folding % per split
    "time_ratio_max": 1.0 / 3.0,  # psmamba seconds / ANTs seconds per split
    "memory_max_bytes": 4e9,  # psmamba's peak resident memory, 4 GB
    "misaligned_dice_tol": 0.01,  # |Dice(misaligned) - Dice(aligned)|
    "self_max_disp_vox": 0.1,  # self-registration
    "spike_dice_tol": 0.01,  # one 1e6 voxel
}
#: the misalignment (issue 13): rotation (degrees), translation (mm), per-axis scale
MISALIGN_ROT_DEG = (8.0, 15.0)
MISALIGN_SHIFT_MM = (5.0, 10.0)
MISALIGN_SCALE = 0.05
PAIR_COLUMNS = ("split", "method", "pair_id", "moving", "fixed", "status", "dice_mean", "dice_before_mean",
                "hd95_mean_mm", "folding_percent", "sdlogj", "max_disp_vox", "seconds", "call_seconds",
                "peak_rss_mib", "rss_before_mib", "order", "ran_as", "error")


# --------------------------------------------------------------------------- data
@dataclass
class PairData:
    """One ordered pair on a common grid (the arrays a method sees)."""

    pair_id: str
    moving_id: str
    fixed_id: str
    fixed: np.ndarray  # (D, H, W) float32
    moving: np.ndarray  # (D, H, W) float32
    fixed_labels: np.ndarray  # (D, H, W) integer
    moving_labels: np.ndarray  # (D, H, W) integer
    affine: np.ndarray  # (4, 4) the grid's voxel -> world (both images)
    motion: list | None = None  # the misalignment's 4x4 world matrix, if any


@dataclass
class BenchData:
    """The pairs of the benchmark: ``pairs[base split]`` -> list of :class:`PairData`."""

    name: str
    pairs: dict[str, list[PairData]]
    label_names: dict[int, str] = field(default_factory=dict)


def demo_bench_data(size: str = "full", pairs_per_split: int | None = None, one_way: bool = False,
                    grid: Sequence[int] | None = None, splits: Sequence[str] = ("test", "test_hard")) -> BenchData:
    """The demo's ``test`` and ``test_hard`` pairs (built on first use, then cached).

    Args:
        size: the demo size, ``"full"`` (160x192x160 at 1 mm) or ``"small"`` (64x80x64 at 2.5 mm).
        pairs_per_split: keep only the first N ordered pairs of each split.
        one_way: keep one direction of each pair (A->B, not also B->A).
        grid: resample every volume to this grid (images trilinear, labels nearest) with the
            affine scaled to match (``--quick``).
        splits: the demo splits to take (``val`` for experiments that must not see the test pairs).
    """
    from psmamba.data.demo import build_demo

    demo = build_demo(size=size)
    cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def vol(vid: str):
        if vid not in cache:
            v = demo.load(vid)
            img, lab, aff = np.asarray(v.image, np.float32), np.asarray(v.labels), np.asarray(v.affine, np.float64)
            if grid is not None and tuple(grid) != img.shape:
                img, lab, aff = _resample_grid(img, lab, aff, tuple(int(g) for g in grid))
            cache[vid] = (img, lab, aff)
        return cache[vid]

    out: dict[str, list[PairData]] = {}
    for split in splits:
        seen: set[frozenset] = set()
        chosen = []
        for m, f in demo.pairs[split]:
            if one_way and frozenset((m, f)) in seen:
                continue
            seen.add(frozenset((m, f)))
            chosen.append((m, f))
        if pairs_per_split is not None:
            chosen = chosen[:pairs_per_split]
        rows = []
        for m, f in chosen:
            (mi, ml, _), (fi, fl, fa) = vol(m), vol(f)  # one grid: the fixed affine serves both
            rows.append(PairData(f"{m}->{f}", m, f, fi, mi, fl, ml, fa))
        out[split] = rows
    shape = next(iter(cache.values()))[0].shape
    return BenchData(f"psmamba demo ({size}, {'x'.join(map(str, shape))})", out, dict(demo.label_names))


def _resample_grid(img: np.ndarray, lab: np.ndarray, aff: np.ndarray, grid: tuple[int, int, int]):
    """A volume resized to ``grid`` (corner voxels kept, ``align_corners`` style), affine to match."""
    import torch

    from psmamba.spatial import resize_volume

    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    img2 = resize_volume(t, grid)[0, 0].numpy().astype(np.float32)
    lab2 = resize_volume(torch.from_numpy(lab.astype(np.int64))[None, None], grid, labels=True)[0, 0].numpy()
    scale = [(s - 1) / (g - 1) for s, g in zip(img.shape, grid)]
    aff2 = aff.copy()
    aff2[:3, :3] = aff[:3, :3] @ np.diag(scale)
    return img2, lab2.astype(lab.dtype), aff2


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def motion_matrix(seed: Sequence[int] | int, centre_mm: Sequence[float]) -> tuple[np.ndarray, dict[str, Any]]:
    """A seeded random motion of issue 13's misalignment, as a 4x4 world matrix ``M``.

    ``M = T(centre + t) R S T(-centre)``: a per-axis scale ``S`` (each factor uniform in
    1 +- 5 %), a rotation ``R`` by an angle uniform in 8-15 degrees about a uniformly random
    axis, a translation ``t`` of length uniform in 5-10 mm in a uniformly random direction,
    all about ``centre_mm``. A point of the moving object at world ``x`` moves to ``M x``.

    Returns ``(M, parameters)``.
    """
    rng = np.random.default_rng(seed)
    axis = _unit(rng)
    angle = np.deg2rad(rng.uniform(*MISALIGN_ROT_DEG))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)  # Rodrigues
    shift = _unit(rng) * rng.uniform(*MISALIGN_SHIFT_MM)
    scale = 1.0 + rng.uniform(-MISALIGN_SCALE, MISALIGN_SCALE, size=3)
    c = np.asarray(centre_mm, dtype=np.float64)
    lin = rot @ np.diag(scale)
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = c + shift - lin @ c
    params = {"axis": axis.tolist(), "angle_deg": float(np.rad2deg(angle)), "shift_mm": shift.tolist(),
              "scale": scale.tolist(), "centre_mm": c.tolist()}
    return m, params


def misalign(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, motion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move an image's content by the world motion ``motion`` (4x4), on the SAME grid and header.

    The new image at world ``y`` is the old one at ``motion^-1 y`` (image trilinear, labels
    nearest, zero outside). Shapes: ``(D, H, W)`` in, ``(D, H, W)`` out.
    """
    img = _move(np.asarray(image, np.float32), affine, motion, order=1)
    return img.astype(np.float32), _move(np.asarray(labels), affine, motion, order=0).astype(labels.dtype)


def _move(volume: np.ndarray, affine: np.ndarray, motion: np.ndarray, order: int) -> np.ndarray:
    """``volume`` resampled at ``motion^-1`` (world) on its own grid: trilinear (1) or nearest (0), zero outside."""
    from scipy import ndimage

    aff = np.asarray(affine, dtype=np.float64)
    vox = np.linalg.inv(aff) @ np.linalg.inv(motion) @ aff  # output voxel -> input voxel
    return ndimage.affine_transform(volume, vox[:3, :3], vox[:3, 3], order=order, cval=0)


def _misaligned(p: PairData, seed: int) -> PairData:
    centre = (np.asarray(p.affine) @ np.r_[(np.asarray(p.moving.shape) - 1) / 2.0, 1.0])[:3]
    m, params = motion_matrix([int(seed), zlib.crc32(p.pair_id.encode())], centre)
    from psmamba.metrics import mean_dice

    img, lab = misalign(p.moving, p.moving_labels, p.affine, m)
    # What resampling the labels costs by itself: the motion undone exactly (nearest again) gives
    # the best Dice before registration a registration could get back, next to the aligned pair's.
    params["dice_before_motion_undone"] = float(mean_dice(p.fixed_labels, _move(lab, p.affine, np.linalg.inv(m), 0)))
    params["dice_before_aligned"] = float(mean_dice(p.fixed_labels, p.moving_labels))
    return PairData(p.pair_id, p.moving_id, p.fixed_id, p.fixed, img, p.fixed_labels, lab, p.affine,
                    motion=[m.tolist(), params])


# --------------------------------------------------------------------------- availability
def method_available(name: str, python: str | None = None) -> tuple[bool, str]:
    """``(True, "")`` when method ``name`` can run (in ``python``, default this interpreter), else ``(False, reason)``."""
    module = {"psmamba": "psmamba", "ants_syn": "ants", "convexadam": "convexAdam", "fireants": "fireants"}.get(name)
    if module is None:
        return False, f"unknown method {name!r}; choose from {', '.join(METHODS)}"
    hint = {"ants": "pip install antspyx", "convexAdam": "pip install convexadam",
            "fireants": "pip install fireants (it pins SimpleITK==2.2.1: use its own venv and --python fireants=PATH)"}
    if python is None:
        found = importlib.util.find_spec(module) is not None
    else:
        code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
        try:
            found = subprocess.run([python, "-c", code], timeout=120, env=_child_env(), check=False).returncode == 0
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"{python} does not run: {exc}"
    if not found:
        return False, f"{module} is not installed{'' if python is None else ' in ' + python} ({hint.get(module, '')})"
    return True, ""


# --------------------------------------------------------------------------- the child
def _child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # what the psmamba command line sets before torch loads (psmamba.cli.quiet_openmp), here for
    # every method's process alike (it helps any torch-based one: ConvexAdam too)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
            env[k] = str(int(threads))
    return env


def _vm_kib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def _peak_mib() -> float:
    """This process's resident high-water mark (MiB): ``VmHWM``, else ``ru_maxrss``."""
    try:
        return _vm_kib("VmHWM") / 1024
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    try:
        return _vm_kib("VmRSS") / 1024
    except OSError:
        return float("nan")


def _run_psmamba(p: dict, spacing: tuple[float, ...], threads: int, method: str = "default",
                 checkpoint: str | None = None) -> tuple[np.ndarray, float, str, float | None]:
    from psmamba.engine.register import register_pair
    from psmamba.io import Image

    aff = np.asarray(p["affine"], dtype=np.float64)

    def img(a: np.ndarray, name: str) -> Image:
        return Image(data=a, affine=aff, header=None, path=name)  # type: ignore[arg-type]

    kwargs = {"moving_labels": img(p["moving_labels"], "moving_labels"),
              "fixed_labels": img(p["fixed_labels"], "fixed_labels"), "device": "cpu", "overview": False}
    if checkpoint and (method == "default" or "network" in method):
        kwargs["checkpoint"] = checkpoint
    t0 = time.perf_counter()
    res = register_pair(img(p["fixed"], "fixed"), img(p["moving"], "moving"), method=method, **kwargs)
    call = time.perf_counter() - t0
    timings = res.summary.get("timings_s", {})
    # the registration proper: the call less its own output metrics (Jacobian, Dice) and writing
    seconds = call - float(timings.get("metrics", 0.0)) - float(timings.get("write", 0.0))
    ran_as = f'register_pair(method="{method}") -> {res.summary.get("method", "?")}'
    return np.asarray(res.ddf, dtype=np.float32), seconds, ran_as, call


def _run_ants(p: dict, spacing, threads: int, seed: int) -> tuple[np.ndarray, float, str, float | None]:
    import torch

    from benchmarks.peers import AntsSyN

    ants = AntsSyN(spacing=spacing, type_of_transform="SyN", threads=threads, seed=seed)
    m = torch.from_numpy(np.ascontiguousarray(p["moving"]))[None, None]
    f = torch.from_numpy(np.ascontiguousarray(p["fixed"]))[None, None]
    out = ants(m, f)
    return out.ddf[0].numpy().astype(np.float32), ants.last_seconds, 'ants.registration(type_of_transform="SyN")', None


def _run_convexadam(p: dict, spacing, threads: int) -> tuple[np.ndarray, float, str, float | None]:
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    t0 = time.perf_counter()
    disp = convex_adam_pt(np.ascontiguousarray(p["fixed"]), np.ascontiguousarray(p["moving"]), device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    # (D, H, W, 3) voxel displacements along the array axes, Learn2Reg's convention = psmamba's
    return np.ascontiguousarray(np.moveaxis(np.asarray(disp, np.float32), -1, 0)), seconds, "convex_adam_pt(defaults)", None


def _run_fireants(p: dict, spacing, threads: int) -> tuple[np.ndarray, float, str, float | None]:
    import SimpleITK as sitk
    import torch
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration

    def im(a):
        s = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
        s.SetSpacing([float(x) for x in spacing[::-1]])  # ITK's x is the last array axis
        return BatchedImages([Image(s, device="cpu")])

    t0 = time.perf_counter()
    fx, mv = im(p["fixed"]), im(p["moving"])
    # FireANTs' README settings for brain MRI (affine, then greedy deformable)
    aff = AffineRegistration([6, 4, 2, 1], [200, 100, 50, 20], fx, mv, loss_type="cc", optimizer="Adam",
                             optimizer_lr=3e-3)
    aff.optimize()
    reg = GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 50], fixed_images=fx, moving_images=mv,
                             cc_kernel_size=5, deformation_type="compositive", smooth_grad_sigma=1, optimizer="adam",
                             optimizer_lr=0.5, init_affine=aff.get_affine_matrix().detach())
    reg.optimize()
    with torch.no_grad():
        coords = reg.get_warped_coordinates(fx, mv)[0].float()  # (D, H, W, 3) normalised (x, y, z) = (W, H, D)
    seconds = time.perf_counter() - t0
    shape = p["fixed"].shape
    vox = torch.stack([(coords[..., 2 - i] + 1) * (shape[i] - 1) / 2 for i in range(3)])  # align_corners=True
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    return (vox - grid).numpy().astype(np.float32), seconds, "FireANTs affine + greedy (README settings)", None


def child_main(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run ONE method on ONE pair in this (fresh) process; the result row (metrics, time, memory).

    With ``spec["task"] == "robustness"``: psmamba on the pair's fixed image against itself and on
    the pair with one moving voxel set to 1e6 (``spec["spike_at"]``), as ``{"self": row, "spike": row}``.
    """
    threads = int(spec.get("threads") or 2)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # before antspyx is imported
    import torch

    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass
    with np.load(spec["pair_file"]) as z:
        p = {k: z[k] for k in z.files}
    if spec.get("task") != "robustness":
        return _register_and_score(p, spec["method"], spec, threads)
    same = {**p, "moving": p["fixed"].copy(), "moving_labels": p["fixed_labels"].copy()}
    spiked = {**p, "moving": p["moving"].copy()}
    spiked["moving"][tuple(int(i) for i in spec["spike_at"])] = 1e6
    return {"status": "ok", "self": _register_and_score(same, "psmamba", {**spec, "hd95": False}, threads),
            "spike": _register_and_score(spiked, "psmamba", {**spec, "hd95": False}, threads)}


def _register_and_score(p: dict[str, np.ndarray], name: str, spec: Mapping[str, Any], threads: int) -> dict[str, Any]:
    import torch

    from psmamba import metrics
    from psmamba.spatial import warp

    spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(p["affine"])[:3, :3], axis=0))
    rss_before = _rss_mib()
    # each runner: (ddf (3, D, H, W) voxels, seconds, how it ran, seconds of the whole call or None)
    if name == "psmamba":
        ddf, seconds, ran_as, call_seconds = _run_psmamba(p, spacing, threads, spec.get("psmamba_method", "default"),
                                                           spec.get("checkpoint"))
    elif name == "ants_syn":
        ddf, seconds, ran_as, call_seconds = _run_ants(p, spacing, threads, int(spec.get("seed", 1)))
    elif name == "convexadam":
        ddf, seconds, ran_as, call_seconds = _run_convexadam(p, spacing, threads)
    elif name == "fireants":
        ddf, seconds, ran_as, call_seconds = _run_fireants(p, spacing, threads)
    else:
        raise ValueError(f"unknown method {name!r}")
    peak = _peak_mib()  # before scoring: the metrics below are not the method's memory
    if ddf.shape != (3, *p["fixed"].shape):
        raise ValueError(f"{name}: field of shape {ddf.shape}, expected {(3, *p['fixed'].shape)}")
    lab = torch.from_numpy(p["moving_labels"].astype(np.int64))[None, None]
    warped = warp(lab, torch.from_numpy(ddf)[None], mode="nearest")[0, 0].numpy()
    labels, _ = metrics.shared_labels(p["fixed_labels"], p["moving_labels"])  # as register/evaluate score
    d_after = metrics.dice(p["fixed_labels"], warped, labels=labels)
    d_before = metrics.dice(p["fixed_labels"], p["moving_labels"], labels=labels)
    row: dict[str, Any] = {
        "status": "ok", "ran_as": ran_as,
        "dice_mean": _nanmean(d_after.values()), "dice_before_mean": _nanmean(d_before.values()),
        "dice_per_label": {int(k): float(v) for k, v in d_after.items()},
        "folding_percent": float(metrics.folding_percent(ddf)), "sdlogj": float(metrics.sdlogj(ddf)),
        "max_disp_vox": float(np.sqrt((ddf.astype(np.float64) ** 2).sum(0)).max()),
        "seconds": float(seconds), "call_seconds": float(seconds if call_seconds is None else call_seconds),
        "peak_rss_mib": float(peak), "rss_before_mib": float(rss_before),
        "threads": {"torch": torch.get_num_threads(), "itk_env": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")},
    }
    if spec.get("hd95", True):
        row["hd95_mean_mm"] = _nanmean(metrics.hd95(p["fixed_labels"], warped, spacing=spacing, labels=labels).values())
    return row


def _nanmean(values) -> float:
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    return float(np.nanmean(v)) if v.size and not np.all(np.isnan(v)) else float("nan")


def _run_child(spec: dict, python: str | None, timeout_s: float, threads: int) -> dict[str, Any]:
    """``python -m benchmarks.bench_register --child spec`` in a fresh process; its row, or an error row."""
    cmd = [python or sys.executable, "-m", "benchmarks.bench_register", "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_child_env(threads),
                              cwd=str(REPO_ROOT), check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return {**json.loads(line[len(RESULT_MARKER):]), "process_seconds": wall}
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    status = "oom" if proc.returncode in (-9, 137) or "MemoryError" in tail or "bad_alloc" in tail else "error"
    return {"status": status, "error": f"rc {proc.returncode}: {tail[-500:]}", "process_seconds": wall}


# --------------------------------------------------------------------------- the run
def _save_pair(p: PairData, folder: Path, tag: str) -> Path:
    path = folder / f"{tag}.npz"
    np.savez(path, fixed=p.fixed, moving=p.moving, fixed_labels=p.fixed_labels, moving_labels=p.moving_labels,
             affine=np.asarray(p.affine, np.float64))
    return path


def method_order(methods: Sequence[str], k: int) -> list[str]:
    """The order the methods run in on the ``k``-th pair: rotated by one per pair, so each
    method goes first, second, ... equally often (a drift of the machine's speed hits all alike)."""
    n = len(methods)
    return [methods[(k + i) % n] for i in range(n)] if n else []


def _spike_voxel(image: np.ndarray, seed: int) -> list[int]:
    """A seeded voxel inside the image's foreground (where the spike goes)."""
    idx = np.argwhere(image > np.percentile(image, 75))
    return [int(i) for i in idx[np.random.default_rng(seed).integers(len(idx))]]


def run_register_bench(
    data: BenchData,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    splits: Sequence[str] = tuple(s[0] for s in SPLITS),
    pythons: Mapping[str, str] | None = None,
    threads: int = 2,
    seed: int = 0,
    hd95: bool = True,
    robustness: bool = True,
    timeout_s: float = 3600.0,
    progress: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Every available method on every pair of ``splits``, each in a fresh process, order rotated per pair.

    Args:
        data: the pairs (:func:`demo_bench_data`, or tiny volumes in tests).
        methods: names from :data:`METHODS`; those that cannot run are recorded in ``"unavailable"``.
        splits: names from :data:`SPLITS`.
        pythons: method -> interpreter to run its processes with (default: this one).
        threads: torch / numba / ITK threads of every process.
        seed: the seed of the misalignments (and of ANTs' sampling, ``seed + 1``).
        hd95: compute HD95 (the slowest metric).
        robustness: also the self-registration and the 1e6-voxel checks of psmamba.
        timeout_s: seconds per process.
        progress: called with the partial result after every process (e.g. to write it out).

    Returns ``{"settings", "unavailable", "rows", "robustness", "load_before", "load_after", "seconds"}``.
    """
    say = log or (lambda _m: None)
    pythons = dict(pythons or {})
    unknown = [s for s in splits if s not in {n for n, _, _ in SPLITS}]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; choose from {[n for n, _, _ in SPLITS]}")
    unavailable: dict[str, str] = {}
    runnable = []
    for m in methods:
        ok, why = method_available(m, pythons.get(m))
        if ok:
            runnable.append(m)
        else:
            unavailable[m] = why
            say(f"{m}: not available: {why}")
    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "settings": {"data": data.name, "methods": list(methods), "splits": list(splits), "threads": threads,
                     "seed": seed, "hd95": hd95, "pythons": pythons,
                     "misalignment": {"rotation_deg": MISALIGN_ROT_DEG, "shift_mm": MISALIGN_SHIFT_MM,
                                      "scale_per_axis": [1 - MISALIGN_SCALE, 1 + MISALIGN_SCALE]},
                     "n_pairs": {k: len(v) for k, v in data.pairs.items()}},
        "unavailable": unavailable, "rows": [], "robustness": {}, "motions": {}, "load_before": load_average(),
    }
    k = 0  # runs so far: rotates the method order
    with tempfile.TemporaryDirectory(prefix="psmamba-bench-register-") as tmp:
        folder = Path(tmp)
        for split, base, moved in SPLITS:
            if split not in splits:
                continue
            for i, pair in enumerate(data.pairs.get(base, [])):
                p = _misaligned(pair, seed) if moved else pair
                if moved:
                    result["motions"][f"{split}/{p.pair_id}"] = p.motion[1]
                path = _save_pair(p, folder, f"{split}_{i}")
                order = method_order(runnable, k)
                k += 1
                for j, m in enumerate(order):
                    spec = {"method": m, "pair_file": str(path), "threads": threads, "hd95": hd95, "seed": seed + 1}
                    row = _run_child(spec, pythons.get(m), timeout_s, threads)
                    row.update(split=split, method=m, pair_id=p.pair_id, moving=p.moving_id, fixed=p.fixed_id, order=j)
                    result["rows"].append(row)
                    say(f"{split} {p.pair_id} {m}: " + (
                        f"Dice {fmt(row.get('dice_mean'))} (before {fmt(row.get('dice_before_mean'))}), "
                        f"folding {fmt(row.get('folding_percent'), 4)} %, {fmt(row.get('seconds'), 1)} s, "
                        f"peak {fmt(row.get('peak_rss_mib'), 0)} MiB" if row.get("status") == "ok"
                        else f"{row.get('status')}: {row.get('error')}"))
                    if progress:
                        progress(result)
                path.unlink()
        if robustness and "psmamba" in runnable and data.pairs.get("test"):
            p = data.pairs["test"][0]
            path = _save_pair(p, folder, "robustness")
            spike_at = _spike_voxel(p.moving, seed)
            spec = {"method": "psmamba", "pair_file": str(path), "threads": threads, "task": "robustness",
                    "spike_at": spike_at}
            both = _run_child(spec, pythons.get("psmamba"), timeout_s, threads)  # one process, two registrations
            for task in ("self", "spike"):
                row = dict(both.get(task) or both)  # a failed process: its error row for both
                row.update(pair_id=p.fixed_id if task == "self" else p.pair_id, spike_at=spike_at if task == "spike" else None)
                result["robustness"][task] = row
                say(f"robustness {task} {row['pair_id']}: " + (
                    f"max displacement {fmt(row.get('max_disp_vox'), 4)} vox, Dice {fmt(row.get('dice_mean'), 4)}"
                    if row.get("status") == "ok" else f"{row.get('status')}: {row.get('error')}"))
            if progress:
                progress(result)
    result["load_after"] = load_average()
    result["seconds"] = time.perf_counter() - t_all
    return result


# --------------------------------------------------------------------------- summaries and goals
def _ok(rows, **match) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _mean(rows, key) -> float:
    return _nanmean([r.get(key, float("nan")) if r.get(key) is not None else float("nan") for r in rows]) if rows else float("nan")


def summarize(result: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per split, per method: means over the pairs (and the time ratio to ANTs SyN on the same pairs)."""
    rows = result["rows"]
    out: dict[str, list[dict[str, Any]]] = {}
    for split in result["settings"]["splits"]:
        ants_s = _mean(_ok(rows, split=split, method="ants_syn"), "seconds")
        lst = []
        for m in result["settings"]["methods"]:
            if m in result.get("unavailable", {}):
                lst.append({"method": m, "n": 0, "status": f"not available: {result['unavailable'][m]}"})
                continue
            every = [r for r in rows if r.get("split") == split and r.get("method") == m]
            ok = _ok(every)
            failed = [r for r in every if r.get("status") != "ok"]
            sd = float(np.std([r["dice_mean"] for r in ok])) if len(ok) > 1 else float("nan")
            sec = _mean(ok, "seconds")
            lst.append({
                "method": m, "n": len(ok), "failed": len(failed),
                "status": "ok" if not failed else f"{len(failed)} failed: {failed[0].get('status')}: {failed[0].get('error', '')[:200]}",
                "dice": _mean(ok, "dice_mean"), "dice_sd": sd, "dice_before": _mean(ok, "dice_before_mean"),
                "hd95_mm": _mean(ok, "hd95_mean_mm"), "folding_percent": _mean(ok, "folding_percent"),
                "folding_percent_max": max((r["folding_percent"] for r in ok), default=float("nan")),
                "sdlogj": _mean(ok, "sdlogj"), "seconds": sec,
                "time_vs_ants": sec / ants_s if ants_s and math.isfinite(ants_s) and ants_s > 0 else float("nan"),
                "peak_rss_mib_max": max((r["peak_rss_mib"] for r in ok), default=float("nan")),
                "ran_as": sorted({r.get("ran_as", "") for r in ok}),
            })
        out[split] = lst
    return out


def _goal(name: str, split: str, value: float, limit: float, passed: bool | None, text: str) -> dict[str, Any]:
    return {"goal": name, "split": split, "value": value, "limit": limit,
            "verdict": "n/a" if passed is None else ("PASS" if passed else "FAIL"), "text": text}


def evaluate_goals(result: Mapping[str, Any], summaries: Mapping[str, list[dict]] | None = None) -> list[dict[str, Any]]:
    """Issue 13's goals from the figures of this run: one ``{"goal", "split", "verdict", "text", ...}`` each.

    ``verdict`` is ``PASS``, ``FAIL`` or ``n/a`` (a figure missing: a method not run or failed).
    """
    summaries = summaries or summarize(result)
    g = []
    nan = float("nan")

    def row(split, method):
        return next((s for s in summaries.get(split, []) if s["method"] == method and s.get("n")), None)

    for split in result["settings"]["splits"]:
        ps, an = row(split, "psmamba"), row(split, "ants_syn")
        if ps is None:
            g.append(_goal("psmamba runs", split, nan, nan, None, "no psmamba result"))
            continue
        if an is not None:
            g.append(_goal("Dice >= ANTs SyN", split, ps["dice"] - an["dice"], 0.0, ps["dice"] >= an["dice"],
                           f"psmamba {ps['dice']:.4f} vs ANTs {an['dice']:.4f}"))
            r = ps["time_vs_ants"]
            g.append(_goal("time <= 1/3 of ANTs SyN", split, r, GOALS["time_ratio_max"], r <= GOALS["time_ratio_max"],
                           f"{ps['seconds']:.1f} s vs {an['seconds']:.1f} s (ratio {r:.3f})"))
        else:
            g.append(_goal("Dice >= ANTs SyN", split, nan, 0.0, None, "no ANTs SyN result"))
            g.append(_goal("time <= 1/3 of ANTs SyN", split, nan, GOALS["time_ratio_max"], None, "no ANTs SyN result"))
        f = ps["folding_percent"]
        g.append(_goal("folding <= 0.01 %", split, f, GOALS["folding_percent_max"], f <= GOALS["folding_percent_max"],
                       f"mean {f:.4f} %, worst pair {ps['folding_percent_max']:.4f} %"))
        mem = ps["peak_rss_mib_max"] * 2**20
        g.append(_goal("peak memory <= 4 GB", split, mem / 1e9, GOALS["memory_max_bytes"] / 1e9,
                       mem <= GOALS["memory_max_bytes"], f"worst pair {mem / 1e9:.2f} GB ({ps['peak_rss_mib_max']:.0f} MiB)"))
    rows = result["rows"]
    for moved, base in (("test_misaligned", "test"), ("test_hard_misaligned", "test_hard")):
        a = {r["pair_id"]: r["dice_mean"] for r in _ok(rows, split=base, method="psmamba")}
        b = {r["pair_id"]: r["dice_mean"] for r in _ok(rows, split=moved, method="psmamba")}
        common = sorted(set(a) & set(b))
        if not common:
            if moved in result["settings"]["splits"]:
                g.append(_goal("misaligned Dice within 0.01", moved, nan, GOALS["misaligned_dice_tol"], None,
                               f"no psmamba results on both {base} and {moved}"))
            continue
        diffs = [b[c] - a[c] for c in common]
        mean_diff = float(np.mean(diffs))
        worst = max(diffs, key=abs)
        g.append(_goal("misaligned Dice within 0.01", moved, mean_diff, GOALS["misaligned_dice_tol"],
                       abs(mean_diff) <= GOALS["misaligned_dice_tol"],
                       f"mean Dice {np.mean([b[c] for c in common]):.4f} vs {np.mean([a[c] for c in common]):.4f} aligned "
                       f"(difference {mean_diff:+.4f}; worst pair {worst:+.4f}; {len(common)} pairs)"))
    rob = result.get("robustness", {})
    s = rob.get("self")
    if s is not None:
        ok = s.get("status") == "ok"
        v = s.get("max_disp_vox", nan) if ok else nan
        g.append(_goal("self-registration max displacement < 0.1 voxel", "robustness", v, GOALS["self_max_disp_vox"],
                       (v < GOALS["self_max_disp_vox"]) if ok else None,
                       f"{v:.4f} voxel ({s.get('pair_id')})" if ok else f"{s.get('status')}: {s.get('error')}"))
    sp = rob.get("spike")
    if sp is not None:
        ref = next((r for r in _ok(rows, split="test", method="psmamba") if r["pair_id"] == sp.get("pair_id")), None)
        if sp.get("status") == "ok" and ref is not None:
            d = sp["dice_mean"] - ref["dice_mean"]
            g.append(_goal("one 1e6 voxel changes Dice < 0.01", "robustness", d, GOALS["spike_dice_tol"],
                           abs(d) < GOALS["spike_dice_tol"],
                           f"Dice {sp['dice_mean']:.4f} with the spike vs {ref['dice_mean']:.4f} without ({d:+.4f})"))
        else:
            g.append(_goal("one 1e6 voxel changes Dice < 0.01", "robustness", nan, GOALS["spike_dice_tol"], None,
                           "no spike result, or no psmamba result on the same test pair"))
    return g


def goals_text(goals: Sequence[Mapping[str, Any]]) -> str:
    """The goals as lines ``PASS  goal [split]: figures``."""
    return "\n".join(f"{x['verdict']:<4}  {x['goal']} [{x['split']}]: {x['text']}" for x in goals)


# --------------------------------------------------------------------------- writing
def register_markdown(result: Mapping[str, Any], machine: Mapping[str, Any], command: str) -> str:
    """The report: command, machine, one table per split, the goals."""
    summaries = summarize(result)
    st = result["settings"]
    lines = [
        "# psmamba register (default pipeline) vs ANTs SyN and peers (issue 13)", "",
        f"- command: `{command}`", *machine_lines(machine),
        f"- data: {st['data']}; pairs per split: {st['n_pairs']}; threads per process: {st['threads']}; seed {st['seed']}",
        (f"- load average before / after: {result.get('load_before')} / {result.get('load_after')}; "
         f"whole run {fmt(result.get('seconds'), 0)} s"),
        (f"- misalignment: rotation {MISALIGN_ROT_DEG[0]}-{MISALIGN_ROT_DEG[1]} degrees about a random axis, shift "
         f"{MISALIGN_SHIFT_MM[0]}-{MISALIGN_SHIFT_MM[1]} mm, scale {1 - MISALIGN_SCALE:.2f}-{1 + MISALIGN_SCALE:.2f} per "
         "axis, about the image centre, moving voxels and labels (header unchanged)"),
        ("- seconds: wall time from the arrays in memory to the whole field on the fixed grid, one fresh process per "
         "method and pair, method order rotated per pair; peak memory: that process's resident high-water mark "
         "(interpreter, torch and the pair's arrays included)"),
    ]
    undone = [v for v in result.get("motions", {}).values() if "dice_before_motion_undone" in v]
    if undone:
        loss = np.mean([v["dice_before_aligned"] - v["dice_before_motion_undone"] for v in undone])
        lines.append(f"- what resampling the labels costs: the motion undone exactly leaves the Dice before "
                     f"registration {loss:.4f} below the aligned pair's (mean over the misaligned pairs)")
    for m, why in result.get("unavailable", {}).items():
        lines.append(f"- {METHODS.get(m, m)}: not available: {why}")
    ran = sorted({r.get("ran_as", "") for r in result["rows"] if r.get("method") == "psmamba" and r.get("ran_as")})
    if ran:
        lines.append(f"- psmamba ran as: {'; '.join(ran)}")
    headers = ["method", "pairs", "Dice", "Dice before", "HD95 (mm)", "folding % (mean / max)", "SDlogJ",
               "seconds", "time / ANTs", "peak memory (MiB)", "status"]
    for split in st["splits"]:
        lines += ["", f"## {split}", ""]
        body = []
        for s in summaries[split]:
            if not s.get("n") and s["status"] != "ok":
                body.append([METHODS.get(s["method"], s["method"]), 0] + ["-"] * 8 + [s["status"]])
                continue
            body.append([
                METHODS.get(s["method"], s["method"]), s["n"], f"{fmt(s['dice'], 4)} ± {fmt(s['dice_sd'], 4)}",
                fmt(s["dice_before"], 4), fmt(s["hd95_mm"], 2),
                f"{fmt(s['folding_percent'], 4)} / {fmt(s['folding_percent_max'], 4)}", fmt(s["sdlogj"], 4),
                fmt(s["seconds"], 1), fmt(s["time_vs_ants"], 3), fmt(s["peak_rss_mib_max"], 0), s["status"],
            ])
        lines.append(markdown_table(headers, body))
    goals = evaluate_goals(result, summaries)
    lines += ["", "## Goals (issue 13), from this run", "", markdown_table(
        ["verdict", "goal", "split", "figures"], [[x["verdict"], x["goal"], x["split"], x["text"]] for x in goals],
        align="llll")]
    return "\n".join(lines) + "\n"


def plot_register(result: Mapping[str, Any], path: Path, labels: Mapping[str, str] = METHODS) -> Path:
    """Dice against seconds per pair: one panel per split, each pair a faint dot, the mean a marker
    (``labels``: method name -> legend label, also fixing the colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = result["settings"]["splits"]
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(4.6 * max(1, len(splits)), 4.0), squeeze=False)
    colours = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, split in zip(axes[0], splits):
        for m in result["settings"]["methods"]:
            ok = _ok(result["rows"], split=split, method=m)
            if not ok:
                continue
            t = [max(r["seconds"], 1e-2) for r in ok]
            d = [r["dice_mean"] for r in ok]
            ax.scatter(t, d, s=12, alpha=0.35, color=colours.get(m))
            ax.scatter([np.mean(t)], [np.mean(d)], s=60, marker="D", color=colours.get(m), label=labels.get(m, m))
        ax.set(xscale="log", xlabel="seconds per pair (log)", ylabel="mean Dice over labels", title=split)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(result["settings"]["data"], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_register(result: Mapping[str, Any], machine: Mapping[str, Any], command: str, out_dir: Path = RESULTS_DIR,
                   tag: str = "", plot: bool = True) -> list[Path]:
    """``register{tag}.json``, ``.csv``, ``.md`` (and ``.png``)."""
    out_dir = Path(out_dir)
    stem = f"register{tag}"
    summaries = summarize(result)
    goals = evaluate_goals(result, summaries)
    paths = [
        write_json(out_dir / f"{stem}.json", {"command": command, "machine": machine, **result,
                                               "summaries": summaries, "goals": goals}),
        write_csv(out_dir / f"{stem}.csv", result["rows"], PAIR_COLUMNS),
        write_text(out_dir / f"{stem}.md", register_markdown(result, machine, command)),
    ]
    if plot:
        paths.append(plot_register(result, out_dir / f"{stem}.png"))
    return paths


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_register", description=(
        "psmamba's default registration against ANTs SyN (and ConvexAdam, FireANTs) on the demo's full-size "
        "test and test_hard pairs and misaligned copies of them (issue 13)."))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the small demo (64x80x64 at 2.5 mm), one pair per split")
    p.add_argument("--methods", nargs="+", default=None, choices=tuple(METHODS),
                   help=f"default: {' '.join(DEFAULT_METHODS)} (FireANTs is opt-in: slow on a CPU)")
    p.add_argument("--splits", nargs="+", default=None, choices=[s[0] for s in SPLITS])
    p.add_argument("--python", action="append", default=[], metavar="METHOD=PATH",
                   help="run METHOD's processes with this interpreter (e.g. fireants=/venvs/fa/bin/python)")
    p.add_argument("--pairs", type=int, default=None, help="first N ordered pairs per split (default: all; --quick: 1)")
    p.add_argument("--one-way", action="store_true", help="one direction of each pair (A->B, not B->A): half the pairs")
    p.add_argument("--grid", default=None,
                   help="resample the pairs to this grid (default: the demo's own, 64x80x64 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--no-robustness", action="store_true", help="skip psmamba's self-registration and 1e6-voxel runs")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", default=None, help="result file suffix (default: _quick with --quick, else none)")
    p.add_argument("--wait-load", type=float, default=0.0, metavar="LOAD",
                   help="first wait (up to --max-wait s) until the 1-minute load average is below LOAD")
    p.add_argument("--max-wait", type=float, default=900.0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None, data: BenchData | None = None) -> int:
    """The command line; ``data`` replaces the demo pairs (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        try:
            row = child_main(spec)
        except Exception as exc:  # noqa: BLE001  (any failure of a method is its row's error; the run goes on)
            row = {"status": "oom" if "memory" in str(exc).lower() else "error", "error": f"{type(exc).__name__}: {exc}"[:800]}
        print(RESULT_MARKER + json.dumps(row, default=float))
        return 0
    from benchmarks.common import machine_info, parse_size, wait_for_load

    pythons = {}
    for item in args.python:
        name, _, path = item.partition("=")
        if name not in METHODS or not path:
            raise SystemExit(f"--python must be METHOD=PATH with METHOD one of {', '.join(METHODS)}, got {item!r}")
        pythons[name] = path
    command = "python -m benchmarks.bench_register" + ("" if not argv else " " + shlex.join(argv))
    tag = args.tag if args.tag is not None else ("_quick" if args.quick else "")
    if data is None:
        if args.quick:
            data = demo_bench_data("small", pairs_per_split=args.pairs or 1, one_way=args.one_way,
                                   grid=parse_size(args.grid) if args.grid else None)
        else:
            data = demo_bench_data("full", pairs_per_split=args.pairs, one_way=args.one_way,
                                   grid=parse_size(args.grid) if args.grid else None)
    if args.wait_load:
        print(f"load average {wait_for_load(args.wait_load, args.max_wait, log=print)}: starting")
    import torch

    torch.set_num_threads(args.threads)  # recorded by machine_info; every measurement runs in its own process
    machine = machine_info()
    print(f"{command}: {data.name}, pairs {({k: len(v) for k, v in data.pairs.items()})}, load average {load_average()}")

    result = run_and_report(
        args.out, f"register{tag}", {"command": command, "machine": machine},
        lambda progress: run_register_bench(
            data, methods=args.methods or DEFAULT_METHODS, splits=args.splits or [s[0] for s in SPLITS],
            pythons=pythons, threads=args.threads, seed=args.seed, hd95=not args.no_hd95,
            robustness=not args.no_robustness, timeout_s=args.timeout, progress=progress),
        lambda res: write_register(res, machine, command, args.out, tag),
        lambda res: goals_text(evaluate_goals(res)))
    print(f"done in {result['seconds']:.0f} s; load average {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
