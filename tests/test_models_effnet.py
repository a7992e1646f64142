"""The bundled ImageNet EfficientNet-Lite0 ("effnet-lite0-offline"): weights, logits, predictions."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from schane.config import ModelConfig
from schane.models import build_model, create_effnet_lite0_offline, effnet_lite0_state_dict
from schane.models.weights import effnet_lite0_weights_path

pytestmark = pytest.mark.usefixtures("one_thread")


# ImageNet-1k class indices used below
DAISY = 985
# Architecture-like classes for the Summer Palace photo (china.jpg).
BUILDINGS = {
    698: "palace",
    442: "bell cote",
    663: "monastery",
    832: "stupa",
    483: "castle",
    497: "church",
    668: "mosque",
    975: "lakeside",
    449: "boathouse",
}


@pytest.fixture(scope="module")
def imagenet_model():
    return create_effnet_lite0_offline(num_classes=1000).eval()


def _reference_timm_model() -> torch.nn.Module:
    """timm tf_efficientnet_lite0, loaded independently: pair the raw file's tensors with timm's by order."""
    raw = torch.load(effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    target = ref.state_dict()
    assert len(raw) == len(target)
    new = {}
    for (_, v), (k, t) in zip(raw.items(), target.items(), strict=True):
        assert v.shape == t.shape, k
        new[k] = v
    ref.load_state_dict(new, strict=True)
    return ref.eval()


def test_file_pairs_one_to_one_with_timm():
    sd = effnet_lite0_state_dict()
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).state_dict()
    assert list(sd) == list(target)
    assert all(sd[k].shape == target[k].shape for k in sd)
    assert sd["classifier.weight"].shape == (1000, 1280)


def test_logits_equal_independently_loaded_timm_model(imagenet_model):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    ref = _reference_timm_model()
    with torch.no_grad():
        torch.testing.assert_close(imagenet_model(x), ref(x), rtol=0, atol=0)
        # the SCHaNe model's pooled feature is the same network's pre-logits
        schane = build_model(
            ModelConfig(backbone="effnet-lite0-offline", pretrained=True), num_classes=5
        ).eval()
        feats = schane.forward_features(x)
        torch.testing.assert_close(
            feats, ref.forward_head(ref.forward_features(x), pre_logits=True), rtol=0, atol=0
        )
    assert schane.load_report is not None and schane.load_report.missing == []
    assert schane.data_config["mean"] == (0.5, 0.5, 0.5) and schane.data_config["input_size"] == (3, 224, 224)


def test_sample_images_are_classified_sensibly(imagenet_model):
    """flower.jpg is a daisy (ImageNet 985); china.jpg (the Summer Palace) is a palace-like building."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    cfg = timm.data.resolve_model_data_config(imagenet_model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    batch = {}
    for name, arr in zip(data.filenames, data.images, strict=True):
        batch[name.replace("\\", "/").rsplit("/", 1)[-1]] = transform(Image.fromarray(arr))
    x = torch.stack([batch["flower.jpg"], batch["china.jpg"]])
    with torch.no_grad():
        probs = imagenet_model(x).softmax(-1)
    flower_top = probs[0].argmax().item()
    assert flower_top == DAISY, f"flower.jpg classified as {flower_top}"
    assert probs[0, DAISY] > 0.2
    china_top5 = probs[1].topk(5).indices.tolist()
    assert china_top5[0] in BUILDINGS, f"china.jpg top-1 {china_top5[0]} is not a building class"
    assert sum(probs[1, list(BUILDINGS)].tolist()) > 0.5
    # and neither photo is confused for the other's class
    assert DAISY not in china_top5 and probs[0, list(BUILDINGS)].sum() < 0.1
