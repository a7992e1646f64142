"""Fine-tuning sets read through torchvision's dataset classes (Flowers-102, Pets, Places365, ImageNet)
and iNaturalist 2017 from its official annotation files.

torchvision's readers parse the official split files; we take their file lists and labels and
load images ourselves so that a corrupt file is named in the error. Without ``download=True``
files are checked for existence, not MD5 (hashing gigabytes on every start is slow).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision.datasets import Flowers102, OxfordIIITPet, Places365

from .base import (
    ImageDataset,
    check_no_empty_class,
    classification_split,
    list_image_files,
    load_image,
    require_file,
    require_root,
)
from .registry import register_dataset

FLOWERS_LAYOUT = """
root/flowers-102/
  jpg/image_00001.jpg ... image_08189.jpg
  imagelabels.mat
  setid.mat
(torchvision's layout; download=True fetches it)
"""

PETS_LAYOUT = """
root/oxford-iiit-pet/
  images/<Breed_name>_<n>.jpg
  annotations/trainval.txt, annotations/test.txt
(torchvision's layout; download=True fetches it)
"""

PLACES_LAYOUT = """
root/
  categories_places365.txt
  places365_train_standard.txt
  places365_val.txt
  data_256_standard/ and val_256/      (small=True, the 256x256 images; auto-detected)
  or data_large_standard/ and val_large/
(torchvision's layout; download=True fetches it)
"""

INAT_LAYOUT = """
root/
  train2017.json, val2017.json          (the official annotation files)
  train_val_images/<supercategory>/<species>/<id>.jpg
"""

IMAGENET_LAYOUT = """
root/
  train/<wnid>/*.JPEG
  val/<wnid>/*.JPEG
  (optional) ILSVRC2012_devkit_t12.tar.gz or meta.bin: then torchvision.datasets.ImageNet reads the
  set and sorts a flat val/ folder into wnid folders
"""


def _from_lists(
    name: str, paths: list[Any], labels: list[int], classes: list[str], transform: Any, split: str
):
    return ImageDataset([Path(p) for p in paths], labels, classes, load_image, transform, name, split)


def _torchvision_error(name: str, err: Exception, layout: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r} could not be read ({err}). Set root=... (data.root) to a folder laid out as:\n{layout}"
        "Or pass download=True to let torchvision fetch it."
    )


class _Flowers102(Flowers102):
    def __init__(self, root: str, split: str, download: bool) -> None:
        self._verify_md5 = download
        super().__init__(root, split=split, download=download)

    def _check_integrity(self) -> bool:
        if self._verify_md5:
            return super()._check_integrity()
        return self._images_folder.is_dir() and all(
            (self._base_folder / self._file_dict[k][0]).is_file() for k in ("label", "setid")
        )


@register_dataset("flowers102", "classification", FLOWERS_LAYOUT)
def build_flowers102(
    root: Any,
    split: str,
    transform: Callable | None,
    *,
    seed: int,
    val_fraction: float,
    download: bool,
    official_val: bool = True,
) -> ImageDataset:
    """Oxford Flowers-102 (102 classes; official 1,020 train / 1,020 val / 6,149 test).

    With ``official_val=True`` (default) ``val`` is the official validation split and
    ``val_fraction``/``seed`` are unused; with ``official_val=False`` train and val are pooled
    and a seeded ``val_fraction`` is held out. ``test`` is the official test split.

    Expected layout::

        root/flowers-102/{jpg/, imagelabels.mat, setid.mat}
    """
    if not download:
        path = require_root("flowers102", root, FLOWERS_LAYOUT)
        for f in ("imagelabels.mat", "setid.mat", "jpg"):
            require_file("flowers102", path / "flowers-102" / f, FLOWERS_LAYOUT, "Or pass download=True.")
    classes = list(Flowers102.classes)

    def part(s: str) -> ImageDataset:
        try:
            ds = _Flowers102(str(root), s, download)
        except (RuntimeError, ValueError, OSError) as err:
            raise _torchvision_error("flowers102", err, FLOWERS_LAYOUT) from err
        return _from_lists("flowers102", ds._image_files, ds._labels, classes, transform, s)

    if split == "test":
        return part("test")
    if official_val:
        return part(split)
    tr, va = part("train"), part("val")
    pooled = ImageDataset(
        tr.samples + va.samples, tr.targets + va.targets, classes, load_image, transform, "flowers102"
    )
    return classification_split(pooled, None, split, val_fraction, seed)


@register_dataset("oxford_pets", "classification", PETS_LAYOUT)
def build_oxford_pets(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """Oxford-IIIT Pets (37 breeds; official 3,680 trainval / 3,669 test).

    ``train``/``val`` are a seeded hold-out of the official trainval list; ``test`` is the official test list.

    Expected layout::

        root/oxford-iiit-pet/{images/, annotations/trainval.txt, annotations/test.txt}
    """
    if not download:
        path = require_root("oxford_pets", root, PETS_LAYOUT)
        for f in ("images", "annotations/trainval.txt", "annotations/test.txt"):
            require_file("oxford_pets", path / "oxford-iiit-pet" / f, PETS_LAYOUT, "Or pass download=True.")
    try:
        ds = OxfordIIITPet(str(root), split="test" if split == "test" else "trainval", download=download)
    except (RuntimeError, ValueError, OSError) as err:
        raise _torchvision_error("oxford_pets", err, PETS_LAYOUT) from err
    data = _from_lists("oxford_pets", ds._images, ds._labels, list(ds.classes), transform, split)
    return classification_split(data, data, split, val_fraction, seed)


class _Places365(Places365):
    def __init__(self, root: str, split: str, small: bool, download: bool) -> None:
        self._download = download
        super().__init__(root, split=split, small=small, download=download)

    def _check_integrity(self, file: str, md5: str, download: bool) -> bool:
        if self._download:
            return super()._check_integrity(file, md5, download)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"places365: {file} not found. Set root=... (data.root) to a folder laid out as:\n{PLACES_LAYOUT}"
                "Or pass download=True."
            )
        return True


@register_dataset("places365", "classification", PLACES_LAYOUT)
def build_places365(
    root: Any,
    split: str,
    transform: Callable | None,
    *,
    seed: int,
    val_fraction: float,
    download: bool,
    small: bool | None = None,
) -> ImageDataset:
    """Places365-Standard (365 scene classes; 1.8 M train, 36,500 official val images).

    ``train``/``val`` are a seeded hold-out of the official train list; ``test`` is the official
    validation set (the official test set has no public labels). ``small`` picks the 256x256
    images (``data_256_standard``/``val_256``); by default it is detected from the folders present.

    Expected layout::

        root/{categories_places365.txt, places365_train_standard.txt, places365_val.txt,
              data_256_standard/ + val_256/  or  data_large_standard/ + val_large/}
    """
    path = require_root("places365", root, PLACES_LAYOUT) if not download else Path(root or ".")
    if small is None:
        small = (path / "data_256_standard").is_dir() or (path / "val_256").is_dir()
    ds = _Places365(str(path), "val" if split == "test" else "train-standard", small, download)
    images_dir = Path(ds.images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"places365: image folder {images_dir} not found. Expected layout:\n{PLACES_LAYOUT}"
        )
    data = _from_lists(
        "places365", [p for p, _ in ds.imgs], list(ds.targets), list(ds.classes), transform, split
    )
    return classification_split(data, data, split, val_fraction, seed)


def _read_inat_json(path: Path) -> tuple[dict[int, str], list[tuple[str, int]]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        cats = {int(c["id"]): str(c["name"]) for c in obj["categories"]}
        files = {int(im["id"]): str(im["file_name"]) for im in obj["images"]}
        pairs = [(files[int(a["image_id"])], int(a["category_id"])) for a in obj["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"inat2017: cannot parse {path} ({err!r}); expected COCO-style JSON with images, annotations, categories"
        ) from err
    return cats, pairs


@register_dataset("inat2017", "classification", INAT_LAYOUT)
def build_inat2017(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """iNaturalist 2017 (5,089 species; official 579,184 train / 95,986 val images).

    ``train``/``val`` are a seeded hold-out of ``train2017.json``; ``test`` is the official
    validation set ``val2017.json`` (the test set has no public labels). torchvision's
    ``INaturalist`` reader does not know the official 2017 split, so the annotation files are read
    here; ``download`` is not supported (fetch ``train_val2017.tgz`` and ``train_val2017.zip``).

    Expected layout::

        root/{train2017.json, val2017.json, train_val_images/<supercategory>/<species>/*.jpg}

    Raises:
        ValueError: If ``download=True``.
    """
    if download:
        raise ValueError(
            "inat2017 cannot be downloaded automatically (the official split files are separate); download "
            f"train_val2017.tgz and train_val2017.zip from the iNaturalist 2017 site and lay them out as:\n{INAT_LAYOUT}"
        )
    path = require_root("inat2017", root, INAT_LAYOUT)
    tr_cats, tr_pairs = _read_inat_json(require_file("inat2017", path / "train2017.json", INAT_LAYOUT))
    te_cats, te_pairs = _read_inat_json(require_file("inat2017", path / "val2017.json", INAT_LAYOUT))
    ids = sorted(set(tr_cats) | set(te_cats))
    names = {**te_cats, **tr_cats}
    classes = [names[i] for i in ids]
    pos = {cid: k for k, cid in enumerate(ids)}
    if split == "test":
        return _from_lists(
            "inat2017",
            [path / f for f, _ in te_pairs],
            [pos[c] for _, c in te_pairs],
            classes,
            transform,
            "test",
        )
    train = _from_lists(
        "inat2017",
        [path / f for f, _ in tr_pairs],
        [pos[c] for _, c in tr_pairs],
        classes,
        transform,
        "train",
    )
    return classification_split(train, None, split, val_fraction, seed)


def _wnid_folder(folder: Path, wnids: list[str] | None, transform: Any, split: str) -> ImageDataset:
    if not folder.is_dir():
        raise FileNotFoundError(f"imagenet: {folder} not found. Expected layout:\n{IMAGENET_LAYOUT}")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise FileNotFoundError(
            f"imagenet: no class folders in {folder} (a flat val/ folder needs the devkit to be sorted). "
            f"Expected layout:\n{IMAGENET_LAYOUT}"
        )
    classes = wnids or found
    missing = sorted(set(classes) - set(found))
    if missing:
        raise ValueError(f"imagenet: class folder(s) missing from {folder}: {', '.join(missing[:20])}")
    samples: list[Path] = []
    targets: list[int] = []
    for k, c in enumerate(classes):
        files = list_image_files(folder / c)
        samples.extend(files)
        targets.extend([k] * len(files))
    check_no_empty_class("imagenet", targets, classes, str(folder))
    return ImageDataset(samples, targets, classes, load_image, transform, "imagenet", split)


@register_dataset("imagenet", "classification", IMAGENET_LAYOUT)
def build_imagenet(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """ImageNet-1k (ILSVRC-2012; 1,000 classes, 1.28 M train / 50,000 val images).

    ``train``/``val`` are a seeded hold-out of the official train images; ``test`` is the official
    validation set. Class names are WordNet ids (``n01440764`` ...). When the devkit
    (``ILSVRC2012_devkit_t12.tar.gz`` or ``meta.bin``) is in root, ``torchvision.datasets.ImageNet``
    reads the set (and sorts a flat ``val/`` folder into class folders). ImageNet cannot be downloaded.

    Expected layout::

        root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG

    Raises:
        ValueError: If ``download=True``.
    """
    if download:
        raise ValueError("ImageNet cannot be downloaded automatically; get ILSVRC-2012 from image-net.org")
    path = require_root("imagenet", root, IMAGENET_LAYOUT)
    sub = "val" if split == "test" else "train"
    if (path / "meta.bin").is_file() or (path / "ILSVRC2012_devkit_t12.tar.gz").is_file():
        from torchvision.datasets import ImageNet

        try:
            ds = ImageNet(str(path), split=sub)
        except (RuntimeError, ValueError, OSError) as err:
            raise _torchvision_error("imagenet", err, IMAGENET_LAYOUT) from err
        data = _from_lists(
            "imagenet", [p for p, _ in ds.samples], list(ds.targets), list(ds.wnids), transform, split
        )
    else:
        wnids = None
        if sub == "val":
            train_dir = path / "train"
            wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else None
        data = _wnid_folder(path / sub, wnids, transform, split)
    return classification_split(data, data, split, val_fraction, seed)
