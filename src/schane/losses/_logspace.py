"""Chunked log-space engine shared by every contrastive loss in :mod:`schane.losses`.

Each loss is a *row kernel* (:mod:`._kernels`): given a block of scaled similarities ``s[n, M]`` (anchors x
contrast set) and the positions of each anchor's same-label columns, it returns the per-anchor loss and, in
backward, ``dloss/ds``. The autograd function :class:`_ContrastFn` walks over anchor rows in chunks, holds only
per-row statistics between forward and backward, and recomputes each similarity block in backward, so at most
one ``[chunk, M]`` block (reused by every chunk) is alive at a time. With ``chunk_size=None`` the block is the
whole ``[N, M]`` matrix. :func:`evaluate_rows` is its entry point; the inputs reach it checked, normalised and
gathered by :class:`schane.losses.base.PairwiseContrastiveLoss`. Every result equals the plain float64 formula
of :mod:`schane.losses.reference` for the loss whose kernel runs.

Labels are compared once per call, not per block entry: the contrast labels are sorted, and each anchor's
same-label columns are a contiguous run of that order (found with ``searchsorted``). Counts of positives and
negatives follow from the run lengths.

Zero rows: with ``normalize=True`` a row whose norm is at most ``1e-12`` (e.g. all zeros) has no direction; it
is used as the zero vector (similarity 0 to every sample) and gets an exactly zero gradient (:func:`unit_rows`,
whose plain form is :func:`schane.losses.reference.unit_rows_reference`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ._kernels import Block, RowKernel
from ._validation import check_finite

_NORM_EPS = 1e-12
# forward keeps each chunk's [n, P] positions for backward when P <= M / this (about 1/7 of a block's bytes)
_KEEP_POSITIONS_RATIO = 16


class _UnitRows(torch.autograd.Function):
    """``z = x * r`` with ``r = 1 / |x|`` per row (0 where ``|x| <= 1e-12``); backward ``r (dz - z (z . dz))``.

    Each row is first divided by its largest absolute entry ``a``, so the norm never overflows (finite rows with
    norms up to ~1e38 and beyond in float32) nor underflows: ``z = (x / a) / |x / a|``, ``r = (1 / a) / |x / a|``.
    Returns ``(z, a)``; ``a`` is NaN or inf exactly when the row holds a NaN or inf.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = x.abs().amax(dim=1, keepdim=True) if x.shape[1] > 0 else x.new_zeros(x.shape[0], 1)
        safe = torch.where(amax > 0, amax, 1.0)
        scaled = x / safe
        snorm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)  # in [1, sqrt(D)] for a non-zero row
        keep = (amax > 0) & (snorm * amax > _NORM_EPS)
        z = torch.where(keep, scaled / snorm.clamp(min=1.0), 0.0)
        inv = torch.where(keep, (1.0 / safe) / snorm.clamp(min=1.0), 0.0)
        ctx.save_for_backward(z, inv)
        ctx.mark_non_differentiable(amax)
        return z, amax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dz: torch.Tensor, _dnorm: torch.Tensor) -> torch.Tensor:
        z, inv = ctx.saved_tensors
        dot = torch.linalg.vecdot(z, dz, dim=1).unsqueeze(1)
        return torch.addcmul(dz, z, dot, value=-1.0).mul_(inv)


