"""Contrastive losses against the float64 formulas of :mod:`schane.losses.reference`, whose own values are
checked by hand on tiny cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from schane.losses import (
    HardNegativeNTXentLoss,
    JointLoss,
    JointLossOutput,
    NTXentLoss,
    SCHaNeLoss,
    SupConLoss,
    build_contrastive_loss,
    hard_negative_ntxent_loss,
    ntxent_loss,
    schane_loss,
    supcon_loss,
)
from schane.losses.reference import (
    hard_negative_ntxent_reference,
    joint_reference,
    ntxent_reference,
    schane_reference,
    supcon_reference,
)

D = 6


def _patterns() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "all_same": torch.zeros(8, dtype=torch.long),
        "all_distinct": torch.arange(8),
        "unbalanced": torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 3]),
        "multi_view": torch.tensor([0, 1, 2, 3]).repeat(3),
        "random": torch.randint(0, 4, (13,), generator=g),
        "two_views": torch.tensor([5, 7, 5, 9, 5, 7, 5, 9]),
    }


PATTERNS = _patterns()


def _emb(n: int, seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check(fast, ref, x, *extra, atol=1e-10):
    xs = [x.clone().requires_grad_(), *[e.clone().requires_grad_() for e in extra]]
    vf = fast(*xs)
    gf = torch.autograd.grad(vf, xs, allow_unused=True)
    xr = [x.clone().requires_grad_(), *[e.clone().requires_grad_() for e in extra]]
    vr = ref(*xr)
    gr = torch.autograd.grad(vr, xr, allow_unused=True)
    assert vf.dtype == torch.float64
    torch.testing.assert_close(vf, vr, atol=atol, rtol=1e-9)
    for a, b in zip(gf, gr, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-8)


# ---------------------------------------------------------------- the oracle itself, on cases worked by hand
E = math.e


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_reference_by_hand_three_positives_one_negative():
    # normalised: z = (1,0), (1,0), (0,1), (-1,0); tau = 1. Anchor 0 (and 1): positives s = 1, 0, negative s = -1;
    # anchor 2: positives s = 0, 0, negative s = 0; anchor 3 has no positive. One negative: its weight is 1.
    x, y = _t([[2, 0], [3, 0], [0, 0.5], [-1, 0]]), torch.tensor([0, 0, 0, 1])
    mean_01 = math.log(1 + (1 / E) / ((E + 1) / 2))
    each_01 = (math.log(1 + 1 / E**2) + math.log(1 + 1 / E)) / 2
    for beta in (0.0, 2.0):
        got = schane_reference(x, y, temperature=1.0, beta=beta)
        assert got.item() == pytest.approx((2 * mean_01 + math.log(2)) / 3, rel=1e-12)
        got = schane_reference(x, y, temperature=1.0, beta=beta, positive_mode="each")
        assert got.item() == pytest.approx((2 * each_01 + math.log(2)) / 3, rel=1e-12)
    supcon_01 = -(math.log(E / (E + 1 + 1 / E)) + math.log(1 / (E + 1 + 1 / E))) / 2
    supcon_2 = -math.log(1 / 3)
    got = supcon_reference(x, y, temperature=1.0)
    assert got.item() == pytest.approx((2 * supcon_01 + supcon_2) / 3, rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_reference_by_hand_hard_negative_weights(beta):
    # z = (1,0), (1,0), (-1,0), (0,1), normalize=False, tau = 1: anchors 0 and 1 have the positive s = 1 and the
    # negatives s = -1, 0 with weights e^{beta s} / ((e^{-beta} + 1) / 2); anchors 2 and 3 have no positive.
    x, y = _t([[1, 0], [1, 0], [-1, 0], [0, 1]]), torch.tensor([0, 0, 1, 2])
    ng = 2 * (math.exp(-(1 + beta)) + 1) / (math.exp(-beta) + 1)
    for mode in ("mean", "each"):  # one positive: both forms agree
        got = schane_reference(x, y, temperature=1.0, beta=beta, positive_mode=mode, normalize=False)
        assert got.item() == pytest.approx(math.log(1 + ng / E), rel=1e-12)
    if beta == 0.0:
        assert ng == pytest.approx(1 / E + 1)
    for tau_plus in (0.0, 0.1, 0.5):
        debiased = (ng - tau_plus * 2 * E) / (1 - tau_plus)
        ng_p = max(debiased, 2 * math.exp(-1.0))  # tau_plus = 0.5 with beta >= 1 hits the clamp
        got = hard_negative_ntxent_reference(x, y, temperature=1.0, beta=beta, tau_plus=tau_plus, normalize=False)
        assert got.item() == pytest.approx(math.log(1 + ng_p / E), rel=1e-12)
    assert ntxent_reference(x, y, temperature=1.0).item() == pytest.approx(math.log(1 + (1 / E + 1) / E), rel=1e-12)
    assert supcon_reference(x, y, temperature=1.0).item() == pytest.approx(math.log(1 + 1 / E**2 + 1 / E), rel=1e-12)


def test_reference_by_hand_clamp_and_two_view_ids():
    # ids None = [0, 1, 0, 1]; z = (1,0), (0,1), (1,0), (0,1), tau = 0.5: every anchor has its positive at s = 2
    # and two negatives at s = 0, so Ng = 2 for any beta; tau_plus = 0.9 pushes the debiased sum below the clamp.
    x = _t([[1, 0], [0, 1], [1, 0], [0, 1]])
    assert ntxent_reference(x, temperature=0.5).item() == pytest.approx(math.log(1 + 2 / E**2), rel=1e-12)
    got = hard_negative_ntxent_reference(x, temperature=0.5, beta=1.0, tau_plus=0.9)
    assert (2 - 0.9 * 2 * E**2) / 0.1 < 2 * math.exp(-2.0)
    assert got.item() == pytest.approx(math.log(1 + 2 * math.exp(-2.0) / E**2), rel=1e-12)
    with pytest.raises(ValueError, match="odd"):
        ntxent_reference(x[:3])


def test_reference_by_hand_reference_rows_are_contrast_only():
    # anchors (1,0) label 0 and (0,1) label 1; reference rows (3,0) label 0 and (0,2) label 5; tau = 0.5.
    # Anchor 0: positive = reference row 0 (s = 2), negatives anchor 1 and reference row 1 (s = 0, 0): Ng = 2.
    # Anchor 1 has no positive, and the reference rows are never anchors (reference row 0 would have one).
    x, y = _t([[1, 0], [0, 1]]), torch.tensor([0, 1])
    r, ry = _t([[3, 0], [0, 2]]), torch.tensor([0, 5])
    for beta in (0.0, 1.0):
        got = schane_reference(x, y, r, ry, temperature=0.5, beta=beta)
        assert got.item() == pytest.approx(math.log(1 + 2 / E**2), rel=1e-12)
    got = supcon_reference(x, y, r, ry, temperature=0.5)
    assert got.item() == pytest.approx(math.log(1 + 2 / E**2), rel=1e-12)


def test_reference_by_hand_zero_row_and_no_positive():
    # row 0 is all zeros: the zero vector, similarity 0 to all; z2 = (1, 1) / sqrt(2); tau = 1, beta = 0.
    # Anchor 0: positive s = 0, negative s = 0 -> log 2. Anchor 1: positive s = 0, negative s = 1/sqrt(2).
    x, y = _t([[0, 0], [1, 0], [3, 3]]).requires_grad_(), torch.tensor([0, 0, 1])
    v = schane_reference(x, y, temperature=1.0, beta=0.0)
    assert v.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(0.5**0.5))) / 2, rel=1e-12)
    v.backward()
    assert torch.equal(x.grad[0], torch.zeros(2, dtype=torch.float64)) and x.grad[1:].abs().sum() > 0
    for ref in (schane_reference, supcon_reference, ntxent_reference, hard_negative_ntxent_reference):
        xd = x.detach().clone().requires_grad_()
        v = ref(xd, torch.arange(3))
        assert v.item() == 0.0 and v.requires_grad
        v.backward()
        assert torch.equal(xd.grad, torch.zeros_like(xd))


def test_reference_detached_weights_change_the_gradient_only():
    y = PATTERNS["multi_view"]
    x = _emb(len(y), seed=14)
    grads = []
    for detach in (False, True):
        xd = x.clone().requires_grad_()
        v = schane_reference(xd, y, beta=2.0, detach_weights=detach)
        v.backward()
        grads.append((v.detach(), xd.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert not torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_reference_joint_by_hand():
    logits, y = _t([[1, 0]]), torch.tensor([0])
    ce = math.log(1 + 1 / E)  # -log softmax(logits)_0
    con = torch.tensor(2.0, dtype=torch.float64)
    assert joint_reference(logits, y, con, lam=0.9).item() == pytest.approx(0.9 * 2 + 0.1 * ce, rel=1e-12)
    # eps = 0.2 over C = 2: targets (0.9, 0.1), and -log softmax(logits)_1 = 1 + ce
    got = joint_reference(logits, y, con, lam=0.9, label_smoothing=0.2)
    assert got.item() == pytest.approx(0.9 * 2 + 0.1 * (0.9 * ce + 0.1 * (1 + ce)), rel=1e-12)
    assert joint_reference(_t([[float("nan"), 0]]), y, con, lam=1.0).item() == 2.0  # lam = 1: no CE at all
    assert joint_reference(logits, y, None, lam=0.9).item() == pytest.approx(ce, rel=1e-12)


# ---------------------------------------------------------------- the fast losses against the oracle


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("mode", ["mean", "each"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_schane_matches_loop_reference(pattern, mode, beta):
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=len(pattern))
    loss = SCHaNeLoss(temperature=0.5, beta=beta, positive_mode=mode)
    _check(lambda a: loss(a, y), lambda a: schane_reference(a, y, beta=beta, positive_mode=mode), x)


@pytest.mark.parametrize("pattern", ["random", "multi_view"])
def test_schane_detach_weights_and_no_normalize(pattern):
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=3) * 0.4
    _check(
        lambda a: schane_loss(a, y, temperature=0.3, beta=1.5, detach_weights=True),
        lambda a: schane_reference(a, y, temperature=0.3, beta=1.5, detach_weights=True),
        x,
    )
    _check(
        lambda a: schane_loss(a, y, temperature=0.7, normalize=False, positive_mode="each"),
        lambda a: schane_reference(a, y, temperature=0.7, positive_mode="each", normalize=False),
        x,
    )


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_supcon_matches_loop_reference(pattern):
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=5)
    _check(lambda a: SupConLoss(temperature=0.2)(a, y), lambda a: supcon_reference(a, y, temperature=0.2), x)


@pytest.mark.parametrize("pattern", ["all_distinct", "unbalanced", "multi_view", "random", "two_views"])
@pytest.mark.parametrize("tau", [0.07, 0.1, 0.5])
def test_supcon_matches_pytorch_metric_learning(pattern, tau):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=7, d=16)
    ours = SupConLoss(temperature=tau)(x, y)
    theirs = pml.SupConLoss(temperature=tau)(x, y)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["all_distinct", "multi_view", "two_views", "random"])
def test_ntxent_and_hcl_match_loop_reference(pattern):
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=11)
    _check(lambda a: NTXentLoss(temperature=0.5)(a, y), lambda a: ntxent_reference(a, y), x)
    for beta, tp in [(0.0, 0.0), (1.0, 0.0), (1.0, 0.1), (2.0, 0.3)]:
        hcl = HardNegativeNTXentLoss(temperature=0.5, beta=beta, tau_plus=tp)
        _check(lambda a, h=hcl: h(a, y), lambda a, b=beta, t=tp: hard_negative_ntxent_reference(a, y, beta=b, tau_plus=t), x)


@pytest.mark.parametrize("pattern", ["multi_view", "random"])
def test_unnormalised_losses_match_reference(pattern):
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=15) * 0.6
    kw = {"temperature": 2.0, "normalize": False}
    _check(lambda a: supcon_loss(a, y, **kw), lambda a: supcon_reference(a, y, **kw), x)
    _check(lambda a: ntxent_loss(a, y, **kw), lambda a: ntxent_reference(a, y, **kw), x)
    _check(
        lambda a: hard_negative_ntxent_loss(a, y, beta=1.5, tau_plus=0.2, **kw),
        lambda a: hard_negative_ntxent_reference(a, y, beta=1.5, tau_plus=0.2, **kw),
        x,
    )


def test_hcl_clamp_is_active_at_high_tau_plus():
    y = torch.arange(4).repeat(2)
    x = _emb(8, seed=2)
    x[4:] = x[:4] + 0.01 * _emb(4, seed=3)  # very similar positives: debiased sum goes negative -> clamp
    _check(
        lambda a: hard_negative_ntxent_loss(a, y, tau_plus=0.9, temperature=0.2),
        lambda a: hard_negative_ntxent_reference(a, y, temperature=0.2, tau_plus=0.9),
        x,
    )


def test_ref_embeddings_extend_contrast_set():
    y = torch.tensor([0, 1, 2, 0, 1, 3])
    ry = torch.tensor([3, 3, 2, 4, 0])
    x, r = _emb(6, seed=1), _emb(5, seed=2)
    _check(lambda a, b: schane_loss(a, y, b, ry), lambda a, b: schane_reference(a, y, b, ry), x, r)
    _check(
        lambda a, b: schane_loss(a, y, b, ry, positive_mode="each", beta=2.0),
        lambda a, b: schane_reference(a, y, b, ry, positive_mode="each", beta=2.0),
        x,
        r,
    )
    _check(lambda a, b: supcon_loss(a, y, b, ry), lambda a, b: supcon_reference(a, y, b, ry), x, r)
    _check(lambda a, b: hard_negative_ntxent_loss(a, y, b, ry), lambda a, b: hard_negative_ntxent_reference(a, y, b, ry), x, r)
    # an empty reference set changes nothing
    empty = torch.zeros(0, D, dtype=torch.float64)
    torch.testing.assert_close(schane_loss(x, y, empty, ry[:0]), schane_loss(x, y))


def test_beta_zero_is_unweighted_label_aware_loss():
    y = PATTERNS["random"]
    x = _emb(len(y), seed=4)
    z = F.normalize(x, dim=1)
    s = z @ z.T / 0.5
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    pos_mean = (s.exp() * pos).sum(1) / pos.sum(1).clamp(min=1)
    expected = -torch.log(pos_mean / (pos_mean + (s.exp() * neg).sum(1)))
    valid = pos.any(1)
    torch.testing.assert_close(schane_loss(x, y, beta=0.0), expected[valid].mean())


def test_ntxent_equals_supcon_for_two_views_distinct_labels():
    x = _emb(10, seed=8)
    ids = torch.arange(5).repeat(2)
    torch.testing.assert_close(ntxent_loss(x, temperature=0.3), supcon_loss(x, ids, temperature=0.3))
    torch.testing.assert_close(ntxent_loss(x, ids), schane_loss(x, ids, beta=0.0, positive_mode="each"))
    torch.testing.assert_close(hard_negative_ntxent_loss(x, beta=0.0, tau_plus=0.0), ntxent_loss(x, ids))


@pytest.mark.parametrize("name", ["schane", "supcon", "simclr", "hcl"])
def test_scale_and_permutation_invariance(name):
    loss = build_contrastive_loss(name)
    y = PATTERNS["multi_view"]
    x = _emb(len(y), seed=9)
    base = loss(x, y)
    torch.testing.assert_close(loss(3.7 * x, y), base)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss(x[perm], y[perm]), base)


@pytest.mark.parametrize(
    "loss",
    [
        SCHaNeLoss(),
        SCHaNeLoss(positive_mode="each", beta=2.0),
        SCHaNeLoss(normalize=False, temperature=2.0),
        SupConLoss(temperature=0.3),
        NTXentLoss(),
        HardNegativeNTXentLoss(tau_plus=0.2),
        SCHaNeLoss(chunk_size=3),
    ],
    ids=["schane", "schane_each", "schane_raw", "supcon", "ntxent", "hcl", "schane_chunked"],
)
def test_gradcheck(loss):
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    x = _emb(7, seed=12, d=4).requires_grad_()
    r = _emb(3, seed=13, d=4).requires_grad_()
    ry = torch.tensor([2, 0, 4])
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (x,))
    assert torch.autograd.gradcheck(lambda a, b: loss(a, y, b, ry), (x, r))


ALL_LOSSES = ["schane", "supcon", "simclr", "hcl"]


def _finite_value_and_grad(loss, x, y):
    x = x.clone().requires_grad_()
    v = loss(x, y)
    (g,) = torch.autograd.grad(v, x)
    assert torch.isfinite(v) and torch.isfinite(g).all()
    return v, g


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_no_positive_gives_connected_zero(name):
    loss = build_contrastive_loss(name)
    x = _emb(5, seed=0).requires_grad_()
    v = loss(x, torch.arange(5))
    assert v.item() == 0.0 and v.requires_grad
    v.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    v1 = loss(x[:1], torch.tensor([3]))  # N = 1
    assert v1.item() == 0.0 and v1.requires_grad


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_edge_cases_are_finite(name):
    loss = build_contrastive_loss(name)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    _finite_value_and_grad(loss, _emb(6), torch.zeros(6, dtype=torch.long))  # single class: no negatives
    _finite_value_and_grad(loss, _emb(1).repeat(6, 1), y)  # identical embeddings
    _finite_value_and_grad(loss, torch.zeros(6, D, dtype=torch.float64), y)  # zero vectors
    hard = build_contrastive_loss(name, temperature=0.01, beta=10.0)
    v, _ = _finite_value_and_grad(hard, _emb(6, seed=3), y)
    assert v.item() > 0


def test_single_class_schane_is_zero_and_anchor_without_negatives():
    x = _emb(6)
    assert schane_loss(x, torch.zeros(6, dtype=torch.long)).item() == 0.0  # Ng = 0 -> -log(1)
    _check(
        lambda a: schane_loss(a, torch.tensor([0, 0, 0, 1])),
        lambda a: schane_reference(a, torch.tensor([0, 0, 0, 1])),
        _emb(4, seed=6),
    )


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_upcast(name, dtype):
    loss = build_contrastive_loss(name, temperature=0.1, beta=1.0)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])
    x64 = _emb(8, seed=2, d=16)
    x = x64.to(dtype).requires_grad_()
    v = loss(x, y)
    assert v.dtype == torch.float32
    v.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    expected = loss(x.detach().double(), y)
    torch.testing.assert_close(v.double(), expected, atol=1e-5, rtol=1e-5)


def test_autocast_keeps_float32_similarities():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16)
    y = torch.tensor([0, 1, 2, 3]).repeat(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        assert z.dtype == torch.bfloat16
        v = SCHaNeLoss(temperature=0.05)(z, y)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, SCHaNeLoss(temperature=0.05)(z.detach().float(), y))
    v.backward()
    assert torch.isfinite(lin.weight.grad).all()


def test_float32_result_matches_float64():
    y = PATTERNS["random"]
    x = _emb(len(y), seed=21, d=32)
    v32 = schane_loss(x.float(), y, temperature=0.1, beta=3.0)
    assert v32.dtype == torch.float32
    torch.testing.assert_close(
        v32.double(), schane_loss(x, y, temperature=0.1, beta=3.0), atol=1e-5, rtol=1e-5
    )


X = torch.randn(4, 3)
Y = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: schane_loss(torch.randn(4), Y), "2-D"),
        (lambda: schane_loss(torch.randn(4, 3, 2), Y), "2-D"),
        (lambda: schane_loss(torch.randint(0, 3, (4, 3)), Y), "floating-point"),
        (lambda: schane_loss(torch.tensor([[float("nan"), 0, 0]]).repeat(4, 1), Y), "NaN or inf"),
        (lambda: schane_loss(torch.tensor([[float("inf"), 0, 0]]).repeat(4, 1), Y), "NaN or inf"),
        (lambda: schane_loss(X, torch.tensor([0, 1, 0])), "length 3"),
        (lambda: schane_loss(X, Y.float()), "integer dtype"),
        (lambda: schane_loss(X, Y.bool()), "integer dtype"),
        (lambda: schane_loss(X, Y[:, None]), "1-D"),
        (lambda: schane_loss(X, [0, 1, 0, 1]), "torch.Tensor"),
        (lambda: schane_loss(X, Y, temperature=0.0), "temperature"),
        (lambda: schane_loss(X, Y, temperature=-1.0), "temperature"),
        (lambda: schane_loss(X, Y, beta=-0.5), "beta"),
        (lambda: schane_loss(X, Y, positive_mode="max"), "positive_mode"),
        (lambda: schane_loss(X, Y, chunk_size=0), "chunk_size"),
        (lambda: schane_loss(X, Y, torch.randn(2, 3)), "together"),
        (lambda: schane_loss(X, Y, None, Y), "together"),
        (lambda: schane_loss(X, Y, torch.randn(2, 5), torch.tensor([0, 1])), "same dimension"),
        (lambda: schane_loss(X, Y, torch.randn(2, 3), torch.tensor([0, 1, 2])), "ref_labels"),
        (lambda: SCHaNeLoss(temperature=0), "temperature"),
        (lambda: SCHaNeLoss(beta=-1), "beta"),
        (lambda: SCHaNeLoss(positive_mode="sum"), "positive_mode"),
        (lambda: SupConLoss(temperature=-0.1), "temperature"),
        (lambda: HardNegativeNTXentLoss(tau_plus=1.0), "tau_plus"),
        (lambda: NTXentLoss()(torch.randn(5, 3)), "odd"),
        (lambda: build_contrastive_loss("triplet"), "unknown contrastive loss"),
        (lambda: JointLoss(SCHaNeLoss(), lam=1.5), "lam"),
        (lambda: JointLoss(SCHaNeLoss(), lam=0.5)(torch.randn(4, 2), Y), "embeddings are required"),
        (lambda: JointLoss(None)(torch.randn(4, 2), Y[:3]), "labels must be 1-D"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_build_contrastive_loss_and_supervised_flags():
    s = build_contrastive_loss("schane", temperature=0.2, beta=0.5, positive_mode="each", chunk_size=4)
    assert isinstance(s, SCHaNeLoss) and s.supervised
    assert (s.temperature, s.beta, s.positive_mode, s.chunk_size) == (0.2, 0.5, "each", 4)
    assert isinstance(build_contrastive_loss("supcon"), SupConLoss)
    assert build_contrastive_loss("supcon").temperature == 0.1
    assert not build_contrastive_loss("simclr").supervised
    h = build_contrastive_loss("hcl", tau_plus=0.2, beta=2.0)
    assert isinstance(h, HardNegativeNTXentLoss) and not h.supervised and h.tau_plus == 0.2


class _Boom(torch.nn.Module):
    supervised = True

    def forward(self, *args):
        raise AssertionError("contrastive term must not be computed")


def test_joint_loss_components():
    logits = _emb(8, seed=1, d=3)
    z = _emb(8, seed=2)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    con = SCHaNeLoss()
    out = JointLoss(con, lam=0.9)(logits, y, z)
    assert isinstance(out, JointLossOutput)
    ce = F.cross_entropy(logits.float(), y)
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.contrastive, con(z, y))
    torch.testing.assert_close(out.total, 0.9 * con(z, y) + 0.1 * ce)
    only_ce = JointLoss(_Boom(), lam=0.0)(logits, y, z)
    assert only_ce.contrastive is None
    torch.testing.assert_close(only_ce.total, ce)
    only_con = JointLoss(con, lam=1.0)(torch.full((8, 3), float("nan")), y, z)
    assert only_con.ce is None
    torch.testing.assert_close(only_con.total, con(z, y))
    none = JointLoss(None, lam=0.9)(logits, y)
    torch.testing.assert_close(none.total, ce)
    ids = torch.arange(4).repeat(2)
    sim = JointLoss(NTXentLoss(), lam=0.5)(logits, y, z, contrastive_labels=ids)
    torch.testing.assert_close(sim.contrastive, ntxent_loss(z, ids))


@pytest.mark.parametrize("lam, smoothing", [(0.9, 0.0), (0.9, 0.1), (0.0, 0.2), (1.0, 0.0)])
def test_joint_loss_matches_reference(lam, smoothing):
    logits, z = _emb(8, seed=1, d=3), _emb(8, seed=2)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    out = JointLoss(SCHaNeLoss(), lam=lam, label_smoothing=smoothing)(logits, y, z)
    want = joint_reference(logits, y, schane_reference(z, y), lam=lam, label_smoothing=smoothing)
    torch.testing.assert_close(out.total.double(), want, atol=1e-6, rtol=1e-6)  # CE runs in float32


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37])
def test_huge_finite_norms_match_float64_reference(scale):
    # float32 rows with norms whose squares overflow: scaled by their max-abs before the norm,
    # the loss and its gradient equal the float64 reference on the same directions
    y = PATTERNS["random"]
    x = _emb(len(y), seed=5, d=32)
    big = (x * scale).float()
    v = schane_loss(big.requires_grad_(), y)
    want = schane_reference(big.detach().double(), y)
    assert math.isfinite(v.item())
    torch.testing.assert_close(v.double(), want, atol=1e-5, rtol=1e-5)
    v.backward()
    assert torch.isfinite(big.grad).all()
    xd = big.detach().double().requires_grad_()
    schane_reference(xd, y).backward()
    torch.testing.assert_close(big.grad.double() * scale, xd.grad * scale, atol=1e-5, rtol=1e-4)
