"""BEiT-3 (torchscale) backbone: the official checkpoint layouts, pooling, position-table resize.

Every checkpoint here is built at a tiny size from torchscale 0.3.0 itself (``torchscale.model.BEiT3``,
the class the official release wraps) and saved the way the release's code saves it. Sources, all in
microsoft/unilm:

* ``beit3/README.md`` ("Download Checkpoints", "Fine-tuning on ImageNet-1k"): the published files:
  the pretraining ``beit3_{base,large}_patch16_224.pth`` (276M / 746M parameters), the image-text
  contrastive ``beit3_{base,large}_itc_patch16_224.pth`` (222M / 674M) and the ImageNet-1k fine-tuned
  ``beit3_{base,large}_patch16_224_in1k.pth``.
* ``beit3/modeling_utils.py``: ``_get_base_config`` (the ``EncoderConfig`` fields: multiway,
  ``normalize_output=True``, ``no_output_layer``, vocab 64010 ...) and ``BEiT3Wrapper``
  (``self.beit3 = BEiT3(args)``, hence the ``beit3.`` key prefix).
* ``beit3/modeling_finetune.py``: ``BEiT3ForImageClassification`` (``fc_norm``, ``head``;
  ``normalize_output=False``), ``BEiT3ForRetrieval`` (``language_head``, ``vision_head``,
  ``logit_scale``), ``BEiT3ForCaptioning`` (``mlm_head = Linear(D, vocab_size)``).
* ``beit3/utils.py``: ``save_model`` (``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` with
  ``args`` an ``argparse.Namespace``) and ``load_model_and_may_interpolate`` (``model_key``
  ``'model|module'``, the bicubic interpolation of ``beit3.encoder.embed_positions.A.weight``).

The pretraining file adds ``mlm_head`` and ``mim_head`` to the encoder. ``mim_head`` predicts the
8,192 visual tokens of the BEiT v2 tokenizer; with these two heads the replica at base and large
size has exactly the parameter counts the README states (checked below), which pins the layout.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from schane.config import ModelConfig
from schane.models import Beit3Backbone, build_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3


pytestmark = pytest.mark.usefixtures("one_thread")


# The fields of schane's "beit3_tiny" (schane.models.backbones.BEIT3_CONFIGS).
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
BASE = {"encoder_embed_dim": 768, "encoder_attention_heads": 12, "encoder_ffn_embed_dim": 3072, "encoder_layers": 12}
LARGE = {"encoder_embed_dim": 1024, "encoder_attention_heads": 16, "encoder_ffn_embed_dim": 4096, "encoder_layers": 24}
MIM_VOCAB = 8192  # BEiT v2 visual tokenizer codebook


def official_args(normalize_output: bool, size: dict | None = None, **over) -> EncoderConfig:
    """EncoderConfig as unilm beit3/modeling_utils.py ``_get_base_config`` builds it (tiny by default)."""
    kw = dict(size or TINY, **over)
    kw.setdefault("vocab_size", 64010)
    return EncoderConfig(
        multiway=True,
        layernorm_embedding=False,
        normalize_output=normalize_output,
        no_output_layer=True,
        drop_path_rate=0.0,
        checkpoint_activations=None,
        **kw,
    )


def _randomise(module: nn.Module) -> None:
    for p in module.parameters():  # non-trivial values everywhere (norms included)
        nn.init.normal_(p, std=0.05)


class PretrainingReplica(nn.Module):
    """The pretraining checkpoint's model: the encoder plus the masked language / image modelling heads."""

    def __init__(self, args: EncoderConfig, mim_vocab: int = 48) -> None:
        super().__init__()
        self.beit3 = BEiT3(args)
        self.mlm_head = nn.Linear(args.encoder_embed_dim, args.vocab_size)
        self.mim_head = nn.Linear(args.encoder_embed_dim, mim_vocab)


class ItcReplica(nn.Module):
    """unilm BEiT3ForRetrieval's attributes (the itc checkpoints' layout)."""

    def __init__(self, args: EncoderConfig) -> None:
        super().__init__()
        self.beit3 = BEiT3(args)
        d = args.encoder_embed_dim
        self.language_head = nn.Linear(d, d, bias=False)
        self.vision_head = nn.Linear(d, d, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))


