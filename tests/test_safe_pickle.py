"""The restricted unpickler, and a planted payload for every reader that parses pickles: refused, never run."""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import (
    Payload,
    dump_payload,
    dump_py2,
    write_cifar100,
    write_imagenet_devkit,
    write_imagenet_flat_val,
    write_tiered_metaoptnet,
    write_tiered_ren,
)
from schane.data import UnsafePickleError, get_dataset, load_pickle

# ---------------------------------------------------------------------------------------------------------
# the unpickler itself


def _sample() -> dict:
    return {
        "data": np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3) + 100,
        "labels": [3, 7],
        "f": np.float32(0.5),
        "i": np.int64(-4),
        "names": np.array(["n01532829", "x"]),
        "ordered": collections.OrderedDict(b=[1.5, None, True], a=("t", b"\x00\xff")),
    }


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype
            np.testing.assert_array_equal(got[k], v)
        else:
            assert got[k] == v and type(got[k]) is type(v)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_pickles_of_arrays_and_containers_load(tmp_path, protocol):
    obj = _sample()
    with open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    _assert_same(load_pickle(tmp_path / "x.pkl"), obj)


def test_python2_pickle_needs_latin1_and_loads(tmp_path):
    """A Py2 ``cPickle`` file (array data as a Py2 byte string) fails with the default decoding, loads here."""
    obj = {"data": (np.arange(600) * 7 % 256).astype(np.uint8).reshape(200, 3), "labels": list(range(200))}
    path = dump_py2(obj, tmp_path / "py2.pickle")
    raw = path.read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in raw and pickle.BINSTRING in raw
    with pytest.raises(UnicodeDecodeError), open(path, "rb") as f:
        pickle.load(f)
    got = load_pickle(path)
    np.testing.assert_array_equal(got["data"], obj["data"])
    assert got["labels"] == obj["labels"]


def test_refused_global_names_file_and_global_and_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = dump_payload({"data": Payload(marker), "labels": [1]}, tmp_path / "evil.pkl")
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*'__builtin__\.exec'"):
        load_pickle(path)
    assert not marker.exists()
    # the payload is live: a plain pickle.load runs it
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.",
        b"\x80\x02cnumpy.testing._private.utils\nrunstring\nX\x01\x00\x00\x001}\x86R.",
        b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.",
    ],
)
def test_known_gadgets_are_refused(tmp_path, payload):
    (tmp_path / "g.pkl").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="g.pkl"):
        load_pickle(tmp_path / "g.pkl")


def test_codecs_encode_only_latin1_and_damaged_files(tmp_path):
    # _codecs.encode('x', 'rot13'): admitted global, refused argument
    (tmp_path / "c.pkl").write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(ValueError, match="c.pkl"):
        load_pickle(tmp_path / "c.pkl")
    with open(tmp_path / "ok.pkl", "wb") as f:
        pickle.dump(_sample(), f, protocol=4)
    data = (tmp_path / "ok.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pkl.*corrupt, truncated"):
        load_pickle(tmp_path / "cut.pkl")
    with pytest.raises(FileNotFoundError, match="nothing.pkl"):
        load_pickle(tmp_path / "nothing.pkl")


# ---------------------------------------------------------------------------------------------------------
# planted payloads in every pickle-reading format


def _plant_mini_cache(root: Path, marker: Path) -> str:
    dump_payload({"image_data": Payload(marker), "class_dict": {}}, root / "mini-imagenet-cache-train.pkl")
    return "train"


def _plant_mini_cache_l2l(root: Path, marker: Path) -> str:
    dump_payload({"image_data": Payload(marker), "class_dict": {}}, root / "mini-imagenet-cache-validation.pkl")
    return "val_classes"


def _plant_mini_category(root: Path, marker: Path) -> str:
    obj = {"data": Payload(marker), "labels": [0], "catname2label": {}}
    dump_payload(obj, root / "miniImageNet_category_split_train_phase_train.pickle")
    return "train"


CASES = {
    "mini-imagenet-cache-train.pkl": ("mini_imagenet", _plant_mini_cache),
    "mini-imagenet-cache-validation.pkl": ("mini_imagenet", _plant_mini_cache_l2l),
    "miniImageNet_category_split_train_phase_train.pickle": ("mini_imagenet", _plant_mini_category),
}


def _plant_tiered_labels(root: Path, marker: Path) -> str:
    write_tiered_ren(root, "train", per_class=1)
    dump_payload({"label_specific": Payload(marker)}, root / "train_labels.pkl")
    return "train"


