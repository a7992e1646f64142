"""miniImageNet and tieredImageNet from their common pickle/npz releases or image folders.

Class lists (Ravi & Larochelle's miniImageNet split; Ren et al.'s tieredImageNet split) are
bundled under ``splits/``. Every pickle goes through the restricted unpickler of
:mod:`schane.data.safe_pickle`. The releases and the loaders their facts come from:

- ``mini-imagenet-cache-{train,val,test}.pkl`` (learn2learn, learnables/learn2learn
  ``learn2learn/vision/datasets/mini_imagenet.py``, names the validation file
  ``mini-imagenet-cache-validation.pkl``);
- ``miniImageNet_category_split_*.pickle`` (Gidaris's FewShotWithoutForgetting, MetaOptNet, RFS
  ``dataset/mini_imagenet.py``): Python-2 pickles, RGB;
- easyfsl's CSVs (sicara/easy-few-shot-learning ``easyfsl/datasets/mini_imagenet.py``): rows
  ``class_name,image_name`` naming ``root/<class_name>/<image_name>`` in the ILSVRC train folder;
- Ren's tieredImageNet (renmengye/few-shot-ssl-public ``fewshot/data/tiered_imagenet.py``):
  ``{split}_images_png.pkl`` (PNGs encoded by OpenCV from BGR arrays, so they decode to RGB) or
  the decompressed ``{split}_images.npz`` (OpenCV's BGR order), with ``{split}_labels.pkl``
  holding ``label_specific`` numbered in the order ``os.listdir`` gave the class folders and
  ``label_specific_str`` holding readable names; ``class_names.txt``/``synsets.txt`` map names
  to WordNet ids;
- MetaOptNet's and RFS's tieredImageNet (kjunelee/MetaOptNet ``data/tiered_imagenet.py``,
  WangYueFt/rfs ``dataset/tiered_imagenet.py``): the same BGR npz with ``{split}_labels.pkl``
  holding only ``labels``, numbered globally (val and test continue after the base classes).
  few-shot-meta-baseline (yinboc, ``datasets/tiered_imagenet.py``) flips these images to RGB.
"""

from __future__ import annotations

import csv
import logging
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import (
    FEWSHOT_PART,
    ArrayLoader,
    ImageDataset,
    check_classes_present,
    class_folders_dataset,
    decode_image_bytes,
    fewshot_split,
    first_few,
    layout_not_found,
    list_image_files,
    load_image,
    max_image_pixels,
    npz_member_header,
    read_split_lines,
    require_root,
    split_path,
)
from .registry import register_dataset
from .safe_pickle import load_pickle

logger = logging.getLogger(__name__)

MINI_LAYOUT = """
Any one of (detected in this order):
 1. pickle cache:  root/mini-imagenet-cache-{train,val,test}.pkl  (learn2learn: -validation.pkl for val)
      (dict: image_data uint8 [N, 84, 84, 3], class_dict {wnid: [indices]})
 2. category-split pickles:  root/miniImageNet_category_split_{train_phase_train,val,test}.pickle
      (dict: data uint8 [N, H, W, 3], labels [N], catname2label {wnid: label})
 3. easyfsl CSVs:  root/{train,val,test}.csv with rows class_name,image_name (n01532829_20457.JPEG)
      and the images in root/<class_name>/<image_name>  (root = the ILSVRC-2012 train folder)
 4. image folder + CSV:  root/images/<wnid><8-digit index>.jpg  and  root/{train,val,test}.csv
      (rows filename,label; the bundled Ravi CSVs are used when root has none)
 5. split folders:  root/{train,val,test}/<wnid>/*.jpg
 6. ILSVRC-2012 train folder:  root/<wnid>/<wnid>_<id>.JPEG  (the Ravi CSV index i picks the i-th image
      of the class sorted by numeric id)
"""

TIERED_LAYOUT = """
Any one of (detected in this order):
 1. Ren et al.'s PNG pickles:  root/{train,val,test}_images_png.pkl  (list of PNG-encoded images)
      + root/{train,val,test}_labels.pkl  (dict: label_specific [N], label_specific_str [C], ...)
      + optional root/class_names.txt and root/synsets.txt (map the names to WordNet ids)
 2. npz (Ren decompressed, MetaOptNet, RFS):  root/{train,val,test}_images.npz  (key images: uint8
      [N, 84, 84, 3] in OpenCV's BGR order, flipped to RGB on load) + root/{train,val,test}_labels.pkl
      (Ren's dict as above, or MetaOptNet/RFS's {labels: [N]} with global labels)
 3. split folders:  root/{train,val,test}/<wnid>/*.jpg
 4. ILSVRC-2012 train folder:  root/<wnid>/*.JPEG  (all images of every class)
"""

