"""Supervised contrastive loss ``L_out`` (Khosla et al., 2020).

``l_i = -1/|P(i)| sum_{p in P(i)} log(exp(s_ip) / sum_{a != i} exp(s_ia))`` with ``s = z_i . z_j / tau``,
averaged over anchors that have at least one positive. Agrees with
``pytorch_metric_learning.losses.SupConLoss`` whenever the batch has negatives. All-zero rows are handled as in
:mod:`schane.losses.schane` (zero vector, zero gradient). Plain float64 form:
:func:`schane.losses.reference.supcon_reference`.

Example:
    >>> import torch
    >>> from schane.losses import SupConLoss
    >>> z = torch.randn(6, 32, requires_grad=True)
    >>> loss = SupConLoss(temperature=0.1)(z, torch.tensor([0, 0, 1, 1, 2, 2]))
    >>> loss.backward()
"""

from __future__ import annotations

import torch

from ._blockops import BlockOps
from ._kernels import RowKernel, SupConKernel
from .base import PairwiseContrastiveLoss


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Functional SupCon loss; see :class:`SupConLoss` for the arguments.

    Args:
        embeddings: ``[N, D]`` floating point.
        labels: ``[N]`` integer class labels.
        ref_embeddings: ``[M, D]`` extra contrast samples, or ``None``.
        ref_labels: ``[M]`` their labels, or ``None``.

    Returns:
        Scalar loss.

    Raises:
        ValueError: on bad hyper-parameters or inputs.
    """
    loss = SupConLoss(temperature, normalize, gather_distributed, chunk_size, backend)
    return loss.forward(embeddings, labels, ref_embeddings, ref_labels)


class SupConLoss(PairwiseContrastiveLoss):
    """SupCon ``L_out`` (the module docstring has the formula).

    Args:
        temperature: ``tau`` > 0.
        normalize: L2-normalise embeddings first.
        gather_distributed: see :class:`PairwiseContrastiveLoss`.
        chunk_size: see :class:`PairwiseContrastiveLoss`.
        backend: see :class:`PairwiseContrastiveLoss`.

    Shapes:
        ``forward(embeddings[N, D], labels[N], ref_embeddings[M, D] | None, ref_labels[M] | None) -> []``.

    Raises:
        ValueError: on ``temperature <= 0`` (or a bool), bad ``chunk_size`` or ``backend``, or bad inputs to
            ``forward``.
    """

    supervised: bool = True
    repr_fields = ("temperature", "normalize", "chunk_size")

    def __init__(
        self,
        temperature: float = 0.1,
        normalize: bool = True,
        gather_distributed: bool = False,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(temperature, normalize, gather_distributed, chunk_size, backend)

    def row_kernel(self, ops: BlockOps) -> RowKernel:
        return SupConKernel(ops)
