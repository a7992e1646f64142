"""Fashion-MNIST from idx files (torchvision's layout or Debian's ``dataset-fashion-mnist`` package)."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .base import ArrayLoader, ImageDataset, classification_split
from .registry import register_dataset

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")

FASHION_LAYOUT = f"""
Either torchvision's layout:
  root/FashionMNIST/raw/{{train,t10k}}-images-idx3-ubyte, {{train,t10k}}-labels-idx1-ubyte   (download=True fetches it)
or the (optionally gzipped) idx files directly in root, as Debian's dataset-fashion-mnist package installs them:
  root/{{train,t10k}}-images-idx3-ubyte[.gz], root/{{train,t10k}}-labels-idx1-ubyte[.gz]
root defaults to {DEBIAN_ROOT} when that folder exists (apt install dataset-fashion-mnist).
"""

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or plain) of unsigned bytes into an array.

    Args:
        path: The idx file.

    Returns:
        uint8 array of the shape stored in the header (``[N]`` labels or ``[N, 28, 28]`` images).

    Raises:
        ValueError: If the header is not an unsigned-byte idx header or the data are truncated.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(
            f"cannot read idx file {path} ({err}); the file is corrupt: reinstall or re-download it"
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number); the file is corrupt")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    n = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != n:
        raise ValueError(
            f"{path}: header says {dims} ({n} bytes) but the file holds {len(raw) - offset}; it is truncated"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load(root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if train else "t10k"
    tv_raw = root / "FashionMNIST" / "raw"
    if download and _find(tv_raw, f"{prefix}-images-idx3-ubyte") is None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=train, download=True)
    for folder in (tv_raw, root):
        img = _find(folder, f"{prefix}-images-idx3-ubyte")
        lab = _find(folder, f"{prefix}-labels-idx1-ubyte")
        if img is not None and lab is not None:
            images, labels = read_idx(img), read_idx(lab)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(
                    f"fashion_mnist: {img} and {lab} disagree ({images.shape} images, {labels.shape} labels)"
                )
            if labels.size and labels.max() >= len(CLASSES):
                raise ValueError(f"fashion_mnist: {lab} has labels up to {labels.max()}, expected 0..9")
            return images, labels
    raise FileNotFoundError(
        f"fashion_mnist: no {prefix} idx files under {root}. Set root=... (data.root), pass download=True or "
        f"install Debian's dataset-fashion-mnist. Expected layout:\n{FASHION_LAYOUT}"
    )


@register_dataset("fashion_mnist", "classification", FASHION_LAYOUT)
def build_fashion_mnist(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """Fashion-MNIST (10 classes; 60,000 train / 10,000 test 28x28 grayscale images, returned as RGB).

    ``train``/``val`` are a seeded hold-out of the official train file; ``test`` is the t10k file.

    Expected layout::

        root/FashionMNIST/raw/*-ubyte   or   root/*-ubyte.gz (default root: /usr/share/datasets/fashion-mnist)
    """
    if root is None:
        if not DEBIAN_ROOT.is_dir() and not download:
            raise FileNotFoundError(
                f"fashion_mnist: no root given and {DEBIAN_ROOT} does not exist. Set root=... (data.root), "
                f"pass download=True or apt install dataset-fashion-mnist. Expected layout:\n{FASHION_LAYOUT}"
            )
        root = DEBIAN_ROOT if DEBIAN_ROOT.is_dir() else Path(".")
    path = Path(root).expanduser()
    if not path.is_dir() and not download:
        raise FileNotFoundError(
            f"fashion_mnist: root {path} is not a directory. Expected layout:\n{FASHION_LAYOUT}"
        )
    images, labels = _load(path, split != "test", download)
    data = ImageDataset(
        range(len(labels)),
        labels.tolist(),
        CLASSES,
        ArrayLoader(images),
        transform,
        "fashion_mnist",
    )
    return classification_split(data, data, split, val_fraction, seed)
