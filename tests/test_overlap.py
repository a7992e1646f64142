"""The pretraining-overlap check: which few-shot classes the backbone's pretraining label set holds.

The label sets are timm's own class lists (``timm/data/_info/*.txt``); the benchmark classes are the
bundled split lists (``schane/data/splits``). No image and no weight file is read.
"""

import importlib.resources
import logging
from types import SimpleNamespace

import pytest
import timm

from schane.data.base import read_split_lines
from schane.fewshot.overlap import (
    backbone_pretraining,
    label_set,
    pretraining_overlap,
)
from schane.pipelines.fewshot import check_fewshot_classes


def _bundled(name):
    return {"val_classes": read_split_lines(name, "val.txt"), "test_classes": read_split_lines(name, "test.txt")}


def _timm_list(file):
    text = importlib.resources.files("timm.data").joinpath("_info", file).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("backbone", ["effnet-lite0-offline", "resnet50.a1_in1k", "resnet50"])
def test_mini_imagenet_novel_classes_are_all_imagenet_1k_classes(backbone, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("no image may be read"))
    report = pretraining_overlap(backbone, _bundled("mini_imagenet"), dataset="mini_imagenet")
    assert report["pretraining"] == [{"label_set": "ImageNet-1k", "labels_used": True, "classes": 1000}]
    test, val = report["splits"]["test_classes"], report["splits"]["val_classes"]
    assert (test["in_pretraining"], test["wordnet_ids"], test["classes"]) == (20, 20, 20)
    assert (val["in_pretraining"], val["wordnet_ids"], val["classes"]) == (16, 16, 16)
    assert report["status"] == "overlap"
    assert "20/20 novel (test_classes)" in report["message"] and "16/16 validation (val_classes)" in report["message"]
    # a few names, with timm's lemma: n02099601 is a miniImageNet test class
    assert "n02099601 (golden retriever)" in test["examples"] and len(test["examples"]) == 3
    assert "n02099601 (golden retriever)" in report["message"]


def test_tiered_imagenet_classes_are_imagenet_1k_classes():
    report = pretraining_overlap("effnet-lite0-offline", _bundled("tiered_imagenet"))
    assert report["splits"]["test_classes"]["in_pretraining"] == 160
    assert report["splits"]["val_classes"]["in_pretraining"] == 97


def test_counts_only_classes_in_the_label_set():
    in1k = _timm_list("imagenet_synsets.txt")
    only21k = sorted(set(_timm_list("imagenet21k_goog_synsets.txt")) - set(in1k))
    names = {"test_classes": [in1k[0], in1k[500], only21k[0], "golden_retriever"], "val_classes": [only21k[1], "x"]}
    r1k = pretraining_overlap("resnet50.a1_in1k", names)
    test = r1k["splits"]["test_classes"]
    assert (test["classes"], test["wordnet_ids"], test["in_pretraining"]) == (4, 3, 2)
    assert [e.split()[0] for e in test["examples"]] == [in1k[0], in1k[500]]
    assert r1k["splits"]["val_classes"]["in_pretraining"] == 0
    assert "2/3 novel" in r1k["message"] and "0/1 validation" in r1k["message"]
    r21k = pretraining_overlap("vit_base_patch16_224.augreg_in21k", names)
    assert r21k["splits"]["test_classes"]["in_pretraining"] == 3
    assert r21k["splits"]["val_classes"]["in_pretraining"] == 1
    none = pretraining_overlap("resnet50.a1_in1k", {"test_classes": [only21k[2], only21k[3]]})
    assert none["status"] == "no_overlap" and none["splits"]["test_classes"]["in_pretraining"] == 0
    assert "0/2 novel" in none["message"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet50.a1_in1k", {"ImageNet-1k": True}),
        ("vit_base_patch16_224.augreg_in21k", {"ImageNet-21k": True}),
        ("vit_base_patch16_224.augreg_in21k_ft_in1k", {"ImageNet-21k": True, "ImageNet-1k": True}),
        ("convnext_tiny.in12k_ft_in1k", {"ImageNet-12k": True, "ImageNet-1k": True}),
        ("vit_base_patch16_clip_224.laion2b_ft_in12k_in1k", {"ImageNet-12k": True, "ImageNet-1k": True}),
        ("tf_efficientnet_b0.ns_jft_in1k", {"ImageNet-1k": True}),
        ("vit_base_patch16_224_miil.in21k", {"ImageNet-21k-P": True}),
        ("vit_small_patch16_224.dino", {"ImageNet-1k": False}),
        ("vit_base_patch16_224.mae", {"ImageNet-1k": False}),
        ("convnextv2_tiny.fcmae", {"ImageNet-1k": False}),
        ("convnextv2_tiny.fcmae_ft_in22k_in1k", {"ImageNet-1k": True, "ImageNet-21k": True}),
        ("eva02_base_patch14_224.mim_in22k", {"ImageNet-21k": False}),
        ("vit_small_patch14_dinov2.lvd142m", {"ImageNet-21k": False}),
        ("vit_base_patch16_clip_224.openai", {}),
    ],
)
def test_label_sets_from_timm_pretrained_tags(name, expected):
    assert name in timm.list_pretrained(name)  # a real timm tag
    assert dict(backbone_pretraining(name).sets) == expected


