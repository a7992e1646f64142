"""What every export format writes alike: the file names, the result, safetensors files, the heads' tensors
and the preprocessing (:mod:`schane.pipelines.export` for timm and BEiT-3, :mod:`schane.pipelines.export_hf`
for transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schane.config import Config
from schane.models.model import SCHaNeModel
from schane.pipelines.splits import preprocessing_for

MODEL_FILE = "model.safetensors"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote.

    Attributes:
        out_dir: the export folder.
        files: the files written, in order.
        kind: ``"timm"``, ``"beit3"`` or ``"hf"`` (transformers, :mod:`schane.pipelines.export_hf`).
        weights: ``"ema"`` or ``"model"``: which of the checkpoint's weights were exported.
        num_classes: the classifier's width.
        class_names: the classes in label order, or ``None`` when the checkpoint stores none.
        classifier_key: where the classifier is in ``model.safetensors`` (``None``: not there).
        max_abs_diff: the largest difference between the reloaded export's outputs and schane's.
        snippet: Python code that loads the export.
    """

    out_dir: Path
    files: list[Path]
    kind: str
    weights: str
    num_classes: int
    class_names: list[str] | None
    classifier_key: str | None
    max_abs_diff: float
    snippet: str


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
    return path


def heads_tensors(model: SCHaNeModel) -> dict[str, torch.Tensor]:
    return {**{f"classifier.{k}": v for k, v in model.classifier.state_dict().items()},
            **{f"projector.{k}": v for k, v in model.projector.state_dict().items()}}


def export_preprocessing(cfg: Config, model: SCHaNeModel) -> dict[str, Any]:
    pre = preprocessing_for(cfg, model)
    s = int(cfg.data.img_size)
    return {"input_size": [3, s, s], "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct, "eval_resize": pre.eval_resize}


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "HEADS_FILE",
    "MODEL_FILE",
    "ExportResult",
    "export_preprocessing",
    "heads_tensors",
    "save_safetensors",
]
