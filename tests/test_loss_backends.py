"""Block-kernel backends: eager and ``torch.compile`` against the float64 formulas of schane.losses.reference."""

from __future__ import annotations

import logging

import pytest
import torch

import schane.losses._blockops as blockops
from schane.losses import (
    HardNegativeNTXentLoss,
    NTXentLoss,
    SCHaNeLoss,
    SupConLoss,
    build_contrastive_loss,
    hard_negative_ntxent_loss,
    schane_loss,
)
from schane.losses._logspace import LabelIndex, _make_block, _positions
from schane.losses.reference import (
    hard_negative_ntxent_reference,
    ntxent_reference,
    schane_reference,
    supcon_reference,
)
from test_losses import PATTERNS, _check, _emb

BACKENDS = ["eager", "compile"]

# (name, loss factory given backend and chunk, reference given (x, y, rx, ry)); together they use every block
# operation: lse_ (beta = 0, SupCon), lse_pair_ (beta = 1 and general), exp_shift_ (beta = 0, detached
# weights, SupCon), quadratic_ (beta = 1), grad_general_ (beta = 2.5)
CASES = {
    "schane_mean_b1": (
        lambda b, c: SCHaNeLoss(temperature=0.5, beta=1.0, backend=b, chunk_size=c),
        lambda x, y, rx, ry: schane_reference(x, y, rx, ry, beta=1.0),
    ),
    "schane_each_b2.5": (
        lambda b, c: SCHaNeLoss(temperature=0.4, beta=2.5, positive_mode="each", backend=b, chunk_size=c),
        lambda x, y, rx, ry: schane_reference(x, y, rx, ry, temperature=0.4, beta=2.5, positive_mode="each"),
    ),
    "schane_b0": (
        lambda b, c: SCHaNeLoss(temperature=0.5, beta=0.0, backend=b, chunk_size=c),
        lambda x, y, rx, ry: schane_reference(x, y, rx, ry, beta=0.0),
    ),
    "schane_detach_b1.5": (
        lambda b, c: SCHaNeLoss(temperature=0.3, beta=1.5, detach_weights=True, backend=b, chunk_size=c),
        lambda x, y, rx, ry: schane_reference(x, y, rx, ry, temperature=0.3, beta=1.5, detach_weights=True),
    ),
    "supcon": (
        lambda b, c: SupConLoss(temperature=0.2, backend=b, chunk_size=c),
        lambda x, y, rx, ry: supcon_reference(x, y, rx, ry, temperature=0.2),
    ),
    "ntxent": (
        lambda b, c: NTXentLoss(temperature=0.5, backend=b, chunk_size=c),
        lambda x, y, rx, ry: ntxent_reference(x, y, rx, ry),
    ),
    "hcl_b1": (
        lambda b, c: HardNegativeNTXentLoss(temperature=0.5, beta=1.0, tau_plus=0.1, backend=b, chunk_size=c),
        lambda x, y, rx, ry: hard_negative_ntxent_reference(x, y, rx, ry, beta=1.0, tau_plus=0.1),
    ),
    "hcl_b2": (
        lambda b, c: HardNegativeNTXentLoss(temperature=0.5, beta=2.0, tau_plus=0.3, backend=b, chunk_size=c),
        lambda x, y, rx, ry: hard_negative_ntxent_reference(x, y, rx, ry, beta=2.0, tau_plus=0.3),
    ),
}


