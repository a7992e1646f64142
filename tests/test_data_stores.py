"""Hugging Face datasets (save_to_disk, the Hub's parquet layout) and WebDataset shards.

Fixtures (``tests/stores.py``) are written by ``datasets`` itself and by ``webdataset.TarWriter``; the same
images are also class folders, so every storage is checked against the folder reader.
"""

from __future__ import annotations

import io
import json
import pickle
import socket
import tarfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from fixtures import Payload
from schane.cli import main
from schane.data import get_dataset
from schane.data import hf as hf_mod
from schane.data import wds as wds_mod
from schane.data.wds import ShardStream
from schane.pipelines.train import train
from stores import CLASSES, rank_worker, write_folders, write_hf, write_wds
from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN, TEST = 8, 4  # images per class


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    folders = write_folders(root / "folders", {"train": TRAIN, "test": TEST})
    return {
        "folders": ("image_folder", folders, []),
        "disk": ("hf", write_hf(folders, root / "disk", parquet=False), []),
        "parquet": ("hf", write_hf(folders, root / "parquet", parquet=True),
                    [f"data.options.cache_dir={root / 'hf_cache'}"]),
        "wds": ("wds", write_wds(folders, root / "wds", per_shard=5), []),
    }


def _load(store, split, **kw):
    name, root, sets = store
    opts = {s.split("=", 1)[0].removeprefix("data.options."): s.split("=", 1)[1] for s in sets}
    return get_dataset(name, str(root), split, **opts, **kw)


def _pixels(ds):
    return [(np.asarray(img).tobytes(), label) for img, label in (ds[i] for i in range(len(ds)))]


@pytest.mark.parametrize("kind", ["disk", "parquet", "wds"])
def test_each_storage_reads_the_folders_images_labels_and_classes(stores, kind):
    for split in ("train", "val", "test"):
        want, got = _load(stores["folders"], split), _load(stores[kind], split)
        assert got.classes == want.classes == CLASSES
        assert _pixels(got) == _pixels(want), split
    ds = _load(stores[kind], "test")
    again = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a pickled copy
    assert _pixels(again) == _pixels(ds)


@pytest.fixture(scope="module")
def checkpoint(stores, tmp_path_factory):
    res = train(tiny_cfg(stores["folders"][1], tmp_path_factory.mktemp("run"), "folders"))
    return res.last_checkpoint


def _eval(checkpoint, store, tmp_path, extra=()):
    name, root, sets = store
    out = tmp_path / f"{name}-{root.name}.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--split", "test", "--json", str(out), "--set",
                 f"data.name={name}", f"data.root={root}", *sets, *extra]) == 0
    return json.loads(out.read_text())


def test_one_checkpoint_scores_the_same_on_folders_save_to_disk_parquet_and_shards(stores, checkpoint, tmp_path):
    results = {k: _eval(checkpoint, s, tmp_path) for k, s in stores.items()}
    ref = results["folders"]
    assert ref["n"] == len(CLASSES) * TEST
    for k, r in results.items():
        assert (r["dataset"], r["n"], r["top1"], r["top5"]) == (stores[k][0], ref["n"], ref["top1"], ref["top5"]), k
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-6), k


def test_embed_writes_the_same_features_from_shards_and_parquet_as_from_folders(stores, checkpoint, tmp_path):
    feats = {}
    for kind in ("folders", "parquet", "wds"):
        name, root, sets = stores[kind]
        out = tmp_path / f"{kind}.npy"
        assert main(["embed", "--checkpoint", str(checkpoint), "--split", "test", "--out", str(out), "--set",
                     f"data.name={name}", f"data.root={root}", *sets]) == 0
        feats[kind] = np.load(out)
        labels = [line.split(",")[1] for line in out.with_suffix(".csv").read_text().splitlines()[1:]]
        assert labels == [str(c) for c in range(len(CLASSES)) for _ in range(TEST)]
    assert feats["folders"].shape == (len(CLASSES) * TEST, feats["folders"].shape[1])
    np.testing.assert_allclose(feats["parquet"], feats["folders"], atol=1e-6)
    np.testing.assert_allclose(feats["wds"], feats["folders"], atol=1e-6)


@pytest.mark.parametrize("kind", ["disk", "parquet", "wds"])
def test_a_training_run_on_each_storage_completes(stores, tmp_path, kind):
    name, root, sets = stores[kind]
    res = train(tiny_cfg(root, tmp_path, kind, f"data.name={name}", *sets))
    final = json.loads((res.run_dir / "final.json").read_text())
    assert final["test"]["n"] == len(CLASSES) * TEST
    assert torch.load(res.last_checkpoint, weights_only=True)["class_names"] == CLASSES


