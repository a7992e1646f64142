"""Multi-process helpers: process-group setup, rank queries, broadcasts and gathers.

The one module for everything distributed outside the losses. ``gather_with_grad`` concatenates every
rank's rows; its backward sums the incoming gradient over ranks and hands each rank the slice of its own
rows, so a loss computed on the gathered tensor back-propagates into every rank's model. (The losses use the
same gather from :mod:`schane.losses._gather`, which keeps that package free of imports from the rest of
schane; this module re-exports it.) Without a process group every function is a no-op.

Example:
    >>> import torch
    >>> from schane.distributed import gather_with_grad, world_size
    >>> z = torch.randn(4, 8, requires_grad=True)
    >>> z_all = gather_with_grad(z)            # [world_size() * 4, 8]; z itself without a process group
    >>> z_all.shape[0] == 4 * world_size()
    True
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from schane.losses._gather import gather_labels, gather_rows, is_distributed, rank, world_size


@dataclass
class DistInfo:
    """Process-group facts of this process.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node.
        initialized_here: whether :func:`init_distributed` created the process group (and so should destroy it).
    """

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

    Does nothing (single process) when ``WORLD_SIZE`` is unset or 1. Backend: NCCL when the run uses CUDA,
    gloo otherwise.

    Raises:
        ValueError: when the torchrun variables are incomplete.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun --nproc_per_node=K")
    rank_, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available() or device_name.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank_, world, local_rank, True)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """``obj`` from rank 0 on every rank (picklable objects; a single process returns it as is)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather along dim 0.

    Args:
        x: ``[N, ...]`` with the same ``N`` on every rank.

    Returns:
        ``[world * N, ...]``; rank ``r``'s rows are ``r*N:(r+1)*N``. Backward sums gradients over ranks.

    Raises:
        ValueError: if the ranks hold different ``N``.
    """
    return gather_rows(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (labels, ids, queue contents).

    Raises:
        ValueError: if the ranks hold different numbers of rows.
    """
    return gather_labels(x)


__all__ = [
    "DistInfo",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "gather_no_grad",
    "gather_with_grad",
    "init_distributed",
    "is_distributed",
    "rank",
    "shutdown",
    "world_size",
]
