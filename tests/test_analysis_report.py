"""Report writing from synthetic rows, method configs, and the metrics bundle."""

import json

import numpy as np
import pytest

from schane.analysis import plots
from schane.analysis.report import METRIC_COLUMNS, compute_embedding_metrics, write_report
from schane.config import load_config
from schane.pipelines.compare import _logged_seconds, method_config


def blobs(classes=3, per_class=20, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d)) * 5
    y = np.repeat(np.arange(classes), per_class)
    return centers[y] + 0.1 * rng.standard_normal((classes * per_class, d)), y


def test_compute_embedding_metrics_has_every_metric_and_uses_reference():
    X, y = blobs()
    m = compute_embedding_metrics(X, y, k=3, max_points=30, seed=0)
    assert set(m) == {key for key, _, _ in METRIC_COLUMNS}
    assert m["knn"] == 100.0 and m["silhouette"] > 0.9 and m["class_gap"] > 0.5
    # a reference set with swapped labels makes every query wrong
    m2 = compute_embedding_metrics(X, y, k=1, reference=(X, (y + 1) % 3))
    assert m2["knn"] == 0.0


def test_write_report_has_every_column(tmp_path):
    fig = plots.sweep_plot({"loss.lam": [(0.5, 70.0, 1.0), (0.9, 72.0, 1.0)]}, tmp_path / "elsewhere" / "s.png")
    metrics = {key: 0.5 + i / 100 for i, (key, _, _) in enumerate(METRIC_COLUMNS)}
    rows = [
        {"method": "ce", "label": "CE", "accuracy": {"5-way 1-shot": (50.0, 1.2), "5-way 5-shot": (70.5, 0.8)},
         **metrics, "train_time_s": 75.0},
        {"method": "schane", "accuracy": 71.25, "accuracy_ci": 0.5, "accuracy_label": "5-way 5-shot",
         **{k: np.float64(v) for k, v in metrics.items()}, "train_time_s": None},
    ]
    sections = {"Sweep over loss.lam": [{"method": "schane", "label": "λ=0.5", "accuracy": {"5-way 5-shot": 69.0}}]}
    md = write_report(rows, {"Sweeps": fig}, tmp_path / "report", notes=["setup line"], sections=sections)
    text = md.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = lines[0]
    for _, head, _ in METRIC_COLUMNS:
        assert head in header
    assert "5-way 1-shot (%)" in header and "5-way 5-shot (%)" in header and "train time" in header
    ce_row = next(ln for ln in lines if ln.startswith("| CE "))
    assert "50.00 ± 1.20" in ce_row and "70.50 ± 0.80" in ce_row and "1 min 15 s" in ce_row
    schane_row = next(ln for ln in lines if ln.startswith("| schane "))
    assert "71.25 ± 0.50" in schane_row and schane_row.count("—") == 2  # no 1-shot, no time
    n_cols = header.count("|")
    assert all(ln.count("|") == n_cols for ln in lines[:4])
    assert "## Sweep over loss.lam" in text and "| λ=0.5 " in text and "setup line" in text
    assert "![Sweeps](s.png)" in text and (tmp_path / "report" / "s.png").is_file()
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    assert payload["rows"][1]["isotropy"] == pytest.approx(metrics["isotropy"])
    with pytest.raises(ValueError, match="method"):
        write_report([{"label": "x"}], None, tmp_path / "r2")
    with pytest.raises(FileNotFoundError):
        write_report(rows, {"missing": tmp_path / "nope.png"}, tmp_path / "r3")


def test_method_config_changes_only_the_loss(tmp_path):
    cfg = load_config(None, ["name=cmp", "loss.lam=0.8", "train.seed=3"])
    ce = method_config(cfg, "ce", tmp_path)
    b0 = method_config(cfg, "schane_beta0", tmp_path)
    lam = method_config(cfg, "schane", tmp_path, {"loss.lam": 1})
    custom = method_config(cfg, "supcon@loss.temperature=0.1", tmp_path)
    assert ce.loss.name == "ce" and ce.run_dir == tmp_path / "ce"
    assert b0.loss.name == "schane" and b0.loss.beta == 0.0 and b0.loss.lam == 0.8
    assert lam.loss.lam == 1.0 and isinstance(lam.loss.lam, float) and lam.run_dir != b0.run_dir
    assert custom.loss.name == "supcon" and custom.loss.temperature == 0.1
    for c in (ce, b0, lam, custom):
        assert c.data == cfg.data and c.model == cfg.model and c.optim == cfg.optim and c.train == cfg.train
    with pytest.raises(ValueError, match="unknown method"):
        method_config(cfg, "triplet", tmp_path)
    with pytest.raises(ValueError, match="unknown config key"):
        method_config(cfg, "schane", tmp_path, {"loss.lamda": 0.5})
    with pytest.raises(ValueError, match="loss.lam"):
        method_config(cfg, "schane", tmp_path, {"loss.lam": 2.0})


def test_analysis_config_validation():
    with pytest.raises(ValueError, match="analysis.knn_reference"):
        load_config(None, ["analysis.knn_reference=test"])
    cfg = load_config(None, ["analysis.sweeps={loss.lam: [0.5, 1.0]}", "analysis.methods=[ce, schane_beta0]"])
    assert cfg.analysis.sweeps == {"loss.lam": [0.5, 1.0]} and cfg.analysis.methods == ["ce", "schane_beta0"]


def test_train_time_from_metrics_log(tmp_path):
    assert _logged_seconds(tmp_path) is None
    lines = [{"time": 100.0, "kind": "start"}, {"time": 105.5, "epoch": 0}, {"epoch": 1}, {"time": 112.5, "kind": "final"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert _logged_seconds(tmp_path) == pytest.approx(12.5)
