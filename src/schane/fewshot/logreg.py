"""L2-regularised multinomial logistic regression on frozen features (few-shot protocol A's classifier).

:func:`logreg_fit_batched` fits one regression per episode, all episodes at once, by a batched float64
L-BFGS in torch; it minimises scikit-learn ``LogisticRegression``'s objective, which stays available as the
reference (:func:`logreg_predict` with ``solver="sklearn"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

SOLVERS = ("torch", "sklearn")


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


def _lbfgs_direction(
    g: torch.Tensor, s_hist: list[torch.Tensor], y_hist: list[torch.Tensor], rho_hist: list[torch.Tensor],
    gamma: torch.Tensor, h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS two-loop recursion per episode: ``(direction [E, n], slope [E])`` with a descent fallback."""
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
    return direction, slope


def _armijo(
    fg: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    p: torch.Tensor, f: torch.Tensor, g: torch.Tensor, direction: torch.Tensor, slope: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backtracking (Armijo) line search, one step length per episode.

    f and g at the trial point come together, as the first trial (step 1) is nearly always accepted.

    Returns:
        ``(p_new, f_new, g_new, accepted)``; episodes that are not ``active`` keep their point.
    """
    step = active.to(p.dtype)
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
    return p_new, f_new, g_new, accepted


def _check_fit_args(support: torch.Tensor, labels: torch.Tensor, n_classes: int, C: float) -> None:
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


def _lbfgs(
    fg: Callable[..., tuple[torch.Tensor, torch.Tensor]], p: torch.Tensor, h0: torch.Tensor, *,
    max_iter: int, gtol: float, history: int,
) -> torch.Tensor:
    """Batched L-BFGS from ``p [E, n]``: one curvature history and one line search per episode.

    Args:
        fg: ``fg(p, sel=None) -> (f [E'], g [E', n])``, the objectives and gradients of the selected episodes.
        p: starting points.
        h0: ``[E, n]`` diagonal initial inverse Hessian.
        max_iter, gtol, history: see :func:`logreg_fit_batched`.

    Returns:
        The minimisers ``[E, n]``.
    """
    f, g = fg(p)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho_hist: list[torch.Tensor] = []
    gamma = p.new_ones(p.shape[0])
    active = g.abs().amax(1) > gtol
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        direction, slope = _lbfgs_direction(g, s_hist, y_hist, rho_hist, gamma, h0)
        p_new, f_new, g_new, accepted = _armijo(fg, p, f, g, direction, slope, active)
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
    return p


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
    _check_fit_args(support, labels, n_classes, C)
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
        assert gv is not None and gb is not None  # grad=True returns the gradients
        return f, torch.cat([gv.reshape(p.shape[0], -1), gb], dim=1)

    # diagonal initial inverse Hessian: in the eigenbasis the penalised Hessian is close to
    # diag(a·λ_j + 1/C) for v (a ≈ p(1 − p)) and a·S for b, which removes most of its spread
    a = 0.2
    h0 = torch.cat(
        [(1.0 / (a * lam + 1.0 / C)).unsqueeze(2).expand(e, rank, k).reshape(e, -1),
         x.new_full((e, k), 1.0 / (a * x.shape[1]))],
        dim=1,
    )
    p = _lbfgs(fg, x.new_zeros(e, n), h0, max_iter=max_iter, gtol=gtol, history=history)
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
    if solver not in SOLVERS:
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


__all__ = ["SOLVERS", "logreg_fit_batched", "logreg_predict"]
