"""What a classifier got wrong: confusion matrix, per-class accuracy, most-confused pairs, misclassified images.

The pictures a practitioner looks at first (fastai's ``ClassificationInterpretation``), from one model's
predictions on a held-out split. :func:`interpret` computes the numbers; :func:`plot_confusion` and
:func:`plot_misclassified` draw them so that they stay readable from 2 to a few hundred classes.

Examples:
    >>> import torch
    >>> r = interpret(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1]), ["a", "b"])
    >>> r.confusion.tolist(), r.per_class.tolist()
    ([[1, 0], [1, 1]], [1.0, 0.5])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class Interpretation:
    """One model's predictions on a labelled split.

    Attributes:
        classes: class names ``[C]``.
        labels: true labels ``[N]``.
        pred: top-1 predictions ``[N]``.
        prob: the predicted class's softmax probability ``[N]``.
        true_prob: the true class's softmax probability ``[N]``.
        confusion: counts ``[C, C]``, rows true class, columns predicted class.
        per_class: accuracy per true class ``[C]`` (NaN for a class with no images).
        top1, top5: accuracies (fractions); ``top5`` is top-min(5, C).
    """

    classes: list[str]
    labels: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    true_prob: np.ndarray
    confusion: np.ndarray
    per_class: np.ndarray
    top1: float
    top5: float

    @property
    def n(self) -> int:
        return int(self.labels.size)

    def most_confused(self, k: int = 10) -> list[tuple[str, str, int]]:
        """The ``k`` largest off-diagonal cells: ``(true class, predicted class, count)``, largest first."""
        cm = self.confusion.copy()
        np.fill_diagonal(cm, 0)
        flat = np.argsort(-cm, axis=None, kind="stable")[:k]
        out = []
        for f in flat:
            i, j = divmod(int(f), cm.shape[1])
            if cm[i, j] == 0:
                break
            out.append((self.classes[i], self.classes[j], int(cm[i, j])))
        return out

    def misclassified(self, k: int = 24) -> np.ndarray:
        """Indices of up to ``k`` misclassified items, the most confidently wrong first."""
        wrong = np.flatnonzero(self.pred != self.labels)
        return wrong[np.argsort(-self.prob[wrong], kind="stable")][:k]


def interpret(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> Interpretation:
    """Confusion matrix, per-class accuracy and confidences from logits.

    Args:
        logits: ``[N, C]``.
        labels: ``[N]`` in ``0..C-1``.
        classes: ``C`` names.

    Raises:
        ValueError: when the shapes disagree or there are no rows.
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0] or logits.shape[1] != len(classes):
        raise ValueError(f"expected logits [N, {len(classes)}] and labels [N]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("no predictions to interpret: the split is empty")
    p = torch.softmax(logits.double(), dim=1)
    prob, pred = p.max(dim=1)
    y = labels.long()
    c = len(classes)
    cm = np.bincount((y * c + pred).numpy(), minlength=c * c).reshape(c, c)
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    top = logits.topk(min(5, c), dim=1).indices
    return Interpretation(
        classes=[str(s) for s in classes], labels=y.numpy(), pred=pred.numpy(), prob=prob.numpy(),
        true_prob=p.gather(1, y[:, None])[:, 0].numpy(), confusion=cm, per_class=per_class,
        top1=float((pred == y).double().mean()), top5=float((top == y[:, None]).any(1).double().mean()),
    )


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion measured on ``n`` items (well-behaved near 0 and 1)."""
    if n <= 0:
        return (math.nan, math.nan)
    denom = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_confusion(r: Interpretation, path: str | Path, *, title: str = "confusion matrix (row-normalised)") -> Path:
    """Row-normalised confusion matrix as a PNG.

    Up to 25 classes every cell is annotated with its count and every class is named; above that the
    figure grows with the number of classes up to a cap, tick labels thin out to stay legible, and
    only the colour shows the rates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(r.classes)
    support = np.maximum(r.confusion.sum(1, keepdims=True), 1)
    rates = r.confusion / support
    side = float(np.clip(2.5 + 0.3 * c, 5.0, 16.0))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    step = max(1, math.ceil(c / 60))
    ticks = np.arange(0, c, step)
    fs = 9 if c <= 25 else max(6, int(9 - c / 25))
    ax.set_xticks(ticks, [_short(r.classes[i]) for i in ticks], rotation=90, fontsize=fs)
    ax.set_yticks(ticks, [_short(r.classes[i]) for i in ticks], fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 25:
        for i in range(c):
            for j in range(c):
                if r.confusion[i, j]:
                    ax.text(j, i, str(r.confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(f"{title}\n{r.n} images, top-1 {100 * r.top1:.1f}%")
    return _save(fig, path)


def plot_per_class(r: Interpretation, path: str | Path) -> Path:
    """Per-class accuracy as horizontal bars, worst class on top (at most the 40 worst when there are more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [int(i) for i in np.argsort(np.nan_to_num(r.per_class, nan=2.0), kind="stable")]
    shown = order[:40]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(shown)))
    y = np.arange(len(shown))
    ax.barh(y, [100 * r.per_class[i] for i in shown], color="tab:blue")
    ax.set_yticks(y, [_short(r.classes[i], 24) for i in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.axvline(100 * r.top1, color="tab:red", ls="--", lw=1, label=f"overall {100 * r.top1:.1f}%")
    ax.set_xlabel("accuracy (%)")
    more = f" (the {len(shown)} worst of {len(r.classes)})" if len(shown) < len(r.classes) else ""
    ax.set_title(f"per-class accuracy{more}")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_misclassified(
    r: Interpretation, image: Callable[[int], Any], path: str | Path, *, k: int = 24, cols: int = 6
) -> Path | None:
    """A grid of the most confidently misclassified images with their true and predicted class.

    Args:
        r: the interpretation.
        image: ``image(i)`` is item ``i`` of the split as a PIL image (as the user sees it, untransformed).
        path: the PNG to write.
        k: at most this many images.
        cols: images per row.

    Returns:
        The path, or ``None`` when nothing was misclassified.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = r.misclassified(k)
    if idx.size == 0:
        return None
    cols = min(cols, idx.size)
    rows = math.ceil(idx.size / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx, strict=False):
        img = image(int(i))
        ax.imshow(np.asarray(img), cmap="gray" if getattr(img, "mode", "") == "L" else None,
                  interpolation="nearest" if min(getattr(img, "size", (64, 64))) < 64 else "antialiased")
        ax.set_title(f"true: {_short(r.classes[r.labels[i]], 16)}\npred: {_short(r.classes[r.pred[i]], 16)} "
                     f"({100 * r.prob[i]:.0f}%)", fontsize=8, color="darkred")
    fig.suptitle("misclassified test images, most confident first", fontsize=10)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


__all__ = ["Interpretation", "interpret", "plot_confusion", "plot_misclassified", "plot_per_class",
           "wilson_interval"]
