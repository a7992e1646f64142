"""Multi-process helpers: process-group setup, rank queries, broadcasts and gathers.

The one module for everything distributed outside the losses. ``gather_with_grad`` concatenates every
rank's rows; its backward sums the incoming gradient over ranks and hands each rank the slice of its own
rows, so a loss computed on the gathered tensor back-propagates into every rank's model. (The losses use the
same gather from :mod:`schane.losses._gather`, which keeps that package free of imports from the rest of
schane; this module re-exports it.) Without a process group every function is a no-op. :class:`StopSignals`
turns SIGTERM/SIGUSR1 into a flag that every rank agrees on at a step boundary (preemption; docs/cluster.md).

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
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
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
    gloo otherwise. Under torchrun, each restart (``TORCHELASTIC_RESTART_COUNT``) connects through its own
    key space of the agent's store, so restarted workers never meet their predecessors' addresses.

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
    timeout = datetime.timedelta(minutes=30)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        # torchrun's workers share the agent's store across restarts, and torch keys the process group's
        # connection info without the attempt: a restarted rank could read the dead rank's address
        # (gloo: "connectFullMesh failed ... Connection refused"). One key space per attempt.
        from torch.distributed.rendezvous import rendezvous

        store, _, _ = next(rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"schane/attempt_{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world, timeout=timeout)
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


PREEMPTED_EXIT_CODE = 143
"""Exit status of a run stopped by a signal after its checkpoint was written: 128 + SIGTERM, what a shell and
Slurm report for a job ended by SIGTERM (``docs/cluster.md`` shows a batch script that requeues on it)."""


def restarted_by_torchelastic() -> bool:
    """Whether torchrun started this process as a restart of failed workers (``TORCHELASTIC_RESTART_COUNT > 0``)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


class StopSignals:
    """Record stop signals (SIGTERM, SIGUSR1) and agree on them across ranks at a step boundary.

    :meth:`install` replaces the handlers of ``signals`` by one that only sets a flag (a signal handler
    must not write checkpoints); :meth:`agreed` is the step boundary: it all-reduces the flag (``MAX``), so
    every rank answers the same, and the ranks stop at the same step even when only one received the
    signal. :meth:`restore` puts the previous handlers back. Installing works only in the main thread of
    the main interpreter; elsewhere the signals keep their handlers and :meth:`agreed` is False until
    :meth:`request` is called.

    Args:
        signals: signal names, e.g. ``("SIGTERM", "SIGUSR1")``.

    Raises:
        ValueError: for a name that is not a signal of this platform.

    Example:
        >>> stop = StopSignals(["SIGTERM", "SIGUSR1"]).install()   # doctest: +SKIP
        >>> for step in ...:                                      # doctest: +SKIP
        ...     train_step(); stop.agreed(info) and save_and_exit()
    """

    def __init__(self, signals: Sequence[str]) -> None:
        self.signals = [_signal_of(name) for name in signals]
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def request(self, name: str = "request") -> None:
        """Ask for a stop as if a signal had arrived (tests, callbacks)."""
        self.received = name

    def install(self) -> StopSignals:
        """Handle the signals from now on (a no-op outside the main thread)."""
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                break
        return self

    def restore(self) -> None:
        """Give the signals back their previous handlers."""
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, info: DistInfo, device: torch.device | None = None) -> bool:
        """Whether any rank received a stop signal (collective under DDP: every rank calls it at the same step).

        Args:
            info: process-group facts.
            device: where the flag is reduced (the run's device; NCCL needs a CUDA tensor).
        """
        flag = self.received is not None
        if not info.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() and self.received is None:
            self.received = "another rank's signal"
        return bool(t.item())


def _signal_of(name: str) -> signal.Signals:
    sig = getattr(signal, str(name).upper(), None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"train.stop_signals: {name!r} is not a signal of this platform; use e.g. SIGTERM, SIGUSR1")
    return sig


def ignore_stop_signals(names: Sequence[str] = ("SIGTERM", "SIGUSR1")) -> None:
    """Ignore the stop signals in this process (DataLoader workers: the main process decides when to stop)."""
    for name in names:
        sig = getattr(signal, name, None)
        if isinstance(sig, signal.Signals):
            signal.signal(sig, signal.SIG_IGN)


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
    "PREEMPTED_EXIT_CODE",
    "DistInfo",
    "StopSignals",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "gather_no_grad",
    "gather_with_grad",
    "ignore_stop_signals",
    "init_distributed",
    "is_distributed",
    "rank",
    "restarted_by_torchelastic",
    "shutdown",
    "world_size",
]
