"""The benchmark releases people actually download, each in its real format (fixtures cite their source).

Every reader is checked for the number of classes per split, the class names where the format
carries them, and a known pixel colour (a pure-blue pixel must come out blue).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from fixtures import (
    BLUE,
    fine_index,
    wnid_colour,
    write_cifar100,
    write_easyfsl_mini,
    write_flowers102,
    write_imagenet_devkit,
    write_imagenet_flat_val,
    write_imagenet_kaggle,
    write_inat2017,
    write_metaoptnet_cifar,
    write_mini_category_split,
    write_mini_imagenet_cache,
    write_oxford_pets,
    write_places365,
    write_r2d2_cifar_fs,
    write_tiered_metaoptnet,
    write_tiered_ren,
)
from schane.data import get_dataset
from schane.data.base import read_split_lines

FEWSHOT = ("train", "val", "val_classes", "test_classes")
SIZES = {"cifar_fs": (64, 16, 20), "fc100": (60, 20, 20)}


def _parts(name: str, root: Path, **kw) -> dict:
    return {s: get_dataset(name, str(root), s, val_fraction=0.5, **kw) for s in FEWSHOT}


def _pixel(ds, i: int, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(ds[i][0])[xy[1], xy[0]])


def _check_fewshot_counts(parts: dict, sizes: tuple[int, int, int], per_class: int, lists: dict | None) -> None:
    assert [len(parts[s].classes) for s in ("train", "val_classes", "test_classes")] == list(sizes)
    assert parts["val"].classes == parts["train"].classes
    assert len(parts["train"]) + len(parts["val"]) == sizes[0] * per_class
    assert len(parts["val_classes"]) == sizes[1] * per_class and len(parts["test_classes"]) == sizes[2] * per_class
    for ds in parts.values():
        assert np.bincount(ds.targets, minlength=len(ds.classes)).min() >= 1
    if lists is not None:
        assert parts["train"].classes == lists["train"]
        assert parts["val_classes"].classes == lists["val"] and parts["test_classes"].classes == lists["test"]


# ---------------------------------------------------------------------------------------------------------
# CIFAR-FS, FC100


@pytest.mark.parametrize("name,prefix", [("cifar_fs", "CIFAR_FS"), ("fc100", "FC100")])
@pytest.mark.parametrize("rfs", [False, True])
def test_metaoptnet_rfs_cifar_pickles(tmp_path, name, prefix, rfs):
    """MetaOptNet ``{CIFAR_FS,FC100}_{split}.pickle``; RFS ``<data_root>/{CIFAR-FS,FC100}/{split}.pickle``."""
    folder = tmp_path / ({"cifar_fs": "CIFAR-FS", "fc100": "FC100"}[name] if rfs else "")
    raw = write_metaoptnet_cifar(folder, prefix, per_class=2, rfs_names=rfs)
    parts = _parts(name, tmp_path)
    lists = {p: read_split_lines(name, f"{p}.txt") for p in ("train", "val", "test")}
    _check_fewshot_counts(parts, SIZES[name], 2, lists)
    fine = read_split_lines("cifar100", "fine_names.txt")
    for split, part in (("val_classes", "val"), ("test_classes", "test")):
        ds, data, labels = parts[split], raw[part]["data"], raw[part]["labels"]
        for i in (0, 1, len(ds) - 1):
            assert ds.classes[ds.targets[i]] == fine[labels[ds.samples[i]]]  # global label -> fine name
            np.testing.assert_array_equal(np.asarray(ds[i][0]), data[ds.samples[i]])
        assert _pixel(ds, ds.samples.index(0), (5, 5)) == BLUE


def test_cifar_release_of_the_other_benchmark_is_refused(tmp_path):
    write_metaoptnet_cifar(tmp_path, "FC100", per_class=1)
    for part in ("train", "val", "test"):
        (tmp_path / f"FC100_{part}.pickle").rename(tmp_path / f"CIFAR_FS_{part}.pickle")
    with pytest.raises(ValueError, match="CIFAR_FS_val.pickle.*another benchmark"):
        get_dataset("cifar_fs", str(tmp_path), "val_classes")


def test_r2d2_learn2learn_cifar_fs_images(tmp_path):
    """R2D2's ``cifar100/data/<fine name>/*.png`` + ``splits/bertinetto`` as learn2learn unpacks it."""
    write_r2d2_cifar_fs(tmp_path, per_class=2)
    lists = {p: read_split_lines("cifar_fs", f"{p}.txt") for p in ("train", "val", "test")}
    for root in (tmp_path, tmp_path / "cifarfs", tmp_path / "cifarfs" / "cifar100"):
        parts = _parts("cifar_fs", root)
        _check_fewshot_counts(parts, SIZES["cifar_fs"], 2, lists)
    ds = parts["test_classes"]
    first = [i for i, p in enumerate(ds.samples) if Path(p).name.endswith("_s_000000.png")]
    assert len(first) == 20 and all(_pixel(ds, i) == BLUE for i in first)
    assert all(Path(ds.samples[i]).parent.name == ds.classes[ds.targets[i]] for i in range(len(ds)))
    # FC100 splits the same 100 class folders by superclass
    _check_fewshot_counts(_parts("fc100", tmp_path), SIZES["fc100"], 2, None)
    split_file = tmp_path / "cifarfs" / "cifar100" / "splits" / "bertinetto" / "val.txt"
    split_file.write_text(split_file.read_text().replace("otter", "whale"))
    with pytest.raises(ValueError, match="bertinetto.*val.txt"):
        get_dataset("cifar_fs", str(tmp_path), "val_classes")


