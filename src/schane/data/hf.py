"""Hugging Face datasets on the local disk: ``save_to_disk`` directories and the Hub's parquet layout.

``data.name: hf`` reads the image column (the ``Image`` feature) and the label column (the
``ClassLabel``) of each stored split, memory-mapped, with random access, offline. Class names come
from the ``ClassLabel``. Images are decoded by :func:`schane.data.base.decode_image_bytes` (or
:func:`~schane.data.base.load_image` for rows that store a path), like every other reader; nothing is
unpickled. How the stored splits become ``train``/``val``/``test`` (or a few-shot set) is
:func:`schane.data.stored.pick_split`.

Examples:
    >>> from schane.data import get_dataset
    >>> test = get_dataset("hf", "my_set_saved_to_disk", "test")  # doctest: +SKIP
    >>> test.classes[:3]  # doctest: +SKIP
    ['cat', 'dog', 'fox']
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from schane.progress import interactive

from .base import ImageDataset, decode_image_bytes, first_few, layout_not_found, load_image
from .custom import FEWSHOT_LAYOUT, fewshot_kind
from .registry import register_dataset
from .stored import STORED_SPLITS, pick_split, split_key

logger = logging.getLogger(__name__)

EXTRA = "pip install 'schane[data]'"

HF_LAYOUT = """
One of (root = data.root):
  a save_to_disk directory       root/dataset_dict.json + root/{train,validation,test}/ (DatasetDict.save_to_disk)
                                 or root/state.json + root/dataset_info.json (one Dataset: the train split)
  the Hub's parquet layout       root/data/{split}-*.parquet, or root/{split}/*.parquet, or root/{split}-*.parquet
                                 (image bytes embedded, as Dataset.to_parquet and the Hub write them)
  a Hub dataset id (owner/name)  resolved through the local Hugging Face cache only (nothing is downloaded):
                                 download it first with `huggingface-cli download --repo-type dataset owner/name`
Splits: train, validation (or val), test. The image column is the Image feature and the label the ClassLabel
(options image_column / label_column choose others). Parquet files are converted once into the datasets cache
(option cache_dir, default: the Hugging Face datasets cache).
"""

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def require_datasets() -> Any:
    """The ``datasets`` module (its progress bars off unless stderr is a terminal).

    Raises:
        ImportError: If it is not installed (the message names the pip command).
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data.name=hf needs the Hugging Face datasets package: {EXTRA}") from None

    if not interactive():  # datasets' own bars only on a terminal, like schane's
        datasets.disable_progress_bars()
    return datasets


def _is_save_to_disk(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (
        (root / "state.json").is_file() and (root / "dataset_info.json").is_file()
    )


def _parquet_files(root: Path) -> dict[str, list[Path]]:
    """``{stored split: parquet files}`` of the Hub layouts under ``root`` (first layout that matches)."""
    for pattern in ("data/*.parquet", "*.parquet"):
        found: dict[str, list[Path]] = {}
        for f in sorted(root.glob(pattern)):
            name = f.name.split("-", 1)[0].split(".", 1)[0]
            if name in STORED_SPLITS:
                found.setdefault(name, []).append(f)
        if found:
            return found
    found = {}
    for name in STORED_SPLITS:
        files = sorted((root / name).glob("*.parquet"))
        if files:
            found[name] = files
    return found


def looks_like(root: Path) -> bool:
    """True when ``root`` is a folder in a layout ``data.name: hf`` reads (cheap: looks at names only).

    A ``save_to_disk`` directory (a DatasetDict or one Dataset), or the Hub's parquet layout
    (``data/{split}-*.parquet``, ``{split}/*.parquet`` or ``{split}-*.parquet``).
    """
    root = Path(root)
    return root.is_dir() and (_is_save_to_disk(root) or bool(_parquet_files(root)))


def _resolve_root(root: Any) -> Path:
    """The local folder of ``root``: a path, or a Hub id found in the local Hugging Face cache.

    Raises:
        FileNotFoundError: If ``root`` is neither a folder nor a cached Hub dataset.
    """
    if root is None:
        raise FileNotFoundError(f"dataset 'hf' needs a root: pass root=... (data.root). Expected layout:\n{HF_LAYOUT}")
    path = Path(str(root)).expanduser()
    if path.is_dir():
        return path
    text = str(root).removeprefix("hf://datasets/")
    if _HUB_ID.match(text) and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, repo_type="dataset", local_files_only=True))
        except ImportError:
            raise ImportError(f"reading a Hub id needs huggingface_hub: {EXTRA}") from None
        except Exception:  # noqa: BLE001  (LocalEntryNotFoundError and friends: not in the cache)
            raise FileNotFoundError(
                f"dataset 'hf': {text} is neither a folder nor in the local Hugging Face cache; download it first "
                f"(huggingface-cli download --repo-type dataset {text}) or set data.root to a local folder"
            ) from None
    raise FileNotFoundError(
        f"root {path} for dataset 'hf' is not a directory; set data.root to a folder laid out as:\n{HF_LAYOUT}"
    )


