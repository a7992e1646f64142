"""Bad and degenerate loss inputs: bools as numbers, all-zero embedding rows, NaN/inf logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from schane.losses import (
    HardNegativeNTXentLoss,
    JointLoss,
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
    ntxent_reference,
    schane_reference,
    supcon_reference,
)
from test_losses import _check, _emb

X = torch.randn(4, 3)
Y = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: SCHaNeLoss(temperature=True), "temperature"),
        (lambda: SCHaNeLoss(temperature=False), "temperature"),
        (lambda: SCHaNeLoss(beta=True), "beta"),
        (lambda: schane_loss(X, Y, temperature=True), "temperature"),
        (lambda: schane_loss(X, Y, beta=False), "beta"),
        (lambda: SupConLoss(temperature=True), "temperature"),
        (lambda: supcon_loss(X, Y, temperature=True), "temperature"),
        (lambda: NTXentLoss(temperature=True), "temperature"),
        (lambda: ntxent_loss(X, Y, temperature=True), "temperature"),
        (lambda: HardNegativeNTXentLoss(temperature=True), "temperature"),
        (lambda: HardNegativeNTXentLoss(beta=True), "beta"),
        (lambda: HardNegativeNTXentLoss(tau_plus=False), "tau_plus"),
        (lambda: hard_negative_ntxent_loss(X, Y, tau_plus=True), "tau_plus"),
        (lambda: build_contrastive_loss("schane", temperature=True), "temperature"),
        (lambda: build_contrastive_loss("hcl", beta=True), "beta"),
        (lambda: SCHaNeLoss(chunk_size=True), "chunk_size"),
        (lambda: JointLoss(SCHaNeLoss(), lam=True), "lam"),
        (lambda: JointLoss(SCHaNeLoss(), lam=False), "lam"),
        (lambda: JointLoss(SCHaNeLoss(), label_smoothing=True), "label_smoothing"),
        (lambda: JointLoss(SCHaNeLoss(), label_smoothing=float("nan")), "label_smoothing"),
        (lambda: JointLoss(SCHaNeLoss(), lam=float("nan")), "lam"),
    ],
)
def test_bools_and_nan_are_not_numbers(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_numbers_still_accepted():
    assert SCHaNeLoss(temperature=1, beta=0).temperature == 1.0
    assert JointLoss(SCHaNeLoss(), lam=1, label_smoothing=0).lam == 1.0
    assert HardNegativeNTXentLoss(tau_plus=0).tau_plus == 0.0


def _zero_row_case(seed: int = 0):
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3])
    x = _emb(8, seed=seed)
    x[2] = 0.0  # e.g. a dead projection output
    return x, y


REFS = {
    "schane": lambda x, y, rx=None, ry=None: schane_reference(x, y, rx, ry),
    "supcon": lambda x, y, rx=None, ry=None: supcon_reference(x, y, rx, ry, temperature=0.1),
    "simclr": lambda x, y, rx=None, ry=None: ntxent_reference(x, y, rx, ry),
    "hcl": lambda x, y, rx=None, ry=None: hard_negative_ntxent_reference(x, y, rx, ry),
}


@pytest.mark.parametrize("name", list(REFS))
def test_zero_row_gets_zero_gradient_and_others_are_exact(name):
    x, y = _zero_row_case()
    loss = build_contrastive_loss(name)
    xa = x.clone().requires_grad_()
    v = loss(xa, y)
    v.backward()
    assert torch.equal(xa.grad[2], torch.zeros_like(xa.grad[2]))
    # The reference states the same rule (a row of norm <= 1e-12 is a constant zero vector, where F.normalize
    # would multiply its gradient by 1e12), so every row, the zero row included, has the reference's gradient.
    xr = x.clone().requires_grad_()
    vr = REFS[name](xr, y)
    vr.backward()
    torch.testing.assert_close(v, vr, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(xa.grad, xr.grad, atol=1e-10, rtol=1e-8)
    assert torch.equal(xr.grad[2], torch.zeros_like(xr.grad[2]))


def test_zero_rows_in_reference_embeddings_and_low_precision():
    x, y = _zero_row_case(seed=1)
    r = _emb(4, seed=2)
    r[1] = 0.0
    ry = torch.tensor([1, 0, 2, 5])
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    schane_loss(xa, y, ra, ry, chunk_size=3).backward()
    assert torch.equal(ra.grad[1], torch.zeros(6, dtype=torch.float64))
    assert torch.equal(xa.grad[2], torch.zeros(6, dtype=torch.float64))
    assert bool(torch.isfinite(ra.grad).all()) and ra.grad.abs().sum() > 0
    _check(lambda a, b: schane_loss(a, y, b, ry, chunk_size=3), lambda a, b: schane_reference(a, y, b, ry), x, r)
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype).requires_grad_()
        SCHaNeLoss()(xh, y).backward()
        assert torch.isfinite(xh.grad.float()).all() and xh.grad.float().abs().max() < 100
        assert torch.equal(xh.grad[2], torch.zeros_like(xh.grad[2]))


def test_zero_row_value_is_zero_vector():
    """The zero row has similarity 0 to everything: same loss as passing it pre-normalised with normalize=False."""
    x, y = _zero_row_case(seed=3)
    z = F.normalize(x, dim=1)
    assert torch.equal(z[2], torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(schane_loss(x, y), schane_loss(z, y, normalize=False), atol=1e-12, rtol=1e-12)


def test_unnormalised_zero_row_is_fine_without_special_casing():
    x, y = _zero_row_case(seed=4)
    xa = x.clone().requires_grad_()
    schane_loss(xa, y, normalize=False).backward()
    assert torch.isfinite(xa.grad).all() and xa.grad.abs().max() < 100


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_joint_loss_rejects_non_finite_logits(bad):
    logits = torch.randn(4, 3)
    logits[1, 2] = bad
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="logits contain NaN or inf"):
        JointLoss(SCHaNeLoss(), lam=0.9)(logits, Y, z)
    with pytest.raises(ValueError, match="logits contain NaN or inf"):
        JointLoss(None)(logits, Y)
    out = JointLoss(SCHaNeLoss(), lam=1.0)(logits, Y, z)  # no CE term: logits are not used
    assert out.ce is None and torch.isfinite(out.total)


def test_non_finite_inputs_found_with_and_without_normalisation():
    x = torch.randn(4, 3)
    bad = x.clone()
    bad[1, 0] = float("nan")
    ref = torch.randn(2, 3)
    ref[0, 2] = float("inf")
    ry = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="^embeddings contains NaN or inf"):
        schane_loss(bad, Y, normalize=False)
    with pytest.raises(ValueError, match="^ref_embeddings contains NaN or inf"):
        schane_loss(x, Y, ref, ry)
    with pytest.raises(ValueError, match="^ref_embeddings contains NaN or inf"):
        supcon_loss(x, Y, ref, ry, normalize=False)
    # finite values whose norm overflows float32 are not an input error (such a row becomes 0, as F.normalize does)
    huge = x.clone()
    huge[2] = 3e38
    v = schane_loss(huge, Y)
    assert torch.isfinite(v)
