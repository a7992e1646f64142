"""User-made inputs: CSV files (BOM, empty labels, duplicates, missing images) and 16-bit images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import png
from schane.data import get_dataset
from schane.data.base import decode_image_bytes, load_image


def _images(root: Path, labels: dict[str, int]) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    rows = []
    for lab, n in labels.items():
        for i in range(n):
            png(root / "img" / f"{lab}_{i}.png", rng)
            rows.append((f"img/{lab}_{i}.png", lab))
    return rows


def _write(path: Path, rows, header=("path", "label"), bom: bool = False) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_with_byte_order_mark_and_extra_columns(tmp_path):
    rows = _images(tmp_path, {"cat": 4, "dog": 4, "owl": 4})
    _write(tmp_path / "train.csv", [(p, lab, "extra", 1) for p, lab in rows[:9]],
           header=("path", "label", "note", "weight"), bom=True)  # fmt: skip
    _write(tmp_path / "test.csv", rows[9:], header=None, bom=True)
    assert (tmp_path / "train.csv").read_bytes().startswith(b"\xef\xbb\xbfpath,label")
    tr = get_dataset("csv", str(tmp_path), "train", val_fraction=0.0)
    te = get_dataset("csv", str(tmp_path), "test")
    assert tr.classes == ["cat", "dog", "owl"] and len(tr) == 9  # no phantom class 'label'
    assert te.targets == [2, 2, 2] and Path(te.samples[0]).is_file()


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_csv_rejects_bad_rows_for_every_split(tmp_path, split):
    rows = _images(tmp_path, {"a": 6, "b": 6})
    _write(tmp_path / "train.csv", rows[:4] + rows[6:10])
    _write(tmp_path / "test.csv", rows[4:6] + rows[10:])
    assert len(get_dataset("csv", str(tmp_path), split, val_fraction=0.25)) > 0

    _write(tmp_path / "train.csv", rows[:4] + [(rows[6][0], " "), (rows[7][0], "")] + rows[8:10])
    with pytest.raises(ValueError, match=r"2 row\(s\) have an empty label: line 6 \(img/b_0.png\), line 7"):
        get_dataset("csv", str(tmp_path), split)

    _write(tmp_path / "train.csv", rows[:4] + rows[6:10] + [rows[1], ("./" + rows[2][0], "a")])
    with pytest.raises(ValueError, match=r"2 image path\(s\) are listed more than once: line 10 repeats line 3"):
        get_dataset("csv", str(tmp_path), split)

    _write(tmp_path / "train.csv", rows[:4] + rows[6:10] + [rows[4]])
    with pytest.raises(ValueError, match=r"1 image\(s\) are listed in both .*train.csv and .*test.csv"):
        get_dataset("csv", str(tmp_path), split)

    _write(tmp_path / "train.csv", rows[:4] + rows[6:10])
    _write(tmp_path / "test.csv", rows[4:6] + rows[10:] + [("img/gone_1.png", "a"), ("img/gone_2.png", "b")])
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\) listed in .*test.csv do not exist: .*gone_1.png"):
        get_dataset("csv", str(tmp_path), split)


def test_csv_missing_test_file_or_train_image_fails_at_load(tmp_path):
    rows = _images(tmp_path, {"a": 3, "b": 3})
    train = _write(tmp_path / "train.csv", rows)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        get_dataset("csv", None, "test", train_csv=str(train), test_csv=str(tmp_path / "nope.csv"))
    (tmp_path / "img" / "b_2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*train.csv do not exist: .*b_2.png"):
        get_dataset("csv", str(tmp_path), "test")


def _png16(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896], [40000, 65278, 65535, 128]], dtype=np.uint16)
    path = _png16(tmp_path / "gray16.png", values)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"  # how PIL opens a 16-bit grayscale PNG
    img = load_image(path)
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[:, :, 0], expected)
    np.testing.assert_array_equal(np.asarray(img)[:, :, 2], expected)
    np.testing.assert_array_equal(np.asarray(decode_image_bytes(path.read_bytes(), "x"))[:, :, 1], expected)
    # a typical 16-bit photo (mid-grey) is no longer almost all white
    for c in ("a", "b"):
        _png16(tmp_path / "set" / c / "0.png", np.full((8, 8), 30000))
        _png16(tmp_path / "set" / c / "1.png", np.full((8, 8), 30000))
    ds = get_dataset("image_folder", str(tmp_path / "set"), "test", test_fraction=0.5)
    assert np.asarray(ds[0][0]).max() == round(30000 / 257)