def _load_stored(root: Path, cache_dir: str | None) -> dict[str, Any]:
    """``{stored split name: datasets.Dataset}`` of ``root``."""
    datasets = require_datasets()
    if _is_save_to_disk(root):
        loaded = datasets.load_from_disk(str(root))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    files = _parquet_files(root)
    if not files:
        raise layout_not_found(
            "hf", root, ["save_to_disk (dataset_dict.json)", "data/{split}-*.parquet", "{split}/*.parquet"], HF_LAYOUT
        )
    loaded = datasets.load_dataset(
        "parquet", data_files={k: [str(f) for f in v] for k, v in files.items()}, cache_dir=cache_dir
    )
    return dict(loaded)


def _named_column(ds: Any, option: str | None, key: str, where: str) -> str | None:
    """The column the option ``key`` names (checked to exist), or ``None`` when the option is not set."""
    if option is not None and option not in ds.column_names:
        raise ValueError(f"dataset 'hf': {where} has no column {option!r} ({key}); columns: {ds.column_names}")
    return option


def _image_column(ds: Any, option: str | None, where: str) -> str:
    import datasets

    if (named := _named_column(ds, option, "image_column", where)) is not None:
        return named
    images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not images:
        raise ValueError(
            f"dataset 'hf': {where} has no Image column (features: {dict(ds.features)}); name the column of encoded "
            "images with data.options.image_column"
        )
    return images[0]


