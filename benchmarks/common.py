"""Shared pieces of the benchmarks: the machine record, timing and memory probes, fresh
subprocesses with a memory cap, the ONE training loop every learned method goes through,
and writers for JSON / CSV / markdown results.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RESULTS_DIR",
    "REPO_ROOT",
    "RESULT_MARKER",
    "machine_info",
    "load_average",
    "wait_for_load",
    "set_threads",
    "cpu_seconds",
    "current_rss_mib",
    "peak_rss_mib",
    "reset_peak_rss",
    "synchronize",
    "run_child",
    "median",
    "TrainReport",
    "train_network",
    "write_json",
    "write_csv",
    "write_text",
    "markdown_table",
    "fmt",
    "parse_size",
    "size_str",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: a child process prints its result as one line ``RESULT_MARKER + json`` on stdout
RESULT_MARKER = "@@BENCH_RESULT@@ "


# --------------------------------------------------------------------------- the machine
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+uncommitted" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(device: Any = None) -> dict[str, Any]:
    """Everything needed to read a timing later: CPU, cores, memory, library versions, threads, load.

    Args:
        device: the torch device the run used (its name is recorded for accelerators).
    """
    import torch

    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _mem_total_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba": _version("numba"),
        "monai": _version("monai"),
        "mambapy": _version("mambapy"),
        "antspyx": _version("antspyx"),
        "numpy": np.__version__,
        "psmamba_commit": _git_commit(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                                           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_WAIT_POLICY")
                if k in os.environ},
        "load_average": load_average(),
        "runtime": _runtime_settings(),
        "device": "cpu",
    }
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        info["device"] = str(device)
        try:
            info["device_name"] = torch.cuda.get_device_name(device)
            info["cuda"] = torch.version.cuda
        except (RuntimeError, AssertionError, AttributeError):
            pass
    return info


def _runtime_settings() -> dict[str, Any]:
    """psmamba's process settings in force (:class:`psmamba.runtime.Runtime`): fast paths, kept
    memory, threads, Mamba chunk sizes."""
    from psmamba import runtime

    return {**runtime.current().as_dict(), "freed_memory_kept": runtime.freed_memory_kept()}


def wait_for_load(max_load: float, max_wait_s: float, log: Callable[[str], None] | None = None) -> list[float]:
    """Sleep (30 s at a time) until the 1-minute load average drops below ``max_load``, at most ``max_wait_s``.

    Returns the load average when it returned (also when it gave up).
    """
    start = time.monotonic()
    while True:
        load = load_average()
        if not load or load[0] < max_load or time.monotonic() - start >= max_wait_s:
            return load
        if log:
            log(f"load average {load[0]:.1f} >= {max_load}: waiting ({time.monotonic() - start:.0f}/{max_wait_s:.0f} s)")
        time.sleep(min(30.0, max(1.0, max_wait_s - (time.monotonic() - start))))


# --------------------------------------------------------------------------- probes
def set_threads(n: int | None) -> int:
    """Use ``n`` threads in torch, numba and ITK (None: leave the defaults); returns torch's count."""
    import torch

    if n:
        n = int(n)
        torch.set_num_threads(n)
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)
        try:
            import numba

            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        except (ImportError, ValueError):
            pass
    return torch.get_num_threads()


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads, so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def current_rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _vm_hwm_kib() -> int | None:
    return _proc_status_kib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux: ``echo 5 > /proc/self/clear_refs``).

    Returns False where that is impossible, or where the kernel accepted the write but the mark
    did not come down to the current RSS (seen on some kernels); :func:`peak_rss_mib` then keeps
    meaning "peak so far", which is why speed probes run each method in a fresh process.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _vm_hwm_kib(), _proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 16 * 2**10


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB) since start or the last :func:`reset_peak_rss`.

    Linux: ``VmHWM`` of ``/proc/self/status`` (the same mark as ``ru_maxrss``, but resettable);
    elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    hwm = _vm_hwm_kib()
    if hwm is not None:
        return hwm / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def synchronize(device: Any) -> None:
    """Wait for queued accelerator work (kernels run asynchronously; a timer must not stop early)."""
    import torch

    if getattr(device, "type", "cpu") != "cpu":
        acc = getattr(torch, "accelerator", None)
        if acc is not None and acc.is_available():
            acc.synchronize()


def median(values: Iterable[float]) -> float:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return statistics.median(v) if v else float("nan")


