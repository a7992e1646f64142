"""Restricted unpickling for the pickle-based dataset releases.

Benchmark caches (``mini-imagenet-cache-*.pkl``, ``CIFAR_FS_*.pickle``, tieredImageNet's
``*_labels.pkl`` ...) are passed around between labs as files, and a plain ``pickle.load`` of
such a file runs whatever code its author put in it. Every pickle a dataset reader opens goes
through :func:`load_pickle` instead, which admits only the globals these formats need:

- numpy arrays, dtypes and scalars (``numpy.core.multiarray._reconstruct`` / ``scalar``,
  ``numpy.ndarray``, ``numpy.dtype`` and ``numpy.core.numeric._frombuffer``, under both the
  numpy 1 ``numpy.core`` and the numpy 2 ``numpy._core`` module names);
- ``_codecs.encode`` restricted to latin-1 (Python 3 writes ``bytes`` that way in protocol 2);
- ``collections.OrderedDict``.

Dicts, lists, tuples, strings, bytes and numbers need no globals. Anything else is refused
with :class:`UnsafePickleError`, naming the file and the refused global. Files are decoded with
``encoding="latin1"``, so Python-2 pickles (whose ``str`` objects hold raw bytes, such as numpy
array data) load as they do with ``pickle.load(f, encoding="latin1")``.

Examples:
    >>> from schane.data.safe_pickle import load_pickle
    >>> obj = load_pickle("CIFAR_FS_train.pickle")  # doctest: +SKIP
    >>> obj["data"].shape  # doctest: +SKIP
    (38400, 32, 32, 3)
"""

from __future__ import annotations

import codecs
import collections
import importlib
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "load_pickle", "loads_pickle"]


class UnsafePickleError(ValueError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (numpy 2) or ``numpy.core.<submodule>.<name>`` (numpy 1)."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")  # pragma: no cover - every numpy has one


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 uses it in protocol-2 pickles of ``bytes``: latin-1 only."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode is admitted only for latin-1 strings, got {encoding!r}")
    return obj.encode("latin1", errors)


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for submodule, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
        obj = _numpy_attr(submodule, name)
        for package in ("numpy.core", "numpy._core"):
            table[(f"{package}.{submodule}", name)] = obj
    return table


_ALLOWED = _allowed()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, what: str) -> None:
        super().__init__(file, encoding="latin1")
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to unpickle {self._what}: it asks for the Python global '{module}.{name}', but this "
                "dataset format holds only numpy arrays, lists, dicts, strings and numbers. Nothing from the "
                "file was executed. The file is not a genuine copy of the release (it may have been tampered "
                "with): download it again from the source listed in docs/datasets.md"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"refused to unpickle {self._what}: it uses persistent ids, which no dataset release does"
        )


# Errors a damaged (truncated, corrupt or wrong-format) pickle can raise while being read.
_DAMAGED = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    struct.error,
    UnicodeDecodeError,
    OverflowError,
)


def loads_pickle(data: bytes, what: str) -> Any:
    """Unpickle ``data`` with the restricted unpickler; ``what`` names the source in errors.

    Args:
        data: The pickled bytes.
        what: Description of the source (e.g. a path) for error messages.

    Returns:
        The unpickled object (containers, strings, numbers and numpy arrays only).

    Raises:
        UnsafePickleError: If the pickle asks for any other global (nothing is executed).
        ValueError: If the bytes are not a complete, readable pickle.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), what).load()
    except UnsafePickleError:
        raise
    except _DAMAGED as err:
        raise ValueError(
            f"cannot read pickle {what} ({type(err).__name__}: {err}); the file is corrupt, truncated or not "
            "a pickle: download or extract it again"
        ) from err


def load_pickle(path: str | os.PathLike) -> Any:
    """Read a dataset pickle with the restricted unpickler (Python-2 pickles included).

    Args:
        path: The pickle file.

    Returns:
        The unpickled object (containers, strings, numbers and numpy arrays only).

    Raises:
        FileNotFoundError: If the file does not exist.
        UnsafePickleError: If the file asks for a global outside the allow-list (the message names
            the file and the global; nothing is executed).
        ValueError: If the file is not a complete, readable pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle file {path} does not exist")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, str(path)).load()
    except UnsafePickleError:
        raise
    except _DAMAGED as err:
        raise ValueError(
            f"cannot read pickle {path} ({type(err).__name__}: {err}); the file is corrupt, truncated or not "
            "a pickle: download or extract it again"
        ) from err