_WNID = re.compile(r"^n\d{8}$")


def _array_pooled(
    name: str, data: Any, labels: Sequence[int], classes: list[str], transform: Any, bgr: bool = False
) -> ImageDataset:
    return ImageDataset(range(len(labels)), labels, classes, ArrayLoader(data, bgr), transform, name)


def _require_dict(obj: Any, path: Path, keys: set[str], fmt: str) -> dict:
    if not isinstance(obj, dict) or not keys <= set(obj):
        got = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with keys {', '.join(sorted(keys))} ({fmt}), got {got}")
    return obj


# ---------------------------------------------------------------------------------------------------------
# miniImageNet


def _mini_cache(path: Path, transform: Any) -> ImageDataset:
    obj = _require_dict(load_pickle(path), path, {"image_data", "class_dict"}, "miniImageNet pickle cache")
    data = obj["image_data"]
    classes = [str(c) for c in obj["class_dict"]]
    labels = np.full(len(data), -1, dtype=np.int64)
    for k, c in enumerate(obj["class_dict"]):
        labels[np.asarray(obj["class_dict"][c], dtype=np.int64)] = k
    keep = np.flatnonzero(labels >= 0)
    ds = _array_pooled("mini_imagenet", data, labels[keep].tolist(), classes, transform)
    ds.samples = keep.tolist()
    return ds


def _mini_category_split(path: Path, transform: Any) -> ImageDataset:
    obj = _require_dict(load_pickle(path), path, {"data", "labels", "catname2label"}, "category-split pickle")
    label_to_name = {int(v): str(k) for k, v in obj["catname2label"].items()}
    uniq = sorted(set(int(x) for x in obj["labels"]))
    missing = [u for u in uniq if u not in label_to_name]
    if missing:
        raise ValueError(f"{path}: labels {missing[:10]} have no entry in catname2label")
    classes = [label_to_name[u] for u in uniq]
    remap = {u: i for i, u in enumerate(uniq)}
    return _array_pooled("mini_imagenet", obj["data"], [remap[int(x)] for x in obj["labels"]], classes, transform)


def _mini_csv(root: Path, part: str) -> tuple[str, list[tuple[str, str]]]:
    """``("ravi", [(filename, wnid)])`` or ``("easyfsl", [(wnid, image_name)])`` for ``root/{part}.csv``
    (the bundled Ravi CSV when root has none)."""
    path = root / f"{part}.csv"
    source = path if path.is_file() else split_path("mini_imagenet", f"{part}.csv")
    with source.open("r", encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f) if r and "".join(r).strip()]
    header = [c.strip() for c in rows[0][:2]] if rows else []
    if header == ["filename", "label"]:
        return "ravi", [(r[0].strip(), r[1].strip()) for r in rows[1:]]
    if header == ["class_name", "image_name"]:
        return "easyfsl", [(r[0].strip(), r[1].strip()) for r in rows[1:]]
    raise ValueError(
        f"{source}: expected a CSV with header 'filename,label' (Ravi's split) or 'class_name,image_name' "
        f"(easyfsl), got {header}"
    )


def _mini_from_rows(root: Path, part: str, names: list[str], transform: Any, kind: str, rows: list) -> ImageDataset:
    """The images a Ravi CSV (under ``root/images/``) or an easyfsl CSV (under ``root/<wnid>/``) lists."""
    pos = {c: i for i, c in enumerate(names)}
    labels = [lab for _, lab in rows] if kind == "ravi" else [c for c, _ in rows]
    check_classes_present("mini_imagenet", names, sorted(set(labels)), f"{part}.csv")
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ValueError(f"{part}.csv names classes outside the miniImageNet {part} split: {first_few(unknown)}")
    if kind == "ravi":
        samples = [root / "images" / fname for fname, _ in rows]
    else:
        samples = [root / wnid / image for wnid, image in rows]
    missing = [s for s in samples if not s.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {part}.csv are missing under {root}: "
            f"{first_few([str(m.relative_to(root)) for m in missing])}. Expected layout:\n{MINI_LAYOUT}"
        )
    return ImageDataset(samples, [pos[lab] for lab in labels], names, load_image, transform, "mini_imagenet")