def test_cifar100_official_python2_pickles(tmp_path):
    """The official ``cifar-100-python`` files are Python-2 pickles (torchvision reads them with latin-1)."""
    import pickle

    write_cifar100(tmp_path, train_per_class=3, test_per_class=1, python2=True)
    te = get_dataset("cifar100", str(tmp_path), "test")
    assert len(te) == 100 and te.classes == read_split_lines("cifar100", "fine_names.txt")
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    np.testing.assert_array_equal(np.asarray(te[7][0]), raw["data"][7].reshape(3, 32, 32).transpose(1, 2, 0))
    assert te.targets[7] == raw["fine_labels"][7]
    # the cifar-100-python folder itself works as root too
    assert len(get_dataset("cifar100", str(tmp_path / "cifar-100-python"), "test")) == 100
    parts = _parts("cifar_fs", tmp_path)
    _check_fewshot_counts(parts, SIZES["cifar_fs"], 4, None)


# ---------------------------------------------------------------------------------------------------------
# tieredImageNet


def _check_tiered_pixels(ds, lists: list[str]) -> None:
    """Pixel (0, 0) encodes the wnid's index in the bundled list; pixel (1, 1) is pure blue."""
    for i in range(len(ds)):
        assert _pixel(ds, i) == wnid_colour(lists.index(ds.classes[ds.targets[i]]))
        assert _pixel(ds, i, (1, 1)) == BLUE


@pytest.mark.parametrize("npz", [False, True], ids=["png_pkl", "npz_bgr"])
def test_tiered_ren_release_names_order_and_colour(tmp_path, npz):
    """Ren's classes are numbered in listdir order and named in words; class_names.txt + synsets.txt map them."""
    for part in ("train", "val", "test"):
        order = write_tiered_ren(tmp_path, part, per_class=1, size=4, npz=npz)
        assert order != read_split_lines("tiered_imagenet", f"{part}.txt")  # not the CSV order
    parts = _parts("tiered_imagenet", tmp_path)
    lists = {p: read_split_lines("tiered_imagenet", f"{p}.txt") for p in ("train", "val", "test")}
    assert parts["val_classes"].classes == lists["val"] and parts["test_classes"].classes == lists["test"]
    assert parts["train"].classes == lists["train"] and len(parts["train"]) + len(parts["val"]) == 351
    assert len(parts["val_classes"]) == 97 and len(parts["test_classes"]) == 160
    _check_tiered_pixels(parts["val_classes"], lists["val"])
    _check_tiered_pixels(parts["test_classes"], lists["test"])  # holds the second "crane"


def test_tiered_ren_release_without_name_lists_keeps_its_names(tmp_path, caplog):
    write_tiered_ren(tmp_path, "val", per_class=2, npz=True, name_lists=False)
    with caplog.at_level(logging.WARNING, logger="schane.data.imagenet_fewshot"):
        ds = get_dataset("tiered_imagenet", str(tmp_path), "val_classes")
    assert len(ds.classes) == 97 and len(ds) == 194 and "synsets.txt" in caplog.text
    assert all(c.startswith("synset ") for c in ds.classes)
    wnids = read_split_lines("tiered_imagenet", "val.txt")
    for i in range(0, len(ds), 17):  # the release's own name for each image's class
        assert ds.classes[ds.targets[i]] == f"synset {wnids[_pixel(ds, i)[0] + 256 * _pixel(ds, i)[1]][1:]} words"
        assert _pixel(ds, i, (1, 1)) == BLUE


