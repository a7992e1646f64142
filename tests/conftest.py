"""Shared fixtures: thread limits for tiny models and the small datasets several test files train on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

N_CLASSES, PER_CLASS = 3, 12


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and least disturbed by other processes) on one torch thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_openmp_thread():
    """One OpenMP thread for scikit-learn/NumPy-heavy code (t-SNE, metrics) on a shared CPU."""
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    """A folder per class with small coloured noise images (the class decides the dominant channel)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(N_CLASSES):
        d = root / f"class_{c}"
        d.mkdir()
        for i in range(PER_CLASS):
            a = rng.random((20, 20, 3)) * 90
            a[..., c] += 160
            Image.fromarray(a.astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory):
    """A glyph cache folder shared by the tests of one module (rendering once)."""
    return tmp_path_factory.mktemp("glyphs")
