"""Issue 13: where the default pipeline's time can go, on the demo's VAL pairs (not the test pairs).

The default pipeline (affine, the shipped network, io) in four variants, each pair aligned and
misaligned as ``bench_register.py`` misaligns (seed 7), the variant order rotated from pair to
pair, 2 threads, one process:

- ``whole``: io's full-size level integrates the whole upsampled velocity at every step
  (``DeformableConfig(full_residual=False)``, the scheme before 2026-11-30);
- ``residual``: the full-size level optimises a residual velocity on the coarser map
  integrated on its own grid and upsampled (``full_residual=True``);
- ``residual_sq05``: as ``residual``, scaling and squaring from ``v / 2^K`` of at most 0.5 voxel
  instead of 0.25 (one squaring fewer per ``exp``);
- ``residual_rigid_coarse``: as ``residual``, the affine stage's rigid part at its coarse level
  only (``affine_register(rigid_iterations=[150, 0])``), the affine part at both; the other
  three run the rigid part at both levels (``rigid_iterations=[150, 30]``, the default before
  2026-11-30; today's default pipeline is this variant).

    python benchmarks/ablations/register_speed.py [--threads 2] [--variants residual whole ...]

Writes ``results/register_speed.jsonl`` (one row per run) and prints the means.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ablations._common import (  # noqa: E402
    Rows, levels_run, parse_args, register_timed, rotated, scores, val_pairs,
)

VARIANTS = ("whole", "residual", "residual_sq05", "residual_rigid_coarse")


def main() -> int:
    args = parse_args(__doc__, "register_speed.jsonl",
                      lambda ap: ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS))

    import numpy as np
    import psmamba.affine as affine_mod
    import psmamba.deformable as deformable_mod
    from psmamba.deformable import DeformableConfig

    plain_affine = affine_mod.affine_register
    squaring = deformable_mod._SQUARING_START

    def setup(name: str) -> DeformableConfig:
        deformable_mod._SQUARING_START = 0.5 if name == "residual_sq05" else squaring
        rigid = [150, 0] if name == "residual_rigid_coarse" else [150, 30]  # both explicit: defaults change
        affine_mod.affine_register = lambda *a, **k: plain_affine(*a, rigid_iterations=rigid, **k)
        return DeformableConfig(full_residual=name != "whole")

    try:
        with Rows(args.out) as out:
            for i, p in enumerate(val_pairs(misaligned=True)):
                for name in rotated(args.variants, i):
                    res, sec = register_timed(p, "default", deformable=setup(name))
                    out.add({"pair": p.pair_id, "mis": p.motion is not None, "cfg": name, "sec": round(sec, 2),
                             "affine_s": round(float(res.summary.get("timings_s", {}).get("affine") or 0.0), 2),
                             **scores(res), "levels": levels_run(res.summary)})
    finally:
        affine_mod.affine_register = plain_affine
        deformable_mod._SQUARING_START = squaring
    print("\nvariant                 aligned  misaligned  folding % (max)  seconds (mean)  affine s")
    for name in args.variants:
        d = {m: [r["dice"] for r in out.rows if r["cfg"] == name and r["mis"] == m] for m in (False, True)}
        mine = [r for r in out.rows if r["cfg"] == name]
        print(f"{name:22s}  {np.mean(d[False]):.4f}   {np.mean(d[True]):.4f}      "
              f"{max(r['fold'] or 0.0 for r in mine):.5f}          {np.mean([r['sec'] for r in mine]):.1f}"
              f"            {np.mean([r['affine_s'] for r in mine]):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
