"""Runtime helpers of the training engine: seeding, devices, precision, DDP setup, logging, data order."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

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
    """Seed Python and NumPy in a DataLoader worker from torch's per-worker seed."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


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
        s = sample_seed(self.seed, self.epoch, i)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            out = self.transform(img)
        random.setstate(py_state)
        return out, int(label), int(i)


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


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Process-group facts of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    Does nothing (single process) when ``WORLD_SIZE`` is unset or 1. Backend: NCCL when the
    run uses CUDA, gloo otherwise.

    Raises:
        ValueError: when the torchrun variables are incomplete.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun --nproc_per_node=K")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available() or device_name.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local_rank, True)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """``obj`` from rank 0 on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    """All records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
