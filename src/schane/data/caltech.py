"""Caltech-256 with a seeded per-class train/test split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    ImageDataset,
    check_no_empty_class,
    classification_split,
    list_image_files,
    load_image,
    require_root,
)
from .registry import register_dataset

CALTECH_LAYOUT = """
root/256_ObjectCategories/      (or root/caltech256/256_ObjectCategories, torchvision's layout, or root itself)
  001.ak47/*.jpg
  002.american-flag/*.jpg
  ...
  257.clutter/*.jpg             (left out unless include_clutter=True)
(download=True fetches it with torchvision.datasets.Caltech256)
"""


def _find_categories(path: Path) -> Path:
    for cand in (path / "256_ObjectCategories", path / "caltech256" / "256_ObjectCategories", path):
        if cand.is_dir() and any(
            p.is_dir() and p.name[:3].isdigit() and "." in p.name for p in cand.iterdir()
        ):
            return cand
    raise FileNotFoundError(
        f"caltech256: no category folders (like 001.ak47) found under {path}. "
        f"Set root=... (data.root) to a folder laid out as:\n{CALTECH_LAYOUT}"
    )


@register_dataset("caltech256", "classification", CALTECH_LAYOUT)
def build_caltech256(
    root: Any,
    split: str,
    transform: Callable | None,
    *,
    seed: int,
    val_fraction: float,
    download: bool,
    train_per_class: int = 60,
    split_seed: int = 0,
    include_clutter: bool = False,
) -> ImageDataset:
    """Caltech-256 (256 object categories, 30,607 images with clutter).

    Caltech-256 has no official split. Ours: for each class, a permutation seeded with
    ``(split_seed, class index)`` puts the first ``train_per_class`` images (default 60, the
    usual protocol) in the training set and the rest in the test set. The test set therefore
    does not depend on ``seed``, which only moves the validation hold-out within the training set.

    Expected layout::

        root/256_ObjectCategories/<NNN.name>/*.jpg

    Raises:
        ValueError: If ``train_per_class`` < 1 or a class has no more than ``train_per_class`` images.
    """
    if train_per_class < 1:
        raise ValueError(f"caltech256: train_per_class must be >= 1, got {train_per_class}")
    if download:
        from torchvision.datasets import Caltech256

        Caltech256(str(root or "."), download=True)
    path = require_root("caltech256", root, CALTECH_LAYOUT)
    cat_dir = _find_categories(path)
    dirs = sorted(p for p in cat_dir.iterdir() if p.is_dir() and p.name[:3].isdigit())
    if not include_clutter:
        dirs = [d for d in dirs if not d.name.endswith(".clutter")]
    classes = [d.name for d in dirs]
    tr_s: list[Path] = []
    tr_t: list[int] = []
    te_s: list[Path] = []
    te_t: list[int] = []
    all_targets: list[int] = []
    for k, d in enumerate(dirs):
        files = list_image_files(d)
        all_targets.extend([k] * len(files))
        if files and len(files) <= train_per_class:
            raise ValueError(
                f"caltech256: class {d.name} has {len(files)} images, not more than train_per_class="
                f"{train_per_class}; lower train_per_class"
            )
        order = np.random.default_rng([split_seed, k]).permutation(len(files))
        for rank, j in enumerate(order):
            (tr_s if rank < train_per_class else te_s).append(files[j])
            (tr_t if rank < train_per_class else te_t).append(k)
    check_no_empty_class("caltech256", all_targets, classes, str(cat_dir))
    train = ImageDataset(tr_s, tr_t, classes, load_image, transform, "caltech256", "train")
    test = ImageDataset(te_s, te_t, classes, load_image, transform, "caltech256", "test")
    return classification_split(train, test, split, val_fraction, seed)
