"""Image transforms: two-view training augmentation, evaluation and few-shot support augmentation.

What normalisation and evaluation resize a run uses is decided in one place,
:func:`resolve_preprocessing`: the ``data.mean`` / ``data.std`` / ``data.crop_pct`` /
``data.eval_resize`` config values where set, else the backbone's pretrained config
(``SCHaNeModel.data_config``: timm's for timm models; for BEiT-3 the official ImageNet
fine-tuning values, ImageNet mean/std and crop_pct 1.0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torchvision import transforms as T

from ..config import AugConfig

if TYPE_CHECKING:
    from ..config import DataConfig

EVAL_RESIZES = ("crop", "squash")
_INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class Preprocessing:
    """The normalisation and evaluation resize of a run.

    Attributes:
        mean: per-channel mean (RGB, 3 values).
        std: per-channel std (RGB, 3 values).
        crop_pct: evaluation crop fraction (``"crop"`` resize only).
        interpolation: resampling filter of every resize: ``"bicubic"`` (schane uses it for all
            backbones, as the BEiT-3 release does).
        eval_resize: ``"crop"``: resize the short side to ``img_size / crop_pct``, then centre-crop
            ``img_size``; ``"squash"``: resize straight to ``img_size x img_size`` (aspect ratio not kept).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str = "bicubic"
    eval_resize: str = "crop"

    def eval_transform(self, img_size: int) -> T.Compose:
        """:func:`eval_transform` with these settings."""
        return eval_transform(
            img_size, self.mean, self.std, self.crop_pct, resize=self.eval_resize, interpolation=self.interpolation
        )

    def train_transform(self, img_size: int, aug_cfg: AugConfig | None = None) -> T.Compose:
        """:func:`train_transform` with this mean/std."""
        return train_transform(img_size, self.mean, self.std, aug_cfg)

    def support_transform(self, img_size: int) -> T.Compose:
        """:func:`support_transform` with this mean/std."""
        return support_transform(img_size, self.mean, self.std)


def _triple(value: Sequence[float], key: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in value)
    if len(vals) != 3:
        raise ValueError(f"{key} needs 3 values (R, G, B), got {list(value)}")
    return vals


def resolve_preprocessing(data_cfg: DataConfig, model_data_config: Mapping[str, Any]) -> Preprocessing:
    """The preprocessing of a run: the config's values where set, else the backbone's.

    Args:
        data_cfg: :class:`schane.config.DataConfig` (``mean``, ``std``, ``crop_pct``, ``eval_resize``;
            ``None`` means "the backbone's").
        model_data_config: ``SCHaNeModel.data_config`` (``mean``, ``std``, ``crop_pct``).

    Returns:
        A :class:`Preprocessing`. With every ``data`` field at its default it reproduces the
        transforms schane has always built from ``model.data_config`` (crop_pct 0.875 when the
        backbone gives none).

    Raises:
        ValueError: for a mean/std without 3 values, a std <= 0, a crop_pct outside (0, 1] or an
            unknown eval_resize, naming the key.

    Examples:
        >>> from schane.config import DataConfig
        >>> pre = resolve_preprocessing(DataConfig(eval_resize="squash"), {"mean": (0.5,) * 3, "std": (0.5,) * 3})
        >>> pre.mean, pre.crop_pct, pre.eval_resize
        ((0.5, 0.5, 0.5), 0.875, 'squash')
    """
    mean = _triple(data_cfg.mean if data_cfg.mean is not None else model_data_config["mean"], "data.mean")
    std = _triple(data_cfg.std if data_cfg.std is not None else model_data_config["std"], "data.std")
    if any(s <= 0 for s in std):
        raise ValueError(f"data.std values must be > 0, got {list(std)}")
    crop_pct = data_cfg.crop_pct if data_cfg.crop_pct is not None else model_data_config.get("crop_pct")
    crop_pct = float(crop_pct or DEFAULT_CROP_PCT)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct}")
    if data_cfg.eval_resize not in EVAL_RESIZES:
        raise ValueError(f"data.eval_resize must be one of {', '.join(EVAL_RESIZES)}, got {data_cfg.eval_resize!r}")
    return Preprocessing(mean, std, crop_pct, "bicubic", data_cfg.eval_resize)


