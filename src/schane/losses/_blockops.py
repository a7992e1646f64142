"""Dense per-block operations of the log-space engine, eager or compiled with ``torch.compile``.

Each operation reads one ``[n, M]`` similarity block and either reduces it to per-row statistics over a subset
of its columns (forward) or overwrites it with a gradient block (backward).
The sums they compute are those of :mod:`schane.losses.reference` (over ``N(i)`` or over ``a != i``), in log
space; the row kernels of :mod:`._kernels` combine them into each loss.

* Eager forms exclude columns by writing a large finite negative *sentinel* into them with one sparse scatter
  (``exp`` maps it to 0, and a row without any included column never gives ``inf - inf``), then work in place:
  no boolean ``[n, M]`` mask and no other ``[n, M]`` tensor (except in :func:`grad_general_`).
* Compiled forms compare labels inside the fused loop instead, so that ``torch.compile`` reads the block
  twice for a forward reduction (max, then the sums) and once, writing in place, for a backward block (C++
  with OpenMP on CPU, Triton on CUDA).

Backend choice: the ``backend`` argument of every loss, or the environment variable
``SCHANE_LOSS_BACKEND`` when the argument is ``None``:

* ``"eager"`` (default): plain PyTorch operations, no compilation;
* ``"compile"``: ``torch.compile`` each operation (``dynamic=True``). The first use per device type and dtype
  compiles it on a tiny probe block (seconds to a minute); if compilation fails (no C++ compiler, no Triton,
  an unsupported platform) a warning is logged and the eager forms are used for the rest of the process.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "compile")
ENV_VAR = "SCHANE_LOSS_BACKEND"
_LOG2 = math.log(2.0)


def sentinel(dtype: torch.dtype) -> float:
    """The value that marks excluded entries of a block: finite, and ``exp`` of it (shifted) is 0."""
    return torch.finfo(dtype).min


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.clamp(x, min=torch.finfo(x.dtype).tiny))


# ---- forward statistics over a masked block (eager forms destroy ``s``) ----------------------------------
# Statistics are kept as the row max ``m`` and log-sums of ``e^t``, ``t = s - m``: every shift applied to a
# block later is ``m`` itself (exact subtraction near the maximum) followed by a small correction, never one
# rounded sum of both (which would cost up to half an ulp of ``m`` in every exponent when ``|s|`` is large).


def lse_(s: torch.Tensor, has: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, log sum e^{s - m})`` per row over the non-sentinel entries of ``s[n, M]`` (``m = 0`` without any)."""
    m = torch.where(has, s.amax(dim=1), 0.0)
    return m, _safe_log(s.sub_(m[:, None]).exp_().sum(dim=1))


def lse_pair_(
    s: torch.Tensor, has: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, log sum e^{beta t}, log sum e^{(1+beta) t})`` per row over the non-sentinel entries (``beta > 0``).

    ``t = s - m <= 0`` and its largest entry is 0, so neither sum can underflow.
    """
    m = torch.where(has, s.amax(dim=1), 0.0)
    t = s.sub_(m[:, None])
    if beta == 1.0:
        e = t.exp_()
        log_sb = _safe_log(e.sum(dim=1))
        log_s1 = 2.0 * _safe_log(torch.linalg.vector_norm(e, 2, dim=1))
    else:
        eb = torch.mul(t, beta).exp_()
        log_sb = _safe_log(eb.sum(dim=1))
        log_s1 = _safe_log(eb.mul_(t.exp_()).sum(dim=1))
        del eb
    return m, log_sb, log_s1


# ---- backward blocks (eager forms overwrite ``s`` and return it) ------------------------------------------


def _col(v: torch.Tensor) -> torch.Tensor:
    return v[:, None]


def exp_shift_(s: torch.Tensor, m: torch.Tensor, scale: float, delta: torch.Tensor) -> torch.Tensor:
    """``s <- exp(scale (s - m) - delta)`` (row vectors ``m``, ``delta``)."""
    t = s.sub_(_col(m))
    if scale != 1.0:
        t.mul_(scale)
    return t.sub_(_col(delta)).exp_()


def quadratic_(s: torch.Tensor, m: torch.Tensor, delta: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``s <- X (1 + E - X)`` with ``X = exp(s - m - delta)``, ``E = e[:, None]`` (the last step one lerp)."""
    x = s.sub_(_col(m)).sub_(_col(delta)).exp_()
    return x.lerp_(_col(e).expand_as(x), x)


def grad_general_(
    s: torch.Tensor, m: torch.Tensor, beta: float, delta1: torch.Tensor, delta_b: torch.Tensor
) -> torch.Tensor:
    """``s <- exp((1+beta) t - delta1) - exp(beta t - delta_b)``, ``t = s - m`` (one ``[n, M]`` temporary)."""
    t = s.sub_(_col(m))
    r = torch.mul(t, beta).sub_(_col(delta_b)).exp_()
    t.mul_(1.0 + beta).sub_(_col(delta1)).exp_()
    return t.sub_(r)