def _label_column(ds: Any, option: str | None, where: str) -> str:
    import datasets

    if (named := _named_column(ds, option, "label_column", where)) is not None:
        return named
    labels = [k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    if labels:
        return labels[0]
    for k in ("label", "labels", "fine_label", "cls"):
        if k in ds.column_names:
            return k
    raise ValueError(
        f"dataset 'hf': {where} has no ClassLabel column (features: {dict(ds.features)}); name the label column "
        "with data.options.label_column"
    )


class HFRows:
    """Loader ``(stored split, row) -> PIL RGB`` over the image columns of memory-mapped datasets.

    Picklable (a ``datasets.Dataset`` pickles as its memory-mapped files), so it works in loader workers.

    Args:
        tables: ``{stored split: dataset with only the image column, not decoded}``.
        where: The data's location (for messages).
    """

    def __init__(self, tables: Mapping[str, Any], where: str) -> None:
        self.tables = dict(tables)
        self.where = where

    def __call__(self, sample: tuple[str, int]) -> Any:
        part, row = sample
        table = self.tables[part]
        value = table[int(row)][table.column_names[0]]
        if isinstance(value, Mapping):
            data, path = value.get("bytes"), value.get("path")
        else:
            data, path = value, None
        if data is not None:
            return decode_image_bytes(bytes(data), f"row {row} of the {part} split of {self.where}")
        if path:
            return load_image(path)
        raise ValueError(f"dataset 'hf': row {row} of the {part} split of {self.where} has no image")


def _names_and_labels(parts: Mapping[str, Any], label_cols: Mapping[str, str], where: str) -> tuple[list[str], dict[str, list[int]]]:
    """Class names (from the ClassLabel, else the labels) and each split's labels in ``0..C-1``."""
    import datasets

    first = next(iter(parts))
    feat = parts[first].features[label_cols[first]]
    raw = {k: parts[k].data.column(label_cols[k]).to_pylist() for k in parts}
    if isinstance(feat, datasets.ClassLabel):
        names = list(feat.names)
        for k in parts:
            other = parts[k].features[label_cols[k]]
            if isinstance(other, datasets.ClassLabel) and list(other.names) != names:
                raise ValueError(f"dataset 'hf': the ClassLabel of the {k} split of {where} differs from the {first} split's")
        labels = raw
    else:
        values = {v for k in raw for v in raw[k] if v is not None}
        if all(isinstance(v, int) for v in values):
            names = [str(i) for i in range(max(values) + 1)] if values else []
            labels = raw
        else:
            names = sorted(str(v) for v in values)
            pos = {c: i for i, c in enumerate(names)}
            labels = {k: [pos[str(v)] if v is not None else -1 for v in raw[k]] for k in raw}
    for k, labs in labels.items():
        bad = [i for i, v in enumerate(labs) if v is None or not 0 <= int(v) < len(names)]
        if bad:
            raise ValueError(
                f"dataset 'hf': {len(bad)} row(s) of the {k} split of {where} have no label in 0..{len(names) - 1} "
                f"(rows {first_few(bad)}); an unlabelled split (label -1, as the Hub's ImageNet test) cannot be used"
            )
    return names, {k: [int(v) for v in labs] for k, labs in labels.items()}


@register_dataset(
    "hf", "classification", HF_LAYOUT + FEWSHOT_LAYOUT, kind_for_options=lambda options: fewshot_kind("hf", options)
)
def build_hf(
    root: Any,
    split: str,
    transform: Callable | None,
    *,
    seed: int,
    val_fraction: float,
    download: bool,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
    split_seed: int = 0,
    class_splits: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
    class_fractions: Sequence[float] | None = None,
) -> ImageDataset:
    """One split of a Hugging Face dataset stored on the local disk (see ``HF_LAYOUT``).

    Raises:
        FileNotFoundError: If the root is missing, holds no known layout, or a Hub id is not in the local cache.
        ImportError: If the ``datasets`` package is missing (the message names the pip command).
        ValueError: On a missing image or label column, unlabelled rows, a split that is not stored, or
            malformed few-shot options.
    """
    path = _resolve_root(root)
    where = str(path)
    stored = _load_stored(path, cache_dir)
    parts = {}
    for name, ds in stored.items():
        key = split_key(name)
        if key is None:
            logger.info("hf: split %r of %s is not used (splits: train, validation/val, test)", name, where)
        elif key in parts:
            raise ValueError(f"dataset 'hf': {where} stores both a 'validation' and a 'val' split; keep one")
        else:
            parts[key] = ds
    if not parts:
        raise layout_not_found("hf", path, [f"splits {', '.join(STORED_SPLITS)}"], HF_LAYOUT)
    image_cols = {k: _image_column(ds, image_column, f"the {k} split of {where}") for k, ds in parts.items()}
    label_cols = {k: _label_column(ds, label_column, f"the {k} split of {where}") for k, ds in parts.items()}
    names, labels = _names_and_labels(parts, label_cols, where)
    import datasets

    tables = {}
    for k, ds in parts.items():
        table = ds.select_columns([image_cols[k]])
        if isinstance(table.features[image_cols[k]], datasets.Image):
            table = table.cast_column(image_cols[k], datasets.Image(decode=False))
        tables[k] = table
    loader = HFRows(tables, where)
    built = {
        k: ImageDataset([(k, i) for i in range(len(labels[k]))], labels[k], names, loader, transform, "hf", k)
        for k in parts
    }
    return pick_split(
        "hf",
        built,
        split,
        where,
        seed=seed,
        val_fraction=val_fraction,
        class_splits=class_splits,
        class_fractions=class_fractions,
        split_seed=split_seed,
        root=path,
    )
