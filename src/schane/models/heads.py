"""Heads on the pooled backbone feature: a linear classifier and the contrastive projection head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear(d, d) → ReLU → Linear(d, proj_dim), output L2-normalised (as in the SCHaNe release).

    Args:
        in_dim: pooled feature size ``d``.
        proj_dim: output size (128 in the paper).
        hidden_dim: hidden size (defaults to ``in_dim``).

    Raises:
        ValueError: when a size is not positive.

    Examples:
        >>> head = ProjectionHead(16, 8)
        >>> head(torch.randn(4, 16)).norm(dim=1)  # doctest: +SKIP
        tensor([1., 1., 1., 1.])
    """

    def __init__(self, in_dim: int, proj_dim: int = 128, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        for nm, v in (("in_dim", in_dim), ("proj_dim", proj_dim), ("hidden_dim", hidden_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ProjectionHead: {nm} must be a positive integer, got {v!r}")
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project and normalise.

        Args:
            x: pooled features ``[B, in_dim]``.

        Returns:
            Unit-norm projections ``[B, proj_dim]``.
        """
        return F.normalize(self.fc2(self.act(self.fc1(x))), dim=-1, eps=1e-12)


def linear_classifier(in_dim: int, num_classes: int) -> nn.Linear:
    """Linear classifier ``[B, in_dim] -> [B, num_classes]`` (small truncated-normal init, zero bias).

    Raises:
        ValueError: when a size is not positive.
    """
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_dim, int) or in_dim <= 0:
        raise ValueError(f"in_dim must be a positive integer, got {in_dim!r}")
    layer = nn.Linear(in_dim, num_classes)
    nn.init.trunc_normal_(layer.weight, std=0.02, a=-0.04, b=0.04)
    nn.init.zeros_(layer.bias)
    return layer
