"""Selective scan and Mamba layer on the CPU: ours ("cpu"), the PyTorch "reference" and mambapy.

For every level of the paper model at 160x192x160 (sequence length L and d_model from the table
in ``shared/spec/architecture.md``), it times, side by side in one run:

* ``scan``: one selective scan ``(B=1, E=2*d_model, L, N=16)`` (mambapy: its ``selective_scan``
  method, the parallel ``pscan`` path it uses by default);
* ``layer``: one whole Mamba layer ``(1, L, d_model) -> (1, L, d_model)`` (mambapy: its
  ``MambaBlock`` with the same d_model, d_state=16, expand=2, d_conv=4);

in inference (``fwd``, under ``torch.no_grad``) and, with ``--modes fwd,train``, forward plus
backward (``train``). It also measures the machine's limit for the scan's arithmetic: the
throughput of the per-update work alone (one exp and three multiply-adds per state element,
data in cache, all threads), and prints every backend's throughput in the same unit
(state updates per second = B * L * E * N / seconds).

Method
------
* Each measurement runs in a fresh subprocess: build the inputs, warm up (numba compiles or
  loads its cache on a small input), then time ``--repeats`` runs and keep the median.
* Peak memory is the child's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``),
  reported as the peak and as the growth over the RSS just before the timed runs (inputs and
  the model already allocated), i.e. what the operation itself needed at its worst.
* A backend whose estimated memory exceeds ``--mem-cap-gb`` is skipped and says so (mambapy
  materialises several ``(B, L_pow2, E, N)`` tensors; the machine is shared).

Usage::

    python benchmarks/bench_scan.py                 # all levels, fwd
    python benchmarks/bench_scan.py --quick         # L / 16, a minute or two
    python benchmarks/bench_scan.py --levels 2 --modes fwd,train --backends cpu,mambapy

Writes ``benchmarks/results/bench_scan.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

try:
    from benchmarks._child import run_json_child
    from benchmarks.common import machine_info as common_machine_info
except ImportError:  # run as a script: python benchmarks/<this file>.py
    from _child import run_json_child
    from common import machine_info as common_machine_info

# (level, L at 160x192x160, d_model) from the architecture table
LEVELS = {
    5: (1_200, 256),
    4: (9_600, 128),
    3: (76_800, 64),
    2: (614_400, 32),
    1: (4_915_200, 16),
}
D_STATE = 16
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# machine description
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """:func:`benchmarks.common.machine_info` plus numba's threads and threading layer."""
    import numba

    return {**common_machine_info(), "numba_threads": numba.get_num_threads(),
            "numba_threading_layer": _threading_layer()}


def _threading_layer() -> str:
    try:
        import numba

        return numba.threading_layer()
    except Exception:  # only known after a parallel kernel has run
        return "unknown"


# ---------------------------------------------------------------------------------------------
# the machine's limit for the scan's per-update arithmetic
# ---------------------------------------------------------------------------------------------


def measure_limit(seconds: float = 2.0) -> dict:
    """State updates/s of the bare update ``h = exp(dt*A)*h + dt*b; y += c*h`` on cached data.

    One exp (the same vectorisable exp the "cpu" kernels use; the best this numba build can
    vectorise) and three multiply-adds per state element, compiled with the same LLVM flags as
    the scan kernels; every thread works on its own 1 KiB buffer, so nothing waits on memory.
    """
    import numba
    import numpy as np
    from numba import njit, prange

    from psmamba.nn._scan_cpu import _KernelFlags, _exp

    @njit(parallel=True, fastmath=True)
    def kernel(dts, A, reps):
        nthreads = dts.shape[0]
        n_state = A.shape[1]
        out = np.zeros(nthreads, dtype=np.float32)
        for th in prange(nthreads):
            h = np.zeros(n_state, dtype=np.float32)
            a_row = A[th]
            dtr = dts[th]
            acc = np.float32(0.0)
            for r in range(reps):
                d = dtr[r & 255]
                db = d * np.float32(0.5)
                for n in range(n_state):
                    v = _exp(d * a_row[n]) * h[n] + db
                    h[n] = v
                    acc += np.float32(0.25) * v
            out[th] = acc + h.sum()
        return out

    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    dts = (rng.random((threads, 256)) * 0.1 + 1e-3).astype(np.float32)
    A = -np.tile(np.arange(1, D_STATE + 1, dtype=np.float32), (threads, 1))
    with _KernelFlags(("bench-limit", "float32")):  # compiled exactly like the scan kernels
        kernel(dts, A, 10)
    reps = 100_000
    while True:
        t = time.perf_counter()
        kernel(dts, A, reps)
        el = time.perf_counter() - t
        if el > 0.2:
            break
        reps *= 4
    reps = int(reps * seconds / el)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        kernel(dts, A, reps)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {
        "threads": threads,
        "updates_per_s": threads * reps * D_STATE / best,
        "note": "1 exp + 3 multiply-adds per state element, in-cache, all threads, best of 3",
    }


