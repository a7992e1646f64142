"""The losses of :mod:`schane.losses` as plain float64 formulas: the tests' one oracle, and the maths to read.

Nothing in the fast path imports this module; it loops over anchors in Python and lets autograd derive every
gradient, so it is slow (use it on tens of embeddings, not thousands) and easy to check against the papers.

Notation, shared by every loss (``tau`` = ``temperature``):

* ``z_i`` = ``embeddings[i]`` L2-normalised when ``normalize`` (a row of norm ``<= 1e-12`` is the zero vector and
  gets a zero gradient); the contrast set is ``c = [z; ref_embeddings]`` (``M = N + M_ref`` rows, the reference
  rows normalised too) with labels ``[labels; ref_labels]``. Every ``z_i`` is an anchor; ``c_i = z_i`` is itself.
* ``s_ij = z_i . c_j / tau``.
* Positives ``P(i) = {j != i : y_j = y_i}``, negatives ``N(i) = {k : y_k != y_i}``.
* Hard-negative weights ``w_ik = exp(beta s_ik) / mean_{k' in N(i)} exp(beta s_ik')`` (they average 1 over
  ``N(i)``), and ``Ng_i = sum_{k in N(i)} w_ik exp(s_ik)`` (0 when ``N(i)`` is empty).
* The loss is the mean of ``l_i`` over the anchors with ``P(i)`` non-empty; 0 (still connected to the graph)
  when there is none.

The per-anchor losses ``l_i``:

* SCHaNe, ``positive_mode="mean"`` (the authors' release): ``pos_i = mean_{p in P(i)} exp(s_ip)``,
  ``l_i = -log(pos_i / (pos_i + Ng_i))``;
* SCHaNe, ``positive_mode="each"``: ``l_i = mean_{p in P(i)} -log(exp(s_ip) / (exp(s_ip) + Ng_i))``;
  ``detach_weights`` makes the ``w_ik`` constants in backward;
* SupCon ``L_out``: ``l_i = -mean_{p in P(i)} log(exp(s_ip) / sum_{a != i} exp(s_ia))``;
* NT-Xent (SimCLR), labels are instance ids: ``l_i = mean_{p in P(i)} -log(exp(s_ip) / (exp(s_ip) +
  sum_{k in N(i)} exp(s_ik)))``;
* hard-negative NT-Xent (Robinson et al., 2021), labels are instance ids:
  ``Ng_ip = max((Ng_i - tau_plus |N(i)| exp(s_ip)) / (1 - tau_plus), |N(i)| exp(-1/tau))`` (0 when ``N(i)`` is
  empty) and ``l_i = mean_{p in P(i)} -log(exp(s_ip) / (exp(s_ip) + Ng_ip))``.

The joint objective is ``lam * contrastive + (1 - lam) * CE`` (:func:`joint_reference`).

With ``gather_distributed=True`` the fast losses return ``world_size x`` each rank's share of the loss of the
whole gathered batch, so the mean over ranks equals these formulas on the concatenated batch.

Example:
    >>> import torch
    >>> from schane.losses import schane_loss
    >>> from schane.losses.reference import schane_reference
    >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3]).repeat(2)
    >>> torch.testing.assert_close(schane_loss(x, y), schane_reference(x, y))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "hard_negative_ntxent_reference",
    "joint_reference",
    "mean_over_anchors",
    "ntxent_reference",
    "schane_reference",
    "supcon_reference",
    "unit_rows_reference",
]


def unit_rows_reference(x: torch.Tensor) -> torch.Tensor:
    """``x_i / |x_i|`` per row; a row with ``|x_i| <= 1e-12`` is the zero vector (with a zero gradient).

    Args:
        x: ``[N, D]``.

    Returns:
        ``[N, D]`` in ``x``'s dtype.
    """
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    keep = norm > 1e-12
    return torch.where(keep, x / torch.where(keep, norm, 1.0), 0.0)


def _contrast_set(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z[N, D], c[M, D], c_labels[M])`` in float64: anchors, contrast set ``[z; ref]`` and its labels."""
    z = embeddings.to(torch.float64)
    if normalize:
        z = unit_rows_reference(z)
    if ref_embeddings is None or ref_labels is None:
        return z, z, labels
    r = ref_embeddings.to(torch.float64)
    if normalize:
        r = unit_rows_reference(r)
    return z, torch.cat([z, r]), torch.cat([labels, ref_labels])


AnchorLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(s[M], pos[M], neg[M]) -> l_i``: one anchor's loss from its similarities and its positive/negative masks."""


