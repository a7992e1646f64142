"""``--data PATH``: layouts, split lists, the recipe and plan, validation before any model is built, the run
report, and every command of the README's "Your own images" section run on a tiny folder."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schane.cli import main
from schane.data import get_dataset
from schane.data.custom import read_split_lists
from schane.pipelines.own_data import config_for_data, detect_data, recipe

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["model.backbone=test_convnext", "model.pretrained=false", "optim.epochs=1", "data.batch_size=8",
        "data.eval_batch_size=16", "train.progress=false"]


def _folder(root: Path, classes: int, per_class: int, size: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.random((size, size, 3)) * 90
            a[..., c % 3] += 100 + 15 * (c // 3)
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("own") / "photos", classes=4, per_class=15)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("val_dir", ["val", "valid", "validation"])
def test_split_folders_with_a_validation_folder(tmp_path, val_dir):
    for part, n in [("train", 6), (val_dir, 2), ("test", 3)]:
        _folder(tmp_path / part, classes=2, per_class=n)
    sizes = {s: len(get_dataset("image_folder", str(tmp_path), s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 12, "val": 4, "test": 6}


def test_train_and_validation_only_hold_out_a_test_split(tmp_path):
    _folder(tmp_path / "train", classes=2, per_class=10)
    _folder(tmp_path / "validation", classes=2, per_class=2)
    tr, va, te = (get_dataset("image_folder", str(tmp_path), s, test_fraction=0.2) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (16, 4, 4)
    assert not {str(p) for p in te.samples} & {str(p) for p in tr.samples}
    assert all("validation" in str(p) for p in va.samples)


def test_two_validation_folders_are_refused(tmp_path):
    for part in ("train", "val", "validation"):
        _folder(tmp_path / part, classes=2, per_class=2)
    with pytest.raises(ValueError, match="keep one validation folder"):
        get_dataset("image_folder", str(tmp_path), "train")


def test_a_class_named_like_a_split_is_still_a_class(tmp_path):
    _folder(tmp_path, classes=2, per_class=3)
    (tmp_path / "train").mkdir()  # flat layout with a class folder called train
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "train" / f"{i}.png")
    ds = get_dataset("image_folder", str(tmp_path), "train", val_fraction=0.0)
    assert sorted(ds.classes) == ["class_00", "class_01", "train"]


def test_detect_data(tmp_path, photos):
    assert detect_data(photos)[:1] == ("image_folder",)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n")
    name, root, opts, _ = detect_data(csv)
    assert name == "csv" and opts["train_csv"].endswith("labels.csv") and root == str(tmp_path.resolve())
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        detect_data(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=r"\.csv"):
        detect_data(tmp_path / "x.txt")


# --------------------------------------------------------------------------- recipe, plan, split lists


def test_config_for_data_writes_stratified_disjoint_split_lists(tmp_path, photos):
    cfg, plan = config_for_data(photos, None, [f"output_dir={tmp_path}"], time_step=False)
    lists = Path(cfg.data.options["split_lists"])
    assert lists == (tmp_path / "photos" / "splits").resolve()
    parts = read_split_lists("image_folder", photos, lists)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sum(sizes.values()) == 60 and sizes == plan.data.counts
    # 10% of every class for test (2 of 15) and about 10% of the whole for validation (1 of 13)
    for part, per_class in [("test", 2), ("val", 1)]:
        assert np.bincount(parts[part].targets).tolist() == [per_class] * 4
    paths = [{str(p) for p in d.samples} for d in parts.values()]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    # the run reads its split back from the lists
    assert [str(p) for p in get_dataset("image_folder", str(photos), "test", **cfg.data.options).samples] == [
        str(p) for p in parts["test"].samples]


def test_split_lists_are_kept_when_images_are_added(tmp_path):
    root = _folder(tmp_path / "photos", classes=3, per_class=10)
    cfg, _ = config_for_data(root, None, [f"output_dir={tmp_path / 'runs'}"], time_step=False)
    before = (Path(cfg.data.options["split_lists"]) / "test.csv").read_text()
    _folder(root, classes=3, per_class=20, seed=1)  # more images land in the folder
    cfg2, plan2 = config_for_data(root, None, [f"output_dir={tmp_path / 'runs'}"], time_step=False)
    assert (Path(cfg2.data.options["split_lists"]) / "test.csv").read_text() == before
    assert any("reused" in n for n in plan2.notes)


def test_recipe_follows_the_images_and_keeps_what_the_user_sets(tmp_path, photos):
    cfg, plan = config_for_data(photos, None, [f"output_dir={tmp_path}", "optim.lr=1e-4", "optim.epochs=2"], time_step=False)
    assert cfg.data.img_size == 32  # 20-px images: rounded up to 32, not 224
    assert cfg.optim.lr == 1e-4 and cfg.optim.epochs == 2
    assert cfg.optim.warmup_epochs == pytest.approx(0.2)  # follows the epochs you set
    assert {"optim.lr", "optim.epochs"} <= plan.user
    text = plan.line()
    assert "60 images of 4 classes" in text and "data.img_size=32" in text and "kept as you set them" in text
    assert "optim.lr=" not in text.split("kept as you set them")[0].split("chosen for this data")[-1]


def test_recipe_on_large_images_and_transformers():
    from schane.pipelines.own_data import DataSummary

    def summary(n, side):
        return DataSummary("image_folder", "x", {}, ["a", "b"], {"train": n, "val": 1, "test": 1}, [], side, "")

    assert recipe(summary(1000, 500), "effnet-lite0-offline")["data.img_size"][0] == 224
    assert recipe(summary(1000, 70), "effnet-lite0-offline")["data.img_size"][0] == 96
    assert recipe(summary(1000, 28), "vit_small_patch16_224")["data.img_size"][0] == 224
    small = recipe(summary(40, 28), "effnet-lite0-offline")
    assert small["data.batch_size"][0] == 8 and small["optim.epochs"][0] == 40
    big = recipe(summary(200_000, 28), "effnet-lite0-offline")
    assert big["optim.epochs"][0] == 3


def test_a_demo_config_layered_on_own_data_drops_the_glyph_options(tmp_path, photos):
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg, plan = config_for_data(photos, demo, [f"output_dir={tmp_path}", "data.batch_size=16"], time_step=False)
    assert cfg.data.name == "image_folder" and "n_train_classes" not in cfg.data.options
    assert cfg.optim.lr == 3e-3 and cfg.optim.epochs == 3  # the file's values win over the recipe
    assert any("n_train_classes" in n and "dropped" in n for n in plan.notes)


# --------------------------------------------------------------------------- validation before work


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a model is built: these configs must be refused before."""
    import schane.models

    def refuse(*a, **k):
        raise AssertionError("a model was built before the config was refused")

    monkeypatch.setattr(schane.models, "build_model", refuse)


