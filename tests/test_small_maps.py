"""Convolutions on small maps as matrix products: the same outputs and gradients as the convolution kernels."""

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from schane.models.small_maps import (
    MAX_POSITIONS,
    helps_on,
    patch_convolutions,
    small_map_convolutions,
    unpatch_convolutions,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def convolutions():
    torch.manual_seed(0)
    return [
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False),
        nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6), nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6),
        nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=6), nn.Conv2d(6, 6, (3, 5), padding=(1, 2), groups=6),
        nn.Conv2d(6, 6, 3, padding=0, groups=6), Conv2dSame(6, 6, 5, stride=2, groups=6), Conv2dSame(6, 6, 4, groups=6),
        nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1, bias=False), nn.Conv2d(6, 4, 3, padding=1),
        nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.Conv2d(6, 4, 3, padding=2, dilation=2), Conv2dSame(6, 4, 4, stride=2),
        nn.Conv2d(6, 4, 1, stride=2), nn.Conv2d(6, 4, 3, padding=1, groups=2),  # dense; then never rewritten:
        nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect"), nn.Conv2d(6, 12, 3, padding=1, groups=6),
    ]


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 3), (3, 3), (4, 4), (5, 5)])
def test_outputs_and_gradients_equal_the_convolution(size):
    """Reference: the module's own convolution (zero padding, stride, dilation, timm's TF-"SAME" padding)."""
    rewritten, ran = set(), set()
    for k, conv in enumerate(convolutions()):
        x = torch.randn(3, 6, *size, requires_grad=True)
        try:
            ref = conv(x)
        except RuntimeError:
            continue  # a kernel larger than the padded map: refused either way
        ran.add(k)
        g_ref = torch.autograd.grad(ref.square().sum(), [x, *conv.parameters()])
        with small_map_convolutions(conv):
            got = conv(x)
        g = torch.autograd.grad(got.square().sum(), [x, *conv.parameters()])
        assert "forward" not in vars(conv)  # put back
        if "Convolution" not in type(got.grad_fn).__name__:
            rewritten.add(k)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # indices into convolutions(): 0-8 depthwise with zero padding, 9-10 pointwise, 11-15 dense, 16-18 never
    depthwise, pointwise, dense = set(range(9)), {9, 10}, set(range(11, 16))
    n_pos = size[0] * size[1]
    assert pointwise <= rewritten and not rewritten & {16, 17, 18}
    assert (depthwise & ran <= rewritten) == (n_pos <= MAX_POSITIONS) or not depthwise & ran
    if n_pos > MAX_POSITIONS:
        assert not rewritten & depthwise
    if size == (1, 1):  # one output position for every dense convolution
        assert dense & ran <= rewritten and dense & ran

def test_channels_last_input_and_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                          nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(4, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    ref = model(x)
    handle = patch_convolutions(model)
    assert patch_convolutions(model) == []  # patching twice changes nothing
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    unpatch_convolutions(handle)
    assert all("forward" not in vars(m) for m in model.modules())
    own = model[0].forward = lambda t: t  # a forward the caller had set is put back
    unpatch_convolutions(patch_convolutions(model))
    assert model[0].forward is own
    assert helps_on("cpu") and not helps_on("meta")


def test_restored_after_an_error():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    with pytest.raises(RuntimeError, match="boom"), small_map_convolutions(conv):
        raise RuntimeError("boom")
    assert "forward" not in vars(conv)
