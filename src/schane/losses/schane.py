"""SCHaNe: supervised contrastive loss with hard-negative weighting (Long et al., 2023).

With ``s_ij = z_i . z_j / tau`` (``z`` L2-normalised when ``normalize``), positives
``P(i) = {j != i : y_j = y_i}``, negatives ``N(i) = {k : y_k != y_i}`` and hard-negative weights
``w_ik = exp(beta s_ik) / mean_{k' in N(i)} exp(beta s_ik')`` (they average 1 over the anchor's negatives),
``Ng_i = sum_{k in N(i)} w_ik exp(s_ik)``:

* ``positive_mode="mean"`` (the authors' released form): ``pos_i = mean_{p in P(i)} exp(s_ip)`` and
  ``l_i = -log(pos_i / (pos_i + Ng_i))``;
* ``positive_mode="each"``: ``l_i = mean_{p in P(i)} -log(exp(s_ip) / (exp(s_ip) + Ng_i))``.

The loss is the mean of ``l_i`` over anchors with at least one positive (a zero connected to the graph when
there is none). ``beta=0`` gives the unweighted label-aware loss.

With ``normalize=True`` an all-zero embedding row (norm ``<= 1e-12``) has no direction: it is used as the zero
vector (similarity 0 to every other sample) and receives an exactly zero gradient, rather than the ``1e12``-fold
amplified gradient that ``F.normalize`` would give it.

The same loss as a plain float64 loop over anchors: :func:`schane.losses.reference.schane_reference`.

Example:
    >>> import torch
    >>> from schane.losses import SCHaNeLoss
    >>> loss_fn = SCHaNeLoss(temperature=0.5, beta=1.0)
    >>> z = torch.randn(8, 128, requires_grad=True)        # two views of 4 images
    >>> y = torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])         # labels repeated per view
    >>> loss = loss_fn(z, y)
    >>> loss.backward()
"""

from __future__ import annotations

import torch

from ._blockops import BlockOps
from ._kernels import RowKernel, SCHaNeKernel
from ._validation import check_beta, check_positive_mode
from .base import PairwiseContrastiveLoss


def schane_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.5,
    beta: float = 1.0,
    positive_mode: str = "mean",
    normalize: bool = True,
    detach_weights: bool = False,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Functional SCHaNe loss; see :class:`SCHaNeLoss` for the arguments.

    Args:
        embeddings: ``[N, D]`` floating point, views concatenated along N.
        labels: ``[N]`` integer class labels.
        ref_embeddings: ``[M, D]`` extra contrast samples, or ``None``.
        ref_labels: ``[M]`` their labels, or ``None``.

    Returns:
        Scalar loss (float32, or float64 for float64 inputs).

    Raises:
        ValueError: on bad hyper-parameters or inputs.
    """
    loss = SCHaNeLoss(
        temperature=temperature,
        beta=beta,
        positive_mode=positive_mode,
        normalize=normalize,
        detach_weights=detach_weights,
        gather_distributed=gather_distributed,
        chunk_size=chunk_size,
        backend=backend,
    )
    return loss.forward(embeddings, labels, ref_embeddings, ref_labels)


class SCHaNeLoss(PairwiseContrastiveLoss):
    """Supervised contrastive loss with hard-negative weighting (the module docstring has the formula).

    Args:
        temperature: ``tau`` > 0.
        beta: hard-negative concentration >= 0 (0 = plain label-aware loss, every weight exactly 1).
        positive_mode: ``"mean"`` (average positive similarity inside the log, as released) or ``"each"``
            (one term per positive pair).
        normalize: L2-normalise embeddings (and ``ref_embeddings``) first.
        detach_weights: treat the weights ``w_ik`` as constants in backward.
        gather_distributed: contrast with all ranks' embeddings; see :class:`PairwiseContrastiveLoss`.
        chunk_size: anchor rows per block, ``None`` = one block; see :class:`PairwiseContrastiveLoss`.
        backend: block kernels, ``"eager"`` or ``"compile"``; see :class:`PairwiseContrastiveLoss`.

    Shapes:
        ``forward(embeddings[N, D], labels[N], ref_embeddings[M, D] | None, ref_labels[M] | None) -> []``.
        With ``ref_embeddings`` the anchors are ``embeddings`` and the contrast set is
        ``embeddings`` plus ``ref_embeddings`` (self excluded).

    Raises:
        ValueError: on ``temperature <= 0``, ``beta < 0`` (either a bool), unknown ``positive_mode``, bad
            ``chunk_size`` or ``backend``, and in ``forward`` on non-2-D or non-finite embeddings, wrong labels, or
            mismatched ref tensors.
    """

    supervised: bool = True
    repr_fields = ("temperature", "beta", "positive_mode", "normalize", "gather_distributed", "chunk_size")

    def __init__(
        self,
        temperature: float = 0.5,
        beta: float = 1.0,
        positive_mode: str = "mean",
        normalize: bool = True,
        detach_weights: bool = False,
        gather_distributed: bool = False,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(temperature, normalize, gather_distributed, chunk_size, backend)
        self.beta = check_beta(beta)
        self.positive_mode = check_positive_mode(positive_mode)
        self.detach_weights = bool(detach_weights)

    def row_kernel(self, ops: BlockOps) -> RowKernel:
        return SCHaNeKernel(self.beta, self.positive_mode, self.detach_weights, ops)
