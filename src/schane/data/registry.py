"""Dataset registry: a name plus a root directory gives a split with labels and class names.

Examples:
    >>> from schane.data import get_dataset, list_datasets
    >>> "glyphs" in list_datasets()
    True
    >>> ds = get_dataset("glyphs", split="val_classes", cache_dir="/tmp/glyphs")  # doctest: +SKIP
    >>> img, label = ds[0]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
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
            Some sets change kind with their options (``image_folder`` and ``csv`` become few-shot sets
            with ``class_splits`` or ``class_fractions``): ``dataset_info(name, options=...)`` tells.
        splits: The split names ``get_dataset`` accepts (for those options).
        layout: The on-disk layout the reader expects under ``root``.
        options: Names of the dataset-specific keyword options.
    """

    name: str
    kind: Literal["fewshot", "classification"]
    splits: tuple[str, ...]
    layout: str
    options: tuple[str, ...] = ()


Kind = Literal["fewshot", "classification"]
KindForOptions = Callable[[Mapping[str, Any]], Kind]
_SPLITS: dict[str, tuple[str, ...]] = {"fewshot": FEWSHOT_SPLITS, "classification": CLASSIFICATION_SPLITS}
_REGISTRY: dict[str, tuple[DatasetInfo, Callable[..., Dataset]]] = {}
_KIND_FOR_OPTIONS: dict[str, KindForOptions] = {}


def register_dataset(
    name: str, kind: Kind, layout: str, *, kind_for_options: KindForOptions | None = None
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator registering a builder ``fn(root, split, transform, *, seed, val_fraction, download, **options)``.

    The builder's keyword-only parameters after ``download`` become the dataset's options.

    Args:
        name: Registry name.
        kind: The kind without options (or with options that do not change it).
        layout: The on-disk layout (shown in errors and ``dataset_info(name).layout``).
        kind_for_options: For sets whose kind depends on their options: ``fn(options) -> kind``. It may
            raise ValueError on malformed options, and must not read any file.

    Raises:
        ValueError: On an unknown kind.
    """
    if kind not in _SPLITS:
        raise ValueError(f"kind must be 'fewshot' or 'classification', got {kind!r}")

    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        params = inspect.signature(fn).parameters
        common = {"root", "split", "transform", "seed", "val_fraction", "download"}
        options = tuple(
            p for p in params if p not in common and params[p].kind == inspect.Parameter.KEYWORD_ONLY
        )
        _REGISTRY[name] = (DatasetInfo(name, kind, _SPLITS[kind], inspect.cleandoc(layout), options), fn)
        if kind_for_options is not None:
            _KIND_FOR_OPTIONS[name] = kind_for_options
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


def dataset_info(name: str, options: Mapping[str, Any] | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered dataset, for the given dataset options.

    Without ``options`` (or with options that do not change the kind) this is the registered kind and
    splits; ``image_folder`` and ``csv`` with ``class_splits`` or ``class_fractions`` are few-shot sets.
    Reads no file.

    Args:
        name: Registry name.
        options: The dataset options (``data.options`` of a config), as passed to :func:`get_dataset`.

    Examples:
        >>> dataset_info("image_folder").kind
        'classification'
        >>> dataset_info("image_folder", options={"class_fractions": [0.6, 0.2, 0.2]}).splits
        ('train', 'val', 'val_classes', 'test_classes')

    Raises:
        ValueError: If the name is not registered, or an option that sets the kind is malformed.
    """
    info = _lookup(name)[0]
    kind_fn = _KIND_FOR_OPTIONS.get(info.name)
    if not options or kind_fn is None:
        return info
    kind = kind_fn(options)
    if kind == info.kind:
        return info
    return dataclasses.replace(info, kind=kind, splits=_SPLITS[kind])


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
            ``test_classes`` for few-shot sets (``dataset_info(name, options).splits``).
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
    registered, fn = _lookup(name)
    unknown = sorted(set(options) - set(registered.options))
    if unknown:
        raise ValueError(
            f"dataset {registered.name!r} got unknown option(s) {unknown}; its options are "
            f"{list(registered.options) or 'none'}"
        )
    info = dataset_info(name, options)
    if info.kind != registered.kind and split not in info.splits:
        set_by = sorted(k for k in options if options[k] is not None)
        raise ValueError(
            f"dataset {info.name!r} with the option(s) {set_by} is a "
            f"{'few-shot' if info.kind == 'fewshot' else info.kind} set with splits "
            f"{info.splits}; got split={split!r}"
        )
    check_split(info.name, split, info.splits)
    check_val_fraction(val_fraction)
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
        hf,
        imagenet_fewshot,
        torchvision_sets,
        wds,
    )