# ---------------------------------------------------------------------------------------------
# one measurement, in a child process
# ---------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _mambapy_block(d_model: int):
    from mambapy.mamba import MambaBlock, MambaConfig

    cfg = MambaConfig(d_model=d_model, n_layers=1, d_state=D_STATE, expand_factor=2, d_conv=4)
    return MambaBlock(cfg)


def child(spec: dict) -> dict:
    """Run one (what, backend, mode, L, d_model) measurement and return its figures."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    what, backend, mode = spec["what"], spec["backend"], spec["mode"]
    length, d_model, repeats = spec["L"], spec["d_model"], spec["repeats"]
    e, n = 2 * d_model, D_STATE
    train = mode == "train"

    def make_scan_inputs(length: int):
        u = torch.randn(1, e, length)
        delta = F.softplus(torch.randn(1, e, length) - 4.0)
        A = -torch.exp(torch.log(torch.arange(1, n + 1.0)).repeat(e, 1))
        B = torch.randn(1, n, length)
        C = torch.randn(1, n, length)
        D = torch.ones(e)
        xs = [u, delta, A, B, C, D]
        if train:
            for x in xs:
                x.requires_grad_(True)
        return xs

    if what == "scan":
        if backend == "mambapy":
            block = _mambapy_block(d_model)

            def to_mambapy(length: int):
                # mambapy's own layout, contiguous: (B, L, ED) and (B, L, N)
                xs = make_scan_inputs(length)
                return [x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)
                        if x.ndim == 3 else x for x in xs]

            def run_on(xs):
                return block.selective_scan(*xs)
        else:
            from psmamba.nn.scan import selective_scan

            def run_on(xs):
                return selective_scan(*xs, backend=backend)

        make = to_mambapy if backend == "mambapy" else make_scan_inputs
    else:
        if backend == "mambapy":
            layer = _mambapy_block(d_model)
        else:
            from psmamba.nn.mamba import Mamba

            layer = Mamba(d_model, backend=backend)
        if not train:
            layer.requires_grad_(False)

        def make(length: int):
            return [torch.randn(1, length, d_model, requires_grad=train)]

        def run_on(xs):
            return layer(xs[0])

    def once(xs):
        if train:
            out = run_on(xs)
            out.backward(torch.ones_like(out))
            for x in xs:
                x.grad = None
        else:
            with torch.no_grad():
                run_on(xs)

    once(make(min(length, 4096)))  # warm-up: numba compile / cache load, allocator
    xs = make(length)
    rss_before = _rss_mb()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once(xs)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    sec = statistics.median(times)
    return {
        "seconds": sec,
        "seconds_all": times,
        "peak_rss_mb": peak,
        "rss_before_mb": rss_before,
        "peak_growth_mb": max(0.0, peak - rss_before),
        "state_updates_per_s": length * e * n / sec,
    }


def estimate_gb(backend: str, mode: str, what: str, length: int, d_model: int) -> float:
    """Rough peak memory (GB) of one measurement, to skip what cannot fit."""
    e = 2 * d_model
    full = length * e * D_STATE * 4 / 1e9  # one (L, E, N) float32 tensor
    if backend == "mambapy":
        pow2 = 1 << (length - 1).bit_length()
        k = 4 if mode == "fwd" else 9
        return k * full * pow2 / length
    if backend == "reference":
        return 0.3 * full if mode == "fwd" else 4 * full
    if what == "scan":  # ours: the inputs u, delta, y (L, E) and B, C (L, N), a transposed copy
        return length * (4 * e + 3 * D_STATE) * 4 * (3 if mode == "train" else 1) / 1e9
    return length * (8 * d_model + 2 * e) * 4 * (8 if mode == "train" else 1) / 1e9


def run_child(spec: dict, timeout: float) -> dict:
    return run_json_child(__file__, spec, timeout, err_chars=200)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="sequence lengths / 16")
    p.add_argument("--levels", default="5,4,3,2,1", help="comma-separated levels (default all)")
    p.add_argument("--backends", default="cpu,reference,mambapy")
    p.add_argument("--what", default="scan,layer")
    p.add_argument("--modes", default="fwd", help="fwd and/or train (forward + backward)")
    p.add_argument("--extra", default="", help="extra L:d_model cases, e.g. 614400:8 (the issue's mambapy figure)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-cap-gb", type=float, default=6.0, help="skip measurements estimated above this")
    p.add_argument("--reference-max-len", type=int, default=1_000_000,
                   help="skip the (slow) reference backend above this L (its rate is flat in L)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_scan.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    levels = [int(x) for x in args.levels.split(",") if x]
    backends = [x for x in args.backends.split(",") if x]
    whats = [x for x in args.what.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    if "mambapy" in backends:
        try:
            import mambapy  # noqa: F401
        except ImportError:
            print("mambapy is not installed (pip install mambapy): leaving it out")
            backends.remove("mambapy")

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['logical_cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), numba {info['numba']} ({info['numba_threads']} threads), "
          f"load average {info['load_average']}")
    limit = measure_limit()
    print(f"limit (1 exp + 3 FMA per state element, in cache, {limit['threads']} threads): "
          f"{limit['updates_per_s'] / 1e9:.2f} G state updates/s")
    info["numba_threading_layer"] = _threading_layer()

    rows = []
    header = f"{'lvl':>3} {'what':>5} {'mode':>5} {'L':>9} {'d':>4} {'backend':>9} {'seconds':>9} {'G upd/s':>8} {'x limit':>7} {'peak MB':>8} {'+MB':>7}"
    print(header)
    cases = [(level, *LEVELS[level]) for level in levels]
    for item in (x for x in args.extra.split(",") if x):
        length, d_model = (int(v) for v in item.split(":"))
        cases.append((f"x{d_model}", length, d_model))
    for level, length, d_model in cases:
        if args.quick:
            length = max(64, length // 16)
        for what in whats:
            for mode in modes:
                for backend in backends:
                    spec = dict(what=what, backend=backend, mode=mode, L=length, d_model=d_model,
                                repeats=args.repeats)
                    est = estimate_gb(backend, mode, what, length, d_model)
                    if est > args.mem_cap_gb:
                        res = {"skipped": f"estimated {est:.1f} GB > --mem-cap-gb {args.mem_cap_gb}"}
                    elif backend == "reference" and length > args.reference_max_len:
                        res = {"skipped": f"L > --reference-max-len {args.reference_max_len}"}
                    else:
                        res = run_child(spec, args.timeout)
                    row = {"level": level, **spec, "estimated_gb": round(est, 2), **res}
                    rows.append(row)
                    if "seconds" in res:
                        frac = limit["updates_per_s"] / res["state_updates_per_s"]
                        row["times_slower_than_limit"] = frac
                        print(f"{level:>3} {what:>5} {mode:>5} {length:>9} {d_model:>4} {backend:>9} "
                              f"{res['seconds']:>9.3f} {res['state_updates_per_s'] / 1e9:>8.3f} {frac:>7.1f} "
                              f"{res['peak_rss_mb']:>8.0f} {res['peak_growth_mb']:>7.0f}")
                    else:
                        why = res.get("skipped") or res.get("error")
                        print(f"{level:>3} {what:>5} {mode:>5} {length:>9} {d_model:>4} {backend:>9}  -- {why}")
                    sys.stdout.flush()
                    _write(args.out, info, limit, args, rows, [])  # partial results survive a stop

    # speed-ups of ours over the others, per (level, what, mode)
    speedups = []
    for r in rows:
        if r["backend"] == "cpu" or "seconds" not in r:
            continue
        ours = [q for q in rows if q["backend"] == "cpu" and "seconds" in q
                and (q["level"], q["what"], q["mode"]) == (r["level"], r["what"], r["mode"])]
        if ours:
            speedups.append({"level": r["level"], "what": r["what"], "mode": r["mode"], "vs": r["backend"],
                             "speedup": r["seconds"] / ours[0]["seconds"]})
    for s in speedups:
        print(f"level {s['level']} {s['what']} {s['mode']}: cpu is {s['speedup']:.1f}x faster than {s['vs']}")

    info["loadavg_end"] = os.getloadavg()
    _write(args.out, info, limit, args, rows, speedups)
    print(f"wrote {args.out} (load average at the end: {info['loadavg_end']})")
    return 0


def _write(path: Path, info: dict, limit: dict, args, rows: list, speedups: list) -> None:
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": info,
        "limit": limit,
        "memory_method": "peak RSS (getrusage ru_maxrss) of a fresh subprocess per measurement; "
                         "peak_growth_mb = peak minus RSS just before the timed runs",
        "time_method": f"median of {args.repeats} runs after one warm-up on a small input",
        "results": rows,
        "speedups": speedups,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
