"""A sweep's evaluation and outputs: per cell, each metric per method across seeds and paired differences.

* ``fewshot``: :func:`schane.pipelines.fewshot.run_fewshot` on the cell's config, reusing its finished runs:
  every method on identical episodes, ``OUT/<cell>/fewshot.json`` as ``schane fewshot`` writes it;
* ``classification``: each run's test top-1 (``final.json``, the selected weights evaluated once);
* ``validation``: :func:`validation_scores`, the accuracy on validation-class episodes of the checkpoint and
  option chosen on them, as ``schane fewshot`` chooses (the novel classes are never loaded): for choosing
  settings, never for reporting them.

Every cell also gets the base-class validation top-1 at the last epoch of each run. Differences are paired
by seed (and, for few-shot, over identical episodes per seed); intervals are 95% Student-t across seeds.
Outputs: ``OUT/sweep.json``, ``OUT/report.md`` (one table per cell) and ``OUT/sweep_<key>.png`` (each metric
against each grid key, one line per method).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from schane.config import Config, to_dict
from schane.engine.checkpoint import load_checkpoint, load_checkpoint_model
from schane.engine.device import resolve_device
from schane.fewshot.episodes import sample_episodes
from schane.fewshot.protocol_b import settings_grid
from schane.fewshot.stats import seed_summary
from schane.pipelines.fewshot import PRETRAINED, label, method_pairs, pretrained_model, run_fewshot
from schane.pipelines.scoring import VAL_SPLIT, fewshot_accuracies, fewshot_views
from schane.pipelines.sweep import FINISHED, Cell, Run, Sweep
from schane.pipelines.train import train

logger = logging.getLogger(__name__)

BASE_METRIC = "base val top-1"


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _clean(x.item())
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def summarise(values: dict[str, list[float | None]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method the mean over seeds with its t-interval; per pair of methods the paired (by seed) difference.

    Args:
        values: ``{method: [value of seed 0, seed 1, ...]}`` (``None`` where a run has no value).
        methods: the methods in their listed order (pairs: :func:`~schane.pipelines.fewshot.method_pairs`).
    """

    complete: dict[str, list[float]] = {m: [float(x) for x in v if x is not None] for m, v in values.items()
                                        if v and None not in v}
    rows = [{"method": m, "values": complete[m], **seed_summary(complete[m]).to_dict()}
            for m in methods if m in complete]
    diffs = []
    for m, b in method_pairs(list(methods)):
        if m in complete and b in complete:
            d = [x - y for x, y in zip(complete[m], complete[b], strict=True)]
            diffs.append({"method": m, "baseline": b, "values": d, **seed_summary(d).to_dict()})
    return {"rows": rows, "differences": diffs}


def _base_val(run_dir: Path) -> float | None:
    final = json.loads((run_dir / "final.json").read_text())
    top1 = (final.get("last_val") or {}).get("top1")
    return None if top1 is None else 100.0 * top1


def _complete_seeds(cell: Cell, runs: Sequence[Run], seeds: Sequence[int]) -> list[int]:
    ok = {(r.method, r.seed) for r in runs if r.status in FINISHED}
    return [s for s in seeds if all((m, s) in ok for m in cell.methods)]


# --------------------------------------------------------------------------- evaluation per cell


def _finished_run(cfg: Config, resume: str | None = "auto") -> Any:
    """``run_fewshot``'s ``train_fn`` in a sweep: reuse a finished run, never train one."""

    if not (Path(cfg.run_dir) / "final.json").is_file():
        raise RuntimeError(f"{cfg.run_dir} is not finished")
    return train(cfg, resume="auto")


def _fewshot_cell(cell: Cell, seeds: list[int]) -> dict[str, Any]:
    import copy


    cfg = copy.deepcopy(cell.cfg)
    cfg.fewshot.seeds = seeds
    res = run_fewshot(cfg, train_fn=_finished_run)
    metrics: dict[str, Any] = {}
    for shot in res["shots"]:
        name = f"{res['ways']}-way {shot}-shot"
        rows = [dict(x) for x in res["seeds"] if int(x["shot"]) == int(shot)]
        diffs = [dict(x) for x in res["seed_differences"] if int(x["shot"]) == int(shot) and x["baseline"] != PRETRAINED]
        ref = next((r["test"][str(shot)]["mean"] for r in res["rows"] if r["method"] == PRETRAINED), None)
        metrics[name] = {"rows": rows, "differences": diffs, "pretrained": ref}
    base = res.get("base_accuracy") or {}
    metrics[BASE_METRIC] = {"rows": base.get("rows", []),
                            "differences": [d for d in base.get("differences", []) if d["baseline"] != PRETRAINED]}
    return {"metrics": metrics, "results_file": res["results_file"],
            "fewshot": {"differences": [d for d in res["differences"] if d["baseline"] != PRETRAINED],
                        "seed_differences": res["seed_differences"]}}


