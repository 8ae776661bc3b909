"""Seeded runs whose results were recorded from the code before the "one engine" reshaping.

``python tests/golden.py record`` wrote ``tests/fixtures/golden_v0.pt`` with the code of b77b018;
``tests/engine/test_golden.py`` reruns the same two jobs with today's code and compares:

* ``train``: 20 optimiser steps of ``psmamba train`` (preset ``paper`` at c = 1, so every kind
  of block runs, Mamba layers included), seed 0, one thread, on the tiny folder of
  ``tests/_folders.py``; the final weights (``last.pt``) are recorded, and the checkpoint file
  itself is kept as ``golden_v0_best.pt``, a checkpoint written by the old code.
* ``register``: ``psmamba register --iters 20`` (the Adam instance optimisation) on a smooth
  two-blob pair, one thread; the written ``ddf.nii.gz`` is recorded. Re-recorded once, on
  purpose, when ``register`` changed from min-max to 0.5/99.5 percentile intensity scaling (with
  min-max scaling patched back in, the new code gave the old field bit for bit).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "fixtures" / "golden_v0.pt"
OLD_CHECKPOINT = HERE / "fixtures" / "golden_v0_best.pt"
TRAIN_STEPS = 20


def blob_pair(folder: Path) -> tuple[Path, Path]:
    """A 24^3 pair: a soft ball with an inner ball, the moving one shifted and wobbled."""
    shape = (24, 24, 24)
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = -11.5

    def image(shift, wobble):
        xyz = idx - 11.5 - np.asarray(shift)
        if wobble:
            xyz = xyz + wobble * np.sin(xyz[..., ::-1] / 5.0)
        r1 = np.linalg.norm(xyz, axis=-1)
        r3 = np.linalg.norm(xyz - [0.0, 5.0, -5.0], axis=-1)
        img = 1 / (1 + np.exp((r1 - 7) / 0.8)) + 0.6 / (1 + np.exp((r1 - 3.5) / 0.8)) + 0.8 / (1 + np.exp((r3 - 3) / 0.8))
        return img.astype(np.float32)

    folder.mkdir(parents=True, exist_ok=True)
    fixed, moving = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    nib.save(nib.Nifti1Image(image((0, 0, 0), 0.0), aff), str(fixed))
    nib.save(nib.Nifti1Image(image((2.5, -2.0, 2.0), 0.8), aff), str(moving))
    return fixed, moving


def run_train(work: Path) -> Path:
    """20 seeded steps of ``psmamba train``; returns the run folder."""
    sys.path.insert(0, str(HERE))
    from _folders import make_folder

    from psmamba.cli import main

    data = make_folder(work / "scans")
    cfg = {
        "model": {"preset": "paper", "channels": 1},
        "data": {"source": "folder", "root": str(data), "val_fraction": 0.34, "max_val_pairs": 1,
                 "options": {"cache_dir": str(work / "cache"), "test": 0.17}},
        "optim": {"epochs": 4},
        "run": {"threads": 1, "progress": False, "log_every": 1, "tensorboard": False, "images": False,
                "seed": 0, "max_steps": TRAIN_STEPS},
    }
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(work / "cfg.yaml"), "--out", str(work / "run")]) == 0
    return work / "run"


def run_register(work: Path) -> np.ndarray:
    """``psmamba register --iters 20``; returns the written ddf (Learn2Reg layout)."""
    from psmamba.cli import main

    fixed, moving = blob_pair(work / "pair")
    out = work / "reg"
    assert main(["register", "--fixed", str(fixed), "--moving", str(moving), "--iters", "20",
                 "--device", "cpu", "--out", str(out)]) == 0
    return np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj, dtype=np.float32)


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["state_dict"]


def record(work: Path) -> None:
    torch.set_num_threads(1)
    run = run_train(work / "train")
    ddf = run_register(work / "register")
    torch.save({"train_weights": weights_of(run), "register_ddf": torch.from_numpy(ddf)}, GOLDEN)
    shutil.copyfile(run / "best.pt", OLD_CHECKPOINT)
    print("wrote", GOLDEN, "and", OLD_CHECKPOINT)


def in_fresh_process(job: str, work: Path) -> Path:
    """Run ``job`` (``train`` or ``register``) in a new Python process, as a user would.

    A fresh process matters: training a 20-step PSMamba-Net at c = 1 on a 24x16x16 volume is
    chaotic in float32 (its level-5 InstanceNorm sees 2 voxels), so state that earlier tests in
    the same process leave behind (oneDNN's primitive caches, thread pools) changes the
    weights beyond rounding. In a fresh process the same code gives the same bits.
    """
    import os
    import subprocess

    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    subprocess.run([sys.executable, str(Path(__file__).resolve()), job, str(work)], check=True, env=env,
                   timeout=900)
    return work


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    if sys.argv[1:2] == ["record"]:
        with tempfile.TemporaryDirectory() as tmp:
            record(Path(tmp))
    elif sys.argv[1:2] == ["train"] and len(sys.argv) == 3:
        run_train(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["register"] and len(sys.argv) == 3:
        np.save(Path(sys.argv[2]) / "ddf.npy", run_register(Path(sys.argv[2])))
    else:
        raise SystemExit("usage: python tests/golden.py record | train DIR | register DIR")
