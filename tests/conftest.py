"""Tiny shared fixtures (keep this file small; module-specific helpers live in their tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded numpy generator, fresh for every test."""
    return np.random.default_rng(1234)


@pytest.fixture
def torch_seed() -> int:
    """Seed torch's global generator for a reproducible test; returns the seed."""
    torch.manual_seed(1234)
    return 1234


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """An anisotropic, axis-permuted, flipped voxel->world affine (values exact in float32)."""
    return np.array(
        [
            [0.0, -2.0, 0.0, 90.5],
            [1.5, 0.0, 0.0, -126.25],
            [0.0, 0.0, 3.0, -72.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
