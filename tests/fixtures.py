"""Writers of tiny datasets in each real on-disk format (the layouts of ``schane.data``'s readers).

Each writer fills ``root`` with random images in the official layout of one dataset, with as many
classes and images per class as the caller asks for, and returns ``root`` (or the written object
where a test needs the raw data). Class names come from the bundled split files where the reader
checks them (CIFAR-100, miniImageNet, tieredImageNet). The writers of third-party releases name the
public loader their file names, keys, encodings and colour order were taken from.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from schane.data.base import read_split_lines

BLUE = (0, 0, 255)
"""A pure-blue RGB pixel; the colour tests plant it and expect it back."""


# ---------------------------------------------------------------------------------------------------------
# Pickles as Python 2 wrote them, and planted payloads


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's ``cPickle`` (protocol 2) did.

    ``str`` and ``bytes`` are written as Python-2 byte strings (``SHORT_BINSTRING``/``BINSTRING``),
    numpy's globals under their numpy-1 names (``numpy.core.multiarray``). Array data is such a byte
    string, so the file loads only with ``pickle.load(f, encoding="latin1")`` (the default ASCII
    decoding fails), exactly like the MetaOptNet/Gidaris/CIFAR/Ren releases.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
        self.memoize(obj)


def dump_py2(obj: Any, path: Path) -> Path:
    """Write ``obj`` to ``path`` as a Python-2 protocol-2 pickle (see :class:`Py2Pickler`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())
    return path


class Payload:
    """Pickles to code that creates ``marker``: a planted payload (a plain ``pickle.load`` runs it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


def dump_payload(obj: Any, path: Path) -> Path:
    """Pickle ``obj`` (holding :class:`Payload` objects somewhere inside) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


def solid_image(rgb: Sequence[int], size: int = 4) -> np.ndarray:
    """``uint8 [size, size, 3]`` filled with one RGB colour."""
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (size, size, 3)).copy()


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


