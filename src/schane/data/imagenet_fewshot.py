"""miniImageNet and tieredImageNet from their common pickle/npz releases or image folders.

Class lists (Ravi & Larochelle's miniImageNet split; Ren et al.'s tieredImageNet split) are
bundled under ``splits/``. Labels of a split follow the order of its class list.
"""

from __future__ import annotations

import csv
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    ImageDataset,
    array_to_image,
    check_classes_present,
    decode_image_bytes,
    fewshot_split,
    list_image_files,
    load_image,
    read_split_lines,
    require_root,
    split_path,
)
from .registry import register_dataset

MINI_LAYOUT = """
Any one of (detected in this order):
 1. pickle cache:  root/mini-imagenet-cache-{train,val,test}.pkl
      (dict: image_data uint8 [N, 84, 84, 3], class_dict {wnid: [indices]})
 2. category-split pickles:  root/miniImageNet_category_split_{train_phase_train,val,test}.pickle
      (dict: data uint8 [N, H, W, 3], labels [N], catname2label {wnid: label})
 3. image folder + CSV:  root/images/<wnid><8-digit index>.jpg  and  root/{train,val,test}.csv
      (rows filename,label; the bundled Ravi CSVs are used when root has none)
 4. split folders:  root/{train,val,test}/<wnid>/*.jpg
 5. ILSVRC-2012 train folder:  root/<wnid>/<wnid>_<id>.JPEG  (the CSV index i picks the i-th image
      of the class sorted by numeric id)
"""

TIERED_LAYOUT = """
Any one of (detected in this order):
 1. PNG pickles:  root/{train,val,test}_images_png.pkl  (list of PNG-encoded images)
      + root/{train,val,test}_labels.pkl  (dict: label_specific [N], optional label_specific_str [C])
 2. npz:  root/{train,val,test}_images.npz  (key images: uint8 [N, 84, 84, 3]) + the same labels pickles
 3. split folders:  root/{train,val,test}/<wnid>/*.jpg
 4. ILSVRC-2012 train folder:  root/<wnid>/*.JPEG  (all images of every class)
"""

_PART = {"train": "train", "val": "train", "val_classes": "val", "test_classes": "test"}
_WNID = re.compile(r"^n\d{8}$")


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as err:
        raise ValueError(
            f"cannot read pickle {path} ({err!r}); the file is corrupt or truncated: re-extract it"
        ) from err


def _folder_dataset(
    name: str, folder: Path, names: Sequence[str], transform: Any, layout: str
) -> ImageDataset:
    present = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    check_classes_present(name, names, present, str(folder))
    samples: list[Path] = []
    targets: list[int] = []
    for label, c in enumerate(names):
        files = list_image_files(folder / c)
        samples.extend(files)
        targets.extend([label] * len(files))
    return ImageDataset(samples, targets, names, load_image, transform, name)


def _array_pooled(
    name: str, data: Any, labels: Sequence[int], classes: list[str], transform: Any
) -> ImageDataset:
    return ImageDataset(
        range(len(labels)), labels, classes, lambda i: array_to_image(data[i]), transform, name
    )


# ---------------------------------------------------------------------------------------------------------
# miniImageNet


