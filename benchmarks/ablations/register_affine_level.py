"""Issue 13: affine finest level shrink 3 vs adding shrink 2, on the demo's VAL pairs, aligned and misaligned."""
import json, sys, time
import torch
torch.set_num_threads(2)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from benchmarks.bench_register import _misaligned, demo_bench_data
from psmamba.engine.register import register_pair
import psmamba.affine as A
from psmamba.io import Image

orig = A._auto_shrink
def finer(shape, aff):
    s = orig(shape, aff)
    return s + [s[-1] - 1] if s[-1] > 1 else s
pairs = demo_bench_data("full", one_way=True, splits=("val",)).pairs["val"]
pairs = pairs + [_misaligned(p, 7) for p in pairs]
for i, p in enumerate(pairs):
    names = ["base", "finer"] if i % 2 == 0 else ["finer", "base"]
    for name in names:
        A._auto_shrink = orig if name == "base" else finer
        img = lambda a, n: Image(data=a, affine=p.affine, header=None, path=n)
        t0 = time.perf_counter()
        res = register_pair(img(p.fixed, "f"), img(p.moving, "m"), method="default", device="cpu", overview=False,
                            moving_labels=img(p.moving_labels, "ml"), fixed_labels=img(p.fixed_labels, "fl"))
        s = res.summary
        print(json.dumps(dict(pair=p.pair_id, mis=p.motion is not None, cfg=name, sec=round(time.perf_counter() - t0, 1),
              dice=round(s["dice_after"]["mean"], 5), t=s.get("timings_s"))), flush=True)
