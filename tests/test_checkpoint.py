"""Checkpoint files: atomic writes, clear errors on damaged files, RNG state round trip."""

import os
import random

import numpy as np
import pytest
import torch

from schane.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state():
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"name": "x"}, "num_classes": 3, "epoch": 1}


def test_roundtrip_and_no_temp_files_left(tmp_path):
    p = save_checkpoint(tmp_path / "sub" / "last.pt", _state())
    st = load_checkpoint(p)
    assert torch.equal(st["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert st["epoch"] == 1 and st["format"] == "schane-checkpoint"
    assert sorted(os.listdir(p.parent)) == ["last.pt"]


def test_overwrite_is_atomic_replace(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    save_checkpoint(p, _state())
    before = p.read_bytes()

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(p, _state())
    assert p.read_bytes() == before  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # temp file removed


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "flip"])
def test_damaged_files_raise_clear_error(tmp_path, damage):
    p = save_checkpoint(tmp_path / "last.pt", {**_state(), "big": torch.randn(2000)})
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "garbage":
        p.write_bytes(b"not a checkpoint at all" * 10)
    else:  # corrupt the middle of the archive (the pickled header / records)
        b = bytearray(data)
        for i in range(0, 64):
            b[i] ^= 0xFF
        p.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="corrupt|truncated|empty"):
        load_checkpoint(p)
    assert issubclass(CheckpointError, ValueError)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="schane train"):
        load_checkpoint(tmp_path / "nope.pt")
    q = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, q)
    with pytest.raises(CheckpointError, match="not a schane training checkpoint"):
        load_checkpoint(q)


def test_rng_roundtrip_through_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian state behind
    st = capture_rng_state()
    expect = (random.random(), np.random.rand(), torch.rand(3))
    p = save_checkpoint(tmp_path / "r.pt", {**_state(), "rng": [st]})
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(p)["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])
    with pytest.raises(CheckpointError, match="RNG"):
        restore_rng_state({"python": None})
