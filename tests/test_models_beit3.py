"""BEiT-3 (torchscale) backbone: official checkpoint layout, pooling, position-embedding resize."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from schane.config import ModelConfig
from schane.models import Beit3Backbone, build_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on a loaded shared CPU, OpenMP threads waiting on each other cost 100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = {
    "encoder_embed_dim": 32,
    "encoder_attention_heads": 2,
    "encoder_ffn_embed_dim": 64,
    "encoder_layers": 2,
    "img_size": 32,
    "patch_size": 8,
    "vocab_size": 64,
    "max_source_positions": 16,
}


def official_args(normalize_output: bool, **over) -> EncoderConfig:
    """EncoderConfig as the official release builds it (unilm beit3 modeling_utils._get_base_config)."""
    kw = dict(TINY, **over)
    return EncoderConfig(
        multiway=True,
        layernorm_embedding=False,
        normalize_output=normalize_output,
        no_output_layer=True,
        drop_path_rate=0.0,
        checkpoint_activations=None,
        **kw,
    )


class OfficialImageClassifier(nn.Module):
    """Mirror of the official BEiT3ForImageClassification (attribute names define the key layout)."""

    def __init__(self, args: EncoderConfig, num_classes: int = 7) -> None:
        super().__init__()
        self.beit3 = BEiT3(args)
        self.fc_norm = nn.LayerNorm(args.encoder_embed_dim)
        self.head = nn.Linear(args.encoder_embed_dim, num_classes)
        for p in self.parameters():  # non-trivial values everywhere (norms included)
            nn.init.normal_(p, std=0.05)

    def pooled(self, image: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=None, visual_tokens=image)["encoder_out"]
        return self.fc_norm(x[:, 1:, :].mean(1))


def test_official_layout_loads_without_missing_or_unexpected(tmp_path):
    torch.manual_seed(0)
    official = OfficialImageClassifier(official_args(normalize_output=False)).eval()
    sd = official.state_dict()
    # the layout this loader targets
    assert "beit3.encoder.layers.0.self_attn.q_proj.A.weight" in sd
    assert "beit3.vision_embed.proj.weight" in sd and "beit3.text_embed.weight" in sd
    path = tmp_path / "beit3_tiny_official.pth"
    torch.save({"model": sd}, path)

    model = build_model(
        ModelConfig(backbone="beit3_tiny", pretrained=False, checkpoint=str(path)), num_classes=3
    )
    rep = model.load_report
    assert rep.missing == [] and rep.unexpected == []
    own = model.backbone.state_dict()
    assert set(own) <= set(sd), "backbone keys must be a subset of the official names"
    assert rep.loaded == len(own)
    # everything not loaded is the language branch or the classification head
    for k in set(sd) - set(own):
        assert k.startswith(("beit3.text_embed.", "head.")) or ".B." in k, k
        assert k in rep.ignored
    for k in own:
        torch.testing.assert_close(own[k], sd[k])

    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), official.pooled(x), rtol=1e-5, atol=1e-5)


def test_pretraining_checkpoint_without_fc_norm(tmp_path):
    """A pre-training checkpoint: output LayerNorm present (ignored), no fc_norm (fresh), like the release."""
    torch.manual_seed(1)
    encoder = BEiT3(official_args(normalize_output=True))
    sd = {f"beit3.{k}": v for k, v in encoder.state_dict().items()}
    assert any(k.startswith("beit3.encoder.layer_norm.") for k in sd)
    path = tmp_path / "beit3_pretrain.pth"
    torch.save({"model": sd}, path)
    model = build_model(
        ModelConfig(backbone="beit3_tiny", pretrained=False, checkpoint=str(path)), num_classes=2
    )
    rep = model.load_report
    assert rep.unexpected == [] and rep.missing == []
    assert any(k.startswith("beit3.encoder.layer_norm.") for k in rep.ignored)
    torch.testing.assert_close(model.backbone.fc_norm.weight, torch.ones(32))
    torch.testing.assert_close(
        model.backbone.beit3.encoder.layers[1].ffn.A.fc1.weight, sd["beit3.encoder.layers.1.ffn.A.fc1.weight"]
    )


def test_position_embedding_is_interpolated(tmp_path):
    torch.manual_seed(2)
    official = OfficialImageClassifier(official_args(normalize_output=False))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": official.state_dict()}, path)
    cfg = ModelConfig(
        backbone="beit3_tiny", pretrained=False, checkpoint=str(path), backbone_kwargs={"img_size": 48}
    )
    model = build_model(cfg, num_classes=2)
    pos = model.backbone.beit3.encoder.embed_positions.A.weight
    src = official.state_dict()["beit3.encoder.embed_positions.A.weight"]
    assert src.shape == (3 + 16, 32) and pos.shape == (3 + 36, 32)
    torch.testing.assert_close(pos[:3], src[:3])  # padding offsets and CLS are kept
    assert model.data_config["input_size"] == (3, 48, 48)
    assert model(torch.randn(1, 3, 48, 48)).logits.shape == (1, 2)


def test_mismatched_checkpoints_raise(tmp_path):
    wide = OfficialImageClassifier(official_args(normalize_output=False, encoder_ffn_embed_dim=128))
    p1 = tmp_path / "wide.pth"
    torch.save({"model": wide.state_dict()}, p1)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_model(ModelConfig(backbone="beit3_tiny", pretrained=False, checkpoint=str(p1)), num_classes=2)
    deep = OfficialImageClassifier(official_args(normalize_output=False, encoder_layers=3))
    p2 = tmp_path / "deep.pth"
    torch.save({"model": deep.state_dict()}, p2)
    with pytest.raises(ValueError, match=r"unexpected keys \[beit3\.encoder\.layers\.2\."):
        build_model(ModelConfig(backbone="beit3_tiny", pretrained=False, checkpoint=str(p2)), num_classes=2)


def test_forward_and_validation():
    torch.manual_seed(0)
    backbone = Beit3Backbone("beit3_tiny", drop_path_rate=0.1)
    assert backbone.num_features == 32 and backbone.pretrained_cfg["input_size"] == (3, 32, 32)
    assert not hasattr(backbone.beit3, "text_embed")
    assert not any(".B." in k for k in backbone.state_dict())
    tokens = backbone.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 16, 32)
    pooled = backbone.forward_head(tokens)
    ref = nn.functional.layer_norm(
        tokens[:, 1:].mean(1), (32,), backbone.fc_norm.weight, backbone.fc_norm.bias
    )
    torch.testing.assert_close(pooled, ref)
    with pytest.raises(ValueError, match="img_size"):
        backbone.forward_features(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="EncoderConfig"):
        Beit3Backbone("beit3_tiny", not_a_field=3)
    with pytest.raises(ValueError, match="model.checkpoint"):
        build_model(ModelConfig(backbone="beit3_tiny", pretrained=True), num_classes=2)


def test_beit3_base_config_matches_release():
    """Architecture of beit3_base_patch16_224 (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        backbone = Beit3Backbone("beit3_base_patch16_224")
    a = backbone.args
    assert (a.encoder_embed_dim, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_embed_dim) == (
        768,
        12,
        12,
        3072,
    )
    assert a.multiway and a.vocab_size == 64010 and a.img_size == 224 and a.patch_size == 16
    assert backbone.beit3.encoder.embed_positions.A.weight.shape == (14 * 14 + 3, 768)
    n_params = sum(p.numel() for p in backbone.parameters())
    assert 85e6 < n_params < 88e6  # the vision path of BEiT-3 base (~86M)