class OfficialImageClassifier(nn.Module):
    """unilm BEiT3ForImageClassification (the in1k checkpoints' layout) and its forward."""

    def __init__(self, args: EncoderConfig, num_classes: int = 7) -> None:
        super().__init__()
        self.beit3 = BEiT3(args)
        self.fc_norm = nn.LayerNorm(args.encoder_embed_dim)
        self.head = nn.Linear(args.encoder_embed_dim, num_classes)

    def pooled(self, image: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=None, visual_tokens=image)["encoder_out"]
        return self.fc_norm(x[:, 1:, :].mean(1))


def training_args() -> argparse.Namespace:
    """A training-script namespace like the ``args`` entry utils.save_model stores."""
    return argparse.Namespace(
        model="beit3_base_patch16_224", input_size=224, drop_path=0.1, lr=1.5e-3, opt_betas=[0.9, 0.98],
        batch_size=64, epochs=150, output_dir="/mnt/output", resume="", checkpoint_activations=None,
        distributed=True,
    )  # fmt: skip


def write_pretraining_replica(path: Path, seed: int = 0, **over) -> dict[str, torch.Tensor]:
    """Write a tiny ``beit3_base_patch16_224.pth`` replica; returns its ``model`` state_dict.

    ``{'model': {beit3.* (vision and text embeddings, A and B experts, both position tables,
    output LayerNorm), mlm_head.*, mim_head.*}, 'epoch': ..., 'args': argparse.Namespace}``.
    """
    torch.manual_seed(seed)
    model = PretrainingReplica(official_args(normalize_output=True, **over))
    _randomise(model)
    sd = model.state_dict()
    torch.save({"model": sd, "epoch": 149, "args": training_args()}, path)
    return sd


