"""``model.grad_checkpointing``: activation checkpointing changes memory, never the numbers. Gradients
with and without it are equal (drop path on, so the recomputed forward must replay its random draws), and
parameter names are unchanged (checkpoints load either way)."""

from __future__ import annotations

import pytest
import torch

from schane.config import ModelConfig
from schane.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backbone,size", [("beit3_tiny", None), ("test_vit", 32)])
def test_checkpointed_gradients_equal_the_plain_ones(backbone, size):
    grads, names = {}, {}
    kwargs = {"img_size": size} if size else {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = build_model(ModelConfig(backbone=backbone, pretrained=False, drop_path=0.3, grad_checkpointing=ckpt,
                                    backbone_kwargs=kwargs), 3)
        m.train()
        img = m.backbone.pretrained_cfg["input_size"][-1] if size is None else size
        torch.manual_seed(1)
        x = torch.randn(2, 3, img, img)
        out = m(x)
        (out.logits.logsumexp(1).sum() + out.projections.square().sum()).backward()
        grads[ckpt] = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        names[ckpt] = list(m.state_dict())
    assert names[True] == names[False]
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for k, g in grads[False].items():
        assert torch.allclose(grads[True][k], g, atol=1e-6, rtol=1e-5), k


def test_beit3_checkpointing_recomputes_the_layers():
    from schane.models.backbones import Beit3Backbone

    m = Beit3Backbone("beit3_tiny")
    calls = []
    for layer in m.beit3.encoder.layers:
        layer.self_attn.register_forward_pre_hook(lambda mod, args: calls.append(1))
    x = torch.randn(1, 3, m.img_size, m.img_size)
    m(x).sum().backward()
    plain = len(calls)
    m.set_grad_checkpointing(True)
    calls.clear()
    m(x).sum().backward()
    assert plain == m.num_layers and len(calls) == 2 * m.num_layers  # forward + recomputation in backward
    with torch.no_grad():
        calls.clear()
        m(x)
    assert len(calls) == m.num_layers
    m.set_grad_checkpointing(False)
    calls.clear()
    m(x).sum().backward()
    assert len(calls) == m.num_layers
