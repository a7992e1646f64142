"""``schane export``: a fine-tuned model loads with timm alone (or torchscale alone for BEiT-3) and gives schane's
outputs; the EMA weights are exported when the run evaluated them; class names, preprocessing and config go along.

The timm side is checked the way a user loads the file, with timm's documented local-file route
(``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``, timm/models/_builder.py
``load_pretrained``), and the BEiT-3 side with torchscale's own ``BEiT3`` module (torchscale/model/BEiT3.py) and
the pooling of the official image classifier (unilm beit3/modeling_finetune.py ``BEiT3ForImageClassification``:
``fc_norm`` of the mean of the patch tokens, then ``head``), written here without schane.
"""

from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from fixtures import Payload
from schane.cli import main
from schane.config import to_dict
from schane.data.transforms import resolve_preprocessing
from schane.engine.checkpoint import load_checkpoint, load_checkpoint_model, save_checkpoint
from schane.pipelines.export import export_checkpoint
from schane.pipelines.splits import eval_transform_for
from schane.pipelines.train import train
from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 3  # the image_root fixture (conftest.py)


def _train(root, out, name, *extra):
    return train(tiny_cfg(root, out, name, "train.test_at_end=false", *extra)).best_checkpoint


@pytest.fixture(scope="module")
def convnext_ema(image_root, tmp_path_factory):
    """A test_convnext fine-tuned for 2 steps with EMA (the EMA weights are the evaluated ones)."""
    return _train(image_root, tmp_path_factory.mktemp("runs"), "cnx", "train.ema_decay=0.5")


def _images(image_root, n=4):
    files = sorted(image_root.rglob("*.png"))[:: 36 // n][:n]
    return files, [Image.open(f).convert("RGB") for f in files]


def _schane_batch(ckpt, pils):
    model, cfg, _ = load_checkpoint_model(ckpt)
    tf = eval_transform_for(cfg, model)
    return model, cfg, torch.stack([tf(p) for p in pils])


def test_timm_alone_reproduces_schane_logits_with_the_ema_weights(convnext_ema, image_root, tmp_path):
    out = tmp_path / "export"
    res = export_checkpoint(convnext_ema, out, heads=True)
    assert [f.name for f in res.files] == ["model.safetensors", "heads.safetensors", "config.json", "README.md"]
    assert res.weights == "ema" and res.classifier_key == "head.fc"  # timm's ConvNeXt head: head.fc
    model, cfg, x = _schane_batch(convnext_ema, _images(image_root)[1])
    with torch.no_grad():
        want = model(x)
        m = timm.create_model("test_convnext", pretrained=True, num_classes=N_CLASSES,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=N_CLASSES))
        got = m.eval()(x)
    torch.testing.assert_close(got, want.logits, rtol=1e-5, atol=1e-5)
    assert want.logits.std() > 0  # a classifier that learned something, not zeros

    # the file holds the EMA weights, which differ from the raw ones after 2 steps with decay 0.5
    state = load_checkpoint(convnext_ema)
    sd = load_file(out / "model.safetensors")
    ema, raw = state["ema"]["module"], state["model"]
    assert all(torch.equal(sd[k], ema[f"backbone.{k}"]) for k in sd if not k.startswith("head.fc."))
    assert any(not torch.equal(sd[k], raw[f"backbone.{k}"]) for k in sd if not k.startswith("head.fc."))
    assert torch.equal(sd["head.fc.weight"], ema["classifier.weight"])

    # heads.safetensors: the classifier and the projection head in schane's names, usable in plain PyTorch
    heads = load_file(out / "heads.safetensors")
    assert sorted(heads) == ["classifier.bias", "classifier.weight", "projector.fc1.bias", "projector.fc1.weight",
                             "projector.fc2.bias", "projector.fc2.weight"]
    f = want.features
    proj = F.normalize(F.linear(F.relu(F.linear(f, heads["projector.fc1.weight"], heads["projector.fc1.bias"])),
                                heads["projector.fc2.weight"], heads["projector.fc2.bias"]), dim=-1)
    torch.testing.assert_close(proj, want.projections, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eval_resize", ["crop", "squash"])
def test_config_json_preprocessing_and_the_timm_transform(convnext_ema, image_root, tmp_path, eval_resize):
    state = load_checkpoint(convnext_ema)
    state["config"]["data"].update(eval_resize=eval_resize, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])
    ckpt = save_checkpoint(tmp_path / "run.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    out = tmp_path / "export"
    export_checkpoint(ckpt, out, heads=True)
    config = json.loads((out / "config.json").read_text())
    pils = [*_images(image_root)[1], Image.new("RGB", (30, 20), (200, 40, 90))]  # one not square
    model, cfg, x = _schane_batch(ckpt, pils)
    pre = resolve_preprocessing(cfg.data, model.data_config)
    sc = config["schane"]
    assert sc["class_names"] == config["label_names"] == [f"class_{c}" for c in range(N_CLASSES)]
    assert sc["preprocessing"] == {"input_size": [3, 32, 32], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25],
                                   "interpolation": "bicubic", "crop_pct": pre.crop_pct, "eval_resize": eval_resize}
    assert sc["config"] == json.loads(json.dumps(to_dict(cfg))) and sc["weights"] == "ema"
    assert config["num_classes"] == N_CLASSES and config["pretrained_cfg"]["classifier"] == "head.fc"
    # timm's own eval transform built from config.json is schane's evaluation transform
    tf = timm.data.create_transform(**timm.data.resolve_data_config(config["pretrained_cfg"]))
    torch.testing.assert_close(torch.stack([tf(p) for p in pils]), x)
    # config.json follows timm's hub format: the folder loads as a local-dir source too
    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert m.pretrained_cfg["label_names"] == sc["class_names"]
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x).logits, rtol=1e-5, atol=1e-5)


