"""Differentiable all-gather for the losses (re-exported by :mod:`schane.distributed`).

Kept inside :mod:`schane.losses` so that the loss package depends on nothing else in schane.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

_warned_no_group = False


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` for ``gather_distributed=True``; warns once when there is no process group."""
    global _warned_no_group
    if not is_distributed():
        if not _warned_no_group:
            warnings.warn(
                "gather_distributed=True but torch.distributed is not initialised; "
                "using only this process's embeddings",
                stacklevel=3,
            )
            _warned_no_group = True
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _check_equal_sizes(x: torch.Tensor) -> None:
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    got = [int(s.item()) for s in sizes]
    if len(set(got)) != 1:
        raise ValueError(
            f"gather across ranks needs the same batch size on every rank, got per-rank sizes {got}; "
            "use drop_last=True in the DataLoader/DistributedSampler"
        )


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradient over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (no-op without a process group).

    Args:
        x: ``[N, ...]``, the same ``N`` on every rank.

    Returns:
        ``[world * N, ...]``, rank ``r``'s rows at ``r*N:(r+1)*N``. Backward sums the gradient over ranks.

    Raises:
        ValueError: if ranks hold different ``N``.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    _check_equal_sizes(x)
    return _AllGather.apply(x)


@torch.no_grad()
def gather_labels(y: torch.Tensor) -> torch.Tensor:
    """Non-differentiable all-gather along dim 0 (labels, ids); sizes must match across ranks.

    Raises:
        ValueError: if ranks hold different numbers of rows.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return y
    _check_equal_sizes(y)
    out = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(out, y.contiguous())
    return torch.cat(out)
