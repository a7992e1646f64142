"""``model.backbone=hf:DIR``: transformers image models (written here with transformers' own ``save_pretrained``,
see hf_fixtures.py) as schane backbones, trained by ``schane train`` and exported back with ``save_pretrained``
so that ``AutoModelForImageClassification.from_pretrained`` alone gives schane's logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForImageClassification  # noqa: E402

from hf_fixtures import MEAN, STD, write_tiny_convnext, write_tiny_dinov2_base, write_tiny_vit  # noqa: E402
from schane.cli import main  # noqa: E402
from schane.engine.optim import param_groups_layer_decay  # noqa: E402
from schane.models import SCHaNeModel, create_backbone  # noqa: E402
from schane.pipelines.export import export_checkpoint  # noqa: E402
from schane.pipelines.runs import load_for_evaluation  # noqa: E402
from schane.pipelines.splits import eval_transform_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return {"vit": write_tiny_vit(d / "vit"), "convnext": write_tiny_convnext(d / "convnext"),
            "dinov2": write_tiny_dinov2_base(d / "dinov2")}


@pytest.mark.parametrize("family", ["vit", "convnext", "dinov2"])
def test_pooled_feature_is_what_the_transformers_classifier_reads(hf_dirs, family):
    bb, report = create_backbone(f"hf:{hf_dirs[family]}")
    assert report is None
    ref = AutoModelForImageClassification.from_pretrained(hf_dirs[family]).eval()
    seen = []
    ref.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref(pixel_values=x)
        got = bb.eval()(x)
    assert got.shape == (3, bb.num_features) == seen[0].shape
    torch.testing.assert_close(got, seen[0])
    if family == "dinov2":  # DINOv2's classifier reads [CLS, mean of the patch tokens]
        assert bb.num_features == 2 * 32


def test_preprocessing_comes_from_the_image_processor(hf_dirs):
    vit = SCHaNeModel(create_backbone(f"hf:{hf_dirs['vit']}")[0], 3)
    assert vit.data_config["mean"] == MEAN and vit.data_config["std"] == STD
    assert vit.data_config["input_size"] == (3, 32, 32) and vit.data_config["crop_pct"] == 1.0
    cnx = SCHaNeModel(create_backbone(f"hf:{hf_dirs['convnext']}")[0], 3)
    assert cnx.data_config["crop_pct"] == 0.875 and cnx.data_config["mean"] == (0.5, 0.5, 0.5)
    dino = SCHaNeModel(create_backbone(f"hf:{hf_dirs['dinov2']}")[0], 3)
    assert dino.data_config["crop_pct"] == pytest.approx(32 / 36)  # resize 36, centre crop 32


@pytest.mark.parametrize("family, n_layers", [("vit", 4), ("convnext", 5)])
def test_layer_decay_numbers_layers_like_timm(hf_dirs, family, n_layers):
    model = SCHaNeModel(create_backbone(f"hf:{hf_dirs[family]}")[0], 3)
    groups = param_groups_layer_decay(model, 0.05, layer_decay=0.5)
    by_layer = {}
    for g in groups:
        by_layer.setdefault(g["layer_id"], []).extend(n for n, p in model.named_parameters()
                                                      if any(p is q for q in g["params"]))
    assert len(by_layer) == n_layers  # stem, one per block, heads
    assert all("embeddings" in n for n in by_layer[0])
    top = max(by_layer)
    assert {n for n in by_layer[top] if not n.startswith("backbone.")} >= {"classifier.weight"}
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales[0] == 0.5 ** (n_layers - 1) and scales[top] == 1.0
    if family == "vit":  # blocks 0 and 1 are layers 1 and 2; the final LayerNorm goes with the last block
        assert all(".layers.0." in n for n in by_layer[1])
        assert any(n.endswith("vit.layernorm.weight") for n in by_layer[2])


def test_missing_sources_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        create_backbone("hf:someone/not-cached-vit")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        create_backbone(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="needs a folder"):
        create_backbone("hf:")


def test_train_and_export_with_the_cli(hf_dirs, image_root, tmp_path, capsys):
    """``schane train --set model.backbone=hf:DIR`` then ``schane export``: transformers alone, equal logits."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {{name: image_folder, root: '{image_root}', img_size: 32, batch_size: 4}}\n"
                   "optim: {epochs: 1, warmup_epochs: 0.5, lr: 1.0e-3, base_batch_size: null, layer_decay: 0.65}\n"
                   "train: {max_steps_per_epoch: 2, progress: false, test_at_end: false}\n"
                   f"output_dir: '{tmp_path}'\nname: hfvit\n")
    assert main(["train", "-c", str(cfg), "--set", f"model.backbone=hf:{hf_dirs['vit']}"]) == 0
    ckpt = next(tmp_path.rglob("best.pt"))
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "class_0", "1": "class_1", "2": "class_2"}
    assert saved["architectures"] == ["ViTForImageClassification"]

    loaded = load_for_evaluation(ckpt)
    from PIL import Image

    pils = [Image.open(f).convert("RGB") for f in sorted(image_root.rglob("*.png"))[:4]]
    x = torch.stack([eval_transform_for(loaded.cfg, loaded.model)(p) for p in pils])
    m = AutoModelForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        want = loaded.model.cpu().eval()(x).logits
        got = m(pixel_values=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0
    # the trained weights were exported, not the folder's initial ones
    start = AutoModelForImageClassification.from_pretrained(hf_dirs["vit"])
    assert not torch.equal(start.vit.embeddings.patch_embeddings.projection.weight,
                           m.vit.embeddings.patch_embeddings.projection.weight)
    # the saved image processor gives the run's preprocessing
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(out)
    px = proc(pils, return_tensors="pt")["pixel_values"]
    assert px.shape == x.shape and tuple(proc.image_mean) == MEAN


def test_export_of_convnext_with_heads(hf_dirs, image_root, tmp_path):
    from schane.pipelines.train import train
    from test_train import tiny_cfg

    cfg = tiny_cfg(image_root, tmp_path, "cnx", f"model.backbone=hf:{hf_dirs['convnext']}", "model.pretrained=true",
                   "train.test_at_end=false", "data.img_size=24")  # the folder's processor gives 32 px
    res = export_checkpoint(train(cfg).best_checkpoint, tmp_path / "exp", heads=True)
    assert res.kind == "hf" and res.max_abs_diff < 1e-4
    assert {f.name for f in res.files} >= {"config.json", "model.safetensors", "heads.safetensors", "schane.json"}
    m = AutoModelForImageClassification.from_pretrained(tmp_path / "exp")
    assert m.config.num_labels == 3 and m.config.label2id["class_2"] == 2
    from PIL import Image
    from transformers import AutoImageProcessor

    px = AutoImageProcessor.from_pretrained(tmp_path / "exp")(Image.new("RGB", (40, 30)), return_tensors="pt")
    assert px["pixel_values"].shape == (1, 3, 24, 24)  # the run's size, as the run resized and cropped


def test_a_hub_id_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    """A Hub id resolves through the Hugging Face cache (huggingface_hub's layout: ``models--ORG--NAME/refs/main``
    holding a commit, ``snapshots/COMMIT/`` the files); nothing is fetched."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-vit"
    write_tiny_vit(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    bb, _ = create_backbone("hf:someone/tiny-vit")
    assert bb.num_features == 32 and bb.pretrained_cfg["mean"] == MEAN
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        create_backbone("hf:someone/other-vit")
