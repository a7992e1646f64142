"""Chunked evaluation over anchor rows: same value and gradient as one block."""

from __future__ import annotations

import pytest
import torch

from schane.losses import build_contrastive_loss

NAMES = ["schane", "supcon", "simclr", "hcl"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_chunked_equals_unchunked(name, chunk):
    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(11, 5, dtype=torch.float64, generator=g)
    r = torch.randn(6, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (11,), generator=g)
    ry = torch.randint(0, 5, (6,), generator=g)
    kw = {"positive_mode": "each"} if chunk == 7 else {}
    full = build_contrastive_loss(name, **kw)
    chunked = build_contrastive_loss(name, chunk_size=chunk, **kw)
    for args in [(), (r, ry)]:
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ra = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
        rb = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
        va, vb = full(xa, y, *ra), chunked(xb, y, *rb)
        torch.testing.assert_close(vb, va, atol=1e-12, rtol=1e-12)
        va.backward()
        vb.backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-12, rtol=1e-12)
        if args:
            torch.testing.assert_close(rb[0].grad, ra[0].grad, atol=1e-12, rtol=1e-12)


def test_chunked_low_precision_and_no_positive_chunks():
    # the first chunk has no valid anchor at all; its backward is skipped
    y = torch.tensor([0, 1, 2, 3, 4, 4, 5, 5])
    x = torch.randn(8, 16).half().requires_grad_()
    loss = build_contrastive_loss("schane", chunk_size=4)(x, y)
    ref = build_contrastive_loss("schane")(x.detach().float(), y)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all()
