"""Inputs that used to crash, be misread or blow up memory (issue 25): each is a one-line error with exit code 2
through the CLI, or the right result. The export and run-directory cases are in test_export.py and
test_runlock.py, the loss at huge norms in test_losses.py."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import write_tiered_metaoptnet
from schane.cli import main
from schane.config import from_dict, load_config
from schane.data import get_dataset
from schane.data.base import CorruptImageError, decode_image_bytes, load_image, npz_member_header, to_rgb
from schane.engine.checkpoint import load_checkpoint, save_checkpoint
from schane.engine.run_log import read_metrics, truncate_metrics
from schane.pipelines.train import train
from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 and one error line after any log lines; return that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    head = [i for i, line in enumerate(lines) if line.startswith(f"schane {argv[0]}: error: ")]
    assert len(head) == 1, err
    return "\n".join(lines[head[0]:])


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares ``w`` x ``h`` RGB pixels, with an empty image stream (a tiny file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- config


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str | bytes) -> str:
        p = tmp_path / "c.yaml"
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        return str(p)

    return write


@pytest.mark.parametrize("override, expected", [
    ("optim.warmup_epochs=.inf", "optim.warmup_epochs: expected a finite number, got inf"),
    ("aug.color_jitter=.inf", "aug.color_jitter: expected a finite number"),
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("loss.lam=-.inf", "loss.lam: expected a finite number"),
    ("data.crop_pct=1e-9", "data.crop_pct: must be >= 1 / data.img_size"),
    ("data.split_seed=-1", "data.split_seed: must be an integer in [0, 2**32)"),
    ("train.seed=-3", "train.seed: must be an integer"),
    ("fewshot.seeds=[0,-1]", "fewshot.seeds: must be integers"),
    ("output_dir=$SCHANE_TEST_UNSET_VAR/runs", "output_dir: environment variable $SCHANE_TEST_UNSET_VAR"),
])
def test_config_values_that_cannot_work_are_one_line(capsys, yaml_file, monkeypatch, override, expected):
    monkeypatch.delenv("SCHANE_TEST_UNSET_VAR", raising=False)
    line = _error(capsys, ["train", "--config", yaml_file("name: x\n"), "--set", override])
    assert line == f"schane train: error: {expected}" or line.startswith(f"schane train: error: {expected}"), line


def test_crop_pct_of_one_pixel_is_the_smallest_accepted():
    assert load_config(None, ["data.img_size=32", "data.crop_pct=0.03125"]).data.crop_pct == 0.03125
    with pytest.raises(ValueError, match="data.crop_pct"):
        load_config(None, ["data.img_size=32", "data.crop_pct=0.03"])


def test_yaml_aliases_cannot_expand_a_small_file(capsys, yaml_file):
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdef", "bcdefg", strict=True)]
    path = yaml_file("data:\n  options:\n" + "".join(f"    {r}\n" for r in rows))  # 9**7 = 4.8 million leaves
    line = _error(capsys, ["train", "--config", path])
    assert "YAML aliases" in line and "write the values out" in line and len(line) < 300, line
    # ordinary anchors (a shared block reused a few times) still load
    ok = yaml_file("optim: &o {lr: 0.001}\nfewshot: {seeds: &s [0, 1]}\nanalysis: {methods: [ce, schane]}\n")
    assert load_config(ok).optim.lr == 0.001
    with pytest.raises(ValueError, match="recursive"):
        load_config(yaml_file("data:\n  options: &a\n    x: *a\n"))


def test_a_non_utf8_config_names_the_file(capsys, yaml_file):
    path = yaml_file("name: caf\xe9\n".encode("latin-1"))
    line = _error(capsys, ["train", "--config", path])
    assert line == f"schane train: error: config file {path} is not UTF-8 text (byte 9 is 0xe9); save it as UTF-8"


def test_tilde_and_variables_are_expanded_in_every_path_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    cfg = load_config(None, ["output_dir=~/runs", "data.root=$SCRATCH/data", "model.checkpoint=${SCRATCH}/w.pt",
                             "data.name=csv", "data.options.train_csv=~/train.csv"])
    assert cfg.output_dir == str(tmp_path / "home" / "runs")
    assert cfg.run_dir == tmp_path / "home" / "runs" / "run"
    assert cfg.data.root == str(tmp_path / "scratch" / "data")
    assert cfg.model.checkpoint == str(tmp_path / "scratch" / "w.pt")
    assert cfg.data.options["train_csv"] == str(tmp_path / "home" / "train.csv")
    # a config stored in a checkpoint is read as written when a variable is unset (its run wrote that path)
    monkeypatch.delenv("SCHANE_TEST_UNSET_VAR", raising=False)
    assert from_dict({"output_dir": "$SCHANE_TEST_UNSET_VAR/runs"}).output_dir == "$SCHANE_TEST_UNSET_VAR/runs"


# --------------------------------------------------------------------------- images


def test_float_and_32_bit_integer_tiffs_keep_their_value_range():
    half = decode_image_bytes(_encode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"), "f")
    assert np.asarray(half)[0, 0].tolist() == [128, 128, 128]  # was black (0.5 clipped to 0)
    ramp = np.array([[0, 250, 500, 1000]], np.int32)
    got = np.asarray(decode_image_bytes(_encode(Image.fromarray(ramp), "TIFF"), "i"))[0, :, 0]
    assert got.tolist() == [0, 64, 128, 255]  # was 1000 / 257 = 4 for the brightest
    hdr = np.array([[0.0, 2.0, 4.0]], np.float32)  # floats beyond 1: by their range
    assert np.asarray(to_rgb(Image.fromarray(hdr)))[0, :, 0].tolist() == [0, 128, 255]
    small = np.array([[0, 100, 200]], np.int32)  # 8-bit values in a 32-bit image are not stretched
    assert np.asarray(to_rgb(Image.fromarray(small)))[0, :, 0].tolist() == [0, 100, 200]
    with pytest.raises(CorruptImageError, match="NaN or inf"):
        decode_image_bytes(_encode(Image.fromarray(np.full((2, 2), np.nan, np.float32)), "TIFF"), "nan.tif")


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I;16"])
def test_every_other_mode_converts_to_rgb(mode):
    img = Image.new("RGB", (3, 2), (200, 40, 90)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((2, 3), 51400, np.uint16))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (3, 2)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (200, 200, 200)  # 51400 / 257


def test_decompression_bombs_and_images_over_the_cap(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(60000, 60000))
    with pytest.raises(CorruptImageError, match=f"image file {bomb} is refused as a decompression bomb"):
        load_image(bomb)
    big = tmp_path / "big.png"  # 136 bytes that declare 144 megapixels: refused before decoding
    big.write_bytes(_png_header(12000, 12000))
    with pytest.raises(CorruptImageError, match=f"image file {big}: 12000x12000 .* above the decoding cap"):
        load_image(big)
    # a JPEG above the cap is decoded in draft mode at 1/2, 1/4 or 1/8 of its size, under the cap
    jpg = tmp_path / "big.jpg"
    jpg.write_bytes(_encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG"))
    monkeypatch.setenv("SCHANE_MAX_IMAGE_PIXELS", "1000")
    img = load_image(jpg)
    assert img.size == (32, 24) and np.abs(np.asarray(img, np.int16) - [10, 200, 30]).max() <= 3
    png = tmp_path / "small.png"
    png.write_bytes(_encode(Image.new("RGB", (64, 48)), "PNG"))
    with pytest.raises(CorruptImageError, match="above the decoding cap of"):
        load_image(png)


def _bomb_folder(tmp_path: Path, image_root: Path) -> Path:
    root = tmp_path / "data"
    for c in ("class_0", "class_1"):
        (root / c).mkdir(parents=True)
        for p in sorted((image_root / c).glob("*.png"))[:5]:
            shutil.copy(p, root / c / p.name)
    (root / "class_1" / "huge.png").write_bytes(_png_header(60000, 60000))
    return root


def test_training_on_a_bomb_is_one_line_naming_the_file(image_root, tmp_path, capsys, yaml_file):
    root = _bomb_folder(tmp_path, image_root)
    cfg = yaml_file(f"data: {{name: image_folder, root: {root}, img_size: 32, batch_size: 1, eval_batch_size: 4}}\n"
                    "model: {backbone: test_convnext, pretrained: false}\nloss: {name: ce}\n"
                    "optim: {epochs: 1, warmup_epochs: 0, base_batch_size: null, layer_decay: null}\n"
                    f"train: {{progress: false}}\noutput_dir: {tmp_path / 'runs'}\n")
    line = _error(capsys, ["train", "--config", cfg])
    assert line.startswith(f"schane train: error: image file {root / 'class_1' / 'huge.png'} is refused as a "
                           "decompression bomb"), line
    assert "\n" not in line


# --------------------------------------------------------------------------- checkpoints, predict, embed


@pytest.fixture(scope="module")
def ckpt(image_root, tmp_path_factory):
    """A test_convnext trained for 2 steps on the image_root fixture (3 classes)."""
    return train(tiny_cfg(image_root, tmp_path_factory.mktemp("runs"), "cnx", "train.test_at_end=false")).best_checkpoint


def _edited(ckpt: Path, out: Path, **fields) -> Path:
    state = load_checkpoint(ckpt)
    state.update(fields)
    return save_checkpoint(out, {k: v for k, v in state.items() if k not in ("format", "version")})


@pytest.mark.parametrize("fields, lines", [
    ({"model": 5}, ["model: expected a mapping of parameter names to tensors, got 5"]),
    ({"config": "x"}, ["config: expected a mapping (the run's config), got 'x'"]),
    ({"num_classes": "abc"}, ["num_classes: expected an integer >= 1, got 'abc'"]),
    ({"model": 5, "class_names": "abc", "epoch": -1},
     ["model: expected", "class_names: expected a list of strings", "epoch: expected an integer >= 0"]),
])
def test_malformed_checkpoint_fields_are_named_one_per_line(ckpt, tmp_path, capsys, fields, lines):
    bad = _edited(ckpt, tmp_path / "bad.pt", **fields)
    text = _error(capsys, ["eval", "--checkpoint", str(bad)])
    first, *rest = text.splitlines()
    assert first.startswith(f"schane eval: error: checkpoint {bad} has {len(lines)} malformed field(s)"), text
    assert len(rest) == len(lines) and all(r.strip().startswith(w) for r, w in zip(rest, lines, strict=True)), text


def test_predict_refuses_class_names_that_do_not_fit_the_classifier(ckpt, image_root, tmp_path, capsys):
    bad = _edited(ckpt, tmp_path / "bad.pt", class_names=["only_one"])
    text = _error(capsys, ["predict", "--checkpoint", str(bad), "--images", str(image_root / "class_0"),
                           "--out", str(tmp_path / "p.csv")])
    assert "class_names: 1 name(s) for a classifier of 3 classes" in text
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_predict_and_embed_skip_and_list_bombs_and_oversized_images(ckpt, image_root, tmp_path, capsys, command):
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(next((image_root / "class_0").glob("*.png")), d / "ok.png")
    (d / "bomb.png").write_bytes(_png_header(60000, 60000))
    (d / "big.png").write_bytes(_png_header(12000, 12000))
    out = tmp_path / ("p.csv" if command == "predict" else "e.npy")
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--set", "train.progress=false"]
    argv += ["--images", str(d)] if command == "predict" else ["--data", str(d)]
    assert main([command, *argv]) == 0, capsys.readouterr().err
    skipped_file = out.with_name(out.stem + ".skipped.csv")
    with skipped_file.open() as f:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert set(rows) == {"bomb.png", "big.png"}
    assert "decompression bomb" in rows["bomb.png"] and "decoding cap" in rows["big.png"]
    if command == "predict":
        with out.open() as f:
            assert [Path(r["path"]).name for r in csv.DictReader(f)] == ["ok.png"]
    else:
        assert np.load(out).shape[0] == 1


# --------------------------------------------------------------------------- arrays


def _npz_with_header(path: Path, shape: tuple[int, ...], data: bytes) -> None:
    """An npz whose images.npy announces ``shape`` (uint8) but holds ``data``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images.npy", header.getvalue() + data)


