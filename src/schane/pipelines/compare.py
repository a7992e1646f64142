"""``schane compare`` and ``schane analyze``: train or reuse one run per method, measure, write a report.

:func:`run_compare` trains (or reuses) one run per compared method and per swept value under identical data,
seeds and budgets, measures every model's accuracy and the geometry of its pooled features on the evaluation
split, and writes one report directory with ``report.md``, ``report.json`` and PNG figures (through
:func:`schane.analysis.report.write_report`). :func:`analyze_checkpoint` analyses one checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from schane.analysis import plots
from schane.analysis.plots import tsne_plot
from schane.analysis.report import (
    METRIC_COLUMNS,
    accuracy_entries,
    compute_embedding_metrics,
    format_cell,
    write_report,
)
from schane.config import Config, parse_method, to_dict
from schane.data import dataset_info
from schane.engine.checkpoint import load_checkpoint_model
from schane.engine.device import resolve_device
from schane.engine.evaluate import evaluate, extract_features
from schane.engine.run_log import read_metrics
from schane.pipelines.fewshot import draw_episodes
from schane.pipelines.runs import (
    check_class_names,
    check_config,
    config_diff,
    load_for_evaluation,
    prepare_run_dir,
    with_overrides,
)
from schane.pipelines.scoring import TEST_SPLIT, VAL_SPLIT, FewShotStudy, fewshot_views
from schane.pipelines.splits import dataset_splits, eval_dataset, load_split
from schane.pipelines.train import train

logger = logging.getLogger(__name__)

__all__ = ["analyze_checkpoint", "method_config", "run_compare"]

# sections and keys that do not change what a run trains
_EVAL_ONLY = ("name", "output_dir", "analysis", "fewshot", "train.progress", "train.test_at_end")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def method_config(cfg: Config, method: str, runs_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """The :class:`~schane.config.Config` of one compared run: ``cfg`` with the method's loss.

    Data, seeds, model and budget stay those of ``cfg``; only the loss settings (and ``overrides``, a
    ``{dotted key: value}`` mapping) change, and the run directory becomes ``runs_dir/<method>``.

    Raises:
        ValueError: on an unknown method or override key, or an invalid resulting config.
    """
    _, ov = parse_method(method)
    extra = [f"{k}={v}" for k, v in (overrides or {}).items()]
    run_name = _slug(method) + "".join(f"__{k.split('.')[-1]}={v}" for k, v in (overrides or {}).items())
    return with_overrides(cfg, [*ov, *extra, f"name={_slug(run_name)}", f"output_dir={runs_dir}"])


def resolve_split(cfg: Config, split: str) -> tuple[str, str]:
    """``(split, dataset kind)``; ``test`` means ``test_classes`` on few-shot datasets."""

    info = dataset_info(cfg.data.name, options=cfg.data.options)
    if info.kind == "fewshot" and split == "test":
        split = "test_classes"
    if split not in info.splits:
        raise ValueError(f"dataset {cfg.data.name!r} has no split {split!r}; choose one of {', '.join(info.splits)}")
    return split, info.kind


def _features(model: Any, cfg: Config, split: str, device: torch.device, progress: bool) -> dict[str, Any]:

    ds, base = eval_dataset(cfg, model, split)
    feats, labels = extract_features(model, ds, batch_size=cfg.data.eval_batch_size, device=device, progress=progress,
                                     num_workers=cfg.data.num_workers)
    out = {"features": feats, "labels": labels, "classes": list(getattr(base, "classes", []))}
    if cfg.analysis.projections:
        with torch.no_grad():
            proj = [model.projector(f.to(device)).float().cpu() for f in feats.split(1024)]
        out["projections"] = torch.cat(proj)
    return out


def metrics_for(model: Any, cfg: Config, device: torch.device, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """Embedding metrics of ``model``'s pooled features on ``analysis.split`` (and the features themselves)."""
    split, kind = resolve_split(cfg, cfg.analysis.split)
    data = _features(model, cfg, split, device, progress)
    reference = None
    if cfg.analysis.knn_reference == "train":
        if kind == "fewshot":
            raise ValueError(
                "analysis.knn_reference=train needs a classification dataset: the few-shot train split holds "
                "other classes than test_classes; use analysis.knn_reference=loo"
            )
        ref = _features(model, dataclasses.replace(cfg, analysis=dataclasses.replace(cfg.analysis, projections=False)),
                        "train", device, progress)
        reference = (ref["features"], ref["labels"])
    kw: dict[str, Any] = {"k": cfg.analysis.knn_k, "max_points": cfg.analysis.metric_max_points, "seed": cfg.analysis.seed}
    row = compute_embedding_metrics(data["features"], data["labels"], reference=reference, **kw)
    if "projections" in data:
        proj = compute_embedding_metrics(data["projections"], data["labels"], **kw)
        row.update({f"proj_{k}": v for k, v in proj.items()})
    data["split"] = split
    return row, data


