"""Evaluation: top-1/top-5 accuracy and CE loss, validation with model selection, feature extraction.

Examples:
    >>> metrics = evaluate(model, dataset, batch_size=128)  # doctest: +SKIP
    >>> feats, labels = extract_features(model, dataset, batch_size=128)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from schane.engine.device import model_device, uses_channels_last
from schane.progress import progress as _progress


def _as_loader(data: DataLoader | Dataset, batch_size: int, num_workers: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, Dataset):
        raise ValueError(f"expected a DataLoader or a Dataset, got {type(data).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _input_format(model: nn.Module, channels_last: bool | None) -> torch.memory_format:
    use = uses_channels_last(model) if channels_last is None else channels_last
    return torch.channels_last if use else torch.contiguous_format


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader | Dataset,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    channels_last: bool | None = None,
) -> dict[str, float]:
    """Top-1, top-5 accuracy and mean cross-entropy of ``model``'s logits.

    Args:
        model: an ``SCHaNeModel`` (``forward(x) -> ModelOutput`` with ``.logits[B, C]``) or any
            module returning logits ``[B, C]``.
        loader: yields ``(images[B, 3, H, W], labels[B])``; a ``Dataset`` is wrapped in a
            sequential ``DataLoader`` of ``batch_size``.
        device: where to run; defaults to the model's device.
        amp_dtype: autocast dtype, or ``None`` for fp32.
        batch_size: used only when ``loader`` is a ``Dataset``.
        num_workers: used only when ``loader`` is a ``Dataset``.
        progress: show a progress bar on a terminal.
        channels_last: feed channels-last inputs; ``None``: when the model's convolutions are stored so.

    Returns:
        ``{"top1", "top5", "loss", "n"}``; top-5 is top-min(5, C). Accuracies are fractions in [0, 1].

    Raises:
        ValueError: when the data is empty or labels exceed the classifier's width.
    """
    logits, labels = predict_logits(model, loader, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress, channels_last=channels_last)
    return classification_metrics(logits, labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"top1", "top5", "loss", "n"}`` of logits ``[N, C]`` against labels ``[N]`` (top-5: top-min(5, C)).

    Raises:
        ValueError: when there are no rows.
    """
    n = int(labels.numel())
    if n == 0:
        raise ValueError("evaluation data is empty; check the split and the dataset root")
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = topk == labels[:, None]
    return {"top1": int(hit[:, 0].sum()) / n, "top5": int(hit.any(1).sum()) / n,
            "loss": float(F.cross_entropy(logits, labels, reduction="sum")) / n, "n": n}


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: DataLoader | Dataset,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    channels_last: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits for every item, in order (arguments as :func:`evaluate`).

    Returns:
        ``(logits[N, C] float32 on CPU, labels[N] int64 on CPU)``.

    Raises:
        ValueError: when labels exceed the classifier's width.
    """
    dl = _as_loader(loader, batch_size, num_workers)
    dev = torch.device(device) if device is not None else model_device(model)
    fmt = _input_format(model, channels_last)
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    try:
        for x, y in _progress(dl, desc="eval", enabled=progress):
            x, y = x.to(dev, non_blocking=True).contiguous(memory_format=fmt), torch.as_tensor(y).to(dev)
            if amp_dtype is not None:
                with torch.autocast(device_type=dev.type, dtype=amp_dtype):
                    out = model(x)
            else:
                out = model(x)
            logits = (out.logits if hasattr(out, "logits") else out).float()
            c = logits.shape[1]
            if int(y.max()) >= c or int(y.min()) < 0:
                raise ValueError(
                    f"labels range [{int(y.min())}, {int(y.max())}] does not fit the classifier's {c} classes; "
                    "evaluate on a split with the training classes"
                )
            all_logits.append(logits.cpu())
            all_labels.append(y.long().cpu())
    finally:
        model.train(was_training)
    if not all_logits:
        raise ValueError("evaluation data is empty; check the split and the dataset root")
    return torch.cat(all_logits), torch.cat(all_labels)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    num_workers: int = 0,
    channels_last: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-projection features of every item of ``dataset``, in order.

    Args:
        model: an ``SCHaNeModel`` (uses ``forward_features``), in any mode; restored afterwards.
        dataset: yields ``(image[3, H, W], label)`` with the transform already applied.
        batch_size: images per forward pass.
        device: where to run; defaults to the model's device.
        progress: show a progress bar on a terminal.
        num_workers: DataLoader workers.
        channels_last: feed channels-last inputs; ``None``: when the model's convolutions are stored so.

    Returns:
        ``(features[N, d] float32 on CPU, labels[N] int64 on CPU)``.

    Raises:
        ValueError: when ``batch_size < 1``, the dataset is empty or the model has no
            ``forward_features``.
    """
    if not hasattr(model, "forward_features"):
        raise ValueError("extract_features needs a model with forward_features (an SCHaNeModel)")
    dl = _as_loader(dataset, batch_size, num_workers)
    dev = torch.device(device) if device is not None else model_device(model)
    fmt = _input_format(model, channels_last)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in _progress(dl, desc="features", enabled=progress):
            # any module with forward_features (nn.Module does not declare it)
            feats.append(cast(Any, model).forward_features(x.to(dev).contiguous(memory_format=fmt)).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("dataset is empty: no features to extract")
    return torch.cat(feats), torch.cat(labels)


def validate(
    model: nn.Module,
    dataset: DataLoader | Dataset,
    *,
    ema_model: nn.Module | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Any], float]:
    """Evaluate a model (and its EMA) on the validation split; say which number selects checkpoints.

    Args:
        model: the trained model.
        dataset: the validation data (see :func:`evaluate`).
        ema_model: the EMA weights' model, or ``None``.
        **kwargs: passed to :func:`evaluate` (``device``, ``amp_dtype``, ``batch_size``, ...).

    Returns:
        ``(record, metric)``: ``record`` holds ``val_top1``, ``val_top5``, ``val_loss``, ``val_n`` and, with
        EMA, the same keys prefixed ``val_ema_``; ``metric`` is the selection metric: the EMA weights'
        top-1 when there are EMA weights (they are what is evaluated later), else the model's.
    """
    val = evaluate(model, dataset, **kwargs)
    record = {f"val_{k}": v for k, v in val.items()}
    metric = val["top1"]
    if ema_model is not None:
        val_ema = evaluate(ema_model, dataset, **kwargs)
        record.update({f"val_ema_{k}": v for k, v in val_ema.items()})
        metric = val_ema["top1"]
    return record, metric
