"""schane.losses: pure tensor contrastive losses (no dependency on the rest of schane).

Every loss takes ``embeddings[N, D]`` (views concatenated along N), ``labels[N]`` and optional
``ref_embeddings[M, D]``/``ref_labels[M]`` (extra contrast samples, e.g. a memory queue), works in log space
with float32 (or float64) similarities whatever the input dtype, and supports ``gather_distributed`` and
``chunk_size``. The dense per-block work runs eagerly or, with ``backend="compile"`` (or the environment variable
``SCHANE_LOSS_BACKEND=compile``), through ``torch.compile``.

Every loss is a :class:`PairwiseContrastiveLoss` (``base.py``: the shared settings and ``forward`` plumbing)
with a functional form. :mod:`schane.losses.reference` states each loss as its plain float64 formula (the
tests' oracle); it is not imported here, so importing the losses does not load it.

Example:
    >>> import torch
    >>> from schane.losses import build_contrastive_loss
    >>> loss_fn = build_contrastive_loss("schane", temperature=0.5, beta=1.0)
    >>> loss = loss_fn(torch.randn(8, 16), torch.tensor([0, 1, 0, 1, 2, 2, 3, 3]))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._validation import check_positive_mode
from .base import PairwiseContrastiveLoss
from .joint import JointLoss, JointLossOutput
from .ntxent import HardNegativeNTXentLoss, NTXentLoss, hard_negative_ntxent_loss, ntxent_loss, two_view_ids
from .schane import SCHaNeLoss, schane_loss
from .supcon import SupConLoss, supcon_loss

CONTRASTIVE_LOSSES = ("schane", "supcon", "simclr", "hcl")


def build_contrastive_loss(
    name: str,
    *,
    temperature: float | None = None,
    beta: float = 1.0,
    positive_mode: str = "mean",
    tau_plus: float = 0.1,
    gather_distributed: bool = False,
    chunk_size: int | None = None,
    normalize: bool = True,
    detach_weights: bool = False,
    backend: str | None = None,
) -> nn.Module:
    """Build a contrastive loss by name.

    Args:
        name: ``"schane"``, ``"supcon"``, ``"simclr"`` (NT-Xent) or ``"hcl"`` (hard-negative NT-Xent).
        temperature: ``tau``; ``None`` = the loss's default (0.5, SupCon 0.1).
        beta: hard-negative concentration (schane, hcl; ignored otherwise).
        positive_mode: ``"mean"`` or ``"each"`` (schane only).
        tau_plus: false-negative prior (hcl only).
        gather_distributed: contrast against all ranks' embeddings.
        chunk_size: anchor rows per chunk, ``None`` = unchunked.
        normalize: L2-normalise embeddings.
        detach_weights: constant hard-negative weights in backward (schane only).
        backend: block kernels, ``"eager"`` or ``"compile"``; ``None`` = ``$SCHANE_LOSS_BACKEND``, else eager.

    Returns:
        The loss module; its class attribute ``supervised`` says whether labels are classes or instance ids.

    Raises:
        ValueError: on an unknown name or bad hyper-parameters.
    """
    common: dict[str, Any] = {
        "normalize": normalize,
        "gather_distributed": gather_distributed,
        "chunk_size": chunk_size,
        "backend": backend,
    }
    if temperature is not None:
        common["temperature"] = temperature
    if name == "schane":
        return SCHaNeLoss(
            beta=beta,
            positive_mode=check_positive_mode(positive_mode),
            detach_weights=detach_weights,
            **common,
        )
    if name == "supcon":
        return SupConLoss(**common)
    if name == "simclr":
        return NTXentLoss(**common)
    if name == "hcl":
        return HardNegativeNTXentLoss(beta=beta, tau_plus=tau_plus, **common)
    raise ValueError(f"unknown contrastive loss {name!r}; choose one of {', '.join(CONTRASTIVE_LOSSES)}")


__all__ = [
    "CONTRASTIVE_LOSSES",
    "HardNegativeNTXentLoss",
    "JointLoss",
    "JointLossOutput",
    "NTXentLoss",
    "PairwiseContrastiveLoss",
    "SCHaNeLoss",
    "SupConLoss",
    "build_contrastive_loss",
    "hard_negative_ntxent_loss",
    "ntxent_loss",
    "schane_loss",
    "supcon_loss",
    "two_view_ids",
]
