"""Chunked log-space engine shared by every contrastive loss in :mod:`schane.losses`.

Each loss is a *row kernel*: given a block of scaled similarities ``s[n, M]`` (anchors x contrast set) and
boolean positive/negative masks, it returns the per-anchor loss and, in backward, ``dloss/ds``. The autograd
function :class:`_ContrastFn` walks over anchor rows in chunks, holds only per-row statistics between forward
and backward, and recomputes each similarity block in backward, so at most one ``[chunk, M]`` block (plus a few
temporaries of that size) is alive at a time. With ``chunk_size=None`` the block is the whole ``[N, M]`` matrix.

Log-space identities used (``LSE`` = log-sum-exp over the masked set):

* hard-negative sum: ``log sum_k w_ik e^{s_ik} = log|N(i)| + LSE_N((1+b) s_i) - LSE_N(b s_i)``,
* mean over positives: ``log mean_p e^{s_ip} = LSE_P(s_i) - log|P(i)|``,
* ``-log(a / (a + b)) = softplus(log b - log a)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._gather import gather_labels, gather_rows, world_info
from ._validation import validate_inputs

_NINF = float("-inf")


def _masked_max(s: torch.Tensor, mask: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Row max of ``s`` over ``mask``; 0 for rows whose mask is empty."""
    m = torch.where(mask, s, _NINF).amax(dim=1)
    return torch.where(has, m, torch.zeros_like(m))


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.clamp(x, min=torch.finfo(x.dtype).tiny))


@dataclass
class _NegStats:
    """Per-row statistics of the (hard-negative weighted) negative sum."""

    l1: torch.Tensor  # LSE_N((1+b) s), 0 where no negatives
    lb: torch.Tensor  # LSE_N(b s), 0 where no negatives
    log_ng: torch.Tensor  # log sum_k w_ik e^{s_ik}; -inf where no negatives


def _neg_forward(
    s: torch.Tensor, neg: torch.Tensor, pos: torch.Tensor, n_neg: torch.Tensor, beta: float
) -> tuple[_NegStats, torch.Tensor, torch.Tensor]:
    """Negative statistics plus, for reuse, ``mP`` (row max over positives) and ``sum_P e^{s - mP}``."""
    has_neg = n_neg > 0
    has_pos = pos.any(dim=1)
    m_n = _masked_max(s, neg, has_neg)
    m_p = _masked_max(s, pos, has_pos)
    # One shifted copy: positives shifted by their own max, negatives by theirs (no underflow of either sum).
    t = torch.where(pos, m_p[:, None], m_n[:, None])
    torch.sub(s, t, out=t)
    if beta == 0.0:
        t.exp_()
        sum_p = _masked_sum(t, pos)
        l1 = m_n + _safe_log(_masked_sum(t, neg))
        lb = torch.log(n_neg.to(s.dtype).clamp(min=1))
    else:
        eb = torch.exp(t * beta) if beta != 1.0 else None
        t.exp_()
        sum_p = _masked_sum(t, pos)
        if eb is None:
            eb = t.clone()
        lb = beta * m_n + _safe_log(_masked_sum(eb, neg))
        eb.mul_(t)
        l1 = (1.0 + beta) * m_n + _safe_log(_masked_sum(eb, neg))
        del eb
    del t
    log_n = torch.log(n_neg.to(s.dtype).clamp(min=1))
    log_ng = torch.where(has_neg, log_n + l1 - lb, torch.full_like(l1, _NINF))
    zero = torch.zeros_like(l1)
    stats = _NegStats(torch.where(has_neg, l1, zero), torch.where(has_neg, lb, zero), log_ng)
    return stats, m_p, sum_p


def _neg_grad(s: torch.Tensor, st: _NegStats, beta: float, detach_weights: bool) -> torch.Tensor:
    """``d log Ng_i / d s_ik`` on the whole block (only negative columns are meaningful)."""
    d = torch.mul(s, 1.0 + beta).sub_(st.l1[:, None]).exp_()
    if beta == 0.0 or detach_weights:
        return d
    d.mul_(1.0 + beta)
    r = torch.mul(s, beta).sub_(st.lb[:, None]).exp_().mul_(beta)
    return d.sub_(r)


