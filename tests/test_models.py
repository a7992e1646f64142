"""SCHaNeModel with timm backbones: outputs, heads, data config, drop path, channels-last."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from schane.config import ModelConfig
from schane.models import ModelOutput, ProjectionHead, SCHaNeModel, build_model, create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18", pretrained=False, proj_dim=16), num_classes=4).eval()


def test_output_shapes_and_types(resnet):
    x = torch.randn(3, 3, 32, 32)
    out = resnet(x)
    assert isinstance(out, ModelOutput) and isinstance(out, tuple)
    assert out.logits.shape == (3, 4)
    assert out.features.shape == (3, resnet.num_features) == (3, 512)
    assert out.projections.shape == (3, 16)
    assert isinstance(resnet, SCHaNeModel)
    for name in ("backbone", "classifier", "projector"):
        assert isinstance(getattr(resnet, name), torch.nn.Module)


def test_heads_match_naive_reference(resnet):
    """Features are timm's pre-logits; logits and projections follow the formulas in float64."""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = resnet(x)
        ref_feat = resnet.backbone.forward_head(resnet.backbone.forward_features(x), pre_logits=True)
        # resnet pre-logits = global average pool of the last feature map
        fmap = resnet.backbone.forward_features(x)
    torch.testing.assert_close(out.features, ref_feat)
    torch.testing.assert_close(out.features, fmap.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resnet.forward_features(x), out.features)

    f = out.features.double()
    W, b = resnet.classifier.weight.double(), resnet.classifier.bias.double()
    logits = torch.stack(
        [torch.stack([(f[i] * W[c]).sum() + b[c] for c in range(W.shape[0])]) for i in range(2)]
    )
    torch.testing.assert_close(out.logits.double(), logits, rtol=1e-5, atol=1e-6)

    p = resnet.projector
    h = f @ p.fc1.weight.double().T + p.fc1.bias.double()
    h = torch.where(h > 0, h, torch.zeros_like(h))
    z = h @ p.fc2.weight.double().T + p.fc2.bias.double()
    z = z / z.pow(2).sum(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(out.projections.double(), z, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.projections.norm(dim=1), torch.ones(2), atol=1e-5)


def test_projection_head_layout_and_validation():
    head = ProjectionHead(10, 6)
    mods = list(head.children())
    assert [type(m).__name__ for m in mods] == ["Linear", "ReLU", "Linear"]
    assert head.fc1.weight.shape == (10, 10) and head.fc2.weight.shape == (6, 10)
    assert torch.allclose(head(torch.randn(5, 10)).norm(dim=1), torch.ones(5), atol=1e-6)
    with pytest.raises(ValueError, match="proj_dim"):
        ProjectionHead(10, 0)


def test_gradients_reach_every_trainable_parameter():
    model = build_model(ModelConfig(backbone="test_vit", pretrained=False, proj_dim=8), num_classes=3)
    out = model(torch.randn(2, 3, 160, 160))
    (F.cross_entropy(out.logits, torch.tensor([0, 2])) + out.projections[:, 0].sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_data_config_from_timm(resnet):
    dc = resnet.data_config
    assert set(dc) >= {"mean", "std", "input_size", "crop_pct", "interpolation"}
    ref = timm.data.resolve_model_data_config(timm.create_model("resnet18", pretrained=False))
    assert dc["mean"] == pytest.approx(ref["mean"]) and dc["std"] == pytest.approx(ref["std"])
    assert dc["input_size"] == tuple(ref["input_size"]) and dc["crop_pct"] == ref["crop_pct"]


def test_drop_path_and_drop_rate_reach_timm():
    backbone, _ = create_backbone("test_vit", pretrained=False, drop_path=0.2, drop_rate=0.3)
    probs = [m.drop_prob for m in backbone.modules() if type(m).__name__ == "DropPath"]
    assert probs and max(probs) == pytest.approx(0.2)
    assert backbone.head_drop.p == pytest.approx(0.3)
    # eval mode is deterministic, train mode with drop path is not
    model = build_model(ModelConfig(backbone="test_vit", pretrained=False, drop_path=0.5), num_classes=2)
    x = torch.randn(2, 3, 160, 160)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).features, model(x).features)
        model.train()
        torch.manual_seed(1)
        a = model(x).features
        torch.manual_seed(2)
        b = model(x).features
    assert not torch.allclose(a, b)


def test_channels_last_gives_same_output(resnet):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = resnet(x)
        cl = resnet.to(memory_format=torch.channels_last)
        got = cl(x.to(memory_format=torch.channels_last))
        resnet.to(memory_format=torch.contiguous_format)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backbone_kwargs_and_efficientnet():
    model = build_model(
        ModelConfig(backbone="test_efficientnet", pretrained=False, backbone_kwargs={"in_chans": 1}),
        num_classes=2,
    )
    out = model(torch.randn(2, 1, 32, 32))
    assert out.logits.shape == (2, 2) and out.features.shape == (2, model.num_features)


def test_invalid_inputs_raise(resnet):
    with pytest.raises(ValueError, match="num_classes"):
        build_model(ModelConfig(backbone="resnet18", pretrained=False), num_classes=0)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model(ModelConfig(backbone="no_such_net_xyz", pretrained=False), num_classes=2)
    with pytest.raises(ValueError, match="rejected the arguments"):
        build_model(
            ModelConfig(backbone="resnet18", pretrained=False, backbone_kwargs={"bogus_arg": 1}),
            num_classes=2,
        )
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        resnet(torch.randn(3, 32, 32))
