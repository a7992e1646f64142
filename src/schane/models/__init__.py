"""Models: backbones (timm, bundled EfficientNet-Lite0, BEiT-3), heads and the SCHaNe model."""

from .backbones import BEIT3_CONFIGS, Beit3Backbone, create_backbone, is_beit3, pooled_features
from .heads import ProjectionHead, linear_classifier
from .inspection import WeightsReport, inspect_weights
from .model import ModelOutput, SCHaNeModel, build_model, resolve_data_config
from .weights import (
    EFFNET_LITE0_OFFLINE,
    LoadReport,
    PretrainedWeightsUnavailable,
    create_effnet_lite0_offline,
    effnet_lite0_state_dict,
    load_backbone_weights,
    load_state_dict_file,
    plan_backbone_load,
)

__all__ = [
    "BEIT3_CONFIGS",
    "Beit3Backbone",
    "EFFNET_LITE0_OFFLINE",
    "LoadReport",
    "ModelOutput",
    "PretrainedWeightsUnavailable",
    "ProjectionHead",
    "SCHaNeModel",
    "WeightsReport",
    "build_model",
    "create_backbone",
    "create_effnet_lite0_offline",
    "effnet_lite0_state_dict",
    "inspect_weights",
    "is_beit3",
    "linear_classifier",
    "load_backbone_weights",
    "load_state_dict_file",
    "plan_backbone_load",
    "pooled_features",
    "resolve_data_config",
]
