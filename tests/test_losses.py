"""Contrastive losses against naive float64 loop references written from the formulas."""

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


def _prep(x, y, rx, ry, normalize):
    z = F.normalize(x, dim=1) if normalize else x
    if rx is None:
        return z, z, y
    rz = F.normalize(rx, dim=1) if normalize else rx
    return z, torch.cat([z, rz]), torch.cat([y, ry])


def ref_schane(x, y, rx=None, ry=None, tau=0.5, beta=1.0, mode="mean", normalize=True, detach=False):
    """Loop over anchors: select positives/negatives, weights, sum (no log-space tricks)."""
    z, c, yc = _prep(x, y, rx, ry, normalize)
    losses = []
    for i in range(z.shape[0]):
        pos = [j for j in range(c.shape[0]) if j != i and yc[j] == y[i]]
        neg = [k for k in range(c.shape[0]) if yc[k] != y[i]]
        if not pos:
            continue
        ng = x.new_zeros(())
        if neg:
            sn = torch.stack([z[i] @ c[k] / tau for k in neg])
            w = torch.exp(beta * sn) / torch.exp(beta * sn).mean()
            if detach:
                w = w.detach()
            for t in range(len(neg)):
                ng = ng + w[t] * torch.exp(sn[t])
        ep = torch.stack([torch.exp(z[i] @ c[p] / tau) for p in pos])
        if mode == "mean":
            pos_i = ep.mean()
            losses.append(-torch.log(pos_i / (pos_i + ng)))
        else:
            losses.append(torch.stack([-torch.log(e / (e + ng)) for e in ep]).mean())
    return torch.stack(losses).mean() if losses else x.sum() * 0


def ref_supcon(x, y, rx=None, ry=None, tau=0.1, normalize=True):
    z, c, yc = _prep(x, y, rx, ry, normalize)
    losses = []
    for i in range(z.shape[0]):
        others = [a for a in range(c.shape[0]) if a != i]
        pos = [j for j in others if yc[j] == y[i]]
        if not pos:
            continue
        den = sum(torch.exp(z[i] @ c[a] / tau) for a in others)
        losses.append(-sum(torch.log(torch.exp(z[i] @ c[p] / tau) / den) for p in pos) / len(pos))
    return torch.stack(losses).mean() if losses else x.sum() * 0


def ref_hcl(x, y, rx=None, ry=None, tau=0.5, beta=1.0, tau_plus=0.1):
    """Robinson et al.: Ng = max((-tau+ N pos + reweighted neg) / (1 - tau+), N e^{-1/tau}), per positive pair."""
    z, c, yc = _prep(x, y, rx, ry, True)
    losses = []
    for i in range(z.shape[0]):
        pos = [j for j in range(c.shape[0]) if j != i and yc[j] == y[i]]
        neg = [k for k in range(c.shape[0]) if yc[k] != y[i]]
        if not pos:
            continue
        terms = []
        for p in pos:
            e_p = torch.exp(z[i] @ c[p] / tau)
            if neg:
                e_n = torch.stack([torch.exp(z[i] @ c[k] / tau) for k in neg])
                imp = e_n**beta
                reweight = (imp * e_n).sum() / imp.mean()
                n = len(neg)
                ng = (-tau_plus * n * e_p + reweight) / (1 - tau_plus)
                ng = torch.clamp(ng, min=n * math.exp(-1 / tau))
            else:
                ng = x.new_zeros(())
            terms.append(-torch.log(e_p / (e_p + ng)))
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses).mean() if losses else x.sum() * 0


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


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("mode", ["mean", "each"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5])
def test_schane_matches_loop_reference(pattern, mode, beta):
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=len(pattern))
    loss = SCHaNeLoss(temperature=0.5, beta=beta, positive_mode=mode)
    _check(lambda a: loss(a, y), lambda a: ref_schane(a, y, beta=beta, mode=mode), x)


@pytest.mark.parametrize("pattern", ["random", "multi_view"])
def test_schane_detach_weights_and_no_normalize(pattern):
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=3) * 0.4
    _check(
        lambda a: schane_loss(a, y, temperature=0.3, beta=1.5, detach_weights=True),
        lambda a: ref_schane(a, y, tau=0.3, beta=1.5, detach=True),
        x,
    )
    _check(
        lambda a: schane_loss(a, y, temperature=0.7, normalize=False, positive_mode="each"),
        lambda a: ref_schane(a, y, tau=0.7, mode="each", normalize=False),
        x,
    )


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_supcon_matches_loop_reference(pattern):
    y = PATTERNS[pattern]
    x = _emb(len(y), seed=5)
    _check(lambda a: SupConLoss(temperature=0.2)(a, y), lambda a: ref_supcon(a, y, tau=0.2), x)


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
    _check(lambda a: NTXentLoss(temperature=0.5)(a, y), lambda a: ref_schane(a, y, beta=0.0, mode="each"), x)
    for beta, tp in [(0.0, 0.0), (1.0, 0.0), (1.0, 0.1), (2.0, 0.3)]:
        hcl = HardNegativeNTXentLoss(temperature=0.5, beta=beta, tau_plus=tp)
        _check(lambda a, h=hcl: h(a, y), lambda a, b=beta, t=tp: ref_hcl(a, y, beta=b, tau_plus=t), x)


def test_hcl_clamp_is_active_at_high_tau_plus():
    y = torch.arange(4).repeat(2)
    x = _emb(8, seed=2)
    x[4:] = x[:4] + 0.01 * _emb(4, seed=3)  # very similar positives: debiased sum goes negative -> clamp
    _check(
        lambda a: hard_negative_ntxent_loss(a, y, tau_plus=0.9, temperature=0.2),
        lambda a: ref_hcl(a, y, tau=0.2, tau_plus=0.9),
        x,
    )


def test_ref_embeddings_extend_contrast_set():
    y = torch.tensor([0, 1, 2, 0, 1, 3])
    ry = torch.tensor([3, 3, 2, 4, 0])
    x, r = _emb(6, seed=1), _emb(5, seed=2)
    _check(lambda a, b: schane_loss(a, y, b, ry), lambda a, b: ref_schane(a, y, b, ry), x, r)
    _check(
        lambda a, b: schane_loss(a, y, b, ry, positive_mode="each", beta=2.0),
        lambda a, b: ref_schane(a, y, b, ry, mode="each", beta=2.0),
        x,
        r,
    )
    _check(lambda a, b: supcon_loss(a, y, b, ry), lambda a, b: ref_supcon(a, y, b, ry), x, r)
    _check(lambda a, b: hard_negative_ntxent_loss(a, y, b, ry), lambda a, b: ref_hcl(a, y, b, ry), x, r)
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
        lambda a: ref_schane(a, torch.tensor([0, 0, 0, 1])),
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


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37])
def test_huge_finite_norms_match_float64_reference(scale):
    # float32 rows with norms whose squares overflow: scaled by their max-abs before the norm,
    # the loss and its gradient equal the float64 reference on the same directions
    y = PATTERNS["random"]
    x = _emb(len(y), seed=5, d=32)
    big = (x * scale).float()
    v = schane_loss(big.requires_grad_(), y)
    want = ref_schane(big.detach().double(), y)
    assert math.isfinite(v.item())
    torch.testing.assert_close(v.double(), want, atol=1e-5, rtol=1e-5)
    v.backward()
    assert torch.isfinite(big.grad).all()
    xd = big.detach().double().requires_grad_()
    ref_schane(xd, y).backward()
    torch.testing.assert_close(big.grad.double() * scale, xd.grad * scale, atol=1e-5, rtol=1e-4)
