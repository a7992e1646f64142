"""SCHaNe in Lightning: a ``LightningModule`` with λ·SCHaNe + (1 − λ)·CE on two-view batches.

:class:`SCHaNeModule` takes any backbone that maps images ``[B, 3, H, W]`` to pooled features ``[B, d]`` (a timm
model with ``num_classes=0``, a :class:`schane.models.hf.HFBackbone`, a torchvision trunk) and adds the linear
classifier and the projection head. Batches are ``(x, y)`` from
:class:`~schane.integrations.views.TwoViewCollator` with ``as_dict=False``: ``x [2B, 3, H, W]`` = first views then
second views, ``y [2B]``. Under Lightning's DDP strategies the contrastive term sees every rank's embeddings and
labels through schane's differentiable all-gather (the value on one rank is the number of ranks times its share,
so DDP's gradient averaging gives exactly the gradient of one process on the whole batch); CE stays per rank.
``train/loss``, ``train/schane`` and ``train/ce`` are logged (averaged over ranks), and ``val/loss``, ``val/acc``
on single-view validation batches.

To add SCHaNe to a module you already have, subclass :class:`SCHaNeModule` and override
``configure_optimizers`` or ``forward_features``.

Examples:
    >>> import lightning.pytorch as pl, timm
    >>> module = SCHaNeModule(timm.create_model("resnet18", num_classes=0), num_classes=10)  # doctest: +SKIP
    >>> pl.Trainer(max_epochs=10, strategy="ddp").fit(module, two_view_loader)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from schane.engine.optim import param_groups_layer_decay

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("schane.integrations.lightning needs lightning: pip install 'schane[lightning]'") from None

from schane.distributed import is_distributed, world_size
from schane.integrations.views import TwoViewCollator, TwoViewTransform
from schane.losses import JointLoss, SCHaNeLoss
from schane.models.heads import ProjectionHead, linear_classifier


def _num_features(backbone: nn.Module) -> int:
    n = getattr(backbone, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    raise ValueError(f"{type(backbone).__name__} has no integer num_features: pass num_features=d (the size of "
                     "the pooled feature the backbone returns)")


class SCHaNeModule(pl.LightningModule):
    """Backbone + linear classifier + projection head trained with λ·SCHaNe + (1 − λ)·CE.

    Args:
        backbone: images ``[B, 3, H, W]`` → pooled features ``[B, d]``.
        num_classes: classifier outputs ``C``.
        num_features: ``d``; ``None`` reads ``backbone.num_features`` (timm, schane backbones).
        proj_dim: projection size (128).
        lam: weight of the contrastive term (0.9).
        temperature: τ (0.5).
        beta: hard-negative concentration β (1.0).
        lr: AdamW learning rate of the heads (the backbone's layers get ``lr * layer_decay**depth`` when
            ``layer_decay`` is set and the backbone has a timm ``group_matcher``).
        weight_decay: AdamW weight decay (not on norms, biases, tokens).
        layer_decay: layer-wise lr decay in ``(0, 1]``, or ``None``.
        gather_distributed: contrast against every rank's embeddings under DDP.

    Raises:
        ValueError: for sizes that are not positive or hyper-parameters out of range.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, num_features: int | None = None, proj_dim: int = 128,
                 lam: float = 0.9, temperature: float = 0.5, beta: float = 1.0, lr: float = 1e-3,
                 weight_decay: float = 0.05, layer_decay: float | None = None, gather_distributed: bool = True) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("proj_dim", proj_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        d = num_features if num_features is not None else _num_features(backbone)
        self.backbone = backbone
        self.classifier = linear_classifier(d, num_classes)
        self.projector = ProjectionHead(d, proj_dim)
        self.contrastive = SCHaNeLoss(temperature=temperature, beta=beta)
        self.criterion = JointLoss(self.contrastive, lam=lam)
        self.lr, self.weight_decay, self.layer_decay = float(lr), float(weight_decay), layer_decay
        self.gather_distributed = bool(gather_distributed)
        self.save_hyperparameters(ignore=["backbone"])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, d]`` of images ``[B, 3, H, W]``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]``."""
        return self.classifier(self.forward_features(x))

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            x, y = batch["pixel_values"], batch["labels"]
        else:
            x, y = batch[0], batch[1]
        if x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected images [N, 3, H, W] and labels [N] (N = 2B two-view rows from "
                             f"TwoViewCollator), got {tuple(x.shape)} and {tuple(y.shape)}")
        return x, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """λ·SCHaNe + (1 − λ)·CE on ``x [2B, 3, H, W]``, ``y [2B]``."""
        x, y = self._unpack(batch)
        feats = self.forward_features(x)
        self.contrastive.gather_distributed = self.gather_distributed and is_distributed() and world_size() > 1
        out = self.criterion(self.classifier(feats), y, self.projector(feats))
        n = x.shape[0]
        self.log("train/loss", out.total, batch_size=n, sync_dist=True)
        if out.contrastive is not None:
            self.log("train/schane", out.contrastive, batch_size=n, sync_dist=True)
        if out.ce is not None:
            self.log("train/ce", out.ce, batch_size=n, sync_dist=True)
        return out.total

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """CE and top-1 accuracy on single-view batches."""
        x, y = self._unpack(batch)
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits.float(), y), batch_size=len(y), sync_dist=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; with ``layer_decay``, schane's layer-wise groups (:func:`schane.engine.optim.param_groups_layer_decay`)."""

        if self.layer_decay is None:
            decay = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
            rest = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
            groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": self.weight_decay}, {"params": rest, "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=self.lr)
        heads = nn.ModuleDict({"backbone": self.backbone, "classifier": self.classifier, "projector": self.projector})
        groups = param_groups_layer_decay(heads, self.weight_decay, self.layer_decay)
        for g in groups:
            g["lr"] = self.lr * g["lr_scale"]
        return torch.optim.AdamW(groups, lr=self.lr)


__all__ = ["SCHaNeModule", "TwoViewCollator", "TwoViewTransform"]
