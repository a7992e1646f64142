"""``schane fewshot``: fine-tune per loss and seed, select on validation classes, test once.

For every loss in ``fewshot.losses`` and every seed in ``fewshot.seeds`` the model is
fine-tuned on the base classes (``train``/``val`` splits) with :func:`schane.pipelines.train.train`
into ``run_dir/<loss>-seed<seed>``. The pretrained backbone without fine-tuning is a row of
its own (``fewshot.include_pretrained``). The checkpoint (``best.pt`` or ``last.pt``) and,
for protocol A, the logistic-regression ``C`` (``fewshot.logreg_c_grid``), for protocol B the
fine-tuning steps and learning rate (``fewshot.finetune_steps`` x ``fewshot.finetune_lr``) are chosen
per shot on ``val_classes`` episodes; ``test_classes`` episodes are evaluated once, with the
selected choice, at the end. Every method sees the identical episode lists, which are
written to ``run_dir/episodes/*.json``. See docs/fewshot.md.

Examples:
    >>> from schane.config import load_config
    >>> results = run_fewshot(load_config("configs/demo.yaml"))  # doctest: +SKIP
    >>> results["rows"][0]["test"]["1"]["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from schane.config import Config, parse_method, to_dict
from schane.data.base import check_fewshot_capacity
from schane.data.custom import write_class_lists
from schane.engine.checkpoint import load_checkpoint, load_checkpoint_model
from schane.engine.device import resolve_device
from schane.fewshot.episodes import Episode, sample_episodes, save_episodes
from schane.fewshot.overlap import pretraining_overlap
from schane.fewshot.stats import paired_difference, seed_summary
from schane.models import SCHaNeModel, build_model
from schane.pipelines.runs import check_class_names, check_config, prepare_run_dir, with_overrides
from schane.pipelines.scoring import (
    TEST_SPLIT,
    VAL_SPLIT,
    Candidate,
    FewShotStudy,
    FewShotViews,
    fewshot_views,
    selection_text,
)
from schane.pipelines.splits import dataset_splits, load_split
from schane.pipelines.train import train

logger = logging.getLogger(__name__)

PRETRAINED = "pretrained"
PRETRAINED_LABEL = "pretrained (no fine-tuning)"


def label(method: str) -> str:
    """The report label of a method (``pretrained`` or a compared method such as ``schane_beta0``)."""
    return PRETRAINED_LABEL if method == PRETRAINED else parse_method(method, "fewshot.losses")[0]



def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def pretrained_model(cfg: Config, num_classes: int) -> SCHaNeModel:
    """The backbone without fine-tuning; its random parts (the heads) are the same in every rerun."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, num_classes)