def _limit_memory(limit_bytes: int | None) -> Callable[[], None] | None:
    if not limit_bytes:
        return None

    def apply() -> None:
        # RLIMIT_DATA counts heap and private anonymous mappings (where tensors live) but not
        # shared libraries or reserved address space: the allocation that would exceed it
        # fails inside the child, which reports "out of memory" instead of swapping the machine.
        resource.setrlimit(resource.RLIMIT_DATA, (int(limit_bytes), int(limit_bytes)))

    return apply


def run_child(module: str, spec: Mapping[str, Any], *, timeout_s: float, mem_limit_bytes: int | None = None,
              env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module --child <json spec>`` in a FRESH process and return its result dict.

    The child prints its result as one line starting with :data:`RESULT_MARKER`. A child that
    fails, runs out of memory or time returns ``{"status": "error" | "oom" | "timeout", "error": ...}``.
    """
    cmd = [sys.executable, "-m", module, "--child", json.dumps(dict(spec))]
    child_env = dict(os.environ)
    child_env.update(env or {})
    # the child must import this package's `benchmarks` whatever the caller's working directory
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env,
                              cwd=str(REPO_ROOT), preexec_fn=_limit_memory(mem_limit_bytes))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    text = " | ".join(tail)
    if proc.returncode in (-9, 137) or "MemoryError" in text or "can't allocate memory" in text or "std::bad_alloc" in text:
        return {"status": "oom", "error": f"killed or out of memory (rc {proc.returncode}): {text[-300:]}"}
    return {"status": "error", "error": f"rc {proc.returncode}: {text[-500:]}"}


def is_oom(exc: BaseException) -> bool:
    """True for the ways torch/numpy/ITK report a failed allocation."""
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, MemoryError) or any(
        s in text for s in ("out of memory", "can't allocate memory", "bad_alloc", "OutOfMemory", "Cannot allocate memory")
    )


# --------------------------------------------------------------------------- images
def parse_size(text: str) -> tuple[int, int, int]:
    """``"160x192x160"`` or ``"64"`` (a cube) -> ``(D, H, W)``."""
    parts = [p for p in str(text).lower().replace(",", "x").split("x") if p]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size must look like 160x192x160, got {text!r}") from None
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3 or min(vals) < 2:
        raise ValueError(f"size must be three sides >= 2 like 160x192x160, got {text!r}")
    return tuple(vals)  # type: ignore[return-value]


def size_str(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


# --------------------------------------------------------------------------- training
@dataclass
class TrainReport:
    """What :func:`train_network` did (JSON-ready through ``asdict``)."""

    steps: int
    lr: float
    lam: float
    window: int
    seed: int
    n_pairs: int
    seconds: float = 0.0
    step_seconds_median: float = float("nan")
    losses: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    selected_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_network(
    model,
    pairs: Sequence[tuple[Any, Any]],
    *,
    steps: int,
    lr: float = 1e-4,
    lam: float = 1.0,
    window: int = 9,
    seed: int = 0,
    val_fn: Callable[[Any], float] | None = None,
    val_every: int = 1,
    log: Callable[[str], None] | None = None,
) -> TrainReport:
    """Train a network the way ``psmamba train`` does, for a budget of ``steps`` steps.

    The same pieces as :class:`psmamba.engine.trainer.Trainer`: epochs of every pair in the
    seeded order of :func:`psmamba.engine.distributed.epoch_order`, batch 1, the objective
    ``LNCC(window) + lam * Diffusion`` (:class:`~psmamba.engine.objective.Objective`), Adam with
    amsgrad through :func:`~psmamba.engine.objective.train_step`, the paper's per-epoch poly
    learning-rate decay over the ``ceil(steps / pairs)`` epochs, validation every ``val_every``
    epochs and after the last (``val_fn``, higher is better, on VALIDATION pairs only) and the same selection rule
    (:func:`~psmamba.engine.trainer.is_better`): the best validated weights are loaded back.

    Args:
        model: ``forward(moving, fixed) -> (warped, ddf)``; trained in place.
        pairs: ``(moving, fixed)`` tensors ``(1, 1, D, H, W)``, already on the model's device.
        steps: optimiser steps (the budget, the same for every method).
    """
    import math

    import torch

    from psmamba.config import LossConfig, OptimConfig
    from psmamba.engine.distributed import epoch_order
    from psmamba.engine.objective import Objective, train_step
    from psmamba.engine.trainer import is_better, poly_scheduler

    if steps < 0 or not pairs:
        raise ValueError(f"train_network: need steps >= 0 and at least one pair, got {steps} steps, {len(pairs)} pairs")
    dev = pairs[0][0].device
    optim_cfg = OptimConfig(lr=lr, epochs=max(1, math.ceil(steps / len(pairs))))
    objective = Objective(LossConfig(window=window, reg_weight=lam)).to(dev)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=optim_cfg.lr,
                           betas=optim_cfg.betas, amsgrad=optim_cfg.amsgrad)
    scheduler = poly_scheduler(opt, optim_cfg.epochs, optim_cfg.poly_power)
    report = TrainReport(steps=steps, lr=lr, lam=lam, window=window, seed=seed, n_pairs=len(pairs))
    best: tuple[float, int, dict] | None = None
    times: list[float] = []
    t_start = time.perf_counter()
    step = 0
    for epoch in range(optim_cfg.epochs):
        model.train()
        for idx in epoch_order(len(pairs), epoch, seed)[: steps - step]:
            moving, fixed = pairs[idx]
            t0 = time.perf_counter()
            terms = train_step(model, objective, opt, [{"moving": moving, "fixed": fixed}])
            synchronize(dev)
            times.append(time.perf_counter() - t0)
            step += 1
            report.losses.append(float(terms[0]))
            if log and (step == 1 or step % max(1, steps // 10) == 0):
                log(f"  step {step}/{steps}: loss {report.losses[-1]:.4f} ({times[-1]:.2f} s)")
        if val_fn is not None and ((epoch + 1) % max(1, val_every) == 0 or epoch + 1 == optim_cfg.epochs):
            model.eval()
            with torch.no_grad():
                score = float(val_fn(model))
            report.validation.append({"step": step, "score": score})
            if log:
                log(f"  epoch {epoch + 1} (step {step}): validation score {score:.4f}")
            if is_better(score, None if best is None else best[0]):
                best = (score, step, copy.deepcopy(model.state_dict()))
        scheduler.step()
    report.seconds = time.perf_counter() - t_start
    report.step_seconds_median = median(times)
    if best is not None:
        report.selected_step = best[1]
        model.load_state_dict(best[2])
    model.eval()
    return report


# --------------------------------------------------------------------------- writing
def _atomic_write(path: Path, text: str) -> None:
    from psmamba.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> Path:
    """Atomic JSON write (NaN/inf become null)."""
    _atomic_write(Path(path), json.dumps(_jsonable(obj), indent=1) + "\n")
    return Path(path)


def run_and_report(out: Path, stem: str, header: Mapping[str, Any],
                   run: Callable[[Callable[[dict], None]], dict], write: Callable[[dict], Iterable[Path]],
                   goals: Callable[[dict], str]) -> dict:
    """The tail every benchmark's ``main`` shares: ``run(progress)`` with ``progress`` keeping
    what was measured so far in ``out/<stem>.partial.json`` (``header`` first: a run that stops
    early leaves its figures), then ``write(result)`` (paths printed), the partial file removed,
    and the goals' text printed. Returns the result."""
    partial = Path(out) / f"{stem}.partial.json"

    def progress(so_far: dict) -> None:
        write_json(partial, {**header, **so_far})

    result = run(progress)
    for path in write(result):
        print(f"wrote {path}")
    partial.unlink(missing_ok=True)
    print(goals(result))
    return result


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Atomic CSV write of ``rows`` (missing keys are empty cells)."""
    from psmamba.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(name: str) -> None:
        with open(name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else fmt(r.get(k), 6) if isinstance(r.get(k), float) else r.get(k))
                            for k in columns})

    return atomic_write(path, write)


def write_text(path: Path, text: str) -> Path:
    _atomic_write(Path(path), text)
    return Path(path)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers with ``digits`` significant decimals, None/NaN as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return "-"
        return f"{float(value):.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one of ``l``/``r`` per column (default: first left, rest right)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(info: Mapping[str, Any]) -> list[str]:
    """A short markdown description of :func:`machine_info`'s record."""
    dev = info.get("device", "cpu")
    dev_txt = f"{dev} ({info['device_name']}, CUDA {info.get('cuda')})" if info.get("device_name") else dev
    return [
        f"- machine: {info.get('cpu')}, {info.get('usable_cores')} usable of {info.get('logical_cores')} logical cores, "
        f"{info.get('memory_gib')} GiB RAM; {info.get('os')}",
        f"- device: {dev_txt}; torch {info.get('torch')} with {info.get('torch_threads')} threads, "
        f"numba {info.get('numba')}, MONAI {info.get('monai')}, mambapy {info.get('mambapy')}, antspyx {info.get('antspyx')}",
        f"- psmamba commit: {info.get('psmamba_commit')}; date (UTC): {info.get('date_utc')}",
    ]
