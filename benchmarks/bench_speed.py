"""Speed and memory per method: inference time, peak memory, parameters, FLOPs, training-step time.

Protocol (``python -m benchmarks --only speed``; every number comes from one run):

1. **Probe, one FRESH process per method**: build the method, then for each size (ascending)
   run ONE forward pass (``torch.no_grad``) and read the process's peak resident memory
   (``ru_maxrss``'s mark, ``VmHWM``, reset to the current RSS before each call through
   ``/proc/self/clear_refs``, so each peak belongs to its call; on a GPU also
   ``torch.cuda.max_memory_allocated``) and the FLOPs of that forward
   (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products;
   element-wise ops, grid sampling and psmamba's numba selective scan are not counted); last,
   one training step at each training size, with its own peak. Each child runs under a memory
   cap (``RLIMIT_DATA``): a call that needs more reports ``oom`` ("out of memory (cap N GiB)"
   in the table) instead of swapping the shared machine, and the run goes on.
2. **Timing, one process, methods in ROUND ROBIN**: at each size, every method that passed
   its probe there is built; a warm-up call each (on a 32^3 crop: JIT loading, allocator);
   then ``repeats`` rounds, each calling every method once, the order rotated by one each
   round (so no method always runs first or after the same neighbour). Wall time (after a
   device synchronize) and process CPU time per call; the table reports medians. At each
   training size the same round robin times training steps (forward, LNCC + diffusion,
   backward, Adam step; a fresh optimiser each step and the gradients dropped after it, so
   the methods' optimiser states do not pile up in the one process) of the learned methods
   whose probe step passed there.

The methods (:data:`benchmarks.peers.METHODS`) include the paper's eight learned peers as
psmamba implements them (``transmorph`` ... ``voxelmorph_psmamba``), so one run gives every row.

Inputs: a real pair (the demo's FSL MNI152 template onto the ICBM 2009a template, 64x80x64
at 2.5 mm) resized trilinearly to each size, so ANTs (whose run time depends on the images)
sees brains; ANTs gets the voxel size that keeps the 160x200x160 mm field of view.
``inputs="random"`` uses smooth random volumes instead (tests).
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULT_MARKER,
    RESULTS_DIR,
    cpu_seconds,
    current_rss_mib,
    fmt,
    is_oom,
    load_average,
    machine_lines,
    markdown_table,
    median,
    peak_rss_mib,
    reset_peak_rss,
    run_child,
    set_threads,
    size_str,
    synchronize,
    write_csv,
    write_json,
    write_text,
)
from benchmarks.peers import LEARNED, METHODS, available
from psmamba.errors import first_line

__all__ = ["run_speed", "write_speed", "plot_speed", "speed_inputs", "speed_spacing", "expected_seconds", "status_text",
           "SPEED_COLUMNS", "DEMO_FOV_MM", "CPU_SECONDS_PER_MVOXEL"]

#: field of view of the demo grid (64x80x64 voxels at 2.5 mm)
DEMO_FOV_MM = (160.0, 200.0, 160.0)
#: columns of speed*.csv, one row per (method, size)
SPEED_COLUMNS = (
    "method", "label", "size", "voxels", "status", "params", "gflops",
    "infer_s", "infer_s_min", "infer_s_max", "infer_cpu_s", "runs", "first_call_s",
    "peak_rss_mib", "peak_increase_mib", "gpu_peak_mib",
    "train_status", "train_step_s", "train_cpu_s", "train_runs", "train_peak_rss_mib", "train_gpu_peak_mib", "note",
)

#: PLANNING FIGURES for the start-of-run estimate only (never reported as results): wall seconds
#: per million voxels of one inference call and of one training step, on an idle 2-core CPU with
#: 2 torch threads. psmamba's own methods, MONAI's VoxelMorph and ANTs: from ``results/speed.md``
#: (96x112x96 and 160x192x160). The peers: the faster of two calls at 48^3 (padded to each one's
#: divisor) with 1 thread on the loaded shared machine, divided by the padded voxel count and by
#: how much slower ``paper`` and MONAI's VoxelMorph ran there than in ``results/speed.md``
#: (inference 3x, training step 3.8x). Good to a factor of about 2 (benchmarks/README.md,
#: "Duration of the speed run").
CPU_SECONDS_PER_MVOXEL: dict[str, tuple[float, float | None]] = {
    "paper": (2.9, 16.0),
    "paper_diff": (3.0, 17.3),
    "baseline_conv": (1.5, 5.2),
    "voxelmorph": (2.8, 6.2),
    "paper_mambapy": (15.0, None),  # runs out of memory at 96x112x96 under 16 GiB
    "ants_syn": (14.0, None),
    "transmorph": (3.0, 9.2),
    "im2grid": (0.9, 4.0),
    "prnet_pp": (8.8, 27.6),
    "modet": (1.9, 4.2),
    "pivit": (0.6, 2.3),
    "mambamorph": (2.8, 10.2),
    "mambamorph_feat": (4.1, 13.6),
    "transmatch": (2.9, 9.8),
    "voxelmorph_psmamba": (1.4, 5.4),
}


# --------------------------------------------------------------------------- inputs
def speed_spacing(size: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size (mm) of ``size`` voxels spanning the demo's 160x200x160 mm field of view."""
    return tuple(fov / int(s) for fov, s in zip(DEMO_FOV_MM, size))  # type: ignore[return-value]


