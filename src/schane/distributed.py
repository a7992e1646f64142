"""Distributed helpers: rank queries and a differentiable all-gather.

``gather_with_grad`` concatenates every rank's rows; its backward sums the incoming gradient over ranks and
hands each rank the slice of its own rows, so a loss computed on the gathered tensor back-propagates into
every rank's model. The losses use it through ``gather_distributed=True``; the same-size check turns unequal
per-rank batches into a ``ValueError`` on every rank instead of a hang. Without a process group every
function is a no-op.

Example:
    >>> import torch
    >>> from schane.distributed import gather_with_grad, world_size
    >>> z = torch.randn(4, 8, requires_grad=True)
    >>> z_all = gather_with_grad(z)            # [world_size() * 4, 8]; z itself without a process group
    >>> z_all.shape[0] == 4 * world_size()
    True
"""

from __future__ import annotations

import torch

from schane.losses._gather import gather_labels, gather_rows, is_distributed, rank, world_size


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


__all__ = ["gather_no_grad", "gather_with_grad", "is_distributed", "rank", "world_size"]