def write_itc_replica(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny ``beit3_base_itc_patch16_224.pth`` replica (``{'model': BEiT3ForRetrieval state_dict}``)."""
    torch.manual_seed(seed)
    model = ItcReplica(official_args(normalize_output=True))
    _randomise(model)
    sd = model.state_dict()
    torch.save({"model": sd}, path)
    return sd


def write_in1k_replica(
    path: Path, seed: int = 0, vision_only: bool = False
) -> tuple[OfficialImageClassifier, dict[str, torch.Tensor]]:
    """A tiny ``beit3_base_patch16_224_in1k.pth`` replica; returns the model and the state_dict saved.

    ``vision_only`` keeps only the keys the image classifier uses (the README counts 87M
    parameters for these files, the vision path alone), else the full module state_dict.
    """
    torch.manual_seed(seed)
    model = OfficialImageClassifier(official_args(normalize_output=False)).eval()
    _randomise(model)
    sd = model.state_dict()
    if vision_only:
        sd = {k: v for k, v in sd.items() if not (k.startswith("beit3.text_embed.") or ".B." in k)}
    torch.save({"model": sd, "epoch": 49, "args": training_args()}, path)
    return model, sd


def _build(path: Path, **kwargs) -> nn.Module:
    return build_model(ModelConfig(backbone="beit3_tiny", pretrained=False, checkpoint=str(path), **kwargs), 3)


def _assert_vision_weights_are_the_files(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own = model.backbone.state_dict()
    assert set(own) <= set(sd) | {"fc_norm.weight", "fc_norm.bias"}, "backbone keys must use the official names"
    for k, v in own.items():
        if k in sd:
            assert torch.equal(v, sd[k]), k


# --------------------------------------------------------------------------- the three official layouts


def test_pretraining_file_loads_and_its_heads_are_reported_ignored(tmp_path):
    path = tmp_path / "beit3_base_patch16_224.pth"
    sd = write_pretraining_replica(path)
    # the layout: prefixed encoder, both branches, both position tables, both pretraining heads
    for key in ("beit3.text_embed.weight", "beit3.encoder.layers.0.ffn.B.fc1.weight", "mim_head.weight",
                "beit3.encoder.embed_positions.B.weight", "mlm_head.bias", "beit3.encoder.layer_norm.A.weight"):  # fmt: skip
        assert key in sd, key
    model = _build(path)
    rep = model.load_report
    assert rep.missing == [] and rep.unexpected == []
    _assert_vision_weights_are_the_files(model, sd)
    own = model.backbone.state_dict()
    assert rep.loaded == len(own) - 2  # everything but fc_norm, which the file lacks
    assert sorted(rep.fresh) == ["fc_norm.bias", "fc_norm.weight"]
    torch.testing.assert_close(model.backbone.fc_norm.weight, torch.ones(32))
    # every file key not loaded is reported ignored, with its reason
    assert set(rep.ignored) == set(sd) - set(own)
    reasons = rep.ignored_by_reason()
    assert reasons["pretraining head (masked image modelling)"] == ["mim_head.weight", "mim_head.bias"]
    assert reasons["pretraining head (masked language modelling)"] == ["mlm_head.weight", "mlm_head.bias"]
    assert reasons["text branch (token embedding)"] == ["beit3.text_embed.weight"]
    assert reasons["text branch (text position table)"] == ["beit3.encoder.embed_positions.B.weight"]
    assert all(".B." in k for k in reasons["text branch (language expert B of a multiway layer)"])


def test_pretraining_file_gives_the_official_classifiers_features(tmp_path):
    """Same pooled features as unilm's image classifier after its non-strict load of the same file."""
    path = tmp_path / "beit3_base_patch16_224.pth"
    sd = write_pretraining_replica(path, seed=3)
    official = OfficialImageClassifier(official_args(normalize_output=False)).eval()
    result = official.load_state_dict(sd, strict=False)  # what unilm utils.load_state_dict amounts to
    assert set(result.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    model = _build(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), official.pooled(x), rtol=1e-5, atol=1e-5)


def test_itc_file_loads(tmp_path):
    path = tmp_path / "beit3_base_itc_patch16_224.pth"
    sd = write_itc_replica(path)
    assert {"vision_head.weight", "language_head.weight", "logit_scale"} <= set(sd)
    model = _build(path)
    rep = model.load_report
    assert rep.missing == [] and rep.unexpected == []
    _assert_vision_weights_are_the_files(model, sd)
    assert sorted(rep.fresh) == ["fc_norm.bias", "fc_norm.weight"]
    itc = "image-text contrastive head (itc / retrieval)"
    assert sorted(rep.ignored_by_reason()[itc]) == ["language_head.weight", "logit_scale", "vision_head.weight"]
    assert set(rep.ignored) == set(sd) - set(model.backbone.state_dict())


@pytest.mark.parametrize("vision_only", [False, True], ids=["full-state-dict", "vision-only"])
def test_in1k_file_loads_with_its_fc_norm(tmp_path, vision_only):
    path = tmp_path / "beit3_base_patch16_224_in1k.pth"
    official, sd = write_in1k_replica(path, vision_only=vision_only)
    model = _build(path).eval()
    rep = model.load_report
    assert rep.missing == [] and rep.unexpected == [] and rep.fresh == {}
    _assert_vision_weights_are_the_files(model, sd)
    assert rep.loaded == len(model.backbone.state_dict())  # fc_norm included
    assert rep.ignored_reasons["head.weight"].startswith("task head of a fine-tuned model")
    assert set(rep.ignored) == set(sd) - set(model.backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), official.pooled(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "readme_millions"),
    [(BASE, 276), (LARGE, 746)],
    ids=["base", "large"],
)
def test_pretraining_replica_has_the_readme_parameter_count(size, readme_millions):
    """The replica's layout at full size has the README's parameter count (meta device: no memory)."""
    with torch.device("meta"):
        pre = PretrainingReplica(official_args(normalize_output=True, size=size, img_size=224, patch_size=16),
                                 mim_vocab=MIM_VOCAB)  # fmt: skip
        itc = ItcReplica(official_args(normalize_output=True, size=size, img_size=224, patch_size=16))
    n_pre = sum(p.numel() for p in pre.parameters()) / 1e6
    n_itc = sum(p.numel() for p in itc.parameters()) / 1e6
    assert readme_millions <= n_pre < readme_millions + 1, n_pre
    assert {276: 222, 746: 674}[readme_millions] <= n_itc < {276: 223, 746: 675}[readme_millions], n_itc
    pos = pre.state_dict()
    assert pos["beit3.encoder.embed_positions.A.weight"].shape[0] == 14 * 14 + 1 + 2  # [199, D]
    assert pos["beit3.encoder.embed_positions.B.weight"].shape[0] == 1024


