"""Issue 14: a checkpoint's network against the shipped one, each alone (``--method network``).

For a longer-trained network (the shipped run continued: see the model card's "Longer training"),
or any network trained on the demo / pre-training data: the demo's full-size val, test_hard and
test pairs (one direction each, no affine stage), both networks in their training box, one
process, the two networks alternating.

    python benchmarks/ablations/network_checkpoint.py runs/pretrain_long/best.pt [--threads 2]

Writes ``results/network_checkpoint.jsonl`` (one row per run) and prints the means per split.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.ablations._common import Rows, parse_args, register_timed, rotated, scores, val_pairs  # noqa: E402


def main() -> int:
    args = parse_args(__doc__, "network_checkpoint.jsonl",
                      lambda ap: ap.add_argument("checkpoint", help="the psmamba checkpoint to compare"))

    import numpy as np

    from benchmarks.bench_register import demo_bench_data
    from psmamba.engine.register import build_pipeline

    plans = {"shipped": build_pipeline("network"), "checkpoint": build_pipeline("network", checkpoint=args.checkpoint)}
    splits = {"val": val_pairs()}
    for split in ("test_hard", "test"):
        splits[split] = list(demo_bench_data("full", one_way=True, splits=(split,)).pairs[split])
    with Rows(args.out) as rows:
        for split, pairs in splits.items():
            for i, p in enumerate(pairs):
                for name in rotated(plans, i):
                    res, sec = register_timed(p, plans[name])
                    rows.add({"split": split, "pair": p.pair_id, "network": name, **scores(res), "sec": round(sec, 2)})
    print(f"\nnetwork alone, mean Dice (checkpoint: {args.checkpoint})")
    for split in splits:
        line = [f"{split:9s}"]
        for name in plans:
            r = [x for x in rows.rows if x["split"] == split and x["network"] == name]
            line.append(f"{name} {np.mean([x['dice'] for x in r]):.4f} (most folding {max(x['fold'] for x in r):.4f} %)")
        before = np.mean([x["before"] for x in rows.rows if x["split"] == split and x["network"] == "shipped"])
        print("  ".join(line) + f"  none {before:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
