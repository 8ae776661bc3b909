"""Run one measurement in a fresh Python process (shared by bench_scan.py and bench_model.py).

A fresh process per measurement gives each its own peak-RSS mark and keeps one measurement's
allocator state and JIT caches out of the next. Standard library only: the scripts run as
``python benchmarks/bench_scan.py`` as well as imported from the ``benchmarks`` package.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_json_child(script: str | Path, spec: dict, timeout: float, err_chars: int = 300) -> dict:
    """``python script --child <spec as JSON>``; its last stdout line parsed as JSON.

    Returns ``{"error": ...}`` (the last line of its stderr, or the timeout) when it fails.
    """
    cmd = [sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {proc.returncode}: {tail[0][:err_chars]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
