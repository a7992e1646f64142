"""Argument and input checks shared by the losses (raise ``ValueError`` with a fix-it message)."""

from __future__ import annotations

import math

import torch

from ._blockops import BACKENDS

POSITIVE_MODES = ("mean", "each")


def is_number(x: object) -> bool:
    """True for an ``int`` or ``float`` that is not a ``bool`` (``True`` is not a temperature)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as float if it is finite and > 0, else raise ``ValueError``."""
    if not is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (e.g. 0.5), got {temperature!r}")
    return float(temperature)


def check_beta(beta: float) -> float:
    """Return ``beta`` as float if it is finite and >= 0, else raise ``ValueError``."""
    if not is_number(beta) or not math.isfinite(beta) or beta < 0:
        raise ValueError(
            f"beta must be a finite number >= 0 (0 disables hard-negative weighting), got {beta!r}"
        )
    return float(beta)


def check_tau_plus(tau_plus: float) -> float:
    """Return ``tau_plus`` as float if it lies in [0, 1), else raise ``ValueError``."""
    if not is_number(tau_plus) or not (0.0 <= tau_plus < 1.0):
        raise ValueError(f"tau_plus (class prior of false negatives) must be in [0, 1), got {tau_plus!r}")
    return float(tau_plus)


def check_lam(lam: float) -> float:
    """Return the joint-loss weight ``lam`` as float if it lies in [0, 1], else raise ``ValueError``."""
    if not is_number(lam) or not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam (weight of the contrastive term) must be a number in [0, 1], got {lam!r}")
    return float(lam)


def check_label_smoothing(label_smoothing: float) -> float:
    """Return ``label_smoothing`` as float if it lies in [0, 1), else raise ``ValueError``."""
    if not is_number(label_smoothing) or not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    return float(label_smoothing)


def check_backend(backend: str | None) -> str | None:
    """Return ``backend`` if it is ``None``, ``"eager"`` or ``"compile"``, else raise ``ValueError``."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (environment default), got {backend!r}")
    return backend


def check_positive_mode(mode: str) -> str:
    """Return ``mode`` if it is ``"mean"`` or ``"each"``, else raise ``ValueError``."""
    if mode not in POSITIVE_MODES:
        raise ValueError(f"positive_mode must be one of {POSITIVE_MODES}, got {mode!r}")
    return mode


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Return ``chunk_size`` if it is ``None`` or a positive int, else raise ``ValueError``."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    return chunk_size


def _check_embeddings(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D] (concatenate views along N), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature column, got shape {tuple(x.shape)}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if the tensor ``x`` contains NaN or inf."""
    if x.numel() and not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} contains NaN or inf; check the model output (e.g. lower the learning rate)")


def _check_labels(y: torch.Tensor, n: int, name: str, emb_name: str) -> None:
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D integer torch.Tensor of length {n}, got {type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (e.g. torch.long), got {y.dtype}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has length {y.shape[0]} but {emb_name} has {n} rows; they must match")


def validate_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    check_values: bool = True,
) -> None:
    """Check loss inputs.

    Args:
        embeddings: ``[N, D]`` floating point, finite.
        labels: ``[N]`` integer.
        ref_embeddings: ``[M, D]`` or ``None``.
        ref_labels: ``[M]`` or ``None`` (given together with ``ref_embeddings``).
        check_values: also check that the embeddings are finite (callers that normalise check the row norms
            instead, which costs no extra pass).

    Raises:
        ValueError: if any check fails; the message says what was expected.
    """
    _check_embeddings(embeddings, "embeddings")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings must have at least one row, got shape (0, D)")
    if check_values:
        check_finite(embeddings, "embeddings")
    _check_labels(labels, embeddings.shape[0], "labels", "embeddings")
    if ref_embeddings is None or ref_labels is None:
        if ref_embeddings is not None or ref_labels is not None:
            raise ValueError("ref_embeddings and ref_labels must be given together (or both None)")
        return
    _check_embeddings(ref_embeddings, "ref_embeddings")
    if ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_embeddings has D={ref_embeddings.shape[1]} but embeddings has D={embeddings.shape[1]}; "
            "they must have the same dimension"
        )
    if check_values:
        check_finite(ref_embeddings, "ref_embeddings")
    _check_labels(ref_labels, ref_embeddings.shape[0], "ref_labels", "ref_embeddings")