def write_cifar100(
    root: Path, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0, python2: bool = False
) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: python pickles of all 100 classes (32x32 images).

    Keys as in the official archive (read by torchvision 0.29 ``datasets/cifar.py``): ``data`` uint8
    ``[N, 3072]`` (channel-major RGB), ``fine_labels``, ``coarse_labels``, ``filenames``,
    ``batch_label``; ``meta`` holds ``fine_label_names``/``coarse_label_names``. The official files
    are Python-2 pickles (``python2=True``); the default writes Python-3 pickles.
    """
    dump = dump_py2 if python2 else _dump_py3
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
            "filenames": [f"{fine[k]}_s_{i:06d}.png" for i, k in enumerate(labels)],
            "batch_label": f"{fname}ing batch 1 of 1",
        }
        dump(entry, folder / fname)
    dump({"fine_label_names": fine, "coarse_label_names": coarse}, folder / "meta")
    return root


def _dump_py3(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


# ---------------------------------------------------------------------------------------------------------
# miniImageNet, tieredImageNet


def write_mini_imagenet_cache(
    root: Path,
    part: str = "train",
    per_class: int = 2,
    size: int = 84,
    seed: int = 0,
    reverse_classes: bool = False,
    filename: str | None = None,
) -> dict[str, Any]:
    """``root/mini-imagenet-cache-{part}.pkl``: ``{image_data uint8 [N, size, size, 3], class_dict}``.

    The classes are the bundled Ravi split's ``part`` list (in reverse order in ``class_dict`` with
    ``reverse_classes``); class ``k`` of ``class_dict`` owns images ``k*per_class .. (k+1)*per_class-1``.
    learnables/learn2learn ``learn2learn/vision/datasets/mini_imagenet.py`` reads these files (keys
    ``image_data`` and ``class_dict``) and names the validation file
    ``mini-imagenet-cache-validation.pkl`` (pass it as ``filename``).

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
    with open(root / (filename or f"mini-imagenet-cache-{part}.pkl"), "wb") as f:
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
    root: Path, n_classes: int = 102, per_class: int = 3, size: int = 4, seed: int = 0, wrapper: bool = True
) -> Path:
    """``root/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}`` (torchvision's layout), or
    with ``wrapper=False`` the three official downloads extracted straight into ``root``.

    Images are numbered class by class (labels ``1..n_classes``); every third image id goes to
    ``trnid``, ``valid`` and ``tstid`` in turn, so with ``per_class=3`` each split has one image a class.
    Keys as torchvision 0.29 ``datasets/flowers102.py`` reads them (``labels``; ``trnid``/``valid``/``tstid``).
    """
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = root / "flowers-102" if wrapper else root
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
    wrapper: bool = True,
) -> Path:
    """``root/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}`` (torchvision's
    layout), or with ``wrapper=False`` ``images.tar.gz`` and ``annotations.tar.gz`` extracted into ``root``.

    The last ``test_per_class`` images of each breed are listed in ``test.txt``, the others in ``trainval.txt``
    (lines ``<image> <class id> <species> <breed id>`` as torchvision 0.29 ``datasets/oxford_iiit_pet.py`` reads them).
    """
    rng = np.random.default_rng(seed)
    base = root / "oxford-iiit-pet" if wrapper else root
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
    train_dir: str = "data_256_standard",
    val_dir: str = "val_256",
) -> Path:
    """Places365-Standard, small images: ``categories_places365.txt``, the train/val lists,
    ``<train_dir>/<cat>/NNNNNNNN.jpg`` and ``<val_dir>/Places365_val_NNNNNNNN.jpg``.

    ``categories`` look like ``"a/airfield"``. ``train_dir`` is ``data_256_standard`` as torchvision
    0.29 ``datasets/places365.py`` renames it after downloading, or ``data_256`` as
    ``train_256_places365standard.tar`` extracts by hand (``data_large`` / ``val_large`` for full size).
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
            png(root / train_dir / cat / f"{i + 1:08d}.jpg", rng, size)
            train_lines.append(f"/{cat}/{i + 1:08d}.jpg {c}")
        for _ in range(val_per_class):
            k += 1
            png(root / val_dir / f"Places365_val_{k:08d}.jpg", rng, size)
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


# ---------------------------------------------------------------------------------------------------------
# Third-party few-shot releases


def fine_index(name: str) -> int:
    """The CIFAR-100 fine-label index of a class name."""
    return read_split_lines("cifar100", "fine_names.txt").index(name)


def write_metaoptnet_cifar(
    root: Path, benchmark: str = "CIFAR_FS", per_class: int = 2, rfs_names: bool = False, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """MetaOptNet's CIFAR-FS / FC100 release: ``root/{benchmark}_{train,val,test}.pickle``.

    Source: kjunelee/MetaOptNet ``data/CIFAR_FS.py`` and ``data/FC100.py`` (file names; a dict with
    ``data`` uint8 ``[N, 32, 32, 3]`` in RGB, fed to ``Image.fromarray`` unchanged, and ``labels``, a
    list the loader concatenates with ``+``; read with latin-1 decoding after a plain ``pickle.load``
    fails: Python-2 pickles). Labels are the CIFAR-100 fine-label indices of the split's classes.
    RFS (WangYueFt/rfs ``dataset/cifar.py``, README "we have renamed the file") reads the same
    pickles as ``{train,val,test}.pickle`` with ``pickle.load(f, encoding='latin1')``
    (``rfs_names=True``). Image 0 of every file is pure blue.

    Returns:
        ``{part: the pickled dict}``.
    """
    rng = np.random.default_rng(seed)
    folder = benchmark.lower()
    written = {}
    for part in ("train", "val", "test"):
        fine = [fine_index(c) for c in read_split_lines(folder, f"{part}.txt")]
        labels = [k for k in rng.permutation(fine).tolist() for _ in range(per_class)]
        data = rng.integers(0, 255, (len(labels), 32, 32, 3), dtype=np.uint8)
        data[0] = solid_image(BLUE, 32)
        written[part] = {"data": data, "labels": labels}
        dump_py2(written[part], root / (f"{part}.pickle" if rfs_names else f"{benchmark}_{part}.pickle"))
    return written


def write_r2d2_cifar_fs(root: Path, per_class: int = 2, seed: int = 0) -> Path:
    """R2D2's CIFAR-FS image release as learn2learn unpacks it: ``root/cifarfs/cifar100/data/<fine name>/*.png``
    and ``root/cifarfs/cifar100/splits/bertinetto/{train,val,test}.txt``.

    Source: learnables/learn2learn ``learn2learn/vision/datasets/cifarfs.py`` (zip extracted into
    ``root/cifarfs``; ``cifar100/data/<class>`` folders copied by the class names of
    ``cifar100/splits/bertinetto/*.txt``). The split files are the bundled R2D2 lists. The first
    image of every class is pure blue.

    Returns:
        The folder passed as ``root``.
    """
    rng = np.random.default_rng(seed)
    base = root / "cifarfs" / "cifar100"
    for name in read_split_lines("cifar100", "fine_names.txt"):
        for i in range(per_class):
            img = solid_image(BLUE, 32) if i == 0 else rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            (base / "data" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(base / "data" / name / f"{name}_s_{i:06d}.png")
    (base / "splits" / "bertinetto").mkdir(parents=True, exist_ok=True)
    for part in ("train", "val", "test"):
        text = "\n".join(read_split_lines("cifar_fs", f"{part}.txt")) + "\n"
        (base / "splits" / "bertinetto" / f"{part}.txt").write_text(text)
    return root


def wnid_colour(index: int) -> tuple[int, int, int]:
    """An RGB colour that encodes a class index (0..65535) in red and green, blue fixed at 7."""
    return (index % 256, index // 256, 7)


def _tiered_images(wnids: Sequence[str], order: Sequence[int], per_class: int, size: int) -> np.ndarray:
    """RGB ``uint8 [C * per_class, size, size, 3]``: class ``order[k]``'s images, pixel (0, 0) encoding
    its index in ``wnids`` (:func:`wnid_colour`), pixel (1, 1) pure blue."""
    images = np.zeros((len(order) * per_class, size, size, 3), dtype=np.uint8)
    for k, c in enumerate(order):
        images[k * per_class : (k + 1) * per_class] = 128
        images[k * per_class : (k + 1) * per_class, 0, 0] = wnid_colour(c)
        images[k * per_class : (k + 1) * per_class, 1, 1] = BLUE
    return images


def tiered_readable_names() -> dict[str, str]:
    """Readable names for all 608 tieredImageNet wnids (made up), two of them shared by a train and a
    test class as ImageNet's "crane" (bird and machine) is."""
    wnids = [w for p in ("train", "val", "test") for w in read_split_lines("tiered_imagenet", f"{p}.txt")]
    names = {w: f"synset {w[1:]} words" for w in wnids}
    names[read_split_lines("tiered_imagenet", "train.txt")[3]] = "crane"
    names[read_split_lines("tiered_imagenet", "test.txt")[5]] = "crane"
    return names


def write_tiered_ren(
    root: Path, part: str, per_class: int = 2, size: int = 8, npz: bool = False, name_lists: bool = True, seed: int = 0
) -> list[str]:
    """Ren et al.'s tieredImageNet release: ``root/{part}_images_png.pkl`` (or, with ``npz=True``, the
    decompressed ``root/{part}_images.npz``) + ``root/{part}_labels.pkl`` + ``class_names.txt``/``synsets.txt``.

    Source: renmengye/few-shot-ssl-public ``fewshot/data/tiered_imagenet.py`` and
    ``fewshot/data/compress_tiered_imagenet.py`` (Python 2.7): images come from ``cv2.imread`` (BGR)
    and classes are numbered in ``os.listdir`` order of the ImageNet train folder (here a seeded
    permutation of the split's wnids); the labels pickle holds ``label_specific``,
    ``label_general``, ``label_specific_str`` (readable names from ``class_names.txt`` paired line
    by line with ``synsets.txt``) and ``label_general_str``; the PNG pickle is a list of
    ``cv2.imencode('.png', bgr)[1]`` arrays (``uint8 [L, 1]``, which decode to RGB), the npz holds
    key ``images`` ``uint8 [N, 84, 84, 3]`` in BGR. Pixel (0, 0) encodes the wnid, pixel (1, 1) is blue.

    Returns:
        The wnids in label order (class ``k`` of the files is ``result[k]``).
    """
    rng = np.random.default_rng(seed)
    wnids = read_split_lines("tiered_imagenet", f"{part}.txt")
    order = rng.permutation(len(wnids)).tolist()
    readable = tiered_readable_names()
    images = _tiered_images(wnids, order, per_class, size)
    labels = {
        "label_specific": np.repeat(np.arange(len(order), dtype=np.int32), per_class),
        "label_general": np.zeros(len(order) * per_class, dtype=np.int32),
        "label_specific_str": [readable[wnids[c]] for c in order],
        "label_general_str": ["a superclass"],
    }
    dump_py2(labels, root / f"{part}_labels.pkl")
    if npz:
        np.savez(root / f"{part}_images.npz", images=images[..., ::-1])
    else:
        encoded = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            encoded.append(np.frombuffer(buf.getvalue(), np.uint8).reshape(-1, 1))
        dump_py2(encoded, root / f"{part}_images_png.pkl")
    if name_lists:
        (root / "class_names.txt").write_text("".join(f"{n}\n" for n in readable.values()))
        (root / "synsets.txt").write_text("".join(f"{w}\n" for w in readable))
    return [wnids[c] for c in order]


def write_tiered_metaoptnet(root: Path, part: str, per_class: int = 2, size: int = 8, seed: int = 0) -> list[int]:
    """MetaOptNet's / RFS's tieredImageNet: ``root/{part}_images.npz`` + ``root/{part}_labels.pkl``.

    Source: kjunelee/MetaOptNet ``data/tiered_imagenet.py`` (``np.load(...)['images']``; labels
    pickle read for ``['labels']``, a list concatenated with ``+``, base and novel labels disjoint:
    numbered globally, val after the 351 train classes, test after the 448 train+val classes) and
    WangYueFt/rfs ``dataset/tiered_imagenet.py``; yinboc/few-shot-meta-baseline
    ``datasets/tiered_imagenet.py`` flips the images with ``[:, :, :, ::-1]`` (stored BGR).
    Pixel (1, 1) of every image is pure blue.

    Returns:
        The global labels in file order of the classes.
    """
    rng = np.random.default_rng(seed)
    offset = {"train": 0, "val": 351, "test": 448}[part]
    n = len(read_split_lines("tiered_imagenet", f"{part}.txt"))
    order = rng.permutation(n).tolist()
    images = _tiered_images(list(range(n)), order, per_class, size)
    labels = [offset + k for k in range(n) for _ in range(per_class)]
    np.savez(root / f"{part}_images.npz", images=images[..., ::-1])
    dump_py2({"labels": labels}, root / f"{part}_labels.pkl")
    return [offset + k for k in range(n)]


def write_mini_category_split(root: Path, part: str, per_class: int = 2, size: int = 8, seed: int = 0) -> dict:
    """Gidaris's / MetaOptNet's ``root/miniImageNet_category_split_{train_phase_train,val,test}.pickle``.

    Source: kjunelee/MetaOptNet ``data/mini_imagenet.py`` and yinboc/few-shot-meta-baseline
    ``datasets/mini_imagenet.py`` (``pickle.load(f, encoding='latin1')``; keys ``data`` uint8
    ``[N, 84, 84, 3]`` RGB, ``labels``, ``catname2label``; labels global: val after 64, test after 80).

    Returns:
        The pickled dictionary.
    """
    rng = np.random.default_rng(seed)
    wnids = read_split_lines("mini_imagenet", f"{part}.txt")
    offset = {"train": 0, "val": 64, "test": 80}[part]
    labels = [offset + k for k in range(len(wnids)) for _ in range(per_class)]
    obj = {
        "data": rng.integers(0, 255, (len(labels), size, size, 3), dtype=np.uint8),
        "labels": labels,
        "catname2label": {w: offset + k for k, w in enumerate(wnids)},
    }
    name = {"train": "train_phase_train", "val": "val", "test": "test"}[part]
    dump_py2(obj, root / f"miniImageNet_category_split_{name}.pickle")
    return obj


def write_easyfsl_mini(root: Path, part: str, per_class: int = 2, size: int = 4, seed: int = 0) -> Path:
    """easyfsl's miniImageNet: ``root/{part}.csv`` (header ``class_name,image_name``, rows like
    ``n01532829,n01532829_20457.JPEG``) with the images in ``root/<class_name>/<image_name>``.

    Source: sicara/easy-few-shot-learning ``easyfsl/datasets/mini_imagenet.py`` (``image_path =
    root / class_name / image_name``) and its ``data/mini_imagenet/{train,val,test}.csv``.
    """
    rng = np.random.default_rng(seed)
    with open(root / f"{part}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_name", "image_name"])
        for wn in read_split_lines("mini_imagenet", f"{part}.txt"):
            for i in range(per_class):
                name = f"{wn}_{20457 + 13 * i}.JPEG"
                png(root / wn / name, rng, size)
                w.writerow([wn, name])
    return root


# ---------------------------------------------------------------------------------------------------------
# ImageNet as extracted by hand / from Kaggle


def write_imagenet_flat_val(
    root: Path, wnids: Sequence[str], val_labels: Sequence[int], train_per_class: int = 2, size: int = 4
) -> Path:
    """``root/train/<wnid>/<wnid>_<i>.JPEG`` and a flat ``root/val/ILSVRC2012_val_<8 digits>.JPEG``
    (the official ``ILSVRC2012_img_val.tar`` extracted by hand). Val image ``n`` (1-based) shows
    class ``val_labels[n-1]``: pixel colour :func:`wnid_colour` of that index."""
    rng = np.random.default_rng(0)
    for wn in wnids:
        for i in range(train_per_class):
            png(root / "train" / wn / f"{wn}_{i}.JPEG", rng, size)
    (root / "val").mkdir(parents=True, exist_ok=True)
    for n, k in enumerate(val_labels, 1):
        # PNG bytes under the JPEG name: lossless, so the colour survives (PIL reads by content)
        Image.fromarray(solid_image(wnid_colour(k), size)).save(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", "PNG")
    return root


def imagenet_devkit_files(wnids: Sequence[str], val_labels: Sequence[int]) -> dict[str, bytes]:
    """``data/meta.mat`` and ``data/ILSVRC2012_validation_ground_truth.txt`` of ``ILSVRC2012_devkit_t12``.

    Source: torchvision 0.29 ``datasets/imagenet.py`` ``parse_devkit_archive`` (``meta.mat``'s
    ``synsets`` struct array with fields ILSVRC2012_ID, WNID, words, ..., num_children; leaves have
    ``num_children == 0``; the ground-truth file has one ILSVRC2012_ID per val image). IDs are given
    in reverse wnid order, and a non-leaf synset is included, as in the real file.
    """
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]  # fmt: skip
    synsets = np.zeros((len(wnids) + 1, 1), dtype=[(f, "O") for f in fields])
    ids = {wn: len(wnids) - k for k, wn in enumerate(wnids)}
    for k, wn in enumerate(wnids):
        synsets[k, 0] = (ids[wn], wn, f"words {k}", "gloss", 0, np.zeros((0,)), 0, 1300)
    synsets[len(wnids), 0] = (len(wnids) + 1, "n00001740", "entity", "gloss", 2, np.array([1.0, 2.0]), 18, 0)
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    truth = "".join(f"{ids[wnids[k]]}\n" for k in val_labels)
    return {"data/meta.mat": buf.getvalue(), "data/ILSVRC2012_validation_ground_truth.txt": truth.encode()}


def write_imagenet_devkit(root: Path, wnids: Sequence[str], val_labels: Sequence[int], as_tar: bool = True) -> Path:
    """``root/ILSVRC2012_devkit_t12.tar.gz`` (or the extracted ``root/ILSVRC2012_devkit_t12/``)."""
    files = imagenet_devkit_files(wnids, val_labels)
    if as_tar:
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
            for rel, data in files.items():
                info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/{rel}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    else:
        for rel, data in files.items():
            (root / "ILSVRC2012_devkit_t12" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "ILSVRC2012_devkit_t12" / rel).write_bytes(data)
    return root


def write_imagenet_kaggle(root: Path, wnids: Sequence[str], val_labels: Sequence[int], size: int = 4) -> Path:
    """Kaggle's ImageNet (imagenet-object-localization-challenge): ``root/ILSVRC/Data/CLS-LOC/{train/<wnid>/,
    val/ILSVRC2012_val_*.JPEG}`` + ``root/LOC_val_solution.csv`` (``ImageId,PredictionString`` with
    ``<wnid> x0 y0 x1 y1`` boxes, rows not in file order) + ``root/LOC_synset_mapping.txt``."""
    base = root / "ILSVRC" / "Data" / "CLS-LOC"
    write_imagenet_flat_val(base, wnids, val_labels, size=size)
    rows = [(f"ILSVRC2012_val_{n:08d}", f"{wnids[k]} 1 2 30 40 {wnids[k]} 5 6 7 8") for n, k in enumerate(val_labels, 1)]
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        w.writerows(rows[::-1])
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{wn} words {k}\n" for k, wn in enumerate(wnids)))
    return root