def _classification_cell(cell: Cell, runs: Sequence[Run], seeds: list[int]) -> dict[str, Any]:
    per = {(r.method, r.seed): r for r in runs}
    test: dict[str, list[float | None]] = {}
    base: dict[str, list[float | None]] = {}
    for m in cell.methods:
        for s in seeds:
            final = json.loads((per[(m, s)].run_dir / "final.json").read_text())
            t = (final.get("test") or {}).get("top1")
            test.setdefault(m, []).append(None if t is None else 100.0 * t)
            base.setdefault(m, []).append(_base_val(per[(m, s)].run_dir))
    return {"metrics": {"test top-1": summarise(test, cell.methods), BASE_METRIC: summarise(base, cell.methods)}}


def validation_scores(cfg: Config, runs: Sequence[tuple[str, int | None, Path | None]]) -> dict[str, Any]:
    """Accuracy (%) on validation-class episodes, per run and shot, of the checkpoint and option chosen on them.

    This is the selection step of ``schane fewshot`` (``best.pt`` or ``last.pt``, and ``C`` of protocol A or
    ``(steps, lr)`` of protocol B) with its score kept: what a comparison of settings uses. The episodes are
    the ones ``schane fewshot`` draws for validation (``fewshot.val_episodes``, ``fewshot.episode_seed``);
    the novel (test) classes are never loaded.

    Args:
        cfg: the cell's config (data, model, ``fewshot``).
        runs: ``(method, seed, run_dir)``; a run directory of ``None`` scores the pretrained backbone.

    Returns:
        ``{"ways", "shots", "episodes", "runs": [{"method", "seed", "run_dir", "val": {shot: acc},
        "choice": {shot: {"checkpoint", "option"}}}]}``.

    Raises:
        ValueError: when ``cfg.data`` has no validation classes.
        FileNotFoundError: when a run has no checkpoint.
    """
    import torch


    fs = cfg.fewshot
    device = resolve_device(cfg.train.device)
    pretrained = pretrained_model(cfg, fs.ways)
    views = fewshot_views(cfg, pretrained, (VAL_SPLIT,))
    episodes = {s: sample_episodes(views.labels[VAL_SPLIT], fs.ways, s, fs.queries, fs.val_episodes, fs.episode_seed)
                for s in fs.shots}
    options = (settings_grid(fs.finetune_steps, fs.finetune_lr) if fs.protocol == "B"
               else list(fs.logreg_c_grid) or [fs.logreg_c])
    out = []
    for method, seed, run_dir in runs:
        if run_dir is None:
            cands: list[tuple[str, Any]] = [("pretrained", lambda: pretrained)]
        else:
            best, last = Path(run_dir) / "best.pt", Path(run_dir) / "last.pt"
            if not last.is_file():
                raise FileNotFoundError(f"{last} not found: the run is not finished")
            paths = [last]
            if best.is_file():
                a, b = load_checkpoint(best)["model"], load_checkpoint(last)["model"]
                same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                paths = [best] if same else [best, last]
            cands = [(p.name, lambda p=p: load_checkpoint_model(p, map_location=device)[0]) for p in paths]
        score: dict[str, float] = {}
        choice: dict[str, dict[str, Any]] = {}
        for name, load in cands:
            accs = fewshot_accuracies(load(), cfg, views, VAL_SPLIT, episodes, options, device=device,
                                      tag=f"{method} s{seed} [{name}]")
            for (shot, opt), a in accs.items():
                if str(shot) not in score or float(a.mean()) > score[str(shot)]:  # first of equals, as fewshot
                    score[str(shot)] = float(a.mean())
                    choice[str(shot)] = {"checkpoint": name, "option": list(opt) if isinstance(opt, tuple) else opt}
        out.append({"method": method, "seed": seed, "run_dir": None if run_dir is None else str(run_dir),
                    "val": score, "choice": choice})
        logger.info("[sweep] %s seed %s: validation-class %s", method, seed,
                    ", ".join(f"{s}-shot {v:.2f}%" for s, v in score.items()))
    return {"ways": fs.ways, "shots": list(fs.shots), "episodes": fs.val_episodes, "runs": out}