class _Stop(Exception):
    pass


def test_training_from_the_shard_stream_resumes_bit_identically(stores, tmp_path):
    root = stores["wds"][1]
    extra = ["data.name=wds", "data.options.stream=true", "data.val_fraction=0", "data.num_workers=2",
             "optim.epochs=2", "train.max_steps_per_epoch=3", "train.ckpt_every_steps=1"]
    ref = train(tiny_cfg(root, tmp_path, "ref", *extra))
    cfg = tiny_cfg(root, tmp_path, "cut", *extra)

    def stop(step):
        if step["global_step"] == 4:  # epoch 1 after its first batch, checkpoint written
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, callback=stop)
    mid = torch.load(cfg.run_dir / "last.pt", weights_only=True)
    assert (mid["epoch"], mid["batch_in_epoch"]) == (1, 1)
    res = train(cfg, resume="auto")
    a, b = (torch.load(r.last_checkpoint, weights_only=True)["model"] for r in (ref, res))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="validation hold-out cannot be left out"):
        train(tiny_cfg(root, tmp_path, "val", "data.name=wds", "data.options.stream=true"))


def test_convert_round_trips_folders_to_shards_and_parquet(stores, checkpoint, tmp_path, capsys):
    folders = stores["folders"]
    assert main(["convert", "--data", str(folders[1]), "--to", "wds", str(tmp_path / "w"), "--shard-size", "7"]) == 0
    assert main(["convert", "--data", f"image_folder:{folders[1]}", "--to", "hf", str(tmp_path / "h"),
                 "--shard-size", "10"]) == 0
    out = capsys.readouterr().out
    assert f"train {len(CLASSES) * TRAIN}, test {len(CLASSES) * TEST} images of 3 classes in 6 file(s)" in out
    assert sorted(p.name for p in (tmp_path / "h" / "data").iterdir()) == [
        "test-00000-of-00002.parquet", "test-00001-of-00002.parquet", "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert len(list((tmp_path / "w").glob("train-*.tar"))) == 4
    wds_store = ("wds", tmp_path / "w", [])
    assert _eval(checkpoint, wds_store, tmp_path) == {**_eval(checkpoint, folders, tmp_path), "dataset": "wds"}
    hf_store = ("hf", tmp_path / "h", [f"data.options.cache_dir={tmp_path / 'c'}"])
    for split in ("train", "test"):
        assert _pixels(_load(hf_store, split)) == _pixels(_load(folders, split))
    # the output folder must be new: converting twice is a one-line error
    assert main(["convert", "--data", str(folders[1]), "--to", "wds", str(tmp_path / "w")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_few_shot_class_fractions_pool_every_stored_split(tmp_path):
    names = [f"n0000000{i}" for i in range(6)]  # WordNet-id-like names
    folders = write_folders(tmp_path / "f", {"train": 2, "test": 1}, size=8, classes=names)
    sets = {"disk": ("hf", write_hf(folders, tmp_path / "d", parquet=False), []),
            "wds": ("wds", write_wds(folders, tmp_path / "w", per_shard=4), [])}
    fractions = {"class_fractions": [0.34, 0.33, 0.33]}
    for split in ("train", "val_classes", "test_classes"):
        want = _load(("image_folder", folders, []), split, **fractions)
        assert len(want.classes) == 2
        for kind, store in sets.items():
            got = _load(store, split, **fractions)
            assert got.classes == want.classes and _pixels(got) == _pixels(want), (kind, split)
    # a few-shot source converts to one pooled train split plus its class lists
    out = tmp_path / "fs"
    assert main(["convert", "--data", str(folders), "--to", "wds", str(out), "--set",
                 "data.options.class_fractions=[0.34,0.33,0.33]"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    for split in ("train", "val_classes", "test_classes"):
        want = _load(("image_folder", folders, []), split, **fractions)
        got = _load(("wds", out, []), split, class_splits=str(out / "class_splits"))
        assert got.classes == want.classes and sorted(_pixels(got)) == sorted(_pixels(want)), split


def test_a_stored_validation_split_is_val_and_one_saved_dataset_is_train(stores, tmp_path):
    from datasets import DatasetDict, load_from_disk

    dd = load_from_disk(str(stores["disk"][1]))
    DatasetDict({"train": dd["train"], "validation": dd["test"].select(range(6))}).save_to_disk(str(tmp_path / "v"))
    val = get_dataset("hf", str(tmp_path / "v"), "val")
    assert len(val) == 6 and _pixels(val) == _pixels(_load(stores["folders"], "test"))[:6]
    assert len(get_dataset("hf", str(tmp_path / "v"), "train")) == len(CLASSES) * TRAIN  # no hold-out taken
    with pytest.raises(ValueError, match="no test split"):
        get_dataset("hf", str(tmp_path / "v"), "test")
    dd["train"].save_to_disk(str(tmp_path / "one"))
    assert _pixels(get_dataset("hf", str(tmp_path / "one"), "train")) == _pixels(_load(stores["folders"], "train"))


def test_a_pickled_release_converts_to_lossless_shards_with_its_class_lists(tmp_path):
    from fixtures import write_metaoptnet_cifar

    write_metaoptnet_cifar(tmp_path / "fs", per_class=1)  # MetaOptNet's CIFAR-FS pickles: arrays, not files
    assert main(["convert", "--data", f"cifar_fs:{tmp_path / 'fs'}", "--to", "wds", str(tmp_path / "w")]) == 0
    lists = str(tmp_path / "w" / "class_splits")
    for split in ("train", "val_classes", "test_classes"):
        want = get_dataset("cifar_fs", str(tmp_path / "fs"), split)
        got = get_dataset("wds", str(tmp_path / "w"), split, class_splits=lists)
        assert got.classes == want.classes and _pixels(got) == _pixels(want), split


def test_the_test_split_of_shards_with_classes_txt_is_read_without_the_training_shards(stores, tmp_path):
    import shutil

    root = shutil.copytree(stores["wds"][1], tmp_path / "w")
    (root / "train-000000.tar").write_bytes(b"not a tar")
    assert _pixels(get_dataset("wds", str(root), "test")) == _pixels(_load(stores["folders"], "test"))
    with pytest.raises(ValueError, match="train-000000.tar is not a readable tar file"):
        get_dataset("wds", str(root), "train")


def test_layout_detection_is_by_name_and_cheap(stores, tmp_path):
    assert hf_mod.looks_like(stores["disk"][1]) and hf_mod.looks_like(stores["parquet"][1])
    assert wds_mod.looks_like(stores["wds"][1])
    assert not hf_mod.looks_like(stores["wds"][1]) and not wds_mod.looks_like(stores["disk"][1])
    assert not hf_mod.looks_like(stores["folders"][1]) and not wds_mod.looks_like(stores["folders"][1])
    assert not hf_mod.looks_like(tmp_path / "missing")


def test_a_hub_id_resolves_only_through_the_local_cache(stores, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"nor in the local Hugging Face cache.*huggingface-cli download"):
        get_dataset("hf", "someone/some-set", "train")
    # the hub cache's layout: datasets--OWNER--NAME/refs/main names the snapshot folder
    repo = tmp_path / "hub" / "datasets--someone--some-set"
    shutil.copytree(stores["parquet"][1], repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    got = get_dataset("hf", "someone/some-set", "test", cache_dir=str(tmp_path / "c"))
    assert _pixels(got) == _pixels(_load(stores["folders"], "test"))


def test_malformed_shards_and_missing_columns_say_what_is_wrong(tmp_path):
    import webdataset as wds

    bad = tmp_path / "bad"
    bad.mkdir()
    with wds.TarWriter(str(bad / "train-000000.tar")) as sink:
        sink.write({"__key__": "a", "png": _png(), "cls": "0"})
        sink.write({"__key__": "b", "png": _png()})
    with pytest.raises(ValueError, match=r"1 without a .cls label \(b\)"):
        get_dataset("wds", str(bad), "train")
    (bad / "train-000000.tar").unlink()
    with wds.TarWriter(str(bad / "train-000000.tar")) as sink:
        sink.write({"__key__": "a", "png": _png(), "cls": "5"})
    (bad / "classes.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match="labels run from 5 to 5 but .* names 2 classes"):
        get_dataset("wds", str(bad), "train")
    from datasets import Dataset

    Dataset.from_dict({"pixels": [b"x"], "label": [0]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(ValueError, match="no Image column.*image_column"):
        get_dataset("hf", str(tmp_path / "noimg"), "train")
    from datasets import ClassLabel, Features, Image

    feats = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    rows = {"image": [{"bytes": _png(), "path": None}] * 3, "label": [0, 1, -1]}  # -1: unlabelled, as the Hub's
    Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match=r"1 row\(s\) of the train split .* have no label in 0..1 \(rows 2\)"):
        get_dataset("hf", str(tmp_path / "unlabelled"), "train")


def test_a_missing_extra_is_one_line_naming_the_pip_command(stores, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    name, root, _ = stores["disk"]
    with pytest.raises(ImportError, match=r"pip install 'schane\[data\]'"):
        get_dataset(name, str(root), "train")


def test_no_member_of_a_shard_is_unpickled(tmp_path):
    marker = tmp_path / "ran"
    shards = tmp_path / "s"
    shards.mkdir()
    with tarfile.open(shards / "train-000000.tar", "w") as tar:
        for i in range(2):
            for ext, data in (("png", _png()), ("cls", b"0"), ("pyd", pickle.dumps(Payload(marker)))):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = get_dataset("wds", str(shards), "train", val_fraction=0.0)
    assert [lab for _, lab in ds] == [0, 0]
    assert [lab for _, lab, _ in ShardStream(shards, "train")] == [0, 0]
    assert not marker.exists()


def _png():
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the stream


def _keys(stream, workers, epoch=0, batch=None, done=0):
    """The sample keys a DataLoader over ``stream`` gives, in order (in batches of ``batch`` when given)."""
    stream.set_epoch(epoch, done, batch)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=_ids)
    return [stream.key(i) for b in loader for i in b]


def _ids(items):
    return [i for _, _, i in items] if isinstance(items, list) else [items[2]]


def test_stream_is_seeded_split_by_shard_and_resumable(stores):
    root = stores["wds"][1]
    s = ShardStream(root, "train", seed=3, shuffle_buffer=4)
    assert s.classes == CLASSES and len(s) == len(CLASSES) * TRAIN and s.sizes == [5, 5, 5, 5, 4]
    first = _keys(s, 0)
    assert sorted(first) == sorted(set(first)) and len(first) == len(s)
    assert _keys(ShardStream(root, "train", seed=3, shuffle_buffer=4), 0) == first  # same seed, same order
    assert _keys(s, 0, epoch=1) != first and sorted(_keys(s, 0, epoch=1)) == sorted(first)
    assert _keys(ShardStream(root, "train", seed=4, shuffle_buffer=4), 0) != first
    # ranks x workers: 2 ranks of 2 workers each read disjoint shards that together hold every sample once
    ranks = [_keys(ShardStream(root, "train", seed=3, rank=r, world_size=2), 2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(first) and not set(ranks[0]) & set(ranks[1])
    with pytest.raises(ValueError, match="leave 2 shard.*3 workers"):
        ShardStream(root, "train", rank=1, world_size=2).worker_shards(0, 3)
    # in batches: every worker gives the same number of whole batches (its shards hold 14 and 10 samples here)
    per_worker = [sum(s.sizes[i] for i in s.worker_shards(k, 2)) for k in range(2)]
    assert s.batches_per_epoch(3, 2) == 2 * (min(per_worker) // 3)
    whole = _keys(s, 2, batch=3)
    assert len(whole) == 3 * s.batches_per_epoch(3, 2) and len(set(whole)) == len(whole)
    for done in (1, 2, 3):  # a resume after `done` batches gives the rest of the epoch, in order
        assert _keys(s, 2, batch=3, done=done) == whole[3 * done :], done
    with pytest.raises(ValueError, match="less than one batch of 20"):
        s.batches_per_epoch(20, 2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_see_every_training_image_once_per_epoch(stores, tmp_path):
    root = stores["wds"][1]
    mp.spawn(rank_worker, args=(_free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    everything = sorted(m.key for m in get_dataset("wds", str(root), "train", val_fraction=0.0).samples)
    assert len(everything) == len(CLASSES) * TRAIN
    for epoch in (0, 1):
        for what in ("train", "stream"):
            a, b = seen[0][f"{what}{epoch}"], seen[1][f"{what}{epoch}"]
            assert a and b and not set(a) & set(b), (what, epoch)
            keys = [k.split(":")[-1] for k in a + b]
            assert sorted(keys) == everything, (what, epoch)
        assert seen[0][f"lengths{epoch}"] == seen[1][f"lengths{epoch}"]
        assert [len(seen[r][f"stream{epoch}"]) for r in range(2)] == seen[0][f"lengths{epoch}"]
    assert seen[0]["stream0"] != seen[0]["stream1"]
