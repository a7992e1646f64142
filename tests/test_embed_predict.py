"""``schane embed`` and ``schane predict`` on a folder of images (subfolders, a corrupt file, files that are not
images) and on a dataset split: one row per readable image, values equal to the model's, unreadable images
listed and skipped, clear errors."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from schane.cli import main
from schane.engine.checkpoint import load_checkpoint, load_checkpoint_model, save_checkpoint
from schane.pipelines.embed import embed_images
from schane.pipelines.predict import predict_images
from schane.pipelines.splits import eval_transform_for, load_split
from schane.pipelines.train import train
from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 3  # the image_root fixture (conftest.py)


@pytest.fixture(scope="module")
def ckpt(image_root, tmp_path_factory):
    """A test_convnext fine-tuned for 2 steps on the image_root fixture."""
    return train(tiny_cfg(image_root, tmp_path_factory.mktemp("runs"), "cnx", "train.test_at_end=false")).best_checkpoint


@pytest.fixture
def folder(image_root, tmp_path):
    """User images: nested folders, an upper-case suffix, a corrupt JPEG, a text file and a hidden folder."""
    d = tmp_path / "photos"
    (d / "trip" / "day2").mkdir(parents=True)
    (d / ".cache").mkdir()
    src = sorted(image_root.rglob("*.png"))
    shutil.copy(src[0], d / "a.png")
    shutil.copy(src[13], d / "trip" / "b.PNG")
    shutil.copy(src[30], d / "trip" / "day2" / "c.png")
    Image.open(src[5]).save(d / "trip" / "d.jpg")
    shutil.copy(src[7], d / ".cache" / "hidden.png")
    (d / "trip" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    return d


READABLE = ["a.png", "trip/b.PNG", "trip/d.jpg", "trip/day2/c.png"]


def _reference(ckpt, paths):
    """The model's outputs on ``paths``, computed image by image with the run's evaluation transform."""
    model, cfg, _ = load_checkpoint_model(ckpt)
    tf = eval_transform_for(cfg, model)
    with torch.no_grad():
        return model(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_embed_a_folder_writes_one_row_per_readable_image(ckpt, folder, tmp_path):
    res = embed_images(ckpt, folder, out=tmp_path / "out" / "emb.npy", progress=False)
    assert [f.name for f in res.files] == ["emb.npy", "emb.csv"] and res.n == 4 and res.kind == "features"
    rows = _rows(tmp_path / "out" / "emb.csv")
    assert [r["path"] for r in rows] == [str(folder / p) for p in READABLE]
    assert all(r["label"] == "" and r["class"] == "" for r in rows)  # a plain folder: no labels
    emb = np.load(tmp_path / "out" / "emb.npy")
    want = _reference(ckpt, [folder / p for p in READABLE])
    assert emb.shape == (4, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, want.features.numpy(), rtol=1e-4, atol=1e-5)
    # the corrupt file is listed with its reason, not fatal
    assert res.skipped_file == tmp_path / "out" / "emb.skipped.csv"
    skipped = _rows(res.skipped_file)
    assert [s["path"] for s in skipped] == [str(folder / "trip" / "broken.jpg")] and "cannot decode" in skipped[0]["reason"]


def test_embed_projections_with_dataloader_workers(ckpt, folder, tmp_path):
    res = embed_images(ckpt, folder, out=tmp_path / "proj", projections=True, progress=False,
                       overrides=["data.num_workers=1", "data.eval_batch_size=3"])
    emb = np.load(tmp_path / "proj.npy")
    assert res.kind == "projections" and emb.shape == (4, 128) and res.skipped_file is not None
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    want = _reference(ckpt, [folder / p for p in READABLE])
    np.testing.assert_allclose(emb, want.projections.numpy(), rtol=1e-4, atol=1e-5)


def test_embed_a_dataset_split_keeps_labels_and_class_names(ckpt, image_root, tmp_path):
    res = embed_images(ckpt, image_root, split="val", out=tmp_path / "val.npy", progress=False)
    model, cfg, _ = load_checkpoint_model(ckpt)
    val = load_split(cfg, "val")
    rows = _rows(tmp_path / "val.csv")
    assert res.n == len(val) == len(rows) and res.skipped_file is None
    assert [r["path"] for r in rows] == [str(p) for p in val.samples]
    assert [int(r["label"]) for r in rows] == val.targets
    assert [r["class"] for r in rows] == [val.classes[t] for t in val.targets]
    assert all(r["class"] == r["path"].split("/")[-2] for r in rows)  # the folder a picture lies in is its class
    np.testing.assert_allclose(np.load(tmp_path / "val.npy"), _reference(ckpt, val.samples).features.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_embed_to_parquet(ckpt, folder, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    res = embed_images(ckpt, folder, out=tmp_path / "emb.parquet", progress=False)
    embed_images(ckpt, folder, out=tmp_path / "emb.npy", progress=False)
    table = pq.read_table(res.files[0])
    assert table.column_names == ["path", "label", "class", "embedding"]
    assert table.column("path").to_pylist() == [str(folder / p) for p in READABLE]
    assert table.column("label").null_count == 4
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), dtype=np.float32),
                                  np.load(tmp_path / "emb.npy"))


def test_predict_writes_the_top_k_classes_of_each_readable_image(ckpt, folder, tmp_path):
    res = predict_images(ckpt, folder, tmp_path / "pred.csv", topk=2, progress=False)
    rows = _rows(tmp_path / "pred.csv")
    assert res.n == len(rows) == 4 and res.topk == 2
    assert list(rows[0]) == ["path", "top1_class", "top1_index", "top1_prob", "top2_class", "top2_index", "top2_prob"]
    assert [r["path"] for r in rows] == [str(folder / p) for p in READABLE]
    probs = _reference(ckpt, [folder / p for p in READABLE]).logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    for r, p, i in zip(rows, top.values.tolist(), top.indices.tolist(), strict=True):
        assert [int(r["top1_index"]), int(r["top2_index"])] == i
        assert [r["top1_class"], r["top2_class"]] == [f"class_{k}" for k in i]
        np.testing.assert_allclose([float(r["top1_prob"]), float(r["top2_prob"])], p, atol=2e-6)
    assert [s["path"] for s in _rows(tmp_path / "pred.skipped.csv")] == [str(folder / "trip" / "broken.jpg")]
    # more classes asked than the model has: all of them
    assert predict_images(ckpt, folder, tmp_path / "all.csv", topk=10, progress=False).topk == N_CLASSES
    # a second run without unreadable images removes the stale list
    (folder / "trip" / "broken.jpg").unlink()
    assert predict_images(ckpt, folder, tmp_path / "pred.csv", progress=False).skipped_file is None
    assert not (tmp_path / "pred.skipped.csv").exists()


def test_predict_without_stored_class_names_writes_indices(ckpt, folder, tmp_path, caplog):
    state = load_checkpoint(ckpt)
    del state["class_names"]  # as written by schane < 0.2
    old = save_checkpoint(tmp_path / "old.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    with caplog.at_level("WARNING", logger="schane"):
        predict_images(old, folder, tmp_path / "p.csv", topk=1, progress=False)
    rows = _rows(tmp_path / "p.csv")
    assert "stores no class names" in caplog.text
    assert all(r["top1_class"] == r["top1_index"] for r in rows)


def test_cli_embed_and_predict(ckpt, folder, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(ckpt), "--images", str(folder), "--out", str(tmp_path / "p.csv"),
                 "--topk", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 images, top 1 classes" in out and "1 unreadable image(s) skipped" in out
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(tmp_path / "e.npy"),
                 "--projections", "--set", "train.device=cpu"]) == 0
    assert "4 images, projections of 128 dimensions" in capsys.readouterr().out


def _error(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"schane {argv[0]}: error: ") and err.count(": error:") == 1, err
    return last


def test_errors_are_one_line_with_exit_2(ckpt, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert "no image files" in _error(["predict", "--checkpoint", str(ckpt), "--images", str(tmp_path / "empty")],
                                      capsys)
    assert "does not exist" in _error(["embed", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "e.npy")], capsys)
    assert "not found" in _error(["predict", "--checkpoint", str(tmp_path / "no.pt"), "--images", str(tmp_path)],
                                 capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    assert "none of the 1 images could be read" in _error(
        ["predict", "--checkpoint", str(ckpt), "--images", str(bad), "--out", str(tmp_path / "p.csv")], capsys)
    assert (tmp_path / "p.skipped.csv").is_file() and not (tmp_path / "p.csv").exists()
    assert "--data FOLDER" in _error(["embed", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.npy")], capsys)
    assert "has no split 'nope'" in _error(["embed", "--checkpoint", str(ckpt), "--split", "nope",
                                            "--out", str(tmp_path / "e.npy")], capsys)
    assert ".npy file" in _error(["embed", "--checkpoint", str(ckpt), "--data", str(bad),
                                  "--out", str(tmp_path / "e.txt")], capsys)
    assert "--topk must be a positive integer" in _error(
        ["predict", "--checkpoint", str(ckpt), "--images", str(bad), "--topk", "0"], capsys)


def test_parquet_without_pyarrow_is_a_clear_error(ckpt, folder, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    msg = _error(["embed", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(tmp_path / "e.parquet")],
                 capsys)
    assert "needs pyarrow" in msg and not (tmp_path / "e.parquet").exists()