@pytest.mark.parametrize("extra, message", [
    (["optim.epochs=1", "optim.warmup_epochs=2"], "optim.warmup_epochs: 2 is longer than optim.epochs=1"),
    (["data.batch_size=64", "model.backbone=test_convnext"], "fewer than one global batch"),
    (["data.img_size=4"], "data.img_size: must be >= 8"),
])
def test_bad_configs_stop_before_any_model_is_built(tmp_path, photos, capsys, no_model, extra, message):
    rc = main(["train", "--data", str(photos), "--set", f"output_dir={tmp_path}", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_fewshot_ways_are_checked_against_the_classes_before_work(tmp_path, capsys, no_model):
    photos = _folder(tmp_path / "photos", classes=10, per_class=3)
    rc = main(["fewshot", "--data", str(photos), "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "5-way episodes need at least 5" in err, err


def test_train_without_data_or_config_says_what_to_give(capsys):
    assert main(["train"]) == 2
    assert "--data DIR" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end + report


@pytest.fixture(scope="module")
def trained(tmp_path_factory, photos, one_thread):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--data", str(photos), "--set", f"output_dir={out}", *TINY]) == 0
    return out / "photos"


def test_train_holds_out_a_test_split_and_writes_the_report(trained):
    final = json.loads((trained / "final.json").read_text())
    assert final["test"]["n"] == 8 and 0.0 <= final["test"]["top1"] <= 1.0
    report = (trained / "report.md").read_text()
    assert f"top-1 {100 * final['test']['top1']:.2f}%" in report
    for png in ("confusion.png", "per_class.png", "curves.png"):
        assert (trained / "report" / png).stat().st_size > 1000
    data = json.loads((trained / "report.json").read_text())
    assert sum(map(sum, data["confusion"])) == 8
    assert data["test_top1"] == pytest.approx(final["test"]["top1"])


def test_eval_reads_the_same_split_lists(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained / "best.pt"), "--json", str(trained / "e.json")]) == 0
    e = json.loads((trained / "e.json").read_text())
    final = json.loads((trained / "final.json").read_text())
    assert e["n"] == final["test"]["n"] and e["top1"] == pytest.approx(final["test"]["top1"])


def test_predict_given_an_export_says_what_it_is(trained, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    rc = main(["predict", "--checkpoint", str(tmp_path / "exp" / "model.safetensors"), "--images", str(trained)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a schane export" in err and "best.pt" in err and "corrupt" not in err


def _readme_commands() -> list[str]:
    text = README.read_text()
    section = text.split("## Your own images", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip().startswith("schane ")]


def test_every_command_of_the_readme_section_runs(tmp_path, monkeypatch, one_thread, capsys):
    """The README's "Your own images" commands, in order, on a tiny folder (tiny model and budget added)."""
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "photos", classes=10, per_class=6)
    _folder(tmp_path / "new_photos" / "x", classes=1, per_class=3, seed=2)
    commands = _readme_commands()
    assert [c.split()[1] for c in commands] == ["train", "eval", "report", "predict", "export", "embed", "fewshot"]
    fewshot = ["fewshot.ways=2", "fewshot.shots=[1]", "fewshot.queries=2", "fewshot.episodes=4",
               "fewshot.val_episodes=2", "fewshot.support_aug=0", "fewshot.losses=[ce]"]
    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        if argv[0] == "train":
            argv += ["--set", *TINY]
        if argv[0] == "fewshot":
            argv += ["--set", *TINY, *fewshot]
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"{cmd}: {out.err[-2000:]}"
        if argv[0] == "train":  # the plan, with the estimated time, comes before training; the report at the end
            assert re.search(r"plan: about \d+ s on this machine", out.err), out.err
            assert out.err.index("plan: about") < out.err.index("estimated time:")
            assert "report: " in out.out
    assert (tmp_path / "runs" / "photos" / "report.md").is_file()
    assert (tmp_path / "predictions.csv").read_text().count("\n") == 4
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert np.load(tmp_path / "test_features.npy").shape[0] == 10
    assert (tmp_path / "runs" / "photos-fewshot" / "fewshot.json").is_file()


def test_a_moved_run_directory_finds_its_split_lists(trained, tmp_path, capsys):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    before = json.loads((trained / "final.json").read_text())["test"]
    shutil.move(str(trained / "splits"), str(tmp_path / "away"))
    try:
        assert main(["eval", "--checkpoint", str(moved / "best.pt"), "--json", str(tmp_path / "e.json")]) == 0
    finally:
        shutil.move(str(tmp_path / "away"), str(trained / "splits"))
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["n"] == before["n"] and e["top1"] == pytest.approx(before["top1"])


@pytest.mark.parametrize("store", ["hf", "wds"])
def test_train_data_reads_hugging_face_datasets_and_shards(tmp_path, store, one_thread, capsys):
    """``--data`` recognises a save_to_disk folder and WebDataset shards (fixtures written by ``datasets`` and
    ``webdataset`` themselves, tests/stores.py) and trains on them with their own splits."""
    from stores import write_folders, write_hf, write_wds

    folders = write_folders(tmp_path / "folders", {"train": 12, "test": 4})
    data = write_hf(folders, tmp_path / "ds", parquet=False) if store == "hf" else write_wds(folders, tmp_path / "ds")
    rc = main(["train", "--data", str(data), "--set", f"output_dir={tmp_path / 'runs'}", *TINY,
               *(["data.options.cache_dir=" + str(tmp_path / "cache")] if store == "hf" else [])])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert ("Hugging Face dataset" if store == "hf" else "WebDataset shards") in out.err
    final = json.loads((tmp_path / "runs" / "ds" / "final.json").read_text())
    assert final["test"]["n"] == 12  # the stored test split, 4 images of each of 3 classes
    assert not (tmp_path / "runs" / "ds" / "splits").exists()
