"""Dataset readers on tiny fixtures written in each real on-disk format."""

from __future__ import annotations

import csv
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import (
    png,
    tiered_labels,
    write_caltech256,
    write_cifar100,
    write_cub200,
    write_flowers102,
    write_imagenet,
    write_inat2017,
    write_mini_imagenet_cache,
    write_oxford_pets,
    write_places365,
    write_tiered_imagenet_png,
)
from schane.data import CorruptImageError, dataset_info, get_dataset, holdout_indices, list_datasets
from schane.data.base import read_split_lines

ALL = {
    "cifar_fs", "fc100", "mini_imagenet", "tiered_imagenet", "cifar100", "cub200", "caltech256", "flowers102",
    "oxford_pets", "inat2017", "places365", "imagenet", "image_folder", "csv", "glyphs", "fashion_mnist", "hf", "wds",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# registry, hold-out


def test_registry_lists_every_dataset_with_layout():
    assert set(list_datasets()) == ALL
    for name in ALL:
        info = dataset_info(name)
        assert info.layout.strip(), name
        if info.kind == "fewshot":
            assert info.splits == ("train", "val", "val_classes", "test_classes")
        else:
            assert info.splits == ("train", "val", "test")
    assert dataset_info("fashion-mnist").name == "fashion_mnist"


def test_registry_rejects_bad_name_split_option_fraction(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("nope")
    with pytest.raises(ValueError, match="splits"):
        get_dataset("cifar_fs", str(tmp_path), split="test")
    with pytest.raises(ValueError, match="unknown option"):
        get_dataset("cifar100", str(tmp_path), colour=True)
    with pytest.raises(ValueError, match="val_fraction"):
        get_dataset("cifar100", str(tmp_path), val_fraction=1.0)


def test_holdout_is_stratified_seeded_and_disjoint():
    targets = [0] * 20 + [1] * 10 + [2] * 1
    tr, va = holdout_indices(targets, 0.1, seed=3)
    assert sorted(tr + va) == list(range(31)) and not set(tr) & set(va)
    assert [targets[i] for i in va].count(0) == 2 and [targets[i] for i in va].count(1) == 1
    assert 30 in tr  # a single-image class stays in train
    assert holdout_indices(targets, 0.1, seed=3) == (tr, va)
    assert holdout_indices(targets, 0.1, seed=4)[1] != va
    assert holdout_indices(targets, 0.0, seed=0) == (list(range(31)), [])


# ---------------------------------------------------------------------------------------------------------
# CIFAR-100 family


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("cifar"), train_per_class=4, test_per_class=2)


def test_cifar100_splits_holdout_and_images(cifar_root):
    tr = get_dataset("cifar100", str(cifar_root), "train", val_fraction=0.25)
    va = get_dataset("cifar100", str(cifar_root), "val", val_fraction=0.25)
    te = get_dataset("cifar100", str(cifar_root), "test")
    assert (len(tr), len(va), len(te)) == (300, 100, 200)
    assert tr.classes == read_split_lines("cifar100", "fine_names.txt") == te.classes
    assert np.bincount(va.targets).tolist() == [1] * 100
    assert not set(map(str, tr.samples)) & set(map(str, va.samples))
    img, label = tr[0]
    assert (
        isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32) and label == tr.targets[0]
    )
    other = get_dataset("cifar100", str(cifar_root), "val", val_fraction=0.25, seed=1)
    assert other.samples != va.samples
    assert get_dataset("cifar100", str(cifar_root), "val", val_fraction=0.25).samples == va.samples