def test_tiered_metaoptnet_rfs_npz_global_labels_bgr(tmp_path):
    """MetaOptNet/RFS: labels pickle holds only global ``labels``; val/test continue after the base classes."""
    for part in ("train", "val", "test"):
        write_tiered_metaoptnet(tmp_path, part, per_class=2, size=4)
    parts = _parts("tiered_imagenet", tmp_path)
    _check_fewshot_counts(parts, (351, 97, 160), 2, None)
    assert parts["val_classes"].classes[0] == "tiered_val_351" and parts["test_classes"].classes[-1] == "tiered_test_607"
    for ds in (parts["val_classes"], parts["test_classes"]):
        colours = {}
        for i in range(len(ds)):
            assert _pixel(ds, i, (1, 1)) == BLUE  # stored BGR (255, 0, 0)
            colours.setdefault(ds.targets[i], set()).add(_pixel(ds, i))
        assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == len(colours)
    (tmp_path / "val_labels.pkl").replace(tmp_path / "test_labels.pkl")
    with pytest.raises(ValueError, match="97 classes but the tieredImageNet test split has 160"):
        get_dataset("tiered_imagenet", str(tmp_path), "test_classes")


# ---------------------------------------------------------------------------------------------------------
# miniImageNet


def test_mini_imagenet_learn2learn_validation_cache(tmp_path):
    write_mini_imagenet_cache(tmp_path, "val", per_class=2, size=8, filename="mini-imagenet-cache-validation.pkl")
    ds = get_dataset("mini_imagenet", str(tmp_path), "val_classes")
    assert ds.classes == read_split_lines("mini_imagenet", "val.txt") and len(ds) == 32


def test_mini_imagenet_gidaris_python2_pickles(tmp_path):
    raw = write_mini_category_split(tmp_path, "test", per_class=2, size=8)
    ds = get_dataset("mini_imagenet", str(tmp_path), "test_classes")
    assert ds.classes == read_split_lines("mini_imagenet", "test.txt") and len(ds) == 40
    np.testing.assert_array_equal(np.asarray(ds[5][0]), raw["data"][5])
    assert ds.classes[ds.targets[5]] == read_split_lines("mini_imagenet", "test.txt")[raw["labels"][5] - 80]


