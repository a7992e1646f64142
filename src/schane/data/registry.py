"""Dataset registry: a name plus a root directory gives a split with labels and class names.

Examples:
    >>> from schane.data import get_dataset, list_datasets
    >>> "glyphs" in list_datasets()
    True
    >>> ds = get_dataset("glyphs", split="val_classes", cache_dir="/tmp/glyphs")  # doctest: +SKIP
    >>> img, label = ds[0]  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch.utils.data import Dataset

from .base import CLASSIFICATION_SPLITS, FEWSHOT_SPLITS, check_split, check_val_fraction


@dataclass(frozen=True)
class DatasetInfo:
    """What a registered dataset is.

    Attributes:
        name: Registry name.
        kind: ``"fewshot"`` (class-disjoint ``val_classes``/``test_classes``) or ``"classification"``.
        splits: The split names ``get_dataset`` accepts.
        layout: The on-disk layout the reader expects under ``root``.
        options: Names of the dataset-specific keyword options.
    """

    name: str
    kind: Literal["fewshot", "classification"]
    splits: tuple[str, ...]
    layout: str
    options: tuple[str, ...] = ()


_REGISTRY: dict[str, tuple[DatasetInfo, Callable[..., Dataset]]] = {}


def register_dataset(
    name: str, kind: Literal["fewshot", "classification"], layout: str
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator registering a builder ``fn(root, split, transform, *, seed, val_fraction, download, **options)``.

    The builder's keyword-only parameters after ``download`` become the dataset's options.
    """
    if kind not in ("fewshot", "classification"):
        raise ValueError(f"kind must be 'fewshot' or 'classification', got {kind!r}")

    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        params = inspect.signature(fn).parameters
        common = {"root", "split", "transform", "seed", "val_fraction", "download"}
        options = tuple(
            p for p in params if p not in common and params[p].kind == inspect.Parameter.KEYWORD_ONLY
        )
        splits = FEWSHOT_SPLITS if kind == "fewshot" else CLASSIFICATION_SPLITS
        _REGISTRY[name] = (DatasetInfo(name, kind, splits, inspect.cleandoc(layout), options), fn)
        return fn

    return deco


def _lookup(name: str) -> tuple[DatasetInfo, Callable[..., Dataset]]:
    _load_builtin()
    key = name.replace("-", "_").lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _REGISTRY[key]


def list_datasets() -> list[str]:
    """Names of all registered datasets (sorted)."""
    _load_builtin()
    return sorted(_REGISTRY)


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered dataset.

    Raises:
        ValueError: If the name is not registered.
    """
    return _lookup(name)[0]


def get_dataset(
    name: str,
    root: str | None = None,
    split: str = "train",
    transform: Callable[[Any], Any] | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = False,
    **options: Any,
) -> Dataset:
    """Build one split of a registered dataset.

    Args:
        name: Registry name (``list_datasets()``); ``-`` and ``_`` are interchangeable.
        root: Directory holding the data in the layout of ``dataset_info(name).layout``.
        split: ``train``/``val``/``test`` for classification sets; ``train``/``val``/``val_classes``/
            ``test_classes`` for few-shot benchmarks.
        transform: Applied to each PIL RGB image.
        seed: Seed of the validation hold-out.
        val_fraction: Fraction of each training class held out as ``val``, in ``[0, 1)``.
        download: Let torchvision download the set where it can (default off).
        **options: Dataset-specific options (``dataset_info(name).options``).

    Returns:
        A dataset of ``(transform(image), label)`` with ``.targets`` and ``.classes``.

    Raises:
        ValueError: On an unknown name, split or option, or a bad ``val_fraction``.
        FileNotFoundError: If the root or a required file is missing (the message shows the layout).
    """
    info, fn = _lookup(name)
    check_split(info.name, split, info.splits)
    check_val_fraction(val_fraction)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise ValueError(
            f"dataset {info.name!r} got unknown option(s) {unknown}; its options are {list(info.options) or 'none'}"
        )
    return fn(root, split, transform, seed=seed, val_fraction=val_fraction, download=download, **options)


_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import (  # noqa: F401  (registration side effects)
        caltech,
        cifar,
        cub,
        custom,
        fashion_mnist,
        glyphs,
        imagenet_fewshot,
        torchvision_sets,
    )
