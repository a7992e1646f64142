"""Two augmented views per image, batched the way schane's losses expect them (no optional dependency).

:class:`TwoViewTransform` draws the augmentation twice (two different views, not the same view twice), and
:class:`TwoViewCollator` lays a batch of ``B`` examples out as ``pixel_values [2B, C, H, W]`` =
``[first views of all B; second views of all B]`` with ``labels [2B]`` = ``[y; y]``, so row ``i`` and row
``i + B`` are the two views of example ``i``. Single-view examples (evaluation) are stacked as they are.

Examples:
    >>> import torch
    >>> views = TwoViewTransform(lambda img: img + torch.randn(()))  # any augmentation: image -> tensor
    >>> batch = TwoViewCollator()([{"pixel_values": views(torch.zeros(3, 4, 4)), "label": 1}] * 2)
    >>> batch["pixel_values"].shape, batch["labels"].tolist()
    (torch.Size([4, 3, 4, 4]), [1, 1, 1, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


class TwoViewTransform:
    """Apply ``transform`` twice to one image.

    Args:
        transform: an augmentation returning a tensor ``[C, H, W]`` (e.g. torchvision's ``RandomResizedCrop`` +
            ``ToTensor`` + ``Normalize``); it must be random, or both views are equal.

    Raises:
        ValueError: when ``transform`` is not callable.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        if not callable(transform):
            raise ValueError(f"transform must be callable (image -> tensor [C, H, W]), got {type(transform).__name__}")
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        """Two views ``[2, C, H, W]`` of ``image``."""
        return torch.stack([self.transform(image), self.transform(image)])

    def __repr__(self) -> str:
        return f"TwoViewTransform({self.transform!r})"


def _label(example: Any) -> Any:
    if isinstance(example, Mapping):
        for key in ("labels", "label"):
            if key in example:
                return example[key]
        raise ValueError(f"an example has no 'labels' or 'label' key (keys: {sorted(example)})")
    return example[1]


def _image(example: Any) -> torch.Tensor:
    x = example.get("pixel_values") if isinstance(example, Mapping) else example[0]
    if not isinstance(x, torch.Tensor):
        if isinstance(x, Sequence) and len(x) == 2 and all(isinstance(v, torch.Tensor) for v in x):
            return torch.stack(list(x))
        raise ValueError("each example needs 'pixel_values' (a tensor [C, H, W] or two views [2, C, H, W]); got "
                         f"{type(x).__name__}")
    return x


class TwoViewCollator:
    """Batch examples of two views into ``[2B, ...]`` rows with ``[2B]`` labels, views first-then-second.

    Examples are dicts with ``pixel_values`` (``[2, C, H, W]`` from :class:`TwoViewTransform`, or a pair of
    ``[C, H, W]``) and ``labels``/``label``, or ``(views, label)`` tuples. Examples of one view ``[C, H, W]``
    (evaluation) are stacked to ``[B, C, H, W]``.

    Args:
        as_dict: return ``{"pixel_values", "labels"}`` (🤗 ``Trainer``); ``False`` returns ``(x, y)``.

    Raises:
        ValueError: for an empty batch, examples without images or labels, or a batch that mixes one- and
            two-view examples.
    """

    def __init__(self, as_dict: bool = True) -> None:
        self.as_dict = as_dict

    def __call__(self, examples: Sequence[Any]) -> Any:
        if not examples:
            raise ValueError("an empty batch")
        xs = [_image(e) for e in examples]
        y = torch.as_tensor([int(_label(e)) for e in examples], dtype=torch.long)
        dims = {x.ndim for x in xs}
        if dims == {4}:
            if any(x.shape[0] != 2 for x in xs):
                raise ValueError(f"two views per example expected, got {sorted({x.shape[0] for x in xs})}")
            x = torch.cat([torch.stack([v[0] for v in xs]), torch.stack([v[1] for v in xs])])
            y = y.repeat(2)
        elif dims == {3}:
            x = torch.stack(xs)
        else:
            raise ValueError(f"examples mix one view [C, H, W] and two views [2, C, H, W] (dims {sorted(dims)})")
        return {"pixel_values": x, "labels": y} if self.as_dict else (x, y)


__all__ = ["TwoViewCollator", "TwoViewTransform"]
