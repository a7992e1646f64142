"""The base class of the contrastive losses: shared settings, their checks, and the ``forward`` plumbing.

A loss on pairwise similarities ``s_ij = z_i . c_j / tau`` is one :class:`PairwiseContrastiveLoss` subclass that
states only what is its own: its extra hyper-parameters (checked in ``__init__``), :attr:`supervised`, the
fields of its ``repr`` and :meth:`~PairwiseContrastiveLoss.row_kernel`, the per-anchor loss of :mod:`._kernels`.
The base class checks and holds ``temperature``, ``normalize``, ``gather_distributed``, ``chunk_size`` and
``backend``, and its ``forward`` validates the inputs, casts and normalises them, gathers them across ranks,
appends ``ref_embeddings`` to the contrast set and hands everything to the chunked log-space engine
(:func:`._logspace.evaluate_rows`). The plain formulas are in :mod:`schane.losses.reference`.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blockops import BlockOps, get_ops, resolve_backend
from ._gather import gather_labels, gather_rows, world_info
from ._kernels import RowKernel
from ._logspace import evaluate_rows, unit_rows
from ._validation import check_backend, check_chunk_size, check_temperature, validate_inputs


class PairwiseContrastiveLoss(nn.Module):
    """Base of :class:`SCHaNeLoss`, :class:`SupConLoss`, :class:`NTXentLoss` and :class:`HardNegativeNTXentLoss`.

    Args:
        temperature: ``tau`` > 0.
        normalize: L2-normalise ``embeddings`` (and ``ref_embeddings``) first; a row of norm ``<= 1e-12`` is
            used as the zero vector and gets a zero gradient.
        gather_distributed: contrast each rank's anchors with all ranks' embeddings and labels (differentiable
            all-gather). The returned value is ``world_size x`` this rank's share, so its mean over ranks is the
            full-batch loss and DDP's gradient averaging yields the full-batch gradient. No-op (one warning)
            without a process group.
        chunk_size: evaluate this many anchor rows at a time and recompute them in backward, so the
            ``[N, M]`` similarity matrix is never held whole; ``None`` = one block.
        backend: block kernels, ``"eager"`` or ``"compile"`` (``torch.compile``, eager fallback if compilation
            fails); ``None`` = the environment variable ``SCHANE_LOSS_BACKEND``, else ``"eager"``.

    Attributes:
        supervised: whether labels are classes (``True``) or instance ids (``False``); class attribute.
        repr_fields: the attributes :meth:`extra_repr` shows, in order; class attribute.

    Raises:
        ValueError: on ``temperature <= 0`` (or a bool), a bad ``chunk_size`` or ``backend``.
    """

    supervised: bool = True
    repr_fields: tuple[str, ...] = ()

    def __init__(
        self,
        temperature: float,
        normalize: bool = True,
        gather_distributed: bool = False,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.normalize = bool(normalize)
        self.gather_distributed = bool(gather_distributed)
        self.chunk_size = check_chunk_size(chunk_size)
        self.backend = check_backend(backend)

    def row_kernel(self, ops: BlockOps) -> RowKernel:
        """The per-anchor loss of this loss on the block operations ``ops`` (implemented by each subclass)."""
        raise NotImplementedError

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``embeddings[N, D]`` with ``labels[N]``; see the class docstring.

        Args:
            embeddings: ``[N, D]`` floating point, views concatenated along N.
            labels: ``[N]`` integer labels (classes, or instance ids for unsupervised losses).
            ref_embeddings: ``[M, D]`` extra contrast samples (e.g. a memory queue), or ``None``; they are
                contrast samples only, never anchors.
            ref_labels: ``[M]`` their labels, or ``None``.

        Returns:
            Scalar loss, float32 (float64 for float64 ``embeddings``) whatever the input dtype or autocast.

        Raises:
            ValueError: on non-2-D, non-floating or non-finite embeddings, wrong labels, mismatched ref tensors,
                or ``$SCHANE_LOSS_BACKEND`` naming an unknown backend.
        """
        validate_inputs(embeddings, labels, ref_embeddings, ref_labels, check_values=not self.normalize)
        kernel = self.row_kernel(get_ops(resolve_backend(self.backend)))
        device = embeddings.device
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        labels = labels.to(device=device, dtype=torch.long)
        with torch.autocast(device_type=device.type, enabled=False):
            z = self._rows(embeddings, device, dtype, "embeddings")
            rank, world = world_info() if self.gather_distributed else (0, 1)
            contrast, c_labels = (gather_rows(z), gather_labels(labels)) if world > 1 else (z, labels)
            if ref_embeddings is not None and ref_labels is not None:
                contrast = torch.cat([contrast, self._rows(ref_embeddings, device, dtype, "ref_embeddings")])
                c_labels = torch.cat([c_labels, ref_labels.to(device=device, dtype=torch.long)])
            return evaluate_rows(
                kernel, z, labels, contrast, c_labels, rank, world, self.temperature, self.chunk_size
            )

    def _rows(self, x: torch.Tensor, device: torch.device, dtype: torch.dtype, name: str) -> torch.Tensor:
        """``x`` on ``device`` in ``dtype``, L2-normalised when ``normalize`` (``name`` names it in errors)."""
        x = x.to(device=device, dtype=dtype)
        return unit_rows(x, name) if self.normalize else x

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.repr_fields)
