"""CIFAR-100 and the two few-shot benchmarks built from it (CIFAR-FS, FC100).

All three read the CIFAR-100 python pickles through torchvision's ``CIFAR100`` reader.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR100

from .base import (
    ImageDataset,
    array_to_image,
    check_classes_present,
    classification_split,
    fewshot_split,
    read_split_lines,
    require_file,
    require_root,
)
from .registry import register_dataset

CIFAR_LAYOUT = """
root/
  cifar-100-python/
    train   (pickle: data [50000, 3072] uint8, fine_labels, coarse_labels)
    test    (pickle: data [10000, 3072] uint8, fine_labels, coarse_labels)
    meta    (pickle: fine_label_names, coarse_label_names)
(the extracted cifar-100-python.tar.gz; download=True fetches it for cifar100)
"""


class _CIFAR100(CIFAR100):
    """torchvision's reader, checking that files exist instead of their MD5 (``download=True`` checks MD5)."""

    def __init__(self, root: str, train: bool, download: bool) -> None:
        self._verify_md5 = download
        super().__init__(root, train=train, download=download)

    def _check_integrity(self) -> bool:
        if self._verify_md5:
            return super()._check_integrity()
        base = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(base, f)) for f, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        if self._verify_md5:
            return super()._load_meta()
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _read_cifar(name: str, root: Any, train: bool, download: bool) -> tuple[np.ndarray, list[int], list[str]]:
    path = require_root(name, root, CIFAR_LAYOUT) if not download else Path(root or ".").expanduser()
    if not download:
        folder = path / "cifar-100-python"
        for f in ("train", "test", "meta"):
            require_file(name, folder / f, CIFAR_LAYOUT, "Pass download=True (cifar100 only) to fetch it.")
    try:
        ds = _CIFAR100(str(path), train=train, download=download)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, UnicodeDecodeError) as err:
        f = path / "cifar-100-python" / ("train" if train else "test")
        raise ValueError(
            f"cannot read CIFAR-100 pickle {f} or its meta file ({err!r}); re-extract the archive"
        ) from err
    data = np.asarray(ds.data)
    if data.ndim != 4 or data.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"CIFAR-100 pickle under {path} holds images of shape {data.shape[1:]}, expected 32x32x3"
        )
    return data, list(ds.targets), list(ds.classes)


def _array_dataset(
    name: str, data: np.ndarray, targets: list[int], classes: list[str], transform: Any
) -> ImageDataset:
    return ImageDataset(
        range(len(targets)), targets, classes, lambda i: array_to_image(data[i]), transform, name
    )


@register_dataset("cifar100", "classification", CIFAR_LAYOUT)
def build_cifar100(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """CIFAR-100 (100 classes, 50,000 train / 10,000 test images, 32x32).

    ``train``/``val`` are a seeded per-class hold-out of the official train file; ``test`` is the
    official test file.

    Expected layout::

        root/cifar-100-python/{train,test,meta}
    """
    if split == "test":
        test = _array_dataset("cifar100", *_read_cifar("cifar100", root, False, download), transform)
        return classification_split(test, test, "test", val_fraction, seed)
    train = _array_dataset("cifar100", *_read_cifar("cifar100", root, True, download), transform)
    return classification_split(train, None, split, val_fraction, seed)


def _pooled_cifar(name: str, root: Any, transform: Any) -> ImageDataset:
    tr_data, tr_t, classes = _read_cifar(name, root, True, False)
    te_data, te_t, classes_te = _read_cifar(name, root, False, False)
    if classes != classes_te:
        raise ValueError(f"{name}: train and test files of {root} disagree on class names")
    expected = read_split_lines("cifar100", "fine_names.txt")
    check_classes_present(name, expected, classes, f"{root}/cifar-100-python/meta")
    data = np.concatenate([tr_data, te_data])
    return _array_dataset(name, data, tr_t + te_t, classes, transform)


@register_dataset("cifar_fs", "fewshot", CIFAR_LAYOUT)
def build_cifar_fs(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """CIFAR-FS (Bertinetto et al., 2019): 64/16/20 CIFAR-100 classes, 600 images each (train+test pooled).

    Class lists are the bundled ``splits/cifar_fs/{train,val,test}.txt``; labels follow each
    list's order.

    Expected layout::

        root/cifar-100-python/{train,test,meta}
    """
    pooled = _pooled_cifar("cifar_fs", root, transform)
    lists = {p: read_split_lines("cifar_fs", f"{p}.txt") for p in ("train", "val", "test")}
    return fewshot_split(pooled, lists, split, val_fraction, seed, f"{root}/cifar-100-python")


@register_dataset("fc100", "fewshot", CIFAR_LAYOUT)
def build_fc100(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """FC100 (Oreshkin et al., 2018): 60/20/20 CIFAR-100 classes split by superclass (12/4/4).

    Class lists are the bundled ``splits/fc100/{train,val,test}.txt``.

    Expected layout::

        root/cifar-100-python/{train,test,meta}
    """
    pooled = _pooled_cifar("fc100", root, transform)
    lists = {p: read_split_lines("fc100", f"{p}.txt") for p in ("train", "val", "test")}
    return fewshot_split(pooled, lists, split, val_fraction, seed, f"{root}/cifar-100-python")
