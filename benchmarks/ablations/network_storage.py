"""Issue 14: does the shipped network depend on how a file stores the brain?

The network was trained on the demo's RAS grid (160x192x160 mm at 1 mm, resized to 48x64x48).
Before it had a :class:`psmamba.engine.methods.NetworkSpace`, ``register`` resized the FIXED FILE's
voxel grid to 48x64x48, so a brain stored in another voxel order (FreeSurfer's LIA, PIR, FSL's LAS)
reached the network rotated or mirrored, and one in a wider field of view shrunken. Now the pair is
resampled into the training box (R, A, S axes, 3.4 x 3.0 x 3.4 mm) placed on the fixed image's
field of view.

On the demo's full-size VAL pairs (one direction each, no affine stage), each pair stored ten
ways (as built: RAS 160x192x160; LAS; LIA; PIR; RAS with 40 voxels of background added on every
side; RAS at 1.5 mm; RAS with 30 or 60 voxels of background added below the brain only, which
puts it 15 or 30 mm off the field of view's centre; RAS with its header pitched by 15 or 30 degrees
about the left-right axis, as an oblique acquisition stores a head tilted in the world), the
network alone (``--method network``) runs two ways: ``space`` (now: the box along the world's R, A,
S axes, so it sees the oblique pairs' heads tilted) and ``resized`` (the file's grid resized, as
before: the model's space removed; it sees the oblique pairs' arrays as built, upright). Variant
order rotated from pair to pair; one process.

    python benchmarks/ablations/network_storage.py [--threads 2]

Writes ``results/network_storage.jsonl`` (one row per run) and prints the mean Dice gain over no
registration per storage and variant.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ablations._common import Rows, parse_args, register_timed, rotated, scores, val_pairs  # noqa: E402

STORAGES = ("RAS", "LAS", "LIA", "PIR", "RAS wide", "RAS 1.5 mm", "RAS 30 below", "RAS 60 below",
            "RAS oblique 15", "RAS oblique 30")
VARIANTS = ("space", "resized")


def stored(p, how: str):
    """Bench pair ``p`` stored ``how``: arrays and affine changed together (the same world images)."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import zoom

    arrays = [np.asarray(a) for a in (p.fixed, p.moving, p.fixed_labels, p.moving_labels)]
    aff = np.asarray(p.affine, dtype=np.float64)
    if how == "RAS":
        out, a = arrays, aff
    elif how in ("LAS", "LIA", "PIR"):
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(aff),
                                               nib.orientations.axcodes2ornt(tuple(how)))
        out = [nib.orientations.apply_orientation(x, ornt) for x in arrays]
        a = aff @ nib.orientations.inv_ornt_aff(ornt, arrays[0].shape)
    elif how == "RAS wide":
        out = [np.pad(x, 40) for x in arrays]
        a = aff.copy()
        a[:3, 3] -= aff[:3, :3] @ np.full(3, 40.0)
    elif "oblique" in how:  # the arrays as built, the header pitched about the L-R axis through the
        # field of view's centre (an oblique acquisition): in the world the head is tilted by that angle
        t = np.deg2rad(float(how.split()[-1]))
        rot = np.eye(4)
        rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        centre = aff[:3, :3] @ ((np.asarray(arrays[0].shape) - 1) / 2) + aff[:3, 3]
        there, back = np.eye(4), np.eye(4)
        there[:3, 3], back[:3, 3] = centre, -centre
        out, a = arrays, there @ rot @ back @ aff
    elif how.endswith(" below"):  # background added below the brain only: the brain off the field of view's centre
        n = int(how.split()[1])
        out = [np.pad(x, [(0, 0), (0, 0), (n, 0)]) for x in arrays]
        a = aff.copy()
        a[:3, 3] -= aff[:3, :3] @ np.array([0.0, 0.0, n])
    else:  # 1.5 mm: every third voxel pair resampled (linear images, nearest labels)
        out = [zoom(x, 2 / 3, order=1 if i < 2 else 0) for i, x in enumerate(arrays)]
        a = aff.copy()
        a[:3, :3] *= 1.5
    out = [np.ascontiguousarray(x) for x in out]
    return SimpleNamespace(fixed=out[0], moving=out[1], fixed_labels=out[2], moving_labels=out[3], affine=a,
                           pair_id=p.pair_id)


def main() -> int:
    args = parse_args(__doc__, "network_storage.jsonl")

    import numpy as np

    from psmamba.engine.register import build_pipeline

    plans = {"space": build_pipeline("network"), "resized": build_pipeline("network")}
    plans["resized"].method.space = None  # the file's grid resized to 48x64x48, as before
    assert plans["space"].method.space is not None
    pairs = val_pairs()
    with Rows(args.out) as rows:
        for i, p in enumerate(pairs):
            for how in STORAGES:
                q = stored(p, how)
                for variant in rotated(VARIANTS, i):
                    res, sec = register_timed(q, plans[variant])
                    rows.add({"pair": p.pair_id, "storage": how, "shape": list(q.fixed.shape), "variant": variant,
                              **scores(res), "sec": round(sec, 2)})
    print("\nmean Dice gain of the network alone over no registration (val pairs)")
    print(f"{'storage':12s} " + " ".join(f"{v:>9s}" for v in VARIANTS))
    for how in STORAGES:
        gains = [np.mean([r["dice"] - r["before"] for r in rows.rows if r["storage"] == how and r["variant"] == v])
                 for v in VARIANTS]
        print(f"{how:12s} " + " ".join(f"{g:+9.4f}" for g in gains))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
