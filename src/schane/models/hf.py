"""Backbones from 🤗 transformers: ``model.backbone: hf:PATH_OR_ID``.

``PATH_OR_ID`` is a folder written by ``save_pretrained`` or a Hub id already in the local Hugging Face cache
(nothing is downloaded: ``local_files_only=True``). The model is loaded with
``AutoModelForImageClassification`` (a base checkpoint such as a ``ViTModel`` or ``Dinov2Model`` folder loads
too: transformers adds a fresh classifier), and its classifier's last ``Linear`` is replaced with
``nn.Identity``, so the model's ``logits`` are exactly the feature its own classifier reads: the pooled feature
(ViT/DeiT: the final-LayerNorm CLS token; BEiT: LayerNorm of the mean patch token; DINOv2: CLS concatenated with
the mean patch token; ConvNeXt/Swin/ResNet: the pooled map). That is the embedding schane trains on, and putting
a ``Linear`` back gives a model ``transformers`` loads by itself (:func:`save_hf_classifier`).

Preprocessing comes from the image processor saved next to the model (``preprocessor_config.json``): its
``image_mean``, ``image_std``, size and ``crop_pct`` (or ``crop_size`` / resize size); without one, the
config's ``image_size`` and the ImageNet statistics, with a warning.

Layer-wise lr decay (:func:`schane.engine.optim.layer_ids`) uses :meth:`HFBackbone.group_matcher`, which groups
the parameters the way timm's ViTs do: ``stem`` (the embeddings) first, then one layer per encoder block
(``layers.N``, ``encoder.layer.N``; ``encoder.stages.N.layers.M`` / ``encoder.layers.N.blocks.M`` for the hierarchical
families), the final LayerNorm with the last block, and the rest (poolers) with the heads.

Examples:
    >>> backbone = HFBackbone("hf:/path/to/vit_saved_with_save_pretrained")  # doctest: +SKIP
    >>> backbone(torch.randn(2, 3, 224, 224)).shape  # doctest: +SKIP
    torch.Size([2, 768])
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
HF_EXTRA = "pip install 'schane[hf]'"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers' image processors store the resampling filter as a PIL code.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}


def is_hf(name: str) -> bool:
    """Whether a ``model.backbone`` value selects a transformers model (``hf:PATH_OR_ID``)."""
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def hf_source(name: str) -> str:
    """The path or Hub id after ``hf:``.

    Raises:
        ValueError: when nothing follows ``hf:``.
    """
    src = name[len(HF_PREFIX):] if is_hf(name) else name
    if not src.strip():
        raise ValueError("model.backbone=hf: needs a folder written by save_pretrained or a Hub id, e.g. "
                         "hf:./my_vit or hf:google/vit-base-patch16-224")
    return os.path.expanduser(src.strip())


def require_transformers() -> Any:
    """Import transformers, or raise a one-line error naming the pip command.

    Raises:
        ValueError: when transformers is not installed.
    """
    try:
        import transformers
    except ImportError:
        raise ValueError(f"transformers backbones (model.backbone=hf:...) need transformers: {HF_EXTRA}") from None
    return transformers


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars (loading/writing weights) only when stderr is a terminal."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_error(source: str, what: str, err: Exception) -> Exception:
    if Path(source).exists():
        if not Path(source).is_dir():
            return ValueError(f"hf:{source} is a file; pass the folder written by save_pretrained")
        return ValueError(f"hf:{source}: cannot load a transformers {what} from this folder "
                          f"({str(err).splitlines()[0]}); pass a folder written by save_pretrained")
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source and source.count("/") > 1
    if looks_like_path:
        return FileNotFoundError(f"hf:{source}: no such folder; pass a folder written by save_pretrained")
    return FileNotFoundError(
        f"hf:{source}: not a local folder and not in the local Hugging Face cache (schane never downloads); "
        f"fetch it once with `hf download {source}` (or save_pretrained it to a folder) and retry")


def _classifier_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """``(parent module, attribute name, Linear)`` of the last Linear of ``model.classifier``.

    Raises:
        ValueError: when the model has no classifier made of one Linear and parameter-free modules.
    """
    clf = getattr(model, "classifier", None)
    if isinstance(clf, nn.Linear):
        return model, "classifier", clf
    if isinstance(clf, nn.Module):
        linears = [(n, m) for n, m in clf.named_modules() if isinstance(m, nn.Linear)]
        others = [n for n, m in clf.named_modules()
                  if m is not clf and not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))]
        if len(linears) == 1 and not others:
            name, lin = linears[0]
            parent_name, _, attr = name.rpartition(".")
            return (clf.get_submodule(parent_name) if parent_name else clf), attr, lin
    raise ValueError(f"{type(model).__name__}: schane needs an image classifier whose `classifier` is one Linear "
                     "layer on the pooled feature (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt, ResNet, ...); "
                     f"got {type(clf).__name__}")


def _preprocessing(source: str, config: Any) -> dict[str, Any]:
    """timm-style ``pretrained_cfg`` fields from the saved image processor (or the config)."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        px = int(getattr(config, "image_size", 224) or 224)
        logger.warning("hf:%s has no image processor (%s): using %d px and the ImageNet mean/std",
                       source, str(e).splitlines()[0][:120], px)
        return {"input_size": (3, px, px), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 1.0,
                "interpolation": "bicubic"}
    size: dict[str, int] = dict(getattr(proc, "size", None) or {})
    crop: dict[str, int] = dict(getattr(proc, "crop_size", None) or {}) if getattr(proc, "do_center_crop", False) else {}
    if crop:
        crop_side = crop.get("height") or crop.get("shortest_edge")
        assert crop_side is not None  # transformers' crop_size has a height or a shortest_edge
        side = int(crop_side)
        resize = size.get("shortest_edge") or size.get("height")
        crop_pct = min(1.0, side / float(resize)) if resize else 1.0
    elif "height" in size:
        side, crop_pct = int(size["height"]), 1.0
    else:
        config_side = getattr(config, "image_size", 224)
        side = int(size.get("shortest_edge") or config_side)
        crop_pct = float(getattr(proc, "crop_pct", None) or 1.0)  # ConvNeXt: resize side / crop_pct, centre crop
    mean = tuple(float(v) for v in (getattr(proc, "image_mean", None) or IMAGENET_MEAN))
    std = tuple(float(v) for v in (getattr(proc, "image_std", None) or IMAGENET_STD))
    resample = getattr(proc, "resample", 3)
    interp = _PIL_RESAMPLE.get(int(getattr(resample, "value", resample) or 3), "bicubic")
    return {"input_size": (3, side, side), "mean": mean, "std": std, "crop_pct": crop_pct, "interpolation": interp}


