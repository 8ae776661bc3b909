"""One prepared GPU benchmark: ``python -m benchmarks.bench_gpu`` (under 5 minutes on a lent GPU).

Writes ``benchmarks/results/bench_gpu.json`` and prints a table of:

1. the selective scan at each level's ``(L, d_model)`` of the ``paper`` model at 160x192x160
   (``L`` = 4,915,200 / 614,400 / 76,800 / 9,600 / 1,200 tokens, ``d_model`` = 16 ... 256,
   ``d_inner = 2 d_model``, ``d_state = 16``, batch 1), for the ``reference``, ``triton`` and
   ``cuda`` (``mamba_ssm``, if it imports) backends: forward (no autograd) and forward + backward;
2. the Mamba layer at the same sizes and backends, ``(1, L, d_model)`` in and out;
3. the ``paper`` model (``psmamba.models.build_model("paper")``) at 160x192x160: inference and
   one AMP (bf16 autocast) training step (LNCC(9) + Diffusion, Adam with amsgrad, as the
   benchmarks' training loop), for each fast backend;
4. MONAI's VoxelMorph (``benchmarks.peers.VoxelMorphPeer``, MONAI's defaults) beside it.

Timing: a warm-up call (Triton compiles its kernels there), then the median of ``repeats``
calls, each between ``torch.cuda.synchronize()``; peak memory is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. Every measurement is
guarded: an error or an out-of-memory is recorded in its row and the run goes on; a global
time budget (``--budget``, default 270 s) skips what no longer fits (recorded as skipped). The
``reference`` scan is skipped where its autograd graph (``O(L E N)`` per-step states) would
not fit in memory. The device's name, torch/triton/mamba_ssm versions go into the JSON.

``--smoke``: the same stages on the CPU with tiny sizes in seconds (Triton's interpreter for the
triton backend; ``TRITON_INTERPRET=1`` is set before triton is imported), so a test can run it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: (L, d_model) of the paper model's five levels at 160x192x160 (levels 1..5)
LEVELS = [(4_915_200, 16), (614_400, 32), (76_800, 64), (9_600, 128), (1_200, 256)]
#: tiny stand-ins for --smoke (CPU, interpreter)
SMOKE_LEVELS = [(37, 4), (20, 8)]
SIZE = (160, 192, 160)
SMOKE_SIZE = (32, 16, 16)
#: --smoke shrinks the paper model too (one SIR pass, c = 1): it checks the plumbing, not speed
SMOKE_MODEL = {"channels": 1, "sir_iters": 1, "mamba_backend": "reference"}
D_STATE = 16


class Budget:
    """The global time budget: what is left, and whether a stage of ``need`` seconds fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def fits(self, need: float) -> bool:
        return self.left() > need


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "mamba_ssm": _version("mamba-ssm") or _version("mamba_ssm"),
        "monai": _version("monai"),
        "python": sys.version.split()[0],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    else:
        info["device_name"] = "cpu"
    return info


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device, repeats: int) -> dict[str, Any]:
    """Warm-up call (not in a smoke run), then the median wall time of ``repeats`` calls and
    the peak GPU memory."""
    import torch

    _sync(device)
    if device.type != "cpu":
        fn()  # warm-up: Triton/cuDNN compile and pick kernels, the allocator grows
        _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"time_s": statistics.median(times), "times_s": times, "peak_gib": peak}


