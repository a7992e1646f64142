"""Fine-tuning sets with official split files: Flowers-102, Oxford-IIIT Pets, Places365, ImageNet, iNaturalist 2017.

The official list files are parsed here (the same files, keys and label conventions as
torchvision 0.29's ``Flowers102``, ``OxfordIIITPet``, ``Places365`` and ``ImageNet``), so that a
set extracted by hand is read without the wrapper folders or renamed folders torchvision creates
when it downloads, and a corrupt image is named in the error. ``download=True`` still lets
torchvision fetch (and MD5-check) Flowers-102, Pets and Places365; without it files are only
checked for existence (hashing gigabytes on every start is slow). ImageNet and iNaturalist cannot
be downloaded automatically.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import (
    ImageDataset,
    check_no_empty_class,
    classification_split,
    first_few,
    folder_listing,
    layout_not_found,
    list_image_files,
    load_image,
    require_file,
    require_root,
)
from .registry import register_dataset
from .safe_pickle import UnsafePickleError

FLOWERS_LAYOUT = """
root/  (or root/flowers-102/, torchvision's layout)
  jpg/image_00001.jpg ... image_08189.jpg     (102flowers.tgz extracted)
  imagelabels.mat
  setid.mat
(the three files of https://www.robots.ox.ac.uk/~vgg/data/flowers/102/; download=True fetches them)
"""

PETS_LAYOUT = """
root/  (or root/oxford-iiit-pet/, torchvision's layout)
  images/<Breed_name>_<n>.jpg                  (images.tar.gz extracted)
  annotations/trainval.txt, annotations/test.txt   (annotations.tar.gz extracted)
(from https://www.robots.ox.ac.uk/~vgg/data/pets/; download=True fetches them)
"""

PLACES_LAYOUT = """
root/
  categories_places365.txt, places365_train_standard.txt, places365_val.txt
                          (filelist_places365-standard.tar extracted)
  train images: data_256/ (train_256_places365standard.tar extracted by hand) or data_256_standard/
                (torchvision's name after download=True); or data_large/ / data_large_standard/
  val images:   val_256/ (val_256.tar) or val_large/ (val_large.tar)
(256x256 images are used when present, small=None; download=True fetches the set)
"""

INAT_LAYOUT = """
root/
  train2017.json, val2017.json                 (train_val2017.zip extracted)
  train_val_images/<supercategory>/<species>/<id>.jpg   (train_val_images.tar.gz extracted)
"""

IMAGENET_LAYOUT = """
Any one of:
 1. class folders:  root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG  (torchvision's ImageNet layout)
 2. flat val folder (ILSVRC2012_img_val.tar extracted by hand):  root/train/<wnid>/*.JPEG and
      root/val/ILSVRC2012_val_00000001.JPEG ..., labelled by one of: root/ILSVRC2012_devkit_t12.tar.gz,
      root/ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt},
      torchvision's root/meta.bin, or Kaggle's root/LOC_val_solution.csv
 3. Kaggle (imagenet-object-localization-challenge):  root/ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}
      + root/LOC_val_solution.csv  (root may also be the CLS-LOC folder itself)
ImageNet cannot be downloaded automatically: get ILSVRC-2012 from image-net.org or Kaggle.
"""


def _from_lists(
    name: str, paths: list[Any], labels: list[int], classes: list[str], transform: Any, split: str
) -> ImageDataset:
    return ImageDataset([Path(p) for p in paths], labels, classes, load_image, transform, name, split)


def _find_base(path: Path, wrapper: str, needed: tuple[str, ...]) -> Path | None:
    """``path/wrapper`` (torchvision's layout) or ``path`` itself, whichever holds all ``needed`` entries."""
    for cand in (path / wrapper, path):
        if all((cand / n).exists() for n in needed):
            return cand
    return None


# ---------------------------------------------------------------------------------------------------------
# Flowers-102


def _flowers_part(base: Path, split: str, transform: Any) -> ImageDataset:
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102

    try:
        set_ids = loadmat(base / "setid.mat", squeeze_me=True)
        labels = loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]
        ids = set_ids[{"train": "trnid", "val": "valid", "test": "tstid"}[split]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"flowers102: cannot read {base / 'setid.mat'} / {base / 'imagelabels.mat'} ({err!r}); "
            "download them again from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
        ) from err
    id_to_label = {i: int(lab) - 1 for i, lab in enumerate(labels.tolist(), 1)}
    paths = [base / "jpg" / f"image_{int(i):05d}.jpg" for i in ids.tolist()]
    return _from_lists(
        "flowers102", paths, [id_to_label[int(i)] for i in ids.tolist()], list(Flowers102.classes), transform, split
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

        root/{jpg/, imagelabels.mat, setid.mat}   (or root/flowers-102/{...}, torchvision's layout)

    Raises:
        FileNotFoundError: If the files are missing (the message lists what root holds).
        ValueError: If a .mat file cannot be read.
    """
    needed = ("jpg", "imagelabels.mat", "setid.mat")
    if download:
        from torchvision.datasets import Flowers102

        path = Path(root or ".").expanduser()
        if _find_base(path, "flowers-102", needed) is None:
            Flowers102(str(path), split="train", download=True)
        root = path
    path = require_root("flowers102", root, FLOWERS_LAYOUT)
    base = _find_base(path, "flowers-102", needed)
    if base is None:
        tried = ["jpg/ + imagelabels.mat + setid.mat in root", "the same under flowers-102/ (torchvision)"]
        raise layout_not_found("flowers102", path, tried, FLOWERS_LAYOUT)
    if split == "test":
        return _flowers_part(base, "test", transform)
    if official_val:
        return _flowers_part(base, split, transform)
    tr, va = _flowers_part(base, "train", transform), _flowers_part(base, "val", transform)
    pooled = ImageDataset(
        tr.samples + va.samples, tr.targets + va.targets, tr.classes, load_image, transform, "flowers102"
    )
    return classification_split(pooled, None, split, val_fraction, seed)


# ---------------------------------------------------------------------------------------------------------
# Oxford-IIIT Pets


def _read_pets_list(path: Path) -> list[tuple[str, int]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"oxford_pets: {path}, line {n}: expected '<image> <class id> ...', got {line!r}")
        rows.append((parts[0], int(parts[1]) - 1))
    return rows


@register_dataset("oxford_pets", "classification", PETS_LAYOUT)
def build_oxford_pets(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """Oxford-IIIT Pets (37 breeds; official 3,680 trainval / 3,669 test).

    ``train``/``val`` are a seeded hold-out of the official trainval list; ``test`` is the official
    test list. Class names follow torchvision (``american_bulldog`` -> ``American Bulldog``).

    Expected layout::

        root/{images/, annotations/trainval.txt, annotations/test.txt}   (or under root/oxford-iiit-pet/)

    Raises:
        FileNotFoundError: If the files are missing (the message lists what root holds).
        ValueError: If a list file is malformed.
    """
    needed = ("images", "annotations/trainval.txt", "annotations/test.txt")
    if download:
        from torchvision.datasets import OxfordIIITPet

        path = Path(root or ".").expanduser()
        if _find_base(path, "oxford-iiit-pet", needed) is None:
            OxfordIIITPet(str(path), download=True)
        root = path
    path = require_root("oxford_pets", root, PETS_LAYOUT)
    base = _find_base(path, "oxford-iiit-pet", needed)
    if base is None:
        tried = ["images/ + annotations/{trainval,test}.txt in root", "the same under oxford-iiit-pet/ (torchvision)"]
        raise layout_not_found("oxford_pets", path, tried, PETS_LAYOUT)
    rows = {s: _read_pets_list(base / "annotations" / f"{s}.txt") for s in ("trainval", "test")}
    breeds = {lab: img.rsplit("_", 1)[0] for s in rows.values() for img, lab in s}
    if sorted(breeds) != list(range(len(breeds))):
        raise ValueError(f"oxford_pets: class ids in {base / 'annotations'} are not 1..{len(breeds)}")
    classes = [" ".join(p.title() for p in breeds[k].split("_")) for k in range(len(breeds))]
    part = rows["test" if split == "test" else "trainval"]
    paths = [base / "images" / f"{img}.jpg" for img, _ in part]
    data = _from_lists("oxford_pets", paths, [lab for _, lab in part], classes, transform, split)
    return classification_split(data, data, split, val_fraction, seed)


# ---------------------------------------------------------------------------------------------------------
# Places365


def _read_places_list(path: Path, image_dir: Path) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"places365: {path}, line {n}: expected '<image> <class index>', got {line!r}")
        paths.append(image_dir / parts[0].lstrip("/"))
        labels.append(int(parts[1]))
    return paths, labels


def _places_image_dir(path: Path, split: str, small: bool | None) -> Path:
    sizes = ("256", "large") if small is None else (("256",) if small else ("large",))
    names = [f"val_{s}" for s in sizes] if split == "test" else [
        d for s in sizes for d in (f"data_{s}_standard", f"data_{s}")
    ]  # fmt: skip
    for d in names:
        if (path / d).is_dir():
            return path / d
    raise FileNotFoundError(
        f"places365: no {'validation' if split == 'test' else 'training'} image folder under {path}: looked for "
        f"{', '.join(n + '/' for n in names)}. Found: {folder_listing(path)}. Expected layout:\n{PLACES_LAYOUT}"
    )


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
    images (``True``), the large ones (``False``) or whichever is present, 256 first (``None``).

    Expected layout::

        root/{categories_places365.txt, places365_train_standard.txt, places365_val.txt,
              data_256/ or data_256_standard/ (or data_large[_standard]/), val_256/ (or val_large/)}

    Raises:
        FileNotFoundError: If a list file or the image folder is missing.
        ValueError: If a list file is malformed.
    """
    if download:
        from torchvision.datasets import Places365

        path = Path(root or ".").expanduser()
        Places365(str(path), "val" if split == "test" else "train-standard", small=small is not False, download=True)
        root = path
    path = require_root("places365", root, PLACES_LAYOUT)
    cats = require_file("places365", path / "categories_places365.txt", PLACES_LAYOUT)
    list_file = "places365_val.txt" if split == "test" else "places365_train_standard.txt"
    lists = require_file("places365", path / list_file, PLACES_LAYOUT)
    names: dict[int, str] = {}
    for line in cats.read_text(encoding="utf-8").splitlines():
        if line.strip():
            cls, idx = line.split()
            names[int(idx)] = cls
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"places365: class indices in {cats} are not 0..{len(names) - 1}")
    paths, labels = _read_places_list(lists, _places_image_dir(path, split, small))
    classes = [names[i] for i in range(len(names))]
    data = _from_lists("places365", paths, labels, classes, transform, split)
    return classification_split(data, data, split, val_fraction, seed)


# ---------------------------------------------------------------------------------------------------------
# iNaturalist 2017


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
    here; ``download`` is not supported (fetch ``train_val_images.tar.gz`` and ``train_val2017.zip``
    as the competition README, visipedia/inat_comp, lists them).

    Expected layout::

        root/{train2017.json, val2017.json, train_val_images/<supercategory>/<species>/*.jpg}

    Raises:
        ValueError: If ``download=True`` or an annotation file cannot be parsed.
        FileNotFoundError: If an annotation file is missing.
    """
    hint = (
        "Download train_val_images.tar.gz (186 GB, the images) and train_val2017.zip (the annotations) "
        "from the iNaturalist 2017 competition page (github.com/visipedia/inat_comp) and extract both in root."
    )
    if download:
        raise ValueError(f"inat2017 cannot be downloaded automatically. {hint} Layout:\n{INAT_LAYOUT}")
    path = require_root("inat2017", root, INAT_LAYOUT)
    tr_cats, tr_pairs = _read_inat_json(require_file("inat2017", path / "train2017.json", INAT_LAYOUT, hint))
    te_cats, te_pairs = _read_inat_json(require_file("inat2017", path / "val2017.json", INAT_LAYOUT, hint))
    ids = sorted(set(tr_cats) | set(te_cats))
    names = {**te_cats, **tr_cats}
    classes = [names[i] for i in ids]
    pos = {cid: k for k, cid in enumerate(ids)}
    pairs = te_pairs if split == "test" else tr_pairs
    data = _from_lists(
        "inat2017", [path / f for f, _ in pairs], [pos[c] for _, c in pairs], classes, transform,
        "test" if split == "test" else "train",
    )  # fmt: skip
    if split == "test":
        return data
    return classification_split(data, None, split, val_fraction, seed)


# ---------------------------------------------------------------------------------------------------------
# ImageNet

_VAL_FILE = re.compile(r"^ILSVRC2012_val_(\d+)\.JPEG$", re.IGNORECASE)


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _devkit_ground_truth(meta_mat: Any, gt_text: str) -> dict[int, str]:
    """``{val image number: wnid}`` from the devkit's ``meta.mat`` (file object) and ground-truth text."""
    from scipy.io import loadmat

    synsets = loadmat(meta_mat, squeeze_me=True)["synsets"]
    leaf = synsets["num_children"] == 0
    id_to_wnid = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"][leaf], synsets["WNID"][leaf], strict=True)}
    return {n: id_to_wnid[int(line)] for n, line in enumerate(gt_text.split(), 1)}


def _val_ground_truth(search: list[Path]) -> tuple[dict[int, str], Path] | None:
    """Labels of the flat val folder from the first ground-truth file found in ``search`` (or None)."""
    for d in search:
        kaggle = d / "LOC_val_solution.csv"
        if kaggle.is_file():
            with open(kaggle, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))
            return {int(r["ImageId"].rsplit("_", 1)[-1]): r["PredictionString"].split()[0] for r in rows}, kaggle
        tar = d / "ILSVRC2012_devkit_t12.tar.gz"
        if tar.is_file():
            with tarfile.open(tar) as t:
                members = {m.name.split("/", 1)[-1]: m for m in t.getmembers() if m.isfile()}
                meta = t.extractfile(members["data/meta.mat"]).read()  # type: ignore[union-attr]
                gt = t.extractfile(members["data/ILSVRC2012_validation_ground_truth.txt"]).read()  # type: ignore[union-attr]
            return _devkit_ground_truth(io.BytesIO(meta), gt.decode("ascii")), tar
        kit = d / "ILSVRC2012_devkit_t12" / "data"
        if (kit / "meta.mat").is_file():
            text = (kit / "ILSVRC2012_validation_ground_truth.txt").read_text(encoding="ascii")
            return _devkit_ground_truth(kit / "meta.mat", text), kit
        meta_bin = d / "meta.bin"
        if meta_bin.is_file():
            return {n: w for n, w in enumerate(_load_meta_bin(meta_bin), 1)}, meta_bin
    return None


def _load_meta_bin(path: Path) -> list[str]:
    """The val wnids of torchvision's ``meta.bin`` (a ``torch.save`` of ``(wnid_to_classes, val_wnids)``),
    read with ``torch.load(weights_only=True)``: no code from the file runs."""
    import torch

    try:
        obj = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafePickleError(
            f"refused to load {path}: it holds Python objects other than the strings, lists and dicts of "
            f"torchvision's meta.bin ({first}). Nothing from the file was executed. Delete it and put "
            "ILSVRC2012_devkit_t12.tar.gz from image-net.org next to train/ and val/ instead"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"imagenet: cannot read {path} ({err!r}); delete it and use the devkit archive") from err
    if not isinstance(obj, (tuple, list)) or len(obj) != 2 or not isinstance(obj[1], (list, tuple)):
        raise ValueError(f"imagenet: {path} is not torchvision's meta.bin (expected (wnid_to_classes, val_wnids))")
    return [str(w) for w in obj[1]]


def _flat_val(val_dir: Path, search: list[Path]) -> tuple[list[Path], list[str]]:
    files = sorted(p for p in val_dir.iterdir() if p.is_file() and _VAL_FILE.match(p.name))
    if not files:
        raise FileNotFoundError(
            f"imagenet: {val_dir} has neither class folders nor ILSVRC2012_val_*.JPEG images. "
            f"Found: {folder_listing(val_dir)}. Expected layout:\n{IMAGENET_LAYOUT}"
        )
    try:
        found = _val_ground_truth(search)
    except UnsafePickleError:
        raise
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError) as err:
        raise ValueError(f"imagenet: cannot read the validation ground truth ({err!r}); download it again") from err
    if found is None:
        raise FileNotFoundError(
            f"imagenet: {val_dir} holds {len(files)} validation images without class folders, and no ground truth "
            f"was found in {', '.join(map(str, search))}. Put one of ILSVRC2012_devkit_t12.tar.gz (image-net.org), "
            "its extracted folder ILSVRC2012_devkit_t12/, torchvision's meta.bin or Kaggle's LOC_val_solution.csv "
            f"next to the train/ and val/ folders. Expected layout:\n{IMAGENET_LAYOUT}"
        )
    gt, source = found
    unknown = [p.name for p in files if int(_VAL_FILE.match(p.name).group(1)) not in gt]  # type: ignore[union-attr]
    if unknown:
        raise ValueError(f"imagenet: {source} has no label for {first_few(unknown)}")
    return files, [gt[int(_VAL_FILE.match(p.name).group(1))] for p in files]  # type: ignore[union-attr]


def _imagenet_part(path: Path, sub: str, transform: Any, split: str) -> ImageDataset:
    data_dir = path / "ILSVRC" / "Data" / "CLS-LOC" if (path / "ILSVRC" / "Data" / "CLS-LOC").is_dir() else path
    folder = data_dir / sub
    if not folder.is_dir():
        tried = [f"{sub}/ in root", f"ILSVRC/Data/CLS-LOC/{sub}/ (Kaggle)"]
        raise layout_not_found("imagenet", path, tried, IMAGENET_LAYOUT)
    train_wnids = _subdirs(data_dir / "train") if (data_dir / "train").is_dir() else None
    found = _subdirs(folder)
    if found:
        samples: list[Path] = []
        labels: list[str] = []
        for c in found:
            files = list_image_files(folder / c)
            samples.extend(files)
            labels.extend([c] * len(files))
    else:
        search = list(dict.fromkeys([path, data_dir, *path.parents[:3]]))
        samples, labels = _flat_val(folder, search)
    classes = train_wnids if sub == "val" and train_wnids else sorted(set(labels) | set(found))
    extra = sorted(set(labels) - set(classes))
    if extra:
        raise ValueError(f"imagenet: {folder} has classes that {data_dir / 'train'} lacks: {first_few(extra)}")
    pos = {c: k for k, c in enumerate(classes)}
    targets = [pos[c] for c in labels]
    check_no_empty_class("imagenet", targets, classes, str(folder))
    return ImageDataset(samples, targets, classes, load_image, transform, "imagenet", split)


@register_dataset("imagenet", "classification", IMAGENET_LAYOUT)
def build_imagenet(
    root: Any, split: str, transform: Callable | None, *, seed: int, val_fraction: float, download: bool
) -> ImageDataset:
    """ImageNet-1k (ILSVRC-2012; 1,000 classes, 1.28 M train / 50,000 val images).

    ``train``/``val`` are a seeded hold-out of the official train images; ``test`` is the official
    validation set. Class names are WordNet ids (``n01440764`` ...), in sorted order. A flat
    ``val/`` folder (the official val tar extracted by hand, or Kaggle's) is labelled from the
    devkit, torchvision's ``meta.bin`` (read with ``torch.load(weights_only=True)``) or Kaggle's
    ``LOC_val_solution.csv``. ImageNet cannot be downloaded automatically.

    Expected layout::

        root/train/<wnid>/*.JPEG + root/val/<wnid>/*.JPEG (or a flat val/ with the ground truth),
        or Kaggle's root/ILSVRC/Data/CLS-LOC/{train,val}/ + root/LOC_val_solution.csv

    Raises:
        ValueError: If ``download=True``, or the data do not agree with the ground truth.
        FileNotFoundError: If a folder or the ground truth of a flat val folder is missing.
    """
    if download:
        raise ValueError("ImageNet cannot be downloaded automatically; get ILSVRC-2012 from image-net.org or Kaggle")
    path = require_root("imagenet", root, IMAGENET_LAYOUT)
    data = _imagenet_part(path, "val" if split == "test" else "train", transform, split)
    return classification_split(data, data, split, val_fraction, seed)