def _plant_tiered_png(root: Path, marker: Path) -> str:
    write_tiered_ren(root, "test", per_class=1)
    dump_payload([Payload(marker)], root / "test_images_png.pkl")
    return "test_classes"


def _plant_tiered_metaoptnet(root: Path, marker: Path) -> str:
    write_tiered_metaoptnet(root, "val", per_class=1)
    dump_payload({"labels": Payload(marker)}, root / "val_labels.pkl")
    return "val_classes"


CASES.update(
    {
        "train_labels.pkl (Ren)": ("tiered_imagenet", _plant_tiered_labels),
        "test_images_png.pkl": ("tiered_imagenet", _plant_tiered_png),
        "val_labels.pkl (MetaOptNet)": ("tiered_imagenet", _plant_tiered_metaoptnet),
    }
)


def _plant_cifar(which: str, name: str, split: str):
    def plant(root: Path, marker: Path) -> str:
        write_cifar100(root, 1, 1, python2=True)
        dump_payload({"data": Payload(marker), "fine_labels": [0]}, root / "cifar-100-python" / which)
        return split

    return name, plant


CASES.update(
    {
        "cifar-100-python/train (cifar100)": _plant_cifar("train", "cifar100", "train"),
        "cifar-100-python/test (cifar100)": _plant_cifar("test", "cifar100", "test"),
        "cifar-100-python/meta (cifar100)": _plant_cifar("meta", "cifar100", "train"),
        "cifar-100-python/train (cifar_fs)": _plant_cifar("train", "cifar_fs", "test_classes"),
        "cifar-100-python/test (fc100)": _plant_cifar("test", "fc100", "val_classes"),
    }
)


def _plant_release(fname: str, name: str, split: str):
    def plant(root: Path, marker: Path) -> str:
        dump_payload({"data": Payload(marker), "labels": [0]}, root / fname)
        return split

    return name, plant


CASES.update(
    {
        "CIFAR_FS_train.pickle": _plant_release("CIFAR_FS_train.pickle", "cifar_fs", "train"),
        "FC100_test.pickle": _plant_release("FC100_test.pickle", "fc100", "test_classes"),
        "CIFAR-FS/val.pickle (RFS)": _plant_release("CIFAR-FS/val.pickle", "cifar_fs", "val_classes"),
    }
)


@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_payload_is_refused_by_every_pickle_reader(tmp_path, case):
    name, plant = CASES[case]
    root, marker = tmp_path / "data", tmp_path / "marker"
    root.mkdir()
    split = plant(root, marker)
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle .*'__builtin__\.exec'"):
        get_dataset(name, str(root), split)
    assert not marker.exists()
    # the planted file is live: an unrestricted pickle.load of it creates the marker
    planted = [p for p in root.rglob("*") if p.is_file() and b"__builtin__\nexec" in p.read_bytes()]
    assert len(planted) == 1 and planted[0].name in case.split()[0]
    with open(planted[0], "rb") as f:
        pickle.load(f, encoding="latin1")
    assert marker.exists()


def test_imagenet_meta_bin_payload_is_refused(tmp_path):
    """torchvision's meta.bin labels a flat val folder; it is read with ``torch.load(weights_only=True)``."""
    wnids = ["n01440764", "n01443537"]
    write_imagenet_flat_val(tmp_path, wnids, [0, 1, 1])
    marker = tmp_path / "marker"
    torch.save(({"n01440764": ("tench",)}, [Payload(marker)]), tmp_path / "meta.bin")
    with pytest.raises(UnsafePickleError, match=r"refused to load .*meta\.bin.*Nothing from the file was executed"):
        get_dataset("imagenet", str(tmp_path), "test")
    assert not marker.exists()
    torch.load(tmp_path / "meta.bin", weights_only=False)
    assert marker.exists()
    # a genuine meta.bin (what torchvision.datasets.ImageNet writes) labels the flat folder
    torch.save(({w: (w,) for w in wnids}, [wnids[0], wnids[1], wnids[1]]), tmp_path / "meta.bin")
    ds = get_dataset("imagenet", str(tmp_path), "test")
    assert ds.targets == [0, 1, 1] and ds.classes == wnids
    # the devkit archive gives the same labels
    (tmp_path / "meta.bin").unlink()
    write_imagenet_devkit(tmp_path, wnids, [0, 1, 1])
    assert get_dataset("imagenet", str(tmp_path), "test").targets == [0, 1, 1]