class RowKernel:
    """Interface: per-anchor loss of one similarity block and its gradient."""

    n_stats: int = 0

    def forward_rows(
        self, s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, n_pos: torch.Tensor, n_neg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss[n], stats[n_stats, n])``; rows without positives may hold any finite loss."""
        raise NotImplementedError

    def grad_rows(
        self,
        s: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
        n_pos: torch.Tensor,
        n_neg: torch.Tensor,
        stats: torch.Tensor,
        g: torch.Tensor,
    ) -> torch.Tensor:
        """Return ``G[n, M] = g_i * dloss_i / ds_ij`` (zero outside positives and negatives)."""
        raise NotImplementedError


class SCHaNeKernel(RowKernel):
    """SCHaNe: ``-log(pos_i / (pos_i + sum_k w_ik e^{s_ik}))`` with ``w`` the hard-negative weights."""

    n_stats = 5

    def __init__(self, beta: float, positive_mode: str, detach_weights: bool) -> None:
        self.beta = beta
        self.mode = positive_mode
        self.detach = detach_weights

    def forward_rows(self, s, pos, neg, n_pos, n_neg):
        st, m_p, sum_p = _neg_forward(s, neg, pos, n_neg, self.beta)
        npos = n_pos.to(s.dtype).clamp(min=1)
        lse_p = m_p + _safe_log(sum_p)
        if self.mode == "mean":
            a = st.log_ng - (lse_p - torch.log(npos))
            loss = F.softplus(a)
        else:
            v = F.softplus(st.log_ng[:, None] - s)
            loss = _masked_sum(v, pos) / npos
            a = torch.zeros_like(lse_p)
        return loss, torch.stack([st.l1, st.lb, st.log_ng, lse_p, a])

    def grad_rows(self, s, pos, neg, n_pos, n_neg, stats, g):
        st = _NegStats(stats[0], stats[1], stats[2])
        lse_p, a = stats[3], stats[4]
        npos = n_pos.to(s.dtype).clamp(min=1)
        if self.mode == "mean":
            c = g * torch.sigmoid(a)
            gp = torch.sub(s, lse_p[:, None]).exp_().mul_(-c[:, None])
        else:
            gp = torch.sub(st.log_ng[:, None], s).sigmoid_()
            gp = torch.where(pos, gp, torch.zeros((), dtype=s.dtype, device=s.device))
            w = g / npos
            c = w * gp.sum(dim=1)
            gp.mul_(-w[:, None])
        d = _neg_grad(s, st, self.beta, self.detach).mul_(c[:, None])
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        return torch.where(neg, d, torch.where(pos, gp, zero))


class SupConKernel(RowKernel):
    """SupCon L_out: ``-mean_p log(e^{s_ip} / sum_{a != i} e^{s_ia})``."""

    n_stats = 1

    def forward_rows(self, s, pos, neg, n_pos, n_neg):
        allm = pos | neg
        has = allm.any(dim=1)
        m = _masked_max(s, allm, has)
        e = torch.sub(s, m[:, None]).exp_()
        lse = m + _safe_log(_masked_sum(e, allm))
        del e
        mean_pos = _masked_sum(s, pos) / n_pos.to(s.dtype).clamp(min=1)
        return lse - mean_pos, lse[None]

    def grad_rows(self, s, pos, neg, n_pos, n_neg, stats, g):
        lse = stats[0]
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        p = torch.sub(s, lse[:, None]).exp_()
        p = torch.where(pos | neg, p, zero)
        p.sub_(pos.to(s.dtype) / n_pos.to(s.dtype).clamp(min=1)[:, None])
        return p.mul_(g[:, None])


class HardNegativeKernel(RowKernel):
    """Robinson et al. (2021) debiased hard-negative NT-Xent, one term per positive pair.

    ``Ng_ip = max((sum_k w_ik e^{s_ik} - tau_plus |N(i)| e^{s_ip}) / (1 - tau_plus), |N(i)| e^{-1/tau})`` and
    ``loss_i = mean_p -log(e^{s_ip} / (e^{s_ip} + Ng_ip))``.
    """

    n_stats = 3

    def __init__(self, beta: float, tau_plus: float, temperature: float) -> None:
        self.beta = beta
        self.tau_plus = tau_plus
        self.inv_t = 1.0 / temperature

    def _pair_terms(self, s, log_ng, n_neg):
        has_neg = (n_neg > 0)[:, None]
        log_n = torch.log(n_neg.to(s.dtype).clamp(min=1))[:, None]
        safe_ng = torch.where(has_neg, log_ng[:, None], torch.zeros_like(log_n))
        if self.tau_plus > 0:
            t = s + (math.log(self.tau_plus) + log_n - safe_ng)
            ok = t < 0
            t_neg = torch.where(ok, t, torch.full_like(t, -1.0))
            log_d = safe_ng + torch.log(-torch.expm1(t_neg)) - math.log1p(-self.tau_plus)
            log_d = torch.where(ok, log_d, torch.full_like(log_d, _NINF))
        else:
            t = None
            log_d = safe_ng.expand_as(s)
        floor = log_n - self.inv_t
        unclamped = (log_d > floor) & has_neg
        log_ngt = torch.where(unclamped, log_d, floor.expand_as(s))
        log_ngt = torch.where(has_neg, log_ngt, torch.full_like(log_ngt, _NINF))
        return log_ngt, unclamped, t

    def forward_rows(self, s, pos, neg, n_pos, n_neg):
        st, _, _ = _neg_forward(s, neg, pos, n_neg, self.beta)
        log_ngt, _, _ = self._pair_terms(s, st.log_ng, n_neg)
        v = F.softplus(log_ngt - s)
        loss = _masked_sum(v, pos) / n_pos.to(s.dtype).clamp(min=1)
        return loss, torch.stack([st.l1, st.lb, st.log_ng])

    def grad_rows(self, s, pos, neg, n_pos, n_neg, stats, g):
        st = _NegStats(stats[0], stats[1], stats[2])
        log_ngt, unclamped, t = self._pair_terms(s, st.log_ng, n_neg)
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        v = torch.where(pos, torch.sigmoid(log_ngt - s), zero)
        if t is None:
            d_logng = torch.where(unclamped, v, zero)
            d_s = -v
        else:
            et = torch.where(unclamped, t, torch.full_like(t, -1.0)).exp()
            k = torch.where(unclamped, v / (1.0 - et), zero)
            d_logng = k
            d_s = -v - k * et
        w = g / n_pos.to(s.dtype).clamp(min=1)
        c = w * d_logng.sum(dim=1)
        d = _neg_grad(s, st, self.beta, False).mul_(c[:, None])
        return torch.where(neg, d, torch.where(pos, d_s * w[:, None], zero))


def _block_masks(
    a_labels: torch.Tensor, c_labels: torch.Tensor, self_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    eq = a_labels[:, None] == c_labels[None, :]
    neg = ~eq
    rows = torch.nonzero(self_idx >= 0).squeeze(1)
    eq[rows, self_idx[rows]] = False
    return eq, neg


def _chunks(n: int, chunk: int | None):
    step = n if not chunk else chunk
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


class _ContrastFn(torch.autograd.Function):
    """``sum_i weight_i * loss_i`` over anchors, evaluated in row chunks with recomputation in backward."""

    @staticmethod
    def forward(ctx, anchors, contrast, a_labels, c_labels, self_idx, n_pos, n_neg, weights, kernel, chunk):
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            total = anchors.new_zeros(())
            stats = []
            for sl in _chunks(anchors.shape[0], chunk):
                s = anchors[sl] @ contrast.T
                pos, neg = _block_masks(a_labels[sl], c_labels, self_idx[sl])
                loss, st = kernel.forward_rows(s, pos, neg, n_pos[sl], n_neg[sl])
                del s, pos, neg
                w = weights[sl]
                total = total + torch.where(w != 0, w * loss, torch.zeros_like(loss)).sum()
                stats.append(st)
            stats_t = torch.cat(stats, dim=1) if stats else anchors.new_zeros((kernel.n_stats, 0))
        ctx.kernel, ctx.chunk = kernel, chunk
        ctx.save_for_backward(anchors, contrast, a_labels, c_labels, self_idx, n_pos, n_neg, weights, stats_t)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        anchors, contrast, a_labels, c_labels, self_idx, n_pos, n_neg, weights, stats = ctx.saved_tensors
        kernel = ctx.kernel
        g_all = weights * grad_out
        d_anchor = torch.zeros_like(anchors) if ctx.needs_input_grad[0] else None
        d_contrast = torch.zeros_like(contrast) if ctx.needs_input_grad[1] else None
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            for sl in _chunks(anchors.shape[0], ctx.chunk):
                g = g_all[sl]
                if not bool((g != 0).any()):
                    continue
                s = anchors[sl] @ contrast.T
                pos, neg = _block_masks(a_labels[sl], c_labels, self_idx[sl])
                grad = kernel.grad_rows(s, pos, neg, n_pos[sl], n_neg[sl], stats[:, sl], g)
                del s, pos, neg
                if d_anchor is not None:
                    d_anchor[sl] = grad @ contrast
                if d_contrast is not None:
                    d_contrast.addmm_(grad.T, anchors[sl])
        return d_anchor, d_contrast, None, None, None, None, None, None, None, None


def _same_label_counts(a_labels: torch.Tensor, c_labels: torch.Tensor) -> torch.Tensor:
    """For each anchor label, how many entries of ``c_labels`` carry it."""
    if c_labels.numel() == 0:
        return torch.zeros_like(a_labels)
    uniq, counts = torch.unique(c_labels, return_counts=True)
    idx = torch.searchsorted(uniq, a_labels).clamp(max=uniq.numel() - 1)
    return torch.where(uniq[idx] == a_labels, counts[idx], torch.zeros_like(counts[idx]))


def contrastive_loss(
    kernel: RowKernel,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    *,
    temperature: float,
    normalize: bool,
    gather_distributed: bool,
    chunk_size: int | None,
) -> torch.Tensor:
    """Validate, normalise, optionally gather across ranks, and evaluate ``kernel``; see the public losses."""
    validate_inputs(embeddings, labels, ref_embeddings, ref_labels)
    device = embeddings.device
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    labels = labels.to(device=device, dtype=torch.long)

    with torch.autocast(device_type=device.type, enabled=False):
        z = embeddings.to(dtype)
        if normalize:
            z = F.normalize(z, dim=1)
        rank, world = world_info() if gather_distributed else (0, 1)
        n = z.shape[0]
        if world > 1:
            z_all = gather_rows(z)
            y_all = gather_labels(labels)
        else:
            z_all, y_all = z, labels
        parts, label_parts = [z_all], [y_all]
        if ref_embeddings is not None:
            r = ref_embeddings.to(device=device, dtype=dtype)
            parts.append(F.normalize(r, dim=1) if normalize else r)
            label_parts.append(ref_labels.to(device=device, dtype=torch.long))
        contrast = torch.cat(parts) if len(parts) > 1 else z_all
        c_labels = torch.cat(label_parts) if len(label_parts) > 1 else y_all

        self_idx = torch.arange(n, device=device) + rank * n
        same = _same_label_counts(labels, c_labels)
        n_pos = same - 1
        n_neg = c_labels.shape[0] - same
        # The normaliser counts valid anchors over all ranks so the per-rank losses sum to W x the full-batch loss;
        # DDP averages gradients over W ranks, which gives exactly the full-batch gradient.
        if world > 1:
            n_valid = int(((_same_label_counts(y_all, c_labels) - 1) > 0).sum())
        else:
            n_valid = int((n_pos > 0).sum())
        scale = world / n_valid if n_valid > 0 else 0.0
        weights = (n_pos > 0).to(dtype) * scale
        anchors = z / temperature
        return _ContrastFn.apply(
            anchors, contrast, labels, c_labels, self_idx, n_pos, n_neg, weights, kernel, chunk_size
        )