class HFBackbone(nn.Module):
    """A transformers image classifier without its last Linear: images ``[B, 3, H, W]`` → pooled ``[B, d]``.

    Follows schane's backbone interface (``forward_features``, ``forward_head(pre_logits=True)``,
    ``num_features``, ``pretrained_cfg``, ``group_matcher``). The transformers model is ``self.model``; the
    removed Linear's place is remembered so that :func:`save_hf_classifier` can put a classifier back.

    Args:
        name: ``"hf:PATH_OR_ID"`` (or the bare path/id).
        pretrained: load the folder's weights; ``False`` builds the architecture from its config with random
            weights (what a checkpoint is loaded into).
        drop_path: stochastic depth (``drop_path_rate`` in the config, when the family has one).
        drop_rate: dropout on the pooled feature.
        **config_overrides: fields of the model's transformers config (e.g. ``layer_norm_eps``).

    Raises:
        ValueError: without transformers, for a folder that holds no transformers model, an unknown config field,
            or a model whose classifier is not one Linear layer.
        FileNotFoundError: for a missing folder, or a Hub id absent from the local cache.
    """

    def __init__(self, name: str, *, pretrained: bool = True, drop_path: float = 0.0, drop_rate: float = 0.0, **config_overrides: Any):
        super().__init__()
        require_transformers()
        from transformers import AutoConfig, AutoModelForImageClassification

        source = hf_source(name)
        self.source = source
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as e:
            raise _load_error(source, "config", e) from None
        for key, value in config_overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"model.backbone_kwargs: {key!r} is not a field of {type(config).__name__}")
            setattr(config, key, value)
        if drop_path:
            if not hasattr(config, "drop_path_rate"):
                raise ValueError(f"model.drop_path: {type(config).__name__} has no drop_path_rate; set model.drop_path=0")
            config.drop_path_rate = float(drop_path)
        try:
            with quiet_progress():
                model = (AutoModelForImageClassification.from_pretrained(source, config=config, local_files_only=True)
                         if pretrained else AutoModelForImageClassification.from_config(config))
        except (OSError, ValueError) as e:
            raise _load_error(source, "image classifier", e) from None
        parent, attr, linear = _classifier_linear(model)
        self.classifier_path = f"classifier.{attr}" if parent is not model else "classifier"
        setattr(parent, attr, nn.Identity())
        self.model = model
        self.num_features = int(linear.in_features)
        self.head_drop = nn.Dropout(drop_rate)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        pre = _preprocessing(source, model.config)
        self.pretrained_cfg: dict[str, Any] = {
            "architecture": model.config.model_type, **pre, "crop_mode": "center", "num_classes": 0,
        }
        self.default_cfg = self.pretrained_cfg
        self.num_classes = 0

    @property
    def base_prefix(self) -> str:
        """Parameter-name prefix of the transformers base model inside ``self``, e.g. ``"model.vit."``."""
        return f"model.{self.model.base_model_prefix}."

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature (transformers pools inside the model).

        Args:
            x: images ``[B, 3, H, W]``.

        Returns:
            ``[B, num_features]``.
        """
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.model(pixel_values=x, **kwargs).logits

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Dropout (``drop_rate``) on the pooled feature ``[B, num_features]`` of :meth:`forward_features`."""
        return self.head_drop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style layer groups (as timm's ViTs): stem = the embeddings, one layer per block, the final
        LayerNorm with the last block; anything else (poolers) goes with the heads."""
        p = r"^model\.[^.]+\."
        return {
            "stem": p + r"(?:embeddings|embedder)\.",
            "blocks": [
                (p + r"encoder\.(?:stages|layers)\.(\d+)\.(?:layers|blocks)\.(\d+)\.", None),
                (p + r"encoder\.(?:stages|layers)\.(\d+)\.downsampling_layer\.", (0,)),  # ConvNeXt: stage start
                (p + r"encoder\.(?:stages|layers)\.(\d+)\.", (99999,)),  # Swin's downsample: stage end
                (p + r"(?:encoder\.)?layers?\.(\d+)\.", None),  # ViT family (transformers < 5: encoder.layer.N)
                (p + r"(?:layernorm|layer_norm|norm)\.", (99999,)),
            ],
        }

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n.rsplit(".", 1)[-1] in ("cls_token", "mask_token", "position_embeddings", "register_tokens")}


def save_hf_classifier(backbone: HFBackbone, classifier: nn.Linear, out_dir: str | Path,
                       class_names: list[str] | None) -> nn.Module:
    """Write the backbone with ``classifier`` as its transformers classifier, with ``save_pretrained``.

    The saved folder loads with ``AutoModelForImageClassification.from_pretrained(out_dir)`` alone and gives
    ``classifier(backbone(x))`` as its logits. ``id2label``/``label2id`` hold the class names (``LABEL_i`` when
    there are none); the image processor of the source folder is saved along when it has one.

    Args:
        backbone: the trained :class:`HFBackbone`.
        classifier: ``Linear(num_features, C)``.
        out_dir: the folder to write.
        class_names: ``C`` names in label order, or ``None``.

    Returns:
        The transformers model that was saved (on the CPU, in eval mode).

    Raises:
        ValueError: when the classifier does not fit the backbone or the names do not fit the classifier.
    """
    import copy

    from transformers import AutoImageProcessor

    if classifier.in_features != backbone.num_features:
        raise ValueError(f"classifier reads {classifier.in_features} features, the backbone gives {backbone.num_features}")
    c = classifier.out_features
    names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for a classifier of {c} classes")
    model = copy.deepcopy(backbone.model).cpu().eval()
    head = nn.Linear(classifier.in_features, c)
    head.load_state_dict({k: v.detach().cpu() for k, v in classifier.state_dict().items()})
    parent = model if backbone.classifier_path == "classifier" else model.get_submodule("classifier")
    setattr(parent, backbone.classifier_path.rpartition(".")[2], head)
    model.config.num_labels = c
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    model.num_labels = c
    with quiet_progress():
        model.save_pretrained(str(out_dir))
    try:
        AutoImageProcessor.from_pretrained(backbone.source, local_files_only=True).save_pretrained(str(out_dir))
    except (OSError, ValueError, KeyError):
        logger.warning("hf:%s has no image processor: none saved with the export", backbone.source)
    return model


__all__ = ["HFBackbone", "HF_PREFIX", "hf_source", "is_hf", "require_transformers", "save_hf_classifier"]
