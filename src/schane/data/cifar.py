"""CIFAR-100 and the two few-shot benchmarks built from it (CIFAR-FS, FC100).

Every pickle is read with the restricted unpickler of :mod:`schane.data.safe_pickle` (never
``pickle.load``, never torchvision's ``CIFAR100``, which calls it). CIFAR-FS and FC100 are also
read from the releases most people download:

- MetaOptNet's ``CIFAR_FS_{train,val,test}.pickle`` / ``FC100_{train,val,test}.pickle``
  (kjunelee/MetaOptNet ``data/CIFAR_FS.py``, ``data/FC100.py``; RFS, WangYueFt/rfs
  ``dataset/cifar.py``, ships the same files renamed ``{train,val,test}.pickle``): Python-2
  pickles of ``{"data": uint8 [N, 32, 32, 3], "labels": [N]}`` whose labels are CIFAR-100
  fine-label indices, so ``fine_names[label]`` names the class;
- R2D2's CIFAR-FS image release as learn2learn downloads it (learnables/learn2learn
  ``learn2learn/vision/datasets/cifarfs.py``): ``cifar100/data/<fine name>/*.png`` with
  ``cifar100/splits/bertinetto/{train,val,test}.txt``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    FEWSHOT_PART,
    ArrayLoader,
    ImageDataset,
    check_classes_present,
    class_folders_dataset,
    classification_split,
    fewshot_split,
    layout_not_found,
    read_split_lines,
    require_root,
)
from .registry import register_dataset
from .safe_pickle import load_pickle

logger = logging.getLogger(__name__)

CIFAR_LAYOUT = """
root/cifar-100-python/      (or the three files directly in root)
  train   (pickle: data uint8 [50000, 3072], fine_labels, coarse_labels)
  test    (pickle: data uint8 [10000, 3072], fine_labels, coarse_labels)
  meta    (pickle: fine_label_names, coarse_label_names)
