"""``schane fewshot``: fine-tune per loss and seed, select on validation classes, test once.

For every loss in ``fewshot.losses`` and every seed in ``fewshot.seeds`` the model is
fine-tuned on the base classes (``train``/``val`` splits) with :func:`schane.engine.train.train`
into ``run_dir/<loss>-seed<seed>``. The pretrained backbone without fine-tuning is a row of
its own (``fewshot.include_pretrained``). The checkpoint (``best.pt`` or ``last.pt``) and,
for protocol A, the logistic-regression ``C`` (``fewshot.logreg_c_grid``) are chosen per
shot on ``val_classes`` episodes; ``test_classes`` episodes are evaluated once, with the
selected choice, at the end. Every method sees the identical episode lists, which are
written to ``run_dir/episodes/*.json``. See docs/fewshot.md.

Examples:
    >>> from schane.config import load_config
    >>> results = run_fewshot(load_config("configs/demo.yaml"))  # doctest: +SKIP
    >>> results["rows"][0]["test"]["1"]["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schane.config import Config, to_dict
from schane.fewshot.episodes import Episode, sample_episodes, save_episodes
from schane.fewshot.evaluators import build_feature_bank, evaluate_protocol_a, evaluate_protocol_b
from schane.fewshot.stats import mean_ci, paired_difference, seed_summary

VAL_SPLIT = "val_classes"
TEST_SPLIT = "test_classes"
PRETRAINED = "pretrained"


def _check(cfg: Config) -> None:
    fs = cfg.fewshot
    if fs.support_aug < 0:
        raise ValueError(f"fewshot.support_aug: must be >= 0, got {fs.support_aug}")
    if fs.val_episodes < 1:
        raise ValueError(f"fewshot.val_episodes: must be >= 1, got {fs.val_episodes}")
    if fs.logreg_c <= 0 or any(c <= 0 for c in fs.logreg_c_grid):
        raise ValueError("fewshot.logreg_c and every fewshot.logreg_c_grid entry must be > 0")
    if fs.finetune_loss not in ("ce", "joint"):
        raise ValueError(f"fewshot.finetune_loss: must be 'ce' or 'joint', got {fs.finetune_loss!r}")
    if fs.finetune_steps < 0 or fs.finetune_lr <= 0:
        raise ValueError("fewshot.finetune_steps must be >= 0 and fewshot.finetune_lr > 0")
    if fs.n_jobs == 0:
        raise ValueError("fewshot.n_jobs: must be >= 1 or negative (-1: all cores), got 0")
    if len(set(fs.losses)) != len(fs.losses) or len(set(fs.seeds)) != len(fs.seeds):
        raise ValueError("fewshot.losses and fewshot.seeds must not repeat entries")
    if len(set(fs.shots)) != len(fs.shots):
        raise ValueError("fewshot.shots must not repeat entries")
    if not fs.losses and not fs.include_pretrained:
        raise ValueError("nothing to evaluate: fewshot.losses is empty and fewshot.include_pretrained is false")


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


class _Splits:
    """The few-shot splits with their evaluation and support views, built once."""

    def __init__(self, cfg: Config, mean: Sequence[float], std: Sequence[float], crop_pct: float) -> None:
        from schane.data import get_dataset
        from schane.data.transforms import eval_transform, support_transform
        from schane.engine.utils import IndexedDataset

        self.eval: dict[str, Any] = {}
        self.support: dict[str, Any] = {}
        self.labels: dict[str, list[int]] = {}
        etf = eval_transform(cfg.data.img_size, mean, std, crop_pct=crop_pct)
        stf = support_transform(cfg.data.img_size, mean, std)
        for split in (VAL_SPLIT, TEST_SPLIT):
            base = get_dataset(
                cfg.data.name, cfg.data.root, split, None, seed=cfg.train.seed, val_fraction=cfg.data.val_fraction,
                download=cfg.data.download, **cfg.data.options,
            )
            self.eval[split] = IndexedDataset(base, etf)
            self.support[split] = IndexedDataset(base, stf)
            self.labels[split] = [int(t) for t in base.targets]


def run_fewshot(cfg: Config, *, train_fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run the few-shot comparison described by ``cfg`` and return (and save) its results.

    Args:
        cfg: the configuration; ``cfg.fewshot`` sets the protocol, ``cfg.data`` must name a
            few-shot dataset (with ``val_classes`` and ``test_classes`` splits), and the
            other sections configure the base-class fine-tuning of each run.
        train_fn: the training function (default :func:`schane.engine.train.train`), called as
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
                 "selected": {shot: {"checkpoint", "C", "val_acc"}},   # val_acc None if no choice
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

        Differences use ``"ce"`` as baseline when it is among the losses, and
        ``"pretrained"`` for every fine-tuned run.

    Raises:
        ValueError: on an invalid few-shot config or a dataset without few-shot splits.
        FileNotFoundError: when the dataset's files are missing.
    """
    from schane.data import dataset_info
    from schane.engine.checkpoint import load_checkpoint_model
    from schane.engine.evaluate import extract_features
    from schane.engine.utils import resolve_device
    from schane.models import build_model

    _check(cfg)
    fs = cfg.fewshot
    info = dataset_info(cfg.data.name)
    if VAL_SPLIT not in info.splits or TEST_SPLIT not in info.splits:
        raise ValueError(
            f"dataset {cfg.data.name!r} has no {VAL_SPLIT}/{TEST_SPLIT} splits (it is a {info.kind} set); "
            "schane fewshot needs a few-shot benchmark such as glyphs, cifar_fs, fc100, mini_imagenet"
        )
    if train_fn is None:
        from schane.engine.train import train as train_fn
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    progress = cfg.train.progress
    extract = partial(extract_features, num_workers=cfg.data.num_workers)
    c_grid = list(fs.logreg_c_grid) or [fs.logreg_c]
    if fs.protocol == "B":
        c_grid = [fs.logreg_c]  # unused by protocol B

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # any randomly initialised part is the same in every rerun
        pretrained = build_model(cfg.model, fs.ways)
    dc = pretrained.data_config
    splits = _Splits(cfg, tuple(dc["mean"]), tuple(dc["std"]), float(dc.get("crop_pct") or 0.875))

    # ------------------------------------------------------------ identical episodes for all methods
    episodes: dict[str, dict[int, list[Episode]]] = {VAL_SPLIT: {}, TEST_SPLIT: {}}
    files: dict[str, dict[str, str]] = {VAL_SPLIT: {}, TEST_SPLIT: {}}
    for split, n in ((VAL_SPLIT, fs.val_episodes), (TEST_SPLIT, fs.episodes)):
        for shot in fs.shots:
            eps = sample_episodes(splits.labels[split], fs.ways, shot, fs.queries, n, fs.episode_seed)
            path = run_dir / "episodes" / f"{split}_{fs.ways}way_{shot}shot.json"
            save_episodes(path, eps, splits.labels[split], split, seed=fs.episode_seed, extra={"dataset": cfg.data.name})
            episodes[split][shot] = eps
            files[split][str(shot)] = str(path)

    def evaluate(model: torch.nn.Module, split: str, shots: Sequence[int], cs: Sequence[float], tag: str) -> dict:
        """``{(shot, C): per-episode accuracies}`` of one model on one split."""
        model = model.to(device).eval()
        out: dict[tuple[int, float], np.ndarray] = {}
        if fs.protocol == "A":
            bank = build_feature_bank(
                model, splits.eval[split], splits.support[split], [e for s in shots for e in episodes[split][s]],
                n_aug=fs.support_aug, seed=fs.episode_seed, batch_size=cfg.data.eval_batch_size, device=device,
                progress=progress, extract_fn=extract,
            )
            for shot in shots:
                for c in cs:
                    out[(shot, c)] = evaluate_protocol_a(
                        bank, episodes[split][shot], C=c, n_jobs=fs.n_jobs, progress=progress,
                        desc=f"{tag} {split} {shot}-shot C={c:g}",
                    )
        else:
            for shot in shots:
                out[(shot, cs[0])] = evaluate_protocol_b(
                    model, episodes[split][shot], splits.support[split], splits.eval[split],
                    steps=fs.finetune_steps, lr=fs.finetune_lr, loss=fs.finetune_loss, lam=cfg.loss.lam,
                    temperature=cfg.loss.temperature, beta=cfg.loss.beta, seed=fs.episode_seed, progress=progress,
                    desc=f"{tag} {split} {shot}-shot",
                )
        return out

    def select_and_test(
        candidates: list[tuple[str, Callable[[], torch.nn.Module]]], tag: str
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Choose (checkpoint, C) per shot on val_classes, then evaluate test_classes once."""
        choice: dict[int, tuple[str, float, float | None]] = {}
        if len(candidates) * len(c_grid) == 1:
            choice = {s: (candidates[0][0], c_grid[0], None) for s in fs.shots}
        else:
            scores: dict[int, list[tuple[float, str, float]]] = {s: [] for s in fs.shots}
            for name, load in candidates:
                res = evaluate(load(), VAL_SPLIT, fs.shots, c_grid, f"{tag} [{name}]")
                for (shot, c), accs in res.items():
                    scores[shot].append((float(accs.mean()), name, c))
            for shot, sc in scores.items():
                best = max(sc, key=lambda t: t[0])  # first of equals: earlier candidate, earlier C
                choice[shot] = (best[1], best[2], best[0])
        per_episode: dict[str, np.ndarray] = {}
        for name, load in candidates:
            shots = [s for s in fs.shots if choice[s][0] == name]
            if not shots:
                continue
            model = load()
            for shot in shots:
                res = evaluate(model, TEST_SPLIT, [shot], [choice[shot][1]], f"{tag} [{name}]")
                per_episode[str(shot)] = res[(shot, choice[shot][1])]
        selected = {str(s): {"checkpoint": choice[s][0], "C": choice[s][1] if fs.protocol == "A" else None,
                             "val_acc": choice[s][2]} for s in fs.shots}
        return selected, {str(s): per_episode[str(s)] for s in fs.shots}

    rows: list[dict[str, Any]] = []

    def add_row(method: str, seed: int | None, sub_dir: str | None, selected: dict, per_ep: dict) -> None:
        rows.append({
            "method": method, "seed": seed, "run_dir": sub_dir, "selected": selected,
            "test": {s: mean_ci(a).to_dict() for s, a in per_ep.items()},
            "per_episode": {s: [float(x) for x in a] for s, a in per_ep.items()},
        })

    if fs.include_pretrained:
        print(f"[fewshot] {PRETRAINED}: {cfg.model.backbone} without fine-tuning")
        selected, per_ep = select_and_test([("none", lambda m=pretrained: m)], PRETRAINED)
        add_row(PRETRAINED, None, None, selected, per_ep)
    del pretrained

    for loss in fs.losses:
        for seed in fs.seeds:
            sub = copy.deepcopy(cfg)
            sub.loss.name = loss
            sub.train.seed = seed
            sub.train.test_at_end = False
            sub.output_dir = str(run_dir)
            sub.name = f"{loss}-seed{seed}"
            print(f"[fewshot] fine-tuning {loss} (seed {seed}) on the base classes -> {sub.run_dir}")
            result = train_fn(sub, resume="auto")
            cands = _checkpoint_candidates(result.best_checkpoint, result.last_checkpoint)
            loaders = [(name, partial(lambda p: load_checkpoint_model(p, map_location=device)[0], p))
                       for name, p in cands]
            selected, per_ep = select_and_test(loaders, f"{loss} s{seed}")
            for s in selected.values():
                s["checkpoint"] = str(dict(cands)[s["checkpoint"]])
            add_row(loss, seed, str(sub.run_dir), selected, per_ep)

    results = _summarise(cfg, rows, files)
    results["seconds"] = time.perf_counter() - t0
    results["run_dir"] = str(run_dir)
    results["results_file"] = str(run_dir / "fewshot.json")
    results = _nan_to_none(results)
    (run_dir / "fewshot.json").write_text(json.dumps(results, indent=1))
    print(format_table(results))
    return results


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
    diffs: list[dict[str, Any]] = []
    baselines = (["ce"] if "ce" in fs.losses else []) + ([PRETRAINED] if fs.include_pretrained else [])
    for base in baselines:
        for loss in fs.losses:
            if loss == base:
                continue
            for seed in fs.seeds:
                other = per[(base, None if base == PRETRAINED else seed)]
                for s in shots:
                    d = paired_difference(per[(loss, seed)]["per_episode"][s], other["per_episode"][s])
                    diffs.append({"method": loss, "baseline": base, "seed": seed, "shot": int(s), **d.to_dict()})
    seeds_rows, seed_diffs = [], []
    for loss in fs.losses:
        for s in shots:
            vals = [per[(loss, seed)]["test"][s]["mean"] for seed in fs.seeds]
            seeds_rows.append({"method": loss, "shot": int(s), "values": vals, **seed_summary(vals).to_dict()})
    for d_base in baselines:
        for loss in fs.losses:
            if loss == d_base:
                continue
            for s in shots:
                vals = [d["mean"] for d in diffs
                        if d["method"] == loss and d["baseline"] == d_base and d["shot"] == int(s)]
                seed_diffs.append({"method": loss, "baseline": d_base, "shot": int(s), "values": vals,
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
    }


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
        "",
        f"{'method':<22}{'seed':>5}{'shot':>5}  {'selected (val acc)':<24}{'test acc (%)':>16}",
    ]
    for r in results["rows"]:
        for s, t in r["test"].items():
            sel = r["selected"][s]
            ck = Path(sel["checkpoint"]).name if sel["checkpoint"] not in (None, "none") else "-"
            what = ck + (f", C={sel['C']:g}" if sel.get("C") is not None else "")
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
            signed = "−" in name
            sd = "n/a" if x["std"] is None else f"{x['std']:.2f}"
            mean = f"{x['mean']:+.2f}" if signed else f"{x['mean']:.2f}"
            hw = "n/a" if x["half_width"] is None else f"± {x['half_width']:.2f}"
            excl = ("yes" if x["excludes_zero"] else "no") if signed else ""
            lines.append(f"{name:<22}{'':>5}{x['shot']:>5}  {mean + ' (' + sd + ')':<24}{hw:>16}  {excl}")
    lines.append(f"\nresults: {results.get('results_file', '')}")
    return "\n".join(lines)