def mean_over_anchors(
    anchor_loss: AnchorLoss,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    temperature: float,
    normalize: bool,
) -> torch.Tensor:
    """The mean of ``l_i = anchor_loss(s_i, P(i), N(i))`` over the anchors ``i`` with a positive.

    Args:
        anchor_loss: ``(s[M], pos[M], neg[M]) -> l_i``: the anchor's similarities ``s_ij = z_i . c_j / tau`` to
            the contrast set and boolean masks of its positives ``P(i)`` and negatives ``N(i)`` (``pos | neg`` is
            every column but the anchor's own).
        embeddings: ``[N, D]`` anchors.
        labels: ``[N]`` their labels.
        ref_embeddings: ``[M_ref, D]`` extra contrast samples (never anchors), or ``None``.
        ref_labels: ``[M_ref]`` their labels, or ``None``.
        temperature: ``tau``.
        normalize: L2-normalise the rows first.

    Returns:
        Scalar float64 loss; ``0 * sum(z)`` (connected to the graph) when no anchor has a positive.
    """
    z, c, c_labels = _contrast_set(embeddings, labels, ref_embeddings, ref_labels, normalize)
    columns = torch.arange(c.shape[0], device=c.device)
    losses = []
    for i in range(z.shape[0]):
        same = c_labels == labels[i]
        pos, neg = same & (columns != i), ~same
        if pos.any():
            losses.append(anchor_loss(c @ z[i] / temperature, pos, neg))
    return torch.stack(losses).mean() if losses else z.sum() * 0.0


def _hard_negative_sum(s_neg: torch.Tensor, beta: float, detach_weights: bool = False) -> torch.Tensor:
    """``Ng = sum_k w_k exp(s_k)`` with ``w_k = exp(beta s_k) / mean_k' exp(beta s_k')``; 0 without negatives."""
    if s_neg.numel() == 0:
        return s_neg.new_zeros(())
    w = torch.exp(beta * s_neg) / torch.exp(beta * s_neg).mean()
    if detach_weights:
        w = w.detach()
    return (w * torch.exp(s_neg)).sum()


