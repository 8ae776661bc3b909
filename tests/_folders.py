"""A tiny folder data set shared by the training and DDP tests (plain module, not a test)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

SHAPE = (24, 16, 16)


def make_folder(root: Path, n: int = 6, seed: int = 0) -> Path:
    """``n`` smooth random volumes ``subK.nii.gz`` with label maps ``subK_seg.nii.gz`` (codes 0-2)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for k in range(n):
        x = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *SHAPE, generator=g), 5, 1, 2)[0, 0].numpy()
        lab = np.digitize(x, np.quantile(x, [0.4, 0.7])).astype(np.int16)
        nib.save(nib.Nifti1Image(x.astype(np.float32), affine), root / f"sub{k}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), root / f"sub{k}_seg.nii.gz")
    return root
