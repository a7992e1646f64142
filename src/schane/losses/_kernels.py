"""Row kernels of the contrastive losses: per-anchor loss of one similarity block and its gradient.

A kernel sees a :class:`Block`: the scaled similarities ``s[n, M]`` of ``n`` anchors against the contrast set,
the contrast columns that share each anchor's label (``idx[n, P]``, padded with the anchor's own column) and
those entries of ``s`` gathered before anything else touches the block (``sp[n, P]``; ``valid`` marks the real
positives: same label, not the anchor itself). Positive terms are computed on these small ``[n, P]`` tensors;
the dense block is only used for sums over negatives (SCHaNe, hard-negative NT-Xent) or over all other samples
(SupCon); which columns count is given to the block operations of :mod:`._blockops` as labels (and the
same-label positions), never as an ``[n, M]`` boolean mask. In backward the dense operation runs over every
column and the same-label columns are then overwritten with their own gradient by one sparse scatter.

Log-space identities (``LSE`` = log-sum-exp over the negatives ``N(i)``):

* hard-negative sum: ``log sum_k w_ik e^{s_ik} = log|N(i)| + LSE((1+b) s_i) - LSE(b s_i)``,
* mean over positives: ``log mean_p e^{s_ip} = LSE_P(s_i) - log|P(i)|``,
* ``-log(a / (a + b)) = softplus(log b - log a)``.

Gradients are returned as ``(H, sign)`` with ``dloss/ds = sign * H`` for a nonnegative per-row upstream
weight ``g`` (the engine applies ``sign`` to the products with ``H``); row factors are folded into the exponent
shifts (``c e^x = e^{x + log c}``) so that no extra pass over the block is needed.

Each kernel computes, in this log-space form, the loss that :mod:`schane.losses.reference` writes as a plain
float64 loop; the tests hold every kernel (value and gradient) to that reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._blockops import BlockOps

_NINF = float("-inf")
_LOG2 = math.log(2.0)


@dataclass
class Block:
    """One chunk of anchor rows: the similarity block and its positive structure.

    Attributes:
        s: ``[n, M]`` scaled similarities; kernels overwrite it.
        a_lab: ``[n]`` anchor labels; c_lab: ``[M]`` contrast labels.
        idx: ``[n, P]`` contrast columns with the anchor's label (self included, padding = self).
        valid: ``[n, P]`` true for real positives.
        self_col: ``[n, 1]`` the anchor's own column.
        sp: ``[n, P]`` ``s`` at ``idx`` (gathered before any masking).
        n_pos: ``[n]`` number of positives; n_neg: ``[n]`` number of negatives.
    """

    s: torch.Tensor
    a_lab: torch.Tensor
    c_lab: torch.Tensor
    idx: torch.Tensor
    valid: torch.Tensor
    self_col: torch.Tensor
    sp: torch.Tensor
    n_pos: torch.Tensor
    n_neg: torch.Tensor

    def npos(self) -> torch.Tensor:
        return self.n_pos.to(self.s.dtype).clamp(min=1)

    def put_same_label_(self, h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Overwrite ``h`` at every same-label column: ``values[n, P]`` at positives, 0 at the anchor itself."""
        return h.scatter_(1, self.idx, torch.where(self.valid, values, 0.0))


