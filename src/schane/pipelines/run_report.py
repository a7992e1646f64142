"""The report of one training run: ``RUN_DIR/report.md`` with held-out numbers and the pictures of its errors.

Written by ``schane train`` after the test split is evaluated (rank 0), and by ``schane report RUN_DIR`` for a
finished run. It holds the test top-1/top-5 with a 95% interval, the training curves, the confusion matrix,
per-class accuracy, the most-confused class pairs and a grid of misclassified test images
(:mod:`schane.analysis.interpret`), plus ``report.json`` with the numbers.

Examples:
    >>> path = report_for_run("runs/photos")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from schane.analysis.interpret import (
    interpret,
    plot_confusion,
    plot_misclassified,
    plot_per_class,
    wilson_interval,
)
from schane.analysis.plots import training_curves
from schane.config import Config
from schane.engine.device import resolve_amp
from schane.engine.evaluate import predict_logits
from schane.pipelines.runs import load_for_evaluation
from schane.pipelines.splits import dataset_splits, eval_dataset

logger = logging.getLogger(__name__)

REPORT = "report.md"


def write_run_report(cfg: Config, run_dir: Path, logits: torch.Tensor, labels: torch.Tensor, test_base: Any,
                     *, weights: str, final: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.md``, its PNGs and ``report.json`` from the test split's logits.

    Args:
        cfg: the run's config.
        run_dir: where to write.
        logits: ``[N, C]`` test logits of the evaluated weights.
        labels: ``[N]`` test labels.
        test_base: the test split without transform (``test_base[i] -> (PIL image, label)``, ``.classes``).
        weights: which weights were evaluated (``best.pt (epoch 3)``, ...).
        final: the run's ``final.json`` contents, for the validation and timing lines.

    Returns:
        The report's path.
    """
    classes = list(test_base.classes)
    r = interpret(logits, labels, classes)
    lo, hi = wilson_interval(r.top1, r.n)
    figs = run_dir / "report"
    curves = _curves(run_dir, figs)
    confusion = plot_confusion(r, figs / "confusion.png")
    per_class = plot_per_class(r, figs / "per_class.png")
    wrong = plot_misclassified(r, lambda i: test_base[i][0], figs / "misclassified.png")
    pairs = r.most_confused(10)
    order = sorted(range(len(classes)), key=lambda i: (math.inf if math.isnan(r.per_class[i]) else r.per_class[i], i))
    support = r.confusion.sum(1)
    final = final or {}
    lines = [
        f"# Run report: {cfg.name}",
        "",
        f"- data: `{cfg.data.name}` at `{cfg.data.root}`, {len(classes)} classes; model `{cfg.model.backbone}` at "
        f"{cfg.data.img_size} px; loss {cfg.loss.name}"
        + (f" (λ = {cfg.loss.lam:g})" if cfg.loss.name != "ce" else "")
        + f"; {cfg.optim.epochs} epochs, lr {cfg.optim.lr:g}, batch {cfg.data.batch_size}, seed {cfg.train.seed}",
        f"- evaluated weights: {weights}; selected on validation top-1"
        + (f" {100 * final['best_val_top1']:.2f}%" if final.get("best_val_top1") is not None else "")
        + "; the test split selected nothing",
        "",
        "## Held-out test",
        "",
        f"**top-1 {100 * r.top1:.2f}%** (95% Wilson interval {100 * lo:.1f}–{100 * hi:.1f}%, {r.n} images), "
        f"top-{min(5, len(classes))} {100 * r.top5:.2f}%.",
        "",
    ]
    if curves is not None:
        lines += ["## Training curves", "", f"![training curves]({curves.relative_to(run_dir)})", ""]
    lines += ["## Confusion matrix", "", f"![confusion matrix]({confusion.relative_to(run_dir)})", "",
              "## Per-class accuracy", "", f"![per-class accuracy]({per_class.relative_to(run_dir)})", "",
              "| class | test images | accuracy (%) |", "|:--|--:|--:|"]
    shown = order if len(order) <= 30 else order[:15] + order[-5:]
    for k, i in enumerate(shown):
        if len(order) > 30 and k == 15:
            lines.append(f"| … {len(order) - 20} more in report.json … | | |")
        acc = "—" if math.isnan(r.per_class[i]) else f"{100 * r.per_class[i]:.1f}"
        lines.append(f"| {classes[i]} | {int(support[i])} | {acc} |")
    lines += ["", "## Most-confused pairs", ""]
    if pairs:
        lines += ["| true class | predicted as | images |", "|:--|:--|--:|"]
        lines += [f"| {a} | {b} | {n} |" for a, b, n in pairs]
    else:
        lines.append("No test image was misclassified.")
    if wrong is not None:
        lines += ["", "## Misclassified test images", "", f"![misclassified]({wrong.relative_to(run_dir)})"]
    lines.append("")
    path = run_dir / REPORT
    path.write_text("\n".join(lines))
    (run_dir / "report.json").write_text(json.dumps({
        "test_top1": r.top1, "test_top1_interval": [lo, hi], "test_top5": r.top5, "n": r.n, "weights": weights,
        "classes": classes, "per_class": {c: (None if math.isnan(a) else float(a)) for c, a in zip(classes, r.per_class,
                                                                                                  strict=True)},
        "confusion": r.confusion.tolist(), "most_confused": pairs,
    }, indent=1))
    return path


def _curves(run_dir: Path, figs: Path) -> Path | None:

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    try:
        return training_curves({run_dir.name: metrics}, figs / "curves.png", title=f"{run_dir.name}: training curves")
    except ValueError as e:  # a run too short to plot (no epoch records yet)
        logger.info("no training curves: %s", e)
        return None


def report_for_run(run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """(Re)write the report of a finished run from its ``best.pt`` (else ``last.pt``) on the test split.

    Raises:
        FileNotFoundError: when the folder holds no checkpoint.
        ValueError: when the run's dataset has no test split.
    """

    d = Path(run_dir).expanduser()
    ckpt = next((d / f for f in ("best.pt", "last.pt") if (d / f).is_file()), None)
    if ckpt is None:
        raise FileNotFoundError(f"{d} holds no best.pt or last.pt; pass the run directory of 'schane train'")
    loaded = load_for_evaluation(ckpt, overrides)
    cfg = loaded.cfg
    if "test" not in dataset_splits(cfg):
        raise ValueError(f"dataset {cfg.data.name!r} has no test split: the run report evaluates the test split")
    ds, base = eval_dataset(cfg, loaded.model, "test")
    logits, labels = predict_logits(loaded.model, ds, batch_size=cfg.data.eval_batch_size, device=loaded.device,
                                    amp_dtype=resolve_amp(cfg.train.amp, loaded.device),
                                    num_workers=cfg.data.num_workers)
    final_file = d / "final.json"
    final = json.loads(final_file.read_text()) if final_file.is_file() else None
    return write_run_report(cfg, d, logits, labels, base, weights=ckpt.name, final=final)


__all__ = ["REPORT", "report_for_run", "write_run_report"]