def _classification_accuracy(final: Mapping[str, Any], model: Any, cfg: Config, device: torch.device,
                             progress: bool) -> dict[str, tuple[float, float | None]]:
    test = final.get("test") if final else None
    if not test:

        ds, _ = eval_dataset(cfg, model, "test")
        test = evaluate(model, ds, batch_size=cfg.data.eval_batch_size, device=device, progress=progress)
    p, n = float(test["top1"]), int(test.get("n") or 0)
    ci = 100.0 * 1.96 * math.sqrt(p * (1.0 - p) / n) if n > 0 else None  # normal approximation, 95%
    return {"top-1": (100.0 * p, ci)}


def _fewshot_accuracy(model: Any, ckpt: Path, cfg: Config, device: torch.device) -> dict[str, tuple[float, float | None]]:
    """``{"5-way K-shot": (mean %, 95% CI %)}`` on ``test_classes`` episodes, as ``schane fewshot`` evaluates them.

    The episodes equal those of ``schane fewshot`` with the same ``fewshot.episode_seed``; ``C`` is chosen
    from ``fewshot.logreg_c_grid`` on ``val_classes`` episodes when the grid is set (else ``logreg_c``).
    """

    views = fewshot_views(cfg, model, (VAL_SPLIT, TEST_SPLIT))
    episodes, _ = draw_episodes(cfg, views, cfg.run_dir)
    row = FewShotStudy(cfg, views, episodes, device).row(cfg.name, None, None, [(ckpt.name, lambda: model)], cfg.name)
    fs = cfg.fewshot
    return {f"{fs.ways}-way {shot}-shot": (t["mean"], None if t["half_width"] is None or math.isnan(t["half_width"])
                                           else t["half_width"]) for shot, t in row["test"].items()}


def _run_or_reuse(run_cfg: Config, progress: bool) -> tuple[Path, dict[str, Any], float | None]:
    """Train ``run_cfg`` unless its run directory already holds a finished run with that config."""
    import yaml


    run_dir = run_cfg.run_dir
    timing = run_dir / "compare_time.json"
    if (run_dir / "final.json").is_file():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        diff = config_diff(saved or {}, json.loads(json.dumps(to_dict(run_cfg))), ignore=_EVAL_ONLY)
        if diff:
            raise ValueError(
                f"{run_dir} holds a finished run with a different training config ({'; '.join(diff[:5])}); "
                "delete that directory to retrain it, or set another output_dir/name for the comparison"
            )
        logger.info("reusing %s", run_dir)
    else:
        before = json.loads(timing.read_text())["train_time_s"] if timing.is_file() else 0.0
        start = time.perf_counter()
        train(run_cfg, resume="auto" if (run_dir / "last.pt").is_file() else None)
        timing.write_text(json.dumps({"train_time_s": before + time.perf_counter() - start}))
    final = json.loads((run_dir / "final.json").read_text())
    seconds = json.loads(timing.read_text())["train_time_s"] if timing.is_file() else _logged_seconds(run_dir)
    return run_dir, final, seconds


def _logged_seconds(run_dir: Path) -> float | None:
    """Training time from the first and last ``time`` stamps of ``metrics.jsonl`` (runs compare did not train)."""

    try:
        stamps = [r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if isinstance(r.get("time"), (int, float))]
    except FileNotFoundError:
        return None
    return float(stamps[-1] - stamps[0]) if len(stamps) >= 2 else None