def check_fewshot_classes(
    cfg: Config,
    classes: Mapping[str, Sequence[str]],
    labels: Mapping[str, Sequence[int]],
    out_dir: str | Path,
    *,
    class_lists: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The checks ``schane fewshot`` runs on its classes before any training.

    1. Every split of ``classes`` can hold ``fewshot.ways``-way episodes of the largest shot plus
       ``fewshot.queries`` images a class (:func:`schane.data.base.check_fewshot_capacity`).
    2. Own data made few-shot by ``class_splits``/``class_fractions``: the resolved lists are written to
       ``out_dir/class_splits/{train,val,test}.txt`` (``data.options.class_splits`` reads them back).
    3. The pretraining overlap (:func:`schane.fewshot.overlap.pretraining_overlap`), logged as a warning when classes were seen.

    Args:
        cfg: The run's :class:`~schane.config.Config` (``model``, ``data.name``, ``fewshot``).
        classes: ``{split: class names}`` of ``val_classes`` and ``test_classes``.
        labels: ``{split: [M] label of every image}``.
        out_dir: The run directory.
        class_lists: The dataset's resolved ``{"train", "val", "test"}`` lists (own data), or ``None``.

    Returns:
        ``{"pretraining_overlap": report, "class_splits": folder written or None}``.

    Raises:
        ValueError: If a split has fewer classes than ``fewshot.ways`` or a class too few images.
    """
    fs = cfg.fewshot
    for split, names in classes.items():
        check_fewshot_capacity(cfg.data.name, split, labels[split], names, fs.ways, max(fs.shots), fs.queries)
    written = None
    if class_lists:
        written = str(write_class_lists(class_lists, Path(out_dir) / "class_splits"))
        logger.info(
            "[fewshot] class lists (base %d, validation %d, novel %d) written to %s",
            len(class_lists["train"]),
            len(class_lists["val"]),
            len(class_lists["test"]),
            written,
        )
    m = cfg.model
    report = pretraining_overlap(
        m.backbone, classes, pretrained=m.pretrained, checkpoint=m.checkpoint, dataset=cfg.data.name
    )
    seen = report["status"] == "overlap" or (
        report["status"] == "not_wordnet" and not any(p["labels_used"] for p in report["pretraining"])
    )
    logger.log(logging.WARNING if seen else logging.INFO, "[fewshot] %s", report["message"])
    return {"pretraining_overlap": report, "class_splits": written}


def draw_episodes(cfg: Config, views: FewShotViews, run_dir: Path) -> tuple[dict[str, dict[int, list[Episode]]],
                                                                         dict[str, dict[str, str]]]:
    """Sample the validation- and test-class episodes every method is evaluated on; write them to JSON.

    Returns:
        ``(episodes {split: {shot: [Episode]}}, files {split: {shot: path}})``.
    """
    fs = cfg.fewshot
    episodes: dict[str, dict[int, list[Episode]]] = {VAL_SPLIT: {}, TEST_SPLIT: {}}
    files: dict[str, dict[str, str]] = {VAL_SPLIT: {}, TEST_SPLIT: {}}
    for split, n in ((VAL_SPLIT, fs.val_episodes), (TEST_SPLIT, fs.episodes)):
        for shot in fs.shots:
            eps = sample_episodes(views.labels[split], fs.ways, shot, fs.queries, n, fs.episode_seed)
            path = run_dir / "episodes" / f"{split}_{fs.ways}way_{shot}shot.json"
            save_episodes(path, eps, views.labels[split], split, seed=fs.episode_seed, extra={"dataset": cfg.data.name})
            episodes[split][shot] = eps
            files[split][str(shot)] = str(path)
    return episodes, files


def run_name(method: str, seed: int) -> str:
    """The run directory name of one (method, seed) of a study, e.g. ``schane-seed0``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in method) + f"-seed{seed}"


def run_config(cfg: Config, method: str, seed: int) -> Config:
    """The base-class fine-tuning run of one (method, seed) of a study: ``run_dir/<method>-seed<seed>``.

    ``method`` is a loss name or a compared method (``schane_beta0``, ``LOSS@key=value``): its overrides apply.
    """
    _, overrides = parse_method(method, "fewshot.losses")
    sub = with_overrides(cfg, overrides)
    sub.train.seed = seed
    sub.train.test_at_end = False
    sub.output_dir = str(cfg.run_dir)
    sub.name = run_name(method, seed)
    return sub


def method_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """``(method, baseline)`` pairs: every method against each one listed before it (``ce`` first)."""
    order = sorted(methods, key=lambda m: m != "ce")
    return [(m, b) for j, m in enumerate(order) for b in order[:j]]


