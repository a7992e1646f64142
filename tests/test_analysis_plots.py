"""Plots write valid, non-trivial PNG files from synthetic data."""

import json

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from schane.analysis import plots
from schane.engine.run_log import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_openmp_thread():
    # t-SNE's OpenMP loops crawl when the cores are shared; one thread keeps the tests quick
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


def assert_png(path, min_size=(300, 200)):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        # not a blank canvas: some pixels are coloured
        arr = np.asarray(im.convert("RGB"))
        assert (arr.std(axis=(0, 1)) > 5).any()


def blobs(classes, per_class, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d)) * 4
    y = np.repeat(np.arange(classes), per_class)
    return centers[y] + rng.standard_normal((classes * per_class, d)), y


def test_balanced_subsample():
    y = np.array([0] * 100 + [1] * 10 + [2] * 40)
    idx = plots.balanced_subsample(y, 60, seed=1)
    assert len(idx) == 60 and len(np.unique(idx)) == 60
    counts = np.bincount(y[idx])
    assert counts[1] == 10 and counts[0] == counts[2] == 25  # the small class gives its share away
    assert np.array_equal(plots.balanced_subsample(y, 500), np.arange(150))
    with pytest.raises(ValueError, match="max_points"):
        plots.balanced_subsample(y, 0)


def test_tsne_embed_separates_blobs_and_subsamples():
    X, y = blobs(3, 30, d=80)
    xy, lab = plots.tsne_embed(X, y, max_points=60, perplexity=10, seed=0)
    assert xy.shape == (60, 2) and np.array_equal(np.bincount(lab), [20, 20, 20])
    from schane.analysis.metrics import knn_accuracy

    assert knn_accuracy(xy, lab, k=3, metric="euclidean") == 1.0


def test_tsne_plot_and_panels(tmp_path):
    X, y = blobs(4, 12)
    out = plots.tsne_plot(X, y, tmp_path / "sub" / "t.png", class_names=["a", "b", "c", "d"], title="x")
    assert_png(out)
    X2, y2 = blobs(25, 3, seed=1)  # many classes: colour bar instead of a legend
    out = plots.tsne_panels({"CE": (X2, y2), "SCHaNe": (X2 * 2, y2)}, tmp_path / "p.png", perplexity=5)
    assert_png(out, (600, 200))
    xy = np.random.default_rng(0).standard_normal((20, 2))
    out = plots.tsne_panels({"a": (xy, np.arange(20) % 3)}, tmp_path / "pre.png", precomputed=True)
    assert_png(out)
    with pytest.raises(ValueError, match="at least one panel"):
        plots.tsne_panels({}, tmp_path / "e.png")


def test_training_curves_handles_missing_keys_and_bad_lines(tmp_path, caplog):
    ce, sch = tmp_path / "ce", tmp_path / "schane"
    ce.mkdir()
    sch.mkdir()
    with open(ce / "metrics.jsonl", "w") as f:
        for ep in range(4):
            f.write(json.dumps({"epoch": ep, "step": ep * 2, "loss": 1.0 / (ep + 1), "train_acc": 0.2 * ep}) + "\n")
            f.write(json.dumps({"epoch": ep, "val_top1": 10.0 * ep, "note": "text"}) + "\n")
    with open(sch / "metrics.jsonl", "w") as f:
        for st in range(5):
            f.write(json.dumps({"step": st, "loss": 2.0 - st * 0.1, "loss_contrastive": 1.0, "loss_ce": None}) + "\n")
        f.write('{"step": 5, "loss": 1.')  # truncated last line
    out = plots.training_curves({"ce": ce, "schane": sch / "metrics.jsonl"}, tmp_path / "c.png", title="t")
    assert "metrics.jsonl:6: skipping a malformed line" in caplog.text
    assert_png(out)
    x, y, xlabel = plots._series(read_metrics(ce / "metrics.jsonl"), "loss")
    assert xlabel == "epoch" and list(x) == [0, 1, 2, 3] and y[1] == pytest.approx(0.5)
    (tmp_path / "empty.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ValueError, match="no numeric"):
        plots.training_curves(tmp_path / "empty.jsonl", tmp_path / "e.png")
    with pytest.raises(FileNotFoundError):
        plots.training_curves(tmp_path / "missing.jsonl", tmp_path / "e.png")


def test_sweep_plot(tmp_path):
    sweeps = {"loss.lam": [(0.9, 74.0, 1.0), (0.5, 70.0, None), (1.0, 72.0, 1.5)], "loss.beta": [(0.0, 71.0, 0.5)]}
    assert_png(plots.sweep_plot(sweeps, tmp_path / "s.png", baselines={"ce": 69.0}))
    with pytest.raises(ValueError, match="at least one sweep"):
        plots.sweep_plot({}, tmp_path / "s.png")


def test_training_curves_engine_format_uses_steps(tmp_path):
    recs = [{"kind": "start", "time": 1.0, "steps_per_epoch": 3}]
    for ep in range(2):
        for st in range(3):
            step = ep * 3 + st + 1
            recs.append({"kind": "train_step", "epoch": ep, "step": step, "loss": 3.0 / step, "ce": 1.0 / step,
                         "contrastive": 2.0 / step, "lr": 0.1})
        recs.append({"kind": "epoch", "epoch": ep, "step": 3 * ep + 3, "train_loss": 1.0, "train_ce": 0.5,
                     "train_contrastive": 0.0, "train_acc": 0.5, "val_top1": 0.4 + 0.1 * ep, "best_val_top1": 0.5})
    recs.append({"kind": "final", "epochs": 2, "global_step": 6})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    loaded = read_metrics(path)
    losses, accs = plots._metric_keys(loaded)
    assert losses == ["loss", "ce", "contrastive"] and accs == ["train_acc", "val_top1"]
    x, y, xlabel = plots._series(loaded, "val_top1")
    assert xlabel == "step" and list(x) == [3.0, 6.0] and y == pytest.approx([0.4, 0.5])
    assert_png(plots.training_curves({"schane": tmp_path}, tmp_path / "c.png"))