def test_mini_imagenet_easyfsl_csv(tmp_path):
    write_easyfsl_mini(tmp_path, "val", per_class=3)
    ds = get_dataset("mini_imagenet", str(tmp_path), "val_classes")
    assert ds.classes == read_split_lines("mini_imagenet", "val.txt") and len(ds) == 48
    assert all(Path(p).parent.name == ds.classes[t] for p, t in zip(ds.samples, ds.targets, strict=True))
    wn = ds.classes[0]
    (tmp_path / wn / f"{wn}_20457.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=f"1 image.*{wn}_20457.JPEG"):
        get_dataset("mini_imagenet", str(tmp_path), "val_classes")


# ---------------------------------------------------------------------------------------------------------
# ImageNet, Places365, Flowers-102, Pets, iNaturalist


WNIDS = ["n01440764", "n01443537", "n01484850"]
VAL = [2, 0, 1, 1, 2, 0, 2]


def _check_imagenet_val(ds) -> None:
    assert ds.classes == WNIDS and ds.targets == VAL
    assert [_pixel(ds, i) for i in range(len(ds))] == [wnid_colour(k) for k in VAL]


@pytest.mark.parametrize("truth", ["devkit_tar", "devkit_dir"])
def test_imagenet_flat_val_with_devkit(tmp_path, truth):
    write_imagenet_flat_val(tmp_path, WNIDS, VAL)
    with pytest.raises(FileNotFoundError) as err:
        get_dataset("imagenet", str(tmp_path), "test")
    assert "ILSVRC2012_devkit_t12.tar.gz" in str(err.value) and "download=True" not in str(err.value)
    write_imagenet_devkit(tmp_path, WNIDS, VAL, as_tar=truth == "devkit_tar")
    _check_imagenet_val(get_dataset("imagenet", str(tmp_path), "test"))
    tr = get_dataset("imagenet", str(tmp_path), "train", val_fraction=0.5)
    assert tr.classes == WNIDS and len(tr) == 3


def test_imagenet_kaggle_layout(tmp_path):
    write_imagenet_kaggle(tmp_path, WNIDS, VAL)
    _check_imagenet_val(get_dataset("imagenet", str(tmp_path), "test"))
    cls_loc = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    _check_imagenet_val(get_dataset("imagenet", str(cls_loc), "test"))
    assert get_dataset("imagenet", str(tmp_path), "train", val_fraction=0.0).classes == WNIDS


@pytest.mark.parametrize("small", [True, False])
def test_places365_extracted_by_hand(tmp_path, small):
    size = "256" if small else "large"
    write_places365(tmp_path, ["a/airfield", "b/bakery"], 3, 1, train_dir=f"data_{size}", val_dir=f"val_{size}")
    tr = get_dataset("places365", str(tmp_path), "train", val_fraction=0.0, small=small)
    te = get_dataset("places365", str(tmp_path), "test")
    assert len(tr) == 6 and len(te) == 2 and te.classes == ["/a/airfield", "/b/bakery"] and te.targets == [0, 1]
    assert all(f"data_{size}" in str(p) for p in tr.samples)
    shutil.rmtree(tmp_path / f"data_{size}")
    with pytest.raises(FileNotFoundError, match=f"data_{size}/"):
        get_dataset("places365", str(tmp_path), "train", small=small)


def test_flowers_and_pets_downloaded_by_hand(tmp_path):
    write_flowers102(tmp_path / "flowers", n_classes=102, per_class=3, wrapper=False)
    te = get_dataset("flowers102", str(tmp_path / "flowers"), "test")
    assert len(te) == 102 and te.targets == list(range(102)) and te.classes[0] == "pink primrose"
    write_oxford_pets(tmp_path / "pets", ["Abyssinian", "american_bulldog", "basset_hound"], per_class=3, wrapper=False)
    te = get_dataset("oxford_pets", str(tmp_path / "pets"), "test")
    assert te.classes == ["Abyssinian", "American Bulldog", "Basset Hound"] and te.targets == [0, 1, 2]
    (tmp_path / "pets" / "annotations" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Found: annotations/, images/"):
        get_dataset("oxford_pets", str(tmp_path / "pets"), "test")


def test_inat2017_messages_name_the_real_archives(tmp_path):
    write_inat2017(tmp_path, [{"id": 0, "name": "Aves sp", "supercategory": "Aves"}], 2, 1)
    (tmp_path / "val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="train_val_images.tar.gz.*train_val2017.zip"):
        get_dataset("inat2017", str(tmp_path), "test")
    with pytest.raises(ValueError, match="train_val_images.tar.gz"):
        get_dataset("inat2017", str(tmp_path), download=True)


# ---------------------------------------------------------------------------------------------------------
# unrecognised layouts


@pytest.mark.parametrize(
    "name,stray,split",
    [
        ("cifar_fs", "CIFAR_FS_train.pkl", "train"),
        ("fc100", "FC100_val.pkl", "val_classes"),
        ("mini_imagenet", "mini-imagenet-cache-valid.pkl", "val_classes"),
        ("tiered_imagenet", "test_images.npy", "test_classes"),
    ],
)
def test_unrecognised_layout_lists_files_and_layouts_tried(tmp_path, name, stray, split):
    (tmp_path / stray).write_bytes(b"")
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        get_dataset(name, str(tmp_path), split)
    msg = str(err.value)
    found = next(line for line in msg.splitlines() if line.startswith("Found: "))
    assert set(found[len("Found: ") :].split(", ")) == {"notes/", stray}
    assert "Layouts tried:\n  1." in msg and "download=True" not in msg


def test_cifar_fewshot_classes_map_through_fine_labels(tmp_path):
    """A MetaOptNet label is a CIFAR-100 fine index: label 0 is 'apple', whichever split holds it."""
    raw = write_metaoptnet_cifar(tmp_path, "CIFAR_FS", per_class=1)
    apple = fine_index("apple")
    part = next(p for p in raw if apple in raw[p]["labels"])
    split = {"train": "train", "val": "val_classes", "test": "test_classes"}[part]
    ds = get_dataset("cifar_fs", str(tmp_path), split, val_fraction=0.0)
    i = ds.samples.index(raw[part]["labels"].index(apple))
    assert ds.classes[ds.targets[i]] == "apple"