def unit_rows(x: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
    """L2-normalise the rows of ``x[N, D]``; rows with norm ``<= 1e-12`` become 0 with a zero gradient.

    Equal to ``F.normalize(x, dim=1)`` (up to rounding) on every other row. ``F.normalize`` maps a zero row to
    ``x / 1e-12`` and so multiplies its gradient by ``1e12``; here such a row is a constant zero vector instead.
    Rows are scaled by their largest absolute entry before the norm is taken, so finite rows of any size
    (float32 norms of 1e19 to 1e38, whose squares overflow) are normalised exactly, not treated as zero.

    Raises:
        ValueError: if ``x`` contains NaN or inf (checked on the row norms; ``name`` is used in the message).
    """
    z, amax = _UnitRows.apply(x)
    if not bool(torch.isfinite(amax).all()):
        check_finite(x, name)
    return z


class LabelIndex:
    """Where each anchor's label occurs in the contrast set.

    Attributes:
        a_labels: ``[N]`` anchor labels; c_labels: ``[M]`` contrast labels.
        order: ``[M]`` contrast columns sorted by label (stable).
        start: ``[N]`` first position in ``order`` holding the anchor's label.
        count: ``[N]`` contrast entries with the anchor's label (the anchor itself included).
        self_idx: ``[N]`` the anchor's own column.
    """

    _FIELDS = ("a_labels", "c_labels", "order", "start", "count", "self_idx")

    def __init__(self, a_labels: torch.Tensor, c_labels: torch.Tensor, self_idx: torch.Tensor) -> None:
        self.a_labels, self.c_labels, self.self_idx = a_labels, c_labels, self_idx
        sorted_labels, self.order = torch.sort(c_labels, stable=True)
        self.start, self.count = _runs(sorted_labels, a_labels)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f) for f in self._FIELDS)

    @classmethod
    def from_tensors(cls, *tensors: torch.Tensor) -> LabelIndex:
        obj = cls.__new__(cls)
        for f, v in zip(cls._FIELDS, tensors, strict=True):
            setattr(obj, f, v)
        return obj


def _runs(sorted_labels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, count)`` of each label's run in ``sorted_labels`` (count 0 if absent)."""
    start = torch.searchsorted(sorted_labels, labels, side="left")
    end = torch.searchsorted(sorted_labels, labels, side="right")
    return start, end - start


def _positions(index: LabelIndex, sl: slice, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx[n, P], valid[n, P])`` for anchor rows ``sl``: their same-label columns, padded with the anchor's own.

    ``P`` is the largest same-label count of these rows; ``valid`` marks the real positives (not self, not
    padding).
    """
    start, count = index.start[sl], index.count[sl]
    self_col = index.self_idx[sl, None]
    width = int(count.max()) if count.numel() else 0
    k = torch.arange(width, device=start.device)
    order = torch.cat([index.order, index.order.new_zeros(width)])  # so that every position is in range
    pos = start[:, None] + k
    idx = torch.where(k < count[:, None], order.gather(0, pos.view(-1)).view_as(pos), self_col)
    return idx, idx != self_col


def _make_block(
    s: torch.Tensor, index: LabelIndex, sl: slice, positions: tuple[torch.Tensor, torch.Tensor]
) -> Block:
    """The :class:`Block` of anchor rows ``sl`` with similarity block ``s`` (gathers the positives first)."""
    m = s.shape[1]
    idx, valid = positions
    count = index.count[sl]
    return Block(
        s,
        index.a_labels[sl],
        index.c_labels,
        idx,
        valid,
        index.self_idx[sl, None],
        s.gather(1, idx),
        count - 1,
        m - count,
    )


def _chunks(n: int, chunk: int | None) -> Iterator[slice]:
    step = n if not chunk else chunk
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


class _ContrastFn(torch.autograd.Function):
    """``sum_i weight_i * loss_i`` over anchors, evaluated in row chunks with recomputation in backward.

    ``s = inv_t * anchors @ contrast.T``. ``anchors=None`` means the anchors are ``contrast[:n]`` (one process):
    their gradient is then accumulated straight into the contrast gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        anchors: torch.Tensor | None,
        contrast: torch.Tensor,
        weights: torch.Tensor,
        inv_t: float,
        kernel: RowKernel,
        chunk: int | None,
        *index_tensors: torch.Tensor,
    ) -> torch.Tensor:
        index = LabelIndex.from_tensors(*index_tensors)
        n = index.a_labels.shape[0]
        a = contrast[:n] if anchors is None else anchors
        with torch.autocast(device_type=contrast.device.type, enabled=False):
            total = contrast.new_zeros(())
            stats = []
            m = contrast.shape[0]
            buf = contrast.new_empty((min(chunk or n, n), m))
            kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
            for sl in _chunks(n, chunk):
                s = buf[: sl.stop - sl.start].addmm_(a[sl], contrast.T, beta=0.0, alpha=inv_t)
                positions = _positions(index, sl, m)
                loss, st = kernel.forward_rows(_make_block(s, index, sl, positions))
                w = weights[sl]
                total = total + torch.where(w != 0, w * loss, torch.zeros_like(loss)).sum()
                stats.append(st)
                # keep the positions for backward while they are small next to a block (few positives per row)
                if kept is not None and positions[0].shape[1] * _KEEP_POSITIONS_RATIO <= m:
                    kept.append(positions)
                else:
                    kept = None
            del buf
            stats_t = torch.cat(stats, dim=1)
        ctx.kernel, ctx.chunk, ctx.inv_t, ctx.positions = kernel, chunk, inv_t, kept
        ctx.save_for_backward(anchors, contrast, weights, stats_t, *index_tensors)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        anchors, contrast, weights, stats, *index_tensors = ctx.saved_tensors
        index = LabelIndex.from_tensors(*index_tensors)
        n = index.a_labels.shape[0]
        a = contrast[:n] if anchors is None else anchors
        out_sign = -1.0 if bool(grad_out < 0) else 1.0
        g_all = weights * (grad_out * out_sign)  # >= 0; the sign is applied to the products below
        d_contrast = torch.zeros_like(contrast) if ctx.needs_input_grad[1] else None
        if anchors is None:
            d_anchor = None if d_contrast is None else d_contrast[:n]
        else:
            d_anchor = torch.zeros_like(anchors) if ctx.needs_input_grad[0] else None
        with torch.autocast(device_type=contrast.device.type, enabled=False):
            buf = None
            m = contrast.shape[0]
            for i, sl in enumerate(_chunks(n, ctx.chunk)):
                g = g_all[sl]
                if not bool((g != 0).any()):
                    continue
                if buf is None:
                    buf = contrast.new_empty((min(ctx.chunk or n, n), m))
                s = buf[: sl.stop - sl.start].addmm_(a[sl], contrast.T, beta=0.0, alpha=ctx.inv_t)
                positions = _positions(index, sl, m) if ctx.positions is None else ctx.positions[i]
                h, sign = ctx.kernel.grad_rows(_make_block(s, index, sl, positions), stats[:, sl], g)
                alpha = sign * out_sign * ctx.inv_t
                if d_anchor is not None:
                    d_anchor[sl].addmm_(h, contrast, alpha=alpha)
                if d_contrast is not None:
                    d_contrast.addmm_(h.T, a[sl], alpha=alpha)
        if anchors is None:
            d_anchor = None
        return (d_anchor, d_contrast) + (None,) * (4 + len(index_tensors))