def _mini_ilsvrc_index(root: Path, part: str, names: list[str], transform: Any, rows: list) -> ImageDataset:
    """ILSVRC train folder: the Ravi CSV's 1-based index picks the class's images sorted by numeric id."""
    check_classes_present("mini_imagenet", names, [p.name for p in root.iterdir() if p.is_dir()], str(root))
    per_class: dict[str, list[Path]] = {}
    samples, targets = [], []
    pos = {c: i for i, c in enumerate(names)}
    for fname, lab in rows:
        if lab not in per_class:
            files = list_image_files(root / lab)
            per_class[lab] = sorted(files, key=lambda p: int(re.sub(r"\D", "", p.stem.split("_")[-1]) or 0))
        idx = int(fname[len(lab) : len(lab) + 8])
        if idx > len(per_class[lab]):
            raise FileNotFoundError(
                f"{part}.csv needs image #{idx} of class {lab} but {root / lab} has only {len(per_class[lab])}"
            )
        samples.append(per_class[lab][idx - 1])
        targets.append(pos[lab])
    return ImageDataset(samples, targets, names, load_image, transform, "mini_imagenet")


def _mini_pooled(root: Path, part: str, names: list[str], transform: Any) -> ImageDataset:
    caches = [f"mini-imagenet-cache-{part}.pkl"] + (["mini-imagenet-cache-validation.pkl"] if part == "val" else [])
    for fname in caches:
        if (root / fname).is_file():
            return _mini_cache(root / fname, transform)
    cat_file = {"train": "train_phase_train", "val": "val", "test": "test"}[part]
    cat = root / f"miniImageNet_category_split_{cat_file}.pickle"
    if cat.is_file():
        return _mini_category_split(cat, transform)
    own_csv = (root / f"{part}.csv").is_file()
    if (own_csv and _mini_csv(root, part)[0] == "easyfsl") or (root / "images").is_dir():
        return _mini_from_rows(root, part, names, transform, *_mini_csv(root, part))
    if (root / part).is_dir():
        return class_folders_dataset("mini_imagenet", root / part, names, transform)
    if any((root / c).is_dir() for c in names):
        return _mini_ilsvrc_index(root, part, names, transform, _mini_csv(root, part)[1])
    tried = [
        " or ".join(caches),
        cat.name,
        f"{part}.csv with header class_name,image_name (easyfsl)",
        "images/ + Ravi CSVs",
        f"{part}/<wnid>/ split folders",
        "<wnid>/ class folders of the ILSVRC-2012 train set",
    ]
    raise layout_not_found("mini_imagenet", root, tried, MINI_LAYOUT, part)