def speed_inputs(size: Sequence[int], inputs: str = "demo", seed: int = 0):
    """The pair every method registers: ``(moving, fixed, spacing_mm)``, tensors ``(1, 1, D, H, W)`` in [0, 1]."""
    import numpy as np
    import torch

    from psmamba.data.preprocess import minmax_scale as minmax
    from psmamba.spatial import resize_volume

    size = tuple(int(s) for s in size)
    spacing = speed_spacing(size)
    if inputs == "demo":
        from psmamba.data.demo import build_demo

        demo = build_demo("small")
        vols = [torch.from_numpy(np.ascontiguousarray(demo.load(v).image, dtype=np.float32))[None, None]
                for v in ("fsl_mni152", "icbm2009a")]
    elif inputs == "random":
        from scipy import ndimage

        rng = np.random.default_rng(seed)
        vols = [torch.from_numpy(ndimage.gaussian_filter(rng.random(size, dtype=np.float32), 2.0))[None, None]
                for _ in range(2)]
    else:
        raise ValueError(f"inputs must be 'demo' or 'random', got {inputs!r}")
    moving, fixed = (minmax(resize_volume(v, size)).contiguous() for v in vols)
    return moving, fixed, spacing


def _device(name: str):
    from psmamba.engine.distributed import resolve_device

    return resolve_device(name)


