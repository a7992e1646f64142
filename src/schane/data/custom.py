"""The users' own data: a folder per class, or a CSV of ``path,label``.

Both are classification sets (``train``/``val``/``test``) unless the option ``class_splits`` or
``class_fractions`` is given: then all images of each class are pooled and the classes are split
into base, validation and novel classes, which makes a few-shot set (``train``/``val`` on the base
classes, ``val_classes``, ``test_classes``) that ``schane fewshot`` evaluates like the benchmarks.

Examples:
    >>> from schane.data import get_dataset
    >>> lists = {"train": ["cat", "dog", "fox", "owl"], "val": ["ant", "bee", "elk"], "test": ["emu", "gnu", "yak"]}
    >>> novel = get_dataset("image_folder", "photos", "test_classes", class_splits=lists)  # doctest: +SKIP
    >>> novel.classes, novel.class_lists["val"]  # doctest: +SKIP
    (['emu', 'gnu', 'yak'], ['ant', 'bee', 'elk'])
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    CLASSIFICATION_SPLITS,
    ImageDataset,
    check_classes_present,
    check_no_empty_class,
    check_split,
    classification_split,
    fewshot_split,
    first_few,
    holdout_indices,
    list_image_files,
    load_image,
    require_file,
    require_root,
)
from .registry import Kind, register_dataset

logger = logging.getLogger(__name__)

FOLDER_LAYOUT = """
Either split folders (train/ and any of val/, valid/, validation/ and test/):
  root/train/<class>/*.jpg
  root/val/<class>/*.jpg      (or valid/ or validation/; without it a seeded val_fraction of train)
  root/test/<class>/*.jpg     (without it a seeded test_fraction of train becomes the test split)
or one folder per class (a seeded test_fraction of each class becomes the test split):
  root/<class>/*.jpg
Class names are the folder names (sorted) unless classes=[...] fixes them and their order.
With split_lists=DIR the splits are the file lists DIR/{train,val,test}.csv instead (written by
'schane train --data' into the run directory).
"""

CSV_LAYOUT = """
root/train.csv     rows 'path,label' (optional header 'path,label'; extra columns are ignored); paths
root/test.csv      relative to the CSV's folder or absolute; label = class name or integer. test.csv is
                   optional: without it a seeded test_fraction of each class becomes the test split.
                   UTF-8 (a byte-order mark is fine); every image must exist and be listed once.
(or pass train_csv=... / test_csv=... to name the files; root then defaults to the CSV's folder)
With split_lists=DIR the splits are the file lists DIR/{train,val,test}.csv instead.
"""

SPLIT_LISTS_LAYOUT = """
DIR/train.csv, DIR/val.csv, DIR/test.csv   rows 'path,label': the image's path relative to the dataset root
                                            (or absolute) and its class name
DIR/classes.txt                             the class names, one per line, in label order
"""

VAL_DIRS = ("val", "valid", "validation")
"""Folder names read as the validation split next to ``train/`` (HF imagefolder's is ``validation``)."""

FEWSHOT_LAYOUT = """
Few-shot mode (option class_splits or class_fractions): all images of each class are pooled (train and
test together) and the classes are split into base, validation and novel classes:
  class_splits: {train: [...], val: [...], test: [...]}   base, validation and novel class names
  class_splits: DIR      DIR/train.txt, DIR/val.txt, DIR/test.txt: one class name per line (DIR absolute,
                         relative to the working directory, or relative to root)
  class_fractions: [base, val, novel]   fractions of the classes (each > 0, sum 1), drawn with split_seed
Splits: train/val (the base classes' images, seeded val_fraction hold-out), val_classes, test_classes.
"""

PARTS = ("train", "val", "test")
"""The class lists of a few-shot set: base (``train``), validation (``val``) and novel (``test``) classes."""
MIN_CLASSES = 2
"""Fewest classes a list may hold (an episode has at least 2 ways; training needs 2 classes)."""


def _resolve_classes(name: str, found: Sequence[str], classes: Sequence[str] | None, where: str) -> list[str]:
    if classes is None:
        return list(found)
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"{name}: the classes option has duplicates")
    check_classes_present(name, classes, found, where)
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{name}: {where} has class(es) not in the classes option: {', '.join(extra[:20])}")
    return classes


def _split_train_test(
    name: str,
    samples: list[Any],
    targets: list[int],
    classes: list[str],
    transform: Any,
    test_fraction: float,
    split_seed: int,
) -> tuple[ImageDataset, ImageDataset]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
    full = ImageDataset(samples, targets, classes, load_image, transform, name)
    tr, te = holdout_indices(targets, test_fraction, split_seed)
    return full.subset(tr, split="train"), full.subset(te, split="test")


def _folder(name: str, folder: Path, classes: Sequence[str] | None, transform: Any) -> ImageDataset:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"{name}: no class folders in {folder}; point --data (data.root) at a folder holding "
                                f"one folder of images per class. Expected layout:\n{FOLDER_LAYOUT}")
    names = _resolve_classes(name, found, classes, str(folder))
    samples: list[Path] = []
    targets: list[int] = []
    for k, c in enumerate(names):
        files = list_image_files(folder / c)
        samples.extend(files)
        targets.extend([k] * len(files))
    check_no_empty_class(name, targets, names, str(folder))
    return ImageDataset(samples, targets, names, load_image, transform, name)


def split_folders(path: Path) -> dict[str, Path]:
    """The split folders of an image-folder root: ``{"train": ..., "val": ..., "test": ...}`` (those present).

    ``root`` is in the split layout when it has a ``train/`` folder and every other folder in it is a split
    (``val/``, ``valid/``, ``validation/``, ``test/``); otherwise it is the flat ``<class>/`` layout and the
    result is empty.

    Raises:
        ValueError: When more than one validation folder is present.
    """
    dirs = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")} if path.is_dir() else set()
    if "train" not in dirs or not dirs <= {"train", "test", *VAL_DIRS}:
        return {}
    vals = [d for d in VAL_DIRS if d in dirs]
    if len(vals) > 1:
        raise ValueError(
            f"image_folder: keep one validation folder in {path}: it has {', '.join(v + '/' for v in vals)}"
        )
    out = {"train": path / "train"}
    if vals:
        out["val"] = path / vals[0]
    if "test" in dirs:
        out["test"] = path / "test"
    return out


def _pooled(name: str, parts: Sequence[ImageDataset]) -> ImageDataset:
    first = parts[0]
    return ImageDataset(
        [s for p in parts for s in p.samples], [t for p in parts for t in p.targets], first.classes, load_image,
        first.transform, name,
    )


@register_dataset(
    "image_folder",
    "classification",
    FOLDER_LAYOUT + FEWSHOT_LAYOUT,
    kind_for_options=lambda options: fewshot_kind("image_folder", options),
)
def build_image_folder(
    root: Any,
    split: str,
    transform: Callable | None,
    *,
    seed: int,
    val_fraction: float,
    download: bool,
    classes: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    class_splits: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
    class_fractions: Sequence[float] | None = None,
    split_lists: str | os.PathLike | None = None,
) -> ImageDataset:
    """A folder per class, optionally under ``train/`` with ``val/`` (``valid/``, ``validation/``) and ``test/``.

    Expected layout::

        root/train/<class>/*.jpg [+ root/val/<class>/*.jpg] [+ root/test/<class>/*.jpg]
        or root/<class>/*.jpg

    A missing validation split is a seeded ``val_fraction`` of each training class (seed ``seed``); a missing
    test split a seeded ``test_fraction`` of each class (seed ``split_seed``), taken before the validation
    hold-out. With ``split_lists`` the three splits are read from the lists in that folder (see
    :func:`read_split_lists`).

    With ``class_splits`` or ``class_fractions`` it is a few-shot set (see :func:`resolve_class_lists`):
    the images of every split folder are pooled, and the splits are ``train``/``val`` (base classes),
    ``val_classes`` and ``test_classes``; ``test_fraction`` is not used.

    Raises:
        FileNotFoundError: If root has no class folders, or the ``class_splits`` folder or a file of it
            is missing.
        ValueError: If a class has no images, ``classes`` does not match the folders, or the class lists
            are malformed (unknown or repeated names, overlapping or too short lists).
    """
    path = require_root("image_folder", root, FOLDER_LAYOUT)
    fewshot = fewshot_kind("image_folder", {"class_splits": class_splits, "class_fractions": class_fractions})
    if split_lists is not None:
        return _from_split_lists("image_folder", path, split_lists, split, transform, fewshot)
    folders = split_folders(path)
    if folders:
        train = _folder("image_folder", folders["train"], classes, transform)
        others = {k: _folder("image_folder", f, train.classes, transform) for k, f in folders.items() if k != "train"}
        full = _pooled("image_folder", [train, *others.values()])
        if fewshot == "classification":
            test = others.get("test")
            if test is None:
                train, test = _split_train_test(
                    "image_folder", train.samples, train.targets, train.classes, transform, test_fraction, split_seed
                )
            if "val" in others:
                return explicit_split({"train": train, "val": others["val"], "test": test}, split)
    else:
        full = _folder("image_folder", path, classes, transform)
        if fewshot == "classification":
            train, test = _split_train_test(
                "image_folder", full.samples, full.targets, full.classes, transform, test_fraction, split_seed
            )
    if fewshot == "fewshot":
        return own_fewshot_split(
            full,
            split,
            str(path),
            root=path,
            seed=seed,
            val_fraction=val_fraction,
            class_splits=class_splits,
            class_fractions=class_fractions,
            split_seed=split_seed,
        )
    return classification_split(train, test, split, val_fraction, seed)


def explicit_split(parts: Mapping[str, ImageDataset], split: str) -> ImageDataset:
    """The ``split`` of a set whose train, val and test parts are all given (no hold-out is drawn).

    Raises:
        ValueError: If ``split`` is unknown or a class has no training images.
    """
    train = parts["train"]
    check_split(train.name, split, CLASSIFICATION_SPLITS)
    check_no_empty_class(train.name, train.targets, train.classes, "the training split")
    out = parts[split]
    out.split = split
    return out


def read_split_lists(name: str, root: Path, folder: str | os.PathLike) -> dict[str, ImageDataset]:
    """The ``train``/``val``/``test`` splits written as file lists (``SPLIT_LISTS_LAYOUT``).

    Args:
        name: Dataset name (for messages and the datasets' names).
        root: The dataset root that relative paths start from.
        folder: The folder holding ``train.csv``, ``val.csv``, ``test.csv`` and ``classes.txt``.

    Returns:
        The three splits (labels follow ``classes.txt``), without transform.

    Raises:
        FileNotFoundError: If a list or a listed image is missing.
        ValueError: On malformed rows, a class not in ``classes.txt``, or an image in two splits.
    """
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(
            f"{name}: the split lists folder {d} does not exist; it is written by 'schane train --data' into the "
            f"run directory (splits/). Expected:\n{SPLIT_LISTS_LAYOUT}"
        )
    classes_file = require_file(name, d / "classes.txt", SPLIT_LISTS_LAYOUT)
    classes = [c.strip() for c in classes_file.read_text(encoding="utf-8").splitlines() if c.strip()]
    pos = {c: i for i, c in enumerate(classes)}
    out: dict[str, ImageDataset] = {}
    seen: dict[str, str] = {}
    for part in PARTS:
        f = require_file(name, d / f"{part}.csv", SPLIT_LISTS_LAYOUT)
        rows = _read_csv(name, f, base=root)
        unknown = sorted({lab for _, lab in rows} - set(pos))
        if unknown:
            raise ValueError(f"{name}: {f} has labels not in {classes_file}: {first_few(unknown)}")
        for p, _ in rows:
            key = os.path.abspath(p)
            if key in seen:
                raise ValueError(f"{name}: {p} is listed in both {seen[key]}.csv and {part}.csv of {d}")
            seen[key] = part
        _check_csv_files(name, f, rows)
        out[part] = ImageDataset([p for p, _ in rows], [pos[lab] for _, lab in rows], classes, load_image, None,
                                 name, part)
    return out


def write_split_lists(splits: Mapping[str, ImageDataset], root: Path, folder: Path) -> Path:
    """Write the ``train``/``val``/``test`` splits as file lists that :func:`read_split_lists` reads back.

    Paths under ``root`` are written relative to it (so the lists survive a moved dataset with
    ``data.root`` pointing at the new place), other paths absolute. Each file is written atomically.

    Returns:
        ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = os.path.abspath(root)

    def rel(p: Any) -> str:
        a = os.path.abspath(p)
        return os.path.relpath(a, base) if os.path.commonpath([a, base]) == base else a

    classes = splits["train"].classes
    files = {"classes.txt": "".join(f"{c}\n" for c in classes)}
    for part in PARTS:
        ds = splits[part]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows([rel(p), ds.classes[t]] for p, t in zip(ds.samples, ds.targets, strict=True))
        files[f"{part}.csv"] = buf.getvalue()
    for fname, text in files.items():
        tmp = folder / f".{fname}.{os.getpid()}.tmp"  # ranks of one job may write the same lists at once
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / fname)
    return folder


def _from_split_lists(
    name: str, root: Path, folder: str | os.PathLike, split: str, transform: Callable | None, kind: Kind
) -> ImageDataset:
    if kind == "fewshot":
        raise ValueError(f"{name}: split_lists and class_splits/class_fractions cannot be combined")
    parts = read_split_lists(name, root, folder)
    for ds in parts.values():
        ds.transform = transform
    return explicit_split(parts, split)


def _read_csv(name: str, path: Path, base: Path | None = None) -> list[tuple[Path, str]]:
    """Rows ``(path, label)`` of a CSV: a UTF-8 byte-order mark and extra columns are fine.

    Relative paths start from ``base`` (default: the CSV's folder).

    Raises:
        ValueError: On a short row, an empty label, a path listed twice, or no rows (the first few
            offending lines are listed).
    """
    rows: list[tuple[Path, str]] = []
    short: list[str] = []
    empty: list[str] = []
    seen: dict[str, int] = {}
    dups: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) < 2 or not row[0].strip():
                short.append(f"line {n}: {row!r}")
                continue
            p = Path(row[0].strip()).expanduser()
            p = p if p.is_absolute() else (path.parent if base is None else base) / p
            if not row[1].strip():
                empty.append(f"line {n} ({row[0].strip()})")
            key = os.path.abspath(p)
            if key in seen:
                dups.append(f"line {n} repeats line {seen[key]} ({row[0].strip()})")
            seen.setdefault(key, n)
            rows.append((p, row[1].strip()))
    if short:
        raise ValueError(f"{name}: {path}: {len(short)} row(s) are not 'path,label': {first_few(short)}")
    if empty:
        raise ValueError(f"{name}: {path}: {len(empty)} row(s) have an empty label: {first_few(empty)}")
    if dups:
        raise ValueError(
            f"{name}: {path}: {len(dups)} image path(s) are listed more than once: {first_few(dups)}. "
            "Remove the repeated rows (a repeated image can end up in both train and test)."
        )
    if not rows:
        raise ValueError(f"{name}: {path} has no rows; expected lines 'path,label'")
    return rows


def _check_csv_files(name: str, csv_file: Path, rows: list[tuple[Path, str]]) -> None:
    """Raise FileNotFoundError listing the first few images of ``csv_file`` that do not exist."""
    missing = [str(p) for p, _ in rows if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: {len(missing)} image(s) listed in {csv_file} do not exist: {first_few(missing)}. "
            "Paths are relative to the CSV's folder unless absolute; fix or remove those rows."
        )


def _sort_labels(labels: set[str]) -> list[str]:
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


@register_dataset(
    "csv",
    "classification",
    CSV_LAYOUT + FEWSHOT_LAYOUT,
    kind_for_options=lambda options: fewshot_kind("csv", options),
)
def build_csv(
    root: Any,
    split: str,
    transform: Callable | None,
    *,
    seed: int,
    val_fraction: float,
    download: bool,
    train_csv: str | None = None,
    test_csv: str | None = None,
    classes: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    class_splits: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
    class_fractions: Sequence[float] | None = None,
    split_lists: str | os.PathLike | None = None,
) -> ImageDataset:
    """Images listed in CSV files of ``path,label``.

    Labels are class names or integers; classes are sorted (numerically for integers) unless
    ``classes`` fixes them.

    Expected layout::

        root/train.csv (+ optional root/test.csv), rows 'path,label', paths relative to the CSV's folder

    Both CSVs are checked whichever split is asked for: a missing CSV or image, an empty label
    or a path listed twice (within a file or in both files) is an error at load time.

    With ``class_splits`` or ``class_fractions`` it is a few-shot set (see :func:`resolve_class_lists`):
    the rows of both CSVs are pooled, and the splits are ``train``/``val`` (base classes),
    ``val_classes`` and ``test_classes``; ``test_fraction`` is not used.

    With ``split_lists`` the three splits are read from the lists in that folder (see :func:`read_split_lists`;
    relative paths start from ``root``, by default the train CSV's folder).

    Raises:
        FileNotFoundError: If a CSV, a listed image, or the ``class_splits`` folder or a file of it is
            missing (the first few are named).
        ValueError: On malformed rows, empty labels, repeated paths, an empty class, ``classes``
            not matching the labels, or malformed class lists.
    """
    fewshot = fewshot_kind("csv", {"class_splits": class_splits, "class_fractions": class_fractions})
    if split_lists is not None:
        base = Path(root).expanduser() if root is not None else Path(train_csv or ".").expanduser().parent
        return _from_split_lists("csv", base, split_lists, split, transform, fewshot)
    if train_csv is None:
        path = require_root("csv", root, CSV_LAYOUT)
        tr_file = require_file("csv", path / "train.csv", CSV_LAYOUT, "Or pass train_csv=... .")
        te_file = path / "test.csv" if (path / "test.csv").is_file() else None
    else:
        tr_file = require_file("csv", Path(train_csv).expanduser(), CSV_LAYOUT)
        te_file = require_file("csv", Path(test_csv).expanduser(), CSV_LAYOUT) if test_csv else None
    tr_rows = _read_csv("csv", tr_file)
    te_rows = _read_csv("csv", te_file) if te_file else []
    both = {os.path.abspath(p) for p, _ in tr_rows} & {os.path.abspath(p) for p, _ in te_rows}
    if both:
        raise ValueError(
            f"csv: {len(both)} image(s) are listed in both {tr_file} and {te_file}: {first_few(sorted(both))}. "
            "An image must not be in train and test."
        )
    _check_csv_files("csv", tr_file, tr_rows)
    if te_file:
        _check_csv_files("csv", te_file, te_rows)
    found = _sort_labels({lab for _, lab in tr_rows + te_rows})
    names = _resolve_classes("csv", found, classes, str(tr_file))
    pos = {c: i for i, c in enumerate(names)}
    if fewshot == "fewshot":
        rows = tr_rows + te_rows
        pooled = ImageDataset(
            [p for p, _ in rows], [pos[lab] for _, lab in rows], names, load_image, transform, "csv"
        )
        check_no_empty_class(
            "csv", pooled.targets, names, f"{tr_file}" + (f" and {te_file}" if te_file else "")
        )
        return own_fewshot_split(
            pooled,
            split,
            str(tr_file),
            root=tr_file.parent if root is None else root,
            seed=seed,
            val_fraction=val_fraction,
            class_splits=class_splits,
            class_fractions=class_fractions,
            split_seed=split_seed,
        )
    return _csv_classification(tr_rows, te_rows, tr_file, pos, names, transform, split, seed=seed,
                               val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)


def _csv_classification(
    tr_rows: list[tuple[Path, str]], te_rows: list[tuple[Path, str]], tr_file: Path, pos: Mapping[str, int],
    names: list[str], transform: Callable | None, split: str, *, seed: int, val_fraction: float,
    test_fraction: float, split_seed: int,
) -> ImageDataset:
    tr_s, tr_t = [p for p, _ in tr_rows], [pos[lab] for _, lab in tr_rows]
    check_no_empty_class("csv", tr_t, names, str(tr_file))
    if te_rows:
        train = ImageDataset(tr_s, tr_t, names, load_image, transform, "csv", "train")
        test = ImageDataset([p for p, _ in te_rows], [pos[lab] for _, lab in te_rows], names, load_image,
                            transform, "csv", "test")
    else:
        train, test = _split_train_test("csv", tr_s, tr_t, names, transform, test_fraction, split_seed)
    return classification_split(train, test, split, val_fraction, seed)


# ---------------------------------------------------------------------------------------------------------
# Few-shot mode: base, validation and novel classes of the user's own data


def fewshot_kind(name: str, options: Mapping[str, Any]) -> Kind:
    """``"fewshot"`` when ``class_splits`` or ``class_fractions`` is set, else ``"classification"``.

    Checks the two options' form (reads no file): ``class_splits`` is a mapping with the keys ``train``,
    ``val`` and ``test`` (each a list of class names) or a folder path; ``class_fractions`` is three
    numbers > 0 that sum to 1; at most one of them is set.

    Args:
        name: Dataset name (for messages).
        options: The dataset options.

    Returns:
        The kind of dataset these options make.

    Raises:
        ValueError: On a malformed value, or both options set.
    """
    splits, fractions = options.get("class_splits"), options.get("class_fractions")
    if splits is not None and fractions is not None:
        raise ValueError(f"dataset {name!r}: give class_splits or class_fractions, not both")
    if splits is not None:
        _check_class_splits_form(name, splits)
        return "fewshot"
    if fractions is not None:
        _fraction_values(name, fractions)
        return "fewshot"
    return "classification"


def _check_class_splits_form(name: str, value: Any) -> None:
    if isinstance(value, (str, os.PathLike)):
        if not str(value).strip():
            raise ValueError(
                f"dataset {name!r}: class_splits is an empty path; give a folder or the three lists"
            )
        return
    if not isinstance(value, Mapping):
        raise ValueError(
            f"dataset {name!r}: class_splits must be {{train: [...], val: [...], test: [...]}} or a folder holding "
            f"train.txt, val.txt and test.txt; got {type(value).__name__}"
        )
    keys = sorted(str(k) for k in value)
    if keys != sorted(PARTS):
        raise ValueError(
            f"dataset {name!r}: class_splits needs exactly the keys train (base classes), val (validation classes) "
            f"and test (novel classes); got {keys}"
        )
    for part in PARTS:
        names = value[part]
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise ValueError(
                f"dataset {name!r}: class_splits.{part} must be a list of class names, got {names!r}"
            )


def _fraction_values(name: str, value: Any) -> list[float]:
    try:
        fractions = [float(f) for f in value] if not isinstance(value, (str, bytes)) else []
    except (TypeError, ValueError):
        fractions = []
    if len(fractions) != 3 or any(isinstance(f, bool) for f in value):
        raise ValueError(
            f"dataset {name!r}: class_fractions must be three numbers [base, val, novel], e.g. [0.6, 0.2, 0.2]; "
            f"got {value!r}"
        )
    if not all(math.isfinite(f) and f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"dataset {name!r}: class_fractions {fractions} must each be > 0 and sum to 1 (base + val + novel)"
        )
    return fractions


def read_class_lists(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The class lists in ``folder/{train,val,test}.txt`` (one name per line, blank lines skipped).

    The format of the bundled benchmark splits (``schane/data/splits/*/``) and of what
    :func:`write_class_lists` writes.

    Raises:
        FileNotFoundError: If the folder or one of the three files is missing.
    """
    folder = Path(folder)
    lists = {}
    for part in PARTS:
        file = folder / f"{part}.txt"
        if not file.is_file():
            raise FileNotFoundError(
                f"class_splits: {file} not found; the folder must hold train.txt (base classes), val.txt "
                "(validation classes) and test.txt (novel classes), one class name per line"
            )
        lines = file.read_text(encoding="utf-8-sig").splitlines()
        lists[part] = [line.strip() for line in lines if line.strip()]
    return lists


def write_class_lists(lists: Mapping[str, Sequence[str]], folder: str | os.PathLike) -> Path:
    """Write ``folder/{train,val,test}.txt``, which ``class_splits: folder`` reads back as the same lists.

    Args:
        lists: ``{"train": [...], "val": [...], "test": [...]}`` class names.
        folder: Where to write (created if needed).

    Returns:
        The folder.

    Raises:
        ValueError: If a list is missing, or a class name cannot be written as one line (a line break,
            or spaces at either end).
    """
    folder = Path(folder)
    bad = [c for part in PARTS for c in lists[part] if "\n" in c or "\r" in c or c != c.strip()]
    if bad:
        raise ValueError(
            f"class names that cannot be written one per line: {first_few([repr(c) for c in bad])}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        (folder / f"{part}.txt").write_text("".join(f"{c}\n" for c in lists[part]), encoding="utf-8")
    return folder


def _class_splits_folder(value: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    path = Path(value).expanduser()
    tried = [path]
    if path.is_dir():
        return path
    if not path.is_absolute() and root is not None:
        under_root = Path(root).expanduser() / path
        tried.append(under_root)
        if under_root.is_dir():
            return under_root
    raise FileNotFoundError(
        f"class_splits: no folder at {' or '.join(str(t) for t in tried)}; give a folder holding train.txt, "
        "val.txt and test.txt (absolute, relative to the working directory, or relative to root), or the lists "
        "themselves as {train: [...], val: [...], test: [...]}"
    )


def _lists_from_fractions(
    name: str, available: Sequence[str], fractions: Any, split_seed: int
) -> dict[str, list[str]]:
    base_f, val_f, novel_f = _fraction_values(name, fractions)
    n = len(available)
    n_val, n_novel = math.floor(val_f * n + 0.5), math.floor(novel_f * n + 0.5)
    counts = {"train": n - n_val - n_novel, "val": n_val, "test": n_novel}
    if min(counts.values()) < MIN_CLASSES:
        raise ValueError(
            f"dataset {name!r}: class_fractions [{base_f:g}, {val_f:g}, {novel_f:g}] of {n} classes gives "
            f"{counts['train']} base, {counts['val']} validation and {counts['test']} novel classes; each needs at "
            f"least {MIN_CLASSES}: change the fractions, add classes, or list them with class_splits"
        )
    order = np.random.default_rng(int(split_seed)).permutation(n)
    cuts = {
        "train": order[: counts["train"]],
        "val": order[counts["train"] : n - n_novel],
        "test": order[n - n_novel :],
    }
    return {part: [available[i] for i in sorted(int(i) for i in idx)] for part, idx in cuts.items()}


def _check_lists(name: str, lists: Mapping[str, Sequence[str]], available: Sequence[str], where: str) -> None:
    have = set(available)
    unknown = [c for part in PARTS for c in lists[part] if c not in have]
    if unknown:
        raise ValueError(
            f"dataset {name!r}: class_splits names {len(unknown)} class(es) that {where} does not have: "
            f"{first_few(unknown)}. Its classes are: {first_few(list(available), 10)}"
        )
    for part in PARTS:
        repeated = sorted({c for c in lists[part] if list(lists[part]).count(c) > 1})
        if repeated:
            raise ValueError(
                f"dataset {name!r}: class_splits.{part} lists {first_few(repeated)} more than once"
            )
        if len(lists[part]) < MIN_CLASSES:
            raise ValueError(
                f"dataset {name!r}: class_splits.{part} has {len(lists[part])} class(es); each list needs at least "
                f"{MIN_CLASSES} (episodes have at least 2 ways)"
            )
    where_in: dict[str, list[str]] = {}
    for part in PARTS:
        for c in lists[part]:
            where_in.setdefault(c, []).append(part)
    both = [f"{c} ({' and '.join(parts)})" for c, parts in where_in.items() if len(parts) > 1]
    if both:
        raise ValueError(
            f"dataset {name!r}: the class lists must be disjoint, but {len(both)} class(es) are in more than one: "
            f"{first_few(both)}"
        )


def resolve_class_lists(
    name: str,
    available: Sequence[str],
    *,
    class_splits: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
    class_fractions: Sequence[float] | None = None,
    split_seed: int = 0,
    root: str | os.PathLike | None = None,
    where: str = "the data",
) -> dict[str, list[str]]:
    """The base (``train``), validation (``val``) and novel (``test``) class lists of a few-shot set.

    Args:
        name: Dataset name (for messages).
        available: The data's class names.
        class_splits: ``{"train": [...], "val": [...], "test": [...]}``, or a folder holding ``train.txt``,
            ``val.txt`` and ``test.txt`` (absolute, relative to the working directory, or relative to ``root``).
        class_fractions: ``[base, val, novel]`` fractions of ``available`` (each > 0, sum 1): the classes are
            permuted with ``split_seed`` and cut in that order; each list keeps the order of ``available``.
        split_seed: Seed of the ``class_fractions`` permutation.
        root: The data's root (for a relative ``class_splits`` folder).
        where: Description of the data for messages.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``; classes in no list are unused (logged).

    Raises:
        ValueError: On unknown or repeated class names, overlapping lists, a list with fewer than 2
            classes, or malformed options.
        FileNotFoundError: If the ``class_splits`` folder or one of its files is missing.
    """
    if fewshot_kind(name, {"class_splits": class_splits, "class_fractions": class_fractions}) != "fewshot":
        raise ValueError(f"dataset {name!r}: give class_splits or class_fractions to make a few-shot set")
    if class_fractions is not None:
        return _lists_from_fractions(name, available, class_fractions, split_seed)
    if isinstance(class_splits, (str, os.PathLike)):
        lists = read_class_lists(_class_splits_folder(class_splits, root))
    else:
        assert class_splits is not None
        lists = {part: [str(c) for c in class_splits[part]] for part in PARTS}
    _check_lists(name, lists, available, where)
    unused = sorted(set(available) - {c for part in PARTS for c in lists[part]})
    if unused:
        logger.info(
            "%s: %d class(es) of %s are in no class list and are not used: %s",
            name,
            len(unused),
            where,
            first_few(unused),
        )
    return lists


def own_fewshot_split(
    pooled: ImageDataset,
    split: str,
    where: str,
    *,
    root: str | os.PathLike | None,
    seed: int,
    val_fraction: float,
    class_splits: Mapping[str, Sequence[str]] | str | os.PathLike | None,
    class_fractions: Sequence[float] | None,
    split_seed: int,
) -> ImageDataset:
    """One split of the few-shot set made from ``pooled`` (every image of every class).

    Returns:
        The split (labels ``0..C-1`` in the order of its class list), with ``class_lists``: the
        resolved ``{"train", "val", "test"}`` lists, for the caller to record (``schane fewshot`` writes
        them to ``RUN_DIR/class_splits/``).

    Raises:
        ValueError: See :func:`resolve_class_lists` and :func:`~schane.data.base.fewshot_split`.
        FileNotFoundError: If the ``class_splits`` folder or a file of it is missing.
    """
    lists = resolve_class_lists(
        pooled.name,
        pooled.classes,
        class_splits=class_splits,
        class_fractions=class_fractions,
        split_seed=split_seed,
        root=root,
        where=where,
    )
    ds = fewshot_split(pooled, lists, split, val_fraction, seed, where)
    ds.class_lists = lists  # type: ignore[attr-defined]
    return ds
