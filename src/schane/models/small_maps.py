"""Convolutions on small feature maps as matrix products (CPU speed; the same function of the weights).

At small image sizes the last stages of a convolutional network work on 1x1 to 4x4 maps. The CPU convolution
kernels handle such shapes badly: a depthwise 5x5 convolution over 1152 channels of a 1x1 map, batch 128,
takes about 110 ms forward and backward, for 150k multiply-adds; backward of the 2x2-map depthwise
convolutions dominates an EfficientNet-Lite0 training step at 32 px (``benchmarks/train_step.py``).

:func:`conv2d_as_matmul` computes the same convolution as a matrix product where that is cheap:

* pointwise (1x1 kernel, stride 1, no padding, one group): a linear map of the channels at every position;
* depthwise (one filter per channel) on a map of at most :data:`MAX_POSITIONS` positions: per channel, a
  ``[L_out, L_in]`` matrix whose entries are the kernel taps that connect each output position to each input
  position (zero where none does), applied by a batched matrix product;
* dense (one group) with a single output position: a linear map of the taps that reach it.

Zero padding (``nn.Conv2d`` with ``padding_mode="zeros"``, timm's ``Conv2dSame``), any stride and dilation. Only
the summation order differs from the convolution kernels (float32 round-off); gradients flow to the input and
the weights through the same taps. Everything else runs the module's own convolution.

:func:`patch_convolutions` routes every ``Conv2d`` of a model through it and returns a handle for
:func:`unpatch_convolutions`; :func:`small_map_convolutions` does both around a block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_POSITIONS = 16
"""Largest input map (``H·W``) a depthwise convolution is computed on as a matrix product."""

Conv = Callable[[torch.Tensor], torch.Tensor]


def _padding(m: nn.Conv2d, size: int, dim: int) -> tuple[int, int] | None:
    """``(zeros before, output length)`` of ``m`` along spatial ``dim`` for an input of ``size``; ``None`` when
    the padding is not zeros."""
    from timm.layers import Conv2dSame

    k, s, d = m.kernel_size[dim], m.stride[dim], m.dilation[dim]
    if type(m) is Conv2dSame:  # TF "SAME": output ceil(size / s), total padding split with the smaller half first
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        return total // 2, out
    if type(m) is not nn.Conv2d or m.padding_mode != "zeros":
        return None
    pad = m.padding
    if pad == "valid":
        p, total = 0, 0
    elif pad == "same":
        total = (k - 1) * d
        p = total // 2
    else:
        p = int(pad[dim])
        total = 2 * p
    out = (size + total - d * (k - 1) - 1) // s + 1
    return (p, out) if out >= 1 else None


@lru_cache(maxsize=256)
def _tap_index(kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
               pads: tuple[tuple[int, int], tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
    """``[L_out, L_in]`` index of the kernel tap (``a·k_w + b``) joining each output and input position;
    ``k_h·k_w`` (a zero slot) where no tap does."""
    per_dim = []
    for dim in range(2):
        k, s, d = kernel[dim], stride[dim], dilation[dim]
        before, out = pads[dim]
        o = torch.arange(out)[:, None]
        i = torch.arange(size[dim])[None, :]
        off = i - o * s + before  # = a·d for the tap a that joins them
        a = torch.div(off, d, rounding_mode="floor")
        per_dim.append(torch.where((off % d == 0) & (a >= 0) & (a < k), a, -1))
    ah, aw = per_dim  # [H_out, H_in], [W_out, W_in]
    valid = (ah[:, None, :, None] >= 0) & (aw[None, :, None, :] >= 0)
    tap = ah[:, None, :, None] * kernel[1] + aw[None, :, None, :]
    tap = torch.where(valid, tap, kernel[0] * kernel[1])  # [H_out, W_out, H_in, W_in]
    return tap.reshape(pads[0][1] * pads[1][1], size[0] * size[1])


def conv2d_as_matmul(m: nn.Conv2d, conv: Conv, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` computed as a matrix product where that is cheap (see the module docstring), else ``conv(x)``.

    Args:
        m: the convolution (its weight ``[C_out, C_in / groups, k_h, k_w]`` and bias ``[C_out]``).
        conv: the module's own forward, for every other case.
        x: ``[B, C_in, H, W]`` (any memory format).

    Returns:
        ``[B, C_out, H_out, W_out]``.
    """
    w = m.weight
    if x.ndim != 4:
        return conv(x)
    if (type(m) is nn.Conv2d and w.shape[-2:] == (1, 1) and m.groups == 1 and m.stride == (1, 1)
            and m.padding in ((0, 0), "valid")):
        return F.linear(x.permute(0, 2, 3, 1), w.flatten(1), m.bias).permute(0, 3, 1, 2)
    h, wd = x.shape[-2:]
    c_out, c_in = w.shape[0], x.shape[1]
    depthwise = m.groups == c_in == c_out
    if not (depthwise and h * wd <= MAX_POSITIONS) and not m.groups == 1:
        return conv(x)
    ph, pw = _padding(m, h, 0), _padding(m, wd, 1)
    if ph is None or pw is None:
        return conv(x)
    (_, ho), (_, wo) = ph, pw
    if depthwise and h * wd <= MAX_POSITIONS:
        idx = _tap_index(m.kernel_size, m.stride, m.dilation, (ph, pw), (h, wd)).to(w.device)
        taps = torch.cat([w.flatten(1), w.new_zeros(c_out, 1)], 1)  # [C, k_h·k_w + 1]: the last is zero
        mat = taps[:, idx]  # [C, L_out, L_in]
        if mat.shape[1] * mat.shape[2] <= 16:  # broadcast product and sum: [B, C, 1, L_in] x [C, L_out, L_in]
            y = (x.flatten(2)[:, :, None, :] * mat).sum(-1)  # [B, C, L_out]
        else:  # a batched product per channel
            y = torch.bmm(x.flatten(2).transpose(0, 1), mat.transpose(1, 2)).transpose(0, 1)
        if m.bias is not None:
            y = y + m.bias[:, None]
        return y.reshape(x.shape[0], c_out, ho, wo)
    if ho * wo == 1 and h * wd <= MAX_POSITIONS:  # one group, one output position: the taps that reach it
        idx = _tap_index(m.kernel_size, m.stride, m.dilation, (ph, pw), (h, wd))[0].to(w.device)
        taps = torch.cat([w.flatten(2), w.new_zeros(c_out, c_in, 1)], 2)  # [C_out, C_in, k_h·k_w + 1]
        return F.linear(x.flatten(1), taps[:, :, idx].flatten(1), m.bias)[:, :, None, None]
    return conv(x)


