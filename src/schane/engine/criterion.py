"""The training objective built from a :class:`~schane.config.LossConfig`: the one loss builder.

Training (:mod:`schane.engine.loop`) and per-episode fine-tuning (few-shot protocol B) both call
:func:`build_criterion`, so a run trained with, say, ``loss.positive_mode=each`` is fine-tuned per episode
with the same loss.

Example:
    >>> from schane.config import LossConfig
    >>> criterion = build_criterion(LossConfig(name="schane", lam=0.9))
    >>> criterion.joint.lam, criterion.supervised
    (0.9, True)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from schane.config import LossConfig
from schane.losses import JointLoss, build_contrastive_loss


@dataclass
class Criterion:
    """``lam * contrastive + (1 - lam) * CE`` and what the training step needs to know about it.

    Attributes:
        joint: the :class:`~schane.losses.JointLoss` (CE only when ``contrastive`` is ``None``).
        contrastive: the contrastive loss module, or ``None`` for ``loss.name=ce``.
        supervised: whether the contrastive term takes class labels (``False``: instance ids, e.g. SimCLR).
    """

    joint: JointLoss
    contrastive: nn.Module | None

    @property
    def supervised(self) -> bool:
        return bool(getattr(self.contrastive, "supervised", True))


def build_criterion(loss_cfg: LossConfig, *, gather_distributed: bool = False) -> Criterion:
    """Build the joint objective of ``loss_cfg``.

    Args:
        loss_cfg: ``name`` (``ce`` or a contrastive loss of :data:`schane.losses.CONTRASTIVE_LOSSES`),
            ``lam``, ``temperature``, ``beta``, ``positive_mode``, ``tau_plus``, ``chunk_size``.
        gather_distributed: contrast against every rank's embeddings (only meaningful inside a process
            group; ``loss_cfg.gather_distributed`` is the user's wish, the caller decides whether it applies).

    Returns:
        A :class:`Criterion`.

    Raises:
        ValueError: on an unknown loss name or invalid hyper-parameters.
    """
    if loss_cfg.name == "ce":
        return Criterion(JointLoss(None), None)
    contrastive = build_contrastive_loss(
        loss_cfg.name,
        temperature=loss_cfg.temperature,
        beta=loss_cfg.beta,
        positive_mode=loss_cfg.positive_mode,
        tau_plus=loss_cfg.tau_plus,
        gather_distributed=gather_distributed,
        chunk_size=loss_cfg.chunk_size,
    )
    return Criterion(JointLoss(contrastive, lam=loss_cfg.lam), contrastive)


__all__ = ["Criterion", "build_criterion"]
