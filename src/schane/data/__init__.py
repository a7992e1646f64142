"""Datasets: a registry of few-shot benchmarks, fine-tuning sets, custom folders/CSVs and offline sets.

Examples:
    >>> from schane.data import dataset_info, get_dataset, list_datasets
    >>> dataset_info("cifar_fs").splits
    ('train', 'val', 'val_classes', 'test_classes')
"""

from .base import CorruptImageError, ImageDataset, holdout_indices
from .registry import DatasetInfo, dataset_info, get_dataset, list_datasets, register_dataset
from .safe_pickle import UnsafePickleError, load_pickle

__all__ = [
    "CorruptImageError",
    "DatasetInfo",
    "ImageDataset",
    "UnsafePickleError",
    "dataset_info",
    "get_dataset",
    "holdout_indices",
    "list_datasets",
    "load_pickle",
    "register_dataset",
]
