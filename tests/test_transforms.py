"""Training, evaluation and support transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from schane.config import AugConfig
from schane.data.transforms import TwoViews, eval_transform, support_transform, train_transform

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _img(w: int = 50, h: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_eval_transform_matches_naive_resize_crop_normalise():
    img = _img(80, 60)
    out = eval_transform(32, MEAN, STD, crop_pct=0.8)(img)
    # short side 60 -> 40, long side 80 -> 53; centre 32 x 32 crop
    small = img.resize((53, 40), Image.Resampling.BICUBIC)
    left, top = int(round((53 - 32) / 2.0)), int(round((40 - 32) / 2.0))
    arr = np.asarray(small.crop((left, top, left + 32, top + 32)), dtype=np.float64) / 255.0
    ref = (arr - np.array(MEAN)) / np.array(STD)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out.permute(1, 2, 0).double().numpy(), ref, atol=0.02)


def test_train_transform_shapes_and_randomness():
    torch.manual_seed(0)
    t = train_transform(24, MEAN, STD, AugConfig())
    a, b = TwoViews(t)(_img())
    assert a.shape == b.shape == (3, 24, 24) and not torch.equal(a, b)


def test_train_transform_without_randomness_is_resize_and_normalise():
    aug = AugConfig(scale_min=1.0, hflip=0.0, color_jitter_p=0.0, grayscale_p=0.0)
    img = _img(30, 30)
    out = train_transform(30, MEAN, STD, aug)(img)
    # a crop of the whole image (ratio 1, scale 1) resized to its own size is the image
    ref = (np.asarray(img, dtype=np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).double().numpy(), ref, atol=0.05)


def test_train_transform_grayscale_always():
    aug = AugConfig(grayscale_p=1.0, color_jitter_p=0.0)
    out = train_transform(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), aug)(_img())
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[1], out[2])


def test_support_transform_shape():
    assert support_transform(20, MEAN, STD)(_img()).shape == (3, 20, 20)


@pytest.mark.parametrize(
    "call",
    [
        lambda: eval_transform(0, MEAN, STD),
        lambda: eval_transform(32, MEAN, STD, crop_pct=1.5),
        lambda: eval_transform(32, (0.5, 0.5), STD),
        lambda: train_transform(32, MEAN, (0.2, 0.0, 0.3), AugConfig()),
        lambda: train_transform(32, MEAN, STD, AugConfig(scale_min=0.0)),
        lambda: train_transform(32, MEAN, STD, AugConfig(hflip=2.0)),
        lambda: support_transform(-1, MEAN, STD),
    ],
)
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
