"""Weight sources: local files recognised by content (good, bad and malicious), containers, the hub offline."""

from __future__ import annotations

import argparse
import pickle
import time
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from schane.config import ModelConfig
from schane.models import (
    PretrainedWeightsUnavailable,
    build_model,
    create_backbone,
    load_backbone_weights,
    load_state_dict_file,
)
from schane.models.weights import map_state_dict_by_order, unwrap_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


NAME = "test_efficientnet"


def _source_model(num_classes: int = 10) -> torch.nn.Module:
    import timm

    torch.manual_seed(123)
    m = timm.create_model(NAME, pretrained=False, num_classes=num_classes)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


def _assert_backbone_equals(model, source):
    src = source.state_dict()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, src[k], msg=k)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"checkpoint": 1, "model_ema": sd},
    ],
    ids=["plain", "model", "state_dict", "ddp-module", "ema"],
)
def test_pth_containers_load(tmp_path, wrap):
    src = _source_model()
    path = tmp_path / "w.pth"
    torch.save(wrap(src.state_dict()), path)
    model = build_model(ModelConfig(backbone=NAME, pretrained=False, checkpoint=str(path)), num_classes=3)
    rep = model.load_report
    assert rep.missing == [] and rep.unexpected == []
    assert sorted(rep.ignored) == ["classifier.bias", "classifier.weight"]  # the source's 10-class head
    _assert_backbone_equals(model, src)


def test_safetensors_loads(tmp_path):
    src = _source_model()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = build_model(ModelConfig(backbone=NAME, pretrained=False, checkpoint=str(path)), num_classes=3)
    _assert_backbone_equals(model, src)
    assert model.load_report.loaded == len(model.backbone.state_dict())


def test_checkpoint_overrides_pretrained_and_no_network(tmp_path, monkeypatch):
    """model.checkpoint wins over model.pretrained: no hub lookup happens."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = _source_model(num_classes=0)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    model = build_model(ModelConfig(backbone=NAME, pretrained=True, checkpoint=str(path)), num_classes=2)
    _assert_backbone_equals(model, src)
    assert model.load_report.ignored == []


def test_schane_checkpoint_backbone_is_reused(tmp_path):
    first = build_model(ModelConfig(backbone=NAME, pretrained=False), num_classes=4)
    for p in first.backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "schane.pth"
    torch.save({"model": first.state_dict()}, path)
    second = build_model(ModelConfig(backbone=NAME, pretrained=False, checkpoint=str(path)), num_classes=7)
    for k, v in second.backbone.state_dict().items():
        torch.testing.assert_close(v, first.backbone.state_dict()[k])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        build_model(
            ModelConfig(backbone=NAME, pretrained=False, checkpoint=str(tmp_path / "nope.pth")), num_classes=2
        )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    src = _source_model()
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), good)
    else:
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(good))
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_state_dict_file(bad)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_not_a_checkpoint(tmp_path, suffix):
    bad = tmp_path / f"notes{suffix}"
    bad.write_text("these are not weights\n" * 10)
    with pytest.raises(ValueError, match=r"not a|not a valid"):
        load_state_dict_file(bad)


# --------------------------------------------------------------------------- recognised by content, not name


def _save(kind: str, obj, path: Path) -> Path:
    """Write ``obj`` as torch.save's zip archive, its pre-1.6 legacy format, or safetensors."""
    if kind == "zip":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
@pytest.mark.parametrize("name", ["w.zip", "w", "w.bin", "w.pth.tar", "w.safetensors", "w.pth"])
def test_any_name_loads_by_content(tmp_path, kind, name):
    """Azure downloads of the BEiT-3 files arrive named .zip (microsoft/unilm issues #1202, #1278, #1361):
    the content is a normal torch.save archive, and the name says nothing."""
    src = _source_model().state_dict()
    path = _save(kind, src if kind == "safetensors" else {"model": src, "epoch": 2}, tmp_path / name)
    model = build_model(ModelConfig(backbone=NAME, pretrained=False, checkpoint=str(path)), num_classes=3)
    _assert_backbone_equals(model, _source_model())


def test_training_args_namespace_loads_under_weights_only(tmp_path):
    """``args`` (argparse.Namespace, as unilm beit3/utils.py save_model stores it) is the one extra type."""
    args = argparse.Namespace(model="beit3_base_patch16_224", lr=1e-3, opt_betas=[0.9, 0.98], resume=None)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _source_model().state_dict(), "epoch": 3, "args": args}, path)
    assert set(load_state_dict_file(path)) == set(_source_model().state_dict())
    # other objects stay refused, even harmless ones such as a Path inside the namespace
    torch.save({"model": _source_model().state_dict(), "args": argparse.Namespace(out=Path("/x"))}, path)
    with pytest.raises(ValueError, match=r"refused.*pickled Python objects.*PosixPath"):
        load_state_dict_file(path)


def test_empty_unrecognised_and_directory(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_state_dict_file(empty)
    other = tmp_path / "w.npz"
    other.write_bytes(b"123")
    with pytest.raises(ValueError, match=r"not a recognised weights file.*b'123'.*torch.save.*safetensors"):
        load_state_dict_file(other)
    page = tmp_path / "beit3_base_patch16_224.pth"
    page.write_text('<?xml version="1.0"?><Error><Code>AuthenticationFailed</Code></Error>')
    with pytest.raises(ValueError, match="HTML/XML page.*download link"):
        load_state_dict_file(page)
    npz = tmp_path / "arrays.npz"  # a zip archive, but not a checkpoint
    np.savez(npz, w=np.zeros(3))
    with pytest.raises(ValueError, match=r"zip archive but not a PyTorch checkpoint.*w\.npy"):
        load_state_dict_file(npz)
    unzipped = tmp_path / "beit3_base_patch16_224"  # what unzipping the .zip download gives
    with zipfile.ZipFile(_save("zip", {"w": torch.zeros(2)}, tmp_path / "a.zip")) as zf:
        zf.extractall(unzipped)
    with pytest.raises(ValueError, match="directory.*unzipped PyTorch checkpoint.*downloaded file itself"):
        load_state_dict_file(unzipped)


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, its archives still exist
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match="TorchScript archive"):
        load_state_dict_file(path)


