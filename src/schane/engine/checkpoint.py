"""Training checkpoints: atomic writes, safe loading with clear errors, RNG state capture.

A checkpoint is a ``torch.save`` archive of plain tensors and Python containers (no pickled
classes), so it loads with ``torch.load(weights_only=True)``. Keys::

    format        "schane-checkpoint"
    version       1
    model         state_dict of the (unwrapped) SCHaNeModel
    optimizer     optimizer state_dict
    scheduler     LR scheduler state_dict
    scaler        GradScaler state_dict or None
    ema           EMA state_dict or None
    queue         memory-queue state_dict or None
    rng           python / numpy / torch / cuda RNG states
    epoch         epoch in progress (0-based)
    batch_in_epoch  batches of that epoch already consumed
    global_step   optimizer steps taken so far
    best_metric   best validation top-1 so far (or None)
    best_epoch    epoch of that best (or None)
    config        the resolved config as a nested dict
    num_classes   classifier width
    eval_weights  "model" or "ema": which weights evaluation/selection used

Examples:
    >>> save_checkpoint("runs/x/last.pt", {"model": model.state_dict(), ...})  # doctest: +SKIP
    >>> state = load_checkpoint("runs/x/last.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "schane-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing required content, corrupt or truncated."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically.

    The archive is written to a temporary file in the same directory, flushed and
    fsync'ed, then renamed over ``path`` with :func:`os.replace`, so a reader (or a run
    killed mid-write) sees either the old file or the complete new one, never a partial one.

    Args:
        path: destination file; its parent directory is created if needed.
        state: mapping of tensors and plain Python values (see the module docstring).

    Returns:
        The destination path.

    Raises:
        ValueError: when ``state`` is not a dict.
    """
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Persist the rename itself (directory entry) where the platform allows it.
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Loading uses ``weights_only=True``: no arbitrary objects are unpickled.

    Args:
        path: checkpoint file.
        map_location: device the tensors are mapped to.

    Returns:
        The stored mapping.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: (a ``ValueError``) when the file is empty, truncated, corrupt or
            not a schane checkpoint. Never falls back to a fresh start.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; pass a file written by 'schane train' (runs/NAME/last.pt or best.pt)"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it is corrupt: delete it or resume from another file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or corrupt (not a complete torch archive); "
            "delete it or resume from another checkpoint"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError/zipfile errors
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) could not be read, it is truncated or corrupt: {e}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a schane training checkpoint (no 'format: {FORMAT}' marker); "
            "for plain weights use model.checkpoint=FILE instead"
        )
    missing = [k for k in ("model", "config", "num_classes") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks required entries {missing}; it is corrupt or incomplete")
    return state


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (CPU) and CUDA RNG states as weights-only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`capture_rng_state`.

    Raises:
        CheckpointError: when the state is malformed.
    """
    try:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state(
            (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda][: torch.cuda.device_count()])
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint RNG state is malformed: {e}") from e


# --------------------------------------------------------------------------- model loading


def load_checkpoint_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Any, Any, int]:
    """Rebuild the trained model from a checkpoint.

    The model is built from the checkpoint's own config (without downloading pretrained
    weights) and receives the stored weights: the EMA weights when the run evaluated and
    selected with EMA, the raw weights otherwise.

    Args:
        path: checkpoint written by ``schane train``.
        map_location: device the model is placed on.

    Returns:
        ``(model, cfg, num_classes)``: the ``SCHaNeModel`` in eval mode, the run's
        :class:`~schane.config.Config` and the number of classes.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: when the file is corrupt or its weights do not fit the model.
    """
    from schane.config import from_dict
    from schane.models import build_model

    state = load_checkpoint(path, map_location="cpu")
    cfg = from_dict(state["config"])
    num_classes = int(state["num_classes"])
    model_cfg = _offline_model_cfg(cfg.model)
    model = build_model(model_cfg, num_classes)
    weights = state["model"]
    if state.get("eval_weights") == "ema" and state.get("ema") is not None:
        weights = state["ema"]["module"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: stored weights do not fit the model of its config: {e}") from e
    model.to(map_location)
    model.eval()
    return model, cfg, num_classes


def _offline_model_cfg(model_cfg: Any) -> Any:
    """A copy of ``model_cfg`` that builds the architecture without loading pretrained weights."""
    import dataclasses

    return dataclasses.replace(model_cfg, pretrained=False, checkpoint=None)
