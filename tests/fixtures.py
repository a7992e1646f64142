"""Writers of tiny datasets in each real on-disk format (the layouts of ``schane.data``'s readers).

Each writer fills ``root`` with random images in the official layout of one dataset, with as many
classes and images per class as the caller asks for, and returns ``root`` (or the written object
where a test needs the raw data). Class names come from the bundled split files where the reader
checks them (CIFAR-100, miniImageNet, tieredImageNet).
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from schane.data.base import read_split_lines


def png(path: Path, rng: np.random.Generator, size: int = 8) -> None:
    """Write a random RGB ``size`` x ``size`` image; the suffix of ``path`` picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def png_bytes(rng: np.random.Generator, size: int = 8) -> bytes:
    """A random RGB ``size`` x ``size`` image, PNG-encoded."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# CIFAR-100 (also CIFAR-FS and FC100)


def write_cifar100(root: Path, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: python pickles of all 100 classes (32x32 images)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    fine = read_split_lines("cifar100", "fine_names.txt")
    coarse = read_split_lines("cifar100", "coarse_names.txt")
    f2c = dict(line.split() for line in read_split_lines("cifar100", "fine_to_coarse.txt"))
    rng = np.random.default_rng(seed)
    for fname, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class).tolist()
        entry = {
            "data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8),
            "fine_labels": labels,
            "coarse_labels": [coarse.index(f2c[fine[k]]) for k in labels],
        }
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": coarse}, f)
    return root


# ---------------------------------------------------------------------------------------------------------
# miniImageNet, tieredImageNet


def write_mini_imagenet_cache(
    root: Path,
    part: str = "train",
    per_class: int = 2,
    size: int = 84,
    seed: int = 0,
    reverse_classes: bool = False,
) -> dict[str, Any]:
    """``root/mini-imagenet-cache-{part}.pkl``: ``{image_data uint8 [N, size, size, 3], class_dict}``.

    The classes are the bundled Ravi split's ``part`` list (in reverse order in ``class_dict`` with
    ``reverse_classes``); class ``k`` of ``class_dict`` owns images ``k*per_class .. (k+1)*per_class-1``.

    Returns:
        The pickled dictionary.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = read_split_lines("mini_imagenet", f"{part}.txt")
    if reverse_classes:
        wnids = wnids[::-1]
    data = rng.integers(0, 255, (len(wnids) * per_class, size, size, 3), dtype=np.uint8)
    class_dict = {w: list(range(per_class * i, per_class * (i + 1))) for i, w in enumerate(wnids)}
    obj = {"image_data": data, "class_dict": class_dict}
    with open(root / f"mini-imagenet-cache-{part}.pkl", "wb") as f:
        pickle.dump(obj, f)
    return obj


def tiered_labels(n_cls: int, per: int, names: Sequence[str] | None) -> dict[str, Any]:
    """The ``{part}_labels.pkl`` dictionary: ``per`` images of each class in order, one superclass."""
    lab: dict[str, Any] = {
        "label_specific": np.repeat(np.arange(n_cls), per),
        "label_general": np.zeros(n_cls * per, dtype=int),
    }
    if names is not None:
        lab["label_specific_str"] = list(names)
    return lab


def write_tiered_imagenet_png(
    root: Path, part: str = "train", per_class: int = 2, size: int = 8, seed: int = 0, with_names: bool = True
) -> Path:
    """``root/{part}_images_png.pkl`` (list of PNG bytes) + ``root/{part}_labels.pkl`` for Ren et al.'s split."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = read_split_lines("tiered_imagenet", f"{part}.txt")
    with open(root / f"{part}_images_png.pkl", "wb") as f:
        pickle.dump([np.frombuffer(png_bytes(rng, size), np.uint8) for _ in range(len(names) * per_class)], f)
    with open(root / f"{part}_labels.pkl", "wb") as f:
        pickle.dump(tiered_labels(len(names), per_class, names if with_names else None), f)
    return root


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning sets


def write_cub200(
    root: Path,
    classes: Sequence[str],
    per_class: int = 5,
    train_per_class: int = 3,
    size: int = 8,
    seed: int = 0,
) -> Path:
    """``root/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}``.

    The first ``train_per_class`` images of each class (``<name>_<i>.jpg``) are flagged as training images.
    """
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    lines_img, lines_lab, lines_split = [], [], []
    k = 0
    for c, name in enumerate(classes, 1):
        for i in range(per_class):
            k += 1
            rel = f"{name}/{name}_{i}.jpg"
            png(base / "images" / rel, rng, size)
            lines_img.append(f"{k} {rel}")
            lines_lab.append(f"{k} {c}")
            lines_split.append(f"{k} {1 if i < train_per_class else 0}")
    (base / "images.txt").write_text("\n".join(lines_img) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(lines_lab) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{i} {n}" for i, n in enumerate(classes, 1)) + "\n")
    return root


def write_caltech256(root: Path, counts: dict[str, int], size: int = 4, seed: int = 0) -> Path:
    """``root/256_ObjectCategories/<NNN.name>/<i>.jpg`` with ``counts[name]`` images per category."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        for i in range(n):
            png(root / "256_ObjectCategories" / name / f"{i:04d}.jpg", rng, size)
    return root