def guarded(row: dict[str, Any], budget: Budget, need: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement into ``row``; errors, OOMs and the budget are recorded, not raised."""
    import torch

    if not budget.fits(need):
        row["status"] = f"skipped: {budget.left():.0f} s of the budget left"
        return row
    try:
        row.update(fn())
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - one failure must not stop the run
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        row["status"] = "oom" if "out of memory" in text.lower() or isinstance(exc, MemoryError) else "error"
        row["error"] = text
        row["traceback"] = traceback.format_exc(limit=4)[-1500:]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def scan_backends(device, smoke: bool) -> list[str]:
    from psmamba.nn import scan

    names = ["reference", "triton"]
    if device.type == "cuda" and scan._mamba_ssm_available():
        names.append("cuda")
    if not scan._triton_available():
        names.remove("triton")
    return names


def _reference_fits(length: int, e: int, device, training: bool) -> bool:
    """Whether the reference scan's working set fits: with autograd it keeps every per-step
    state of its two chunked sweeps (about 10 copies of B E L N floats); without, a few
    (B, E, L/T, N) tensors (T ~ sqrt(L))."""
    import torch

    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    need = 10 * e * length * D_STATE * 4 if training else 8 * e * length * 4
    return need < 0.6 * free


def scan_inputs(length: int, d_model: int, device, requires_grad: bool):
    import torch
    import torch.nn.functional as F

    e = 2 * d_model
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device)

    dt_bias = torch.log(torch.expm1(torch.logspace(-3, -1, e, device=device)))
    tensors = [
        rnd(1, e, length),
        F.softplus(dt_bias[None, :, None] + 0.3 * rnd(1, e, length)),
        -torch.arange(1, D_STATE + 1, device=device, dtype=torch.float32).repeat(e, 1),
        rnd(1, D_STATE, length),
        rnd(1, D_STATE, length),
        torch.ones(e, device=device),
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


def bench_scan(levels, device, budget: Budget, repeats: int, smoke: bool) -> list[dict[str, Any]]:
    import torch

    from psmamba.nn.scan import selective_scan

    rows = []
    for level, (length, d_model) in enumerate(levels, start=1):
        for backend in scan_backends(device, smoke):
            for mode in ("forward", "forward+backward"):
                training = mode != "forward"
                row = {"stage": "scan", "level": level, "L": length, "d_model": d_model, "backend": backend, "mode": mode}
                if backend == "reference" and not _reference_fits(length, 2 * d_model, device, training):
                    row["status"] = "skipped: would not fit in memory"
                    rows.append(row)
                    continue

                def run(length=length, d_model=d_model, backend=backend, training=training):
                    args = scan_inputs(length, d_model, device, training)
                    w = torch.randn(1, 2 * d_model, length, device=device)

                    def call():
                        if training:
                            y = selective_scan(*args, backend=backend)
                            (y * w).sum().backward()
                        else:
                            with torch.no_grad():
                                selective_scan(*args, backend=backend)

                    return measure(call, device, repeats)

                rows.append(guarded(row, budget, 5.0, run))
                _print_row(rows[-1])
    return rows


def bench_layer(levels, device, budget: Budget, repeats: int, smoke: bool) -> list[dict[str, Any]]:
    import torch

    from psmamba.nn.mamba import Mamba

    rows = []
    for level, (length, d_model) in enumerate(levels, start=1):
        for backend in scan_backends(device, smoke):
            for mode in ("forward", "forward+backward"):
                training = mode != "forward"
                row = {"stage": "mamba_layer", "level": level, "L": length, "d_model": d_model, "backend": backend, "mode": mode}

                def run(length=length, d_model=d_model, backend=backend, training=training):
                    torch.manual_seed(0)
                    layer = Mamba(d_model, d_state=D_STATE, backend=backend).to(device)
                    x = torch.randn(1, length, d_model, device=device, requires_grad=training)

                    def call():
                        if training:
                            layer(x).square().mean().backward()
                        else:
                            with torch.no_grad():
                                layer(x)

                    return measure(call, device, repeats)

                rows.append(guarded(row, budget, 8.0, run))
                _print_row(rows[-1])
    return rows


def _pair(size, device):
    """A smooth random pair (B=1): trilinear upsampling of coarse noise, in [0, 1]."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(1)
    coarse = torch.rand(2, 1, *[max(2, s // 8) for s in size], generator=g, device=device)
    vol = F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)
    return vol[:1].contiguous(), vol[1:].contiguous()


def bench_models(size, device, budget: Budget, repeats: int, smoke: bool) -> list[dict[str, Any]]:
    import torch

    from psmamba.losses import LNCC, Diffusion
    from psmamba.models import build_model

    rows = []
    nets: list[tuple[str, str, Callable[[], torch.nn.Module]]] = []
    if smoke:
        nets.append(("paper (smoke: c=1, K=1)", "reference", lambda: build_model("paper", **SMOKE_MODEL)))
    else:
        for backend in [b for b in scan_backends(device, smoke) if b != "reference"]:
            nets.append(("paper", backend, lambda backend=backend: build_model("paper", mamba_backend=backend)))

    def voxelmorph():
        from benchmarks.peers import VoxelMorphPeer

        return VoxelMorphPeer()

    nets.append(("voxelmorph (MONAI)", "-", voxelmorph))
    moving, fixed = _pair(size, device)
    amp_dtype = torch.bfloat16
    for name, backend, make in nets:
        base = {"stage": "model", "model": name, "backend": backend, "size": "x".join(map(str, size))}

        def infer(make=make):
            net = make().to(device).eval()
            params = sum(p.numel() for p in net.parameters())

            def call():
                with torch.no_grad():
                    net(moving, fixed)

            return {"params": params, **measure(call, device, repeats)}

        def train(make=make):
            net = make().to(device).train()
            sim, reg = LNCC(window=9).to(device), Diffusion().to(device)
            opt = torch.optim.Adam(net.parameters(), lr=1e-4, amsgrad=True)

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, dtype=amp_dtype):
                    out = net(moving, fixed)
                # the losses in float32 (as the training engine computes them)
                loss = sim(out.warped.float(), fixed) + reg(out.ddf.float())
                loss.backward()
                opt.step()

            return measure(step, device, repeats)

        rows.append(guarded({**base, "mode": "inference"}, budget, 20.0, infer))
        _print_row(rows[-1])
        rows.append(guarded({**base, "mode": f"train step (AMP {str(amp_dtype).split('.')[-1]})"}, budget, 25.0, train))
        _print_row(rows[-1])
    return rows


def _print_row(row: dict[str, Any]) -> None:
    print("  " + _row_text(row), flush=True)


def _row_text(row: dict[str, Any]) -> str:
    what = row.get("model") or f"L={row['L']:,} d_model={row['d_model']}"
    t = row.get("time_s")
    mem = row.get("peak_gib")
    return (
        f"{row['stage']:<12} {what:<28} {row.get('backend', '-'):<10} {row['mode']:<26} "
        f"{'-' if t is None else f'{t * 1000:10.1f} ms':>13} {'-' if mem is None else f'{mem:7.2f} GiB':>11} "
        f"{row.get('status', '')}{(': ' + row['error']) if row.get('error') else ''}"
    )


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'stage':<12} {'size':<28} {'backend':<10} {'mode':<26} {'median':>13} {'peak mem':>11} status"
    return "\n".join([head, "-" * len(head)] + [_row_text(r) for r in rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU in seconds (tests)")
    p.add_argument("--budget", type=float, default=None, help="global time budget in seconds (default 270; smoke 120)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3; smoke 1)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_gpu.json", help="the JSON written")
    p.add_argument("--stages", default="scan,layer,model", help="comma-separated subset of scan,layer,model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke and "triton" not in sys.modules:
        # Triton's interpreter must be chosen before triton is imported (see psmamba.nn._scan_triton)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from psmamba.nn._scan_triton import fast_interpreter_scan

    start = time.perf_counter()
    budget = Budget(args.budget if args.budget is not None else (120.0 if args.smoke else 270.0))
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny tensors: a second thread only waits (shared CI machines)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench_gpu: no GPU here; use --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    levels = SMOKE_LEVELS if args.smoke else LEVELS
    size = SMOKE_SIZE if args.smoke else SIZE
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    result: dict[str, Any] = {"smoke": args.smoke, "info": device_info(device), "rows": []}
    print(f"bench_gpu on {result['info']['device_name']} (torch {torch.__version__}, triton {result['info']['triton']}, "
          f"mamba_ssm {result['info']['mamba_ssm']}), budget {budget.left():.0f} s", flush=True)
    stage_fns = [("model", lambda: bench_models(size, device, budget, repeats, args.smoke)),
                 ("scan", lambda: bench_scan(levels, device, budget, repeats, args.smoke)),
                 ("layer", lambda: bench_layer(levels, device, budget, repeats, args.smoke))]
    with fast_interpreter_scan():  # no effect on a GPU
        for name, fn in stage_fns:
            if name not in stages:
                continue
            try:
                result["rows"].extend(fn())
            except Exception as exc:  # noqa: BLE001 - a stage that fails as a whole is recorded too
                result["rows"].append({"stage": name, "mode": "-", "L": 0, "d_model": 0, "status": "error",
                                       "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                                       "traceback": traceback.format_exc(limit=4)[-1500:]})
    result["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import json

    args.out.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    print()
    print(table(result["rows"]))
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
