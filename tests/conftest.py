"""Tiny shared fixtures (keep this file small; module-specific helpers live in their tests).

The tests mirror the package in sub-folders (``tests/nn/`` ...) and are imported with
``--import-mode=importlib`` (pyproject's addopts), so two test files of one name in different
folders cannot clash; that mode puts no folder on ``sys.path``, so this file puts ``tests/``
there for the shared helpers (``_folders``, ``golden``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_torch_thread():
    """Run torch on one thread: on tiny volumes a second thread gains little, and on a machine
    shared with other jobs it makes every small op wait (5-10x slower measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