Handle = list[tuple[nn.Module, Any]]


def patch_convolutions(model: nn.Module) -> Handle:
    """Route every ``Conv2d`` of ``model`` through :func:`conv2d_as_matmul`.

    Returns:
        What :func:`unpatch_convolutions` needs to put each module's ``forward`` back.
    """
    patched: Handle = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not isinstance(vars(m).get("forward"), partial):
            patched.append((m, vars(m).get("forward")))
            m.forward = partial(conv2d_as_matmul, m, m.forward)  # type: ignore[method-assign]
    return patched


def unpatch_convolutions(patched: Handle) -> None:
    """Undo :func:`patch_convolutions` (a ``forward`` the caller had set on a module is put back)."""
    for m, own in patched:
        if own is None:
            vars(m).pop("forward", None)
        else:
            m.forward = own


@contextmanager
def small_map_convolutions(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """``with small_map_convolutions(model):`` runs ``model``'s convolutions through :func:`conv2d_as_matmul`."""
    handle = patch_convolutions(model) if enabled else []
    try:
        yield model
    finally:
        unpatch_convolutions(handle)


def helps_on(device: torch.device | str) -> bool:
    """Whether the matrix-product forms are used by default on ``device``: on CPUs (where the convolution kernels
    are slow for these shapes); GPUs keep their convolution kernels."""
    return torch.device(device).type == "cpu"


__all__ = ["MAX_POSITIONS", "conv2d_as_matmul", "helps_on", "patch_convolutions", "small_map_convolutions",
           "unpatch_convolutions"]