def _require_compiled(dtype: torch.dtype) -> None:
    """Skip (saying why) when torch.compile cannot build the kernels here; the fallback has its own test."""
    ops = blockops.get_ops("compile")
    if not ops.compiled_for(torch.device("cpu"), dtype):
        pytest.skip("torch.compile could not build the block kernels on this machine (eager fallback in use)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_loop_reference(backend, case):
    if backend == "compile":
        _require_compiled(torch.float64)
    make, ref = CASES[case]
    y = PATTERNS["random"]
    x = _emb(len(y), seed=31)
    ry = torch.tensor([3, 0, 9, 1])
    r = _emb(4, seed=32)
    for chunk in (None, 4):
        loss = make(backend, chunk)
        _check(lambda a, loss=loss: loss(a, y), lambda a: ref(a, y, None, None), x)
        _check(lambda a, b, loss=loss: loss(a, y, b, ry), lambda a, b: ref(a, y, b, ry), x, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["all_same", "all_distinct", "unbalanced", "two_views"])
def test_backend_label_patterns(backend, pattern):
    """Rows without negatives, without positives, and one dominant class, in both backends."""
    if backend == "compile":
        _require_compiled(torch.float64)
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=33)
    for mode in ("mean", "each"):
        _check(
            lambda a, m=mode: schane_loss(a, y, positive_mode=m, backend=backend),
            lambda a, m=mode: schane_reference(a, y, positive_mode=m),
            x,
        )
    _check(
        lambda a: SupConLoss(temperature=0.2, backend=backend)(a, y), lambda a: supcon_reference(a, y, temperature=0.2), x
    )
    _check(lambda a: hard_negative_ntxent_loss(a, y, backend=backend), lambda a: hard_negative_ntxent_reference(a, y), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["schane", "supcon", "hcl"])
