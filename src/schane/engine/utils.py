"""Runtime helpers of the training engine: seeding, devices, precision, data order, run logging.

Process-group helpers live in :mod:`schane.distributed`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(*parts: int) -> int:
    """A stable 63-bit seed derived from integers (same value in every process and run)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def worker_init_fn(worker_id: int) -> None:
    """Seed Python and NumPy in a DataLoader worker from torch's per-worker seed; ignore the stop signals
    (SIGTERM, SIGUSR1), which the training process handles at a step boundary."""
    from schane.distributed import ignore_stop_signals

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


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under torch (CPU) and Python RNGs seeded with ``seed``; the caller's states are restored.

    Only the CPU generator is seeded (what ``torch.manual_seed`` does for it): ``torch.manual_seed`` also
    queues the seeding of every accelerator backend, with a stack trace, which costs about 0.5 ms per call,
    once per augmented image."""
    py_state, cpu_state = random.getstate(), torch.random.get_rng_state()
    try:
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        yield
    finally:
        random.setstate(py_state)
        torch.random.set_rng_state(cpu_state)


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
    sampler = DistributedSampler(
        range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True  # type: ignore[arg-type]
    )
    sampler.set_epoch(epoch)
    idx = list(sampler)
    nb = len(idx) // batch_size
    return [idx[b * batch_size : (b + 1) * batch_size] for b in range(nb)]


# --------------------------------------------------------------------------- device and precision


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA (this process's local rank) when available, else CPU.

    Raises:
        ValueError: when CUDA is requested but not available, or the name is unknown.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train.device: unknown device {name!r} (use auto, cpu or cuda)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` on ``device`` (``None`` = full fp32).

    ``auto`` is bf16 on CUDA when supported (else fp16), fp32 on CPU. CPU allows bf16 or none.

    Raises:
        ValueError: for fp16 on CPU or an unknown value.
    """
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device; on CPU use train.amp=bf16 or none")
        return torch.float16
    raise ValueError(f"train.amp: must be auto, bf16, fp16 or none, got {amp!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for ``dtype``, or a no-op when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` is a convolutional network: more than a patch embedding's worth of spatial convolutions."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    return len(convs) >= 4


def resolve_channels_last(setting: bool | str, model: nn.Module) -> bool:
    """``train.channels_last``: ``"auto"`` is on for convolutional networks (:func:`is_convolutional`)."""
    if setting == "auto":
        return is_convolutional(model)
    return bool(setting)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store ``model``'s 4-D weights channels-last, except those with a 1x1 kernel, which keep standard strides.

    A ``[O, I, 1, 1]`` weight has the same memory order in both formats and differs only in its stride
    metadata, but the gradients of 1x1 convolutions come back with standard strides. DDP builds its
    gradient buckets from the parameters' strides and warns ("Grad strides do not match bucket view
    strides") and copies every such gradient; with standard strides on these weights it does neither.

    Returns:
        ``model`` (converted in place).
    """
    model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        if p.ndim == 4 and tuple(p.shape[-2:]) == (1, 1):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


def uses_channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s spatial convolution weights are stored channels-last (so inputs should be too)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and m.weight.shape[1] > 1:
            return m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
    return False


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------- logging


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl``; optionally mirrors scalars to TensorBoard.

    Only the main process should create one.

    Raises:
        ImportError: when ``tensorboard=True`` and the ``tensorboard`` package is missing.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "train.tensorboard=true needs the tensorboard package: pip install 'schane[tensorboard]' "
                    "(or set train.tensorboard=false)"
                ) from e
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        rec = {"time": round(time.time(), 3), **{k: _jsonable(v) for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self._tb is not None and step is not None:
            kind = record.get("kind", "")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self._tb.add_scalar(f"{kind}/{k}" if kind else k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line).

    Blank lines are skipped; a malformed line (for example the last line of a run that was
    killed mid-write) is skipped with a warning.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file {p} not found; pass a run directory's metrics.jsonl")
    records = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipping a malformed line", p, i)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def truncate_metrics(path: str | Path, step: int) -> int:
    """Cut a run's ``metrics.jsonl`` back to a checkpoint's ``global_step``, atomically.

    On resume, the records logged after the checkpoint (steps above ``step``, and a ``final`` record) describe
    weights that no longer exist and would be logged again: they are removed, so that every step appears once.
    Malformed lines (a write cut by a kill) go too; records without a step (``start``) stay. The file is
    rewritten to a temporary file beside it and renamed over it, so it is the old or the new log, never a mix.

    Args:
        path: the ``metrics.jsonl`` (nothing happens when it does not exist).
        step: the checkpoint's ``global_step``.

    Returns:
        The number of lines removed.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    keep, dropped = [], 0
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        s = rec.get("step", rec.get("global_step")) if isinstance(rec, dict) else None
        later = isinstance(s, (int, float)) and not isinstance(s, bool) and s > step
        if not isinstance(rec, dict) or later or rec.get("kind") == "final":
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        logger.info("%s: removed %d record(s) logged after the checkpoint's step %d", p, dropped, step)
    return dropped


class Throughput:
    """Images per second over a sliding window of steps."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t: float | None = None

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self, images: int) -> None:
        if self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.images += images
            self._t = None

    @property
    def value(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0