def write_flowers102(
    root: Path, n_classes: int = 102, per_class: int = 3, size: int = 4, seed: int = 0
) -> Path:
    """``root/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}``.

    Images are numbered class by class (labels ``1..n_classes``); every third image id goes to
    ``trnid``, ``valid`` and ``tstid`` in turn, so with ``per_class=3`` each split has one image a class.
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = root / "flowers-102"
    labels = np.repeat(np.arange(1, n_classes + 1), per_class)
    for i in range(len(labels)):
        png(base / "jpg" / f"image_{i + 1:05d}.jpg", rng, size)
    savemat(base / "imagelabels.mat", {"labels": labels})
    ids = np.arange(1, len(labels) + 1)
    savemat(base / "setid.mat", {"trnid": ids[0::3], "valid": ids[1::3], "tstid": ids[2::3]})
    return root


def write_oxford_pets(
    root: Path,
    breeds: Sequence[str],
    per_class: int = 5,
    test_per_class: int = 1,
    size: int = 4,
    seed: int = 0,
) -> Path:
    """``root/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}``.

    The last ``test_per_class`` images of each breed are listed in ``test.txt``, the others in ``trainval.txt``.
    """
    rng = np.random.default_rng(seed)
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for cid, breed in enumerate(breeds, 1):
        for i in range(1, per_class + 1):
            png(base / "images" / f"{breed}_{i}.jpg", rng, size)
            lines["test" if i > per_class - test_per_class else "trainval"].append(f"{breed}_{i} {cid} 1 1")
    for k, v in lines.items():
        (base / "annotations" / f"{k}.txt").write_text("\n".join(v) + "\n")
    return root


def write_places365(
    root: Path,
    categories: Sequence[str],
    train_per_class: int = 4,
    val_per_class: int = 1,
    size: int = 4,
    seed: int = 0,
) -> Path:
    """Places365-Standard, small images: ``categories_places365.txt``, the train/val lists,
    ``data_256_standard/<cat>/NNNNNNNN.jpg`` and ``val_256/Places365_val_NNNNNNNN.jpg``.

    ``categories`` look like ``"a/airfield"``.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories_places365.txt").write_text(
        "".join(f"/{cat} {c}\n" for c, cat in enumerate(categories))
    )
    train_lines, val_lines = [], []
    k = 0
    for c, cat in enumerate(categories):
        for i in range(train_per_class):
            png(root / "data_256_standard" / cat / f"{i + 1:08d}.jpg", rng, size)
            train_lines.append(f"/{cat}/{i + 1:08d}.jpg {c}")
        for _ in range(val_per_class):
            k += 1
            png(root / "val_256" / f"Places365_val_{k:08d}.jpg", rng, size)
            val_lines.append(f"Places365_val_{k:08d}.jpg {c}")
    (root / "places365_train_standard.txt").write_text("\n".join(train_lines) + "\n")
    (root / "places365_val.txt").write_text("\n".join(val_lines) + "\n")
    return root


def write_inat2017(
    root: Path,
    categories: Sequence[dict[str, Any]],
    train_per_class: int = 4,
    val_per_class: int = 1,
    size: int = 4,
    seed: int = 0,
) -> Path:
    """iNaturalist 2017: ``train2017.json``, ``val2017.json`` (COCO-style) and
    ``train_val_images/<supercategory>/<species>/<id>.jpg``.

    ``categories`` are the JSON's category records (``id``, ``name``, ``supercategory``).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in (("train2017", train_per_class), ("val2017", val_per_class)):
        images, anns = [], []
        for c in categories:
            for _ in range(n):
                k += 1
                rel = f"train_val_images/{c['supercategory']}/{c['name']}/{k}.jpg"
                png(root / rel, rng, size)
                images.append({"id": k, "file_name": rel})
                anns.append({"id": k, "image_id": k, "category_id": c["id"]})
        doc = {"images": images, "annotations": anns, "categories": list(categories)}
        (root / f"{split}.json").write_text(json.dumps(doc))
    return root


def write_imagenet(
    root: Path,
    wnids: Sequence[str],
    train_per_class: int = 4,
    val_per_class: int = 1,
    size: int = 4,
    seed: int = 0,
) -> Path:
    """ImageNet-1k folders: ``train/<wnid>/<wnid>_<i>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG``."""
    rng = np.random.default_rng(seed)
    k = 0
    for wn in wnids:
        for i in range(train_per_class):
            png(root / "train" / wn / f"{wn}_{i}.JPEG", rng, size)
        for _ in range(val_per_class):
            k += 1
            png(root / "val" / wn / f"ILSVRC2012_val_{k:08d}.JPEG", rng, size)
    return root
