"""Unsupervised contrastive losses: SimCLR NT-Xent and hard-negative NT-Xent (Robinson et al., 2021).

Both are ``supervised = False``: ``labels`` are *instance ids* (the views of image ``b`` share id ``b``; ids must
be globally unique across ranks when gathering). ``labels=None`` means two views concatenated along N
(``ids = [0..B-1, 0..B-1]``). For an anchor ``i``, positives are the other views of its instance and negatives
are all other instances; per positive pair,

* NT-Xent: ``-log(exp(s_ip) / (exp(s_ip) + sum_{k in N(i)} exp(s_ik)))``, the SimCLR loss for two views;
* hard-negative NT-Xent: ``-log(exp(s_ip) / (exp(s_ip) + Ng_ip))`` with
  ``Ng_ip = max((sum_k w_ik exp(s_ik) - tau_plus |N(i)| exp(s_ip)) / (1 - tau_plus), |N(i)| exp(-1/tau))``,
  ``w_ik = exp(beta s_ik) / mean_k' exp(beta s_ik')`` (importance weights of hard negatives; ``tau_plus``
  corrects for same-class "negatives"; the clamp is that of the reference implementation).

The loss is the mean over positive pairs of an anchor, then over anchors. All-zero rows are handled as in
:mod:`schane.losses.schane` (zero vector, zero gradient). Plain float64 forms:
:func:`schane.losses.reference.ntxent_reference` and :func:`schane.losses.reference.hard_negative_ntxent_reference`.

Example:
    >>> import torch
    >>> from schane.losses import NTXentLoss, HardNegativeNTXentLoss
    >>> z = torch.randn(8, 64, requires_grad=True)  # views 1 then views 2 of 4 images
    >>> loss = NTXentLoss(temperature=0.5)(z) + HardNegativeNTXentLoss(beta=1.0, tau_plus=0.1)(z)
    >>> loss.backward()
"""

from __future__ import annotations

import torch

from ._blockops import BlockOps
from ._kernels import HardNegativeKernel, RowKernel, SCHaNeKernel
from ._validation import check_beta, check_tau_plus
from .base import PairwiseContrastiveLoss


def two_view_ids(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Instance ids ``[0..n/2-1, 0..n/2-1]`` for two views concatenated along N.

    Raises:
        ValueError: if ``n`` is odd.
    """
    if n % 2:
        raise ValueError(f"labels=None assumes two views concatenated along N, but N={n} is odd; pass ids")
    return torch.arange(n // 2, device=device).repeat(2)


def ntxent_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.5,
    normalize: bool = True,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Functional NT-Xent; see :class:`NTXentLoss`.

    Args:
        embeddings: ``[N, D]`` floating point.
        labels: ``[N]`` instance ids, or ``None`` for two views concatenated along N.
        ref_embeddings: ``[M, D]`` extra contrast samples, or ``None``.
        ref_labels: ``[M]`` their ids, or ``None``.

    Returns:
        Scalar loss.

    Raises:
        ValueError: on bad hyper-parameters or inputs.
    """
    loss = NTXentLoss(temperature, normalize, gather_distributed, chunk_size, backend)
    return loss.forward(embeddings, labels, ref_embeddings, ref_labels)


def hard_negative_ntxent_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.5,
    beta: float = 1.0,
    tau_plus: float = 0.1,
    normalize: bool = True,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Functional hard-negative NT-Xent; see :class:`HardNegativeNTXentLoss`.

    Args:
        embeddings: ``[N, D]`` floating point.
        labels: ``[N]`` instance ids, or ``None`` for two views concatenated along N.
        ref_embeddings: ``[M, D]`` extra contrast samples, or ``None``.
        ref_labels: ``[M]`` their ids, or ``None``.

    Returns:
        Scalar loss.

    Raises:
        ValueError: on bad hyper-parameters or inputs.
    """
    loss = HardNegativeNTXentLoss(
        temperature, beta, tau_plus, normalize, gather_distributed, chunk_size, backend
    )
    return loss.forward(embeddings, labels, ref_embeddings, ref_labels)


class _InstanceLoss(PairwiseContrastiveLoss):
    """Unsupervised: ``labels`` are instance ids, and ``None`` means two views concatenated along N."""

    supervised: bool = False

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``embeddings[N, D]`` with instance ids ``labels[N]`` (``None`` = two views)."""
        if labels is None:
            if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
                raise ValueError("embeddings must be a 2-D tensor [N, D]")
            labels = two_view_ids(embeddings.shape[0], embeddings.device)
        return super().forward(embeddings, labels, ref_embeddings, ref_labels)


class NTXentLoss(_InstanceLoss):
    """SimCLR NT-Xent (the module docstring has the formula).

    Args:
        temperature: ``tau`` > 0.
        normalize: L2-normalise embeddings first.
        gather_distributed: see :class:`PairwiseContrastiveLoss`.
        chunk_size: see :class:`PairwiseContrastiveLoss`.
        backend: see :class:`PairwiseContrastiveLoss`.

    Shapes:
        ``forward(embeddings[N, D], labels[N] | None, ref_embeddings[M, D] | None, ref_labels[M] | None) -> []``;
        labels are instance ids.

    Raises:
        ValueError: on ``temperature <= 0``, bad ``chunk_size`` or bad inputs.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        normalize: bool = True,
        gather_distributed: bool = False,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(temperature, normalize, gather_distributed, chunk_size, backend)

    def row_kernel(self, ops: BlockOps) -> RowKernel:
        return SCHaNeKernel(0.0, "each", False, ops)  # SCHaNe "each" with every weight 1


class HardNegativeNTXentLoss(_InstanceLoss):
    """Debiased hard-negative NT-Xent of Robinson et al. (2021) (the module docstring has the formula).

    Args:
        temperature: ``tau`` > 0.
        beta: hardness concentration >= 0 (0 = uniform negatives).
        tau_plus: class prior of false negatives in [0, 1) (0 = no debiasing).
        normalize: L2-normalise embeddings first.
        gather_distributed: see :class:`PairwiseContrastiveLoss`.
        chunk_size: see :class:`PairwiseContrastiveLoss`.
        backend: see :class:`PairwiseContrastiveLoss`.

    Raises:
        ValueError: on bad hyper-parameters or inputs.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        beta: float = 1.0,
        tau_plus: float = 0.1,
        normalize: bool = True,
        gather_distributed: bool = False,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(temperature, normalize, gather_distributed, chunk_size, backend)
        self.beta = check_beta(beta)
        self.tau_plus = check_tau_plus(tau_plus)

    def row_kernel(self, ops: BlockOps) -> RowKernel:
        return HardNegativeKernel(self.beta, self.tau_plus, self.temperature, ops)
