"""The restricted unpickler, and a planted payload for every reader that parses pickles: refused, never run."""

from __future__ import annotations

import collections
import pickle

import numpy as np
import pytest

from fixtures import Payload, dump_payload, dump_py2
from schane.data import UnsafePickleError, load_pickle

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
