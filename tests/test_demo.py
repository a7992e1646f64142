"""``schane demo`` end to end with a tiny backbone: the shipped config loads, the report is complete."""

import json

import pytest

from schane.config import load_config
from schane.pipelines.demo import DEMO_CONFIG, demo_config

pytestmark = pytest.mark.usefixtures("one_thread")


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


def tiny(cache):
    """Overrides that shrink the demo to seconds (tiny timm backbone, 6/5/5 glyph classes, few episodes)."""
    return [
        "model.backbone=test_efficientnet", "model.pretrained=false", "model.proj_dim=16",
        f"data.options={{cache_dir: {cache}, n_train_classes: 6, n_val_classes: 5, "
        "n_test_classes: 5, samples_per_class: 6, progress: false}",
        "data.batch_size=8", "data.val_fraction=0.2", "optim.warmup_epochs=0", "optim.layer_decay=null",
        "train.max_steps_per_epoch=2", "train.progress=false", "train.device=cpu",
        "fewshot.ways=3", "fewshot.shots=[1,2]", "fewshot.queries=3", "fewshot.episodes=6",
        "fewshot.val_episodes=3", "fewshot.support_aug=1", "analysis.max_points=60",
    ]


def test_demo_end_to_end_tiny(tmp_path, glyph_cache):
    from schane.cli import main

    overrides = [*tiny(glyph_cache), "optim.epochs=2"]
    assert main(["demo", "--out", str(tmp_path / "demo"), "--seeds", "0", "1", "--set", *overrides]) == 0
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
    # what fine-tuning did to the base classes: last-epoch validation top-1 per method, paired across seeds
    assert "base val top-1 (%)" in report and "base-class validation top-1" in report
    base = fs["base_accuracy"]
    assert [r["method"] for r in base["rows"]] == ["ce", "schane"] and len(base["rows"][0]["values"]) == 2
    assert [(d["method"], d["baseline"]) for d in base["differences"]] == [("schane", "ce")]
    for r in fs["rows"][1:]:
        final = json.loads((tmp_path / "demo" / f"{r['method']}-seed{r['seed']}" / "final.json").read_text())
        assert r["base_val"]["last"] == pytest.approx(100 * final["last_val"]["top1"])
    assert "SCHaNe + CE − pretrained (no fine-tuning)" in report  # every difference is stated, whatever its sign


def test_ablation_trains_four_methods_on_the_same_episodes(tmp_path, glyph_cache):
    from schane.cli import main

    assert main(["demo", "--ablation", "--out", str(tmp_path / "abl"), "--seeds", "0", "--set", *tiny(glyph_cache)]) == 0
    fs = json.loads((tmp_path / "abl" / "fewshot.json").read_text())
    assert [r["method"] for r in fs["rows"]] == ["pretrained", "ce", "supcon", "schane_beta0", "schane"]
    beta0 = json.loads((tmp_path / "abl" / "schane_beta0-seed0" / "final.json").read_text())
    assert beta0["loss"] == "schane"
    import yaml

    assert yaml.safe_load((tmp_path / "abl" / "schane_beta0-seed0" / "config.yaml").read_text())["loss"]["beta"] == 0.0
    pairs = {(d["method"], d["baseline"]) for d in fs["differences"]}
    assert {("schane", "schane_beta0"), ("schane_beta0", "supcon"), ("schane", "ce")} <= pairs
    report = (tmp_path / "abl" / "report.md").read_text()
    assert "| SCHaNe β=0 + CE |" in report and "| SupCon + CE |" in report
