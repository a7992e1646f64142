"""The users' own data: a folder per class, or a CSV of ``path,label``."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .base import (
    ImageDataset,
    check_classes_present,
    check_no_empty_class,
    classification_split,
    first_few,
    holdout_indices,
    list_image_files,
    load_image,
    require_file,
    require_root,
)
from .registry import register_dataset

FOLDER_LAYOUT = """
Either with an explicit test split:
  root/train/<class>/*.jpg
  root/test/<class>/*.jpg
or one folder per class (a seeded test_fraction of each class becomes the test split):
  root/<class>/*.jpg
Class names are the folder names (sorted) unless classes=[...] fixes them and their order.
"""

CSV_LAYOUT = """
root/train.csv     rows 'path,label' (optional header 'path,label'; extra columns are ignored); paths
root/test.csv      relative to the CSV's folder or absolute; label = class name or integer. test.csv is
                   optional: without it a seeded test_fraction of each class becomes the test split.
                   UTF-8 (a byte-order mark is fine); every image must exist and be listed once.
(or pass train_csv=... / test_csv=... to name the files; root then defaults to the CSV's folder)
"""


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
        raise FileNotFoundError(f"{name}: no class folders in {folder}. Expected layout:\n{FOLDER_LAYOUT}")
    names = _resolve_classes(name, found, classes, str(folder))
    samples: list[Path] = []
    targets: list[int] = []
    for k, c in enumerate(names):
        files = list_image_files(folder / c)
        samples.extend(files)
        targets.extend([k] * len(files))
    check_no_empty_class(name, targets, names, str(folder))
    return ImageDataset(samples, targets, names, load_image, transform, name)


@register_dataset("image_folder", "classification", FOLDER_LAYOUT)
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
) -> ImageDataset:
    """A folder per class, optionally under ``train/`` and ``test/``.

    Expected layout::

        root/train/<class>/*.jpg + root/test/<class>/*.jpg
        or root/<class>/*.jpg (test split = seeded ``test_fraction`` of each class, seed ``split_seed``)

    Raises:
        FileNotFoundError: If root has no class folders.
        ValueError: If a class has no images or ``classes`` does not match the folders.
    """
    path = require_root("image_folder", root, FOLDER_LAYOUT)
    if (path / "train").is_dir() and (path / "test").is_dir():
        train = _folder("image_folder", path / "train", classes, transform)
        test = _folder("image_folder", path / "test", train.classes, transform)
        test.split = "test"
    else:
        full = _folder("image_folder", path, classes, transform)
        train, test = _split_train_test(
            "image_folder", full.samples, full.targets, full.classes, transform, test_fraction, split_seed
        )
    return classification_split(train, test, split, val_fraction, seed)


def _read_csv(name: str, path: Path) -> list[tuple[Path, str]]:
    """Rows ``(path, label)`` of a CSV: a UTF-8 byte-order mark and extra columns are fine.

    Raises:
        ValueError: On a short row, an empty label, a path listed twice, or no rows (the first few
            offending lines are listed).
    """
    rows: list[tuple[Path, str]] = []
    short, empty, seen, dups = [], [], {}, []
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
            p = p if p.is_absolute() else path.parent / p
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


@register_dataset("csv", "classification", CSV_LAYOUT)
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
) -> ImageDataset:
    """Images listed in CSV files of ``path,label``.

    Labels are class names or integers; classes are sorted (numerically for integers) unless
    ``classes`` fixes them.

    Expected layout::

        root/train.csv (+ optional root/test.csv), rows 'path,label', paths relative to the CSV's folder

    Both CSVs are checked whichever split is asked for: a missing CSV or image, an empty label
    or a path listed twice (within a file or in both files) is an error at load time.

    Raises:
        FileNotFoundError: If a CSV or a listed image is missing (the first few are named).
        ValueError: On malformed rows, empty labels, repeated paths, an empty class or ``classes``
            not matching the labels.
    """
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
    tr_s, tr_t = [p for p, _ in tr_rows], [pos[lab] for _, lab in tr_rows]
    check_no_empty_class("csv", tr_t, names, str(tr_file))
    if te_file:
        train = ImageDataset(tr_s, tr_t, names, load_image, transform, "csv", "train")
        test = ImageDataset(
            [p for p, _ in te_rows],
            [pos[lab] for _, lab in te_rows],
            names,
            load_image,
            transform,
            "csv",
            "test",
        )
    else:
        train, test = _split_train_test("csv", tr_s, tr_t, names, transform, test_fraction, split_seed)
    return classification_split(train, test, split, val_fraction, seed)