def test_float32_close_to_float64_at_low_temperature(backend, name):
    """Sharp similarities (tau = 0.05) in float32: the in-place log-space forms keep the float64 result."""
    if backend == "compile":
        _require_compiled(torch.float32)
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 7, (96,), generator=g)
    x = torch.randn(96, 16, dtype=torch.float64, generator=g)
    loss = build_contrastive_loss(name, temperature=0.05, beta=1.0, backend=backend)
    grads = []
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype).requires_grad_()
        v = loss(xd, y)
        v.backward()
        grads.append((v.double(), xd.grad.double()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    scale = grads[1][1].abs().max()
    assert (grads[0][1] - grads[1][1]).abs().max() <= 1e-4 * scale


def test_negative_upstream_gradient_flips_every_backend_sign():
    """The kernels return ``(H, sign)``; a negative upstream gradient must flip the whole gradient."""
    y = PATTERNS["multi_view"]
    x = _emb(len(y), seed=35).requires_grad_()
    for loss in (SCHaNeLoss(), SCHaNeLoss(beta=2.0), SupConLoss(), HardNegativeNTXentLoss(tau_plus=0.1)):
        (g_pos,) = torch.autograd.grad(loss(x, y), x)
        (g_neg,) = torch.autograd.grad(-2.0 * loss(x, y), x)
        torch.testing.assert_close(g_neg, -2.0 * g_pos, atol=1e-12, rtol=1e-12)


def test_block_positive_structure_matches_label_comparison():
    """The sorted-label runs give exactly the positives (same label, not self) of a brute-force comparison."""
    g = torch.Generator().manual_seed(6)
    a_labels = torch.randint(0, 5, (9,), generator=g)
    ref_labels = torch.randint(0, 7, (6,), generator=g)
    c_labels = torch.cat([a_labels, ref_labels])
    index = LabelIndex(a_labels, c_labels, torch.arange(9))
    s = torch.randn(9, 15, dtype=torch.float64, generator=g)
    for sl in (slice(0, 9), slice(2, 5)):
        blk = _make_block(s[sl].clone(), index, sl, _positions(index, sl, 15))
        pos = torch.zeros(sl.stop - sl.start, 15, dtype=torch.bool)
        for r in range(pos.shape[0]):
            pos[r, blk.idx[r][blk.valid[r]]] = True
        same = a_labels[sl, None] == c_labels[None, :]
        expected = same.clone()
        expected[torch.arange(pos.shape[0]), torch.arange(sl.start, sl.stop)] = False
        assert torch.equal(pos, expected)
        assert torch.equal(blk.n_pos, expected.sum(1)) and torch.equal(blk.n_neg, (~same).sum(1))
        torch.testing.assert_close(blk.sp, torch.gather(s[sl], 1, blk.idx))
        h = blk.put_same_label_(torch.full_like(blk.s, 7.0), torch.ones_like(blk.sp))
        assert torch.equal(h, torch.where(same, expected.double(), 7.0))
        # the negatives-only reductions see exactly the columns with another label
        lse = torch.logsumexp(torch.where(same, float("-inf"), s[sl]), dim=1)
        has = blk.n_neg > 0
        for backend in BACKENDS:
            ops = blockops.get_ops(backend)
            if backend == "compile" and not ops.compiled_for(torch.device("cpu"), torch.float64):
                continue
            m, log_s = ops.neg_lse(s[sl].clone(), blk.a_lab, blk.c_lab, has, blk.idx)
            got = m + log_s
            torch.testing.assert_close(got[has], lse[has], atol=1e-12, rtol=1e-12)
            assert torch.isfinite(got).all()


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(blockops.torch, "compile", broken_compile)
    monkeypatch.setattr(blockops, "_OPS", {})
    y = PATTERNS["random"]
    x = _emb(len(y), seed=37)
    with caplog.at_level(logging.WARNING, logger="schane.losses._blockops"):
        _check(lambda a: schane_loss(a, y, backend="compile"), lambda a: schane_reference(a, y), x)
    assert "torch.compile of the contrastive-loss block kernels failed" in caplog.text
    assert "no C++ compiler found" in caplog.text
    assert blockops.get_ops("compile")._ok[("cpu", torch.float64)] is False


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv(blockops.ENV_VAR, "compile")
    assert blockops.resolve_backend(None) == "compile"
    assert blockops.resolve_backend("eager") == "eager"  # the argument wins over the environment
    monkeypatch.setenv(blockops.ENV_VAR, "")
    assert blockops.resolve_backend(None) == "eager"
    monkeypatch.setenv(blockops.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="SCHANE_LOSS_BACKEND"):
        schane_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="backend"):
        SCHaNeLoss(backend="jit")
    with pytest.raises(ValueError, match="backend"):
        build_contrastive_loss("supcon", backend="fast")


@pytest.mark.parametrize("ratio", [1, 10**9])
def test_positions_kept_or_recomputed_for_backward(monkeypatch, ratio):
    """Backward either reuses forward's positive positions (few positives per row) or recomputes them."""
    import schane.losses._logspace as logspace

    monkeypatch.setattr(logspace, "_KEEP_POSITIONS_RATIO", ratio)
    seen = []
    original = logspace._positions
    monkeypatch.setattr(logspace, "_positions", lambda *a: seen.append(1) or original(*a))
    y = PATTERNS["unbalanced"]
    x, r, ry = _emb(len(y), seed=41), _emb(3, seed=42), torch.tensor([2, 3, 7])
    for chunk in (None, 4):
        seen.clear()
        _check(
            lambda a, b, c=chunk: schane_loss(a, y, b, ry, chunk_size=c),
            lambda a, b: schane_reference(a, y, b, ry),
            x,
            r,
        )
        chunks = 1 if chunk is None else 3
        assert len(seen) == (chunks if ratio == 1 else 2 * chunks)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, kw",
    [
        ("schane", {"beta": 1.0}),
        ("schane", {"beta": 4.5}),
        ("schane", {"beta": 0.0, "positive_mode": "each"}),
        ("schane", {"beta": 2.0, "detach_weights": True}),
        ("supcon", {}),
        ("hcl", {"beta": 3.0, "tau_plus": 0.1}),
    ],
)
def test_float32_gradient_with_huge_logits(backend, name, kw):
    """|s| ~ 2e4 (unnormalised embeddings): every exponent is shifted by the row max first, then by the small
    per-row terms, so the dominant entries keep float32 precision (one combined shift would lose ~1e-3 there)."""
    if backend == "compile":
        _require_compiled(torch.float32)
    g = torch.Generator().manual_seed(11)
    n = 32
    y = torch.randint(0, 6, (n,), generator=g) if name != "hcl" else torch.arange(n // 2).repeat(2)
    x = torch.randn(n, 24, dtype=torch.float64, generator=g) * 3.9
    loss = build_contrastive_loss(name, temperature=0.0415, normalize=False, backend=backend, **kw)
    grads = []
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype).requires_grad_()
        loss(xd, y).backward()
        grads.append(xd.grad.double())
    assert (x @ x.T / 0.0415).abs().max() > 1e4
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()