@register_dataset("mini_imagenet", "fewshot", MINI_LAYOUT)
def build_mini_imagenet(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """miniImageNet (Ravi & Larochelle split): 64/16/20 ImageNet classes, 600 images each.

    Expected layout (any one, detected in this order)::

        root/mini-imagenet-cache-{train,val,test}.pkl   (learn2learn: -validation.pkl)
        root/miniImageNet_category_split_{train_phase_train,val,test}.pickle
        root/{train,val,test}.csv of class_name,image_name + root/<wnid>/<image_name>   (easyfsl)
        root/images/*.jpg + root/{train,val,test}.csv (bundled CSVs when absent)
        root/{train,val,test}/<wnid>/*.jpg
        root/<wnid>/<wnid>_<id>.JPEG   (ILSVRC-2012 train folder)

    Raises:
        FileNotFoundError: If no layout is found (the message lists what root holds) or images are missing.
        UnsafePickleError: If a pickle asks to run code (nothing is executed).
        ValueError: If a file is damaged or its classes do not match the split.
    """
    path = require_root("mini_imagenet", root, MINI_LAYOUT)
    lists = {p: read_split_lines("mini_imagenet", f"{p}.txt") for p in ("train", "val", "test")}
    part = FEWSHOT_PART.get(split, "train")
    pooled = _mini_pooled(path, part, lists[part], transform)
    return fewshot_split(pooled, lists, split, val_fraction, seed, f"{path} ({part} part)")


# ---------------------------------------------------------------------------------------------------------
# tieredImageNet


class PngListLoader:
    """Loader for a list of PNG-encoded images (numpy byte arrays, bytes or latin-1 strings)."""

    def __init__(self, images: Sequence[Any], source: Path) -> None:
        self.images = images
        self.source = source

    def __call__(self, index: int) -> Image.Image:
        item = self.images[index]
        data = item.encode("latin1") if isinstance(item, str) else np.asarray(item).tobytes()
        return decode_image_bytes(data, f"image {index} of {self.source}")


def _py2_text(s: Any) -> str:
    """A name from a Python-2 pickle read as latin-1: undo the latin-1 decoding of UTF-8 bytes."""
    s = str(s)
    try:
        return s.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


def _names_to_wnids(root: Path, readable: list[str], wnids: list[str], labels_file: Path) -> list[str] | None:
    """Map Ren's readable class names to WordNet ids with the release's ``class_names.txt``/``synsets.txt``.

    Only the ``wnids`` of the split are candidates; a name shared by several of them is settled by
    elimination. Returns None when the two files are absent.
    """
    names_file, syn_file = root / "class_names.txt", root / "synsets.txt"
    if not (names_file.is_file() and syn_file.is_file()):
        return None
    names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines()]
    syns = [line.strip() for line in syn_file.read_text(encoding="utf-8").splitlines()]
    if len(names) != len(syns):
        raise ValueError(f"{names_file} has {len(names)} lines but {syn_file} {len(syns)}; they must pair up")
    allowed = set(wnids)
    cands: list[set[str]] = []
    for r in readable:
        cands.append({w for n, w in zip(names, syns, strict=True) if n == r and w in allowed})
    settled: set[str] = set()
    changed = True
    while changed:
        changed = False
        for c in cands:
            if len(c) > 1 and c & settled:
                c -= settled
                changed = True
            if len(c) == 1 and not c <= settled:
                settled |= c
                changed = True
    bad = [r for r, c in zip(readable, cands, strict=True) if len(c) != 1]
    if bad:
        raise ValueError(
            f"{labels_file}: class name(s) {first_few(bad)} match no single WordNet id of the split in "
            f"{names_file} + {syn_file}; check that these files belong to this release"
        )
    return [next(iter(c)) for c in cands]


