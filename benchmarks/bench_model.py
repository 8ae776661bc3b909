"""The ``paper`` model on the CPU: forward (inference) and one training step, time and memory.

For each size (default 96x112x96 and 160x192x160) and mode, in a fresh subprocess:

* ``fwd``: one forward pass under ``torch.no_grad`` (the Mamba layers then run in sequence
  chunks, see :class:`psmamba.nn.mamba.Mamba`);
* ``train``: one training step of the engine (:func:`psmamba.engine.objective.train_step`):
  forward, loss ``LNCC(window=9) + 1.0 * Diffusion`` (the paper's), backward and an Adam
  (amsgrad) step.

Reported: wall and CPU seconds, peak resident memory of the measured call (``VmHWM`` after
resetting the mark through ``/proc/self/clear_refs`` just before it; falls back to
``ru_maxrss``), and the split of the forward time over the model's parts, taken with forward
hooks: encoder level k (both streams), projection k, decoder block k (level 5 = the SIR block,
all K passes), and inside each decoder its Mamba layer; "rest" is everything outside those
modules (warps, upsampling, composition, padding, the final warp).

Memory: by default each mode runs as the ``psmamba`` command runs it: ``fwd`` (``register``,
``evaluate``) after :func:`psmamba.runtime.keep_freed_memory` (freed tensors' memory is reused
instead of being unmapped and faulted in again), ``train`` with glibc's defaults (keeping freed
memory made the 160x192x160 training step faster but raised its peak from 14.6 to 19.3 GB).
``--memory kept,plain`` measures both for every mode.

Usage::

    python benchmarks/bench_model.py                   # 96x112x96 and 160x192x160, fwd + train
    python benchmarks/bench_model.py --quick           # 64x64x64, fwd + train
    python benchmarks/bench_model.py --sizes 160x192x160 --modes fwd

Writes ``benchmarks/results/bench_model.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

try:
    from benchmarks._child import run_json_child
    from benchmarks.common import machine_info
except ImportError:  # run as a script: python benchmarks/<this file>.py
    from _child import run_json_child
    from common import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def smooth_volume(shape: tuple[int, int, int], seed: int):
    """A smooth random image in [0, 1] (noise on a 1/8 grid, trilinearly upsampled)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *(max(2, s // 8) for s in shape), generator=g)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


class Splitter:
    """Accumulates wall time per named module with forward pre/post hooks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}
        self.handles = []

    def watch(self, module, name: str) -> None:
        def pre(mod, args):
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            self.seconds[name] += time.perf_counter() - self._start.pop(id(mod))

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))


def child(spec: dict) -> dict:
    if spec.get("mem_cap_gb"):
        # fail with MemoryError instead of exhausting the shared machine (RLIMIT_DATA covers
        # malloc and anonymous mmap on Linux >= 4.7)
        cap = int(spec["mem_cap_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    from psmamba.runtime import keep_freed_memory

    kept = keep_freed_memory() if spec.get("memory", "kept") == "kept" else False
    import torch

    from psmamba.models import build_model
    from psmamba.nn.mamba import Mamba

    torch.manual_seed(0)
    shape = tuple(spec["size"])
    mode = spec["mode"]
    model = build_model("paper")
    n_levels = len(model.encoder.encoder.levels)

    split = Splitter()
    top = []  # names of non-overlapping top-level parts (their sum leaves "rest")
    for k in range(1, n_levels + 1):
        split.watch(model.encoder.encoder.levels[k - 1], f"encoder L{k}")
        split.watch(model.projections[k - 1], f"projection L{k}")
        top += [f"encoder L{k}", f"projection L{k}"]
    for k in range(1, n_levels):
        split.watch(model.decoders[k - 1], f"decoder L{k}")
        top.append(f"decoder L{k}")
    split.watch(model.sir.block, f"decoder L{n_levels} (SIR, {model.sir.iters} passes)")
    top.append(f"decoder L{n_levels} (SIR, {model.sir.iters} passes)")
    mamba_names = []
    for k in range(1, n_levels + 1):
        block = model.sir.block if k == n_levels else model.decoders[k - 1]
        for sub in block.modules():
            if isinstance(sub, Mamba):
                split.watch(sub, f"  of which Mamba L{k}")
                mamba_names.append(f"  of which Mamba L{k}")

    moving = smooth_volume(shape, 1)
    fixed = smooth_volume(shape, 2)

    if mode == "train":
        # the engine's training step (psmamba train runs the same), timed from the end of the forward
        from psmamba.engine.objective import Objective, train_step

        objective = Objective.lncc_diffusion(9, 1.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
        forward_end = {}
        model.register_forward_hook(lambda *_: forward_end.__setitem__("t", time.perf_counter()))

        def step(mv, fx):
            train_step(model, objective, opt, [{"moving": mv, "fixed": fx}])
            return time.perf_counter() - forward_end["t"]
    else:
        model.requires_grad_(False)

        def step(mv, fx):
            with torch.no_grad():
                model(mv, fx)
            return 0.0

    step(smooth_volume((32, 32, 32), 3), smooth_volume((32, 32, 32), 4))  # warm-up: numba cache
    repeats = max(1, int(spec.get("repeats", 1)))
    runs = []  # (wall, cpu, backward, split seconds) per measured step
    peak = 0.0
    rss_before = _status_mb("VmRSS")
    for _ in range(repeats):
        split.seconds.clear()
        hwm_ok = _reset_peak()
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        backward_s = step(moving, fixed)
        wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
        run_peak = _status_mb("VmHWM") if hwm_ok else None
        if run_peak is None:
            run_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = max(peak, run_peak)
        runs.append((wall, cpu, backward_s, dict(split.seconds)))
    # the median step by wall time (the machine is shared: single runs vary by 10-20 %)
    wall, cpu, backward_s, seconds = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    forward_s = wall - backward_s
    parts = {k: round(v, 3) for k, v in seconds.items()}
    parts["rest (warps, upsampling, compose, pad)"] = round(forward_s - sum(seconds.get(n, 0.0) for n in top), 3)
    return {
        "repeats": repeats,
        "wall_s_each": [round(r[0], 3) for r in runs],
        "wall_s": wall,
        "cpu_s": cpu,
        "forward_s": forward_s,
        "backward_and_step_s": backward_s,
        "peak_rss_mb": peak,
        "rss_before_mb": rss_before,
        "peak_method": "VmHWM after clear_refs reset" if hwm_ok else "ru_maxrss (whole process)",
        "forward_split_s": parts,
        "mamba_total_s": round(sum(seconds.get(n, 0.0) for n in mamba_names), 3),
        "parameters": sum(p.numel() for p in model.parameters()),
        "freed_memory_kept": kept,
    }


def run_child(spec: dict, timeout: float) -> dict:
    return run_json_child(__file__, spec, timeout, err_chars=300)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="96x112x96,160x192x160", help="comma-separated DxHxW")
    p.add_argument("--modes", default="fwd,train")
    p.add_argument("--quick", action="store_true", help="64x64x64 only")
    p.add_argument("--repeats", type=int, default=3,
                   help="measured steps per size and mode after the warm-up (the median is reported; default 3)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    p.add_argument("--mem-cap-gb", type=float, default=16.0,
                   help="per-measurement memory limit (RLIMIT_DATA); a step that needs more reports an error")
    p.add_argument("--memory", default="auto",
                   help="comma-separated: 'kept' = freed memory kept for reuse (psmamba.runtime.keep_freed_memory), "
                        "'plain' = glibc's defaults, 'auto' = as the psmamba command runs that mode: kept for fwd "
                        "(register, evaluate), plain for train (default: auto)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_model.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import numba

    sizes = ["64x64x64"] if args.quick else [s for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    memories = [m for m in args.memory.split(",") if m]
    if not memories or any(m not in ("kept", "plain", "auto") for m in memories):
        p.error(f"--memory takes 'auto', 'kept', 'plain' or a list of them, got {args.memory!r}")
    machine = {**machine_info(), "numba": numba.__version__}
    print(f"machine: {machine['cpu']}, {machine['logical_cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), load average {machine['load_average']}")
    rows = []
    for size in sizes:
        dims = [int(x) for x in size.lower().split("x")]
        for mode, memory in ((m, k) for m in modes for k in memories):
            if memory == "auto":
                memory = "kept" if mode == "fwd" else "plain"
            res = run_child(
                {"size": dims, "mode": mode, "mem_cap_gb": args.mem_cap_gb, "repeats": args.repeats,
                 "memory": memory}, args.timeout
            )
            rows.append({"size": size, "mode": mode, "memory": memory, **res})
            if "wall_s" in res:
                print(f"{size:>13} {mode:>5} ({memory}): {res['wall_s']:8.2f} s wall (median of {res['wall_s_each']}; "
                      f"{res['cpu_s']:.1f} s CPU), "
                      f"peak RSS {res['peak_rss_mb'] / 1024:.2f} GB; Mamba layers {res['mamba_total_s']:.2f} s of "
                      f"the {res['forward_s']:.2f} s forward")
                for name, sec in res["forward_split_s"].items():
                    print(f"{'':>22}{name:<42} {sec:8.3f} s")
            else:
                print(f"{size:>13} {mode:>5} ({memory}): {res.get('error')}")
            sys.stdout.flush()
    machine["loadavg_end"] = os.getloadavg()
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "goals": {"forward_160x192x160_s": 15, "forward_160x192x160_peak_gb": 6, "train_step_peak_gb": 20},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} (load average at the end: {machine['loadavg_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