def _gpu_peak_mib(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _reset_gpu_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _train_step_fn(model, device):
    """A closure doing one training step of the engine (:func:`psmamba.engine.objective.train_step`:
    forward, LNCC(9) + Diffusion, backward, Adam with amsgrad), as ``psmamba train`` runs it."""
    import torch

    from psmamba.engine.objective import Objective, train_step

    objective = Objective.lncc_diffusion(9, 1.0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)

    def step(moving, fixed) -> None:
        train_step(model, objective, opt, [{"moving": moving, "fixed": fixed}])

    return step


# --------------------------------------------------------------------------- children
def _build(name: str, spec: dict, spacing, device):
    from benchmarks.peers import build_method

    return build_method(name, seed=int(spec.get("seed", 0)), spacing=spacing,
                        threads=spec.get("threads")).to(device).eval()


def _probe_one(model, name: str, moving, fixed, device, train: bool, flops: bool) -> dict:
    """One measurement: a forward (``no_grad``) or a training step, its time and its memory peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    res: dict[str, Any] = {"status": "ok"}
    stage = "training step" if train else "inference"
    try:
        res["rss_before_mib"] = current_rss_mib()
        res["peak_reset"] = reset_peak_rss()
        _reset_gpu_peak(device)
        synchronize(device)
        if train:
            model.train()
            step = _train_step_fn(model, device)
            t0 = time.perf_counter()
            step(moving, fixed)
        else:
            model.eval()
            t0 = time.perf_counter()
            with torch.no_grad():
                if flops and name in LEARNED:
                    with FlopCounterMode(display=False) as counter:
                        model(moving, fixed)
                    res["flops"] = int(counter.get_total_flops())
                else:
                    model(moving, fixed)
        synchronize(device)
        res["seconds"] = time.perf_counter() - t0
    except Exception as exc:  # reported, not raised: one failure must not stop the other measurements
        res["status"] = "oom" if is_oom(exc) else "error"
        res["error"] = f"{stage}: {type(exc).__name__}: {first_line(exc, '')[:300]}"
        if res["status"] == "error":
            res["traceback"] = traceback.format_exc(limit=6)[-2000:]
    res["peak_rss_mib"] = peak_rss_mib()
    res["gpu_peak_mib"] = _gpu_peak_mib(device)
    model.zero_grad(set_to_none=True)
    return res


def child_probe(spec: dict) -> dict:
    """One method in this FRESH process: params, FLOPs, first-call time and peak memory at each size.

    Sizes run in ascending order (inference), then one training step at each of ``train_sizes``
    (ascending; ``train_size``, one size, is read too). Before each measurement the peak-RSS mark
    is reset to the current RSS (Linux ``clear_refs``), so each peak belongs to its own call;
    where that is impossible the peak is the process's peak so far (``peak_reset: false`` in the
    result). Once a call runs out of memory, the larger sizes of the same kind (inference or
    training), and training steps at that size or larger after inference, are reported ``oom``
    without running them.
    """
    threads = set_threads(spec.get("threads"))
    device = _device(spec.get("device", "auto"))
    name = spec["method"]
    sizes = sorted((tuple(s) for s in spec["sizes"]), key=math.prod)
    train_sizes = sorted((tuple(s) for s in _spec_train_sizes(spec)), key=math.prod) if name in LEARNED else []
    res: dict[str, Any] = {"status": "ok", "method": name, "threads": threads, "device": str(device),
                           "infer": {}, "train": {}}
    models: dict[tuple, Any] = {}

    def model_for(size):
        # ANTs takes the voxel size of each grid; the networks are the same at every size
        key = size if name not in LEARNED else ()
        if key not in models:
            models[key] = _build(name, spec, speed_spacing(size), device)
        return models[key]

    plan = [(size, False) for size in sizes] + [(size, True) for size in train_sizes]
    oom_at: dict[bool, tuple] = {}  # kind (training?) -> the size that ran out of memory
    try:
        for size, is_train in plan:
            # a larger size of the same kind needs more; a training step more than inference
            blocker = (is_train, oom_at[is_train]) if is_train in oom_at else None
            if blocker is None and is_train and False in oom_at and math.prod(size) >= math.prod(oom_at[False]):
                blocker = (False, oom_at[False])
            if blocker:
                res["train" if is_train else "infer"][str(list(size))] = {
                    "status": "oom", "error": f"not run: {'the training step' if blocker[0] else 'inference'} at "
                                             f"{size_str(blocker[1])} already ran out of memory"}
                continue
            moving, fixed, _ = speed_inputs(size, spec.get("inputs", "demo"), int(spec.get("seed", 0)))
            model = model_for(size)
            res.setdefault("params", sum(p.numel() for p in model.parameters() if p.requires_grad) if name in LEARNED else None)
            one = _probe_one(model, name, moving.to(device), fixed.to(device), device, train=is_train,
                             flops=bool(spec.get("flops", True)))
            res["train" if is_train else "infer"][str(list(size))] = one
            if one["status"] == "oom":
                oom_at.setdefault(is_train, size)
            del moving, fixed
    except Exception as exc:  # building the method or its inputs failed: nothing to measure
        res["status"] = "oom" if is_oom(exc) else "error"
        res["error"] = f"{type(exc).__name__}: {first_line(exc, '')[:300]}"
    return res


def child_timing(spec: dict) -> dict:
    """Every size in turn, all its methods in ROUND ROBIN: ``repeats`` inference calls each, and
    at each of ``train_sizes`` ``train_repeats`` training steps of the learned methods
    (``train_methods_by_size``, when given, names them per size: those whose probe step passed)."""
    import torch

    threads = set_threads(spec.get("threads"))
    device = _device(spec.get("device", "auto"))
    repeats, train_repeats = int(spec.get("repeats", 3)), int(spec.get("train_repeats", 0))
    train_sizes = [tuple(s) for s in _spec_train_sizes(spec)]
    train_names = spec.get("train_methods_by_size")
    res: dict[str, Any] = {"status": "ok", "threads": threads, "device": str(device),
                           "load_before": load_average(), "infer": {}, "train": {}, "errors": {},
                           "train_errors": {}}
    built: dict[tuple, Any] = {}

    def model(n: str, spacing):
        key = (n, spacing if n not in LEARNED else None)
        if key not in built:
            built[key] = _build(n, spec, spacing, device)
        return built[key]

    for size_key, names in spec["methods_by_size"].items():
        size = tuple(json.loads(size_key))
        moving, fixed, spacing = speed_inputs(size, spec.get("inputs", "demo"), int(spec.get("seed", 0)))
        moving, fixed = moving.to(device), fixed.to(device)
        small = tuple(min(s, 32) for s in size)
        warm_m, warm_f = moving[..., : small[0], : small[1], : small[2]], fixed[..., : small[0], : small[1], : small[2]]
        infer, train, errors, train_errors = (res[k].setdefault(size_key, {})
                                              for k in ("infer", "train", "errors", "train_errors"))
        models = {}
        for n in names:
            try:
                models[n] = model(n, spacing).eval()
            except Exception as exc:
                errors[n] = f"build: {type(exc).__name__}: {exc}"

        def call(n: str, fn: Callable[[], Any], record: dict, errs: dict = errors) -> None:
            if n in errors or n in errs:
                return
            try:
                synchronize(device)
                t0, c0 = time.perf_counter(), cpu_seconds()
                fn()
                synchronize(device)
                record.setdefault(n, {"wall": [], "cpu": []})
                record[n]["wall"].append(time.perf_counter() - t0)
                record[n]["cpu"].append(cpu_seconds() - c0)
            except Exception as exc:
                errs[n] = ("oom: " if is_oom(exc) else "") + f"{type(exc).__name__}: {str(exc)[:300]}"

        with torch.no_grad():
            for n in models:  # warm-up on a small crop (JIT loading, allocator); ANTs needs none
                if n in LEARNED:
                    call(n, lambda n=n: models[n](warm_m, warm_f), {})
            order0 = list(models)
            for r in range(repeats):
                order = order0[r % len(order0):] + order0[: r % len(order0)]
                for n in order:
                    call(n, lambda n=n: models[n](moving, fixed), infer)
        learned = [n for n in models if n in LEARNED and (train_names is None or n in train_names.get(size_key, ()))]
        if train_repeats and learned and size in train_sizes:
            # each step with a fresh optimiser, its gradients dropped after it: with 15 methods in
            # one process, every method's Adam state and gradients kept alive together would
            # add GBs to the next method's peak (creating Adam's state costs milliseconds)
            def one_step(n: str, m, f) -> None:
                _train_step_fn(models[n], device)(m, f)
                models[n].zero_grad(set_to_none=True)

            for n in learned:
                models[n].train()
                call(n, lambda n=n: one_step(n, warm_m, warm_f), {}, train_errors)  # warm-up (autograd buffers, JIT)
            for r in range(train_repeats):
                order = learned[r % len(learned):] + learned[: r % len(learned)]
                for n in order:
                    call(n, lambda n=n: one_step(n, moving, fixed), train, train_errors)
            for n in learned:
                models[n].eval()
        del moving, fixed, warm_m, warm_f
    res["load_after"] = load_average()
    return res


def _spec_train_sizes(spec: dict) -> list:
    """A child spec's training sizes: ``train_sizes`` (a list), or the older ``train_size`` (one)."""
    if spec.get("train_sizes"):
        return [list(s) for s in spec["train_sizes"]]
    return [list(spec["train_size"])] if spec.get("train_size") else []


