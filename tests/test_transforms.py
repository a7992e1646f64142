"""Training, evaluation and support transforms, and the resolution of a run's preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from schane.config import AugConfig, DataConfig, load_config
from schane.data.transforms import (
    Preprocessing,
    TwoViews,
    eval_transform,
    resolve_preprocessing,
    support_transform,
    train_transform,
)

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


# --------------------------------------------------------------------------- preprocessing resolution


def test_squash_matches_naive_resize_and_normalise():
    """``eval_resize: squash``: resize straight to img_size x img_size (no crop, aspect ratio not kept)."""
    img = _img(80, 60)
    out = eval_transform(32, MEAN, STD, crop_pct=0.5, resize="squash")(img)
    arr = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    ref = (arr - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).double().numpy(), ref, atol=0.02)
    with pytest.raises(ValueError, match="resize must be one of crop, squash"):
        eval_transform(32, MEAN, STD, resize="pad")
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(32, MEAN, STD, interpolation="lanczos")


def _model_data_config(name: str) -> dict:
    import timm

    from schane.models.model import resolve_data_config

    return resolve_data_config(timm.create_model(name, pretrained=False, num_classes=0))


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_defaults_reproduce_the_transforms_built_from_the_model_config(backbone):
    """With every new data field at its default the transforms are bit-identical to those built, as
    before, from ``model.data_config`` with the 0.875 fallback."""
    dc = _model_data_config(backbone)
    pre = resolve_preprocessing(DataConfig(), dc)
    old_eval = eval_transform(24, tuple(dc["mean"]), tuple(dc["std"]), crop_pct=float(dc.get("crop_pct") or 0.875))
    img = _img(70, 45)
    assert torch.equal(pre.eval_transform(24)(img), old_eval(img))
    for new, old in (
        (pre.train_transform(24, AugConfig()), train_transform(24, dc["mean"], dc["std"], AugConfig())),
        (pre.support_transform(24), support_transform(24, dc["mean"], dc["std"])),
    ):
        torch.manual_seed(5)
        a = new(img)
        torch.manual_seed(5)
        assert torch.equal(a, old(img))
    assert (pre.mean, pre.std) == (tuple(dc["mean"]), tuple(dc["std"])) and pre.eval_resize == "crop"


def test_config_values_override_the_model_and_missing_crop_pct_falls_back():
    model_dc = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": None}
    pre = resolve_preprocessing(DataConfig(), model_dc)
    assert pre == Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875, "bicubic", "crop")
    cfg = DataConfig(mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], crop_pct=1.0, eval_resize="squash")
    pre = resolve_preprocessing(cfg, model_dc)
    assert pre == Preprocessing((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 1.0, "bicubic", "squash")
    img = _img(50, 40)
    ref = eval_transform(16, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), resize="squash")
    assert torch.equal(pre.eval_transform(16)(img), ref(img))


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (DataConfig(mean=[0.5, 0.5]), "data.mean needs 3 values"),
        (DataConfig(std=[0.5, 0.0, 0.5]), "data.std values must be > 0"),
        (DataConfig(crop_pct=1.2), r"data.crop_pct must be in \(0, 1\]"),
        (DataConfig(eval_resize="pad"), "data.eval_resize must be one of crop, squash"),
    ],
)
def test_resolution_rejects_bad_values_naming_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        resolve_preprocessing(cfg, {"mean": MEAN, "std": STD, "crop_pct": 0.9})


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.mean=[0.5,0.5]", "data.mean"), ("data.std=[1,0,1]", "data.std"),
     ("data.crop_pct=0", "data.crop_pct"), ("data.eval_resize=pad", "data.eval_resize")],
)  # fmt: skip
def test_config_validation_names_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_beit3_default_matches_the_official_imagenet_eval_transform():
    """unilm beit3/datasets.py build_imagenet_transform (eval): Resize(int(input_size / crop_pct),
    interpolation=3 (bicubic)), CenterCrop(input_size), ToTensor, Normalize(IMAGENET_DEFAULT_MEAN/STD),
    with crop_pct None -> 1.0."""
    from schane.config import ModelConfig
    from schane.models import build_model

    dc = build_model(ModelConfig(backbone="beit3_tiny", pretrained=False), num_classes=2).data_config
    pre = resolve_preprocessing(DataConfig(), dc)
    img = _img(50, 40)
    official = T.Compose([
        T.Resize(int(32 / 1.0), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    assert torch.equal(pre.eval_transform(32)(img), official(img))
