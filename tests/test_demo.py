"""``schane demo`` end to end with a tiny backbone: the shipped config loads, the report is complete."""

import json

import pytest
import torch

from schane.config import load_config
from schane.pipelines.demo import DEMO_CONFIG, demo_config


def test_shipped_demo_config_is_the_documented_one():
    cfg = load_config(str(DEMO_CONFIG))
    assert cfg.model.backbone == "effnet-lite0-offline" and cfg.data.name == "glyphs"
    assert cfg.fewshot.losses == ["ce", "schane"] and len(cfg.fewshot.seeds) >= 3
    assert cfg.fewshot.episodes >= 600 and cfg.fewshot.shots == [1, 5] and cfg.fewshot.ways == 5
    assert cfg.train.test_at_end is False  # nothing is selected or reported on the glyph test split but episodes


def test_demo_config_paths_and_seeds(tmp_path):
    cfg = demo_config(tmp_path / "d", seeds=[3, 4], overrides=["fewshot.episodes=7"])
    assert cfg.run_dir == tmp_path / "d" and cfg.fewshot.seeds == [3, 4] and cfg.fewshot.episodes == 7
    with pytest.raises(ValueError, match="seed"):
        demo_config(tmp_path / "d", seeds=[])


def test_demo_end_to_end_tiny(tmp_path):
    from schane.cli import main

    overrides = [
        "model.backbone=test_efficientnet", "model.pretrained=false", "model.proj_dim=16",
        f"data.options={{cache_dir: {tmp_path / 'glyphs'}, n_train_classes: 6, n_val_classes: 5, "
        "n_test_classes: 5, samples_per_class: 6, progress: false}",
        "data.batch_size=8", "data.val_fraction=0.2", "optim.warmup_epochs=0", "optim.layer_decay=null",
        "train.max_steps_per_epoch=2", "train.progress=false", "train.device=cpu",
        "fewshot.ways=3", "fewshot.shots=[1,2]", "fewshot.queries=3", "fewshot.episodes=6",
        "fewshot.val_episodes=3", "fewshot.support_aug=1", "analysis.max_points=60",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--out", str(tmp_path / "demo"), "--seeds", "0", "1", "--set", *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "demo"
    report = (out / "report.md").read_text()
    for needle in ("pretrained (no fine-tuning)", "| CE |", "| SCHaNe + CE |", "3-way 1-shot", "3-way 2-shot",
                   "isotropy", "IsoScore", "kNN", "across 2 seeds", "tsne.png", "curves.png"):
        assert needle in report, needle
    data = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["pretrained", "ce", "schane"]
    for r in data["rows"]:
        assert all(k in r for k in ("isotropy", "isoscore", "alignment", "uniformity", "class_gap", "knn"))
    fs = json.loads((out / "fewshot.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in fs["rows"] if r["seed"] is not None) == [
        ("ce", 0), ("ce", 1), ("schane", 0), ("schane", 1)]
    assert (out / "tsne.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000
