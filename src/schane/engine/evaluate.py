"""Evaluation: top-1/top-5 accuracy and CE loss, feature extraction, checkpoint evaluation.

Examples:
    >>> metrics = evaluate_checkpoint("runs/demo/best.pt", split="val")  # doctest: +SKIP
    >>> feats, labels = extract_features(model, dataset, batch_size=128)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_loader(data: DataLoader | Dataset, batch_size: int, num_workers: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, Dataset):
        raise ValueError(f"expected a DataLoader or a Dataset, got {type(data).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


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
        progress: show a tqdm bar.

    Returns:
        ``{"top1", "top5", "loss", "n"}``; top-5 is top-min(5, C). Accuracies are fractions in [0, 1].

    Raises:
        ValueError: when the data is empty or labels exceed the classifier's width.
    """
    dl = _as_loader(loader, batch_size, num_workers)
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    try:
        for x, y in tqdm(dl, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
            x, y = x.to(dev, non_blocking=True), torch.as_tensor(y).to(dev)
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
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            topk = logits.topk(min(5, c), dim=1).indices
            hit = topk == y[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(1).sum())
            n += y.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluation data is empty; check the split and the dataset root")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "n": n}


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-projection features of every item of ``dataset``, in order.

    Args:
        model: an ``SCHaNeModel`` (uses ``forward_features``), in any mode; restored afterwards.
        dataset: yields ``(image[3, H, W], label)`` with the transform already applied.
        batch_size: images per forward pass.
        device: where to run; defaults to the model's device.
        progress: show a tqdm bar.
        num_workers: DataLoader workers.

    Returns:
        ``(features[N, d] float32 on CPU, labels[N] int64 on CPU)``.

    Raises:
        ValueError: when ``batch_size < 1``, the dataset is empty or the model has no
            ``forward_features``.
    """
    if not hasattr(model, "forward_features"):
        raise ValueError("extract_features needs a model with forward_features (an SCHaNeModel)")
    dl = _as_loader(dataset, batch_size, num_workers)
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in tqdm(dl, desc="features", disable=not progress, leave=False, dynamic_ncols=True):
            feats.append(model.forward_features(x.to(dev)).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("dataset is empty: no features to extract")
    return torch.cat(feats), torch.cat(labels)


def evaluate_checkpoint(
    path: str | Path, split: str = "test", overrides: list[str] | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Evaluate a training checkpoint on one split of its dataset and print a table.

    The model and data come from the checkpoint's resolved config; ``overrides`` (``a.b=c``)
    change it, e.g. ``data.root=/new/path`` or ``data.eval_batch_size=64``. Model keys
    cannot be overridden (the weights fix the architecture).

    Args:
        path: a ``best.pt`` or ``last.pt`` written by ``schane train``.
        split: ``train``, ``val`` or ``test`` (few-shot datasets have no ``test``).
        overrides: dotted config overrides.
        progress: show a tqdm bar.

    Returns:
        ``{"checkpoint", "split", "top1", "top5", "loss", "n"}``.

    Raises:
        FileNotFoundError: when the checkpoint or the data is missing.
        ValueError: on a corrupt checkpoint, an unknown split or a bad override.
    """
    from schane.config import apply_overrides, from_dict, to_dict
    from schane.data import dataset_info, get_dataset
    from schane.data.transforms import eval_transform
    from schane.engine.checkpoint import load_checkpoint_model
    from schane.engine.utils import IndexedDataset, resolve_amp, resolve_device

    for item in overrides or []:
        if item.strip().startswith("model."):
            raise ValueError(f"override {item!r}: the model is fixed by the checkpoint's weights; only data.* etc.")
    model, cfg, num_classes = load_checkpoint_model(path)
    cfg = from_dict(apply_overrides(to_dict(cfg), overrides))
    splits = dataset_info(cfg.data.name).splits
    if split not in splits:
        raise ValueError(f"dataset {cfg.data.name!r} has no split {split!r}; choose one of {', '.join(splits)}")
    device = resolve_device(cfg.train.device)
    model.to(device)
    dc = model.data_config
    tf = eval_transform(cfg.data.img_size, tuple(dc["mean"]), tuple(dc["std"]), crop_pct=float(dc.get("crop_pct") or 0.875))
    base = get_dataset(
        cfg.data.name, cfg.data.root, split, None, seed=cfg.train.seed, val_fraction=cfg.data.val_fraction,
        download=cfg.data.download, **cfg.data.options,
    )
    if len(base.classes) != num_classes and split in ("train", "val", "test"):
        raise ValueError(
            f"split {split!r} has {len(base.classes)} classes but the checkpoint's classifier has {num_classes}"
        )
    metrics = evaluate(
        model, IndexedDataset(base, tf), batch_size=cfg.data.eval_batch_size, device=device,
        amp_dtype=resolve_amp(cfg.train.amp, device), num_workers=cfg.data.num_workers, progress=progress,
    )
    result = {"checkpoint": str(path), "split": split, **metrics}
    rows = [("checkpoint", str(path)), ("dataset", f"{cfg.data.name} ({split}, {metrics['n']} images)"),
            ("top-1", f"{100 * metrics['top1']:.2f}%"), ("top-5", f"{100 * metrics['top5']:.2f}%"),
            ("loss", f"{metrics['loss']:.4f}")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    return json.loads(json.dumps(result))