def test_default_tag_backbones_checkpoints_and_random_weights():
    default = timm.models.get_pretrained_cfg("resnet50").tag
    pre = backbone_pretraining("resnet50")
    assert dict(pre.sets) == {"ImageNet-1k": True} and repr(default) in pre.basis and "default" in pre.basis
    assert dict(backbone_pretraining("effnet-lite0-offline").sets) == {"ImageNet-1k": True}
    beit = backbone_pretraining("beit3_base_patch16_224", checkpoint="/x/beit3_base_patch16_224.pth")
    assert dict(beit.sets) == {"ImageNet-21k": False} and "BEiT-3" in beit.basis
    assert backbone_pretraining("beit3_base_patch16_224", pretrained=False).random
    assert backbone_pretraining("test_efficientnet", pretrained=False).random
    own = backbone_pretraining("resnet50.a1_in1k", checkpoint="/x/mine.safetensors")
    assert own.sets == () and not own.random and "mine.safetensors" in own.basis


def test_messages_for_every_status():
    mini, cifar = _bundled("mini_imagenet"), _bundled("cifar_fs")
    beit = pretraining_overlap("beit3_base_patch16_224", cifar, checkpoint="b.pth", dataset="cifar_fs")
    assert beit["status"] == "not_wordnet" and beit["splits"]["test_classes"]["in_pretraining"] is None
    assert "pretraining images of beit3_base_patch16_224 include ImageNet-21k" in beit["message"]
    beit_mini = pretraining_overlap("beit3_base_patch16_224", mini, checkpoint="b.pth")
    assert beit_mini["status"] == "overlap" and "self-supervised" in beit_mini["message"]
    assert beit_mini["splits"]["test_classes"]["in_pretraining"] == 20
    sup = pretraining_overlap("resnet50.a1_in1k", cifar, dataset="cifar_fs")
    assert sup["status"] == "not_wordnet" and "not WordNet ids" in sup["message"]
    clip = pretraining_overlap("vit_base_patch16_clip_224.openai", mini)
    assert clip["status"] == "unknown" and clip["splits"]["test_classes"]["in_pretraining"] is None
    assert "not checked" in clip["message"] and "'openai'" in clip["message"]
    rnd = pretraining_overlap("test_efficientnet", mini, pretrained=False)
    assert rnd["status"] == "random" and "random weights" in rnd["message"]


def test_label_sets_are_timms_lists():
    assert len(label_set("ImageNet-1k")) == 1000
    assert label_set("ImageNet-1k") == frozenset(_timm_list("imagenet_synsets.txt"))
    assert len(label_set("ImageNet-12k")) == 11821
    assert len(label_set("ImageNet-21k")) >= 21841
    with pytest.raises(ValueError, match="unknown label set"):
        label_set("ImageNet-5k")


def _cfg(backbone, pretrained=True, ways=3, shots=(1,), queries=2):
    return SimpleNamespace(
        model=SimpleNamespace(backbone=backbone, pretrained=pretrained, checkpoint=None),
        data=SimpleNamespace(name="own"),
        fewshot=SimpleNamespace(ways=ways, shots=list(shots), queries=queries),
    )


def test_check_fewshot_classes_warns_writes_lists_and_checks_sizes(tmp_path, caplog):
    wnids = read_split_lines("mini_imagenet", "test.txt")
    classes = {"val_classes": wnids[:3], "test_classes": wnids[3:6]}
    labels = {s: [0, 0, 0, 1, 1, 1, 2, 2, 2] for s in classes}
    lists = {"train": ["a", "b"], "val": wnids[:3], "test": wnids[3:6]}
    caplog.set_level(logging.INFO, logger="schane")
    out = check_fewshot_classes(_cfg("effnet-lite0-offline"), classes, labels, tmp_path, class_lists=lists)
    assert out["pretraining_overlap"]["splits"]["test_classes"]["in_pretraining"] == 3
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "pretraining overlap" in r.getMessage()]
    assert len(warned) == 1 and "3/3 novel" in warned[0].getMessage()
    assert out["class_splits"] == str(tmp_path / "class_splits")
    assert (tmp_path / "class_splits" / "val.txt").read_text().split() == wnids[:3]
    caplog.clear()
    out = check_fewshot_classes(_cfg("test_efficientnet", pretrained=False), classes, labels, tmp_path / "b")
    assert out["class_splits"] is None and not (tmp_path / "b").exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(ValueError, match=r"val_classes has 3 class\(es\).*4-way.*fewshot.ways"):
        check_fewshot_classes(_cfg("effnet-lite0-offline", ways=4), classes, labels, tmp_path)
    with pytest.raises(ValueError, match=rf"shots \+ queries = 2 \+ 2 = 4 images: {wnids[0]} \(3\)"):
        check_fewshot_classes(_cfg("effnet-lite0-offline", shots=(1, 2)), classes, labels, tmp_path)