def _validation_cell(cell: Cell, runs: Sequence[Run], seeds: list[int]) -> dict[str, Any]:
    per = {(r.method, r.seed): r for r in runs}
    todo: list[tuple[str, int | None, Path | None]] = [(m, s, per[(m, s)].run_dir) for m in cell.methods for s in seeds]
    if cell.cfg.fewshot.include_pretrained:
        todo.insert(0, ("pretrained", None, None))
    scores = validation_scores(cell.cfg, todo)
    metrics: dict[str, Any] = {}
    for shot in scores["shots"]:
        vals = {m: [next(x["val"][str(shot)] for x in scores["runs"] if x["method"] == m and x["seed"] == s)
                    for s in seeds] for m in cell.methods}
        ref = next((x["val"][str(shot)] for x in scores["runs"] if x["method"] == "pretrained"), None)
        metrics[f"val-class {scores['ways']}-way {shot}-shot"] = {**summarise(vals, cell.methods), "pretrained": ref}
    base = {m: [_base_val(per[(m, s)].run_dir) for s in seeds] for m in cell.methods}
    metrics[BASE_METRIC] = summarise(base, cell.methods)
    (Path(cell.cfg.run_dir) / "validation.json").write_text(json.dumps(_clean(scores), indent=1))
    return {"metrics": metrics, "validation": scores}


