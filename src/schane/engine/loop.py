"""The training loop in parts: one step, one epoch.

:class:`TrainParts` holds what a step touches (model, optimizer, schedule, scaler, EMA, objective, memory
queue); :func:`train_step` runs one micro-step (two views through the model, the joint loss, backward) and,
at the end of an accumulation group, :func:`optimizer_step`; :func:`train_one_epoch` walks one epoch's
batches. What goes into a checkpoint and when it is written is :class:`schane.engine.checkpoint.CheckpointManager`'s
business; configuration, data and model set-up are the pipeline's (:mod:`schane.pipelines.train`).

One optimizer step sees ``batch_size`` images per process and micro-step (two augmented views each, so
the model runs on ``2 * batch_size`` inputs), ``accum_steps`` micro-steps and every process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from schane.distributed import DistInfo, gather_no_grad
from schane.engine.criterion import Criterion
from schane.engine.device import autocast
from schane.engine.ema import ModelEMA
from schane.engine.run_log import Throughput
from schane.memory import EmbeddingQueue
from schane.progress import progress_bar


@dataclass
class TrainParts:
    """Everything one training step reads or updates.

    Attributes:
        model: the module called in the step (a ``DistributedDataParallel`` wrapper under DDP).
        raw_model: the unwrapped :class:`~schane.models.SCHaNeModel` (checkpoints, EMA, evaluation).
        optimizer: the optimizer.
        scheduler: per-step learning-rate schedule.
        scaler: ``GradScaler`` (enabled for fp16 only).
        criterion: the joint objective (:func:`schane.engine.criterion.build_criterion`).
        device: where the step runs.
        amp_dtype: autocast dtype, or ``None`` for fp32.
        info: process-group facts.
        ema: EMA of the weights, or ``None``.
        queue: memory queue of past projections, or ``None``.
        accum_steps: micro-steps per optimizer step.
        clip_grad: gradient-norm clip, or ``None``.
        channels_last: feed the model channels-last inputs.
    """

    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: Criterion
    device: torch.device
    amp_dtype: torch.dtype | None
    info: DistInfo = field(default_factory=DistInfo)
    ema: ModelEMA | None = None
    queue: EmbeddingQueue | None = None
    accum_steps: int = 1
    clip_grad: float | None = None
    channels_last: bool = False

    @property
    def lr(self) -> float:
        """The current base learning rate (the first group's, without its layer-decay scale)."""
        g = self.optimizer.param_groups[0]
        return g["lr"] / g.get("lr_scale", 1.0)


@dataclass
class StepInfo:
    """What :func:`train_one_epoch` reports after every optimizer step."""

    epoch: int
    global_step: int
    batch_in_epoch: int
    loss: float
    ce: float | None
    contrastive: float | None
    lr: float
    images_per_s: float


@dataclass
class EpochStats:
    """Running means of one epoch's micro-steps; ``stopped_at``: the batch after which a stop request ended
    the epoch early (``None``: the epoch ran to its end)."""

    loss: float = 0.0
    ce: float = 0.0
    contrastive: float = 0.0
    correct: int = 0
    seen: int = 0
    n: int = 0
    stopped_at: int | None = None

    def record(self) -> dict[str, float]:
        """``train_loss``, ``train_ce``, ``train_contrastive``, ``train_acc`` (empty before any step)."""
        if not self.n:
            return {}
        return {
            "train_loss": self.loss / self.n,
            "train_ce": self.ce / self.n,
            "train_contrastive": self.contrastive / self.n,
            "train_acc": self.correct / max(self.seen, 1),
        }


def _item(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def train_step(parts: TrainParts, views: Iterable[torch.Tensor], labels: torch.Tensor, ids: torch.Tensor,
               *, group_size: int, sync: bool) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One micro-step: forward both views, the joint loss, ``backward`` of ``loss / group_size``.

    Args:
        parts: the training state.
        views: the two augmented views, each ``[B, 3, H, W]``.
        labels: ``[B]`` class labels.
        ids: ``[B]`` dataset indices (instance ids for unsupervised contrastive losses).
        group_size: micro-steps in this accumulation group (the loss is divided by it).
        sync: whether DDP reduces gradients in this micro-step (the last of its group).

    Returns:
        ``(JointLossOutput, logits[2B, C], labels[2B])``.
    """
    x = torch.cat(list(views)).to(parts.device, non_blocking=True)
    if parts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = labels.to(parts.device).repeat(2)
    has_contrastive = parts.criterion.contrastive is not None
    # what the contrastive term calls "the same class": the labels (supervised losses) or the image (SimCLR-style)
    pair_labels = y if parts.criterion.supervised else ids.to(parts.device).repeat(2)
    queued_embeddings = queued_labels = None
    if parts.queue is not None and len(parts.queue) > 0:
        queued_embeddings, queued_labels = parts.queue.get()
        queued_embeddings, queued_labels = queued_embeddings.to(parts.device), queued_labels.to(parts.device)
    no_sync = parts.info.distributed and not sync
    # no_sync only under DDP, where parts.model is the DistributedDataParallel wrapper
    with cast(DistributedDataParallel, parts.model).no_sync() if no_sync else contextlib.nullcontext():
        with autocast(parts.device, parts.amp_dtype):
            out = parts.model(x)
        projections = out.projections.float() if has_contrastive else None
        res = parts.criterion.joint(out.logits.float(), y, projections,
                                    pair_labels if projections is not None else None,
                                    queued_embeddings, queued_labels)
        parts.scaler.scale(res.total / group_size).backward()
    if parts.queue is not None:
        assert projections is not None  # a queue is only built for a contrastive term
        parts.queue.enqueue(gather_no_grad(projections.detach()), gather_no_grad(pair_labels))
    return res, out.logits.detach(), y


def optimizer_step(parts: TrainParts) -> None:
    """Clip (optionally), step the optimizer and the schedule, clear gradients, update the EMA."""
    if parts.clip_grad is not None:
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.raw_model.parameters(), parts.clip_grad)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    if parts.ema is not None:
        parts.ema.update(parts.raw_model)


def train_one_epoch(
    parts: TrainParts,
    loader: Iterable[tuple[Any, torch.Tensor, torch.Tensor]],
    *,
    epoch: int,
    n_batches: int,
    first_batch: int = 0,
    global_step: int = 0,
    batch_size: int,
    on_step: Callable[[StepInfo], None] | None = None,
    throughput: Throughput | None = None,
    progress: bool = False,
    bars: bool = True,
    log_every: int | None = None,
    desc: str = "",
    stop: Callable[[], bool] | None = None,
) -> tuple[EpochStats, int]:
    """Train on the batches of one epoch (from ``first_batch`` on, e.g. after a mid-epoch resume).

    Args:
        parts: the training state.
        loader: yields ``((view1[B, 3, H, W], view2[B, 3, H, W]), labels[B], ids[B])`` for batches
            ``first_batch .. n_batches - 1``.
        epoch: the epoch (0-based).
        n_batches: micro-batches in the epoch (a multiple of ``accum_steps`` except the last group).
        first_batch: index of the first batch ``loader`` yields.
        global_step: optimizer steps taken before this epoch's first batch.
        batch_size: images per process and micro-step (for the throughput).
        on_step: called after every optimizer step with a :class:`StepInfo`.
        throughput: accumulates images per second across epochs (a fresh one when ``None``).
        progress: report progress: a bar on a terminal, else a log line every quarter epoch (at least every
            25 batches).
        bars: allow the bar (``False``: log lines even on a terminal).
        log_every: batches between log lines (default: a quarter epoch, at least 25).
        desc: the bar's label.
        stop: asked after every optimizer step except the epoch's last (collective under DDP); ``True`` ends
            the epoch there and sets ``stats.stopped_at``.

    Returns:
        ``(stats, global_step)`` at the end of the epoch.

    Raises:
        FloatingPointError: when the loss is not finite after a step.
    """
    parts.model.train()
    accum = parts.accum_steps
    stats = EpochStats()
    tp = throughput if throughput is not None else Throughput()
    # in a log file: a line every quarter epoch (at most every 25 batches), the caller logs the epoch's end
    bar = progress_bar(n_batches, desc=desc, enabled=progress, initial=first_batch, log=True,
                       log_every=log_every or max(25, math.ceil(n_batches / 4)), log_end=False, bar=bars)
    tp.start()
    try:
        for b, (views, labels, ids) in enumerate(loader, start=first_batch):
            group_start = (b // accum) * accum
            group_size = min(accum, n_batches - group_start)
            is_step = b + 1 == group_start + group_size
            res, logits, y = train_step(parts, views, labels, ids, group_size=group_size, sync=is_step)
            stats.loss += float(res.total.detach())
            stats.ce += _item(res.ce) or 0.0
            stats.contrastive += _item(res.contrastive) or 0.0
            stats.correct += int((logits.argmax(1) == y).sum())
            stats.seen += y.numel()
            stats.n += 1
            if is_step:
                optimizer_step(parts)
                global_step += 1
                tp.stop(group_size * batch_size * parts.info.world_size)
                loss_now = float(res.total.detach())
                if not math.isfinite(loss_now):
                    raise FloatingPointError(
                        f"loss is {loss_now} at epoch {epoch} step {global_step}; lower optim.lr or use train.amp=none"
                    )
                if on_step is not None:
                    on_step(StepInfo(epoch, global_step, b + 1, loss_now, _item(res.ce), _item(res.contrastive),
                                     parts.lr, tp.value))
                tp.start()
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss / stats.n:.3f}", acc=f"{stats.correct / max(stats.seen, 1):.3f}",
                            img_s=f"{tp.value:.1f}")
            if is_step and b + 1 < n_batches and stop is not None and stop():
                stats.stopped_at = b + 1
                break
    finally:
        close = getattr(loader, "close", None)  # a generator such as engine.batches.loader_batches
        if callable(close):
            close()
    bar.close()
    tp.stop(0)
    return stats, global_step


__all__ = ["EpochStats", "StepInfo", "TrainParts", "optimizer_step", "train_one_epoch", "train_step"]