def _evaluate_run(run_cfg: Config, method: str, label: str, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:

    run_dir, final, seconds = _run_or_reuse(run_cfg, progress)
    ckpt = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    device = resolve_device(run_cfg.train.device)
    model, _, _ = load_checkpoint_model(ckpt, map_location=device)
    _, kind = resolve_split(run_cfg, run_cfg.analysis.split)
    if kind == "fewshot":
        accuracy = _fewshot_accuracy(model, ckpt, run_cfg, device)
    else:
        accuracy = _classification_accuracy(final, model, run_cfg, device, progress)
    row_metrics, data = metrics_for(model, run_cfg, device, progress)
    row = {"method": method, "label": label, "accuracy": accuracy, **row_metrics, "train_time_s": seconds,
           "run_dir": str(run_dir), "checkpoint": str(ckpt)}
    return row, data


def _jobs(cfg: Config, runs_dir: Path) -> tuple[list[tuple[str, str, dict[str, Any], str | None]], dict[str, float]]:
    """``(method, label, overrides, sweep key)`` of every run, and each swept key's value in the default run."""
    acfg = cfg.analysis
    jobs: list[tuple[str, str, dict[str, Any], str | None]] = [(m, parse_method(m)[0], {}, None) for m in acfg.methods]
    base_values: dict[str, float] = {}
    for key, values in acfg.sweeps.items():
        base_values[key] = float(_get_dotted(method_config(cfg, "schane", runs_dir), key))
        for v in values:
            if "schane" in acfg.methods and float(v) == base_values[key]:
                continue  # the same run as the "schane" method: reused below
            jobs.append(("schane", f"SCHaNe + CE, {key.split('.')[-1]}={v:g}", {key: v}, key))
    return jobs, base_values


def _get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def run_compare(cfg: Config, *, progress: bool | None = None) -> Path:
    """Train and compare ``cfg.analysis.methods`` and sweeps; write ``cfg.run_dir / "report"``.

    Every run is ``cfg`` with only the loss changed (:func:`method_config`), so data, seeds,
    model and budget are identical. Runs live in ``report/runs/<method>`` and are reused when
    they finished with the same config (an interrupted run resumes). The report holds a table
    (accuracy ± 95% CI: top-1 on ``test`` for classification datasets, N-way K-shot episodes on
    ``test_classes`` for few-shot datasets, evaluated as ``schane fewshot`` does; the embedding
    metrics; training time), t-SNE panels side by side, training curves and one accuracy-vs-value
    plot per sweep.

    Args:
        cfg: the comparison's :class:`~schane.config.Config`.
        progress: show progress (default ``cfg.train.progress``).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: on unknown methods or sweep keys, or a run directory holding another config.
        FileNotFoundError: when the data is missing.
    """
    check_config(cfg)
    show = cfg.train.progress if progress is None else progress
    report_dir = cfg.run_dir / "report"
    runs_dir = report_dir / "runs"
    prepare_run_dir(report_dir)
    jobs, base_values = _jobs(cfg, runs_dir)
    run_cfgs = [method_config(cfg, m, runs_dir, ov) for m, _, ov, _ in jobs]  # validate everything first
    rows: list[dict[str, Any]] = []
    sweep_rows: dict[str, list[dict[str, Any]]] = {}
    panels: dict[str, tuple[Any, Any]] = {}
    class_names: list[str] = []
    curves: dict[str, Path] = {}
    for (method, label, ov, key), run_cfg in zip(jobs, run_cfgs, strict=True):
        logger.info("== %s: %s", label, run_cfg.run_dir)
        row, data = _evaluate_run(run_cfg, method, label, show)
        if key is None:
            rows.append(row)
            panels[label] = (data["features"], data["labels"])
            class_names = class_names or data["classes"]
            curves[method] = run_cfg.run_dir
        else:
            row["sweep_value"] = float(ov[key])
            sweep_rows.setdefault(key, []).append(row)
    figures = _figures(cfg, report_dir, rows, sweep_rows, base_values, panels, class_names, curves)
    split = resolve_split(cfg, cfg.analysis.split)[0]
    notes = [
        f"dataset `{cfg.data.name}`, backbone `{cfg.model.backbone}`, {cfg.optim.epochs} epochs, "
        f"batch {cfg.data.batch_size}, seed {cfg.train.seed}; every run differs only in its loss",
        f"metrics on split `{split}`; k-NN: k={cfg.analysis.knn_k}, "
        + ("leave-one-out within the split" if cfg.analysis.knn_reference == "loo" else "train-split neighbours"),
        "accuracy ± 95% confidence interval",
    ]
    sections = {f"Sweep over `{k}` (SCHaNe + CE)": rs for k, rs in sweep_rows.items()}
    return write_report(rows, figures, report_dir, title=f"schane comparison: {cfg.name}", notes=notes,
                        sections=sections)


def _figures(cfg: Config, report_dir: Path, rows: list[dict[str, Any]], sweep_rows: dict[str, list[dict[str, Any]]],
             base_values: dict[str, float], panels: dict[str, tuple[Any, Any]], class_names: list[str],
             curves: dict[str, Path]) -> dict[str, Path]:
    """t-SNE panels, training curves and sweep plots of a comparison (the sweep rows are completed in place)."""

    acfg = cfg.analysis
    figures: dict[str, Path] = {}
    split = resolve_split(cfg, acfg.split)[0]
    figures[f"t-SNE of the pooled {split} features"] = plots.tsne_panels(
        panels, report_dir / "tsne.png", class_names=class_names, max_points=acfg.max_points,
        perplexity=acfg.tsne_perplexity, seed=acfg.seed,
    )
    try:
        figures["Training curves"] = plots.training_curves(curves, report_dir / "curves.png")
    except (ValueError, FileNotFoundError) as e:
        logger.warning("no training curves: %s", e)
    schane_row = next((r for r in rows if r["method"] == "schane"), None)
    for key in acfg.sweeps:
        if schane_row is not None:  # the default SCHaNe run is a point of every sweep
            sweep_rows.setdefault(key, []).append({**schane_row, "sweep_value": base_values[key],
                                                   "label": f"SCHaNe + CE, {key.split('.')[-1]}={base_values[key]:g}"})
        sweep_rows[key] = sorted(sweep_rows.get(key, []), key=lambda r: r["sweep_value"])
    if sweep_rows:
        acc_label = _main_accuracy_label(rows or [r for rs in sweep_rows.values() for r in rs])
        sweeps = {k: [(r["sweep_value"], *accuracy_entries(r)[acc_label]) for r in rs] for k, rs in sweep_rows.items()}
        baselines = {r["label"]: accuracy_entries(r)[acc_label][0] for r in rows
                     if r["method"] != "schane" and acc_label in accuracy_entries(r)}
        figures["Sweeps"] = plots.sweep_plot(
            sweeps, report_dir / "sweeps.png", ylabel=f"{acc_label} accuracy (%)", baselines=baselines,
            label="SCHaNe + CE (swept)",
        )
    return figures


def _main_accuracy_label(rows: Sequence[Mapping[str, Any]]) -> str:
    labels = [a for r in rows for a in accuracy_entries(r)]
    if not labels:
        raise ValueError("no accuracy to plot in the sweep rows")
    return labels[-1]


# --------------------------------------------------------------------------- analyze


def analyze_checkpoint(
    path: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
    allow_class_mismatch: bool = False,
) -> dict[str, Any]:
    """Embedding metrics and a t-SNE map of one checkpoint's pooled features.

    Writes ``metrics.json`` and ``tsne_<split>.png`` to ``out_dir`` (default: an ``analysis`` folder next
    to the checkpoint). The dataset's training classes must be those of the checkpoint.

    Args:
        path: a checkpoint written by ``schane train``.
        split: the analysed split (``test`` means ``test_classes`` on few-shot datasets).
        out_dir: output directory.
        overrides: dotted overrides of the checkpoint's config (``data.*``, ``analysis.*``...).
        progress: show progress bars on a terminal.
        allow_class_mismatch: analyse even when the data's training classes differ from the checkpoint's.

    Returns:
        The metrics (see :func:`~schane.analysis.report.compute_embedding_metrics`) plus ``checkpoint``,
        ``split``, ``n`` and ``tsne``.

    Raises:
        FileNotFoundError: when the checkpoint or the data is missing.
        ValueError: on a bad split or override, or other classes than the checkpoint's.
    """

    ckpt = Path(path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found; pass a best.pt/last.pt written by 'schane train'")
    loaded = load_for_evaluation(ckpt, [*(overrides or []), f"analysis.split={split}"])
    cfg, model = loaded.cfg, loaded.model
    resolve_split(cfg, split)
    if "train" in dataset_splits(cfg):
        check_class_names(loaded.class_names, load_split(cfg, "train").classes, f"{cfg.data.name} (train)",
                          allow=allow_class_mismatch)
    row, data = metrics_for(model, cfg, loaded.device, progress)
    out = Path(out_dir) if out_dir is not None else ckpt.parent / "analysis"
    png = tsne_plot(
        data["features"], data["labels"], out / f"tsne_{data['split']}.png", class_names=data["classes"],
        title=f"{cfg.name} ({cfg.loss.name}), {data['split']}", max_points=cfg.analysis.max_points,
        perplexity=cfg.analysis.tsne_perplexity, seed=cfg.analysis.seed,
    )
    result = {"checkpoint": str(ckpt), "split": data["split"], "n": int(len(data["labels"])), **row, "tsne": str(png)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def format_analysis(result: Mapping[str, Any]) -> str:
    """The aligned text table an :func:`analyze_checkpoint` result is printed as."""
    names = {key: head for key, head, _ in METRIC_COLUMNS}
    fmts = {key: fmt for key, _, fmt in METRIC_COLUMNS}
    lines = [("checkpoint", str(result["checkpoint"])), ("split", f"{result['split']} ({result['n']} images)")]
    for key, value in result.items():
        if key in ("checkpoint", "split", "n", "tsne"):
            continue
        base = key.removeprefix("proj_")
        name = names.get(base, base) + (" (projection)" if key.startswith("proj_") else "")
        lines.append((name, format_cell(value, fmts.get(base, "{:.4f}"))))
    lines.append(("t-SNE", str(result["tsne"])))
    w = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in lines)