def test_the_model_card_snippet_runs_and_predicts_like_schane(convnext_ema, image_root, tmp_path):
    out = tmp_path / "export"
    export_checkpoint(convnext_ema, out, heads=True)
    card = (out / "README.md").read_text()
    assert "class_0, class_1, class_2" in card and "EMA weights" in card
    files, pils = _images(image_root, 1)
    code = card.split("```python\n")[1].split("```")[0].replace("'image.jpg'", repr(str(files[0])))
    ns: dict = {}
    exec(code, ns)
    model, _, x = _schane_batch(convnext_ema, pils)
    with torch.no_grad():
        torch.testing.assert_close(ns["probs"], model(x).logits.softmax(-1), rtol=1e-5, atol=1e-6)


def test_backbone_only_export_gives_the_pooled_features(convnext_ema, image_root, tmp_path):
    out = tmp_path / "export"
    export_checkpoint(convnext_ema, out, heads=True)
    res = export_checkpoint(convnext_ema, out)  # again without heads: the old heads file goes
    assert res.classifier_key is None and not (out / "heads.safetensors").exists()
    assert not any(k.startswith("head.fc.") for k in load_file(out / "model.safetensors"))
    model, _, x = _schane_batch(convnext_ema, _images(image_root)[1])
    m = timm.create_model("test_convnext", pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0)).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["num_classes"] == 0


def test_effnet_lite0_offline_exports_as_tf_efficientnet_lite0(image_root, tmp_path):
    ckpt = _train(image_root, tmp_path, "lite0", "model.backbone=effnet-lite0-offline")
    out = tmp_path / "export"
    res = export_checkpoint(ckpt, out, heads=True)
    assert res.classifier_key == "classifier" and res.weights == "model"
    model, _, x = _schane_batch(ckpt, _images(image_root)[1])
    m = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=N_CLASSES,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=N_CLASSES))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), model(x).logits, rtol=1e-5, atol=1e-5)