# ---- compiled forms: the same formulas as pure functions, with the masks as label comparisons -------------


def _c_max(s: torch.Tensor, keep: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    return torch.where(has, torch.where(keep, s, float("-inf")).amax(dim=1), 0.0)


def _c_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.clamp(x, min=torch.finfo(x.dtype).tiny))


def _c_lse(s: torch.Tensor, keep: torch.Tensor, has: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = _c_max(s, keep, has)
    return m, _c_log(torch.where(keep, torch.exp(s - m[:, None]), 0.0).sum(dim=1))


def _c_lse_pair(
    s: torch.Tensor, keep: torch.Tensor, has: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = _c_max(s, keep, has)
    t = s - m[:, None]
    sum_b = torch.where(keep, torch.exp(beta * t), 0.0).sum(dim=1)
    sum_1 = torch.where(keep, torch.exp((1.0 + beta) * t), 0.0).sum(dim=1)
    return m, _c_log(sum_b), _c_log(sum_1)


def _c_neg_lse(
    s: torch.Tensor, a_lab: torch.Tensor, c_lab: torch.Tensor, has: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _c_lse(s, a_lab[:, None] != c_lab[None, :], has)


def _c_neg_lse_pair(
    s: torch.Tensor, a_lab: torch.Tensor, c_lab: torch.Tensor, has: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _c_lse_pair(s, a_lab[:, None] != c_lab[None, :], has, beta)


def _c_others_lse(
    s: torch.Tensor, self_col: torch.Tensor, has: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cols = torch.arange(s.shape[1], device=s.device)
    return _c_lse(s, cols[None, :] != self_col, has)


def _c_exp_shift(s: torch.Tensor, m: torch.Tensor, scale: float, delta: torch.Tensor) -> torch.Tensor:
    return s.copy_(torch.exp(scale * (s - m[:, None]) - delta[:, None]))


def _c_quadratic(s: torch.Tensor, m: torch.Tensor, delta: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    x = torch.exp((s - m[:, None]) - delta[:, None])
    return s.copy_(x * (1.0 + e[:, None] - x))


def _c_grad_general(
    s: torch.Tensor, m: torch.Tensor, beta: float, delta1: torch.Tensor, delta_b: torch.Tensor
) -> torch.Tensor:
    t = s - m[:, None]
    return s.copy_(torch.exp((1.0 + beta) * t - delta1[:, None]) - torch.exp(beta * t - delta_b[:, None]))


class BlockOps:
    """The block operations of one backend (``name`` is ``"eager"`` or ``"compile"``).

    Forward reductions take the block ``s[n, M]``, a description of the excluded columns and ``has[n]`` (rows
    with at least one included column): ``neg_lse``/``neg_lse_pair`` include the columns whose label differs
    from the anchor's (``a_lab[n]``, ``c_lab[M]``), ``others_lse`` every column but the anchor's own
    (``self_col[n, 1]``). Backward operations overwrite ``s`` and return it.
    """

    name = "eager"

    def compiled_for(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether blocks on ``device`` in ``dtype`` run compiled kernels (compiles them on first call)."""
        return False

    def neg_lse(
        self,
        s: torch.Tensor,
        a_lab: torch.Tensor,
        c_lab: torch.Tensor,
        has: torch.Tensor,
        same_idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`lse_` over negatives; the eager form writes sentinels at ``same_idx[n, P]`` (destroys ``s``)."""
        return lse_(s.scatter_(1, same_idx, sentinel(s.dtype)), has)

    def neg_lse_pair(
        self,
        s: torch.Tensor,
        a_lab: torch.Tensor,
        c_lab: torch.Tensor,
        has: torch.Tensor,
        same_idx: torch.Tensor,
        beta: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`lse_pair_` over negatives."""
        return lse_pair_(s.scatter_(1, same_idx, sentinel(s.dtype)), has, beta)

    def others_lse(
        self, s: torch.Tensor, self_col: torch.Tensor, has: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`lse_` over every column but the anchor's own."""
        return lse_(s.scatter_(1, self_col, sentinel(s.dtype)), has)

    def exp_shift_(self, s: torch.Tensor, m: torch.Tensor, scale: float, delta: torch.Tensor) -> torch.Tensor:
        return exp_shift_(s, m, scale, delta)

    def quadratic_(
        self, s: torch.Tensor, m: torch.Tensor, delta: torch.Tensor, e: torch.Tensor
    ) -> torch.Tensor:
        return quadratic_(s, m, delta, e)

    def grad_general_(
        self, s: torch.Tensor, m: torch.Tensor, beta: float, delta1: torch.Tensor, delta_b: torch.Tensor
    ) -> torch.Tensor:
        return grad_general_(s, m, beta, delta1, delta_b)


class _CompiledOps(BlockOps):
    """Compiled block operations; each device type and dtype is probed once and falls back to eager on failure."""

    name = "compile"
    _FNS: dict[str, Callable[..., Any]] = {
        "neg_lse": _c_neg_lse,
        "neg_lse_pair": _c_neg_lse_pair,
        "others_lse": _c_others_lse,
        "exp_shift_": _c_exp_shift,
        "quadratic_": _c_quadratic,
        "grad_general_": _c_grad_general,
    }

    def __init__(self) -> None:
        self._compiled: dict[str, Callable[..., Any]] = {}
        self._ok: dict[tuple[str, torch.dtype], bool] = {}

    def _run(self, name: str, s: torch.Tensor, *args: Any) -> Any:
        if name not in self._compiled:
            self._compiled[name] = torch.compile(self._FNS[name], dynamic=True)
        return self._compiled[name](s, *args)

    def neg_lse(
        self,
        s: torch.Tensor,
        a_lab: torch.Tensor,
        c_lab: torch.Tensor,
        has: torch.Tensor,
        same_idx: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._usable(s):
            return super().neg_lse(s, a_lab, c_lab, has, same_idx)
        return self._run("neg_lse", s, a_lab, c_lab, has)

    def neg_lse_pair(
        self,
        s: torch.Tensor,
        a_lab: torch.Tensor,
        c_lab: torch.Tensor,
        has: torch.Tensor,
        same_idx: torch.Tensor,
        beta: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._usable(s):
            return super().neg_lse_pair(s, a_lab, c_lab, has, same_idx, beta)
        return self._run("neg_lse_pair", s, a_lab, c_lab, has, beta)

    def others_lse(
        self, s: torch.Tensor, self_col: torch.Tensor, has: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._usable(s):
            return super().others_lse(s, self_col, has)
        return self._run("others_lse", s, self_col, has)

    def exp_shift_(self, s: torch.Tensor, m: torch.Tensor, scale: float, delta: torch.Tensor) -> torch.Tensor:
        return (
            self._run("exp_shift_", s, m, scale, delta) if self._usable(s) else exp_shift_(s, m, scale, delta)
        )

    def quadratic_(
        self, s: torch.Tensor, m: torch.Tensor, delta: torch.Tensor, e: torch.Tensor
    ) -> torch.Tensor:
        return self._run("quadratic_", s, m, delta, e) if self._usable(s) else quadratic_(s, m, delta, e)

    def grad_general_(
        self, s: torch.Tensor, m: torch.Tensor, beta: float, delta1: torch.Tensor, delta_b: torch.Tensor
    ) -> torch.Tensor:
        if not self._usable(s):
            return grad_general_(s, m, beta, delta1, delta_b)
        return self._run("grad_general_", s, m, beta, delta1, delta_b)

    def compiled_for(self, device: torch.device, dtype: torch.dtype) -> bool:
        key = (device.type, dtype)
        if key not in self._ok:
            self._ok[key] = True  # the probe below runs the compiled forms
            self._ok[key] = self._probe(device, dtype)
        return self._ok[key]

    def _usable(self, s: torch.Tensor) -> bool:
        return self.compiled_for(s.device, s.dtype)

    def _probe(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Compile every operation on a 3 x 5 block; any failure selects the eager forms for this key."""
        try:
            s = torch.randn(3, 5, device=device, dtype=dtype)
            v = torch.randn(3, device=device, dtype=dtype)
            lab = torch.arange(5, device=device)
            has = torch.ones(3, dtype=torch.bool, device=device)
            same_idx = lab[:3, None]  # each probe row's own column (what the eager fallback would read)
            self.neg_lse(s, lab[:3], lab, has, same_idx)
            self.neg_lse_pair(s, lab[:3], lab, has, same_idx, 1.0)
            self.others_lse(s, lab[:3, None], has)
            self.exp_shift_(s.clone(), v, 2.0, v)
            self.quadratic_(s.clone(), v, v, v)
            self.grad_general_(s.clone(), v, 2.0, v, v)
        except Exception as err:  # noqa: BLE001 - any compiler failure means "use eager"
            logger.warning(
                "torch.compile of the contrastive-loss block kernels failed on %s/%s (%s: %s); "
                "using the eager kernels instead",
                device.type,
                dtype,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            return False
        return True


_OPS: dict[str, BlockOps] = {}


def resolve_backend(backend: str | None) -> str:
    """Return the backend name: ``backend``, else ``$SCHANE_LOSS_BACKEND``, else ``"eager"``.

    Raises:
        ValueError: if the name is not ``"eager"`` or ``"compile"``.
    """
    name = backend if backend is not None else os.environ.get(ENV_VAR, "") or "eager"
    if name not in BACKENDS:
        where = "backend" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


def get_ops(backend: str) -> BlockOps:
    """The (shared) :class:`BlockOps` of a resolved backend name."""
    if backend not in _OPS:
        _OPS[backend] = _CompiledOps() if backend == "compile" else BlockOps()
    return _OPS[backend]


__all__ = ["BACKENDS", "ENV_VAR", "BlockOps", "get_ops", "resolve_backend", "sentinel"]
