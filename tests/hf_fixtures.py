"""Tiny 🤗 transformers image classifiers written with transformers' own writers (``save_pretrained`` of a model
built from its config class, random init, and of its image processor): the folders users hand to
``model.backbone=hf:DIR``. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

IMG = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def write_tiny_vit(path: Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer ViT (hidden 32, patch 8, 32 px) with a ViTImageProcessor (squash resize to 32 px)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=IMG, patch_size=8, num_labels=num_labels, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": IMG, "width": IMG}, image_mean=list(MEAN), image_std=list(STD)).save_pretrained(path)
    return path


def write_tiny_convnext(path: Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-stage ConvNeXt (widths 8, 16) with a ConvNextImageProcessor (short side 32 / crop_pct 0.875, crop)."""
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 2],
                         image_size=IMG, num_labels=num_labels)
    ConvNextForImageClassification(cfg).save_pretrained(path)
    ConvNextImageProcessor(size={"shortest_edge": IMG}, crop_pct=0.875).save_pretrained(path)
    return path


def write_tiny_dinov2_base(path: Path, seed: int = 0) -> Path:
    """A base ``Dinov2Model`` (no classifier: the way DINOv2 checkpoints ship) with a BitImageProcessor."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=IMG,
                       patch_size=8)
    Dinov2Model(cfg).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": IMG, "width": IMG}, do_center_crop=True,
                      image_mean=list(MEAN), image_std=list(STD)).save_pretrained(path)
    return path
