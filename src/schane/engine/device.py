"""Devices and precision: the run's device, mixed precision, channels-last memory format."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, TypeVar

import torch
from torch import nn

logger = logging.getLogger(__name__)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA (this process's local rank) when available, else CPU.

    Raises:
        ValueError: when CUDA is requested but not available, or the name is unknown.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"train.device: unknown device {name!r} (use auto, cpu or cuda)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` on ``device`` (``None`` = full fp32).

    ``auto`` is bf16 on CUDA when supported (else fp16), fp32 on CPU. CPU allows bf16 or none.

    Raises:
        ValueError: for fp16 on CPU or an unknown value.
    """
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device; on CPU use train.amp=bf16 or none")
        return torch.float16
    raise ValueError(f"train.amp: must be auto, bf16, fp16 or none, got {amp!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for ``dtype``, or a no-op when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` is a convolutional network: more than a patch embedding's worth of spatial convolutions."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    return len(convs) >= 4


def resolve_channels_last(setting: bool | str, model: nn.Module) -> bool:
    """``train.channels_last``: ``"auto"`` is on for convolutional networks (:func:`is_convolutional`)."""
    if setting == "auto":
        return is_convolutional(model)
    return bool(setting)


def to_channels_last(model: ModuleT) -> ModuleT:
    """Store ``model``'s 4-D weights channels-last, except those with a 1x1 kernel, which keep standard strides.

    A ``[O, I, 1, 1]`` weight has the same memory order in both formats and differs only in its stride
    metadata, but the gradients of 1x1 convolutions come back with standard strides. DDP builds its
    gradient buckets from the parameters' strides and warns ("Grad strides do not match bucket view
    strides") and copies every such gradient; with standard strides on these weights it does neither.

    Returns:
        ``model`` (converted in place).
    """
    model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        if p.ndim == 4 and tuple(p.shape[-2:]) == (1, 1):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


def uses_channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s spatial convolution weights are stored channels-last (so inputs should be too)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and m.weight.shape[1] > 1:
            return m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
    return False


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


__all__ = [
    "autocast",
    "is_convolutional",
    "model_device",
    "resolve_amp",
    "resolve_channels_last",
    "resolve_device",
    "to_channels_last",
    "uses_channels_last",
]
