"""What a run's loaders iterate: seeded per-image transforms, image indices, the data order of an epoch,
and the loader's worker processes (seeded, ignoring the stop signals, stopped on every way out)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from schane.distributed import ignore_stop_signals
from schane.engine.seeding import sample_seed, seeded_rng

logger = logging.getLogger(__name__)


def worker_init_fn(worker_id: int) -> None:
    """Seed Python and NumPy in a DataLoader worker from torch's per-worker seed; ignore the stop signals
    (SIGTERM, SIGUSR1), which the training process handles at a step boundary."""
    ignore_stop_signals()
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def loader_batches(loader: Iterable[Any], limit: int | None = None) -> Iterator[Any]:
    """Iterate a DataLoader (at most ``limit`` batches) and stop its worker processes on the way out.

    The workers of a training loader ignore SIGTERM (:func:`worker_init_fn`), so a worker left behind when
    an epoch ends in an error (its iterator kept alive by the traceback) would block the interpreter's exit.
    This generator shuts them down when it ends, when it is closed and when the loader raises.

    Args:
        loader: a DataLoader (or any iterable).
        limit: stop after this many batches (``None``: all).
    """
    it = iter(loader)
    try:
        yield from (it if limit is None else islice(it, limit))
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator
        if callable(shutdown):
            shutdown()


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``base[i]``'s image under an RNG seeded by ``(seed, epoch, i)``.

    Each sample's augmentation is then a pure function of the run seed, the epoch and the
    index: independent of the batch order, of the number of workers and of the batches
    skipped on resume, which is what makes a resumed run bit-identical. Items are
    ``(transformed_image, label, index)``; the index doubles as a globally unique
    instance id for instance-discrimination losses.

    Args:
        base: dataset returning ``(PIL image, label)`` (built with ``transform=None``).
        transform: callable applied to the image.
        seed: run seed.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], Any], seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        img, label = self.base[i]
        with seeded_rng(sample_seed(self.seed, self.epoch, i)):
            out = self.transform(img)
        return out, int(label), int(i)


class SeededItems(Dataset):
    """``dataset[i]`` computed under torch and Python RNGs seeded by ``(seed, copy, i)``.

    Wraps a dataset whose random transform runs inside ``__getitem__``: item ``i`` of copy
    ``k`` is then the same augmented view in every run, for every model, whatever subset,
    order or number of workers is used. The caller's RNG states are left untouched.

    Args:
        dataset: returns ``(image, label)`` with a random transform applied.
        seed: the augmentation seed.
        copy: which augmented copy (0, 1, ...).
    """

    def __init__(self, dataset: Dataset, seed: int, copy: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.copy = int(copy)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with seeded_rng(sample_seed(self.seed, self.copy, i)):
            return self.dataset[i]


class IndexedDataset(Dataset):
    """``(transform(image), label)`` for evaluation (deterministic transforms)."""

    def __init__(self, base: Dataset, transform: Callable[[Any], Any] | None) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, label = self.base[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label)


def epoch_batches(
    n: int, batch_size: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's training batches for one epoch (shuffled, ``drop_last``).

    Uses :class:`torch.utils.data.DistributedSampler` (``drop_last=True``, seeded, with
    ``set_epoch``); with ``world_size == 1`` it is a seeded permutation. Global step ``t``
    covers the same images whatever the world size, given the same global batch.

    Raises:
        ValueError: when there are fewer samples than one global batch.
    """
    if n < batch_size * world_size:
        raise ValueError(
            f"the training split has {n} images, fewer than one global batch "
            f"(data.batch_size={batch_size} x {world_size} processes); lower data.batch_size"
        )
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True  # type: ignore[arg-type]
    )
    sampler.set_epoch(epoch)
    idx = list(sampler)
    nb = len(idx) // batch_size
    return [idx[b * batch_size : (b + 1) * batch_size] for b in range(nb)]


__all__ = [
    "IndexedDataset",
    "SeededItems",
    "SeededTransformDataset",
    "epoch_batches",
    "loader_batches",
    "worker_init_fn",
]