def _child_main(argv: Sequence[str]) -> int:
    spec = json.loads(argv[argv.index("--child") + 1])
    kind = spec.pop("kind")
    result = child_probe(spec) if kind == "probe" else child_timing(spec)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- parent
def run_speed(
    sizes: Sequence[Sequence[int]],
    methods: Sequence[str] = tuple(METHODS),
    *,
    repeats: int = 5,
    train_sizes: Sequence[Sequence[int]] | None = None,
    train_repeats: int = 3,
    device: str = "auto",
    threads: int | None = None,
    inputs: str = "demo",
    mem_limit_gib: float | None = 16.0,
    timeout_s: float = 3600.0,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the speed benchmark (probes, then round-robin timing) and return every number.

    Args:
        sizes: volume sizes ``(D, H, W)``.
        methods: names from :data:`benchmarks.peers.METHODS` (missing optional ones are
            reported as ``skipped``).
        repeats: timed inference calls per method and size (the median is reported).
        train_sizes: the sizes at which training steps are measured and timed (default: the
            smallest of ``sizes``).
        train_repeats: timed training steps per learned method (0: none).
        device: ``"auto"`` (GPU when available), ``"cpu"``, ...
        threads: torch / numba / ITK threads (None: the library defaults).
        inputs: ``"demo"`` (real brains) or ``"random"``.
        mem_limit_gib: memory cap of each child process (None: no cap); a call that needs more
            is reported ``oom`` ("out of memory (cap)" in the table) and the run goes on.
        timeout_s: time limit of each probe process (one method), and of the timing process
            per (method, size) it times.

    Returns:
        ``{"settings", "rows" (one per method x size), "probes", "timings", "load_before", "load_after"}``.
    """
    say = log or (lambda _m: None)
    sizes = [tuple(int(s) for s in sz) for sz in sizes]
    train_sizes = ([tuple(int(s) for s in sz) for sz in train_sizes] if train_sizes
                   else [min(sizes, key=math.prod)])
    train_sizes = sorted(set(train_sizes), key=math.prod) if train_repeats > 0 else []
    if any(t not in sizes for t in train_sizes):
        raise ValueError(f"--train-sizes must be among --sizes ({', '.join(size_str(x) for x in sizes)}), got "
                         f"{', '.join(size_str(x) for x in train_sizes)}")
    limit = int(mem_limit_gib * 2**30) if mem_limit_gib else None
    base = {"device": device, "threads": threads, "inputs": inputs, "seed": seed}
    skipped = {m: why for m in methods for ok, why in [available(m)] if not ok}
    run_methods = [m for m in methods if m not in skipped]
    out: dict[str, Any] = {
        "settings": {"sizes": [list(s) for s in sizes], "methods": list(methods), "repeats": repeats,
                     "train_sizes": [list(s) for s in train_sizes], "train_repeats": train_repeats, "device": device,
                     "threads": threads, "inputs": inputs, "mem_limit_gib": mem_limit_gib, "timeout_s": timeout_s,
                     "seed": seed},
        "skipped": skipped, "probes": [], "timings": [], "load_before": load_average(),
    }
    t_start = time.perf_counter()
    est = expected_seconds(run_methods, sizes, train_sizes, repeats, train_repeats)
    if est is not None:
        say(f"[speed] {len(run_methods)} methods, sizes {', '.join(size_str(x) for x in sizes)}, training steps at "
            f"{', '.join(size_str(x) for x in train_sizes) or 'none'}: expect roughly {est / 3600:.1f} h on an idle "
            f"2-core CPU (benchmarks/README.md); much less on a GPU")
    for m in run_methods:
        t0 = time.perf_counter()
        probe = run_child("benchmarks.bench_speed",
                          {**base, "kind": "probe", "method": m, "sizes": [list(s) for s in sizes],
                           "train_sizes": [list(s) for s in train_sizes]},
                          timeout_s=timeout_s, mem_limit_bytes=limit)
        probe.setdefault("method", m)
        out["probes"].append(probe)
        say(f"[speed] probe {m} ({time.perf_counter() - t0:.0f} s): " + "; ".join(
            f"{kind}{size_str(json.loads(k))} {status_text(v['status'], mem_limit_gib)} {fmt(v.get('seconds'), 2)} s "
            f"{fmt(v.get('peak_rss_mib'), 0)} MiB"
            for kind, part in (("", "infer"), ("train ", "train")) for k, v in probe.get(part, {}).items())
            + (f" -- {probe.get('error')}" if probe.get("error") else ""))
    methods_by_size = {}
    for size in sizes:
        key = str(list(size))
        ok = [m for m in run_methods
              if any(p["method"] == m and p.get("infer", {}).get(key, {}).get("status") == "ok" for p in out["probes"])]
        if ok:
            methods_by_size[key] = ok
    train_methods_by_size = {
        str(list(size)): [m for m in methods_by_size.get(str(list(size)), []) if m in LEARNED and any(
            p["method"] == m and p.get("train", {}).get(str(list(size)), {}).get("status") == "ok" for p in out["probes"])]
        for size in train_sizes}
    if methods_by_size:
        t0 = time.perf_counter()
        timing = run_child("benchmarks.bench_speed",
                           {**base, "kind": "timing", "methods_by_size": methods_by_size, "repeats": repeats,
                            "train_sizes": [list(s) for s in train_sizes], "train_repeats": train_repeats,
                            "train_methods_by_size": train_methods_by_size},
                           timeout_s=timeout_s * max(1, sum(map(len, methods_by_size.values()))), mem_limit_bytes=limit)
        out["timings"].append(timing)
        say(f"[speed] round robin ({time.perf_counter() - t0:.0f} s): {timing['status']}" + "".join(
            f"; {size_str(json.loads(k))} {n} {median(v['wall']):.2f} s"
            for k, per in timing.get("infer", {}).items() for n, v in per.items()))
    out["load_after"] = load_average()
    out["seconds"] = time.perf_counter() - t_start
    out["rows"] = _rows(out, methods, sizes)
    return out


def expected_seconds(methods: Sequence[str], sizes, train_sizes, repeats: int, train_repeats: int,
                     overhead_s: float = 20.0) -> float | None:
    """A rough duration of :func:`run_speed` on an idle 2-core CPU, from :data:`CPU_SECONDS_PER_MVOXEL`.

    Per method and size: the probe's call and the warm-up plus ``repeats`` timed inference calls,
    and at a training size the probe's step plus ``train_repeats`` timed steps, each scaled by the
    voxel count; plus ``overhead_s`` per method (process start, imports, building). Methods with
    no planning figure are left out; ``None`` when none has one.
    """
    known = [m for m in methods if m in CPU_SECONDS_PER_MVOXEL]
    if not known:
        return None
    total = overhead_s * len(known)
    for m in known:
        infer, train = CPU_SECONDS_PER_MVOXEL[m]
        for size in sizes:
            mvox = math.prod(size) / 1e6
            total += (1 + repeats) * infer * mvox
            if train is not None and tuple(size) in {tuple(t) for t in train_sizes}:
                total += (1 + train_repeats) * train * mvox
    return total


#: training-step status of a method whose step ran out of memory in the shared round-robin
#: process but fitted under the cap in its own process (the probe): see :func:`_rows`
OWN_PROCESS = "ok-own-process"


def status_text(status: str | None, mem_limit_gib: float | None = None) -> str:
    """A row's status as the tables print it: ``oom`` is "out of memory (cap N GiB)"."""
    if status is None:
        return "-"
    if status == OWN_PROCESS:
        return "ok in its own process (shared one: out of memory)"
    if status == "oom":
        return f"out of memory (cap {mem_limit_gib:g} GiB)" if mem_limit_gib else "out of memory"
    return str(status)


def _rows(out: dict, methods: Sequence[str], sizes) -> list[dict[str, Any]]:
    rows = []
    timing = out["timings"][0] if out.get("timings") else {}
    for size in sizes:
        key = str(list(size))
        for m in methods:
            row: dict[str, Any] = {"method": m, "label": METHODS.get(m, m), "size": size_str(size),
                                   "voxels": math.prod(size)}
            if m in out["skipped"]:
                rows.append({**row, "status": "skipped", "note": out["skipped"][m]})
                continue
            probe = next((p for p in out["probes"] if p["method"] == m), {})
            inf = probe.get("infer", {}).get(key, {})
            tr = probe.get("train", {}).get(key, {})
            status = inf.get("status") or probe.get("status", "missing")
            if status == "ok" and probe.get("status") not in (None, "ok"):
                status = probe["status"]
            if m in LEARNED and tr:
                row["train_status"] = tr.get("status")
            row.update(status=status, params=probe.get("params"),
                       gflops=inf["flops"] / 1e9 if inf.get("flops") is not None else None,
                       first_call_s=inf.get("seconds"), peak_rss_mib=inf.get("peak_rss_mib"),
                       gpu_peak_mib=inf.get("gpu_peak_mib"), train_peak_rss_mib=tr.get("peak_rss_mib"),
                       train_gpu_peak_mib=tr.get("gpu_peak_mib"))
            if inf.get("peak_rss_mib") is not None and inf.get("rss_before_mib") is not None:
                row["peak_increase_mib"] = inf["peak_rss_mib"] - inf["rss_before_mib"]
            notes = [x for x in (inf.get("error"), tr.get("error"), probe.get("error")) if x]
            if tr and tr.get("status") != "ok":
                notes.append(f"training step {tr.get('status')}")
            t_inf = timing.get("infer", {}).get(key, {}).get(m)
            if t_inf:
                row.update(infer_s=median(t_inf["wall"]), infer_s_min=min(t_inf["wall"]), infer_s_max=max(t_inf["wall"]),
                           infer_cpu_s=median(t_inf["cpu"]), runs=len(t_inf["wall"]))
            t_tr = timing.get("train", {}).get(key, {}).get(m)
            if t_tr:
                row.update(train_step_s=median(t_tr["wall"]), train_cpu_s=median(t_tr["cpu"]), train_runs=len(t_tr["wall"]))
            err = timing.get("errors", {}).get(key, {}).get(m)
            if err:
                row["status"] = "oom" if err.startswith("oom") else "error"
                notes.append(f"timing: {err}")
            terr = timing.get("train_errors", {}).get(key, {}).get(m)
            if terr:
                notes.append(f"timing, training step: {terr}")
                if terr.startswith("oom") and tr.get("status") == "ok":
                    # The round-robin process holds every method's model and what its allocator
                    # kept; this method's step fitted under the cap in its OWN process (the
                    # probe). Report that: the timed steps taken before, else the probe's call.
                    row["train_status"] = OWN_PROCESS
                    if not t_tr and tr.get("seconds") is not None:
                        row.update(train_step_s=tr["seconds"], train_runs=0)
                    notes.append("training step reported from " + (
                        f"{len(t_tr['wall'])} timed step(s) before the shared process ran out of memory"
                        if t_tr else "the probe's single call in its own process (first-call costs included)"))
                else:
                    row["train_status"] = "oom" if terr.startswith("oom") else "error"
            if timing.get("status") not in (None, "ok") and status == "ok":
                row["status"] = timing["status"]
                notes.append(f"timing process: {timing.get('error', '')}")
            if notes:
                row["note"] = "; ".join(notes)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- outputs
def _mib(v: Any) -> str:
    return fmt(v, 0)


def speed_markdown(result: dict, machine: dict, command: str) -> str:
    """The markdown report: settings, machine, one table row per (method, size), notes."""
    s = result["settings"]
    gpu = any(r.get("gpu_peak_mib") is not None for r in result["rows"])
    head = ["method", "size", "status", "params", "GFLOPs/fwd", "inference s (median)", "min-max s", "CPU s",
            "runs", "first call s", "peak RSS MiB", "RSS increase MiB"] + (["GPU peak MiB"] if gpu else [])
    body = []
    for r in result["rows"]:
        body.append([r["label"], r["size"], status_text(r.get("status"), s.get("mem_limit_gib")), fmt(r.get("params")),
                     fmt(r.get("gflops"), 1), fmt(r.get("infer_s"), 2),
                     f"{fmt(r.get('infer_s_min'), 2)}-{fmt(r.get('infer_s_max'), 2)}" if r.get("infer_s") else "-",
                     fmt(r.get("infer_cpu_s"), 2), fmt(r.get("runs")), fmt(r.get("first_call_s"), 2),
                     _mib(r.get("peak_rss_mib")), _mib(r.get("peak_increase_mib"))]
                    + ([_mib(r.get("gpu_peak_mib"))] if gpu else []))
    train_sizes = [size_str(x) for x in _spec_train_sizes(s)]
    train_rows = [r for r in result["rows"] if r["size"] in train_sizes and r["method"] in LEARNED]
    thead = ["method", "size", "status", "train step s (median)", "CPU s", "runs", "peak RSS MiB"] + (
        ["GPU peak MiB"] if gpu else [])
    tbody = [[r["label"], r["size"], status_text(r.get("train_status"), s.get("mem_limit_gib")),
              fmt(r.get("train_step_s"), 2), fmt(r.get("train_cpu_s"), 2),
              "1 (probe)" if r.get("train_runs") == 0 else fmt(r.get("train_runs")), _mib(r.get("train_peak_rss_mib"))]
             + ([_mib(r.get("train_gpu_peak_mib"))] if gpu else []) for r in train_rows]
    notes = [f"- {r['label']} at {r['size']}: {r['note']}" for r in result["rows"] if r.get("note")]
    lines = [
        "# Speed and memory", "",
        f"Command: `{command}`", "",
        *machine_lines(machine),
        f"- load average (1, 5, 15 min) before: {result.get('load_before')}, after: {result.get('load_after')}",
        f"- whole speed benchmark: {result.get('seconds', float('nan')):.0f} s", "",
        f"Settings: sizes {', '.join(size_str(x) for x in s['sizes'])}; {s['repeats']} timed inference calls per "
        f"method and size, methods in round robin (order rotated each round) after one warm-up call each; "
        f"{s['train_repeats']} timed training steps at {', '.join(train_sizes) or '-'}; inputs: {s['inputs']}; "
        f"threads: {s['threads'] or 'library default'}; memory cap per process: "
        f"{s['mem_limit_gib'] or 'none'} GiB. Peak memory is measured in a fresh process per method, sizes "
        "ascending, the peak-RSS mark (`ru_maxrss`/`VmHWM`) reset to the current RSS before each call; it "
        "includes the Python/torch baseline, and 'RSS increase' subtracts the resident memory just before the call. FLOPs: `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix "
        "products only; psmamba's numba selective scan, element-wise ops and grid sampling are not counted, "
        "while mambapy's scan read-out is a matrix product and is).", "",
        "## Inference, one pair", "", markdown_table(head, body), "",
        "## Training step (batch 1, LNCC + diffusion, Adam)", "", markdown_table(thead, tbody), "",
    ]
    if result.get("skipped") or notes:
        lines += ["## Notes", ""] + [f"- {m}: skipped ({why})" for m, why in result.get("skipped", {}).items()] + notes + [""]
    return "\n".join(lines)


def plot_speed(result: dict, path: Path, machine: dict | None = None) -> Path:
    """Time vs size and peak memory vs size, one line per method (log-log), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    failed = []
    for i, m in enumerate(result["settings"]["methods"]):
        style = "-" if i < 10 else "--"  # more methods than the 10 default colours: the rest dashed
        rows = [r for r in result["rows"] if r["method"] == m]
        t = [(r["voxels"] / 1e6, r["infer_s"]) for r in rows if r.get("infer_s") is not None]
        mem = [(r["voxels"] / 1e6, r.get("gpu_peak_mib") or r["peak_rss_mib"]) for r in rows
               if r.get("status") == "ok" and r.get("peak_rss_mib") is not None]
        line = None
        if t:
            (line,) = axes[0].plot(*zip(*t), marker="o", linestyle=style, label=METHODS.get(m, m))
        if mem:
            axes[1].plot(*zip(*mem), marker="o", linestyle=style, label=METHODS.get(m, m),
                         color=line.get_color() if line else None)
        failed += [(r, line.get_color() if line else "k") for r in rows if r.get("status") in ("oom", "timeout", "error")]
    for r, color in failed:  # mark failures at the top of the time axis, once the limits are known
        top = axes[0].get_ylim()[1]
        axes[0].plot([r["voxels"] / 1e6], [top], marker="x", color=color, clip_on=False)
        axes[0].annotate(f"{r['method']}: {r['status']}", (r["voxels"] / 1e6, top), fontsize=7,
                         xytext=(3, -10), textcoords="offset points")
    gpu = any(r.get("gpu_peak_mib") is not None for r in result["rows"])
    axes[0].set(xscale="log", yscale="log", xlabel="voxels (millions)", ylabel="inference time per pair (s, median)",
                title="time vs size")
    axes[1].set(xscale="log", yscale="log", xlabel="voxels (millions)",
                ylabel="peak GPU memory (MiB)" if gpu else "peak process RSS (MiB)", title="memory vs size")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    if machine:
        fig.suptitle(f"{machine.get('cpu')} / {machine.get('device')}, {machine.get('torch_threads')} threads", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_speed(result: dict, machine: dict, command: str, out_dir: Path = RESULTS_DIR, tag: str = "") -> list[Path]:
    """Write ``speed{tag}.json``, ``.csv``, ``.md`` and ``.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    stem = f"speed{tag}"
    return [
        write_json(out_dir / f"{stem}.json", {"command": command, "machine": machine, **result}),
        write_csv(out_dir / f"{stem}.csv", result["rows"], SPEED_COLUMNS),
        write_text(out_dir / f"{stem}.md", speed_markdown(result, machine, command)),
        plot_speed(result, out_dir / f"{stem}.png", machine),
    ]


def rewrite_report(json_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Rebuild the rows of a saved ``speed*.json`` with this version's reporting rules and write
    its ``.json``/``.csv``/``.md``/``.png`` again (into ``out_dir``, default the file's folder).
    Nothing is measured: the probes and timings of the file are kept as they are."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise SystemExit(f"{json_path}: file not found")
    try:
        saved = json.loads(json_path.read_text())
        machine, command = saved.pop("machine"), saved.pop("command")
        methods, sizes = saved["settings"]["methods"], [tuple(x) for x in saved["settings"]["sizes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{json_path}: not a speed benchmark result ({type(exc).__name__}: {exc})") from None
    saved["rows"] = _rows(saved, methods, sizes)
    tag = json_path.stem[len("speed"):] if json_path.stem.startswith("speed") else ""
    return write_speed(saved, machine, command, Path(out_dir) if out_dir else json_path.parent, tag=tag)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv:
        return _child_main(argv)
    if argv[:1] == ["--report"]:  # python -m benchmarks.bench_speed --report results/speed.json
        if len(argv) != 2:
            raise SystemExit("usage: python -m benchmarks.bench_speed --report SPEED_JSON")
        for path in rewrite_report(argv[1]):
            print(f"wrote {path}")
        return 0
    from benchmarks.__main__ import main as bench_main  # same options as python -m benchmarks

    return bench_main(["--only", "speed"] + argv)


if __name__ == "__main__":
    sys.exit(main())
