"""End-to-end ``schane fewshot`` on the offline glyphs set with a tiny timm backbone."""

import json
import logging

import numpy as np
import pytest
import yaml

from schane.fewshot.episodes import load_episodes
from schane.pipelines.fewshot import format_table

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fewshot_run(tmp_path_factory):
    from schane.cli import main

    tmp = tmp_path_factory.mktemp("fewshot")
    cfg = {
        "name": "fs",
        "output_dir": str(tmp / "runs"),
        "model": {"backbone": "test_efficientnet", "pretrained": False, "proj_dim": 16},
        "data": {
            "name": "glyphs", "img_size": 32, "batch_size": 8, "eval_batch_size": 64, "val_fraction": 0.2,
            "options": {"cache_dir": str(tmp / "glyphs"), "n_train_classes": 6, "n_val_classes": 5,
                        "n_test_classes": 5, "samples_per_class": 6, "progress": False},
        },
        "optim": {"epochs": 1, "warmup_epochs": 0, "base_batch_size": None, "lr": 1e-3, "layer_decay": None},
        "train": {"device": "cpu", "amp": "none", "max_steps_per_epoch": 2, "progress": False},
        "fewshot": {"ways": 3, "shots": [1, 2], "queries": 3, "episodes": 8, "val_episodes": 4, "support_aug": 2,
                    "losses": ["ce", "schane"], "seeds": [0], "logreg_c_grid": [0.1, 1.0], "n_jobs": 1},
    }
    path = tmp / "fs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fewshot", "--config", str(path)]) == 0
    run_dir = tmp / "runs" / "fs"
    return run_dir, json.loads((run_dir / "fewshot.json").read_text()), path


def test_rows_episodes_and_selection(fewshot_run):
    run_dir, res, _ = fewshot_run
    assert [(r["method"], r["seed"]) for r in res["rows"]] == [("pretrained", None), ("ce", 0), ("schane", 0)]
    for r in res["rows"]:
        for shot in ("1", "2"):
            accs = np.asarray(r["per_episode"][shot])
            assert accs.shape == (8,) and np.all((accs >= 0) & (accs <= 100))
            # 3-way with 3 queries per class: accuracy is a multiple of 100/9
            np.testing.assert_allclose(accs * 9 / 100, np.round(accs * 9 / 100), atol=1e-9)
            assert r["test"][shot]["mean"] == pytest.approx(accs.mean()) and r["test"][shot]["n"] == 8
            sel = r["selected"][shot]
            assert sel["C"] in (0.1, 1.0) and sel["val_acc"] is not None  # chosen on validation classes
        if r["method"] != "pretrained":
            assert (run_dir / f"{r['method']}-seed0" / "last.pt").exists()
            assert sel["checkpoint"].startswith(str(run_dir))
    for split, n in (("val_classes", 4), ("test_classes", 8)):
        for shot in ("1", "2"):
            eps = load_episodes(res["episode_files"][split][shot], split=split)
            assert len(eps) == n and eps[0].shots == int(shot) and eps[0].ways == 3


def test_paired_differences_recomputed(fewshot_run):
    _, res, _ = fewshot_run
    per = {r["method"]: r["per_episode"] for r in res["rows"]}
    d = {(x["method"], x["baseline"], x["shot"]): x for x in res["differences"]}
    for shot in (1, 2):
        diff = np.asarray(per["schane"][str(shot)]) - np.asarray(per["ce"][str(shot)])
        x = d[("schane", "ce", shot)]
        assert x["mean"] == pytest.approx(diff.mean())
        if diff.std() > 0:
            assert x["half_width"] == pytest.approx(1.96 * diff.std(ddof=1) / np.sqrt(8))
        assert ("ce", "pretrained", shot) in d and ("schane", "pretrained", shot) in d
    one_seed = [x for x in res["seeds"] if x["method"] == "ce"]
    assert all(x["n"] == 1 and x["half_width"] is None for x in one_seed)  # no spread with one seed


def test_table_shows_rows_and_difference(fewshot_run):
    _, res, _ = fewshot_run
    table = format_table(res)
    assert "pretrained" in table and "schane − ce" in table and "excludes 0" in table
    assert "±" in table and "ddof=1" in table


def test_rerun_reuses_training_and_reproduces(fewshot_run, caplog):
    from schane.cli import main

    run_dir, res, path = fewshot_run
    caplog.set_level(logging.INFO, logger="schane")
    assert main(["fewshot", "--config", str(path)]) == 0
    assert "the run is finished" in caplog.text  # finished runs are reused, not retrained
    again = json.loads((run_dir / "fewshot.json").read_text())
    assert [r["per_episode"] for r in again["rows"]] == [r["per_episode"] for r in res["rows"]]
    assert [r["selected"] for r in again["rows"]] == [r["selected"] for r in res["rows"]]
