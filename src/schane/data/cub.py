"""CUB-200-2011 birds from its official list files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import ImageDataset, classification_split, load_image, require_file, require_root
from .registry import register_dataset

CUB_LAYOUT = """
root/CUB_200_2011/          (or root itself)
  images.txt                <image_id> <relative path>
  image_class_labels.txt    <image_id> <class_id 1..200>
  train_test_split.txt      <image_id> <1 = train, 0 = test>
  classes.txt               <class_id> <class name>
  images/<class name>/*.jpg
(the extracted CUB_200_2011.tgz)
"""


def _read_pairs(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}, line {n}: expected '<id> <value>', got {line!r}")
        out[int(parts[0])] = parts[1].strip()
    return out


@register_dataset("cub200", "classification", CUB_LAYOUT)
def build_cub200(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """CUB-200-2011 (200 bird species; 5,994 train / 5,794 test images, official split).

    ``train``/``val`` are a seeded hold-out of the official training images, ``test`` the
    official test images. Class names are those of ``classes.txt`` (e.g. ``001.Black_footed_Albatross``).

    Expected layout::

        root/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}
    """
    path = require_root("cub200", root, CUB_LAYOUT)
    base = path / "CUB_200_2011" if (path / "CUB_200_2011").is_dir() else path
    files = {
        f: require_file("cub200", base / f, CUB_LAYOUT)
        for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    }
    images = _read_pairs(files["images.txt"])
    labels = _read_pairs(files["image_class_labels.txt"])
    is_train = _read_pairs(files["train_test_split.txt"])
    class_map = _read_pairs(files["classes.txt"])
    class_ids = sorted(class_map)
    classes = [class_map[i] for i in class_ids]
    pos = {cid: k for k, cid in enumerate(class_ids)}
    parts: dict[bool, tuple[list[Path], list[int]]] = {True: ([], []), False: ([], [])}
    for img_id, rel in sorted(images.items()):
        if img_id not in labels or img_id not in is_train:
            raise ValueError(f"cub200: image id {img_id} ({rel}) lacks a label or a train/test flag")
        cid = int(labels[img_id])
        if cid not in pos:
            raise ValueError(f"cub200: image id {img_id} has class id {cid}, which classes.txt does not list")
        samples, targets = parts[is_train[img_id].strip() == "1"]
        samples.append(base / "images" / rel)
        targets.append(pos[cid])
    if not (base / "images").is_dir():
        raise FileNotFoundError(
            f"cub200: image folder {base / 'images'} not found. Expected layout:\n{CUB_LAYOUT}"
        )
    train = ImageDataset(*parts[True], classes, load_image, transform, "cub200", "train")
    test = ImageDataset(*parts[False], classes, load_image, transform, "cub200", "test")
    return classification_split(train, test, split, val_fraction, seed)