def _check(img_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if int(img_size) < 1:
        raise ValueError(f"img_size must be a positive number of pixels, got {img_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be > 0, got {list(std)}")


def train_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], aug_cfg: AugConfig | None = None
) -> T.Compose:
    """One training view, following the authors' release.

    RandomResizedCrop(scale=(aug.scale_min, 1)) -> horizontal flip (p=aug.hflip) ->
    ColorJitter(aug.color_jitter x3, aug.hue) with p=aug.color_jitter_p -> grayscale (p=aug.grayscale_p)
    -> tensor -> normalise.

    Args:
        img_size: Output side in pixels.
        mean: Per-channel mean (3 values).
        std: Per-channel std (3 values).
        aug_cfg: Augmentation settings (defaults: :class:`schane.config.AugConfig`).

    Returns:
        A transform mapping a PIL image to a float tensor ``[3, img_size, img_size]``.

    Raises:
        ValueError: On a bad size, mean/std, or probabilities outside [0, 1].
    """
    _check(img_size, mean, std)
    aug = aug_cfg or AugConfig()
    if not 0 < aug.scale_min <= 1:
        raise ValueError(f"aug.scale_min must be in (0, 1], got {aug.scale_min}")
    for k in ("hflip", "color_jitter_p", "grayscale_p"):
        if not 0 <= getattr(aug, k) <= 1:
            raise ValueError(f"aug.{k} is a probability in [0, 1], got {getattr(aug, k)}")
    cj = aug.color_jitter
    return T.Compose(
        [
            T.RandomResizedCrop(
                img_size, scale=(aug.scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(aug.hflip),
            T.RandomApply([T.ColorJitter(cj, cj, cj, aug.hue)], p=aug.color_jitter_p),
            T.RandomGrayscale(aug.grayscale_p),
            T.ToTensor(),
            T.Normalize(list(mean), list(std)),
        ]
    )


class TwoViews:
    """Apply a random transform twice to the same image: ``img -> (view1, view2)``.

    Args:
        transform: A random transform returning tensors.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(img), self.transform(img)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


def eval_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = DEFAULT_CROP_PCT,
    *,
    resize: str = "crop",
    interpolation: str = "bicubic",
) -> T.Compose:
    """Deterministic evaluation transform: resize, (crop,) tensor, normalise.

    ``resize="crop"``: resize the short side to ``floor(img_size / crop_pct)``, centre-crop
    ``img_size`` (timm's and BEiT-3's evaluation). ``resize="squash"``: resize straight to
    ``img_size x img_size`` (the SCHaNe release's evaluation; ``crop_pct`` unused).

    Args:
        img_size: Output side in pixels.
        mean: Per-channel mean (3 values).
        std: Per-channel std (3 values).
        crop_pct: Crop fraction in (0, 1].
        resize: ``"crop"`` or ``"squash"``.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.

    Returns:
        A transform mapping a PIL image to a float tensor ``[3, img_size, img_size]``.

    Raises:
        ValueError: On a bad size, mean/std, ``crop_pct`` outside (0, 1], or an unknown ``resize`` /
            ``interpolation``.
    """
    _check(img_size, mean, std)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if resize not in EVAL_RESIZES:
        raise ValueError(f"resize must be one of {', '.join(EVAL_RESIZES)}, got {resize!r}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {interpolation!r}")
    mode = _INTERPOLATIONS[interpolation]
    if resize == "squash":
        steps: list[Any] = [T.Resize((img_size, img_size), interpolation=mode)]
    else:
        steps = [T.Resize(int(math.floor(img_size / crop_pct)), interpolation=mode), T.CenterCrop(img_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(list(mean), list(std))])


def support_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Mild augmentation for few-shot support images (the release augments each support image 5x).

    RandomResizedCrop(scale=(0.6, 1)) -> horizontal flip -> light ColorJitter(0.2, 0.2, 0.2) -> normalise.

    Raises:
        ValueError: On a bad size or mean/std.
    """
    _check(img_size, mean, std)
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=(0.6, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.2, 0.2, 0.2),
            T.ToTensor(),
            T.Normalize(list(mean), list(std)),
        ]
    )