# --------------------------------------------------------------------------- position table, mismatches


def _official_interpolation(pos: torch.Tensor, new_side: int) -> torch.Tensor:
    """unilm beit3/utils.py load_model_and_may_interpolate for the torchscale table, step by step."""
    num_extra_tokens = 3  # CLS + fairseq's 2 padding offsets
    extra = pos[:num_extra_tokens].unsqueeze(0)
    tokens = pos[num_extra_tokens:]
    orig = int((pos.shape[-2] - num_extra_tokens) ** 0.5)
    tokens = tokens.reshape(-1, orig, orig, pos.shape[-1]).permute(0, 3, 1, 2)
    tokens = nn.functional.interpolate(tokens, size=(new_side, new_side), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, tokens), dim=1).squeeze(0)


def test_position_embedding_is_interpolated_as_the_release_does(tmp_path):
    path = tmp_path / "beit3_base_patch16_224.pth"
    sd = write_pretraining_replica(path, seed=2)
    model = _build(path, backbone_kwargs={"img_size": 48})
    pos = model.backbone.beit3.encoder.embed_positions.A.weight
    src = sd["beit3.encoder.embed_positions.A.weight"]
    assert src.shape == (3 + 16, 32) and pos.shape == (3 + 36, 32)
    torch.testing.assert_close(pos, _official_interpolation(src, 6), rtol=0, atol=0)
    assert model.load_report.interpolated == {"beit3.encoder.embed_positions.A.weight": ((19, 32), (39, 32))}
    assert model.data_config["input_size"] == (3, 48, 48)
    assert model(torch.randn(1, 3, 48, 48)).logits.shape == (1, 3)


def test_mismatched_checkpoints_raise(tmp_path):
    p1 = tmp_path / "wide.pth"
    write_pretraining_replica(p1, encoder_ffn_embed_dim=128)
    with pytest.raises(ValueError, match="shape mismatch"):
        _build(p1)
    p2 = tmp_path / "deep.pth"
    write_pretraining_replica(p2, encoder_layers=3)
    with pytest.raises(ValueError, match=r"unexpected keys \[beit3\.encoder\.layers\.2\."):
        _build(p2)


def test_unprefixed_keys_are_mapped(tmp_path):
    """A state_dict saved from the bare torchscale BEiT3 (no ``beit3.`` prefix) loads the same."""
    torch.manual_seed(4)
    encoder = BEiT3(official_args(normalize_output=True))
    _randomise(encoder)
    path = tmp_path / "bare.pth"
    torch.save(encoder.state_dict(), path)
    model = _build(path)
    assert model.load_report.missing == [] and model.load_report.unexpected == []
    _assert_vision_weights_are_the_files(model, {f"beit3.{k}": v for k, v in encoder.state_dict().items()})


# --------------------------------------------------------------------------- the module itself


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


def test_default_preprocessing_is_the_official_imagenet_fine_tuning():
    """unilm beit3/datasets.py build_imagenet_transform: ImageNet mean/std, crop_pct 1.0 (the
    --crop_pct default None becomes 1.0), bicubic resize (interpolation=3)."""
    dc = build_model(ModelConfig(backbone="beit3_tiny", pretrained=False), num_classes=2).data_config
    assert dc["mean"] == (0.485, 0.456, 0.406) and dc["std"] == (0.229, 0.224, 0.225)
    assert dc["crop_pct"] == 1.0 and dc["interpolation"] == "bicubic"


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
    assert 85e6 < n_params < 88e6  # the vision path of BEiT-3 base (~86M; the README's in1k models: 87M)
