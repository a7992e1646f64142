"""Exponential moving average of model weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """EMA of a model's parameters and buffers: ``ema = decay * ema + (1 - decay) * param``.

    Floating-point buffers (e.g. BatchNorm running statistics) are averaged like parameters;
    integer buffers (``num_batches_tracked``) are copied.

    Args:
        model: the model being trained (unwrapped, not DDP).
        decay: smoothing factor in (0, 1).

    Raises:
        ValueError: when ``decay`` is outside (0, 1).

    Examples:
        >>> ema = ModelEMA(model, decay=0.999)  # doctest: +SKIP
        >>> ema.update(model)  # after each optimizer step  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model``'s current weights into the average."""
        self.updates += 1
        msd = model.state_dict()
        for name, ema_v in self.module.state_dict().items():
            v = msd[name].detach()
            if ema_v.dtype.is_floating_point:
                ema_v.lerp_(v.to(ema_v.dtype), 1.0 - self.decay)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