def _mini_csv_rows(root: Path, part: str) -> list[tuple[str, str]]:
    path = root / f"{part}.csv"
    source = path if path.is_file() else split_path("mini_imagenet", f"{part}.csv")
    with source.open("r", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["filename", "label"]:
        raise ValueError(f"{source}: expected a CSV with header 'filename,label'")
    return [(r[0], r[1]) for r in rows[1:] if r]


def _mini_pooled(root: Path, part: str, names: list[str], transform: Any) -> ImageDataset:
    name = "mini_imagenet"
    cache = root / f"mini-imagenet-cache-{part}.pkl"
    cat_file = {"train": "train_phase_train", "val": "val", "test": "test"}[part]
    cat = root / f"miniImageNet_category_split_{cat_file}.pickle"
    if cache.is_file():
        obj = _load_pickle(cache)
        if not isinstance(obj, dict) or "image_data" not in obj or "class_dict" not in obj:
            raise ValueError(f"{cache}: expected a dict with keys image_data and class_dict")
        data = obj["image_data"]
        classes = list(obj["class_dict"])
        labels = np.full(len(data), -1, dtype=np.int64)
        for k, c in enumerate(classes):
            labels[np.asarray(obj["class_dict"][c], dtype=np.int64)] = k
        keep = np.flatnonzero(labels >= 0)
        ds = _array_pooled(name, data, labels[keep].tolist(), classes, transform)
        ds.samples = keep.tolist()
        return ds
    if cat.is_file():
        obj = _load_pickle(cat)
        if not isinstance(obj, dict) or not {"data", "labels", "catname2label"} <= set(obj):
            raise ValueError(f"{cat}: expected a dict with keys data, labels and catname2label")
        label_to_name = {int(v): str(k) for k, v in obj["catname2label"].items()}
        uniq = sorted(set(int(x) for x in obj["labels"]))
        missing = [u for u in uniq if u not in label_to_name]
        if missing:
            raise ValueError(f"{cat}: labels {missing[:10]} have no entry in catname2label")
        classes = [label_to_name[u] for u in uniq]
        remap = {u: i for i, u in enumerate(uniq)}
        return _array_pooled(name, obj["data"], [remap[int(x)] for x in obj["labels"]], classes, transform)
    if (root / "images").is_dir():
        rows = _mini_csv_rows(root, part)
        pos = {c: i for i, c in enumerate(names)}
        check_classes_present(name, names, sorted({lab for _, lab in rows}), f"{part}.csv")
        samples, targets = [], []
        for fname, lab in rows:
            if lab not in pos:
                raise ValueError(
                    f"{part}.csv names class {lab!r}, which is not in the miniImageNet {part} split"
                )
            samples.append(root / "images" / fname)
            targets.append(pos[lab])
        missing_files = [s for s in samples if not s.is_file()]
        if missing_files:
            raise FileNotFoundError(
                f"{len(missing_files)} image(s) listed in {part}.csv are missing from {root / 'images'}, "
                f"e.g. {missing_files[0].name}. Expected layout:\n{MINI_LAYOUT}"
            )
        return ImageDataset(samples, targets, names, load_image, transform, name)
    if (root / part).is_dir():
        return _folder_dataset(name, root / part, names, transform, MINI_LAYOUT)
    if any((root / c).is_dir() for c in names):
        # ILSVRC train folder: the CSV's 1-based index picks the class's images sorted by numeric id.
        rows = _mini_csv_rows(root, part)
        check_classes_present(name, names, [p.name for p in root.iterdir() if p.is_dir()], str(root))
        per_class: dict[str, list[Path]] = {}
        samples, targets = [], []
        pos = {c: i for i, c in enumerate(names)}
        for fname, lab in rows:
            if lab not in per_class:
                files = list_image_files(root / lab)
                per_class[lab] = sorted(
                    files, key=lambda p: int(re.sub(r"\D", "", p.stem.split("_")[-1]) or 0)
                )
            idx = int(fname[len(lab) : len(lab) + 8])
            if idx > len(per_class[lab]):
                raise FileNotFoundError(
                    f"{part}.csv needs image #{idx} of class {lab} but {root / lab} has only {len(per_class[lab])}"
                )
            samples.append(per_class[lab][idx - 1])
            targets.append(pos[lab])
        return ImageDataset(samples, targets, names, load_image, transform, name)
    raise FileNotFoundError(
        f"dataset 'mini_imagenet': no known layout found under {root} for the {part} split. "
        f"Set root=... (data.root) to a folder laid out as:\n{MINI_LAYOUT}"
    )


@register_dataset("mini_imagenet", "fewshot", MINI_LAYOUT)
def build_mini_imagenet(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """miniImageNet (Ravi & Larochelle split): 64/16/20 ImageNet classes, 600 images each.

    Expected layout (any one, detected in this order)::

        root/mini-imagenet-cache-{train,val,test}.pkl
        root/miniImageNet_category_split_{train_phase_train,val,test}.pickle
        root/images/*.jpg + root/{train,val,test}.csv (bundled CSVs when absent)
        root/{train,val,test}/<wnid>/*.jpg
        root/<wnid>/<wnid>_<id>.JPEG   (ILSVRC-2012 train folder)
    """
    path = require_root("mini_imagenet", root, MINI_LAYOUT)
    lists = {p: read_split_lines("mini_imagenet", f"{p}.txt") for p in ("train", "val", "test")}
    part = _PART.get(split, "train")
    pooled = _mini_pooled(path, part, lists[part], transform)
    return fewshot_split(pooled, lists, split, val_fraction, seed, f"{path} ({part} part)")


# ---------------------------------------------------------------------------------------------------------
# tieredImageNet


def _tiered_pooled(root: Path, part: str, names: list[str], transform: Any) -> ImageDataset:
    name = "tiered_imagenet"
    png = root / f"{part}_images_png.pkl"
    npz = root / f"{part}_images.npz"
    labels_file = root / f"{part}_labels.pkl"
    if png.is_file() or npz.is_file():
        if not labels_file.is_file():
            raise FileNotFoundError(
                f"dataset 'tiered_imagenet': {labels_file} not found (it goes with {png if png.is_file() else npz}). "
                f"Expected layout:\n{TIERED_LAYOUT}"
            )
        lab = _load_pickle(labels_file)
        if not isinstance(lab, dict) or "label_specific" not in lab:
            raise ValueError(f"{labels_file}: expected a dict with key label_specific")
        specific = np.asarray(lab["label_specific"], dtype=np.int64)
        n_cls = int(specific.max()) + 1 if specific.size else 0
        if "label_specific_str" in lab:
            classes = [str(s) for s in lab["label_specific_str"]]
        elif n_cls == len(names):
            classes = list(names)
        else:
            raise ValueError(f"{labels_file} has {n_cls} classes but the {part} split lists {len(names)}")
        if len(classes) < n_cls:
            raise ValueError(
                f"{labels_file}: label_specific_str names {len(classes)} classes, labels use {n_cls}"
            )
        if png.is_file():
            images = _load_pickle(png)
            if len(images) != len(specific):
                raise ValueError(f"{png} holds {len(images)} images but {labels_file} {len(specific)} labels")

            def loader(i: int) -> Any:
                return decode_image_bytes(np.asarray(images[i]).tobytes(), f"image {i} of {png}")

            ds = ImageDataset(range(len(specific)), specific.tolist(), classes, loader, transform, name)
        else:
            try:
                data = np.load(npz)["images"]
            except (OSError, ValueError, KeyError) as err:
                raise ValueError(f"cannot read {npz} ({err!r}); expected an npz with key 'images'") from err
            if len(data) != len(specific):
                raise ValueError(f"{npz} holds {len(data)} images but {labels_file} {len(specific)} labels")
            ds = _array_pooled(name, data, specific.tolist(), classes, transform)
        if not all(_WNID.match(c) for c in classes):
            # Class names in the labels file are not wnids: trust the label order of the split list.
            if len(classes) != len(names):
                raise ValueError(
                    f"{labels_file} has {len(classes)} classes but the {part} split lists {len(names)}"
                )
            ds.classes = list(names)
        return ds
    if (root / part).is_dir():
        return _folder_dataset(name, root / part, names, transform, TIERED_LAYOUT)
    if any((root / c).is_dir() for c in names):
        return _folder_dataset(name, root, names, transform, TIERED_LAYOUT)
    raise FileNotFoundError(
        f"dataset 'tiered_imagenet': no known layout found under {root} for the {part} split. "
        f"Set root=... (data.root) to a folder laid out as:\n{TIERED_LAYOUT}"
    )


@register_dataset("tiered_imagenet", "fewshot", TIERED_LAYOUT)
def build_tiered_imagenet(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """tieredImageNet (Ren et al., 2018): 351/97/160 ImageNet classes under 20/6/8 superclasses.

    Expected layout (any one, detected in this order)::

        root/{train,val,test}_images_png.pkl + root/{train,val,test}_labels.pkl
        root/{train,val,test}_images.npz + root/{train,val,test}_labels.pkl
        root/{train,val,test}/<wnid>/*.jpg
        root/<wnid>/*.JPEG   (ILSVRC-2012 train folder; all images of each class)
    """
    path = require_root("tiered_imagenet", root, TIERED_LAYOUT)
    lists = {p: read_split_lines("tiered_imagenet", f"{p}.txt") for p in ("train", "val", "test")}
    part = _PART.get(split, "train")
    pooled = _tiered_pooled(path, part, lists[part], transform)
    return fewshot_split(pooled, lists, split, val_fraction, seed, f"{path} ({part} part)")
