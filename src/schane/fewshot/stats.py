"""Confidence intervals for few-shot accuracies.

Three kinds of interval, all two-sided 95%:

* **Over episodes** (:func:`mean_ci`): ``1.96 * s / sqrt(n)`` where ``s`` is the *sample*
  standard deviation (``ddof=1``) of the ``n`` per-episode accuracies. It measures only the
  randomness of episode sampling for one trained model.
* **Paired over episodes** (:func:`paired_difference`): the same interval applied to the
  per-episode differences ``a_i - b_i`` of two methods evaluated on identical episodes.
  Pairing removes the episode-difficulty variance both methods share, so it is much
  narrower than the two separate intervals suggest.
* **Across training seeds** (:func:`seed_summary`): ``t_{0.975, k-1} * s / sqrt(k)`` over
  the ``k`` per-seed mean accuracies (or per-seed mean differences), with Student's t
  because ``k`` is small. With 3 seeds ``t = 4.30``: the interval is wide, and honestly so;
  training randomness is often larger than episode sampling.

With fewer than two values a standard deviation is undefined; the functions then report
``nan`` for it and for the half-width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.96


def _values(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains nan or inf")
    return arr


@dataclass(frozen=True)
class Interval:
    """A mean with a symmetric confidence interval ``mean ± half_width``.

    Attributes:
        mean: the mean of the values.
        half_width: half the interval's width (``nan`` when ``n < 2``).
        std: the sample standard deviation (``ddof=1``; ``nan`` when ``n < 2``).
        n: the number of values.
    """

    mean: float
    half_width: float
    std: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (``False`` when undefined)."""
        if math.isnan(self.half_width):
            return False
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int | bool | None]:
        """JSON-safe dictionary (``nan`` becomes ``None``)."""
        d = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}
        d["excludes_zero"] = self.excludes_zero
        return d


def mean_ci(values: Sequence[float] | np.ndarray, z: float = Z95) -> Interval:
    """Mean ± ``z * s / sqrt(n)`` with ``s`` the sample std (``ddof=1``).

    Args:
        values: ``[n]`` per-episode accuracies (any unit; the interval has the same unit).
        z: the normal quantile (1.96 for 95%).

    Returns:
        The :class:`Interval`.

    Raises:
        ValueError: on an empty, multi-dimensional or non-finite input.
    """
    arr = _values(values, "values")
    n = arr.size
    if n < 2:
        return Interval(float(arr.mean()), math.nan, math.nan, n)
    s = float(arr.std(ddof=1))
    return Interval(float(arr.mean()), z * s / math.sqrt(n), s, n)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, z: float = Z95) -> Interval:
    """Interval of the mean paired difference ``a - b`` over identical episodes.

    Args:
        a: ``[n]`` per-episode accuracies of method A.
        b: ``[n]`` per-episode accuracies of method B on the same episodes, in the same order.
        z: the normal quantile.

    Returns:
        :func:`mean_ci` of ``a - b``; ``.excludes_zero`` says whether the difference is
        distinguishable from 0 at this level.

    Raises:
        ValueError: when the inputs differ in length or are invalid.
    """
    xa, xb = _values(a, "a"), _values(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"paired values need equal lengths (same episodes), got {xa.size} and {xb.size}")
    return mean_ci(xa - xb, z)


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t quantile ``t_{(1+confidence)/2, df}``."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2.0, df))


def seed_summary(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean and spread across training seeds with a Student-t interval.

    ``half_width = t_{(1+confidence)/2, k-1} * s / sqrt(k)``, ``s`` the sample std (``ddof=1``)
    of the ``k`` per-seed values. For a difference between methods, pass the per-seed mean
    differences; the interval then covers training randomness as well as episode sampling.

    Args:
        values: ``[k]`` one value per training seed (e.g. mean accuracy, or mean difference).
        confidence: the coverage, 0.95 by default.

    Returns:
        The :class:`Interval` (``std`` is the spread across seeds).

    Raises:
        ValueError: on invalid input or a confidence outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arr = _values(values, "values")
    k = arr.size
    if k < 2:
        return Interval(float(arr.mean()), math.nan, math.nan, k)
    s = float(arr.std(ddof=1))
    return Interval(float(arr.mean()), t_quantile(k - 1, confidence) * s / math.sqrt(k), s, k)