def gather(sweep: Sweep) -> dict[str, Any]:
    """Evaluate every cell on the seeds where all its methods finished; the sweep's results (``sweep.json``)."""
    cells = []
    for cell in sweep.cells:
        runs = sweep.cell_runs(cell)
        seeds = _complete_seeds(cell, runs, sweep.seeds)
        entry: dict[str, Any] = {"name": cell.name, "settings": cell.settings, "texts": cell.texts,
                                 "run_dir": str(cell.cfg.run_dir), "methods": cell.methods, "seeds": seeds,
                                 "runs": [r.to_dict() for r in runs], "metrics": {}}
        if seeds != sweep.seeds:
            entry["note"] = (f"evaluated on seeds {seeds} only: the other seeds have runs that did not finish"
                             if seeds else "not evaluated: no seed has every method finished")
        if seeds:
            where = cell.name or str(sweep.out)
            logger.info("[sweep] evaluating %s (%s, seeds %s)", where, sweep.evaluation, seeds)
            try:
                if sweep.evaluation == "fewshot":
                    entry.update(_fewshot_cell(cell, seeds))
                elif sweep.evaluation == "validation":
                    entry.update(_validation_cell(cell, runs, seeds))
                else:
                    entry.update(_classification_cell(cell, runs, seeds))
            except Exception as e:  # one cell's evaluation does not sink the others
                logger.exception("[sweep] evaluating %s failed", where)
                entry["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        cells.append(entry)
    failed = [r.to_dict() for r in sweep.failed]
    failed += [{"cell": c["name"], "method": None, "seed": None, "status": "evaluation failed",
                "error": c["error"], "log": None} for c in cells if c.get("error")]
    return {
        "out": str(sweep.out), "evaluation": sweep.evaluation,
        "grid": [{"keys": list(a.keys), "values": [list(v) for v in a.values], "texts": [list(t) for t in a.texts]}
                 for a in sweep.axes],
        "methods": sweep.cells[0].methods if sweep.cells else [], "seeds": sweep.seeds,
        "base_config": to_dict(sweep.base),
        "ci": "95% Student-t interval across training seeds: t(k-1)·sd/√k; differences paired by seed",
        "cells": cells, "failed": failed,
    }


# --------------------------------------------------------------------------- outputs


def _pm(x: dict[str, Any] | None, signed: bool = False) -> str:
    if not x or x.get("mean") is None:
        return "—"
    m = f"{x['mean']:+.2f}" if signed else f"{x['mean']:.2f}"
    hw = x.get("half_width")
    return m + (f" ± {hw:.2f}" if hw is not None else "") + (" *" if signed and x.get("excludes_zero") else "")


def _metric_names(results: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for c in results["cells"]:
        for k in c["metrics"]:
            if k not in names:
                names.append(k)
    return [n for n in names if n != BASE_METRIC] + ([BASE_METRIC] if BASE_METRIC in names else [])


def cell_table(cell: dict[str, Any], metrics: Sequence[str]) -> list[str]:
    """The markdown table of one cell: each method's mean ± interval per metric, then the paired differences."""

    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    methods = cell["methods"]
    for m in methods:
        cells = []
        for name in metrics:
            row = next((r for r in cell["metrics"].get(name, {}).get("rows", []) if r["method"] == m), None)
            cells.append(_pm(row))
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    if any(cell["metrics"].get(n, {}).get("pretrained") is not None for n in metrics):
        refs = [cell["metrics"].get(n, {}).get("pretrained") for n in metrics]
        lines.append("| pretrained (no fine-tuning) | " + " | ".join("—" if v is None else f"{v:.2f}" for v in refs) + " |")
    pairs = [(d["method"], d["baseline"]) for n in metrics for d in cell["metrics"].get(n, {}).get("differences", [])]
    for m, b in dict.fromkeys(pairs):
        cells = []
        for name in metrics:
            d = next((x for x in cell["metrics"].get(name, {}).get("differences", [])
                      if x["method"] == m and x["baseline"] == b), None)
            cells.append(_pm(d, signed=True))
        lines.append(f"| {label(m)} − {label(b)} | " + " | ".join(cells) + " |")
    return lines


def _failed_label(f: dict[str, Any]) -> str:
    run = f"{f['method']} seed {f['seed']}" if f.get("method") else "evaluation"
    return f"{f['cell']}: {run}" if f.get("cell") else run


def _title(cell: dict[str, Any]) -> str:
    return ", ".join(f"`{k}` = {t}" for k, t in cell["texts"].items()) or f"`{cell['name'] or 'all runs'}`"


def write_report(results: dict[str, Any], plots: Sequence[Path], path: Path) -> Path:
    """``report.md``: the sweep's settings, one table per cell, the plots and every run that did not finish."""
    metrics = _metric_names(results)
    n = len(results["seeds"])
    lines = [f"# Sweep: {results['out']}", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    what = {"fewshot": "few-shot accuracy (%) on the novel classes, schane fewshot's protocol, identical episodes for "
                       "every method; checkpoint and C chosen on validation-class episodes",
            "classification": "test top-1 (%) of the weights selected on the validation split, evaluated once",
            "validation": "accuracy (%) on validation-class episodes of the checkpoint and option chosen on them "
                          "(for choosing settings: the novel classes were never loaded)"}[results["evaluation"]]
    lines += [f"Methods: {', '.join(results['methods'])}; seeds {results['seeds']}; evaluation: {what}.",
              f"{BASE_METRIC}: validation top-1 on the base classes' held-out images at the last epoch.",
              f"Entries: mean over {n} seed(s) ± 95% Student-t interval across seeds; differences are paired by seed "
              "(* : the interval excludes 0).", ""]
    for cell in results["cells"]:
        lines += [f"## {_title(cell)}", ""]
        if cell.get("note"):
            lines += [f"*{cell['note']}.*", ""]
        if cell.get("error"):
            lines += [f"*evaluation failed: {cell['error']}*", ""]
        if cell["metrics"]:
            lines += [*cell_table(cell, [m for m in metrics if m in cell["metrics"]]), ""]
        if cell.get("results_file"):
            lines += [f"Per-seed rows and differences over identical episodes: `{cell['results_file']}`.", ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    if results["failed"]:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- {_failed_label(f)}: {f['status']}: {f.get('error') or ''} (log: `{f.get('log')}`)"
                  for f in results["failed"]]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _pow2(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               and float(v).is_integer() and (int(v) & (int(v) - 1)) == 0 for v in values) and len(values) > 1


def _spacing(values: Sequence[float]) -> float:
    v = sorted(set(float(x) for x in values))
    return min((b - a for a, b in zip(v, v[1:], strict=False)), default=1.0)


def plot_key(results: dict[str, Any], axis: dict[str, Any], path: Path) -> Path:
    """Each metric against one grid axis: one panel per metric, one line per method (and per value of the other
    axes), error bars the 95% interval across seeds; a log2 axis when the values are powers of two."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure


    keys = axis["keys"]
    key = keys[0]
    metrics = _metric_names(results)
    xs_all = [v[0] for v in axis["values"]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
    order = {t[0]: i for i, t in enumerate(axis["texts"])}
    fig = Figure(figsize=(4.4 * len(metrics) + 1.6, 3.8), dpi=110, layout="constrained")
    palette = [colormaps["tab10"](i) for i in range(10)]  # its ten colours, RGBA
    styles = ["-", "--", ":", "-."]
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        groups: dict[tuple[str, str], list[tuple[Any, float, float]]] = {}
        refs: dict[Any, float] = {}
        for cell in results["cells"]:
            data = cell["metrics"].get(metric)
            if not data or key not in cell["texts"]:
                continue
            others = ", ".join(f"{k.rsplit('.', 1)[-1]}={t}" for k, t in cell["texts"].items() if k not in keys)
            x = cell["settings"][key] if numeric else order[cell["texts"][key]]
            for r in data["rows"]:
                groups.setdefault((r["method"], others), []).append((x, r["mean"], r["half_width"] or 0.0))
            if data.get("pretrained") is not None:
                refs[x] = data["pretrained"]
        methods = list(dict.fromkeys(m for m, _ in groups))
        other_vals = list(dict.fromkeys(o for _, o in groups))
        log2 = numeric and _pow2(xs_all)
        for j, ((m, o), pts) in enumerate(groups.items()):
            pts.sort(key=lambda p: p[0])
            shift = (j - (len(groups) - 1) / 2) * 0.06  # side by side, so that the error bars do not hide each other
            xs = [p[0] * 2 ** shift if log2 else p[0] + shift * _spacing(xs_all if numeric else [0, 1]) for p in pts]
            ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        color=palette[methods.index(m) % 10], linestyle=styles[other_vals.index(o) % 4],
                        linewidth=1.6, label=label(m) + (f" ({o})" if o else ""))
        if refs:
            rx = sorted(refs)
            ax.plot(rx, [refs[x] for x in rx], color="0.5", linestyle=":", marker=".", label="pretrained")
        if log2:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(xs_all), [str(int(v)) for v in sorted(xs_all)])
            ax.minorticks_off()
        elif not numeric:
            ax.set_xticks(range(len(axis["texts"])), [t[0] for t in axis["texts"]])
        ax.set_xlabel(key + (f" (with {', '.join(keys[1:])})" if len(keys) > 1 else ""))
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    n = len(results["seeds"])
    fig.suptitle(f"mean over {n} seed(s), 95% interval across seeds", fontsize=9)
    fig.savefig(path)
    return path


def write_outputs(sweep: Sweep, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``sweep.json``, one ``sweep_<key>.png`` per grid axis and ``report.md`` into the sweep's directory."""
    out = sweep.out
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if any(c["metrics"] for c in results["cells"]):
        for axis in results["grid"]:
            if len(axis["values"]) > 1:
                path = out / f"sweep_{axis['keys'][0]}.png"
                try:
                    plots.append(plot_key(results, axis, path))
                except Exception:  # a plot never costs the results
                    logger.exception("[sweep] could not draw %s", path)
    results["files"] = {"sweep": str(out / "sweep.json"), "report": str(out / "report.md"),
                        "plots": [str(p) for p in plots]}
    (out / "sweep.json").write_text(json.dumps(_clean(results), indent=1))
    write_report(results, plots, out / "report.md")
    return results


def format_summary(results: dict[str, Any]) -> str:
    """The terminal summary: one table per cell, the runs that did not finish with their logs, the files."""
    metrics = _metric_names(results)
    lines = [f"sweep of {len(results['cells'])} cell(s), methods {', '.join(results['methods'])}, seeds "
             f"{results['seeds']}; mean ± 95% interval across seeds, differences paired by seed (* excludes 0)"]
    for cell in results["cells"]:
        lines += ["", _title(cell).replace("`", "")]
        if cell.get("note"):
            lines.append(f"  ({cell['note']})")
        if cell.get("error"):
            lines.append(f"  evaluation failed: {cell['error']}")
        if cell["metrics"]:
            ms = [m for m in metrics if m in cell["metrics"]]
            for row in cell_table(cell, ms)[2:]:
                parts = [p.strip() for p in row.strip("|").split("|")]
                lines.append(f"  {parts[0]:<34}" + "".join(f"{p:>22}" for p in parts[1:]))
            lines.insert(len(lines) - len(cell_table(cell, ms)[2:]), f"  {'':<34}" + "".join(f"{m:>22}" for m in ms))
    if results["failed"]:
        lines += ["", f"{len(results['failed'])} run(s) did not finish (submit the sweep again to resume them):"]
        lines += [f"  {_failed_label(f)}: {f['status']}: {f.get('error') or ''} (log: {f.get('log')})"
                  for f in results["failed"]]
    files = results.get("files", {})
    lines += ["", f"results: {files.get('sweep', '')}  report: {files.get('report', '')}"
              + (f"  plots: {', '.join(files['plots'])}" if files.get("plots") else "")]
    return "\n".join(lines)


__all__ = ["cell_table", "format_summary", "gather", "plot_key", "summarise", "validation_scores",
           "write_outputs", "write_report"]