def _masked_lse(x: torch.Tensor, valid: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Row LSE of ``x[n, P]`` over ``valid``; 0 for rows without a valid entry (``has[n]`` false)."""
    out = torch.logsumexp(torch.where(valid, x, _NINF), dim=1)
    return torch.where(has, out, torch.zeros_like(out))


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x)  # log(0) = -inf is intended: a zero row factor shifts its row to exp(-inf) = 0


@dataclass
class NegStats:
    """Per-row statistics of the (hard-negative weighted) negative sum, with ``t = s - m``.

    ``LSE_N(b s) = b m + log_sb`` and ``LSE_N((1+b) s) = (1+b) m + log_s1``; ``log_sb = log|N|`` for ``b = 0``.
    """

    m: torch.Tensor  # row max over the negatives, 0 where none
    log_sb: torch.Tensor  # log sum_N e^{b t}, 0 where no negatives
    log_s1: torch.Tensor  # log sum_N e^{(1+b) t}, 0 where no negatives
    log_ng: torch.Tensor  # log sum_k w_ik e^{s_ik} = log|N| + m + log_s1 - log_sb; -inf where no negatives

    N_ROWS = 4

    def rows(self) -> list[torch.Tensor]:
        return [self.m, self.log_sb, self.log_s1, self.log_ng]


def neg_stats(ops: BlockOps, blk: Block, beta: float) -> NegStats:
    """Negative statistics of a block (may destroy ``blk.s``).

    ``log_ng`` is ``log Ng_i`` in the notation of :mod:`schane.losses.reference`.
    """
    has = blk.n_neg > 0
    log_n = torch.log(blk.n_neg.to(blk.s.dtype).clamp(min=1))
    if beta == 0.0:
        m, log_s1 = ops.neg_lse(blk.s, blk.a_lab, blk.c_lab, has, blk.idx)
        log_sb = log_n
    else:
        m, log_sb, log_s1 = ops.neg_lse_pair(blk.s, blk.a_lab, blk.c_lab, has, blk.idx, beta)
    zero = torch.zeros_like(log_n)
    log_sb, log_s1 = torch.where(has, log_sb, zero), torch.where(has, log_s1, zero)
    log_ng = torch.where(has, log_n + m + log_s1 - log_sb, torch.full_like(m, _NINF))
    return NegStats(m, log_sb, log_s1, log_ng)


def neg_grad_sign(beta: float, detach: bool) -> float:
    """The sign :func:`neg_grad` returns its block with (known before it runs)."""
    return -1.0 if beta == 1.0 and not detach else 1.0


def neg_grad(
    ops: BlockOps, blk: Block, st: NegStats, c: torch.Tensor, beta: float, detach: bool
) -> torch.Tensor:
    """``H`` with ``neg_grad_sign * H = c_i * d log Ng_i / d s_ik`` on negative columns (``c >= 0``).

    Same-label columns hold values without meaning (possibly inf or NaN): the caller overwrites them. With
    ``t = s - m``: ``d log Ng / d s_k = (1+b) e^{(1+b) t_k - log_s1} - b e^{b t_k - log_sb}`` (only the first
    term, without its ``1+b``, when the weights are detached). For ``b = 1``, with ``q = e^t / S1``:
    ``c (2 q^2 S1^2 / S2 - q) = -X (1 + E - X)`` where ``X = sqrt(2c / S2) e^t`` and ``E = sqrt(c S2 / 2) / S1 - 1``
    (``S1 = e^{log_sb}``, ``S2 = e^{log_s1}``), which one exp and one lerp compute in place. The factor ``c``
    enters as a shift of ``t`` (``c e^x = e^{x + log c}``), applied after ``m``.
    """
    s = blk.s
    log_c = _log(c)
    if beta == 0.0 or detach:
        return ops.exp_shift_(s, st.m, 1.0 + beta, st.log_s1 - log_c)
    if beta == 1.0:
        e = torch.exp(0.5 * (log_c - _LOG2 + st.log_s1) - st.log_sb) - 1.0
        return ops.quadratic_(s, st.m, 0.5 * (st.log_s1 - log_c - _LOG2), e)
    delta1 = st.log_s1 - log_c - math.log1p(beta)
    delta_b = st.log_sb - log_c - math.log(beta)
    return ops.grad_general_(s, st.m, beta, delta1, delta_b)


class RowKernel:
    """Interface: per-anchor loss of one block and its gradient."""

    n_stats: int = 0

    def __init__(self, ops: BlockOps) -> None:
        self.ops = ops

    def forward_rows(self, blk: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss[n], stats[n_stats, n])``; rows without positives may hold any finite loss."""
        raise NotImplementedError

    def grad_rows(self, blk: Block, stats: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Return ``(H[n, M], sign)`` with ``g_i * dloss_i / ds_ij = sign * H_ij`` for ``g >= 0``.

        ``H`` may be ``blk.s`` overwritten in place.
        """
        raise NotImplementedError


class SCHaNeKernel(RowKernel):
    """SCHaNe: ``-log(pos_i / (pos_i + sum_k w_ik e^{s_ik}))`` with ``w`` the hard-negative weights.

    Plain form: :func:`schane.losses.reference.schane_reference` (NT-Xent is this kernel with ``beta = 0`` and
    ``"each"``: :func:`schane.losses.reference.ntxent_reference`).
    """

    n_stats = NegStats.N_ROWS + 2

    def __init__(self, beta: float, positive_mode: str, detach_weights: bool, ops: BlockOps) -> None:
        super().__init__(ops)
        self.beta = beta
        self.mode = positive_mode
        self.detach = detach_weights

    def forward_rows(self, blk: Block) -> tuple[torch.Tensor, torch.Tensor]:
        st = neg_stats(self.ops, blk, self.beta)
        npos = blk.npos()
        lse_p = _masked_lse(blk.sp, blk.valid, blk.n_pos > 0)
        if self.mode == "mean":
            a = st.log_ng - (lse_p - torch.log(npos))
            loss = F.softplus(a)
        else:
            v = F.softplus(st.log_ng[:, None] - blk.sp)
            loss = torch.where(blk.valid, v, 0.0).sum(dim=1) / npos
            a = torch.zeros_like(lse_p)
        return loss, torch.stack([*st.rows(), lse_p, a])

    def grad_rows(self, blk: Block, stats: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, float]:
        st = NegStats(*stats[: NegStats.N_ROWS])
        lse_p, a = stats[NegStats.N_ROWS], stats[NegStats.N_ROWS + 1]
        sign = neg_grad_sign(self.beta, self.detach)
        if self.mode == "mean":
            c = g * torch.sigmoid(a)
            gp = (
                torch.sub(blk.sp, lse_p[:, None]).exp_().mul_((-sign) * c[:, None])
            )  # -c softmax_P(sp), signed
        else:
            v = torch.where(blk.valid, torch.sigmoid(st.log_ng[:, None] - blk.sp), 0.0)
            w = g / blk.npos()
            c = w * v.sum(dim=1)
            gp = v.mul_((-sign) * w[:, None])
        h = neg_grad(self.ops, blk, st, c, self.beta, self.detach)
        return blk.put_same_label_(h, gp), sign


class SupConKernel(RowKernel):
    """SupCon L_out: ``-mean_p log(e^{s_ip} / sum_{a != i} e^{s_ia})``.

    Plain form: :func:`schane.losses.reference.supcon_reference`.
    """

    n_stats = 2

    def forward_rows(self, blk: Block) -> tuple[torch.Tensor, torch.Tensor]:
        has = (blk.n_pos + blk.n_neg) > 0
        mean_pos = torch.where(blk.valid, blk.sp, 0.0).sum(dim=1) / blk.npos()
        m, log_s = self.ops.others_lse(blk.s, blk.self_col, has)
        return m + log_s - mean_pos, torch.stack([m, log_s])

    def grad_rows(self, blk: Block, stats: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, float]:
        # g * softmax over all columns, then 0 at the anchor itself and -g/|P| added at its positives
        h = self.ops.exp_shift_(blk.s, stats[0], 1.0, stats[1] - _log(g)).scatter_(1, blk.self_col, 0.0)
        gp = torch.where(blk.valid, (-g / blk.npos())[:, None], 0.0)
        return h.scatter_add_(1, blk.idx, gp), 1.0


class HardNegativeKernel(RowKernel):
    """Robinson et al. (2021) debiased hard-negative NT-Xent, one term per positive pair.

    ``Ng_ip = max((sum_k w_ik e^{s_ik} - tau_plus |N(i)| e^{s_ip}) / (1 - tau_plus), |N(i)| e^{-1/tau})`` and
    ``loss_i = mean_p -log(e^{s_ip} / (e^{s_ip} + Ng_ip))``.

    Plain form: :func:`schane.losses.reference.hard_negative_ntxent_reference`.
    """

    n_stats = NegStats.N_ROWS

    def __init__(self, beta: float, tau_plus: float, temperature: float, ops: BlockOps) -> None:
        super().__init__(ops)
        self.beta = beta
        self.tau_plus = tau_plus
        self.inv_t = 1.0 / temperature

    def _pair_terms(
        self, sp: torch.Tensor, log_ng: torch.Tensor, n_neg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per positive pair (on ``sp[n, P]``): ``log Ng_ip``, whether the clamp is inactive, and ``t``."""
        has_neg = (n_neg > 0)[:, None]
        log_n = torch.log(n_neg.to(sp.dtype).clamp(min=1))[:, None]
        safe_ng = torch.where(has_neg, log_ng[:, None], torch.zeros_like(log_n))
        if self.tau_plus > 0:
            t = sp + (math.log(self.tau_plus) + log_n - safe_ng)
            ok = t < 0
            t_neg = torch.where(ok, t, torch.full_like(t, -1.0))
            log_d = safe_ng + torch.log(-torch.expm1(t_neg)) - math.log1p(-self.tau_plus)
            log_d = torch.where(ok, log_d, torch.full_like(log_d, _NINF))
        else:
            t = None
            log_d = safe_ng.expand_as(sp)
        floor = log_n - self.inv_t
        unclamped = (log_d > floor) & has_neg
        log_ngt = torch.where(unclamped, log_d, floor.expand_as(sp))
        log_ngt = torch.where(has_neg, log_ngt, torch.full_like(log_ngt, _NINF))
        return log_ngt, unclamped, t

    def forward_rows(self, blk: Block) -> tuple[torch.Tensor, torch.Tensor]:
        st = neg_stats(self.ops, blk, self.beta)
        log_ngt, _, _ = self._pair_terms(blk.sp, st.log_ng, blk.n_neg)
        v = F.softplus(log_ngt - blk.sp)
        loss = torch.where(blk.valid, v, 0.0).sum(dim=1) / blk.npos()
        return loss, torch.stack(st.rows())

    def grad_rows(self, blk: Block, stats: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, float]:
        st = NegStats(*stats)
        log_ngt, unclamped, t = self._pair_terms(blk.sp, st.log_ng, blk.n_neg)
        v = torch.where(blk.valid, torch.sigmoid(log_ngt - blk.sp), 0.0)
        if t is None:
            d_logng = torch.where(unclamped, v, 0.0)
            d_s = -v
        else:
            et = torch.where(unclamped, t, torch.full_like(t, -1.0)).exp()
            d_logng = torch.where(unclamped, v / (1.0 - et), 0.0)
            d_s = -v - d_logng * et
        w = g / blk.npos()
        c = w * d_logng.sum(dim=1)
        sign = neg_grad_sign(self.beta, False)
        h = neg_grad(self.ops, blk, st, c, self.beta, False)
        return blk.put_same_label_(h, d_s * (sign * w)[:, None]), sign
