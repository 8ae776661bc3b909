"""Issue 13: io's 1/2-level cap (30, 60, 100 steps), on the demo's VAL pairs (not the test pairs).

The default pipeline with io's most steps per level (1/4, 1/2, 1) at 100, 30, 0 (``base``, the
default then), 100, 60, 0 and 100, 100, 0; each pair aligned and misaligned (seed 7), the
variant order rotated, 2 threads. (The committed ``results/register_io_cap.json`` was made when
``default`` meant ``affine+io``, with seconds that included the metrics.)

    python benchmarks/ablations/register_io_cap.py [--threads 2]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ablations._common import levels_run, parse_args, register_timed, rotated, scores, val_pairs  # noqa: E402

SCHEDULES = {"base": (100, 30, 0), "half60": (100, 60, 0), "half100": (100, 100, 0)}


def main() -> int:
    args = parse_args(__doc__, "register_io_cap.json")

    from psmamba.deformable import DeformableConfig

    rows = []
    for i, p in enumerate(val_pairs(misaligned=True)):
        for name in rotated(SCHEDULES, i):
            res, sec = register_timed(p, "default", deformable=DeformableConfig(iterations=SCHEDULES[name]))
            row = {"pair": p.pair_id, "mis": p.motion is not None, "cfg": name, "sec": round(sec, 1),
                   **scores(res), "levels": levels_run(res.summary)}
            print(json.dumps(row, default=str), flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, default=str, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
