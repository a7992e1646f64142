"""Few-shot evaluators.

**Protocol A** (frozen features + logistic regression, the authors' protocol): the pooled
pre-projection features of a split's images are extracted once per model — one pass with
the deterministic evaluation view and ``n_aug`` seeded passes with the support augmentation
— and reused by every episode. Per episode an L2-regularised multinomial logistic
regression (scikit-learn ``LogisticRegression``'s objective, inverse regularisation ``C``)
is fitted on the L2-normalised features of the ``n_aug`` augmented copies of each support
image and scores the queries' evaluation-view features. By default all episodes are fitted
at once by a batched float64 L-BFGS in torch (:func:`logreg_fit_batched`); scikit-learn's
per-episode fit stays available as the reference (``solver="sklearn"``).

**Protocol B** (per-episode fine-tuning): starting from the same weights in every episode,
the whole model plus a new linear head over the episode's classes is fine-tuned for a few
Adam steps on the support set, with cross-entropy or the joint loss ``λ·SCHaNe + (1−λ)·CE``
(two augmented views of each support image give every anchor a positive even at 1-shot);
the queries are classified, and the weights, buffers, train/eval mode and ``requires_grad``
flags are restored exactly.
"""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from schane.fewshot.episodes import Episode

ExtractFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- feature bank


