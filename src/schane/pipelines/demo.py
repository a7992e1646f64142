"""The offline demo behind ``make demo`` and ``schane demo``.

It fine-tunes the ImageNet-pretrained EfficientNet-Lite0 (``effnet-lite0-offline``, shipped on
PyPI) on the base classes of the ``glyphs`` few-shot benchmark twice per training seed, once
with cross-entropy and once with λ·SCHaNe + (1 − λ)·CE (same seed, data and budget), then
evaluates 5-way 1-shot and 5-shot on the novel classes over identical episodes (protocol A:
frozen features + logistic regression), with the pretrained backbone as a third row. It then
measures the geometry of each model's features on the novel classes and writes a report
(``report.md``, t-SNE maps, training curves) next to the few-shot results.

The settings live in ``schane/configs/demo.yaml`` (``configs/demo.yaml`` in the repository is a link
to it); how they were chosen is described there.

Examples:
    >>> from schane.pipelines.demo import run_demo
    >>> report = run_demo("runs/demo", seeds=[0])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEMO_CONFIG = files("schane") / "configs" / "demo.yaml"

LABELS = {"pretrained": "pretrained (no fine-tuning)", "ce": "CE", "schane": "SCHaNe + CE"}


def demo_config(out_dir: str | Path = "runs/demo", seeds: Sequence[int] | None = None,
                overrides: Sequence[str] | None = None) -> Any:
    """The demo's :class:`~schane.config.Config`, with its run directory at ``out_dir``.

    Args:
        out_dir: the demo's output directory (run directory).
        seeds: training seeds; ``None`` keeps the config's.
        overrides: further ``key=value`` overrides.

    Raises:
        ValueError: on invalid overrides or seeds.
    """
    from schane.config import load_config

    out = Path(out_dir)
    ov = [f"name={out.name}", f"output_dir={out.parent}"]
    if seeds is not None:
        if not seeds:
            raise ValueError("--seeds needs at least one seed")
        ov.append(f"fewshot.seeds=[{', '.join(str(int(s)) for s in seeds)}]")
    with as_file(DEMO_CONFIG) as path:
        return load_config(path, [*ov, *(overrides or [])])


def _row_models(results: dict[str, Any]) -> list[tuple[str, int | None, str | None]]:
    """(method, seed, checkpoint) for every row; the checkpoint chosen for the largest shot."""
    out = []
    for row in results["rows"]:
        shot = str(max(int(s) for s in row["selected"]))
        ckpt = row["selected"][shot]["checkpoint"] if row["method"] != "pretrained" else None
        out.append((row["method"], row["seed"], ckpt))
    return out


def _accuracy(results: dict[str, Any], method: str) -> dict[str, tuple[float, float | None]]:
    """Per shot: mean accuracy and its 95% interval — across seeds when there are several."""
    acc: dict[str, tuple[float, float | None]] = {}
    for shot in results["shots"]:
        col = f"{results['ways']}-way {shot}-shot"
        seed_rows = [s for s in results.get("seeds", []) if s["method"] == method and int(s["shot"]) == int(shot)]
        if seed_rows and seed_rows[0]["n"] > 1:
            acc[col] = (seed_rows[0]["mean"], seed_rows[0]["half_width"])
        else:
            row = next(r for r in results["rows"] if r["method"] == method)
            t = row["test"][str(shot)]
            acc[col] = (t["mean"], t["half_width"])
    return acc


def run_demo(out_dir: str | Path = "runs/demo", seeds: Sequence[int] | None = None,
             overrides: Sequence[str] | None = None) -> Path:
    """Run the demo end to end and return the path of its ``report.md``.

    Args:
        out_dir: output directory; finished training runs in it are reused.
        seeds: training seeds (default: the config's, three).
        overrides: ``key=value`` overrides of the demo config (e.g. ``fewshot.episodes=2000``).

    Returns:
        Path of ``report.md``.

    Raises:
        ValueError: on invalid overrides.
    """
    from schane.analysis.report import compute_embedding_metrics
    from schane.engine.checkpoint import load_checkpoint_model
    from schane.engine.evaluate import extract_features
    from schane.pipelines.fewshot import pretrained_model, run_fewshot
    from schane.pipelines.setup import eval_dataset

    t0 = time.perf_counter()
    cfg = demo_config(out_dir, seeds, overrides)
    results = run_fewshot(cfg)

    # ---------------------------------------------------------------- embedding geometry
    logger.info("[demo] embedding metrics on the novel (test) classes")
    pretrained = pretrained_model(cfg, cfg.fewshot.ways)
    test_ds, test_base = eval_dataset(cfg, pretrained, "test_classes")
    per_method: dict[str, list[dict[str, float]]] = {}
    panels: dict[str, tuple[Any, Any]] = {}
    for method, seed, ckpt in _row_models(results):
        model = pretrained if ckpt is None else load_checkpoint_model(ckpt)[0]
        feats, labels = extract_features(model, test_ds, batch_size=cfg.data.eval_batch_size,
                                         progress=cfg.train.progress)
        per_method.setdefault(method, []).append(
            compute_embedding_metrics(feats, labels, k=cfg.analysis.knn_k, seed=0))
        if seed in (None, cfg.fewshot.seeds[0]):
            panels[LABELS.get(method, method)] = (feats.numpy(), labels.numpy())
    report = _write(cfg, results, per_method, panels, test_base.classes)
    logger.info("[demo] finished in %.0f s; report: %s", time.perf_counter() - t0, report)
    return report


def _write(cfg: Any, results: dict[str, Any], per_method: dict[str, list[dict[str, float]]],
           panels: dict[str, tuple[Any, Any]], class_names: list[str]) -> Path:
    """The demo's ``report.md``: the table, the notes on how to read it, t-SNE maps and training curves."""
    from schane.analysis.plots import training_curves, tsne_panels
    from schane.analysis.report import write_report

    run_dir = Path(cfg.run_dir)
    train_time: dict[str, list[float]] = {}
    for row in results["rows"]:
        if row["run_dir"]:
            final = Path(row["run_dir"]) / "final.json"
            if final.is_file():
                secs = json.loads(final.read_text()).get("train_seconds")
                if secs is not None:
                    train_time.setdefault(row["method"], []).append(float(secs))

    rows = []
    for method, mets in per_method.items():
        row: dict[str, Any] = {"method": method, "label": LABELS.get(method, method),
                               "accuracy": _accuracy(results, method)}
        for key in mets[0]:
            row[key] = statistics.fmean(m[key] for m in mets)
        times = train_time.get(method)
        if times:
            row["train_time_s"] = statistics.fmean(times)
        rows.append(row)

    figures: dict[str, Path] = {}
    figures[f"t-SNE of pooled features, novel classes (seed {cfg.fewshot.seeds[0]})"] = tsne_panels(
        panels, run_dir / "tsne.png", class_names=class_names, seed=0,
        title="glyphs novel classes: pooled EfficientNet-Lite0 features",
        max_points=cfg.analysis.max_points)
    curves = {LABELS[m]: run_dir / f"{m}-seed{cfg.fewshot.seeds[0]}" / "metrics.jsonl" for m in cfg.fewshot.losses}
    curves = {k: v for k, v in curves.items() if v.is_file()}
    if curves:
        figures[f"Training curves (seed {cfg.fewshot.seeds[0]})"] = training_curves(curves, run_dir / "curves.png")

    n_seeds = len(cfg.fewshot.seeds)
    notes = [
        f"Backbone: {cfg.model.backbone} (ImageNet-pretrained), {cfg.data.img_size} px; dataset: {cfg.data.name} "
        f"({cfg.fewshot.ways}-way, {cfg.fewshot.queries} queries per class, {cfg.fewshot.episodes} identical "
        "test episodes per shot for every method).",
        f"Fine-tuning on the base classes: {cfg.optim.epochs} epochs, batch {cfg.data.batch_size}, lr {cfg.optim.lr:g}, "
        f"λ = {cfg.loss.lam}, τ = {cfg.loss.temperature}, β = {cfg.loss.beta}; seeds {list(cfg.fewshot.seeds)}.",
        "Checkpoint and logistic-regression C chosen on validation-class episodes; test-class episodes evaluated once.",
        ("Accuracy: mean over training seeds ± 95% Student-t interval across seeds."
         if n_seeds > 1 else "Accuracy: mean ± 95% interval over episodes (one training seed)."),
        f"Embedding metrics: mean over {n_seeds} seed(s), pooled features of all novel-class images.",
        f"Few-shot details (per-seed rows, paired differences): {results['results_file']}.",
    ]
    for d in results.get("seed_differences", []):
        if d["n"] > 1:
            notes.append(
                f"{LABELS.get(d['method'], d['method'])} − {LABELS.get(d['baseline'], d['baseline'])}, "
                f"{results['ways']}-way {d['shot']}-shot, across {d['n']} seeds: {d['mean']:+.2f} ± {d['half_width']:.2f} "
                f"points (95% t-interval{', excludes 0' if d['excludes_zero'] else ', includes 0'}; "
                f"per seed {', '.join(f'{v:+.2f}' for v in d['values'])})."
            )
    return write_report(rows, figures, run_dir, title="schane demo: CE vs SCHaNe on glyphs", notes=notes)
