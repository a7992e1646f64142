"""Few-shot protocol A: frozen features + logistic regression (the authors' protocol).

Per episode an L2-regularised multinomial logistic regression (scikit-learn ``LogisticRegression``'s
objective, inverse regularisation ``C``) is fitted on the L2-normalised features of the ``n_aug`` augmented
copies of each support image (:class:`~schane.fewshot.features.FeatureBank`) and scores the queries'
evaluation-view features. By default all episodes are fitted at once by the batched solver of
:mod:`schane.fewshot.logreg`; scikit-learn's per-episode fit stays available (``solver="sklearn"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from schane.fewshot.episodes import Episode
from schane.fewshot.features import FeatureBank
from schane.fewshot.logreg import _check_solver, _torch_threads, logreg_fit_batched, logreg_predict
from schane.progress import progress as _progress
from schane.progress import progress_bar


def _episode_acc_a(bank: FeatureBank, ep: Episode, C: float, normalize: bool) -> float:
    pred = logreg_predict(
        bank.support_of(ep.support), ep.support_labels, bank.eval_of(ep.query), C=C, normalize=normalize, solver="sklearn"
    )
    return float(np.mean(pred == np.asarray(ep.query_labels)) * 100.0)


def _work_acc_a(xs: torch.Tensor, ys: list[int], xq: torch.Tensor, yq: list[int], C: float, normalize: bool) -> float:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        pred = logreg_predict(xs, ys, xq, C=C, normalize=normalize, solver="sklearn")
    return float(np.mean(pred == np.asarray(yq)) * 100.0)


def _batched_accs_a(
    bank: FeatureBank,
    episodes: Sequence[Episode],
    C: float,
    normalize: bool,
    chunk_size: int | None,
    bar: Any,
) -> np.ndarray:
    """Accuracies (%) with :func:`logreg_fit_batched`, episodes of equal shape fitted together."""
    accs = np.zeros(len(episodes), dtype=np.float64)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, ep in enumerate(episodes):
        groups.setdefault((ep.ways, len(ep.support), len(ep.query)), []).append(i)
    for (ways, _, _), members in groups.items():
        copies = max(bank.n_aug, 1)
        rows = copies * len(episodes[members[0]].support)
        d = bank.eval_features.shape[1]
        size = chunk_size or max(1, 2**24 // (rows * d))  # about 128 MiB per float64 [E, S, d] tensor
        for lo in range(0, len(members), size):
            idx = members[lo : lo + size]
            eps = [episodes[i] for i in idx]
            xs = torch.stack([bank.support_of(ep.support).reshape(rows, d) for ep in eps]).double()
            ys = torch.stack([torch.as_tensor(ep.support_labels).repeat(copies) for ep in eps]).to(xs.device)
            xq = torch.stack([bank.eval_of(ep.query) for ep in eps]).double()
            yq = torch.stack([torch.as_tensor(ep.query_labels) for ep in eps]).to(xs.device)
            if normalize:  # in place: these are the largest tensors of the fit
                xs.div_(xs.norm(dim=-1, keepdim=True).clamp_min_(1e-12))
                xq.div_(xq.norm(dim=-1, keepdim=True).clamp_min_(1e-12))
            if (ys.amin(1) == ys.amax(1)).any():
                raise ValueError("logistic regression needs at least two support classes in every episode")
            w, b = logreg_fit_batched(xs, ys, ways, C=C)
            pred = (torch.bmm(xq, w.transpose(1, 2)) + b.unsqueeze(1)).argmax(-1)
            accs[idx] = (pred == yq).double().mean(1).cpu().numpy() * 100.0
            bar.update(len(idx))
    return accs


def evaluate_protocol_a(
    bank: FeatureBank,
    episodes: Sequence[Episode],
    *,
    C: float = 1.0,
    normalize: bool = True,
    n_jobs: int = 1,
    progress: bool = True,
    desc: str = "episodes",
    solver: str = "torch",
    chunk_size: int | None = None,
    threads: int | None = 1,
) -> np.ndarray:
    """Per-episode query accuracy (%) of logistic regression on frozen features.

    With ``solver="torch"`` (default) all episodes of equal shape are fitted at once by
    :func:`logreg_fit_batched`, in chunks of ``chunk_size`` episodes; with ``"sklearn"``
    one scikit-learn ``LogisticRegression`` is fitted per episode (the reference, spread
    over ``n_jobs`` processes). Both minimise the same objective, so they agree up to the
    solvers' tolerances.

    Args:
        bank: features from :func:`build_feature_bank` covering these episodes.
        episodes: the episodes, evaluated in order.
        C: inverse L2 regularisation strength.
        normalize: L2-normalise features.
        n_jobs: ``solver="sklearn"`` only: parallel worker processes (joblib); 1 runs
            in-process, -1 uses all cores. Lists of fewer than 32 episodes always run in-process.
        progress: show a progress bar on a terminal.
        desc: the progress bar's label.
        solver: ``"torch"`` (batched, float64) or ``"sklearn"`` (per episode).
        chunk_size: ``solver="torch"``: episodes per batched fit (default: about 128 MiB of
            float64 support features per chunk).
        threads: ``solver="torch"``: torch intra-op threads during the fit (restored after;
            ``None`` leaves the setting alone). The default 1 suits these small tensors on a
            shared CPU, where extra threads mostly wait for each other.

    Returns:
        ``[len(episodes)]`` accuracies in percent.

    Raises:
        ValueError: when an episode uses an image missing from the bank, has fewer than two
            support classes, or on bad ``C``, ``solver`` or ``chunk_size``.
    """
    from threadpoolctl import threadpool_limits

    _check_solver(solver)
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if solver == "torch":
        with _torch_threads(threads), progress_bar(len(episodes), desc=desc, enabled=progress) as bar:
            return _batched_accs_a(bank, episodes, C, normalize, chunk_size, bar)
    if n_jobs == 1 or len(episodes) < 32:
        # one BLAS thread: these problems are tiny, and thread hand-offs cost more than they gain
        with threadpool_limits(limits=1):
            accs = [
                _episode_acc_a(bank, ep, C, normalize)
                for ep in _progress(episodes, desc=desc, enabled=progress)
            ]
    else:
        from joblib import Parallel, delayed

        work = [(bank.support_of(ep.support), ep.support_labels, bank.eval_of(ep.query), ep.query_labels) for ep in episodes]
        bar = _progress(work, desc=desc, enabled=progress)
        accs = Parallel(n_jobs=n_jobs, batch_size=16)(delayed(_work_acc_a)(*w, C, normalize) for w in bar)
    return np.asarray(accs, dtype=np.float64)


__all__ = ["evaluate_protocol_a"]
