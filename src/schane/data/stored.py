"""What the readers of stored sets share (Hugging Face datasets, WebDataset shards): named splits.

Such a set arrives with its own named splits (``train``, ``validation`` or ``val``, ``test``). Each
reader turns every stored split into an :class:`~schane.data.base.ImageDataset` with the same class
names, and :func:`pick_split` makes schane's split from them:

* ``train``: the stored ``train`` split, less the validation hold-out when there is no stored
  validation split;
* ``val``: the stored ``validation`` (or ``val``) split when there is one, else the seeded
  ``val_fraction`` hold-out of ``train`` (as for class folders);
* ``test``: the stored ``test`` split;
* few-shot mode (``class_splits`` / ``class_fractions``): every stored split pooled, the classes cut
  into base, validation and novel classes (see :func:`schane.data.custom.own_fewshot_split`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .base import ImageDataset, check_no_empty_class, classification_split, first_few
from .custom import fewshot_kind, own_fewshot_split

STORED_SPLITS = ("train", "validation", "val", "test")
"""Split names a stored set may hold; ``validation`` and ``val`` are the same split."""


def split_key(name: str) -> str | None:
    """The schane part of a stored split name: ``train``, ``val`` or ``test`` (``None`` for others)."""
    return {"train": "train", "validation": "val", "val": "val", "test": "test"}.get(name)


def pick_split(
    name: str,
    parts: Mapping[str, ImageDataset],
    split: str,
    where: str,
    *,
    seed: int,
    val_fraction: float,
    class_splits: Mapping[str, Sequence[str]] | str | os.PathLike | None,
    class_fractions: Sequence[float] | None,
    split_seed: int,
    root: Any,
) -> ImageDataset:
    """schane's ``split`` from a stored set's splits (see the module docstring).

    Args:
        name: Dataset name (for messages).
        parts: ``{"train": ..., "val": ..., "test": ...}`` (each optional but ``train``), sharing ``classes``.
        split: The requested split.
        where: Where the data lives (for messages).
        seed: Seed of the validation hold-out.
        val_fraction: Fraction of each training class held out when there is no stored validation split.
        class_splits: Few-shot class lists (or their folder), see :func:`schane.data.custom.resolve_class_lists`.
        class_fractions: Few-shot class fractions.
        split_seed: Seed of ``class_fractions``.
        root: The data's root (for a relative ``class_splits`` folder).

    Returns:
        The split.

    Raises:
        ValueError: If the requested split is not stored, or a class has no training images.
        FileNotFoundError: If a ``class_splits`` folder is missing.
    """
    if "train" not in parts:
        raise ValueError(f"dataset {name!r}: {where} has no train split (stored splits: {sorted(parts)})")
    train = parts["train"]
    if fewshot_kind(name, {"class_splits": class_splits, "class_fractions": class_fractions}) == "fewshot":
        pooled = [parts[k] for k in ("train", "val", "test") if k in parts]
        full = ImageDataset(
            [s for p in pooled for s in p.samples],
            [t for p in pooled for t in p.targets],
            train.classes,
            train.loader,
            train.transform,
            name,
        )
        return own_fewshot_split(
            full,
            split,
            where,
            root=root,
            seed=seed,
            val_fraction=val_fraction,
            class_splits=class_splits,
            class_fractions=class_fractions,
            split_seed=split_seed,
        )
    if split == "test" and "test" not in parts:
        raise ValueError(
            f"dataset {name!r}: {where} has no test split (stored splits: {first_few(sorted(parts))}); "
            "evaluate on --split val, or store a test split"
        )
    if "val" in parts and split in ("train", "val"):
        check_no_empty_class(name, train.targets, train.classes, f"the train split of {where}")
        out = train if split == "train" else parts["val"]
        out.split = split
        return out
    return classification_split(train, parts.get("test"), split, val_fraction, seed)
