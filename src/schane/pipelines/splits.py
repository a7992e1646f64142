"""One split of a run's dataset and the preprocessing a model's weights expect, written once.

* :func:`load_split` / :func:`read_split`: one split of the run's dataset, as ``cfg.data`` describes it (the
  only place outside :mod:`schane.data` that turns a config into a dataset);
* :func:`dataset_splits`: the splits a configured dataset has;
* :func:`eval_transform_for`, :func:`train_transform_for`, :func:`support_transform_for`: the preprocessing
  of a model's pretrained weights (or the config's explicit choice);
* :func:`eval_dataset`: a split under the evaluation transform, with image indices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from schane.config import Config
from schane.data import dataset_info, get_dataset
from schane.data.transforms import resolve_preprocessing
from schane.engine.batches import IndexedDataset
from schane.models.model import SCHaNeModel

logger = logging.getLogger(__name__)


def load_split(cfg: Config, split: str, transform: Any = None) -> Any:
    """One split of ``cfg.data``'s dataset (``transform`` applied to each PIL image, ``None``: PIL images).

    The validation hold-out is seeded with ``data.split_seed``: every run of a study, whatever its training
    seed or loss, trains and selects on the same images.

    Raises:
        ValueError: on an unknown dataset, split or option.
        FileNotFoundError: when the data is missing.
    """
    d = cfg.data
    return read_split(d.name, d.root, split, transform, split_seed=d.split_seed, val_fraction=d.val_fraction,
                      download=d.download, options=d.options)


def read_split(name: str, root: str | None, split: str, transform: Any = None, *, split_seed: int,
               val_fraction: float, options: Mapping[str, Any], download: bool = False) -> Any:
    """One split of a dataset given by its parts rather than a config (``--data`` reads splits before its
    config exists); :func:`load_split` is this with ``cfg.data``'s values.

    Raises:
        ValueError: on an unknown dataset, split or option.
        FileNotFoundError: when the data is missing.
    """

    return get_dataset(name, root, split, transform, seed=split_seed, val_fraction=val_fraction,
                       download=download, **options)


def dataset_splits(cfg: Config) -> tuple[str, ...]:
    """The splits ``cfg.data``'s dataset offers."""

    return dataset_info(cfg.data.name, options=cfg.data.options).splits


def preprocessing_for(cfg: Config, model: SCHaNeModel) -> Any:
    """The run's :class:`~schane.data.transforms.Preprocessing`: ``data.mean/std/crop_pct/eval_resize`` where
    set, else the values of ``model``'s pretrained weights."""

    return resolve_preprocessing(cfg.data, model.data_config)


def eval_transform_for(cfg: Config, model: SCHaNeModel) -> Any:
    """The deterministic evaluation transform for ``model`` at ``data.img_size``."""
    return preprocessing_for(cfg, model).eval_transform(cfg.data.img_size)


def train_transform_for(cfg: Config, model: SCHaNeModel) -> Any:
    """One random training view for ``model`` (``aug.*`` settings)."""
    return preprocessing_for(cfg, model).train_transform(cfg.data.img_size, cfg.aug)


def support_transform_for(cfg: Config, model: SCHaNeModel) -> Any:
    """The few-shot support augmentation for ``model``."""
    return preprocessing_for(cfg, model).support_transform(cfg.data.img_size)


def eval_dataset(cfg: Config, model: SCHaNeModel, split: str) -> tuple[Any, Any]:
    """``(dataset with the evaluation transform, the plain split)`` for ``model``."""

    base = load_split(cfg, split)
    return IndexedDataset(base, eval_transform_for(cfg, model)), base


__all__ = [
    "dataset_splits",
    "eval_dataset",
    "eval_transform_for",
    "load_split",
    "preprocessing_for",
    "read_split",
    "support_transform_for",
    "train_transform_for",
]
