"""Few-shot scoring: a model's per-episode accuracy under protocol A or B, the one function every workflow
evaluates episodes with (:func:`fewshot_accuracies`), on a few-shot split's views (:func:`fewshot_views`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from schane import fewshot
from schane.config import Config
from schane.engine.batches import IndexedDataset
from schane.engine.criterion import build_criterion
from schane.engine.evaluate import extract_features
from schane.fewshot import build_feature_bank, evaluate_protocol_a, settings_grid
from schane.fewshot.episodes import Episode
from schane.fewshot.stats import mean_ci
from schane.models.model import SCHaNeModel
from schane.pipelines.runs import prepare_for_inference
from schane.pipelines.splits import eval_transform_for, load_split, support_transform_for

logger = logging.getLogger(__name__)

VAL_SPLIT = "val_classes"
TEST_SPLIT = "test_classes"
# a checkpoint candidate: its name (best, last, none) and a function that loads its model
Candidate = tuple[str, Callable[[], nn.Module]]


@dataclass
class FewShotViews:
    """A few-shot split under the evaluation and the support transforms of one preprocessing."""

    eval: dict[str, Any] = field(default_factory=dict)
    support: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, list[int]] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)


def fewshot_views(cfg: Config, model: SCHaNeModel, splits: Sequence[str]) -> FewShotViews:
    """Load ``splits`` (e.g. ``val_classes``, ``test_classes``) with ``model``'s evaluation and support views."""

    views = FewShotViews()
    eval_tf, support_tf = eval_transform_for(cfg, model), support_transform_for(cfg, model)
    for split in splits:
        base = load_split(cfg, split)
        views.eval[split] = IndexedDataset(base, eval_tf)
        views.support[split] = IndexedDataset(base, support_tf)
        views.labels[split] = [int(t) for t in base.targets]
        views.classes[split] = list(base.classes)
    return views


def fewshot_accuracies(
    model: nn.Module,
    cfg: Config,
    views: FewShotViews,
    split: str,
    episodes: Mapping[int, Sequence[Any]],
    options: Sequence[Any],
    *,
    device: torch.device,
    tag: str = "",
) -> dict[tuple[int, Any], np.ndarray]:
    """Per-episode accuracy (%) of one model on one split's episodes, under ``cfg.fewshot.protocol``.

    Protocol A (frozen features + logistic regression) builds one feature bank for all shots and fits every
    ``C`` of ``options``; protocol B (per-episode fine-tuning) evaluates every :class:`~schane.fewshot.Setting`
    ``(steps, lr)`` of ``options`` on the same episodes (one fine-tuning trajectory per learning rate; 0 steps, the
    prototype classifier, without fine-tuning).

    Args:
        model: the model (any mode; moved to ``device``).
        cfg: ``fewshot.*`` (protocol, support_aug, solver, n_jobs, finetune_*), ``loss.*`` for protocol B's
            joint objective, ``data.eval_batch_size``, ``data.num_workers``, ``train.progress``.
        views: the split's datasets (:func:`fewshot_views`).
        split: which split of ``views``.
        episodes: ``{shot: episodes}``.
        options: what is chosen on validation episodes beside the checkpoint: protocol A: logistic-regression strengths ``C``; protocol B: ``(steps, lr)`` settings
            (``settings_grid(cfg.fewshot.finetune_steps, cfg.fewshot.finetune_lr)`` or a choice from it).
        device: where the model runs.
        tag: label of the progress output.

    Returns:
        ``{(shot, C or Setting): accuracies[n_episodes]}``.

    Raises:
        ValueError: when protocol B is given an entry of ``options`` that is not a ``(steps, lr)`` pair.
    """

    fs, show = cfg.fewshot, cfg.train.progress
    model = prepare_for_inference(model, cfg, device)
    out: dict[tuple[int, Any], np.ndarray] = {}
    if fs.protocol == "A":
        bank = build_feature_bank(
            model, views.eval[split], views.support[split], [e for s in episodes for e in episodes[s]],
            n_aug=fs.support_aug, seed=fs.episode_seed, batch_size=cfg.data.eval_batch_size, device=device,
            progress=show, extract_fn=partial(extract_features, num_workers=cfg.data.num_workers),
        )
        for shot in episodes:
            for c in options:
                out[(shot, c)] = evaluate_protocol_a(
                    bank, episodes[shot], C=c, n_jobs=fs.n_jobs, solver=fs.solver, progress=show,
                    desc=f"{tag} {split} {shot}-shot C={c:g}",
                )
        return out
    return _protocol_b_accuracies(model, cfg, views, split, episodes, options, tag=tag)


def _protocol_b_accuracies(model: nn.Module, cfg: Config, views: FewShotViews, split: str,
                           episodes: Mapping[int, Sequence[Any]], settings: Sequence[Any],
                           *, tag: str) -> dict[tuple[int, Any], np.ndarray]:

    if not all(isinstance(s, tuple) and len(s) == 2 for s in settings):
        raise ValueError(f"protocol B evaluates (steps, lr) settings, got {list(settings)!r}; build them with "
                         "schane.fewshot.settings_grid(cfg.fewshot.finetune_steps, cfg.fewshot.finetune_lr)")
    fs = cfg.fewshot
    grid = [fewshot.Setting(int(s), float(lr) if int(s) > 0 else 0.0) for s, lr in settings]
    criterion = None
    if fs.finetune_loss == "joint":

        criterion = build_criterion(cfg.loss).joint
    # one call for all shots: the frozen part's outputs of an image are computed once for every shot
    every = [e for shot in episodes for e in episodes[shot]]
    res = fewshot.evaluate_protocol_b_grid(
        model, every, views.support[split], views.eval[split], settings=grid, params=fs.finetune_params,
        last_layers=fs.finetune_last_layers, criterion=criterion, seed=fs.episode_seed,
        batch_size=cfg.data.eval_batch_size, progress=cfg.train.progress,
        desc=f"{tag} {split} {'+'.join(str(s) for s in episodes)}-shot B",
    )
    out: dict[tuple[int, Any], np.ndarray] = {}
    start = 0
    for shot in episodes:
        n = len(episodes[shot])
        for given, setting in zip(settings, grid, strict=True):
            out[(shot, given)] = res[setting][start:start + n]
        start += n
    return out


@dataclass
class FewShotStudy:
    """The shared state of one few-shot study: its data, episodes and the selection rule.

    Every model of a study (:func:`schane.pipelines.fewshot.run_fewshot`, ``schane compare``) is evaluated with it
    on the same episodes: :meth:`select` chooses the checkpoint and the option on validation-class episodes,
    :meth:`row` evaluates the test-class episodes once with that choice.
    """

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

    def evaluate(self, model: torch.nn.Module, split: str, shots: Sequence[int], options: Sequence[Any],
                 tag: str) -> dict[tuple[int, Any], np.ndarray]:
        """Per-episode accuracy of ``model`` on ``split``'s episodes of ``shots``, for every option (``C`` or
        ``(steps, lr)``, see :attr:`options`)."""
        eps = {s: self.episodes[split][s] for s in shots}
        return fewshot_accuracies(model, self.cfg, self.views, split, eps, options, device=self.device, tag=tag)

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
        choice: dict[int, tuple[str, Any, float | None, list[tuple[float, str, Any]]]] = {}
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


__all__ = [
    "TEST_SPLIT",
    "VAL_SPLIT",
    "Candidate",
    "FewShotStudy",
    "selection_text",
    "FewShotViews",
    "fewshot_accuracies",
    "fewshot_views",
]
