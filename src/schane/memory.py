"""A FIFO memory queue of past embeddings, used as extra contrast samples.

The queue stores *detached* embeddings and labels from earlier steps. Pass ``queue.get()`` as
``ref_embeddings, ref_labels`` to any :mod:`schane.losses` loss, then enqueue the current batch (after the loss,
so a sample is never contrasted with its own copy). Under ``gather_distributed`` enqueue the gathered batch so
every rank holds the same queue. The queue is an ``nn.Module`` with buffers: ``state_dict()`` /
``load_state_dict()`` round-trip it in checkpoints and ``.to(device)`` moves it.

Example:
    >>> import torch
    >>> from schane.losses import SCHaNeLoss
    >>> from schane.memory import EmbeddingQueue
    >>> loss_fn, queue = SCHaNeLoss(), EmbeddingQueue(size=1024, dim=128)
    >>> for _ in range(3):
    ...     z, y = torch.randn(16, 128, requires_grad=True), torch.randint(0, 4, (16,))
    ...     ref_z, ref_y = queue.get()
    ...     loss = loss_fn(z, y, ref_z, ref_y)
    ...     loss.backward()
    ...     queue.enqueue(z, y)
    >>> len(queue)
    48
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class EmbeddingQueue(nn.Module):
    """Fixed-size FIFO of detached ``embeddings[size, dim]`` and ``labels[size]``.

    Args:
        size: capacity (number of rows), > 0.
        dim: embedding dimension, > 0.
        dtype: storage dtype of the embeddings (float32 by default; inputs are cast).

    Raises:
        ValueError: if ``size`` or ``dim`` is not a positive int.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"EmbeddingQueue {name} must be a positive int, got {v!r}")
        self.size, self.dim = size, dim
        self.register_buffer("embeddings", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next write position
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled rows

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch, overwriting the oldest rows when full.

        Args:
            embeddings: ``[N, dim]`` (detached and cast to the storage dtype/device).
            labels: ``[N]`` integer labels.

        Raises:
            ValueError: on a shape, dtype or length mismatch.
        """
        if (
            not isinstance(embeddings, torch.Tensor)
            or embeddings.dim() != 2
            or embeddings.shape[1] != self.dim
        ):
            raise ValueError(
                f"enqueue expects embeddings of shape [N, {self.dim}], got {getattr(embeddings, 'shape', None)}"
            )
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dim() != 1
            or labels.is_floating_point()
            or labels.shape[0] != embeddings.shape[0]
        ):
            raise ValueError(
                f"enqueue expects integer labels of shape [{embeddings.shape[0]}], got "
                f"{getattr(labels, 'shape', None)} {getattr(labels, 'dtype', type(labels))}"
            )
        emb = embeddings.detach().to(device=self.embeddings.device, dtype=self.embeddings.dtype)
        lab = labels.detach().to(device=self.labels.device, dtype=torch.long)
        if emb.shape[0] >= self.size:  # only the newest `size` rows survive
            emb, lab = emb[-self.size :], lab[-self.size :]
        n = emb.shape[0]
        idx = (int(self.ptr) + torch.arange(n, device=emb.device)) % self.size
        self.embeddings[idx] = emb
        self.labels[idx] = lab
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.count.fill_(min(int(self.count) + n, self.size))

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the stored rows, oldest first.

        Returns:
            ``(embeddings[M, dim], labels[M])`` detached, ``M = len(self)`` (``M = 0`` when empty).
        """
        n, p = int(self.count), int(self.ptr)
        if n < self.size:
            return self.embeddings[:n].detach(), self.labels[:n].detach()
        order = (p + torch.arange(self.size, device=self.embeddings.device)) % self.size
        return self.embeddings[order].detach(), self.labels[order].detach()

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue."""
        self.ptr.zero_()
        self.count.zero_()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a saved queue.

        Raises:
            ValueError: if the saved queue has another size or dimension.
        """
        emb = state_dict.get("embeddings")
        if emb is not None and tuple(emb.shape) != (self.size, self.dim):
            raise ValueError(
                f"saved queue has shape {tuple(emb.shape)} but this queue is ({self.size}, {self.dim}); "
                "build the queue with the same size and dim (loss.queue_size) as the checkpoint"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={len(self)}"
