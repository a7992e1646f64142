"""Joint objective ``total = lam * contrastive + (1 - lam) * cross_entropy``.

Plain form: :func:`schane.losses.reference.joint_reference`.

Example:
    >>> import torch
    >>> from schane.losses import JointLoss, SCHaNeLoss
    >>> joint = JointLoss(SCHaNeLoss(), lam=0.9)
    >>> logits, z = torch.randn(8, 4, requires_grad=True), torch.randn(8, 128, requires_grad=True)
    >>> y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    >>> out = joint(logits, y, z)
    >>> out.total.backward()  # out.contrastive and out.ce are kept for logging
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_label_smoothing, check_lam


class JointLossOutput(NamedTuple):
    """Total loss and its components; a component that was not computed is ``None``."""

    total: torch.Tensor
    contrastive: torch.Tensor | None
    ce: torch.Tensor | None


class JointLoss(nn.Module):
    """``lam * contrastive + (1 - lam) * CE``.

    Args:
        contrastive: a contrastive loss module (e.g. :class:`SCHaNeLoss`), or ``None`` for CE only.
        lam: weight of the contrastive term in [0, 1]; ``lam=1`` computes no CE and ``lam=0`` no contrastive term.
        label_smoothing: passed to :func:`torch.nn.functional.cross_entropy`.

    Raises:
        ValueError: if ``lam`` is not a number in [0, 1] or ``label_smoothing`` not a number in [0, 1) (bools are
            not numbers here).
    """

    def __init__(self, contrastive: nn.Module | None, lam: float = 0.9, label_smoothing: float = 0.0) -> None:
        super().__init__()
        lam = check_lam(lam)
        self.contrastive = contrastive
        self.lam = lam if contrastive is not None else 0.0
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        embeddings: torch.Tensor | None = None,
        contrastive_labels: torch.Tensor | None = None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> JointLossOutput:
        """Compute the joint loss.

        Args:
            logits: ``[N, C]`` classifier outputs (cast to float32 for CE).
            labels: ``[N]`` class indices for CE (and for the contrastive term unless ``contrastive_labels``).
            embeddings: ``[N, P]`` projections for the contrastive term (required when ``lam > 0``).
            contrastive_labels: ``[N]`` labels for the contrastive term (instance ids for unsupervised losses).
            ref_embeddings: ``[M, P]`` extra contrast samples (e.g. a memory queue), or ``None``.
            ref_labels: ``[M]`` their labels, or ``None``.

        Returns:
            ``JointLossOutput(total, contrastive, ce)``.

        Raises:
            ValueError: on shape mismatches, missing embeddings, or NaN/inf in ``logits`` (when CE is computed,
                i.e. ``lam < 1``).
        """
        if self.lam >= 1.0:  # contrastive term only: no CE, so logits are not even checked
            con = self._contrastive_term(labels, embeddings, contrastive_labels, ref_embeddings, ref_labels)
            return JointLossOutput(con, con, None)
        ce = self._cross_entropy(logits, labels)
        if self.lam <= 0.0:
            return JointLossOutput(ce, None, ce)
        con = self._contrastive_term(labels, embeddings, contrastive_labels, ref_embeddings, ref_labels)
        return JointLossOutput(self.lam * con + (1.0 - self.lam) * ce, con, ce)

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Checked CE of ``logits[N, C]`` (in float32) against ``labels[N]``."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(f"logits must be 2-D [N, C], got {getattr(logits, 'shape', type(logits))}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels must be 1-D of length {logits.shape[0]} (rows of logits), "
                f"got {getattr(labels, 'shape', type(labels))}"
            )
        if logits.is_floating_point() and not bool(torch.isfinite(logits.detach()).all()):
            raise ValueError(
                "logits contain NaN or inf, so the cross-entropy would be NaN; check the model output "
                "(e.g. lower the learning rate or use bf16 instead of fp16)"
            )
        return F.cross_entropy(logits.float(), labels.long(), label_smoothing=self.label_smoothing)

    def _contrastive_term(
        self,
        labels: torch.Tensor,
        embeddings: torch.Tensor | None,
        contrastive_labels: torch.Tensor | None,
        ref_embeddings: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """The contrastive loss of ``embeddings`` (with ``contrastive_labels``, else ``labels``)."""
        if embeddings is None:
            raise ValueError("embeddings are required when lam > 0 (the contrastive term)")
        if self.contrastive is None:  # only when lam was set > 0 after construction
            raise ValueError("this JointLoss has no contrastive loss; lam must be 0")
        y = labels if contrastive_labels is None else contrastive_labels
        return self.contrastive(embeddings, y, ref_embeddings, ref_labels)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"