# --------------------------------------------------------------------------- planted payloads


class _Payload:
    """Pickling this object would create a marker file when unpickled (it must never be)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(path)
    assert not marker.exists(), "the arbitrary object was unpickled"


@pytest.mark.parametrize("name", ["evil.pth", "evil.zip", "evil", "evil.safetensors"])
@pytest.mark.parametrize("kind", ["zip", "legacy", "plain-pickle"])
def test_planted_payload_is_refused_as_such_whatever_the_name(tmp_path, kind, name):
    """A payload in the BEiT-3 layout (next to a real state_dict, where ``args`` belongs) is reported as
    refused (not as truncated or corrupt) and never runs, whatever the file is called."""
    marker = tmp_path / "UNPICKLED"
    obj = {"model": _source_model().state_dict(), "epoch": 1, "args": _Payload(str(marker))}
    path = tmp_path / name
    if kind == "plain-pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        _save(kind, obj, path)
    with pytest.raises(ValueError, match="refused") as info:
        load_state_dict_file(path)
    assert "truncated" not in str(info.value) and "corrupt" not in str(info.value)
    assert not marker.exists(), "the planted object was unpickled"


def test_container_without_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "note": "no weights here"}, path)
    with pytest.raises(ValueError, match="state_dict"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match="not tensors"):
        unwrap_state_dict({"w": torch.zeros(1), "lr": 0.1})


def test_shape_mismatch_raises(tmp_path):
    src = _source_model().state_dict()
    k = "conv_stem.weight"
    src[k] = torch.zeros(src[k].shape[0] + 1, *src[k].shape[1:])
    with pytest.raises(ValueError, match=r"shape mismatch.*conv_stem\.weight"):
        load_backbone_weights(create_backbone(NAME, pretrained=False)[0], src, source="x")


def test_missing_and_unexpected_keys(tmp_path):
    backbone, _ = create_backbone(NAME, pretrained=False)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    src = _source_model().state_dict()
    dropped = "blocks.0.0.conv.weight"
    del src[dropped]
    src["extra_neck.weight"] = torch.zeros(3)
    with pytest.raises(
        ValueError, match=r"1 missing keys \[blocks\.0\.0\.conv\.weight\].*1 unexpected keys \[extra_neck"
    ):
        load_backbone_weights(backbone, src, source="partial.pth")
    for k, v in backbone.state_dict().items():  # nothing was half-loaded
        torch.testing.assert_close(v, before[k])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        rep = load_backbone_weights(backbone, src, source="partial.pth", strict=False)
    assert any("missing keys" in str(w.message) for w in rec)
    assert rep.missing == [dropped] and rep.unexpected == ["extra_neck.weight"]
    torch.testing.assert_close(backbone.state_dict()[dropped], before[dropped])


def test_map_state_dict_by_order_checks_every_shape():
    target = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
    out = map_state_dict_by_order(OrderedDict(x=torch.ones(2, 3), y=torch.ones(4)), target)
    assert list(out) == ["a", "b"] and torch.equal(out["b"], torch.ones(4))
    with pytest.raises(ValueError, match=r"#1 y has shape \(5,\)"):
        map_state_dict_by_order(OrderedDict(x=torch.ones(2, 3), y=torch.ones(5)), target)
    with pytest.raises(ValueError, match="paired one to one"):
        map_state_dict_by_order(OrderedDict(x=torch.ones(2, 3)), target)


def test_hub_offline_fails_at_once_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    t0 = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"model\.checkpoint=") as info:
        build_model(ModelConfig(backbone="resnet18", pretrained=True), num_classes=2)
    assert "HF_HUB_OFFLINE" in str(info.value) and "resnet18" in str(info.value)
    assert time.monotonic() - t0 < 30  # generous: it must not wait on network retries


def test_hub_uses_cached_file_offline(tmp_path, monkeypatch):
    """A file already in the hub cache is used offline (and loaded with weights_only)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import timm

    hub_id = timm.models.get_pretrained_cfg(NAME).hf_hub_id
    src = _source_model(num_classes=1000)
    snap = cache / f"models--{hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (cache / f"models--{hub_id.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{hub_id.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    model = build_model(ModelConfig(backbone=NAME, pretrained=True), num_classes=2)
    _assert_backbone_equals(model, src)


def test_unknown_pretrained_tag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'no_such_tag'.*resnet18\.a1_in1k"):
        build_model(ModelConfig(backbone="resnet18.no_such_tag", pretrained=True), num_classes=2)


def test_hub_unreachable_fails_at_once(tmp_path, monkeypatch):
    """Online mode but no route to the hub: one quick probe, then a clear error (no retry loop)."""
    import schane.models.weights as W

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    probed = []
    monkeypatch.setattr(W, "_reachable", lambda url, timeout=3.0: probed.append(url) or False)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"unreachable.*model\.checkpoint="):
        build_model(ModelConfig(backbone="resnet18", pretrained=True), num_classes=2)
    assert probed and "huggingface.co" in probed[0]
