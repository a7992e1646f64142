"""The offline glyphs set: class count, fonts per class, determinism, splits."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from PIL import Image

from schane.data import get_dataset
from schane.data import glyphs as glyphs_mod
from schane.data.glyphs import GLYPH_FONTS, render_glyph_set


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("glyph_cache")


@pytest.fixture(scope="module")
def glyph_set(cache_dir):
    return render_glyph_set(32, 20, seed=0, cache_dir=cache_dir, progress=False)


def test_promised_classes_and_font_renderings(glyph_set):
    gs = glyph_set
    n = len(gs.codepoints)
    assert n >= 600
    assert gs.images.shape == (n * 20, 32, 32) and gs.images.dtype == np.uint8
    assert np.bincount(gs.labels).tolist() == [20] * n
    for c in range(n):
        assert len(set(gs.fonts[gs.labels == c].tolist())) >= 8
    assert len(set(gs.codepoints.tolist())) == n
    for cp in gs.codepoints.tolist():
        ch = chr(cp)
        assert not ch.isspace() and unicodedata.category(ch)[0] not in "CMZ", hex(cp)
    # every rendering shows ink (no blank glyph): a pixel 7.5 noise stds below white; background is white
    assert (gs.images.reshape(len(gs.images), -1).min(1) < 160).all()
    assert np.median(gs.images) > 200


def test_lookalike_characters_are_merged(glyph_set):
    present = set(glyph_set.codepoints.tolist())
    for group in ("AΑА", "BΒВ", "OΟО", "HΗН", "PΡР", "KΚК", "XΧХ", "ɡg"):
        assert sum(ord(ch) in present for ch in group) <= 1, group


def test_renders_are_deterministic(glyph_set, cache_dir):
    glyphs_mod._MEMO.clear()
    again = render_glyph_set(32, 20, seed=0, cache_dir=cache_dir, progress=False)
    np.testing.assert_array_equal(again.images, glyph_set.images)
    # rendering a class from scratch (no cache) gives the cached pixels
    classes = glyphs_mod.glyph_classes(8, cache_dir, progress=False)
    pick = {cp: classes[cp] for cp in glyph_set.codepoints.tolist()[100:103]}
    fresh, fonts = glyphs_mod._render_classes(pick, {}, 32, 20, 0, 0.05, 1.0, False)
    np.testing.assert_array_equal(fresh, glyph_set.images[100 * 20 : 103 * 20])
    other, _ = glyphs_mod._render_classes(pick, {}, 32, 20, 1, 0.05, 1.0, False)
    assert not np.array_equal(other, fresh)


def test_distortion_is_a_small_affine_warp():
    """With distortion=0 and no noise a sample is exactly the box-downsampled base render."""
    cp = ord("R")
    base = glyphs_mod._render_base(cp, 0, 64).astype(np.float64)
    img, _ = glyphs_mod._render_classes({cp: [0]}, {}, 32, 1, 0, 0.0, 0.0, False)
    expected = 255.0 - base.reshape(32, 2, 32, 2).mean((1, 3))
    np.testing.assert_allclose(img[0].astype(np.float64), np.rint(expected), atol=1)


def test_fewshot_splits_default_and_larger(cache_dir, glyph_set):
    kw = dict(cache_dir=str(cache_dir), progress=False)
    parts = {s: get_dataset("glyphs", split=s, **kw) for s in ("train", "val", "val_classes", "test_classes")}
    assert [len(parts[s].classes) for s in ("train", "val_classes", "test_classes")] == [64, 16, 20]
    assert len(parts["train"]) == 64 * 18 and len(parts["val"]) == 64 * 2
    assert len(parts["val_classes"]) == 16 * 20 and len(parts["test_classes"]) == 20 * 20
    assert not set(parts["train"].samples) & set(parts["val"].samples)
    sets = [set(parts[s].classes) for s in ("train", "val_classes", "test_classes")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    img, label = parts["test_classes"][7]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert 0 <= label < 20 and set(parts["test_classes"].targets) == set(range(20))
    n = len(glyph_set.codepoints)
    big = get_dataset(
        "glyphs", split="test_classes", n_train_classes=n - 200, n_val_classes=100, n_test_classes=100, **kw
    )
    assert len(big.classes) == 100
    with pytest.raises(ValueError, match="only"):
        get_dataset("glyphs", n_train_classes=n, **kw)
    with pytest.raises(ValueError, match="n_val_classes"):
        get_dataset("glyphs", n_val_classes=0, **kw)
    assert len(GLYPH_FONTS) == 16


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_cache_is_rendered_again(cache_dir, glyph_set, caplog, damage):
    """A cache file cut short (BadZipFile) or with a damaged member (bad CRC) is re-rendered, not fatal."""
    glyphs_mod._MEMO.clear()
    before = set(cache_dir.glob("glyphs-v1-*.npz"))
    first = render_glyph_set(8, 2, seed=3, cache_dir=cache_dir, progress=False)
    (path,) = set(cache_dir.glob("glyphs-v1-*.npz")) - before
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)
        path.write_bytes(bytes(data))
    glyphs_mod._MEMO.clear()
    with caplog.at_level("WARNING", logger="schane.data.glyphs"):
        again = render_glyph_set(8, 2, seed=3, cache_dir=cache_dir, progress=False)
    assert "damaged" in caplog.text and path.name in caplog.text
    np.testing.assert_array_equal(again.images, first.images)
    with np.load(path) as z:  # rewritten whole
        np.testing.assert_array_equal(z["images"], first.images)
    path.unlink()