def _tiered_labels(root: Path, labels_file: Path, part: str, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Labels ``0..C-1`` per image and the class names of a ``{part}_labels.pkl`` (Ren's or MetaOptNet's)."""
    lab = load_pickle(labels_file)
    if not isinstance(lab, dict) or not ({"label_specific", "labels"} & set(lab)):
        raise ValueError(
            f"{labels_file}: expected a dict with key label_specific (Ren et al.'s release) or labels "
            "(MetaOptNet/RFS release)"
        )
    raw = np.asarray(lab["label_specific"] if "label_specific" in lab else lab["labels"], dtype=np.int64).ravel()
    uniq = np.unique(raw)
    if len(uniq) != len(names):
        raise ValueError(
            f"{labels_file} has {len(uniq)} classes but the tieredImageNet {part} split has {len(names)}; "
            "is it the labels file of another split?"
        )
    strs = lab.get("label_specific_str") if "label_specific" in lab else None
    if strs is None:
        # No names in the file (MetaOptNet/RFS keep only global integer labels): name classes by label.
        logger.warning(
            "%s holds no class names; tieredImageNet %s classes are named tiered_%s_<label> after their labels",
            labels_file, part, part,
        )  # fmt: skip
        remap = {int(g): i for i, g in enumerate(uniq)}
        return np.asarray([remap[int(g)] for g in raw]), [f"tiered_{part}_{int(g)}" for g in uniq]
    readable = [_py2_text(s) for s in strs]
    if uniq[0] < 0 or uniq[-1] >= len(readable) or len(readable) != len(names):
        raise ValueError(
            f"{labels_file}: label_specific_str names {len(readable)} classes but the labels span "
            f"{int(uniq[0])}..{int(uniq[-1])} and the {part} split has {len(names)}"
        )
    if all(_WNID.match(c) for c in readable):
        return raw, readable
    wnids = _names_to_wnids(root, readable, names, labels_file)
    if wnids is None:
        logger.warning(
            "%s names classes in words and %s has no class_names.txt + synsets.txt to map them to WordNet ids; "
            "the release's names are kept", labels_file, root,
        )  # fmt: skip
        return raw, readable
    return raw, wnids


def _tiered_arrays(root: Path, part: str, names: list[str], transform: Any) -> ImageDataset:
    png = root / f"{part}_images_png.pkl"
    npz = root / f"{part}_images.npz"
    labels_file = root / f"{part}_labels.pkl"
    if not labels_file.is_file():
        raise FileNotFoundError(
            f"dataset 'tiered_imagenet': {labels_file} not found (it goes with {png if png.is_file() else npz}). "
            f"Expected layout:\n{TIERED_LAYOUT}"
        )
    targets, classes = _tiered_labels(root, labels_file, part, names)
    if png.is_file():
        images = load_pickle(png)
        if not isinstance(images, (list, tuple)) or len(images) != len(targets):
            n = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
            raise ValueError(f"{png} holds {n} images but {labels_file} {len(targets)} labels")
        loader: Callable[[int], Image.Image] = PngListLoader(images, png)
    else:
        shape, dtype = npz_member_header(npz, "images")  # checked before anything is read
        if len(shape) != 4 or shape[-1] != 3 or shape[0] != len(targets) or dtype != np.uint8:
            raise ValueError(f"{npz} holds images of shape {shape} ({dtype}) but {labels_file} {len(targets)} "
                             "labels; expected uint8 [N, H, W, 3] with N = the number of labels")
        if shape[1] * shape[2] > min(max_image_pixels(), 1024 * 1024):
            raise ValueError(f"{npz}: images of {shape[1]}x{shape[2]} pixels are refused (at most 1024x1024 are read "
                             "from an npz); tieredImageNet's are 84x84")
        try:
            with np.load(npz) as z:
                data = z["images"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"cannot read {npz} ({err!r}); expected an npz with key 'images'") from err
        if data.ndim != 4 or data.shape[-1] != 3 or len(data) != len(targets):
            raise ValueError(f"{npz} holds images of shape {data.shape} but {labels_file} {len(targets)} labels")
        loader = ArrayLoader(data, bgr=True)  # written by OpenCV: blue, green, red
    return ImageDataset(range(len(targets)), targets.tolist(), classes, loader, transform, "tiered_imagenet")


def _tiered_pooled(root: Path, part: str, names: list[str], transform: Any) -> ImageDataset:
    if (root / f"{part}_images_png.pkl").is_file() or (root / f"{part}_images.npz").is_file():
        return _tiered_arrays(root, part, names, transform)
    if (root / part).is_dir():
        return class_folders_dataset("tiered_imagenet", root / part, names, transform)
    if any((root / c).is_dir() for c in names):
        return class_folders_dataset("tiered_imagenet", root, names, transform)
    tried = [
        f"{part}_images_png.pkl + {part}_labels.pkl (Ren et al.)",
        f"{part}_images.npz + {part}_labels.pkl (Ren decompressed, MetaOptNet, RFS)",
        f"{part}/<wnid>/ split folders",
        "<wnid>/ class folders of the ILSVRC-2012 train set",
    ]
    raise layout_not_found("tiered_imagenet", root, tried, TIERED_LAYOUT, part)


@register_dataset("tiered_imagenet", "fewshot", TIERED_LAYOUT)
def build_tiered_imagenet(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """tieredImageNet (Ren et al., 2018): 351/97/160 ImageNet classes under 20/6/8 superclasses.

    Class names are WordNet ids where the data allow it: folder names, ids in the labels file, or
    Ren's readable names mapped through the release's ``class_names.txt``/``synsets.txt``; labels
    then follow the bundled class list. Otherwise (no name lists, or MetaOptNet/RFS files that carry
    only integer labels) the release's own names or ``tiered_<part>_<label>`` are used, in label order.
    npz images are stored in OpenCV's BGR order and are returned as RGB.

    Expected layout (any one, detected in this order)::

        root/{train,val,test}_images_png.pkl + root/{train,val,test}_labels.pkl
        root/{train,val,test}_images.npz + root/{train,val,test}_labels.pkl
        root/{train,val,test}/<wnid>/*.jpg
        root/<wnid>/*.JPEG   (ILSVRC-2012 train folder; all images of each class)

    Raises:
        FileNotFoundError: If no layout is found (the message lists what root holds).
        UnsafePickleError: If a pickle asks to run code (nothing is executed).
        ValueError: If a file is damaged or its class count does not match the split.
    """
    path = require_root("tiered_imagenet", root, TIERED_LAYOUT)
    lists = {p: read_split_lines("tiered_imagenet", f"{p}.txt") for p in ("train", "val", "test")}
    part = FEWSHOT_PART.get(split, "train")
    pooled = _tiered_pooled(path, part, lists[part], transform)
    if not all(_WNID.match(c) for c in pooled.classes):
        lists = {p: (pooled.classes if p == part else []) for p in lists}
    return fewshot_split(pooled, lists, split, val_fraction, seed, f"{path} ({part} part)")
