"""The SCHaNe model: a backbone, a linear classifier and an L2-normalised projection head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import nn

from .backbones import create_backbone, pooled_features
from .heads import ProjectionHead, linear_classifier
from .weights import LoadReport

if TYPE_CHECKING:
    from schane.config import ModelConfig

_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class ModelOutput(NamedTuple):
    """What :class:`SCHaNeModel` returns.

    Attributes:
        logits: classifier scores ``[B, C]``.
        features: pooled backbone features ``[B, d]`` (few-shot evaluation, analysis).
        projections: unit-norm contrastive embeddings ``[B, proj_dim]``.
    """

    logits: torch.Tensor
    features: torch.Tensor
    projections: torch.Tensor


def resolve_data_config(backbone: nn.Module) -> dict[str, Any]:
    """Preprocessing the backbone's pretrained weights expect (timm's ``resolve_model_data_config``).

    Returns:
        ``{"input_size": (3, H, W), "interpolation", "mean", "std", "crop_pct", "crop_mode"}``.
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(backbone)
    out = {k: cfg[k] for k in _DATA_CONFIG_KEYS if k in cfg}
    out["mean"] = tuple(float(v) for v in out["mean"])
    out["std"] = tuple(float(v) for v in out["std"])
    out["input_size"] = tuple(int(v) for v in out["input_size"])
    out.setdefault("crop_pct", 0.875)
    return out


class SCHaNeModel(nn.Module):
    """Backbone → pooled feature → (linear classifier, projection head).

    Args:
        backbone: timm-style module with ``forward_features``, ``forward_head(pre_logits=True)``
            and ``num_features``.
        num_classes: classifier outputs ``C``.
        proj_dim: projection size (128 in the paper).
        load_report: how the backbone's weights were loaded (kept for logging).

    Raises:
        ValueError: when the backbone lacks ``num_features`` or a size is not positive.

    Examples:
        >>> from schane.config import ModelConfig
        >>> model = build_model(ModelConfig(backbone="resnet18", pretrained=False), num_classes=5)  # doctest: +SKIP
        >>> out = model(torch.randn(2, 3, 64, 64))  # doctest: +SKIP
        >>> out.logits.shape, out.features.shape, out.projections.shape  # doctest: +SKIP
        (torch.Size([2, 5]), torch.Size([2, 512]), torch.Size([2, 128]))
    """

    class_names: list[str] | None  # set when rebuilt from a checkpoint (load_checkpoint_model)

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        proj_dim: int = 128,
        *,
        load_report: LoadReport | None = None,
    ) -> None:
        super().__init__()
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(
                "backbone must expose a positive integer attribute num_features (timm models do)"
            )
        self.backbone = backbone
        self.num_features = num_features
        self.num_classes = num_classes
        self.proj_dim = proj_dim
        self.classifier = linear_classifier(num_features, num_classes)
        self.projector = ProjectionHead(num_features, proj_dim)
        self.data_config: dict[str, Any] = resolve_data_config(backbone)
        self.load_report = load_report

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features.

        Args:
            x: images ``[B, 3, H, W]``.

        Returns:
            ``[B, num_features]``.

        Raises:
            ValueError: when ``x`` is not a 4-D image batch.
        """
        if x.ndim != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        return pooled_features(self.backbone, x)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Logits, pooled features and unit-norm projections.

        Args:
            x: images ``[B, 3, H, W]``.

        Returns:
            :class:`ModelOutput` with ``logits [B, C]``, ``features [B, d]``, ``projections [B, proj_dim]``.

        Raises:
            ValueError: when ``x`` is not a 4-D image batch.
        """
        features = self.forward_features(x)
        return ModelOutput(self.classifier(features), features, self.projector(features))


def build_model(model_cfg: ModelConfig, num_classes: int, *, strict: bool = True) -> SCHaNeModel:
    """Create the backbone named by ``model_cfg``, load its weights and add the two heads.

    Args:
        model_cfg: :class:`schane.config.ModelConfig`.
        num_classes: classifier outputs.
        strict: raise on missing/unexpected backbone keys when loading ``model_cfg.checkpoint``.

    Returns:
        A :class:`SCHaNeModel` on the CPU.

    Raises:
        ValueError: for an invalid ``num_classes``/``proj_dim``, an unknown backbone, a checkpoint that
            does not fit the backbone, or ``grad_checkpointing`` on a backbone without it.
        FileNotFoundError: when ``model_cfg.checkpoint`` does not exist.
        PretrainedWeightsUnavailable: when hub weights can be neither found nor downloaded.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(model_cfg.proj_dim, int) or model_cfg.proj_dim <= 0:
        raise ValueError(f"model.proj_dim must be a positive integer, got {model_cfg.proj_dim!r}")
    backbone, report = create_backbone(
        model_cfg.backbone,
        pretrained=model_cfg.pretrained,
        checkpoint=model_cfg.checkpoint,
        drop_path=model_cfg.drop_path,
        drop_rate=model_cfg.drop_rate,
        strict=strict,
        **dict(model_cfg.backbone_kwargs or {}),
    )
    if getattr(model_cfg, "grad_checkpointing", False):
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise ValueError(f"model.grad_checkpointing: backbone {model_cfg.backbone!r} does not support activation "
                             "checkpointing (timm transformers and BEiT-3 do); set model.grad_checkpointing=false")
        try:
            cast(Any, backbone).set_grad_checkpointing(True)  # a timm-style method nn.Module lacks
        except (AssertionError, NotImplementedError) as e:
            raise ValueError(f"model.grad_checkpointing: backbone {model_cfg.backbone!r} does not support activation "
                             f"checkpointing ({e or 'not implemented'}); set model.grad_checkpointing=false") from None
    return SCHaNeModel(backbone, num_classes, model_cfg.proj_dim, load_report=report)
