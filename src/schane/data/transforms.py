"""Image transforms: two-view training augmentation, evaluation and few-shot support augmentation.

``mean``/``std``/``img_size``/``crop_pct`` normally come from the backbone's pretrained config
(``SCHaNeModel.data_config``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import transforms as T

from ..config import AugConfig


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
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875
) -> T.Compose:
    """Resize the short side to ``img_size / crop_pct``, centre-crop ``img_size``, normalise.

    Raises:
        ValueError: On a bad size, mean/std or ``crop_pct`` outside (0, 1].
    """
    _check(img_size, mean, std)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = int(math.floor(img_size / crop_pct))
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(list(mean), list(std)),
        ]
    )


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
