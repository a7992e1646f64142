"""End-to-end ``schane compare`` / ``schane analyze`` on tiny data with a tiny backbone."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from schane.analysis.report import METRIC_COLUMNS
from schane.config import load_config
from schane.pipelines.compare import (
    _run_or_reuse,
    analyze_checkpoint,
    format_analysis,
    method_config,
    run_compare,
)

pytestmark = pytest.mark.usefixtures("one_openmp_thread")

COMMON = [
    "data.img_size=32", "data.batch_size=8", "data.eval_batch_size=64", "model.backbone=test_convnext",
    "model.pretrained=false", "model.proj_dim=16", "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.lr=1e-3",
    "optim.base_batch_size=null", "optim.layer_decay=null", "train.max_steps_per_epoch=2", "train.progress=false",
    "train.log_every_steps=1", "train.device=cpu", "analysis.max_points=60",
]


def table_rows(text):
    return [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]


def test_compare_on_glyphs_writes_every_metric_and_reuses_runs(tmp_path, glyph_cache):
    from schane.data import list_datasets

    if "glyphs" not in list_datasets():
        pytest.skip("glyphs dataset not available")
    opts = (f"data.options={{n_train_classes: 6, n_val_classes: 3, n_test_classes: 4, samples_per_class: 8, "
            f"img_size: 32, progress: false, cache_dir: '{glyph_cache}'}}")
    cfg = load_config(None, [
        *COMMON, "data.name=glyphs", opts, "fewshot.ways=3", "fewshot.shots=[1]", "fewshot.episodes=4",
        "fewshot.queries=3", "fewshot.support_aug=1", f"output_dir={tmp_path}", "name=cmp",
        "analysis.methods=[ce, schane]", "analysis.sweeps={loss.lam: [0.9, 1.0]}", "analysis.projections=true",
    ])
    md = run_compare(cfg, progress=False)
    report = md.parent
    text = md.read_text()
    assert report == tmp_path / "cmp" / "report"
    for _, head, _ in METRIC_COLUMNS:
        assert head in text
    assert "3-way 1-shot (%)" in text and "Metrics of the projection-head outputs" in text
    rows = table_rows(text)
    ce = next(r for r in rows if r.startswith("| CE "))
    assert "—" not in ce and " ± " in ce  # every metric and a confidence interval
    assert any(r.startswith("| SCHaNe + CE, lam=1 ") for r in rows)
    for png in ("tsne.png", "curves.png", "sweeps.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in text
    # lam=0.9 is the schane run itself: three runs in all
    assert sorted(p.name for p in (report / "runs").iterdir()) == ["ce", "schane", "schane__lam_1.0"]
    stamp = (report / "runs" / "ce" / "last.pt").stat().st_mtime_ns
    data = json.loads((report / "report.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"ce", "schane"}

    # the finished runs are reused (no retraining); a changed training config is refused
    run_cfg = method_config(cfg, "ce", report / "runs")
    run_dir, final, seconds = _run_or_reuse(run_cfg, progress=False)
    assert run_dir == report / "runs" / "ce" and seconds is not None and "test" in final
    assert (report / "runs" / "ce" / "last.pt").stat().st_mtime_ns == stamp
    changed = dataclasses.replace(run_cfg, optim=dataclasses.replace(run_cfg.optim, lr=0.5))
    with pytest.raises(ValueError, match="optim.lr"):
        _run_or_reuse(changed, progress=False)

    # analyze one checkpoint: printed table, metrics.json and a t-SNE picture
    res = analyze_checkpoint(report / "runs" / "schane" / "best.pt", out_dir=tmp_path / "an", progress=False)
    out = format_analysis(res)
    assert res["split"] == "test_classes" and res["n"] == 4 * 8
    assert "IsoScore" in out and "kNN" in out
    assert (tmp_path / "an" / "tsne_test_classes.png").is_file() and (tmp_path / "an" / "metrics.json").is_file()
    with pytest.raises(ValueError, match="no split"):
        analyze_checkpoint(report / "runs" / "schane" / "best.pt", split="test_set", progress=False)


def test_compare_on_classification_folder(tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(14):
            a = rng.random((20, 20, 3)) * 90
            a[..., c] += 160
            Image.fromarray(a.astype(np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    cfg = load_config(None, [
        *COMMON, "data.name=image_folder", f"data.root={root}", "data.val_fraction=0.2", f"output_dir={tmp_path}",
        "name=cls", "analysis.methods=[ce, schane_beta0]", "analysis.knn_reference=train",
    ])
    text = run_compare(cfg, progress=False).read_text()
    assert "top-1 (%)" in text and "train-split neighbours" in text
    rows = table_rows(text)
    assert len(rows) == 2 and rows[1].startswith("| SCHaNe β=0 + CE ")
    assert all("—" not in r for r in rows)
    with pytest.raises(ValueError, match="unknown method"):
        run_compare(load_config(None, [*COMMON, f"output_dir={tmp_path}", "analysis.methods=[triplet]"]))