@pytest.mark.parametrize("name,sizes", [("cifar_fs", (64, 16, 20)), ("fc100", (60, 20, 20))])
def test_cifar_fewshot_splits(cifar_root, name, sizes):
    parts = {
        s: get_dataset(name, str(cifar_root), s, val_fraction=0.5)
        for s in ("train", "val", "val_classes", "test_classes")
    }
    assert len(parts["train"].classes) == sizes[0] and parts["val"].classes == parts["train"].classes
    assert len(parts["val_classes"].classes) == sizes[1] and len(parts["test_classes"].classes) == sizes[2]
    assert (
        len(parts["val_classes"]) == sizes[1] * 6 and len(parts["test_classes"]) == sizes[2] * 6
    )  # train+test pooled
    assert len(parts["train"]) == len(parts["val"]) == sizes[0] * 3
    sets = [set(parts[s].classes) for s in ("train", "val_classes", "test_classes")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for ds in parts.values():
        assert set(ds.targets) == set(range(len(ds.classes)))
    assert parts["test_classes"].classes == read_split_lines(name, "test.txt")


def test_cifar_fewshot_labels_match_pixels(cifar_root):
    """Image i of test_classes equals the raw pickle row of its class (labels are not shuffled)."""
    ds = get_dataset("cifar_fs", str(cifar_root), "test_classes")
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f)
    fine = read_split_lines("cifar100", "fine_names.txt")
    img, label = ds[0]
    k = raw["fine_labels"].index(fine.index(ds.classes[label]))
    expected = raw["data"][k].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_cifar_missing_root_and_classes(tmp_path, cifar_root):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        get_dataset("cifar_fs", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="root"):
        get_dataset("cifar100", None)
    bad = tmp_path / "cifar-100-python"
    bad.mkdir()
    for f in ("train", "test"):
        (bad / f).write_bytes((cifar_root / "cifar-100-python" / f).read_bytes())
    fine = read_split_lines("cifar100", "fine_names.txt")
    renamed = [n if n != "whale" else "orca" for n in fine]
    with open(bad / "meta", "wb") as f:
        pickle.dump({"fine_label_names": renamed, "coarse_label_names": []}, f)
    with pytest.raises(ValueError, match="whale"):
        get_dataset("cifar_fs", str(tmp_path), "test_classes")
    (bad / "train").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="train"):
        get_dataset("cifar100", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# miniImageNet, tieredImageNet


def test_mini_imagenet_pickle_cache(tmp_path):
    wnids = read_split_lines("mini_imagenet", "val.txt")
    obj = write_mini_imagenet_cache(tmp_path, "val", per_class=3, size=8, reverse_classes=True)
    data, class_dict = obj["image_data"], obj["class_dict"]
    ds = get_dataset("mini_imagenet", str(tmp_path), "val_classes")
    assert ds.classes == wnids and len(ds) == 48
    img, label = ds[5]
    k = ds.samples[5]
    assert k in class_dict[wnids[label]]
    np.testing.assert_array_equal(np.asarray(img), data[k])
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache"):
        get_dataset("mini_imagenet", str(tmp_path), "test_classes")


def test_mini_imagenet_category_split_pickle_train_val(tmp_path):
    rng = np.random.default_rng(0)
    wnids = read_split_lines("mini_imagenet", "train.txt")
    labels = np.repeat(np.arange(64) + 10, 5)
    obj = {
        "data": rng.integers(0, 255, (len(labels), 8, 8, 3), dtype=np.uint8),
        "labels": labels.tolist(),
        "catname2label": {w: i + 10 for i, w in enumerate(wnids)},
    }
    with open(tmp_path / "miniImageNet_category_split_train_phase_train.pickle", "wb") as f:
        pickle.dump(obj, f)
    tr = get_dataset("mini_imagenet", str(tmp_path), "train", val_fraction=0.2)
    va = get_dataset("mini_imagenet", str(tmp_path), "val", val_fraction=0.2)
    assert len(tr) == 64 * 4 and len(va) == 64 and tr.classes == wnids
    assert not set(tr.samples) & set(va.samples)


def test_mini_imagenet_image_folder_csv(tmp_path):
    rng = np.random.default_rng(0)
    wnids = read_split_lines("mini_imagenet", "test.txt")
    with open(tmp_path / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for wn in wnids:
            for i in (1, 2):
                name = f"{wn}{i:08d}.jpg"
                png(tmp_path / "images" / name, rng)
                w.writerow([name, wn])
    ds = get_dataset("mini_imagenet", str(tmp_path), "test_classes")
    assert ds.classes == wnids and len(ds) == 40 and ds[3][0].mode == "RGB"
    (tmp_path / "images" / f"{wnids[0]}00000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        get_dataset("mini_imagenet", str(tmp_path), "test_classes")


def test_mini_imagenet_split_folders_missing_class(tmp_path):
    rng = np.random.default_rng(0)
    wnids = read_split_lines("mini_imagenet", "val.txt")
    for wn in wnids[:-1]:
        png(tmp_path / "val" / wn / "a.jpg", rng)
    with pytest.raises(ValueError, match=wnids[-1]):
        get_dataset("mini_imagenet", str(tmp_path), "val_classes")
    (tmp_path / "val" / wnids[-1]).mkdir()
    with pytest.raises(ValueError, match="no images"):
        get_dataset("mini_imagenet", str(tmp_path), "val_classes")
    png(tmp_path / "val" / wnids[-1] / "b.jpg", rng)
    assert len(get_dataset("mini_imagenet", str(tmp_path), "val_classes")) == 16


def test_mini_imagenet_ilsvrc_folder_uses_csv_index(tmp_path):
    rng = np.random.default_rng(0)
    wnids = read_split_lines("mini_imagenet", "val.txt")
    with open(tmp_path / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for wn in wnids:
            for i in (2, 10):
                w.writerow([f"{wn}{i:08d}.jpg", wn])
            for img_id in (5, 40, 100, 7, 1000, 30, 2, 9, 12, 11):
                png(tmp_path / wn / f"{wn}_{img_id}.JPEG", rng)
    ds = get_dataset("mini_imagenet", str(tmp_path), "val_classes")
    # sorted ids: 2 5 7 9 11 12 30 40 100 1000 -> index 2 is id 5, index 10 is id 1000
    assert [Path(p).name for p in ds.samples[:2]] == [f"{wnids[0]}_5.JPEG", f"{wnids[0]}_1000.JPEG"]


def test_tiered_imagenet_png_pickle_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    val = read_split_lines("tiered_imagenet", "val.txt")
    test = read_split_lines("tiered_imagenet", "test.txt")
    write_tiered_imagenet_png(tmp_path, "val", per_class=2, size=8)
    ds = get_dataset("tiered_imagenet", str(tmp_path), "val_classes")
    assert len(ds) == 194 and ds.classes == val and ds[0][0].size == (8, 8)
    np.savez(tmp_path / "test_images.npz", images=rng.integers(0, 255, (160 * 2, 8, 8, 3), dtype=np.uint8))
    with open(tmp_path / "test_labels.pkl", "wb") as f:
        pickle.dump(tiered_labels(160, 2, None), f)
    ds = get_dataset("tiered_imagenet", str(tmp_path), "test_classes")
    # A labels file without names cannot say which WordNet id a label is (Ren's generator numbers
    # classes in directory-listing order, not in the CSV's): classes are named after their labels.
    assert len(ds) == 320 and ds.classes == [f"tiered_test_{k}" for k in range(160)] and len(test) == 160
    with open(tmp_path / "val_images_png.pkl", "wb") as f:
        pickle.dump([np.frombuffer(b"garbage", np.uint8)] * (97 * 2), f)
    ds = get_dataset("tiered_imagenet", str(tmp_path), "val_classes")
    with pytest.raises(CorruptImageError, match="val_images_png.pkl"):
        ds[0]


def test_tiered_imagenet_folder_and_train_holdout(tmp_path):
    rng = np.random.default_rng(0)
    train = read_split_lines("tiered_imagenet", "train.txt")
    for wn in train:
        for i in range(3):
            png(tmp_path / "train" / wn / f"{i}.jpg", rng, 4)
    tr = get_dataset("tiered_imagenet", str(tmp_path), "train", val_fraction=0.34)
    va = get_dataset("tiered_imagenet", str(tmp_path), "val", val_fraction=0.34)
    assert len(tr.classes) == 351 and len(tr) == 702 and len(va) == 351


# ---------------------------------------------------------------------------------------------------------
# CUB, Caltech-256


def test_cub200_official_split(tmp_path):
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    write_cub200(tmp_path, classes, per_class=5, train_per_class=3, size=8)
    tr = get_dataset("cub200", str(tmp_path), "train", val_fraction=0.34)
    va = get_dataset("cub200", str(tmp_path), "val", val_fraction=0.34)
    te = get_dataset("cub200", str(tmp_path), "test")
    assert (len(tr), len(va), len(te)) == (6, 3, 6) and te.classes == classes
    assert all("_3.jpg" in str(p) or "_4.jpg" in str(p) for p in te.samples)
    (base / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        get_dataset("cub200", str(tmp_path))


def test_caltech256_seeded_per_class_split(tmp_path):
    cats = tmp_path / "256_ObjectCategories"
    write_caltech256(tmp_path, {"001.ak47": 6, "002.american-flag": 8, "257.clutter": 5}, size=4)
    (cats / "001.ak47" / "notes.txt").write_text("not an image")
    kw = dict(train_per_class=4, val_fraction=0.25)
    tr = get_dataset("caltech256", str(tmp_path), "train", **kw)
    va = get_dataset("caltech256", str(tmp_path), "val", **kw)
    te = get_dataset("caltech256", str(tmp_path), "test", **kw)
    assert tr.classes == ["001.ak47", "002.american-flag"]
    assert (len(tr), len(va), len(te)) == (6, 2, 6)
    assert get_dataset("caltech256", str(tmp_path), "test", seed=5, **kw).samples == te.samples
    assert get_dataset("caltech256", str(tmp_path), "test", split_seed=1, **kw).samples != te.samples
    assert len(get_dataset("caltech256", str(tmp_path), "test", include_clutter=True, **kw).classes) == 3
    with pytest.raises(ValueError, match="train_per_class"):
        get_dataset("caltech256", str(tmp_path), train_per_class=6)


# ---------------------------------------------------------------------------------------------------------
# custom folders and CSV


def test_image_folder_with_and_without_test_dir(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(5):
            png(tmp_path / "flat" / c / f"{i}.png", rng)
            png(tmp_path / "split" / "train" / c / f"{i}.png", rng)
        png(tmp_path / "split" / "test" / c / "t.png", rng)
    te = get_dataset("image_folder", str(tmp_path / "split"), "test")
    assert len(te) == 2 and te.classes == ["cat", "dog"]
    tr = get_dataset("image_folder", str(tmp_path / "flat"), "train", val_fraction=0.25)
    va = get_dataset("image_folder", str(tmp_path / "flat"), "val", val_fraction=0.25)
    te = get_dataset("image_folder", str(tmp_path / "flat"), "test")
    assert (len(tr), len(va), len(te)) == (6, 2, 2)
    assert not {str(p) for p in tr.samples + va.samples} & {str(p) for p in te.samples}
    ds = get_dataset("image_folder", str(tmp_path / "flat"), "test", classes=["dog", "cat"])
    assert ds.classes == ["dog", "cat"]
    with pytest.raises(ValueError, match="bird"):
        get_dataset("image_folder", str(tmp_path / "flat"), classes=["cat", "dog", "bird"])
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        get_dataset("image_folder", str(tmp_path / "flat"))


def test_corrupt_image_names_file(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        png(tmp_path / "a" / f"{i}.png", rng)
    (tmp_path / "a" / "3.png").write_bytes(b"\x89PNG broken")
    ds = get_dataset("image_folder", str(tmp_path), "train", val_fraction=0.0, test_fraction=0.25)
    bad = [i for i, p in enumerate(ds.samples) if Path(p).name == "3.png"]
    assert bad
    with pytest.raises(CorruptImageError, match="3.png"):
        ds[bad[0]]


def test_csv_dataset(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for lab in ("10", "2"):
        for i in range(4):
            png(tmp_path / "img" / f"{lab}_{i}.png", rng)
            rows.append((f"img/{lab}_{i}.png", lab))
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows[:3], *rows[4:7]])
    with open(tmp_path / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[3], rows[7]])
    tr = get_dataset("csv", str(tmp_path), "train", val_fraction=0.34)
    te = get_dataset("csv", str(tmp_path), "test")
    assert tr.classes == ["2", "10"] and len(tr) == 4 and len(te) == 2
    assert te[0][1] == 1 and te[1][1] == 0
    only = get_dataset("csv", None, "test", train_csv=str(tmp_path / "train.csv"), test_fraction=0.34)
    assert len(only) == 2
    with pytest.raises(FileNotFoundError, match="train.csv"):
        get_dataset("csv", str(tmp_path / "img"))
    with pytest.raises(ValueError, match="missing.*: 7"):
        get_dataset("csv", str(tmp_path), classes=["2", "10", "7"])


# ---------------------------------------------------------------------------------------------------------
# torchvision-backed sets


def test_flowers102_official_splits(tmp_path):
    write_flowers102(tmp_path, n_classes=102, per_class=3, size=4)
    tr = get_dataset("flowers102", str(tmp_path), "train")
    va = get_dataset("flowers102", str(tmp_path), "val")
    te = get_dataset("flowers102", str(tmp_path), "test")
    assert len(tr) == len(va) == len(te) == 102 and tr.targets == list(range(102))
    assert len(tr.classes) == 102 and tr[0][0].mode == "RGB"
    pooled = get_dataset("flowers102", str(tmp_path), "val", official_val=False, val_fraction=0.5)
    assert len(pooled) == 102
    with pytest.raises(FileNotFoundError, match="flowers-102"):
        get_dataset("flowers102", str(tmp_path / "nothing"))


def test_oxford_pets(tmp_path):
    write_oxford_pets(tmp_path, ["Abyssinian", "american_bulldog"], per_class=5, test_per_class=1, size=4)
    tr = get_dataset("oxford_pets", str(tmp_path), "train", val_fraction=0.25)
    va = get_dataset("oxford_pets", str(tmp_path), "val", val_fraction=0.25)
    te = get_dataset("oxford_pets", str(tmp_path), "test")
    assert (len(tr), len(va), len(te)) == (6, 2, 2) and te.classes == ["Abyssinian", "American Bulldog"]


def test_places365(tmp_path):
    write_places365(tmp_path, ["a/airfield", "b/bakery"], train_per_class=4, val_per_class=1, size=4)
    tr = get_dataset("places365", str(tmp_path), "train", val_fraction=0.25)
    te = get_dataset("places365", str(tmp_path), "test")
    assert len(tr) == 6 and len(te) == 2 and te.classes == ["/a/airfield", "/b/bakery"]
    assert tr[0][0].mode == "RGB"
    (tmp_path / "places365_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="places365_val.txt"):
        get_dataset("places365", str(tmp_path), "test")


def test_inat2017_official_json(tmp_path):
    cats = [
        {"id": 0, "name": "Aves sp", "supercategory": "Aves"},
        {"id": 1, "name": "Felis catus", "supercategory": "Mammalia"},
    ]
    write_inat2017(tmp_path, cats, train_per_class=4, val_per_class=1, size=4)
    tr = get_dataset("inat2017", str(tmp_path), "train", val_fraction=0.25)
    te = get_dataset("inat2017", str(tmp_path), "test")
    assert len(tr) == 6 and len(te) == 2 and te.classes == ["Aves sp", "Felis catus"] and te.targets == [0, 1]
    with pytest.raises(ValueError, match="download"):
        get_dataset("inat2017", str(tmp_path), download=True)


def test_imagenet_folders(tmp_path):
    write_imagenet(tmp_path, ["n01440764", "n01443537"], train_per_class=4, val_per_class=1, size=4)
    tr = get_dataset("imagenet", str(tmp_path), "train", val_fraction=0.25)
    te = get_dataset("imagenet", str(tmp_path), "test")
    assert len(tr) == 6 and len(te) == 2 and te.classes == tr.classes == ["n01440764", "n01443537"]


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def _idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("torchvision_layout", [True, False])
def test_fashion_mnist_idx(tmp_path, torchvision_layout):
    rng = np.random.default_rng(0)
    folder = tmp_path / "FashionMNIST" / "raw" if torchvision_layout else tmp_path
    for prefix, n in (("train", 40), ("t10k", 10)):
        images = rng.integers(0, 255, (n, 28, 28))
        _idx(folder / f"{prefix}-images-idx3-ubyte", images, not torchvision_layout)
        _idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, not torchvision_layout)
    tr = get_dataset("fashion_mnist", str(tmp_path), "train", val_fraction=0.25)
    te = get_dataset("fashion_mnist", str(tmp_path), "test")
    assert len(tr) == 30 and len(te) == 10 and len(te.classes) == 10
    img, label = te[3]
    assert img.mode == "RGB" and img.size == (28, 28) and label == 3
    np.testing.assert_array_equal(np.asarray(img)[:, :, 0], images[3])


def test_fashion_mnist_truncated_file(tmp_path):
    _idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)), False)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4), False)
    data = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        get_dataset("fashion_mnist", str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="train"):
        get_dataset("fashion_mnist", str(tmp_path), "train")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist package is not installed",
)
def test_fashion_mnist_debian_package():
    tr = get_dataset("fashion_mnist", None, "train")
    te = get_dataset("fashion_mnist", None, "test")
    assert len(tr) == 54000 and len(te) == 10000
    assert np.bincount(te.targets).tolist() == [1000] * 10
