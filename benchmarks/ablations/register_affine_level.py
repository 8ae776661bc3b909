"""Issue 13: the affine stage's finest level at shrink 3 (default) or with a third level at shrink 2.

On the demo's VAL pairs (not the test pairs), aligned and misaligned (seed 7), the default
pipeline, the variant order alternating, 2 threads. Prints one JSON row per run.

    python benchmarks/ablations/register_affine_level.py [--threads 2]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ablations._common import parse_args, register_timed, rotated, val_pairs  # noqa: E402


def main() -> int:
    parse_args(__doc__)

    import psmamba.affine as affine_mod

    plain = affine_mod._auto_shrink

    def finer(shape, aff):
        s = plain(shape, aff)
        return s + [s[-1] - 1] if s[-1] > 1 else s

    try:
        for i, p in enumerate(val_pairs(misaligned=True)):
            for name in rotated(("base", "finer"), i):
                affine_mod._auto_shrink = plain if name == "base" else finer
                res, sec = register_timed(p, "default")
                print(json.dumps({"pair": p.pair_id, "mis": p.motion is not None, "cfg": name, "sec": round(sec, 1),
                                  "dice": round(res.summary["dice_after"]["mean"], 5),
                                  "t": res.summary.get("timings_s")}), flush=True)
    finally:
        affine_mod._auto_shrink = plain
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