def schane_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.5,
    beta: float = 1.0,
    positive_mode: str = "mean",
    normalize: bool = True,
    detach_weights: bool = False,
) -> torch.Tensor:
    """SCHaNe (:func:`schane.losses.schane_loss`) from the formula in the module docstring.

    Args:
        embeddings: ``[N, D]``, views concatenated along N.
        labels: ``[N]`` class labels.
        ref_embeddings: ``[M_ref, D]`` extra contrast samples (e.g. a memory queue), or ``None``.
        ref_labels: ``[M_ref]`` their labels, or ``None``.
        temperature: ``tau``.
        beta: hard-negative concentration (0 = every weight 1).
        positive_mode: ``"mean"`` (mean of ``exp(s_ip)`` inside the log) or ``"each"`` (one term per positive).
        normalize: L2-normalise the rows first.
        detach_weights: the weights ``w_ik`` are constants in backward.

    Returns:
        Scalar float64 loss.

    Raises:
        ValueError: on an unknown ``positive_mode``.
    """
    if positive_mode not in ("mean", "each"):
        raise ValueError(f"positive_mode must be 'mean' or 'each', got {positive_mode!r}")

    def anchor_loss(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        ng = _hard_negative_sum(s[neg], beta, detach_weights)
        e_pos = torch.exp(s[pos])
        if positive_mode == "mean":
            pos_i = e_pos.mean()
            return -torch.log(pos_i / (pos_i + ng))
        return (-torch.log(e_pos / (e_pos + ng))).mean()

    return mean_over_anchors(
        anchor_loss, embeddings, labels, ref_embeddings, ref_labels, temperature, normalize
    )


def supcon_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
) -> torch.Tensor:
    """SupCon ``L_out`` (:func:`schane.losses.supcon_loss`) from the formula in the module docstring.

    Args:
        embeddings: ``[N, D]``.
        labels: ``[N]`` class labels.
        ref_embeddings: ``[M_ref, D]`` extra contrast samples, or ``None``.
        ref_labels: ``[M_ref]`` their labels, or ``None``.
        temperature: ``tau``.
        normalize: L2-normalise the rows first.

    Returns:
        Scalar float64 loss.
    """

    def anchor_loss(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        denominator = torch.exp(s[pos | neg]).sum()  # over every a != i
        return -torch.log(torch.exp(s[pos]) / denominator).mean()

    return mean_over_anchors(
        anchor_loss, embeddings, labels, ref_embeddings, ref_labels, temperature, normalize
    )


def _two_view_ids(embeddings: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``labels``, or ``[0..N/2-1, 0..N/2-1]`` (two views concatenated along N) when ``None``."""
    if labels is not None:
        return labels
    n = embeddings.shape[0]
    if n % 2:
        raise ValueError(f"labels=None assumes two views concatenated along N, but N={n} is odd")
    return torch.arange(n // 2, device=embeddings.device).repeat(2)


def ntxent_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.5,
    normalize: bool = True,
) -> torch.Tensor:
    """NT-Xent (:func:`schane.losses.ntxent_loss`) from the formula in the module docstring.

    Args:
        embeddings: ``[N, D]``.
        labels: ``[N]`` instance ids, or ``None`` for two views concatenated along N.
        ref_embeddings: ``[M_ref, D]`` extra contrast samples, or ``None``.
        ref_labels: ``[M_ref]`` their ids, or ``None``.
        temperature: ``tau``.
        normalize: L2-normalise the rows first.

    Returns:
        Scalar float64 loss.

    Raises:
        ValueError: if ``labels`` is ``None`` and N is odd.
    """

    def anchor_loss(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        e_pos = torch.exp(s[pos])
        return (-torch.log(e_pos / (e_pos + torch.exp(s[neg]).sum()))).mean()

    ids = _two_view_ids(embeddings, labels)
    return mean_over_anchors(anchor_loss, embeddings, ids, ref_embeddings, ref_labels, temperature, normalize)


def hard_negative_ntxent_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None = None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    temperature: float = 0.5,
    beta: float = 1.0,
    tau_plus: float = 0.1,
    normalize: bool = True,
) -> torch.Tensor:
    """Hard-negative NT-Xent (:func:`schane.losses.hard_negative_ntxent_loss`) from the module docstring's formula.

    Args:
        embeddings: ``[N, D]``.
        labels: ``[N]`` instance ids, or ``None`` for two views concatenated along N.
        ref_embeddings: ``[M_ref, D]`` extra contrast samples, or ``None``.
        ref_labels: ``[M_ref]`` their ids, or ``None``.
        temperature: ``tau``.
        beta: hardness concentration (0 = uniform negatives).
        tau_plus: class prior of false negatives (0 = no debiasing).
        normalize: L2-normalise the rows first.

    Returns:
        Scalar float64 loss.

    Raises:
        ValueError: if ``labels`` is ``None`` and N is odd.
    """

    def anchor_loss(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        e_pos, n_neg = torch.exp(s[pos]), int(neg.sum())
        ng_p = torch.zeros_like(e_pos)  # Ng_ip = 0 without negatives
        if n_neg > 0:
            debiased = (_hard_negative_sum(s[neg], beta) - tau_plus * n_neg * e_pos) / (1.0 - tau_plus)
            ng_p = torch.clamp(debiased, min=n_neg * math.exp(-1.0 / temperature))
        return (-torch.log(e_pos / (e_pos + ng_p))).mean()

    ids = _two_view_ids(embeddings, labels)
    return mean_over_anchors(anchor_loss, embeddings, ids, ref_embeddings, ref_labels, temperature, normalize)


def joint_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    contrastive: torch.Tensor | None,
    *,
    lam: float = 0.9,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``lam * contrastive + (1 - lam) * CE`` (:class:`schane.losses.JointLoss`), CE written out.

    ``CE = mean_n -sum_c q_nc log softmax(logits_n)_c`` with the smoothed targets
    ``q_nc = (1 - eps) [c = y_n] + eps / C``. ``lam = 1`` is the contrastive term alone, ``lam = 0`` (or
    ``contrastive=None``) CE alone.

    Args:
        logits: ``[N, C]`` classifier outputs.
        labels: ``[N]`` class indices.
        contrastive: the contrastive loss value (scalar), or ``None``.
        lam: weight of the contrastive term.
        label_smoothing: ``eps``.

    Returns:
        Scalar float64 loss.
    """
    weight = lam if contrastive is not None else 0.0
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    if contrastive is not None and weight > 0.0:
        total = total + weight * contrastive.to(torch.float64)
    if weight < 1.0:
        x = logits.to(torch.float64)
        log_p = x - torch.logsumexp(x, dim=1, keepdim=True)
        n, num_classes = x.shape
        q = torch.full_like(x, label_smoothing / num_classes)
        q[torch.arange(n, device=x.device), labels] += 1.0 - label_smoothing
        total = total + (1.0 - weight) * -(q * log_p).sum(dim=1).mean()
    return total
