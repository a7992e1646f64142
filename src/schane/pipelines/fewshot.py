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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schane.config import Config, parse_method, to_dict
from schane.fewshot.episodes import Episode, sample_episodes, save_episodes
from schane.fewshot.protocol_b import settings_grid
from schane.fewshot.stats import mean_ci, paired_difference, seed_summary
from schane.pipelines.setup import (
    FewShotViews,
    check_class_names,
    fewshot_accuracies,
    fewshot_views,
    load_split,
    prepare_run_dir,
    with_overrides,
)

logger = logging.getLogger(__name__)

VAL_SPLIT = "val_classes"
TEST_SPLIT = "test_classes"
PRETRAINED = "pretrained"

Candidate = tuple[str, Callable[[], torch.nn.Module]]


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def pretrained_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The backbone without fine-tuning; its random parts (the heads) are the same in every rerun."""
    from schane.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, num_classes)


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


@dataclass
class _Study:
    """The shared state of one few-shot study: its data, episodes and the selection rule."""

    cfg: Config
    views: FewShotViews
    episodes: dict[str, dict[int, list[Episode]]]
    device: torch.device

    @property
    def c_grid(self) -> list[float]:
        fs = self.cfg.fewshot
        if fs.protocol == "B":
            return [fs.logreg_c]  # unused by protocol B
        return list(fs.logreg_c_grid) or [fs.logreg_c]

    @property
    def options(self) -> list[Any]:
        """What is chosen on validation-class episodes beside the checkpoint: ``C`` (protocol A) or the
        :class:`~schane.fewshot.Setting` ``(steps, lr)`` of per-episode fine-tuning (protocol B, 0 steps first)."""
        fs = self.cfg.fewshot
        if fs.protocol == "B":
            return settings_grid(fs.finetune_steps, fs.finetune_lr)
        return self.c_grid

    def evaluate(self, model: torch.nn.Module, split: str, shots: Sequence[int], cs: Sequence[Any],
                 tag: str) -> dict[tuple[int, Any], np.ndarray]:
        eps = {s: self.episodes[split][s] for s in shots}
        return fewshot_accuracies(model, self.cfg, self.views, split, eps, cs, device=self.device, tag=tag)

    def select(self, candidates: list[Candidate], tag: str) -> dict[int, tuple[str, Any, float | None,
                                                                             list[tuple[float, str, Any]]]]:
        """Per shot: ``(candidate, option, validation accuracy, every (val acc, candidate, option))``, the
        option being ``C`` (A) or ``(steps, lr)`` (B), with the best mean on validation-class episodes."""
        shots, opts = self.cfg.fewshot.shots, self.options
        if len(candidates) * len(opts) == 1:
            return {s: (candidates[0][0], opts[0], None, []) for s in shots}
        scores: dict[int, list[tuple[float, str, Any]]] = {s: [] for s in shots}
        for name, load in candidates:
            res = self.evaluate(load(), VAL_SPLIT, shots, opts, f"{tag} [{name}]")
            for (shot, opt), accs in res.items():
                scores[shot].append((float(accs.mean()), name, opt))
        choice = {}
        for shot, sc in scores.items():
            # first of equals: earlier candidate, earlier option (smaller C; 0 steps, then fewer steps)
            best = max(sc, key=lambda t: t[0])
            choice[shot] = (best[1], best[2], best[0], sc)
        return choice

    def _selected(self, name: str, opt: Any, val_acc: float | None,
                  scores: list[tuple[float, str, Any]]) -> dict[str, Any]:
        """The ``selected`` entry of one shot: the choice and the validation accuracy of every alternative."""
        def what(o: Any) -> dict[str, Any]:
            if self.cfg.fewshot.protocol == "B":
                return {"C": None, "steps": int(o[0]), "lr": float(o[1])}
            return {"C": o, "steps": None, "lr": None}

        return {"checkpoint": name, **what(opt), "val_acc": val_acc,
                "val_grid": [{"checkpoint": n, **what(o), "val_acc": a} for a, n, o in scores]}

    def row(self, method: str, seed: int | None, run_dir: str | None, candidates: list[Candidate],
            tag: str) -> dict[str, Any]:
        """Choose on validation classes, then evaluate the test-class episodes once: one table row."""
        fs = self.cfg.fewshot
        choice = self.select(candidates, tag)
        per_episode: dict[str, np.ndarray] = {}
        for name, load in candidates:
            shots = [s for s in fs.shots if choice[s][0] == name]
            if not shots:
                continue
            model = load()
            for shot in shots:
                res = self.evaluate(model, TEST_SPLIT, [shot], [choice[shot][1]], f"{tag} [{name}]")
                per_episode[str(shot)] = res[(shot, choice[shot][1])]
        selected = {str(s): self._selected(*choice[s]) for s in fs.shots}
        per_ep = {str(s): per_episode[str(s)] for s in fs.shots}
        logger.info("[fewshot] %s: %s", tag, "; ".join(
            f"{s}-shot {a.mean():.2f}%" + (f" (val {choice[s][2]:.2f}%, {selection_text(selected[str(s)])})"
                                           if choice[s][2] is not None else "")
            for s, a in zip(fs.shots, per_ep.values(), strict=True)))
        return {
            "method": method, "seed": seed, "run_dir": run_dir, "selected": selected,
            "test": {s: mean_ci(a).to_dict() for s, a in per_ep.items()},
            "per_episode": {s: [float(x) for x in a] for s, a in per_ep.items()},
        }


def selection_text(sel: dict[str, Any]) -> str:
    """A ``selected`` entry in words: ``best.pt, C=1`` (protocol A) or ``best.pt, 20@0.001`` (protocol B:
    steps@lr; ``0 steps`` is the prototype classifier)."""
    ck = sel.get("checkpoint")
    out = Path(ck).name if ck not in (None, "none") else "-"
    if sel.get("C") is not None:
        out += f", C={sel['C']:g}"
    if sel.get("steps") is not None:
        out += f", {sel['steps']}@{sel['lr']:g}" if sel["steps"] else ", 0 steps"
    return out


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
    from schane.engine.utils import resolve_device
    from schane.pipelines.setup import dataset_splits

    splits = dataset_splits(cfg)
    if VAL_SPLIT not in splits or TEST_SPLIT not in splits:
        raise ValueError(
            f"dataset {cfg.data.name!r} has no {VAL_SPLIT}/{TEST_SPLIT} splits; schane fewshot needs a few-shot "
            "benchmark such as glyphs, cifar_fs, fc100, mini_imagenet, or your own image_folder/csv data with "
            "data.options.class_splits or data.options.class_fractions (docs/fewshot.md)"
        )
    if train_fn is None:
        from schane.pipelines.train import train as train_fn
    t0 = time.perf_counter()
    fs, run_dir = cfg.fewshot, Path(cfg.run_dir)
    prepare_run_dir(run_dir)
    pretrained = pretrained_model(cfg, fs.ways)
    views = fewshot_views(cfg, pretrained, (VAL_SPLIT, TEST_SPLIT))
    # before any training: episode sizes, own data's class lists (RUN_DIR/class_splits/), pretraining overlap
    from schane.fewshot.overlap import check_fewshot_classes

    class_checks = check_fewshot_classes(cfg, views.classes, views.labels, run_dir,
                                         class_lists=getattr(views.eval[VAL_SPLIT].base, "class_lists", None))
    episodes, files = draw_episodes(cfg, views, run_dir)
    study = _Study(cfg, views, episodes, resolve_device(cfg.train.device))
    rows: list[dict[str, Any]] = []
    if fs.include_pretrained:
        logger.info("[fewshot] %s: %s without fine-tuning", PRETRAINED, cfg.model.backbone)
        rows.append(study.row(PRETRAINED, None, None, [("none", lambda m=pretrained: m)], PRETRAINED))
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


def _fine_tuned_row(study: _Study, loss: str, seed: int, train_fn: Callable[..., Any],
                    base_classes: Sequence[str]) -> dict[str, Any]:
    from schane.engine.checkpoint import load_checkpoint, load_checkpoint_model

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
    from schane.engine.checkpoint import load_checkpoint

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
