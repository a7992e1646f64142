"""Few-shot protocol B: per-episode fine-tuning (P>M>F style), its steps and learning rate chosen on validation.

Starting from the same weights in every episode, a new linear head over the episode's classes (initialised as
the nearest-prototype classifier) and the chosen part of the model (``params``: everything, the backbone's last
layers, or nothing but the head) are fine-tuned by Adam on two augmented views of each support image per step,
with cross-entropy or the joint objective of the run's loss config; the queries are classified, and the
weights, buffers, train/eval modes, ``requires_grad`` flags and gradients are restored exactly.

:func:`evaluate_protocol_b_grid` evaluates a grid of :class:`Setting` ``(steps, lr)`` on the same episodes at
the cost of one run per learning rate (every step count is read off the same trajectory) and the 0-step
setting (the prototype classifier) at no fine-tuning cost; the caller keeps the setting with the best mean
on validation-class episodes.

Speed (see docs/fewshot.md and ``benchmarks/protocol_b.py``): the untouched model's features of every image
are computed once per call (prototypes, 0 steps); the frozen part of the model (the *trunk*) runs once per
image and augmented copy, in batches, and its outputs are reused by every episode, step and learning rate;
only the tuned part (the *tail*) runs per step. Tuned parameters are reset per episode from the original
tensors, which are never written to, instead of deep-copying the model. Convolutional models run
channels-last, with convolutions on small maps as matrix products (:mod:`schane.models.small_maps`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from schane.config import FINETUNE_PARAMS
from schane.engine.device import model_device
from schane.engine.optim import layer_ids
from schane.engine.seeding import sample_seed, seeded_rng
from schane.fewshot.episodes import Episode
from schane.losses import JointLoss
from schane.models.model import SCHaNeModel
from schane.models.small_maps import Handle, patch_convolutions, unpatch_convolutions
from schane.progress import progress as _progress

logger = logging.getLogger(__name__)


Fn = Callable[[torch.Tensor], torch.Tensor]


class Setting(NamedTuple):
    """One protocol-B setting: ``steps`` Adam steps at learning rate ``lr``.

    ``Setting(0, 0.0)`` is the prototype classifier (no step; the learning rate does not matter).
    """

    steps: int
    lr: float


def settings_grid(steps: int | Sequence[int], lrs: float | Sequence[float]) -> list[Setting]:
    """Every ``(steps, lr)`` pair of two grids; 0 steps appears once, first, as ``Setting(0, 0.0)``.

    Args:
        steps: step counts (a scalar is a one-value grid).
        lrs: learning rates (a scalar is a one-value grid).

    Returns:
        The settings: ``Setting(0, 0.0)`` when 0 is among ``steps``, then for each learning rate (in the
        given order) each positive step count (ascending).

    Raises:
        ValueError: on an empty grid, a negative step count or a learning rate <= 0.
    """
    steps_l = [int(s) for s in ([steps] if isinstance(steps, int) else steps)]
    lrs_l = [float(x) for x in ([lrs] if isinstance(lrs, (int, float)) else lrs)]
    if not steps_l or not lrs_l:
        raise ValueError(f"the protocol-B grid needs at least one step count and one learning rate, got {steps_l}, "
                         f"{lrs_l}")
    if any(s < 0 for s in steps_l):
        raise ValueError(f"step counts must be >= 0, got {steps_l}")
    if any(not np.isfinite(x) or x <= 0 for x in lrs_l):
        raise ValueError(f"learning rates must be > 0, got {lrs_l}")
    out = [Setting(0, 0.0)] if 0 in steps_l else []
    positive = sorted({s for s in steps_l if s > 0})
    for lr in dict.fromkeys(lrs_l):
        out += [Setting(s, lr) for s in positive]
    return out


def tuned_parameters(model: nn.Module, params: str = "all", last_layers: int = 2) -> list[str]:
    """Names of the model parameters protocol B fine-tunes (the episode's head is always tuned).

    Args:
        model: the model; parameters whose ``requires_grad`` is off are never tuned.
        params: ``"all"``; ``"last"``: the backbone's top ``last_layers`` layers as layer-wise lr decay
            numbers them (:func:`schane.engine.optim.layer_ids`: one block each, the final norm/conv head
            its own layer) plus the model's heads; ``"head"``: none (the backbone's features are frozen).
        last_layers: how many backbone layers ``"last"`` tunes.

    Returns:
        Parameter names in ``model.named_parameters()`` order.

    Raises:
        ValueError: on an unknown ``params`` or ``last_layers < 1``.
    """
    if params not in FINETUNE_PARAMS:
        raise ValueError(f"params must be one of {', '.join(FINETUNE_PARAMS)}, got {params!r}")
    if last_layers < 1:
        raise ValueError(f"last_layers must be >= 1, got {last_layers}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params == "head":
        return []
    if params == "all":
        return names

    ids, n_layers = layer_ids(model)
    first = n_layers - 1 - last_layers  # id n_layers - 1: the heads and anything above the backbone's layers
    return [n for n in names if ids[n] >= first]


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
        # skip_init: the weights are set below, and the caller's RNG is not advanced
        self.linear = nn.utils.skip_init(nn.Linear, prototypes.shape[1], prototypes.shape[0],
                                         device=prototypes.device)
        with torch.no_grad():
            self.linear.weight.copy_(2.0 * scale * prototypes)
            self.linear.bias.copy_(-scale * prototypes.pow(2).sum(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features, dim=-1))


# --------------------------------------------------------------------------- the model, split and restored


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class _Split:
    """``model.forward_features(x) == tail(trunk(x))``; no tuned parameter is in ``trunk``."""

    trunk: Fn
    tail: Fn
    name: str


def _efficientnet_split(model: nn.Module, tuned: set[str]) -> _Split | None:
    """Split a :class:`SCHaNeModel` over a timm EfficientNet before its first block with a tuned parameter."""
    from timm.models.efficientnet import EfficientNet


    bb = getattr(model, "backbone", None)
    if (type(model) is not SCHaNeModel or "forward_features" in vars(model) or type(bb) is not EfficientNet
            or bb.grad_checkpointing):
        return None
    stages = [cast(nn.Sequential, stage) for stage in bb.blocks]  # timm's EfficientNet: Sequential of Sequentials
    flat = [b for stage in stages for b in stage]
    block_of = {f"backbone.blocks.{s}.{j}.": k for k, (s, j) in
                enumerate((s, j) for s, stage in enumerate(stages) for j in range(len(stage)))}
    first = len(flat)
    for name in tuned:
        if name.startswith(("backbone.conv_stem.", "backbone.bn1.")):
            return None
        first = min([first] + [k for p, k in block_of.items() if name.startswith(p)])

    def trunk(x: torch.Tensor) -> torch.Tensor:
        x = bb.bn1(bb.conv_stem(x))
        for b in flat[:first]:
            x = b(x)
        return x

    def tail(h: torch.Tensor) -> torch.Tensor:  # timm's EfficientNet.forward_features from block `first` on
        for b in flat[first:]:
            h = b(h)
        return bb.forward_head(bb.bn2(bb.conv_head(h)), pre_logits=True)

    return _Split(trunk, tail, f"EfficientNet blocks 0-{first - 1} frozen and cached")


def _split(model: nn.Module, params: str, tuned: set[str]) -> _Split:
    features: Callable[[torch.Tensor], torch.Tensor] = cast(Any, model).forward_features  # not on nn.Module
    if params == "head":
        return _Split(features, _identity, "the whole model frozen and cached")
    if params == "last":
        split = _efficientnet_split(model, tuned)
        if split is not None:
            return split
    return _Split(_identity, features, "no frozen part cached")


def _to_cl(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


class _Tuner:
    """The model in fine-tuning state; :meth:`restore` puts back every original tensor, flag and mode.

    The original parameter tensors are never written to: tuned parameters train on working copies that
    :meth:`reset` refills from the originals before each episode, and frozen 4-D weights are channels-last
    copies when ``channels_last``.
    """

    def __init__(self, model: nn.Module, tuned: set[str], channels_last: bool) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        named = list(model.named_parameters())
        self.saved = [(p, p.data, p.requires_grad, p.grad) for _, p in named]
        self.tuned: list[nn.Parameter] = []
        self.sources: list[torch.Tensor] = []
        self.dirty = False
        self.patched: Handle = []
        try:
            model.eval()  # BatchNorm/dropout in eval mode: a few support images cannot re-estimate statistics
            for name, p in named:
                p.grad = None
                p.requires_grad_(name in tuned)
                if name in tuned:
                    self.tuned.append(p)
                    self.sources.append(p.data)
                    p.data = _to_cl(p.data.clone(), channels_last)
                elif channels_last and p.ndim == 4:
                    p.data = _to_cl(p.data, True)
            self.patched = patch_convolutions(model)
        except BaseException:
            self.restore()
            raise

    def reset(self) -> None:
        """Tuned parameters back to the original values (after a trajectory changed them)."""
        if not self.dirty:
            return
        with torch.no_grad():
            for p, src in zip(self.tuned, self.sources, strict=True):
                p.data.copy_(src)
                p.grad = None
        self.dirty = False

    def restore(self) -> None:
        unpatch_convolutions(self.patched)
        for p, data, flag, grad in self.saved:
            p.data = data
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in self.modes:
            m.training = mode


# --------------------------------------------------------------------------- trunk outputs, once per image and copy


def _seeded_item(dataset: Dataset, seed: int, i: int) -> Any:
    """``dataset[i]`` under RNGs seeded with ``seed`` (what :class:`SeededItems` draws)."""
    with seeded_rng(seed):
        return dataset[i]


class _Bank:
    """Trunk outputs of the episodes' images: the evaluation view and augmented copies, each computed once.

    Copy ``k`` of image ``i`` is the support augmentation under RNGs seeded by ``(seed, k, i)``
    (:class:`SeededItems`): step ``t`` (from 0) uses copies ``2t`` and ``2t + 1``, so every model, setting
    and episode sees the same views of an image, and the global RNG is left untouched.
    """

    def __init__(self, split: _Split, eval_dataset: Dataset, support_dataset: Dataset, *, seed: int,
                 batch_size: int, device: torch.device, channels_last: bool, cache_bytes: int) -> None:
        self.split, self.eval_ds, self.support_ds = split, eval_dataset, support_dataset
        self.seed, self.batch_size, self.device, self.cl = seed, batch_size, device, channels_last
        self.cache_bytes = cache_bytes
        self.rows: dict[tuple[int, int], torch.Tensor] = {}  # (image, copy) -> trunk output; copy -1: eval view
        self.features: dict[int, torch.Tensor] = {}  # image -> untouched model's feature (eval view)
        self.used = 0

    def _load(self, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
        xs = [(self.eval_ds[i] if k < 0 else _seeded_item(self.support_ds, sample_seed(self.seed, k, i), i))[0]
              for i, k in keys]
        return _to_cl(torch.stack(xs).to(self.device), self.cl)

    @torch.no_grad()
    def trunk(self, keys: Sequence[tuple[int, int]], store: bool = True) -> torch.Tensor:
        """``[len(keys), ...]`` trunk outputs; missing ones computed in batches (and kept if ``store``)."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        fresh: dict[tuple[int, int], torch.Tensor] = {}
        for a in range(0, len(missing), self.batch_size):
            chunk = missing[a:a + self.batch_size]
            out = self.split.trunk(self._load(chunk))
            for key, row in zip(chunk, out, strict=True):
                fresh[key] = row
                nbytes = row.numel() * row.element_size()
                if store and (key[1] < 0 or self.used + nbytes <= self.cache_bytes):
                    self.rows[key] = row
                    self.used += nbytes
        return torch.stack([self.rows[k] if k in self.rows else fresh[k] for k in keys])

    @torch.no_grad()
    def eval_features(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), d]`` features of the untouched model (evaluation view), computed once per image."""
        missing = [i for i in dict.fromkeys(ids) if i not in self.features]
        for a in range(0, len(missing), self.batch_size):
            chunk = missing[a:a + self.batch_size]
            out = self.split.tail(self.trunk([(i, -1) for i in chunk])).float()
            self.features.update(zip(chunk, out, strict=True))
        return torch.stack([self.features[i] for i in ids])

    def prefetch(self, episodes: Sequence[Episode], copies: int) -> None:
        """Compute in large batches what the episodes need: every evaluation view, then augmented copies
        (earlier copies first) while they fit in ``cache_bytes``."""
        self.eval_features(sorted({i for e in episodes for i in (*e.support, *e.query)}))
        support = sorted({i for e in episodes for i in e.support})
        keys = [(i, k) for k in range(copies) for i in support]
        for a in range(0, len(keys), self.batch_size):
            if self.used >= self.cache_bytes:
                break
            self.trunk(keys[a:a + self.batch_size])


# --------------------------------------------------------------------------- one episode, one trajectory per lr


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean().item() * 100.0)


def _run_episode(
    tuner: _Tuner,
    bank: _Bank,
    ep: Episode,
    settings: Sequence[Setting],
    *,
    criterion: JointLoss | None,
    head_scale: float,
) -> dict[Setting, float]:
    """Accuracy of every setting on one episode: one fine-tuning trajectory per learning rate."""
    device = bank.device
    tuner.reset()
    ys = torch.as_tensor(ep.support_labels, device=device)
    yq = torch.as_tensor(ep.query_labels, device=device)
    fs = F.normalize(bank.eval_features(ep.support), dim=-1)
    protos = torch.stack([fs[ys == j].mean(0) for j in range(ep.ways)])
    out: dict[Setting, float] = {}
    if any(s.steps == 0 for s in settings):
        with torch.no_grad():
            out[Setting(0, 0.0)] = _accuracy(ProtoHead(protos, head_scale)(bank.eval_features(ep.query)), yq)
    by_lr: dict[float, set[int]] = {}
    for s in settings:
        if s.steps > 0:
            by_lr.setdefault(s.lr, set()).add(s.steps)
    if not by_lr:
        return out
    n_steps = max(max(v) for v in by_lr.values())
    sup = bank.trunk([(i, k) for k in range(2 * n_steps) for i in ep.support])
    sup = sup.view(n_steps, 2 * len(ep.support), *sup.shape[1:])  # step t: copies 2t then 2t + 1
    q = bank.trunk([(i, -1) for i in ep.query])
    y2 = torch.cat([ys, ys])
    # an instance-discrimination term (SimCLR, hard-negative NT-Xent) takes image ids, not classes
    unsupervised = criterion is not None and not getattr(criterion.contrastive, "supervised", True)
    ids2 = torch.arange(len(ep.support), device=device).repeat(2) if unsupervised else None
    for lr, checkpoints in by_lr.items():
        tuner.reset()
        head = ProtoHead(protos, head_scale)
        params = [*tuner.tuned, *head.parameters()]
        # fused: one pass over each tensor per step (several times faster on a CPU than the per-op loop)
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.Adam(params, lr=lr, fused=fused)
        tuner.dirty = True
        for t in range(1, max(checkpoints) + 1):
            feats = bank.split.tail(sup[t - 1])
            logits = head(feats)
            if criterion is None:
                total = F.cross_entropy(logits, y2)
            else:
                proj = F.normalize(cast(Any, tuner.model).projector(feats), dim=-1)  # a SCHaNeModel's head
                total = criterion(logits, y2, proj, ids2).total
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if t in checkpoints:
                with torch.no_grad():
                    out[Setting(t, lr)] = _accuracy(head(bank.split.tail(q)), yq)
    return out


# --------------------------------------------------------------------------- public entry points


def _check_datasets(episodes: Sequence[Episode], support_dataset: Dataset, eval_dataset: Dataset) -> None:
    n_eval = len(cast(Sized, eval_dataset))  # torch's Dataset type declares no __len__; these are sized datasets
    if len(cast(Sized, support_dataset)) != n_eval:
        raise ValueError("support_dataset and eval_dataset must be the same split (equal lengths)")
    top = max((i for e in episodes for i in (*e.support, *e.query)), default=-1)
    if top >= n_eval:
        raise ValueError(f"episode index {top} is out of range for a split of {n_eval} images")


def evaluate_protocol_b_grid(
    model: nn.Module,
    episodes: Sequence[Episode],
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    settings: Sequence[Setting | tuple[int, float]],
    params: str = "all",
    last_layers: int = 2,
    criterion: JointLoss | None = None,
    seed: int = 0,
    head_scale: float = 10.0,
    batch_size: int = 128,
    channels_last: bool | None = None,
    cache_bytes: int = 2 << 30,
    progress: bool = True,
    desc: str = "episodes",
) -> dict[Setting, np.ndarray]:
    """Per-episode accuracy (%) of per-episode fine-tuning, for every setting of a grid.

    Per episode: the head (:class:`ProtoHead`) starts as the nearest-prototype classifier of the support
    images' evaluation-view features; each step draws two augmented views of every support image (copies
    ``2t`` and ``2t + 1``, seeded by ``(seed, copy, image)``) and updates the head and the parameters that
    ``params`` tunes (:func:`tuned_parameters`) with Adam; the queries' evaluation views are classified.
    Settings with the same learning rate share one trajectory (the accuracy is read after each listed step
    count), so a grid costs one run per learning rate. ``Setting(0, 0.0)`` needs no fine-tuning.

    Args:
        model: a model with ``forward_features(x[B, 3, H, W]) -> [B, d]`` (and ``projector(features)`` for a
            joint ``criterion``), on the device it should run on; restored exactly on return and on error.
        episodes: the episodes.
        support_dataset: the split with the support augmentation (random transform on each access).
        eval_dataset: the same split with the evaluation transform.
        settings: the :class:`Setting` ``(steps, lr)`` values (from :func:`settings_grid`).
        params: which model parameters are tuned: ``"all"``, ``"last"`` or ``"head"`` (:func:`tuned_parameters`).
        last_layers: the backbone layers ``"last"`` tunes.
        criterion: ``None`` for cross-entropy, or the joint objective (a :class:`~schane.losses.JointLoss`,
            e.g. ``build_criterion(cfg.loss).joint``) on the head's logits and the normalised
            ``model.projector`` outputs of the two views (with ``"head"`` the contrastive term is constant).
        seed: augmentation seed.
        head_scale: logit scale of the prototype head.
        batch_size: images per forward pass of the frozen part.
        channels_last: run 4-D weights and inputs channels-last (default: when the model has a ``Conv2d``).
        cache_bytes: memory for the frozen part's outputs of augmented copies (beyond it they are computed per
            episode).
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        ``{Setting: accuracies[len(episodes)]}`` in percent, for every setting.

    Raises:
        ValueError: on an invalid setting or ``params``, or datasets that do not fit the episodes.
    """
    grid = [Setting(int(s), float(lr) if int(s) > 0 else 0.0) for s, lr in settings]
    if not grid or any(s.steps < 0 or (s.steps > 0 and not s.lr > 0) for s in grid):
        raise ValueError(f"settings must be (steps >= 0, lr > 0) pairs, got {list(settings)}")
    grid = list(dict.fromkeys(grid))
    _check_datasets(episodes, support_dataset, eval_dataset)
    tuned = set(tuned_parameters(model, params, last_layers))
    cl = any(isinstance(m, nn.Conv2d) for m in model.modules()) if channels_last is None else channels_last
    tuner = _Tuner(model, tuned, cl)
    try:
        split = _split(model, params, tuned)
        logger.debug("protocol B: %d tuned parameter tensors (%s); %s", len(tuned), params, split.name)
        bank = _Bank(split, eval_dataset, support_dataset, seed=seed, batch_size=batch_size,
                     device=model_device(model), channels_last=cl, cache_bytes=cache_bytes)
        bank.prefetch(episodes, 2 * max(s.steps for s in grid))
        accs: dict[Setting, list[float]] = {s: [] for s in grid}
        for ep in _progress(episodes, desc=desc, enabled=progress):
            for s, a in _run_episode(tuner, bank, ep, grid, criterion=criterion, head_scale=head_scale).items():
                accs[s].append(a)
    finally:
        tuner.restore()
    return {s: np.asarray(a, dtype=np.float64) for s, a in accs.items()}


def evaluate_protocol_b(
    model: nn.Module,
    episodes: Sequence[Episode],
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    **kwargs: Any,
) -> np.ndarray:
    """Per-episode accuracy (%) of one setting (see :func:`evaluate_protocol_b_grid`).

    Args:
        model, episodes, support_dataset, eval_dataset: see :func:`evaluate_protocol_b_grid`.
        steps: optimisation steps (0: the prototype classifier alone).
        lr: Adam learning rate.
        **kwargs: the other options of :func:`evaluate_protocol_b_grid`.

    Returns:
        ``[len(episodes)]`` accuracies in percent.

    Raises:
        ValueError: as :func:`evaluate_protocol_b_grid`.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    setting = Setting(steps, lr if steps > 0 else 0.0)
    return evaluate_protocol_b_grid(model, episodes, support_dataset, eval_dataset, settings=[setting],
                                    **kwargs)[setting]


def finetune_episode(
    model: nn.Module,
    episode: Episode,
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    **kwargs: Any,
) -> float:
    """Fine-tune on one episode's support set, classify its queries, restore the model.

    Args:
        model, episode, support_dataset, eval_dataset, steps, lr: see :func:`evaluate_protocol_b`.
        **kwargs: the other options of :func:`evaluate_protocol_b_grid` (``progress`` is off).

    Returns:
        Query accuracy in percent.

    Raises:
        ValueError: as :func:`evaluate_protocol_b_grid`.
    """
    kwargs.setdefault("progress", False)
    return float(evaluate_protocol_b(model, [episode], support_dataset, eval_dataset, steps=steps, lr=lr,
                                     **kwargs)[0])


__all__ = [
    "FINETUNE_PARAMS",
    "ProtoHead",
    "Setting",
    "evaluate_protocol_b",
    "evaluate_protocol_b_grid",
    "finetune_episode",
    "settings_grid",
    "tuned_parameters",
]