def run_fewshot(cfg: Config, *, train_fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run the few-shot comparison described by ``cfg`` and return (and save) its results.

    Args:
        cfg: the configuration; ``cfg.fewshot`` sets the protocol, ``cfg.data`` must name a
            few-shot dataset (with ``val_classes`` and ``test_classes`` splits), and the
            other sections configure the base-class fine-tuning of each run.
        train_fn: the training function (default :func:`schane.pipelines.train.train`), called as
            ``train_fn(run_cfg, resume="auto")`` and returning an object with ``best_checkpoint``
            and ``last_checkpoint``. An existing finished run is therefore reused.

    Returns:
        A JSON-safe dict, also written to ``run_dir/fewshot.json`` (shot keys are strings;
        accuracies are in percent; ``nan`` is written as ``None``)::

            {
              "dataset", "backbone", "protocol", "ways", "queries", "shots", "episodes",
              "val_episodes", "support_aug", "ci_episodes", "ci_seeds",
              "episode_files": {split: {shot: path}},
              "rows": [                      # one per method and training seed
                {"method": "pretrained" | loss name, "seed": int | None, "run_dir": str | None,
                 "selected": {shot: {"checkpoint", "C", "steps", "lr", "val_acc", "val_grid"}},
                 "test": {shot: {"mean", "half_width", "std", "n", "excludes_zero"}},
                 "per_episode": {shot: [acc of test episode 0, 1, ...]}}],
              "differences": [               # paired over identical test episodes
                {"method", "baseline", "seed", "shot", "mean", "half_width", "std", "n", "excludes_zero"}],
              "seeds": [                     # each loss across training seeds (Student-t interval)
                {"method", "shot", "values", "mean", "half_width", "std", "n", "excludes_zero"}],
              "seed_differences": [          # per-seed mean differences across seeds
                {"method", "baseline", "shot", "values", "mean", "half_width", "std", "n", "excludes_zero"}],
              "run_dir", "results_file", "seconds"
            }

        ``selected[shot]`` is the choice made on validation-class episodes: the checkpoint, ``C`` (protocol A)
        or ``steps`` and ``lr`` (protocol B; 0 steps, the prototype classifier, has ``lr`` 0.0), the
        validation accuracy (``None`` when there was nothing to choose) and ``val_grid``, the validation
        accuracy of every alternative.

        Differences use ``"ce"`` as baseline when it is among the losses, and
        ``"pretrained"`` for every fine-tuned run.

    Raises:
        ValueError: on an invalid few-shot config or a dataset without few-shot splits.
        FileNotFoundError: when the dataset's files are missing.
    """
    check_config(cfg)
    splits = dataset_splits(cfg)
    if VAL_SPLIT not in splits or TEST_SPLIT not in splits:
        raise ValueError(
            f"dataset {cfg.data.name!r} has no {VAL_SPLIT}/{TEST_SPLIT} splits; schane fewshot needs a few-shot "
            "benchmark such as glyphs, cifar_fs, fc100, mini_imagenet, or your own image_folder/csv data with "
            "data.options.class_splits or data.options.class_fractions (docs/fewshot.md)"
        )
    if train_fn is None:
        train_fn = train
    t0 = time.perf_counter()
    fs, run_dir = cfg.fewshot, Path(cfg.run_dir)
    prepare_run_dir(run_dir)
    pretrained = pretrained_model(cfg, fs.ways)
    views = fewshot_views(cfg, pretrained, (VAL_SPLIT, TEST_SPLIT))
    # before any training: episode sizes, own data's class lists (RUN_DIR/class_splits/), pretraining overlap
    class_checks = check_fewshot_classes(cfg, views.classes, views.labels, run_dir,
                                         class_lists=getattr(views.eval[VAL_SPLIT].base, "class_lists", None))
    episodes, files = draw_episodes(cfg, views, run_dir)
    study = FewShotStudy(cfg, views, episodes, resolve_device(cfg.train.device))
    rows: list[dict[str, Any]] = []
    if fs.include_pretrained:
        logger.info("[fewshot] %s: %s without fine-tuning", PRETRAINED, cfg.model.backbone)
        def keep(m: SCHaNeModel = pretrained) -> SCHaNeModel:  # bound now: `pretrained` is deleted below
            return m

        rows.append(study.row(PRETRAINED, None, None, [("none", keep)], PRETRAINED))
    del pretrained
    base_classes = load_split(cfg, "train").classes if fs.losses else []
    for loss in fs.losses:
        for seed in fs.seeds:
            rows.append(_fine_tuned_row(study, loss, seed, train_fn, base_classes))
    results = _summarise(cfg, rows, files)
    results.update(class_checks)  # "pretraining_overlap", "class_splits"
    results["seconds"] = time.perf_counter() - t0
    results["run_dir"] = str(run_dir)
    results["results_file"] = str(run_dir / "fewshot.json")
    results = _nan_to_none(results)
    (run_dir / "fewshot.json").write_text(json.dumps(results, indent=1))
    return results


def _fine_tuned_row(study: FewShotStudy, loss: str, seed: int, train_fn: Callable[..., Any],
                    base_classes: Sequence[str]) -> dict[str, Any]:
    sub = run_config(study.cfg, loss, seed)
    logger.info("[fewshot] fine-tuning %s (seed %d) on the base classes -> %s", loss, seed, sub.run_dir)
    result = train_fn(sub, resume="auto")
    cands = _checkpoint_candidates(result.best_checkpoint, result.last_checkpoint)
    trained = load_checkpoint(cands[0][1]).get("class_names")
    check_class_names(trained, base_classes, f"the base classes of {study.cfg.data.name} (run {sub.run_dir})")
    device = study.device
    loaders: list[Candidate] = [(name, partial(lambda p: load_checkpoint_model(p, map_location=device)[0], p))
                                for name, p in cands]
    row = study.row(loss, seed, str(sub.run_dir), loaders, f"{loss} s{seed}")
    for s in row["selected"].values():
        for entry in (s, *s["val_grid"]):
            entry["checkpoint"] = str(dict(cands)[entry["checkpoint"]])
    row["base_val"] = _base_accuracy(result.metrics)
    return row


def _base_accuracy(final: dict[str, Any]) -> dict[str, float | None]:
    """Base-class validation top-1 (%) of a run: at its last epoch (``last``) and its best epoch (``best``).

    The last epoch's is the unselected figure; the best epoch's was used to choose ``best.pt``.
    """
    last = (final.get("last_val") or {}).get("top1")
    best = final.get("best_val_top1")
    return {"last": None if last is None else 100.0 * last, "best": None if best is None else 100.0 * best}


def _checkpoint_candidates(best: Path | None, last: Path) -> list[tuple[str, Path]]:
    """``best.pt`` then ``last.pt``, dropping ``last`` when its weights equal ``best``'s."""
    if best is None or not Path(best).exists():
        return [("last", Path(last))]
    a, b = load_checkpoint(best)["model"], load_checkpoint(last)["model"]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return [("best", Path(best))] if same else [("best", Path(best)), ("last", Path(last))]


def _summarise(cfg: Config, rows: list[dict[str, Any]], files: dict[str, dict[str, str]]) -> dict[str, Any]:
    fs = cfg.fewshot
    shots = [str(s) for s in fs.shots]
    per = {(r["method"], r["seed"]): r for r in rows}
    pairs = method_pairs(fs.losses) + ([(m, PRETRAINED) for m in fs.losses] if fs.include_pretrained else [])
    diffs: list[dict[str, Any]] = []
    for method, base in pairs:
        for seed in fs.seeds:
            other = per[(base, None if base == PRETRAINED else seed)]
            for s in shots:
                d = paired_difference(per[(method, seed)]["per_episode"][s], other["per_episode"][s])
                diffs.append({"method": method, "baseline": base, "seed": seed, "shot": int(s), **d.to_dict()})
    seeds_rows, seed_diffs = [], []
    for method in fs.losses:
        for s in shots:
            vals = [per[(method, seed)]["test"][s]["mean"] for seed in fs.seeds]
            seeds_rows.append({"method": method, "shot": int(s), "values": vals, **seed_summary(vals).to_dict()})
    for method, base in pairs:
        for s in shots:
            vals = [d["mean"] for d in diffs if d["method"] == method and d["baseline"] == base and d["shot"] == int(s)]
            seed_diffs.append({"method": method, "baseline": base, "shot": int(s), "values": vals,
                               **seed_summary(vals).to_dict()})
    return {
        "dataset": cfg.data.name,
        "backbone": cfg.model.backbone,
        "protocol": fs.protocol,
        "ways": fs.ways,
        "queries": fs.queries,
        "shots": list(fs.shots),
        "episodes": fs.episodes,
        "val_episodes": fs.val_episodes,
        "support_aug": fs.support_aug,
        "config": to_dict(cfg),
        "ci_episodes": "1.96 * s / sqrt(n), s = sample std (ddof=1) of the n per-episode accuracies",
        "ci_seeds": "t_{0.975, k-1} * s / sqrt(k), s = sample std (ddof=1) of the k per-seed values",
        "episode_files": files,
        "rows": rows,
        "differences": diffs,
        "seeds": seeds_rows,
        "seed_differences": seed_diffs,
        "base_accuracy": _base_summary(fs.losses, fs.seeds, per, pairs),
    }


def _base_summary(methods: Sequence[str], seeds: Sequence[int], per: dict[tuple[str, Any], dict[str, Any]],
                  pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Base-class validation top-1 at the last epoch, per method across seeds, and paired differences."""
    vals = {m: [per[(m, s)].get("base_val", {}).get("last") for s in seeds] for m in methods}
    rows = [{"method": m, "values": v, **seed_summary(v).to_dict()} for m, v in vals.items() if None not in v]
    diffs = []
    for m, b in pairs:
        if b in vals and None not in vals[m] and None not in vals[b]:
            d = [x - y for x, y in zip(vals[m], vals[b], strict=True)]
            diffs.append({"method": m, "baseline": b, "values": d, **seed_summary(d).to_dict()})
    return {"what": "base-class validation top-1 (%) at the last epoch, across training seeds",
            "rows": rows, "differences": diffs}


def _pm(mean: float | None, hw: float | None, signed: bool = False) -> str:
    if mean is None:
        return "n/a"
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return m + (f" ± {hw:.2f}" if hw is not None else " ± n/a")


def format_table(results: dict[str, Any]) -> str:
    """The terminal table of a :func:`run_fewshot` result (also works on a loaded fewshot.json)."""
    proto = {"A": "frozen features + logistic regression", "B": "per-episode fine-tuning"}[results["protocol"]]
    lines = [
        f"few-shot on {results['dataset']} ({results['backbone']}), protocol {results['protocol']} ({proto}): "
        f"{results['ways']}-way, {results['queries']} queries/class, {results['episodes']} test-class episodes "
        f"per shot (identical for every method)",
        "acc ± 95% CI over episodes: 1.96·s/√n, s = sample std (ddof=1); selection on validation-class episodes",
        *(["protocol B's selection: checkpoint, fine-tuning steps@learning rate (0 steps: the prototype "
           "classifier)"] if results["protocol"] == "B" else []),
        "",
        f"{'method':<22}{'seed':>5}{'shot':>5}  {'selected (val acc)':<24}{'test acc (%)':>16}",
    ]
    if results.get("pretraining_overlap"):  # classes the backbone saw in pretraining (schane.fewshot.overlap)
        lines.insert(2, results["pretraining_overlap"]["message"])
    for r in results["rows"]:
        for s, t in r["test"].items():
            sel = r["selected"][s]
            what = selection_text(sel)
            what += f" ({sel['val_acc']:.1f})" if sel.get("val_acc") is not None else ""
            seed = "-" if r["seed"] is None else str(r["seed"])
            lines.append(f"{r['method']:<22}{seed:>5}{s:>5}  {what:<24}{_pm(t['mean'], t['half_width']):>16}")
    diffs = [d for d in results["differences"] if d["baseline"] != PRETRAINED] or results["differences"]
    if diffs:
        lines += ["", "paired difference over identical episodes (points)", f"{'difference':<22}{'seed':>5}{'shot':>5}"
                  f"  {'':<24}{'Δ ± 95% CI':>16}  excludes 0"]
        for d in diffs:
            name = f"{d['method']} − {d['baseline']}"
            lines.append(f"{name:<22}{d['seed']:>5}{d['shot']:>5}  {'':<24}"
                         f"{_pm(d['mean'], d['half_width'], True):>16}  {'yes' if d['excludes_zero'] else 'no'}")
    n_seeds = max((len(r["values"]) for r in results["seeds"]), default=0)
    if n_seeds > 1:
        lines += ["", f"across {n_seeds} training seeds: mean, sd over seeds, 95% CI = t(k−1)·sd/√k "
                      "(few seeds: a wide interval)",
                  f"{'method':<22}{'':>5}{'shot':>5}  {'mean (sd)':<24}{'± 95% CI':>16}  excludes 0"]
        sd_rows = [(x["method"], x) for x in results["seeds"]]
        sd_rows += [(f"{x['method']} − {x['baseline']}", x) for x in results["seed_differences"]
                    if x["baseline"] != PRETRAINED or not any(y["baseline"] != PRETRAINED for y in results["seed_differences"])]
        for name, x in sd_rows:
            lines.append(f"{name:<22}{'':>5}{x['shot']:>5}  {_summary_cells(x, signed='−' in name)}")
    lines += _base_lines(results)
    lines.append(f"\nresults: {results.get('results_file', '')}")
    return "\n".join(lines)


def _base_lines(results: dict[str, Any]) -> list[str]:
    """The table's section on base-class validation top-1 (what fine-tuning did to the base classes)."""
    base = results.get("base_accuracy") or {}
    if not base.get("rows"):
        return []
    lines = ["", "base-class validation top-1 at the last epoch (%), across training seeds",
             f"{'method':<22}{'':>10}  {'mean (sd)':<24}{'± 95% CI':>16}  excludes 0"]
    for x in [*base["rows"], *base.get("differences", [])]:
        name = x["method"] if "baseline" not in x else f"{x['method']} − {x['baseline']}"
        lines.append(f"{name:<22}{'':>10}  {_summary_cells(x, signed='baseline' in x)}")
    return lines


def _summary_cells(x: dict[str, Any], *, signed: bool) -> str:
    """``mean (sd)``, ``± half-width`` and, for a difference (``signed``), whether it excludes 0."""
    sd = "n/a" if x["std"] is None else f"{x['std']:.2f}"
    mean = f"{x['mean']:+.2f}" if signed else f"{x['mean']:.2f}"
    hw = "n/a" if x["half_width"] is None else f"± {x['half_width']:.2f}"
    excl = ("yes" if x["excludes_zero"] else "no") if signed else ""
    return f"{mean + ' (' + sd + ')':<24}{hw:>16}  {excl}"