(the extracted cifar-100-python.tar.gz; download=True fetches it for cifar100)
"""

_FS_TAIL = """ 3. split folders:  root/{train,val,test}/<fine name>/*.png
 4. CIFAR-100 python pickles:  root/cifar-100-python/{train,test,meta}  (train and test pooled, 600 images a class)
"""

CIFAR_FS_LAYOUT = (
    """
Any one of (detected in this order):
 1. MetaOptNet / RFS pickles:  root/CIFAR_FS_{train,val,test}.pickle  (RFS: root/{train,val,test}.pickle;
      root may also be the folder holding CIFAR-FS/ or CIFAR_FS/)
      Python-2 pickles of {data: uint8 [N, 32, 32, 3], labels: CIFAR-100 fine-label indices}
 2. R2D2 / learn2learn images:  root/cifar100/data/<fine name>/*.png + root/cifar100/splits/bertinetto/*.txt
      (root may also be learn2learn's root holding cifarfs/, or the cifar100 folder itself)
"""
    + _FS_TAIL
)

FC100_LAYOUT = (
    """
Any one of (detected in this order):
 1. MetaOptNet / RFS pickles:  root/FC100_{train,val,test}.pickle  (RFS: root/{train,val,test}.pickle;
      root may also be the folder holding FC100/)
      Python-2 pickles of {data: uint8 [N, 32, 32, 3], labels: CIFAR-100 fine-label indices}
 2. CIFAR-100 images by class:  root/cifar100/data/<fine name>/*.png  (as in R2D2's CIFAR-FS release)
"""
    + _FS_TAIL
)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-100 python pickles


def _cifar100_folder(root: Path) -> Path | None:
    for cand in (root / "cifar-100-python", root):
        if all((cand / f).is_file() for f in ("train", "test", "meta")):
            return cand
    return None


def _read_cifar_file(path: Path) -> tuple[np.ndarray, list[int]]:
    """Images ``uint8 [N, 32, 32, 3]`` and fine labels of a CIFAR-100 ``train``/``test`` pickle."""
    obj = load_pickle(path)
    if not isinstance(obj, dict) or not {"data", "fine_labels"} <= set(obj):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a CIFAR-100 pickle dict with keys data and fine_labels, got {keys}")
    data = np.asarray(obj["data"])
    labels = [int(x) for x in obj["fine_labels"]]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(
            f"CIFAR-100 pickle {path} holds data of shape {data.shape} ({data.dtype}) and {len(labels)} labels; "
            "expected uint8 [N, 3072] (32x32x3 images) and one label per row"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar_meta(path: Path) -> list[str]:
    obj = load_pickle(path)
    if not isinstance(obj, dict) or "fine_label_names" not in obj:
        raise ValueError(f"{path}: expected a CIFAR-100 meta pickle with key fine_label_names")
    return [str(c) for c in obj["fine_label_names"]]


def _download_cifar100(root: Path) -> None:
    """Fetch and extract the official archive (MD5-checked) unless intact files are already there."""
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    folder = root / CIFAR100.base_folder
    files = [*CIFAR100.train_list, *CIFAR100.test_list, [CIFAR100.meta["filename"], CIFAR100.meta["md5"]]]
    if all(check_integrity(str(folder / f), md5) for f, md5 in files):
        return
    download_and_extract_archive(CIFAR100.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)


def _read_cifar(name: str, root: Any, train: bool, download: bool) -> tuple[np.ndarray, list[int], list[str]]:
    if download:
        path = Path(root or ".").expanduser()
        _download_cifar100(path)
    else:
        path = require_root(name, root, CIFAR_LAYOUT)
    folder = _cifar100_folder(path)
    if folder is None:
        tried = ["CIFAR-100 python pickles: cifar-100-python/{train,test,meta} or {train,test,meta} in root"]
        raise layout_not_found(name, path, tried, CIFAR_LAYOUT)
    data, labels = _read_cifar_file(folder / ("train" if train else "test"))
    classes = _read_cifar_meta(folder / "meta")
    if labels and max(labels) >= len(classes):
        raise ValueError(f"{folder}: fine labels go up to {max(labels)} but meta names {len(classes)} classes")
    return data, labels, classes


def _array_dataset(
    name: str, data: np.ndarray, targets: list[int], classes: list[str], transform: Any
) -> ImageDataset:
    return ImageDataset(range(len(targets)), targets, classes, ArrayLoader(data), transform, name)


@register_dataset("cifar100", "classification", CIFAR_LAYOUT)
def build_cifar100(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """CIFAR-100 (100 classes, 50,000 train / 10,000 test images, 32x32).

    ``train``/``val`` are a seeded per-class hold-out of the official train file; ``test`` is the
    official test file. The pickles are read with the restricted unpickler.

    Expected layout::

        root/cifar-100-python/{train,test,meta}

    Raises:
        FileNotFoundError: If the files are missing (the message lists what root holds).
        UnsafePickleError: If a file asks to run code (nothing is executed).
        ValueError: If a file is damaged or not a CIFAR-100 pickle.
    """
    if split == "test":
        test = _array_dataset("cifar100", *_read_cifar("cifar100", root, False, download), transform)
        return classification_split(test, test, "test", val_fraction, seed)
    train = _array_dataset("cifar100", *_read_cifar("cifar100", root, True, download), transform)
    return classification_split(train, None, split, val_fraction, seed)


def _pooled_cifar(name: str, root: Path, transform: Any) -> ImageDataset:
    tr_data, tr_t, classes = _read_cifar(name, root, True, False)
    te_data, te_t, _ = _read_cifar(name, root, False, False)
    expected = read_split_lines("cifar100", "fine_names.txt")
    check_classes_present(name, expected, classes, f"{root}/cifar-100-python/meta")
    return _array_dataset(name, np.concatenate([tr_data, te_data]), tr_t + te_t, classes, transform)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-FS / FC100 releases


def _find_release_pickle(root: Path, prefix: str, subdirs: tuple[str, ...], part: str) -> Path | None:
    """``<prefix>_<part>.pickle`` (any case) or RFS's ``<part>.pickle`` in root or a release subfolder."""
    for folder in (root, *(root / s for s in subdirs)):
        if not folder.is_dir():
            continue
        files = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
        for fname in (f"{prefix}_{part}.pickle".lower(), f"{part}.pickle"):
            if fname in files:
                return files[fname]
    return None


def _release_part(name: str, path: Path, part: str, names: list[str], transform: Any) -> ImageDataset:
    """One part of a MetaOptNet/RFS pickle release, labels mapped to ``names`` via CIFAR-100 fine indices."""
    obj = load_pickle(path)
    if not isinstance(obj, dict) or not {"data", "labels"} <= set(obj):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with keys data and labels (MetaOptNet/RFS format), got {keys}")
    data = np.asarray(obj["data"])
    labels = np.asarray(obj["labels"], dtype=np.int64).ravel()
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3) or len(data) != len(labels):
        raise ValueError(
            f"{path} holds data of shape {data.shape} ({data.dtype}) and {len(labels)} labels; expected "
            "uint8 [N, 32, 32, 3] and one label per image"
        )
    fine = read_split_lines("cifar100", "fine_names.txt")
    expected = {fine.index(c) for c in names}
    found = {int(g) for g in np.unique(labels)}
    if found != expected:
        raise ValueError(
            f"{path}: its labels should be the CIFAR-100 fine-label indices of the {len(names)} {name} {part} "
            f"classes, but it has {len(found)} distinct labels of which {len(found - expected)} are not in that "
            f"list (e.g. {sorted(found - expected)[:5]}) and {len(expected - found)} of the list are absent. "
            "Is it a file of another benchmark (CIFAR-FS and FC100 split CIFAR-100 differently) or another split?"
        )
    pos = {c: i for i, c in enumerate(names)}
    targets = [pos[fine[int(g)]] for g in labels]
    logger.info("%s: read %d %s images of %d classes from %s", name, len(targets), part, len(found), path)
    return ImageDataset(range(len(targets)), targets, names, ArrayLoader(data), transform, name)


def _r2d2_root(root: Path, names: list[str]) -> Path | None:
    """The ``cifar100`` folder of R2D2's release (holding ``data/<fine name>/``), if root has one."""
    for cand in (root / "cifarfs" / "cifar100", root / "cifar100", root):
        if (cand / "data").is_dir() and any((cand / "data" / c).is_dir() for c in names):
            return cand
    return None


def _check_bertinetto_list(name: str, base: Path, part: str, names: list[str]) -> None:
    split_file = base / "splits" / "bertinetto" / f"{part}.txt"
    if name != "cifar_fs" or not split_file.is_file():
        return
    listed = {line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()}
    if listed != set(names):
        raise ValueError(
            f"{split_file} lists {len(listed)} classes that differ from the CIFAR-FS {part} split "
            f"({len(listed ^ set(names))} differ, e.g. {sorted(listed ^ set(names))[:3]}); the release is not R2D2's"
        )


def _fewshot_part(
    name: str, path: Path, part: str, names: list[str], transform: Any, release: tuple[str, tuple[str, ...]]
) -> tuple[ImageDataset, str]:
    """The images of one part (``train``/``val``/``test``) from the first layout found under ``path``."""
    prefix, subdirs = release
    found = _find_release_pickle(path, prefix, subdirs, part)
    if found is not None:
        return _release_part(name, found, part, names, transform), str(found)
    base = _r2d2_root(path, names)
    if base is not None:
        _check_bertinetto_list(name, base, part, names)
        return class_folders_dataset(name, base / "data", names, transform), str(base / "data")
    for folder in (path / part, path / "cifarfs" / "processed" / part):
        if folder.is_dir() and any((folder / c).is_dir() for c in names):
            return class_folders_dataset(name, folder, names, transform), str(folder)
    if _cifar100_folder(path) is not None:
        return _pooled_cifar(name, path, transform), f"{path}/cifar-100-python"
    layout = CIFAR_FS_LAYOUT if name == "cifar_fs" else FC100_LAYOUT
    tried = [
        f"{prefix}_{part}.pickle or {part}.pickle in root or in {', '.join(s + '/' for s in subdirs)}",
        "cifar100/data/<fine name>/ (R2D2 / learn2learn release)",
        f"{part}/<fine name>/ split folders",
        "cifar-100-python/{train,test,meta}",
    ]
    raise layout_not_found(name, path, tried, layout, part)


def _build_fewshot(
    name: str, release: tuple[str, tuple[str, ...]], root: Any, split: str, transform: Any, val_fraction: float, seed: int
) -> ImageDataset:
    layout = CIFAR_FS_LAYOUT if name == "cifar_fs" else FC100_LAYOUT
    path = require_root(name, root, layout)
    lists = {p: read_split_lines(name, f"{p}.txt") for p in ("train", "val", "test")}
    part = FEWSHOT_PART.get(split, "train")
    pooled, where = _fewshot_part(name, path, part, lists[part], transform, release)
    return fewshot_split(pooled, lists, split, val_fraction, seed, where)


@register_dataset("cifar_fs", "fewshot", CIFAR_FS_LAYOUT)
def build_cifar_fs(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """CIFAR-FS (Bertinetto et al., 2019): 64/16/20 CIFAR-100 classes, 600 images each.

    Class lists are the bundled ``splits/cifar_fs/{train,val,test}.txt`` (R2D2's lists); labels
    follow each list's order. The layout is detected (see ``dataset_info("cifar_fs").layout``).

    Expected layout (any one)::

        root/CIFAR_FS_{train,val,test}.pickle           (MetaOptNet; RFS: root/{train,val,test}.pickle)
        root/cifar100/data/<fine name>/*.png            (R2D2 / learn2learn)
        root/{train,val,test}/<fine name>/*.png
        root/cifar-100-python/{train,test,meta}         (train and test pooled)

    Raises:
        FileNotFoundError: If no layout is found (the message lists what root holds).
        UnsafePickleError: If a pickle asks to run code (nothing is executed).
        ValueError: If a file is damaged or its classes do not match the CIFAR-FS split.
    """
    return _build_fewshot(
        "cifar_fs", ("CIFAR_FS", ("CIFAR-FS", "CIFAR_FS", "cifar-fs", "cifar_fs")), root, split, transform,
        val_fraction, seed,
    )  # fmt: skip


@register_dataset("fc100", "fewshot", FC100_LAYOUT)
def build_fc100(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """FC100 (Oreshkin et al., 2018): 60/20/20 CIFAR-100 classes split by superclass (12/4/4).

    Class lists are the bundled ``splits/fc100/{train,val,test}.txt``.

    Expected layout (any one)::

        root/FC100_{train,val,test}.pickle              (MetaOptNet; RFS: root/{train,val,test}.pickle)
        root/cifar100/data/<fine name>/*.png
        root/{train,val,test}/<fine name>/*.png
        root/cifar-100-python/{train,test,meta}         (train and test pooled)

    Raises:
        FileNotFoundError: If no layout is found (the message lists what root holds).
        UnsafePickleError: If a pickle asks to run code (nothing is executed).
        ValueError: If a file is damaged or its classes do not match the FC100 split.
    """
    return _build_fewshot("fc100", ("FC100", ("FC100", "fc100")), root, split, transform, val_fraction, seed)