def test_npz_headers_are_checked_before_reading(tmp_path):
    write_tiered_metaoptnet(tmp_path, "test", per_class=1, size=4)
    labels = 160  # tieredImageNet's test classes, one image each
    npz = tmp_path / "test_images.npz"
    assert npz_member_header(npz, "images") == ((labels, 4, 4, 3), np.dtype(np.uint8))
    # a header that announces more than the entry holds (1.27 GB from a few bytes) is refused unread
    _npz_with_header(npz, (labels, 1536, 1728, 3), b"\0" * 100)
    with pytest.raises(ValueError, match="announces shape .* but its zip entry holds"):
        npz_member_header(npz, "images")
    # a deflated entry of zeros that expands 1000x to 74 MB: a zip bomb (written in chunks: nothing that large
    # is ever in memory)
    shape = (labels, 384, 400, 3)
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("images.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        chunk = bytes(2**20)
        for _ in range(int(np.prod(shape)) // 2**20):
            f.write(chunk)
        f.write(bytes(int(np.prod(shape)) % 2**20))
    with pytest.raises(ValueError, match="refused as a zip bomb"):
        npz_member_header(npz, "images")
    np.savez(npz, images=np.zeros((labels + 1, 4, 4, 3), np.uint8))  # one image more than labels
    with pytest.raises(ValueError, match=r"holds images of shape \(161, 4, 4, 3\)"):
        get_dataset("tiered_imagenet", tmp_path, "test_classes")
    np.savez(npz, images=np.array([None] * 3, dtype=object))
    with pytest.raises(ValueError, match="Python objects"):
        npz_member_header(npz, "images")


# --------------------------------------------------------------------------- metrics on resume


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def cb(info):
        if info["global_step"] == step:
            raise _Stop

    return cb


def test_a_resumed_runs_metrics_have_each_step_once(image_root, tmp_path):
    cfg = tiny_cfg(image_root, tmp_path, "r", "optim.epochs=2", "train.max_steps_per_epoch=3",
                   "train.ckpt_every_steps=2", "train.test_at_end=false")
    log = cfg.run_dir / "metrics.jsonl"
    with pytest.raises(_Stop):
        train(cfg, callback=_stop_at(3))  # step 3 is logged; the last checkpoint is step 2's
    assert [r["step"] for r in read_metrics(log) if r["kind"] == "train_step"] == [1, 2, 3]
    with pytest.raises(_Stop):
        train(cfg, resume="auto", callback=_stop_at(5))  # replays step 3; checkpoint at 4, stopped after 5
    assert [r["step"] for r in read_metrics(log) if r["kind"] == "train_step"] == [1, 2, 3, 4, 5]
    with log.open("a") as f:
        f.write('{"kind": "train_st')  # a line cut by a kill
    train(cfg, resume="auto")
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole
    assert [r["step"] for r in records if r["kind"] == "train_step"] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert [r["kind"] for r in records].count("start") == 1 and records[-1]["kind"] == "final"


def test_truncate_metrics_keeps_records_up_to_the_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    recs = [{"kind": "start"}, {"kind": "train_step", "step": 1}, {"kind": "epoch", "step": 2},
            {"kind": "train_step", "step": 3}, {"kind": "final", "global_step": 3}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{broken\n")
    assert truncate_metrics(p, 2) == 3
    assert read_metrics(p) == recs[:3]
    assert truncate_metrics(p, 2) == 0 and truncate_metrics(tmp_path / "none.jsonl", 0) == 0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["metrics.jsonl"]

