"""Few-shot mode for your own data: ``image_folder`` and ``csv`` with ``class_splits`` / ``class_fractions``.

The fixtures are what users hand us: a folder per class (``root/<class>/*.png``, or under ``train/`` and
``test/``) and ``train.csv``/``test.csv`` files of ``path,label`` rows.
"""

import csv
import json
import logging

import numpy as np
import pytest
import yaml
from PIL import Image

from schane.data import dataset_info, get_dataset
from schane.data.base import FEWSHOT_SPLITS
from schane.data.custom import read_class_lists, resolve_class_lists, write_class_lists

NAMES = ["ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen", "owl", "yak"]
LISTS = {"train": NAMES[:4], "val": NAMES[4:7], "test": NAMES[7:]}
pytestmark = pytest.mark.usefixtures("one_thread")


PER_CLASS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``root/<class>/<i>.png``: 10 classes of 8 small images, each class with its own colour."""
    root = tmp_path_factory.mktemp("own") / "photos"
    rng = np.random.default_rng(0)
    for k, c in enumerate(NAMES):
        (root / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            a = rng.random((20, 20, 3)) * 60
            a[..., k % 3] += 80 + 15 * k
            Image.fromarray(a.astype(np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def csv_root(folder):
    """``train.csv`` (5 images a class) and ``test.csv`` (3) with a header, paths relative to the CSV folder."""
    root = folder.parent
    for name, part in (("train.csv", range(0, 5)), ("test.csv", range(5, PER_CLASS))):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([f"photos/{c}/{i}.png", c] for c in NAMES for i in part)
    return root


def _split(name, root, split, **options):
    return get_dataset(name, str(root), split, seed=0, val_fraction=0.25, **options)


# --------------------------------------------------------------------------- kind and splits follow the options


def test_kind_and_splits_follow_the_options():
    for name in ("image_folder", "csv"):
        assert dataset_info(name).kind == "classification"  # without options, as before
        assert dataset_info(name, options={"classes": ["a", "b"]}).splits == ("train", "val", "test")
        for opts in ({"class_splits": LISTS}, {"class_splits": "splits/"}, {"class_fractions": [0.4, 0.3, 0.3]}):
            info = dataset_info(name, options=opts)
            assert (info.kind, info.splits) == ("fewshot", FEWSHOT_SPLITS)
        assert dataset_info(name, options={"class_splits": None}).kind == "classification"
    assert dataset_info("cifar_fs", options={}).kind == "fewshot"


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"class_splits": LISTS, "class_fractions": [0.4, 0.3, 0.3]}, "not both"),
        ({"class_fractions": [0.5, 0.5]}, r"three numbers \[base, val, novel\]"),
        ({"class_fractions": [0.5, 0.3, 0.3]}, "sum to 1"),
        ({"class_fractions": [0.8, 0.2, 0.0]}, "each be > 0"),
        ({"class_splits": {"train": NAMES[:4], "val": NAMES[4:7]}}, "exactly the keys train"),
        ({"class_splits": {"train": "ant", "val": ["b"], "test": ["c"]}}, "class_splits.train must be a list"),
        ({"class_splits": 3}, "must be {train"),
    ],
)
def test_malformed_options_are_named_without_reading_files(opts, match):
    with pytest.raises(ValueError, match=match):
        dataset_info("image_folder", options=opts)
    with pytest.raises(ValueError, match=match):
        get_dataset("image_folder", "/does/not/matter", "train", **opts)


# --------------------------------------------------------------------------- class_splits


def test_class_splits_lists_make_class_disjoint_splits(folder):
    parts = {s: _split("image_folder", folder, s, class_splits=LISTS) for s in FEWSHOT_SPLITS}
    assert parts["train"].classes == parts["val"].classes == LISTS["train"]
    assert parts["val_classes"].classes == LISTS["val"] and parts["test_classes"].classes == LISTS["test"]
    for s, ds in parts.items():
        assert ds.split == s and ds.class_lists == LISTS
        assert sorted(set(ds.targets)) == list(range(len(ds.classes)))
        for path, label in zip(ds.samples, ds.targets, strict=True):
            assert path.parent.name == ds.classes[label]  # label order = the list's order
    # base classes: every image once, in train or in the seeded hold-out
    base = sorted(map(str, parts["train"].samples + parts["val"].samples))
    assert base == sorted(str(p) for c in LISTS["train"] for p in (folder / c).iterdir())
    assert not set(parts["train"].samples) & set(parts["val"].samples) and len(parts["val"]) == 4 * 2
    assert len(parts["val_classes"]) == len(parts["test_classes"]) == 3 * PER_CLASS
    other = get_dataset("image_folder", str(folder), "val", seed=1, val_fraction=0.25, class_splits=LISTS)
    assert other.samples != parts["val"].samples  # the hold-out follows the seed


def test_class_splits_folder_round_trip(folder, tmp_path, monkeypatch):
    out = write_class_lists(LISTS, tmp_path / "lists")
    assert (out / "test.txt").read_text() == "hen\nowl\nyak\n"
    assert read_class_lists(out) == LISTS
    ds = _split("image_folder", folder, "test_classes", class_splits=str(out))
    assert ds.classes == LISTS["test"] and ds.class_lists == LISTS
    monkeypatch.chdir(tmp_path)  # a relative folder: from the working directory
    assert _split("image_folder", folder, "val_classes", class_splits="lists").classes == LISTS["val"]
    (out / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val.txt not found.*one class name per line"):
        _split("image_folder", folder, "train", class_splits=str(out))
    with pytest.raises(FileNotFoundError, match="class_splits: no folder at"):
        _split("image_folder", folder, "train", class_splits="no_such_folder")


@pytest.mark.parametrize(
    ("lists", "match"),
    [
        ({**LISTS, "test": ["hen", "owl", "zebra", "yeti"]}, r"names 2 class\(es\) that .* does not have: zebra, yeti"),
        ({**LISTS, "test": ["hen", "owl", "ant"]}, r"must be disjoint.*ant \(train and test\)"),
        ({**LISTS, "val": ["elk", "fox", "elk"]}, r"class_splits.val lists elk more than once"),
        ({**LISTS, "val": ["elk"]}, r"class_splits.val has 1 class\(es\); each list needs at least 2"),
    ],
)
def test_bad_class_lists_are_named(folder, lists, match):
    with pytest.raises(ValueError, match=match):
        _split("image_folder", folder, "train", class_splits=lists)


def test_few_shot_mode_has_no_test_split(folder):
    with pytest.raises(ValueError, match=r"few-shot set with splits \('train', 'val', 'val_classes', 'test_classes'\)"):
        _split("image_folder", folder, "test", class_splits=LISTS)


def test_unlisted_classes_are_unused_and_logged(folder, caplog):
    caplog.set_level(logging.INFO, logger="schane")
    lists = {"train": ["ant", "bee"], "val": ["cat", "dog"], "test": ["elk", "fox"]}
    ds = _split("image_folder", folder, "train", class_splits=lists)
    assert ds.classes == ["ant", "bee"]
    assert "4 class(es) of" in caplog.text and "gnu, hen, owl, yak" in caplog.text


def test_train_and_test_folders_are_pooled(folder, tmp_path):
    for part, idx in (("train", range(0, 5)), ("test", range(5, 8))):
        for c in NAMES:
            (tmp_path / part / c).mkdir(parents=True)
            for i in idx:
                (tmp_path / part / c / f"{i}.png").write_bytes((folder / c / f"{i}.png").read_bytes())
    ds = _split("image_folder", tmp_path, "test_classes", class_splits=LISTS)
    assert len(ds) == 3 * PER_CLASS and {p.parent.parent.name for p in ds.samples} == {"train", "test"}


# --------------------------------------------------------------------------- class_fractions


def test_class_fractions_are_seeded_and_written_lists_reproduce_them(folder, tmp_path):
    opts = {"class_fractions": [0.4, 0.3, 0.3], "split_seed": 3}
    ds = _split("image_folder", folder, "val_classes", **opts)
    lists = ds.class_lists
    assert [len(lists[p]) for p in ("train", "val", "test")] == [4, 3, 3]
    assert sorted(lists["train"] + lists["val"] + lists["test"]) == NAMES
    for part in lists.values():
        assert part == sorted(part, key=NAMES.index)  # each list keeps the data's class order
    assert _split("image_folder", folder, "train", **opts).class_lists == lists  # same seed, same lists
    seeds = {tuple(_split("image_folder", folder, "train", class_fractions=[0.4, 0.3, 0.3], split_seed=s)
                   .class_lists["test"]) for s in range(6)}
    assert len(seeds) > 1  # the seed moves the classes
    back = _split("image_folder", folder, "val_classes", class_splits=str(write_class_lists(lists, tmp_path / "l")))
    assert (back.classes, back.samples, back.targets) == (ds.classes, ds.samples, ds.targets)


def test_class_fractions_that_leave_a_list_too_short():
    with pytest.raises(ValueError, match=r"of 5 classes gives 3 base, 1 validation and 1 novel"):
        resolve_class_lists("image_folder", NAMES[:5], class_fractions=[0.6, 0.2, 0.2])
    lists = resolve_class_lists("image_folder", NAMES, class_fractions=[0.6, 0.2, 0.2], split_seed=0)
    assert [len(lists[p]) for p in ("train", "val", "test")] == [6, 2, 2]


# --------------------------------------------------------------------------- csv


def test_csv_rows_of_both_files_are_pooled(csv_root):
    ds = _split("csv", csv_root, "test_classes", class_splits=LISTS)
    assert ds.classes == LISTS["test"] and len(ds) == 3 * PER_CLASS
    base = _split("csv", csv_root, "train", class_splits=LISTS)
    hold = _split("csv", csv_root, "val", class_splits=LISTS)
    assert len(base) + len(hold) == 4 * PER_CLASS
    write_class_lists(LISTS, csv_root / "splits")
    assert _split("csv", csv_root, "val_classes", class_splits="splits").classes == LISTS["val"]  # relative to root
    with pytest.raises(ValueError, match="does not have: zebra"):
        _split("csv", csv_root, "train", class_splits={**LISTS, "test": ["hen", "owl", "zebra"]})


# --------------------------------------------------------------------------- schane fewshot end to end


def _config(tmp, data, **fewshot):
    return {
        "name": "own",
        "output_dir": str(tmp / "runs"),
        "model": {"backbone": "test_efficientnet", "pretrained": False, "proj_dim": 16},
        "data": {"img_size": 32, "batch_size": 8, "eval_batch_size": 64, "val_fraction": 0.25, **data},
        "optim": {"epochs": 1, "warmup_epochs": 0, "base_batch_size": None, "lr": 1e-3, "layer_decay": None},
        "train": {"device": "cpu", "amp": "none", "max_steps_per_epoch": 2, "progress": False},
        "fewshot": {"ways": 3, "shots": [1], "queries": 3, "episodes": 4, "val_episodes": 2, "support_aug": 1,
                    "losses": ["ce"], "seeds": [0], "n_jobs": 1, **fewshot},
    }


def _run_cli(args):
    from schane.cli import main

    return main(args)


@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
    """``schane fewshot`` on the class folder: 3-way, 4 base, 3 validation and 3 novel classes."""
    tmp = tmp_path_factory.mktemp("fewshot_own")
    cfg = _config(tmp, {"name": "image_folder", "root": str(folder), "options": {"class_splits": LISTS}})
    path = tmp / "own.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _run_cli(["fewshot", "--config", str(path)]) == 0
    run_dir = tmp / "runs" / "own"
    return run_dir, json.loads((run_dir / "fewshot.json").read_text())


def test_fewshot_runs_on_a_class_folder(folder_run):
    from schane.engine.checkpoint import load_checkpoint
    from schane.fewshot.episodes import load_episodes
    from schane.pipelines.fewshot import format_table

    run_dir, res = folder_run
    assert [(r["method"], r["seed"]) for r in res["rows"]] == [("pretrained", None), ("ce", 0)]
    for r in res["rows"]:
        accs = np.asarray(r["per_episode"]["1"])
        assert accs.shape == (4,) and np.all((accs >= 0) & (accs <= 100))
        np.testing.assert_allclose(accs * 9 / 100, np.round(accs * 9 / 100), atol=1e-9)  # 3-way x 3 queries
    for split, n in (("val_classes", 2), ("test_classes", 4)):
        eps = load_episodes(res["episode_files"][split]["1"], split=split)
        assert len(eps) == n and eps[0].ways == 3 and eps[0].queries == 3
    assert load_checkpoint(run_dir / "ce-seed0" / "last.pt")["class_names"] == LISTS["train"]  # base classes only
    assert res["class_splits"] == str(run_dir / "class_splits") and read_class_lists(res["class_splits"]) == LISTS
    overlap = res["pretraining_overlap"]
    assert overlap["status"] == "random" and overlap["splits"]["test_classes"]["classes"] == 3
    assert overlap["message"] in format_table(res)


def test_fewshot_runs_on_a_csv_with_class_fractions(csv_root, tmp_path):
    from schane.config import from_dict
    from schane.pipelines.fewshot import run_fewshot

    opts = {"class_fractions": [0.4, 0.3, 0.3], "split_seed": 1}
    cfg = from_dict(_config(tmp_path, {"name": "csv", "root": str(csv_root), "options": opts}, include_pretrained=False))
    res = run_fewshot(cfg)
    lists = get_dataset("csv", str(csv_root), "train", **opts).class_lists
    assert read_class_lists(res["class_splits"]) == lists  # the drawn lists are in the run directory
    assert [r["method"] for r in res["rows"]] == ["ce"] and len(res["rows"][0]["per_episode"]["1"]) == 4
    assert json.loads((tmp_path / "runs" / "own" / "fewshot.json").read_text())["class_splits"] == res["class_splits"]


def test_too_small_splits_are_named_before_training(folder, tmp_path):
    from schane.config import from_dict
    from schane.pipelines.fewshot import run_fewshot

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    data = {"name": "image_folder", "root": str(folder), "options": {"class_splits": LISTS}}
    with pytest.raises(ValueError, match=r"val_classes has 3 class\(es\) \(elk, fox, gnu\) but 4-way episodes"):
        run_fewshot(from_dict(_config(tmp_path, data, ways=4)), train_fn=no_training)
    with pytest.raises(ValueError, match=r"fewer than shots \+ queries = 2 \+ 7 = 9 images: elk \(8\)"):
        run_fewshot(from_dict(_config(tmp_path, data, shots=[1, 2], queries=7)), train_fn=no_training)


def test_cli_names_a_bad_class_list_in_one_line(folder, tmp_path, capsys):
    lists = {**LISTS, "test": ["hen", "owl", "zebra"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, {"name": "image_folder", "root": str(folder),
                                                      "options": {"class_splits": lists}})))
    assert _run_cli(["fewshot", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("schane fewshot: error:") and "zebra" in err[-1]
    assert not (tmp_path / "runs" / "own" / "ce-seed0").exists()


def test_analyze_works_on_own_fewshot_data(folder_run, tmp_path):
    from schane.pipelines.compare import analyze_checkpoint

    run_dir, _ = folder_run
    result = analyze_checkpoint(run_dir / "ce-seed0" / "last.pt", split="test", out_dir=tmp_path)
    assert result["split"] == "test_classes" and result["n"] == 3 * PER_CLASS


def test_own_classes_named_by_wordnet_ids_are_checked_against_imagenet(tmp_path, caplog):
    """ImageNet class folders as own data, with the bundled ImageNet-1k backbone: the overlap is counted."""
    from schane.config import from_dict
    from schane.data.base import read_split_lines
    from schane.pipelines.fewshot import run_fewshot

    wnids = read_split_lines("mini_imagenet", "test.txt")[:8]
    rng = np.random.default_rng(1)
    for k, w in enumerate(wnids):
        (tmp_path / "imagenet_like" / w).mkdir(parents=True)
        for i in range(5):
            a = rng.random((20, 20, 3)) * 60
            a[..., k % 3] += 120
            Image.fromarray(a.astype(np.uint8)).save(tmp_path / "imagenet_like" / w / f"{w}_{i}.JPEG")
    lists = {"train": wnids[:2], "val": wnids[2:5], "test": wnids[5:]}
    data = {"name": "image_folder", "root": str(tmp_path / "imagenet_like"), "options": {"class_splits": lists}}
    cfg = _config(tmp_path, data, losses=[], queries=2, episodes=2)
    cfg["model"] = {"backbone": "effnet-lite0-offline", "proj_dim": 16}
    caplog.set_level(logging.INFO, logger="schane")
    res = run_fewshot(from_dict(cfg))
    report = res["pretraining_overlap"]
    assert report["status"] == "overlap" and report["pretraining"][0]["label_set"] == "ImageNet-1k"
    assert report["splits"]["test_classes"]["in_pretraining"] == 3 and report["splits"]["val_classes"]["in_pretraining"] == 3
    assert "3/3 novel (test_classes)" in report["message"]
    assert any(r.levelno == logging.WARNING and "3/3 novel" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "runs" / "own" / "fewshot.json").read_text())
    assert saved["pretraining_overlap"]["splits"] == report["splits"]