def _torchscale_logits(out, x):
    """The export loaded with torchscale alone (no schane), pooled as the official BEiT-3 classifier pools."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3

    config = json.loads((out / "config.json").read_text())
    sd = load_file(out / "model.safetensors")
    beit3 = BEiT3(EncoderConfig(**config["beit3"]["encoder_config"])).eval()
    res = beit3.load_state_dict({k.removeprefix("beit3."): v for k, v in sd.items() if k.startswith("beit3.")},
                                strict=False)
    assert res.unexpected_keys == []
    # only the text branch is absent: the token embedding, the language experts and the text positions
    assert res.missing_keys and all(k.startswith("text_embed.") or ".B." in k for k in res.missing_keys)
    assert sorted(k for k in sd if not k.startswith("beit3.")) == ["fc_norm.bias", "fc_norm.weight", "head.bias",
                                                                   "head.weight"]
    d = config["num_features"]
    fc_norm = torch.nn.LayerNorm(d, eps=config["beit3"]["fc_norm_eps"])
    fc_norm.load_state_dict({"weight": sd["fc_norm.weight"], "bias": sd["fc_norm.bias"]})
    with torch.no_grad():
        tokens = beit3(visual_tokens=x)["encoder_out"]
        return F.linear(fc_norm(tokens[:, 1:].mean(dim=1)), sd["head.weight"], sd["head.bias"])


def test_beit3_export_loads_with_torchscale_alone(image_root, tmp_path):
    ckpt = _train(image_root, tmp_path, "beit3", "model.backbone=beit3_tiny")
    out = tmp_path / "export"
    res = export_checkpoint(ckpt, out, heads=True)
    assert res.kind == "beit3" and res.classifier_key == "head"
    model, _, x = _schane_batch(ckpt, _images(image_root)[1])
    with torch.no_grad():
        want = model(x).logits
    torch.testing.assert_close(_torchscale_logits(out, x), want, rtol=1e-5, atol=1e-5)
    enc = json.loads((out / "config.json").read_text())["beit3"]["encoder_config"]
    assert (enc["encoder_embed_dim"], enc["encoder_layers"], enc["img_size"], enc["patch_size"]) == (32, 2, 32, 8)
    # the model card's torchscale snippet runs as written
    files, _ = _images(image_root, 1)
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exec(code.replace("'image.jpg'", repr(str(files[0]))), ns)
    torch.testing.assert_close(ns["probs"], want[:1].softmax(-1), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_without_class_names_says_so(convnext_ema, tmp_path, caplog):
    state = load_checkpoint(convnext_ema)
    del state["class_names"]  # as written by schane < 0.2
    old = save_checkpoint(tmp_path / "old.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    out = tmp_path / "export"
    with caplog.at_level("WARNING", logger="schane"):
        res = export_checkpoint(old, out, heads=True)
    assert res.class_names is None and "stores no class names" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert config["schane"]["class_names"] is None and "label_names" not in config
    assert "schane < 0.2" in config["schane"]["class_names_note"] and "not stored" in (out / "README.md").read_text()


def test_export_errors_are_one_line_with_exit_2(convnext_ema, tmp_path, capsys):
    def run(*argv):
        rc = main(["export", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]  # log lines may come before the error, nothing after it
        assert last.startswith("schane export: error: ") and err.count("schane export: error:") == 1, err
        return last

    assert "not found" in run("--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"))
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, weights)  # plain weights, not a training checkpoint
    assert "not a schane training checkpoint" in run("--checkpoint", str(weights), "--out", str(tmp_path / "o"))
    state = load_checkpoint(convnext_ema)
    state["config"]["model"]["backbone"] = "test_efficientnet"  # weights of another architecture
    wrong = save_checkpoint(tmp_path / "wrong.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    assert "do not fit" in run("--checkpoint", str(wrong), "--out", str(tmp_path / "o"))
    (tmp_path / "file").write_text("x")
    assert "is a file" in run("--checkpoint", str(convnext_ema), "--out", str(tmp_path / "file"))
    # a planted pickle payload in a checkpoint is refused and never runs
    marker = tmp_path / "RAN"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "schane-checkpoint", "model": {}, "config": {}, "num_classes": 3, "x": Payload(marker)}, evil)
    assert "refused" in run("--checkpoint", str(evil), "--out", str(tmp_path / "o"))
    assert not marker.exists()


def test_cli_export_prints_the_loading_code(convnext_ema, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(convnext_ema), "--out", str(tmp_path / "e"), "--heads"]) == 0
    text = capsys.readouterr().out
    assert "model.safetensors, heads.safetensors, config.json, README.md" in text
    assert "pretrained_cfg_overlay=dict(file=" in text and "num_classes=3" in text


def test_an_export_that_does_not_reproduce_schane_is_not_kept(convnext_ema, tmp_path, monkeypatch):
    import schane.pipelines.export as export

    monkeypatch.setattr(export, "_reload_timm", lambda out, config, x: torch.zeros(len(x), config["num_classes"]))
    out = tmp_path / "export"
    with pytest.raises(ValueError, match="does not reproduce schane's outputs"):
        export_checkpoint(convnext_ema, out, heads=True)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # nor any temporary folder


def test_export_never_overwrites_a_folder_of_the_users_files(convnext_ema, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my project\n")
    (project / "config.json").write_text('{"mine": true}\n')
    assert main(["export", "--checkpoint", str(convnext_ema), "--out", str(project)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("schane export: error: --out") and "--force" in err[-1], err
    assert (project / "README.md").read_text() == "my project\n"
    assert (project / "config.json").read_text() == '{"mine": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no staging folder left behind
    # --force writes the export's files into the folder and leaves the others alone
    (project / "notes.txt").write_text("keep")
    assert main(["export", "--checkpoint", str(convnext_ema), "--out", str(project), "--force"]) == 0
    assert json.loads((project / "config.json").read_text())["schane"]["format"] == "schane-export"
    assert (project / "notes.txt").read_text() == "keep"


def test_a_previous_export_is_replaced_whole(convnext_ema, tmp_path):
    out = tmp_path / "e"
    export_checkpoint(convnext_ema, out, heads=True)
    first = json.loads((out / "config.json").read_text())
    res = export_checkpoint(convnext_ema, out)  # no --force needed: the folder is schane's own export
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert res.out_dir == out and all(f.parent == out and f.exists() for f in res.files)
    assert json.loads((out / "config.json").read_text())["schane"]["heads_file"] is None
    assert first["schane"]["heads_file"] == "heads.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    # a previous export with a file of the user's beside it is not schane's alone: refused
    (out / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="--force"):
        export_checkpoint(convnext_ema, out)
    assert (out / "mine.txt").read_text() == "x"
