"""Issue 13: io 1/2-level cap, on the demo's VAL pairs (not the benchmark's test pairs)."""
import json, sys, time
import torch
torch.set_num_threads(2)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from benchmarks.bench_register import _misaligned, demo_bench_data
from psmamba.engine.register import register_pair, build_pipeline
from psmamba.deformable import DeformableConfig
from psmamba.io import Image

pairs = demo_bench_data("full", one_way=True, splits=("val",)).pairs["val"]
pairs = pairs + [_misaligned(p, 7) for p in pairs]
configs = {k: DeformableConfig(iterations=v) for k, v in
           {"base": (100, 30, 0), "half60": (100, 60, 0), "half100": (100, 100, 0)}.items()}
out = []
for i, p in enumerate(pairs):
    names = list(configs)
    names = names[i % 3:] + names[:i % 3]
    for name in names:
        aff = p.affine
        img = lambda a, n: Image(data=a, affine=aff, header=None, path=n)
        pipe = build_pipeline("default", deformable=configs[name])
        t0 = time.perf_counter()
        res = register_pair(img(p.fixed, "f"), img(p.moving, "m"), method=pipe, device="cpu", overview=False,
                            moving_labels=img(p.moving_labels, "ml"), fixed_labels=img(p.fixed_labels, "fl"))
        sec = time.perf_counter() - t0
        s = res.summary
        row = dict(pair=p.pair_id, mis=p.motion is not None, cfg=name, sec=round(sec, 1),
                   dice=s["dice_after"]["mean"], before=s["dice_before"]["mean"],
                   fold=s.get("folding_percent"))
        def find(d):
            if isinstance(d, dict):
                if "levels_run" in d: return d["levels_run"]
                for v in d.values():
                    r = find(v)
                    if r is not None: return r
            if isinstance(d, list):
                for v in d:
                    r = find(v)
                    if r is not None: return r
        lv = find(s)
        row["levels"] = [(l.get("factor"), l.get("iterations"), l.get("converged")) for l in lv] if lv else None
        print(json.dumps(row, default=str)[:400], flush=True)
        out.append(row)
json.dump(out, open("benchmarks/ablations/results/register_io_cap.json", "w"), default=str, indent=1)
