"""Few-shot protocol B: per-episode fine-tuning (P>M>F style).

Starting from the same weights in every episode, the model plus a new linear head over the episode's
classes (initialised as the nearest-prototype classifier) is fine-tuned for a few Adam steps on the support
set, with cross-entropy or the joint objective of the run's loss config (two augmented views of each support
image give every anchor a positive even at 1-shot); the queries are classified, and the weights, buffers,
train/eval mode and ``requires_grad`` flags are restored exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from schane.engine.utils import model_device, sample_seed, seeded_rng
from schane.fewshot.episodes import Episode
from schane.losses import JointLoss
from schane.progress import progress as _progress


def _stack(ds: Dataset, ids: Sequence[int]) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in ids])


class ProtoHead(nn.Module):
    """Linear head on L2-normalised features, initialised from class prototypes.

    With ``c_j`` the mean normalised feature of class ``j``, ``W_j = 2·s·c_j`` and
    ``b_j = −s·‖c_j‖²``, so ``logit_j = s·(‖f‖² − ‖f − c_j‖²)``: before any step the head is
    the nearest-prototype classifier, scaled by ``s``.

    Args:
        prototypes: ``[N, d]`` class means of normalised support features.
        scale: the logit scale ``s``.
    """

    def __init__(self, prototypes: torch.Tensor, scale: float = 10.0) -> None:
        super().__init__()
        self.linear = nn.Linear(prototypes.shape[1], prototypes.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(2.0 * scale * prototypes)
            self.linear.bias.copy_(-scale * prototypes.pow(2).sum(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features, dim=-1))


def finetune_episode(
    model: nn.Module,
    episode: Episode,
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    criterion: JointLoss | None = None,
    head_scale: float = 10.0,
) -> float:
    """Fine-tune on one episode's support set, classify its queries, restore the model.

    Every step draws two fresh augmented views of each support image (``support_dataset``
    applies a random transform on each access). BatchNorm/dropout stay in eval mode: a few
    support images cannot re-estimate normalisation statistics. The prototype head
    (:class:`ProtoHead`, from the evaluation views of the support images) and all model
    parameters with ``requires_grad`` are updated by Adam.

    Args:
        model: a model whose ``forward(x)`` returns an object with ``features[B, d]`` and
            ``projections[B, p]`` and which has ``forward_features(x) -> [B, d]``.
        episode: the episode.
        support_dataset: the split with the support augmentation.
        eval_dataset: the same split with the evaluation transform.
        steps: optimisation steps (0: the prototype classifier alone).
        lr: Adam learning rate.
        criterion: ``None`` for cross-entropy, or the joint objective (a
            :class:`~schane.losses.JointLoss`, e.g. ``build_criterion(cfg.loss).joint``) applied to the
            head's logits and the model's projections of the two views.
        head_scale: logit scale of the prototype head.

    Returns:
        Query accuracy in percent.

    Raises:
        ValueError: on ``steps < 0``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = model_device(model)
    saved_state = copy.deepcopy(model.state_dict())
    saved_mode = [(m, m.training) for m in model.modules()]
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    ys = torch.as_tensor(episode.support_labels, device=device)
    yq = torch.as_tensor(episode.query_labels, device=device)
    try:
        model.eval()
        with torch.no_grad():
            fs = model.forward_features(_stack(eval_dataset, episode.support).to(device))
            fs = F.normalize(fs.float(), dim=-1)
            protos = torch.stack([fs[ys == j].mean(0) for j in range(episode.ways)])
        head = ProtoHead(protos, scale=head_scale).to(device)
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        y2 = torch.cat([ys, ys])
        # an instance-discrimination term (SimCLR, hard-negative NT-Xent) takes image ids, not classes
        unsupervised = criterion is not None and not getattr(criterion.contrastive, "supervised", True)
        cl = torch.arange(len(ys), device=device).repeat(2) if unsupervised else None
        for _ in range(steps):
            x = torch.cat([_stack(support_dataset, episode.support), _stack(support_dataset, episode.support)]).to(device)
            if criterion is None:
                logits = head(model.forward_features(x))
                total = F.cross_entropy(logits, y2)
            else:
                out = model(x)
                total = criterion(head(out.features), y2, out.projections, cl).total
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        with torch.no_grad():
            pred = head(model.forward_features(_stack(eval_dataset, episode.query).to(device))).argmax(1)
        return float((pred == yq).float().mean().item() * 100.0)
    finally:
        model.load_state_dict(saved_state)
        for m, mode in saved_mode:
            m.training = mode
        for p, flag in saved_grad:
            p.requires_grad_(flag)
            p.grad = None


def evaluate_protocol_b(
    model: nn.Module,
    episodes: Sequence[Episode],
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    criterion: JointLoss | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "episodes",
) -> np.ndarray:
    """Per-episode accuracy (%) of per-episode fine-tuning (see :func:`finetune_episode`).

    Episode ``i``'s augmentations are drawn under torch and Python RNGs seeded by
    ``(seed, i)`` (the caller's RNG states are restored), so every model sees the same
    augmented views when images are loaded in the main process.

    Args:
        model: the model (restored after every episode).
        episodes: the episodes, evaluated in order.
        support_dataset: the split with the support augmentation.
        eval_dataset: the same split with the evaluation transform.
        steps, lr, criterion: see :func:`finetune_episode`.
        seed: augmentation seed.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        ``[len(episodes)]`` accuracies in percent.

    Raises:
        ValueError: as :func:`finetune_episode`.
    """
    accs = []
    for i, ep in enumerate(_progress(episodes, desc=desc, enabled=progress)):
        with seeded_rng(sample_seed(seed, i)):
            accs.append(
                finetune_episode(model, ep, support_dataset, eval_dataset, steps=steps, lr=lr, criterion=criterion)
            )
    return np.asarray(accs, dtype=np.float64)


__all__ = ["ProtoHead", "evaluate_protocol_b", "finetune_episode"]