@dataclass
class FeatureBank:
    """Features of the images a set of episodes uses, extracted once per model.

    Attributes:
        eval_index: ``{dataset index: row}`` into ``eval_features``.
        eval_features: ``[R, d]`` evaluation-view features (float32, CPU).
        aug_index: ``{dataset index: row}`` into ``aug_features`` (support images only).
        aug_features: ``[n_aug, S, d]`` features of the augmented copies (``n_aug`` may be 0).
    """

    eval_index: dict[int, int]
    eval_features: torch.Tensor
    aug_index: dict[int, int]
    aug_features: torch.Tensor

    @property
    def n_aug(self) -> int:
        return int(self.aug_features.shape[0])

    def _rows(self, index: dict[int, int], ids: Sequence[int], what: str) -> list[int]:
        try:
            return [index[i] for i in ids]
        except KeyError as e:
            raise ValueError(
                f"image {e.args[0]} has no {what} feature in this bank; build the bank from the same episodes"
            ) from None

    def eval_of(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), d]`` evaluation-view features."""
        return self.eval_features[self._rows(self.eval_index, ids, "evaluation-view")]

    def support_of(self, ids: Sequence[int]) -> torch.Tensor:
        """``[max(n_aug, 1), len(ids), d]``: the augmented copies, or the evaluation view when ``n_aug == 0``."""
        if self.n_aug == 0:
            return self.eval_of(ids).unsqueeze(0)
        return self.aug_features[:, self._rows(self.aug_index, ids, "augmented")]


def _stable_seed(*parts: int) -> int:
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


class SeededItems(Dataset):
    """``dataset[i]`` computed under torch and Python RNGs seeded by ``(seed, copy, i)``.

    Wraps a dataset whose random transform runs inside ``__getitem__``: item ``i`` of copy
    ``k`` is then the same augmented view in every run, for every model, whatever subset,
    order or number of workers is used. The caller's RNG states are left untouched.

    Args:
        dataset: returns ``(image, label)`` with a random transform applied.
        seed: the augmentation seed.
        copy: which augmented copy (0, 1, ...).
    """

    def __init__(self, dataset: Dataset, seed: int, copy: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.copy = int(copy)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = _stable_seed(self.seed, self.copy, i)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                return self.dataset[i]
        finally:
            random.setstate(py_state)


def _default_extract() -> ExtractFn:
    from schane.engine.evaluate import extract_features

    return extract_features


def build_feature_bank(
    model: nn.Module,
    eval_dataset: Dataset,
    support_dataset: Dataset | None,
    episodes: Sequence[Episode],
    *,
    n_aug: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
    extract_fn: ExtractFn | None = None,
) -> FeatureBank:
    """Extract the features the episodes need: each image once per view.

    Only images that occur in some episode are processed: every support and query image
    with ``eval_dataset`` (deterministic view), and every support image ``n_aug`` more times
    with ``support_dataset`` (random augmentation). Copy ``k`` of image ``i`` is drawn under
    RNGs seeded by ``(seed, k, i)`` (:class:`SeededItems`), so every model sees the same
    crops of the same images and the global RNG is left untouched.

    Args:
        model: a model with ``forward_features`` (``extract_fn`` decides how it is called).
        eval_dataset: the split with the evaluation transform, returning ``(image, label)``.
        support_dataset: the same split with the support augmentation (unused when ``n_aug == 0``).
        episodes: every episode the bank must serve (e.g. the 1-shot and 5-shot lists).
        n_aug: augmented copies per support image (0: use the evaluation view).
        seed: augmentation seed.
        batch_size: extraction batch size.
        device: where the model runs (default: the model's device).
        progress: show progress bars.
        extract_fn: ``f(model, dataset, *, batch_size, device, progress) -> (features[N, d], labels[N])``;
            defaults to :func:`schane.engine.evaluate.extract_features`.

    Returns:
        The :class:`FeatureBank`.

    Raises:
        ValueError: when ``n_aug < 0``, no episodes are given, or ``support_dataset`` is missing.
    """
    if n_aug < 0:
        raise ValueError(f"n_aug must be >= 0, got {n_aug}")
    if not episodes:
        raise ValueError("build_feature_bank needs at least one episode")
    if n_aug > 0 and support_dataset is None:
        raise ValueError("n_aug > 0 needs a support_dataset with the support augmentation")
    if len(eval_dataset) != (len(support_dataset) if support_dataset is not None else len(eval_dataset)):
        raise ValueError("eval_dataset and support_dataset must be the same split (equal lengths)")
    extract = extract_fn or _default_extract()
    all_ids = sorted({i for e in episodes for i in (*e.support, *e.query)})
    sup_ids = sorted({i for e in episodes for i in e.support})
    if all_ids[-1] >= len(eval_dataset):
        raise ValueError(f"episode index {all_ids[-1]} is out of range for a split of {len(eval_dataset)} images")

    def run(ds: Dataset, ids: list[int]) -> torch.Tensor:
        feats, _ = extract(model, Subset(ds, ids), batch_size=batch_size, device=device, progress=progress)
        return feats.detach().float().cpu()

    eval_features = run(eval_dataset, all_ids)
    aug = []
    for k in range(n_aug):
        aug.append(run(SeededItems(support_dataset, seed, k), sup_ids))  # type: ignore[arg-type]
    d = eval_features.shape[1]
    aug_features = torch.stack(aug) if aug else torch.empty(0, len(sup_ids), d)
    return FeatureBank(
        eval_index={i: r for r, i in enumerate(all_ids)},
        eval_features=eval_features,
        aug_index={i: r for r, i in enumerate(sup_ids)},
        aug_features=aug_features,
    )


# --------------------------------------------------------------------------- protocol A
def _logreg_objective(
    z: torch.Tensor, onehot: torch.Tensor, v: torch.Tensor, b: torch.Tensor, C: float, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-episode ``sum_i log-loss + ||v||²/(2C)`` (and its gradient) in the reduced space.

    ``z [E, S, r]``, ``onehot [E, S, K]``, ``v [E, r, k]``, ``b [E, k]`` with ``k = K`` or,
    for two classes, ``k = 1`` and logits ``[0, z·v + b]`` (scikit-learn's binary form).
    """
    logits = torch.bmm(z, v) + b.unsqueeze(1)
    if v.shape[-1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    f = (lse - (logits * onehot).sum(-1)).sum(-1) + v.pow(2).sum((1, 2)) / (2.0 * C)
    if not grad:
        return f, None, None
    g = torch.softmax(logits, dim=-1) - onehot
    if v.shape[-1] == 1:
        g = g[..., 1:]
    return f, torch.bmm(z.transpose(1, 2), g) + v / C, g.sum(1)


def _span_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coordinates of the support features in an orthonormal eigenbasis of their span.

    With the Gram matrix ``K = X Xᵀ = V Λ Vᵀ`` and the eigenvalues above ``1e-10·λ_max``
    kept, ``U = Xᵀ V Λ^(-1/2)`` has orthonormal columns spanning the features and
    ``X U = V Λ^(1/2)``, whose columns are orthogonal with squared norms ``Λ`` (dropped
    directions get zero columns).

    Args:
        x: ``[E, S, d]`` float64 features.

    Returns:
        ``(z [E, S, S], t [E, S, S], lam [E, S])`` with ``z = X U``, ``U = Xᵀ t`` and
        ``lam`` the squared column norms of ``z``.
    """
    lam, vec = torch.linalg.eigh(torch.bmm(x, x.transpose(1, 2)))
    keep = lam > 1e-10 * lam[:, -1:].clamp_min(1e-300)
    root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(lam))
    return vec * root.unsqueeze(1), vec * inv.unsqueeze(1), root.square()


def logreg_fit_batched(
    support: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    C: float = 1.0,
    max_iter: int = 2000,
    gtol: float = 1e-8,
    history: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one multinomial logistic regression per episode, all episodes at once.

    Minimises, for every episode ``e`` independently, scikit-learn's ``LogisticRegression``
    objective (lbfgs, L2 penalty, unpenalised intercept)::

        sum_i -log softmax(W_e x_i + b_e)[y_i] + ||W_e||² / (2C)

    (for two classes, scikit-learn's binary form: one weight vector, logits ``[0, w·x + b]``).
    The optimum ``W_e`` lies in the span of the episode's support features, so a QR
    orthonormal basis ``U_e`` of that span (:func:`_span_basis`) turns each problem into an
    equivalent one with ``r ≤ S`` features ``X_e U_e`` and the same penalty; that problem is
    solved in float64 by an L-BFGS with one curvature history and one backtracking (Armijo)
    line search per episode, until each episode's gradient max-norm is below ``gtol``. The
    objectives are separable, so episodes never influence each other.

    Args:
        support: ``[E, S, d]`` support features of ``E`` episodes (used as given: normalise first).
        labels: ``[E, S]`` integer labels in ``0..n_classes-1``.
        n_classes: number of classes ``K`` (every episode's logits have ``K`` columns).
        C: inverse regularisation strength (scikit-learn's ``C``).
        max_iter: L-BFGS iterations at most.
        gtol: stop an episode when its gradient's largest entry is below this.
        history: L-BFGS curvature pairs kept per episode.

    Returns:
        ``(W [E, K, d], b [E, K])`` in float64 on ``support``'s device, in scikit-learn's
        multinomial layout: ``softmax(x @ W[e].T + b[e])`` is ``predict_proba``. Intercepts
        are centred (they are determined only up to a shared constant); for two classes row 0
        of ``W`` and ``b[:, 0]`` are zero, as in the binary form.

    Raises:
        ValueError: on bad shapes, labels out of range, ``n_classes < 2`` or ``C <= 0``.
    """
    if support.ndim != 3 or labels.shape != support.shape[:2]:
        raise ValueError(
            f"expected support [E, S, d] and labels [E, S], got {tuple(support.shape)} and {tuple(labels.shape)}"
        )
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    x = support.to(torch.float64)
    e = x.shape[0]
    z, basis, lam = _span_basis(x)
    rank = z.shape[-1]
    k = 1 if n_classes == 2 else n_classes
    onehot = F.one_hot(labels.long(), n_classes).to(x.dtype)
    n = rank * k + k

    def split(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return p[:, : rank * k].reshape(p.shape[0], rank, k), p[:, rank * k :]

    def fg(p: torch.Tensor, sel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        zs, ys = (z, onehot) if sel is None else (z[sel], onehot[sel])
        f, gv, gb = _logreg_objective(zs, ys, *split(p), C, grad=True)
        return f, torch.cat([gv.reshape(p.shape[0], -1), gb], dim=1)

    p = x.new_zeros(e, n)
    f, g = fg(p)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho_hist: list[torch.Tensor] = []
    # diagonal initial inverse Hessian: in the eigenbasis the penalised Hessian is close to
    # diag(a·λ_j + 1/C) for v (a ≈ p(1 − p)) and a·S for b, which removes most of its spread
    a = 0.2
    h0 = torch.cat(
        [(1.0 / (a * lam + 1.0 / C)).unsqueeze(2).expand(e, rank, k).reshape(e, -1),
         x.new_full((e, k), 1.0 / (a * x.shape[1]))],
        dim=1,
    )
    gamma = x.new_ones(e)
    active = g.abs().amax(1) > gtol
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        q = g.clone()
        alphas = []
        for sv, yv, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist), strict=True):
            a = rho * (sv * q).sum(1)
            q -= a.unsqueeze(1) * yv
            alphas.append(a)
        q *= gamma.unsqueeze(1) * h0
        for sv, yv, rho, a in zip(s_hist, y_hist, rho_hist, reversed(alphas), strict=True):
            q += (a - rho * (yv * q).sum(1)).unsqueeze(1) * sv
        direction = -q
        slope = (g * direction).sum(1)
        bad = slope >= 0  # not a descent direction (round-off): fall back to steepest descent
        if bool(bad.any()):
            direction[bad] = -g[bad] * h0[bad] * gamma[bad].unsqueeze(1)
            slope = (g * direction).sum(1)
        # backtracking (Armijo) line search, one step length per episode; f and g at the trial
        # point come together, as the first trial (step 1) is nearly always accepted
        step = active.to(x.dtype)
        accepted = ~active
        p_new, f_new, g_new = p.clone(), f.clone(), g.clone()
        for _ls in range(60):
            sel = (~accepted).nonzero().squeeze(1)  # only episodes still searching are evaluated
            trial = p[sel] + step[sel].unsqueeze(1) * direction[sel]
            f_t, g_t = fg(trial, sel)
            # slack for round-off: near the optimum f's changes fall below its float64 precision
            ok = f_t <= f[sel] + 1e-4 * step[sel] * slope[sel] + 1e-12 * (1.0 + f[sel].abs())
            done = sel[ok]
            p_new[done], f_new[done], g_new[done] = trial[ok], f_t[ok], g_t[ok]
            accepted[done] = True
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step * 0.5)
        sv, yv = p_new - p, g_new - g
        sy = (sv * yv).sum(1)
        curv = sy > 1e-12 * sv.norm(dim=1) * yv.norm(dim=1).clamp_min(1e-300)
        rho = torch.where(curv, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        gamma = torch.where(curv, sy / (yv * yv * h0).sum(1).clamp_min(1e-300), gamma)
        s_hist.append(sv)
        y_hist.append(yv)
        rho_hist.append(rho)
        if len(s_hist) > history:
            s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        # an episode whose line search cannot decrease f any more has converged to round-off
        active = active & accepted & (g_new.abs().amax(1) > gtol)
        p, f, g = p_new, f_new, g_new
    v, b = split(p)
    w = torch.bmm(x.transpose(1, 2), torch.bmm(basis, v)).transpose(1, 2)  # [E, k, d]
    if k == 1:
        w = torch.cat([torch.zeros_like(w), w], dim=1)
        b = torch.cat([torch.zeros_like(b), b], dim=1)
    else:
        b = b - b.mean(1, keepdim=True)
    return w, b




@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (``None``: leave as is), then restore."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_solver(solver: str) -> None:
    if solver not in ("torch", "sklearn"):
        raise ValueError(f"solver must be 'torch' (batched, default) or 'sklearn' (reference), got {solver!r}")


def logreg_predict(
    support: torch.Tensor | np.ndarray,
    support_labels: Sequence[int] | np.ndarray,
    query: torch.Tensor | np.ndarray,
    *,
    C: float = 1.0,
    normalize: bool = True,
    max_iter: int = 1000,
    solver: str = "torch",
) -> np.ndarray:
    """Fit an L2-regularised multinomial logistic regression and predict the queries.

    Args:
        support: ``[S, d]`` support features, or ``[A, S, d]`` for ``A`` augmented copies
            of each support image (all copies are training points with the image's label).
        support_labels: ``[S]`` labels of the support images.
        query: ``[Q, d]`` query features.
        C: inverse regularisation strength (scikit-learn's ``C``; larger is weaker).
        normalize: L2-normalise every feature vector first.
        max_iter: solver iterations at most.
        solver: ``"torch"`` (:func:`logreg_fit_batched`, float64) or ``"sklearn"``
            (``LogisticRegression(C=C, max_iter=max_iter)``, lbfgs); both minimise the same objective.

    Returns:
        ``[Q]`` predicted labels.

    Raises:
        ValueError: on mismatched shapes, ``C <= 0``, fewer than two support classes or an
            unknown ``solver``.
    """
    _check_solver(solver)
    xs = torch.as_tensor(support)
    xq = torch.as_tensor(query)
    xs, xq = (xs.double(), xq.double()) if solver == "torch" else (xs.float(), xq.float())
    y = np.asarray(support_labels, dtype=np.int64)
    if xs.ndim == 2:
        xs = xs.unsqueeze(0)
    if xs.ndim != 3 or xq.ndim != 2 or xs.shape[-1] != xq.shape[-1]:
        raise ValueError(f"expected support [S, d] or [A, S, d] and query [Q, d], got {tuple(np.shape(support))} and {tuple(np.shape(query))}")
    if xs.shape[1] != y.shape[0]:
        raise ValueError(f"{xs.shape[1]} support features but {y.shape[0]} labels")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    classes, y_idx = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError("logistic regression needs at least two support classes")
    if normalize:
        xs = F.normalize(xs, dim=-1)
        xq = F.normalize(xq, dim=-1)
    a = xs.shape[0]
    if solver == "torch":
        labels = torch.as_tensor(np.tile(y_idx, a), device=xs.device).unsqueeze(0)
        w, b = logreg_fit_batched(xs.reshape(1, -1, xs.shape[-1]), labels, classes.size, C=C, max_iter=max_iter)
        return classes[(xq @ w[0].T + b[0]).argmax(1).cpu().numpy()]
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(xs.reshape(-1, xs.shape[-1]).cpu().numpy(), np.tile(y, a))
    return clf.predict(xq.cpu().numpy())


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
        progress: show a progress bar.
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
        with _torch_threads(threads), tqdm(
            total=len(episodes), desc=desc, disable=not progress, leave=False, dynamic_ncols=True
        ) as bar:
            return _batched_accs_a(bank, episodes, C, normalize, chunk_size, bar)
    if n_jobs == 1 or len(episodes) < 32:
        # one BLAS thread: these problems are tiny, and thread hand-offs cost more than they gain
        with threadpool_limits(limits=1):
            accs = [
                _episode_acc_a(bank, ep, C, normalize)
                for ep in tqdm(episodes, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
            ]
    else:
        from joblib import Parallel, delayed

        work = [(bank.support_of(ep.support), ep.support_labels, bank.eval_of(ep.query), ep.query_labels) for ep in episodes]
        bar = tqdm(work, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
        accs = Parallel(n_jobs=n_jobs, batch_size=16)(delayed(_work_acc_a)(*w, C, normalize) for w in bar)
    return np.asarray(accs, dtype=np.float64)


# --------------------------------------------------------------------------- protocol B


def _stack(ds: Dataset, ids: Sequence[int]) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in ids])


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class ProtoHead(nn.Module):
    """Linear head on L2-normalised features, initialised from class prototypes.

    With ``c_j`` the mean normalised feature of class ``j``, ``W_j = 2·s·c_j`` and
    ``b_j = −s·‖c_j‖²``, so ``logit_j = s·(‖f‖² − ‖f − c_j‖²)``: before any step the head is
    the nearest-prototype classifier, scaled by ``s``.

    Args:
        prototypes: ``[N, d]`` class means of normalised support features.
        scale: the logit scale ``s``.
    """

    def __init__(self, prototypes: torch.Tensor, scale: float = 10.0) -> None:
        super().__init__()
        self.linear = nn.Linear(prototypes.shape[1], prototypes.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(2.0 * scale * prototypes)
            self.linear.bias.copy_(-scale * prototypes.pow(2).sum(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features, dim=-1))


def finetune_episode(
    model: nn.Module,
    episode: Episode,
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    loss: str = "ce",
    lam: float = 0.9,
    temperature: float = 0.5,
    beta: float = 1.0,
    head_scale: float = 10.0,
) -> float:
    """Fine-tune on one episode's support set, classify its queries, restore the model.

    Every step draws two fresh augmented views of each support image (``support_dataset``
    applies a random transform on each access). BatchNorm/dropout stay in eval mode: a few
    support images cannot re-estimate normalisation statistics. The prototype head
    (:class:`ProtoHead`, from the evaluation views of the support images) and all model
    parameters with ``requires_grad`` are updated by Adam.

    Args:
        model: a model whose ``forward(x)`` returns an object with ``features[B, d]`` and
            ``projections[B, p]`` and which has ``forward_features(x) -> [B, d]``.
        episode: the episode.
        support_dataset: the split with the support augmentation.
        eval_dataset: the same split with the evaluation transform.
        steps: optimisation steps (0: the prototype classifier alone).
        lr: Adam learning rate.
        loss: ``"ce"`` or ``"joint"`` (``lam·SCHaNe + (1−lam)·CE`` on the two views).
        lam: the joint loss's weight of the contrastive term.
        temperature: SCHaNe temperature.
        beta: SCHaNe hard-negative concentration.
        head_scale: logit scale of the prototype head.

    Returns:
        Query accuracy in percent.

    Raises:
        ValueError: on an unknown ``loss`` or ``steps < 0``.
    """
    if loss not in ("ce", "joint"):
        raise ValueError(f"loss must be 'ce' or 'joint', got {loss!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = _model_device(model)
    saved_state = copy.deepcopy(model.state_dict())
    saved_mode = [(m, m.training) for m in model.modules()]
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    ys = torch.as_tensor(episode.support_labels, device=device)
    yq = torch.as_tensor(episode.query_labels, device=device)
    criterion = None
    if loss == "joint":
        from schane.losses import JointLoss, build_contrastive_loss

        contrastive = build_contrastive_loss(
            "schane", temperature=temperature, beta=beta, positive_mode="mean", tau_plus=0.1,
            gather_distributed=False, chunk_size=None,
        )
        criterion = JointLoss(contrastive, lam=lam)
    try:
        model.eval()
        with torch.no_grad():
            fs = model.forward_features(_stack(eval_dataset, episode.support).to(device))
            fs = F.normalize(fs.float(), dim=-1)
            protos = torch.stack([fs[ys == j].mean(0) for j in range(episode.ways)])
        head = ProtoHead(protos, scale=head_scale).to(device)
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        y2 = torch.cat([ys, ys])
        for _ in range(steps):
            x = torch.cat([_stack(support_dataset, episode.support), _stack(support_dataset, episode.support)]).to(device)
            if criterion is None:
                logits = head(model.forward_features(x))
                total = F.cross_entropy(logits, y2)
            else:
                out = model(x)
                total = criterion(head(out.features), y2, out.projections).total
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        with torch.no_grad():
            pred = head(model.forward_features(_stack(eval_dataset, episode.query).to(device))).argmax(1)
        return float((pred == yq).float().mean().item() * 100.0)
    finally:
        model.load_state_dict(saved_state)
        for m, mode in saved_mode:
            m.training = mode
        for p, flag in saved_grad:
            p.requires_grad_(flag)
            p.grad = None


def evaluate_protocol_b(
    model: nn.Module,
    episodes: Sequence[Episode],
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    loss: str = "ce",
    lam: float = 0.9,
    temperature: float = 0.5,
    beta: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "episodes",
) -> np.ndarray:
    """Per-episode accuracy (%) of per-episode fine-tuning (see :func:`finetune_episode`).

    Episode ``i``'s augmentations are drawn under torch and Python RNGs seeded by
    ``(seed, i)`` (the caller's RNG states are restored), so every model sees the same
    augmented views when images are loaded in the main process.

    Args:
        model: the model (restored after every episode).
        episodes: the episodes, evaluated in order.
        support_dataset: the split with the support augmentation.
        eval_dataset: the same split with the evaluation transform.
        steps, lr, loss, lam, temperature, beta: see :func:`finetune_episode`.
        seed: augmentation seed.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        ``[len(episodes)]`` accuracies in percent.

    Raises:
        ValueError: as :func:`finetune_episode`.
    """
    accs = []
    for i, ep in enumerate(tqdm(episodes, desc=desc, disable=not progress, leave=False)):
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stable_seed(seed, i))
            random.seed(_stable_seed(seed, i))
            accs.append(
                finetune_episode(
                    model, ep, support_dataset, eval_dataset, steps=steps, lr=lr, loss=loss, lam=lam,
                    temperature=temperature, beta=beta,
                )
            )
        random.setstate(py_state)
    return np.asarray(accs, dtype=np.float64)