def evaluate_rows(
    kernel: RowKernel,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    contrast: torch.Tensor,
    c_labels: torch.Tensor,
    rank: int,
    world: int,
    temperature: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """Mean of ``kernel``'s per-anchor loss over the anchors with a positive, in row chunks.

    Args:
        kernel: the loss's :class:`RowKernel`.
        anchors: ``[n, D]`` this rank's (normalised) embeddings.
        labels: ``[n]`` their labels (long).
        contrast: ``[M, D]``: all ranks' anchors (rank ``r``'s at ``r*n:(r+1)*n``), then any reference rows.
        c_labels: ``[M]`` their labels (long).
        rank: this rank; world: the number of ranks that contributed to ``contrast`` (1 without gathering).
        temperature: ``tau``; chunk_size: anchor rows per block, ``None`` = one block.

    Returns:
        Scalar loss: ``world x`` this rank's share of the mean over all ranks' anchors with a positive (0,
        connected to the graph, when no anchor has one).
    """
    n = anchors.shape[0]
    index = LabelIndex(labels, c_labels, torch.arange(n, device=anchors.device) + rank * n)
    n_pos = index.count - 1
    # The normaliser counts valid anchors over all ranks so the per-rank losses sum to W x the full-batch loss;
    # DDP averages gradients over W ranks, which gives exactly the full-batch gradient.
    if world > 1:
        n_valid = int((_runs(torch.sort(c_labels).values, c_labels[: world * n])[1] > 1).sum())
    else:
        n_valid = int((n_pos > 0).sum())
    scale = world / n_valid if n_valid > 0 else 0.0
    weights = (n_pos > 0).to(contrast.dtype) * scale
    separate = anchors if world > 1 else None  # one process: the anchors are contrast[:n]
    return _ContrastFn.apply(
        separate, contrast, weights, 1.0 / temperature, kernel, chunk_size, *index.tensors()
    )
