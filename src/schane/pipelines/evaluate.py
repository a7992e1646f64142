"""``schane eval``: top-1/top-5 of a trained checkpoint on one split of its dataset.

Examples:
    >>> metrics = evaluate_checkpoint("runs/demo/ce-seed0/best.pt", split="val")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from schane.engine.device import resolve_amp
from schane.engine.evaluate import evaluate
from schane.pipelines.runs import check_class_names, load_for_evaluation
from schane.pipelines.splits import dataset_splits, eval_dataset

logger = logging.getLogger(__name__)


def evaluate_checkpoint(
    path: str | Path, split: str = "test", overrides: list[str] | None = None, *, progress: bool = True,
    allow_class_mismatch: bool = False,
) -> dict[str, Any]:
    """Evaluate a training checkpoint on one split of its dataset.

    The model and data come from the checkpoint's resolved config; ``overrides`` (``a.b=c``) change it,
    e.g. ``data.root=/new/path`` or ``data.eval_batch_size=64``. Model keys cannot be overridden (the
    weights fix the architecture). The split's class names must be those the model was trained on.

    Args:
        path: a ``best.pt`` or ``last.pt`` written by ``schane train``.
        split: ``train``, ``val`` or ``test`` (few-shot datasets have no ``test``).
        overrides: dotted config overrides.
        progress: show a progress bar on a terminal.
        allow_class_mismatch: evaluate even when the data's classes differ from the checkpoint's (a
            relabelled set on purpose); a warning is logged.

    Returns:
        ``{"checkpoint", "dataset", "split", "top1", "top5", "loss", "n"}``.

    Raises:
        FileNotFoundError: when the checkpoint or the data is missing.
        ValueError: on a corrupt checkpoint, an unknown split, a bad override or other classes.
    """

    loaded = load_for_evaluation(path, overrides)
    cfg = loaded.cfg
    splits = dataset_splits(cfg)
    if split not in splits:
        raise ValueError(f"dataset {cfg.data.name!r} has no split {split!r}; choose one of {', '.join(splits)}")
    ds, base = eval_dataset(cfg, loaded.model, split)
    if split in ("train", "val", "test"):
        if len(base.classes) != loaded.num_classes and not allow_class_mismatch:
            raise ValueError(
                f"split {split!r} has {len(base.classes)} classes but the checkpoint's classifier has {loaded.num_classes}"
            )
        check_class_names(loaded.class_names, base.classes, f"{cfg.data.name} ({split})", allow=allow_class_mismatch)
    metrics = evaluate(
        loaded.model, ds, batch_size=cfg.data.eval_batch_size, device=loaded.device,
        amp_dtype=resolve_amp(cfg.train.amp, loaded.device), num_workers=cfg.data.num_workers, progress=progress,
    )
    result = {"checkpoint": str(path), "dataset": cfg.data.name, "split": split, **metrics}
    return json.loads(json.dumps(result))


def format_evaluation(result: dict[str, Any]) -> str:
    """The aligned text table :func:`evaluate_checkpoint`'s result is printed as."""
    rows = [("checkpoint", str(result["checkpoint"])),
            ("dataset", f"{result['dataset']} ({result['split']}, {result['n']} images)"),
            ("top-1", f"{100 * result['top1']:.2f}%"), ("top-5", f"{100 * result['top5']:.2f}%"),
            ("loss", f"{result['loss']:.4f}")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


__all__ = ["evaluate_checkpoint", "format_evaluation"]
