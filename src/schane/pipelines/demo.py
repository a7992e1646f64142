"""The offline demo behind ``make demo`` / ``schane demo``, and its ablation (``make ablation``).

The demo fine-tunes the ImageNet-pretrained EfficientNet-Lite0 (``effnet-lite0-offline``, shipped on PyPI)
on the base classes of the ``glyphs`` few-shot benchmark once per method and training seed — cross-entropy,
and λ·SCHaNe + (1 − λ)·CE — with the same seed, data and budget, then evaluates 5-way 1-shot and 5-shot on
the novel classes over identical episodes (protocol A: frozen features + logistic regression), with the
pretrained backbone as a row of its own. It reports what fine-tuning did to the base classes (validation
top-1), measures the geometry of each model's features on the novel classes, and writes a report
(``report.md``, t-SNE maps, training curves) next to the few-shot results.

The ablation (``schane demo --ablation``) runs the same data, budget, seeds and episodes with four methods:
CE, SupCon + CE, SCHaNe with β = 0 + CE (label-aware, no hard-negative weighting) and SCHaNe + CE.

The settings live in ``schane/configs/demo.yaml`` (``configs/demo.yaml`` in the repository links to it);
how they were chosen is described there.

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

from schane.analysis.plots import training_curves, tsne_panels
from schane.analysis.report import compute_embedding_metrics, write_report
from schane.engine.checkpoint import load_checkpoint_model
from schane.engine.device import resolve_device
from schane.engine.evaluate import extract_features
from schane.pipelines.fewshot import label, pretrained_model, run_fewshot, run_name
from schane.pipelines.runs import load_run_config, prepare_for_inference
from schane.pipelines.splits import eval_dataset
from schane.pipelines.sweep import ExecutorOptions, RunsFailed, plan_sweep
from schane.pipelines.sweep_executors import execute

logger = logging.getLogger(__name__)

DEMO_CONFIG = files("schane") / "configs" / "demo.yaml"
ABLATION_METHODS = ("ce", "supcon", "schane_beta0", "schane")
def demo_config(out_dir: str | Path = "runs/demo", seeds: Sequence[int] | None = None,
                overrides: Sequence[str] | None = None, *, ablation: bool = False) -> Any:
    """The demo's :class:`~schane.config.Config`, with its run directory at ``out_dir``.

    Args:
        out_dir: the demo's output directory (run directory).
        seeds: training seeds; ``None`` keeps the config's.
        overrides: further ``key=value`` overrides.
        ablation: compare :data:`ABLATION_METHODS` instead of the config's methods.

    Raises:
        ValueError: on invalid overrides or seeds.
    """

    out = Path(out_dir)
    ov = [f"name={out.name}", f"output_dir={out.parent}"]
    if ablation:
        ov.append(f"fewshot.losses=[{', '.join(ABLATION_METHODS)}]")
    if seeds is not None:
        if not seeds:
            raise ValueError("--seeds needs at least one seed")
        ov.append(f"fewshot.seeds=[{', '.join(str(int(s)) for s in seeds)}]")
    with as_file(DEMO_CONFIG) as path:
        return load_run_config(path, [*ov, *(overrides or [])])


def _row_models(results: dict[str, Any]) -> list[tuple[str, int | None, str | None]]:
    """(method, seed, checkpoint) for every row; the checkpoint chosen for the largest shot."""
    out = []
    for row in results["rows"]:
        shot = str(max(int(s) for s in row["selected"]))
        ckpt = row["selected"][shot]["checkpoint"] if row["method"] != "pretrained" else None
        out.append((row["method"], row["seed"], ckpt))
    return out


def _accuracy(results: dict[str, Any], method: str) -> dict[str, tuple[float, float | None]]:
    """Per shot (and base-class validation top-1): the mean and its 95% interval, across seeds when there are several."""
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
    base = next((b for b in (results.get("base_accuracy") or {}).get("rows", []) if b["method"] == method), None)
    if base is not None:
        acc["base val top-1"] = (base["mean"], base["half_width"])
    return acc


def run_demo(out_dir: str | Path = "runs/demo", seeds: Sequence[int] | None = None,
             overrides: Sequence[str] | None = None, *, ablation: bool = False, jobs: int = 1) -> Path:
    """Run the demo (or its ablation) end to end and return the path of its ``report.md``.

    The training runs (every method x seed) are a sweep without a grid (:mod:`schane.pipelines.sweep`): each
    run is a job with its log in ``out_dir/logs/``, the same run directory and config as ``schane fewshot``
    would train; then ``run_fewshot`` evaluates them all on identical episodes.

    Args:
        out_dir: output directory; finished training runs in it are reused, unfinished ones resumed.
        seeds: training seeds (default: the config's, three).
        overrides: ``key=value`` overrides of the demo config (e.g. ``fewshot.episodes=2000``).
        ablation: CE, SupCon, SCHaNe β = 0 and SCHaNe (each + CE) instead of CE and SCHaNe.
        jobs: runs trained at once, each with ``1/jobs`` of the threads (1: one after another).

    Returns:
        Path of ``report.md``.

    Raises:
        ValueError: on invalid overrides, or a run directory in ``out_dir`` holding a run of another config.
        RunsFailed: when a training run failed (each listed with its log); the finished ones are kept.
    """

    t0 = time.perf_counter()
    cfg = demo_config(out_dir, seeds, overrides, ablation=ablation)
    sweep = plan_sweep(cfg, evaluation="fewshot")  # the config's methods and seeds, no grid: runs in out_dir
    execute(sweep, ExecutorOptions(jobs=jobs))
    if sweep.failed:
        raise RunsFailed(sweep.failed)
    results = run_fewshot(cfg)

    logger.info("[demo] embedding metrics on the novel (test) classes")
    pretrained = pretrained_model(cfg, cfg.fewshot.ways)
    test_ds, test_base = eval_dataset(cfg, pretrained, "test_classes")
    per_method: dict[str, list[dict[str, float]]] = {}
    panels: dict[str, tuple[Any, Any]] = {}
    device = resolve_device(cfg.train.device)
    for method, seed, ckpt in _row_models(results):
        model = prepare_for_inference(pretrained if ckpt is None else load_checkpoint_model(ckpt)[0], cfg, device)
        feats, labels = extract_features(model, test_ds, batch_size=cfg.data.eval_batch_size,
                                         progress=cfg.train.progress)
        per_method.setdefault(method, []).append(
            compute_embedding_metrics(feats, labels, k=cfg.analysis.knn_k, seed=0))
        if seed in (None, cfg.fewshot.seeds[0]):
            panels[label(method)] = (feats.numpy(), labels.numpy())
    title = "schane ablation: is it the hard negatives?" if ablation else "schane demo: CE vs SCHaNe on glyphs"
    report = _write(cfg, results, per_method, panels, test_base.classes, title)
    logger.info("[demo] finished in %.0f s; report: %s", time.perf_counter() - t0, report)
    return report


def _rows(results: dict[str, Any], per_method: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """One report row per method: accuracies, mean embedding metrics over seeds, mean training time."""
    train_time: dict[str, list[float]] = {}
    for result in results["rows"]:
        final = Path(result["run_dir"]) / "final.json" if result["run_dir"] else None
        if final is not None and final.is_file():
            secs = json.loads(final.read_text()).get("train_seconds")
            if secs is not None:
                train_time.setdefault(result["method"], []).append(float(secs))
    rows = []
    for method, mets in per_method.items():
        row: dict[str, Any] = {"method": method, "label": label(method), "accuracy": _accuracy(results, method)}
        for key in mets[0]:
            row[key] = statistics.fmean(m[key] for m in mets)
        if train_time.get(method):
            row["train_time_s"] = statistics.fmean(train_time[method])
        rows.append(row)
    return rows


def _difference_notes(results: dict[str, Any]) -> list[str]:
    """Every paired difference across seeds, whatever its sign: few-shot accuracy and base-class accuracy."""
    notes = []
    for d in results.get("seed_differences", []):
        if d["n"] > 1:
            notes.append(
                f"{label(d['method'])} − {label(d['baseline'])}, {results['ways']}-way {d['shot']}-shot, across "
                f"{d['n']} seeds: {d['mean']:+.2f} ± {d['half_width']:.2f} points (95% t-interval, "
                f"{'excludes' if d['excludes_zero'] else 'includes'} 0; per seed "
                f"{', '.join(f'{v:+.2f}' for v in d['values'])})."
            )
    for d in (results.get("base_accuracy") or {}).get("differences", []):
        if d["n"] > 1:
            notes.append(
                f"{label(d['method'])} − {label(d['baseline'])}, base-class validation top-1: {d['mean']:+.2f} ± "
                f"{d['half_width']:.2f} points (95% t-interval, {'excludes' if d['excludes_zero'] else 'includes'} 0)."
            )
    return notes


def _write(cfg: Any, results: dict[str, Any], per_method: dict[str, list[dict[str, float]]],
           panels: dict[str, tuple[Any, Any]], class_names: list[str], title: str) -> Path:
    """The demo's ``report.md``: the table, the notes on how to read it, t-SNE maps and training curves."""

    run_dir = Path(cfg.run_dir)
    seed0 = cfg.fewshot.seeds[0]
    figures: dict[str, Path] = {}
    figures[f"t-SNE of pooled features, novel classes (seed {seed0})"] = tsne_panels(
        panels, run_dir / "tsne.png", class_names=class_names, seed=0,
        title=f"{cfg.data.name} novel classes: pooled {cfg.model.backbone} features", max_points=cfg.analysis.max_points)
    curves = {label(m): run_dir / run_name(m, seed0) / "metrics.jsonl" for m in cfg.fewshot.losses}
    curves = {k: v for k, v in curves.items() if v.is_file()}
    if curves:
        figures[f"Training curves (seed {seed0})"] = training_curves(curves, run_dir / "curves.png")
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
        "Base val top-1: validation top-1 on the base classes' held-out images at the last epoch (not used to "
        "select anything; the best epoch's chose best.pt).",
        f"Embedding metrics: mean over {n_seeds} seed(s), pooled features of all novel-class images.",
        f"Few-shot details (per-seed rows, paired differences): {results['results_file']}.",
        *_difference_notes(results),
    ]
    return write_report(_rows(results, per_method), figures, run_dir, title=title, notes=notes)
