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
    class_names   the training split's class names, in label order (absent in files of schane < 0.2)
    eval_weights  "model" or "ema": which weights evaluation/selection used

:class:`CheckpointManager` owns that state during training: what goes into it, when ``last.pt``,
``best.pt`` and the periodic mid-epoch ``last.pt`` are written, and which weights are evaluated
(:func:`evaluation_weights`).

Examples:
    >>> save_checkpoint("runs/x/last.pt", {"model": model.state_dict(), ...})  # doctest: +SKIP
    >>> state = load_checkpoint("runs/x/last.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch

from schane.config import Config, from_dict
from schane.distributed import DistInfo, all_gather_object, barrier, broadcast_object
from schane.models import SCHaNeModel, build_model

logger = logging.getLogger(__name__)

FORMAT = "schane-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing required content, corrupt or truncated."""


class CheckpointFieldError(CheckpointError):
    """A checkpoint's fields are not of the types ``schane train`` writes (one line per field after the first)."""


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
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, (OSError, RuntimeError)) and _out_of_space(e, path.parent, payload):
            need, free = _state_nbytes(payload), shutil.disk_usage(path.parent).free
            raise OSError(
                errno.ENOSPC,
                f"no space left to write checkpoint {path}: it needs about {need / 2**20:.0f} MB and "
                f"{free / 2**20:.0f} MB are free on that disk; free some space or set output_dir to another disk "
                "(the previous checkpoint is intact)",
            ) from e
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


def _refuse_other_formats(path: Path) -> None:
    """A clear error for files that are not training checkpoints but are intact (an export, plain weights)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            meta = f.read(n) if 0 < n < 100_000_000 else b""
    except OSError:
        return
    if meta.startswith(b"{") and b'"dtype"' in meta:
        export = (path.parent / "config.json").is_file()
        what = "a schane export (model.safetensors)" if export else "a safetensors weights file"
        raise CheckpointError(
            f"{path} is {what}, not a training checkpoint: pass runs/NAME/best.pt (or last.pt) here; an export "
            "loads with timm alone (see its README.md), and a weights file starts a run with "
            "--set model.checkpoint=FILE"
        )


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
        _refuse_other_formats(path)
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or corrupt (not a complete torch archive); "
            "delete it or resume from another checkpoint"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds a pickled Python object ({refused.group(1)}) other than "
                "tensors and plain containers, and such objects are never unpickled (they could run code). "
                "Use a file written by 'schane train'"
            ) from e
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) could not be read, it is truncated or corrupt (damaged pickle records); "
            "delete it or resume from another checkpoint"
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/zipfile errors
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
    wrong = field_errors(state)
    if wrong:
        raise CheckpointFieldError(f"checkpoint {path} has {len(wrong)} malformed field(s); it is corrupt or was edited: "
                              "use a file written by 'schane train'\n" + "\n".join(f"  {w}" for w in wrong))
    return state


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_weights(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _what(v: Any) -> str:
    text = repr(v) if not isinstance(v, (dict, list, tuple)) else f"a {type(v).__name__} of {len(v)}"
    return text if len(text) <= 60 else text[:57] + "..."


def field_errors(state: dict[str, Any]) -> list[str]:
    """One line per field of a loaded checkpoint whose type or value is not what ``schane train`` writes.

    Checked: ``model`` (str -> tensor), ``config`` (a mapping), ``num_classes`` (an int >= 1), ``class_names``
    (absent/None, or that many strings), ``ema`` (None or a mapping with ``module`` weights), ``eval_weights``,
    ``epoch``/``batch_in_epoch``/``global_step`` (ints >= 0), ``best_metric`` (a number or None) and
    ``best_epoch`` (an int or None). Optimizer/scheduler/RNG states are checked where they are restored.
    """
    out = []
    if not _is_weights(state.get("model")):
        out.append(f"model: expected a mapping of parameter names to tensors, got {_what(state.get('model'))}")
    if not isinstance(state.get("config"), dict):
        out.append(f"config: expected a mapping (the run's config), got {_what(state.get('config'))}")
    n = state.get("num_classes")
    if not _is_int(n) or n < 1:
        out.append(f"num_classes: expected an integer >= 1, got {_what(n)}")
        n = None
    names = state.get("class_names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(c, str) for c in names):
            out.append(f"class_names: expected a list of strings, got {_what(names)}")
        elif n is not None and len(names) != n:
            out.append(f"class_names: {len(names)} name(s) for a classifier of {n} classes (num_classes)")
    ema = state.get("ema")
    if ema is not None and not (isinstance(ema, dict) and _is_weights(ema.get("module"))):
        out.append(f"ema: expected None or an EMA state with 'module' weights, got {_what(ema)}")
    if state.get("eval_weights") not in (None, "model", "ema"):
        out.append(f"eval_weights: expected 'model' or 'ema', got {_what(state.get('eval_weights'))}")
    for key in ("epoch", "batch_in_epoch", "global_step"):
        if key in state and not (_is_int(state[key]) and state[key] >= 0):
            out.append(f"{key}: expected an integer >= 0, got {_what(state[key])}")
    bm = state.get("best_metric")
    if bm is not None and not (isinstance(bm, (int, float)) and not isinstance(bm, bool)):
        out.append(f"best_metric: expected a number or None, got {_what(bm)}")
    be = state.get("best_epoch")
    if be is not None and not _is_int(be):
        out.append(f"best_epoch: expected an integer or None, got {_what(be)}")
    return out


def _state_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_nbytes(v) for v in obj)
    return 0


def _out_of_space(err: BaseException, folder: Path, payload: dict[str, Any]) -> bool:
    """Whether a failed write ran out of disk (torch's zip writer hides ``ENOSPC`` in a RuntimeError)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if "No space left" in str(err) or "unexpected pos" in str(err):
        try:
            return shutil.disk_usage(folder).free < _state_nbytes(payload) + (1 << 20)
        except OSError:
            return False
    return False


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete checkpoint temporaries (``.last.pt.*.tmp``) left by a run killed while writing.

    Returns:
        The removed paths.
    """
    removed: list[Path] = []
    folder = Path(run_dir)
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.pt.*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            continue
    if removed:
        logger.info("removed %d stale checkpoint temporar%s in %s", len(removed), "y" if len(removed) == 1 else "ies",
                    folder)
    return removed


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (CPU) and CUDA RNG states as weights-only-loadable values."""
    np_state = np.random.get_state(legacy=True)  # the default; numpy's stubs type a bare call as the dict form
    assert isinstance(np_state, tuple)  # the global RandomState is always MT19937, whose legacy state is a tuple
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


def load_checkpoint_model(path: str | Path, map_location: str | torch.device = "cpu"
                          ) -> tuple[SCHaNeModel, Config, int]:
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

    state = load_checkpoint(path, map_location="cpu")
    stored = state["config"]
    if "split_seed" not in stored.get("data", {}):  # schane < 0.2 drew the validation hold-out with train.seed
        stored = {**stored, "data": {**stored.get("data", {}), "split_seed": stored.get("train", {}).get("seed", 0)}}
    try:
        cfg = from_dict(stored)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: its stored config is invalid ({e}); use a file written by "
                              "'schane train'") from e
    num_classes = int(state["num_classes"])
    model = build_model(_offline_model_cfg(cfg.model), num_classes)
    try:
        model.load_state_dict(evaluation_weights(state))
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: stored weights do not fit the model of its config: {e}") from e
    model.class_names = state.get("class_names")
    model.to(map_location)
    model.eval()
    return model, cfg, num_classes


def evaluation_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's run evaluated and selected with: the EMA weights when it used EMA."""
    if state.get("eval_weights") == "ema" and state.get("ema") is not None:
        return state["ema"]["module"]
    return state["model"]


def _offline_model_cfg(model_cfg: Any) -> Any:
    """A copy of ``model_cfg`` that builds the architecture without loading pretrained weights."""
    import dataclasses

    return dataclasses.replace(model_cfg, pretrained=False, checkpoint=None)


# --------------------------------------------------------------------------- the manager of a run's checkpoints


class CheckpointManager:
    """What goes into a training checkpoint, and when ``last.pt`` and ``best.pt`` are written.

    Policy (as timm's ``CheckpointSaver``, with resumable mid-epoch state):

    * ``last.pt`` after every epoch, and every ``every_steps`` optimizer steps inside an epoch;
    * ``best.pt`` after an epoch whose selection metric (validation top-1, of the EMA weights when EMA is
      on) beats every earlier epoch's (the first of equals is kept);
    * the state holds everything a bit-identical resume needs (see the module docstring).

    Only rank 0 writes; :meth:`state` is collective under DDP (it gathers every rank's RNG states).

    Args:
        run_dir: the run directory.
        parts: the :class:`~schane.engine.loop.TrainParts` whose state is saved and restored.
        config: the resolved config as a plain dict.
        class_names: the training split's class names, in label order.
        every_steps: steps between mid-epoch checkpoints, or ``None``.
    """

    def __init__(self, run_dir: str | Path, parts: Any, config: dict[str, Any], class_names: Sequence[str],
                 every_steps: int | None = None) -> None:

        self.run_dir = Path(run_dir)
        self.parts = parts
        self.info: DistInfo = parts.info
        self.config = config
        self.class_names = [str(c) for c in class_names]
        self.every_steps = every_steps
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def state(self, epoch: int, batch_in_epoch: int, global_step: int) -> dict[str, Any]:
        """The checkpoint mapping at this point of training (collective under DDP)."""

        p = self.parts
        return {
            "model": p.raw_model.state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict() if p.scaler.is_enabled() else None,
            "ema": p.ema.state_dict() if p.ema is not None else None,
            "queue": p.queue.state_dict() if p.queue is not None else None,
            "rng": all_gather_object(capture_rng_state(), self.info),
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_step": global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "config": self.config,
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "eval_weights": "ema" if p.ema is not None else "model",
        }

    def maybe_save_mid_epoch(self, *, epoch: int, batch_in_epoch: int, n_batches: int, global_step: int) -> Path | None:
        """Write ``last.pt`` every ``every_steps`` steps, except at an epoch's end (saved by :meth:`end_epoch`).

        Returns:
            The path written (on rank 0), else ``None``.
        """
        k = self.every_steps
        if k is None or global_step % k != 0 or batch_in_epoch >= n_batches:
            return None
        return self.save_mid_epoch(epoch=epoch, batch_in_epoch=batch_in_epoch, global_step=global_step)

    def save_mid_epoch(self, *, epoch: int, batch_in_epoch: int, global_step: int) -> Path | None:
        """Write ``last.pt`` now, in the middle of an epoch (collective under DDP: every rank calls it).

        Returns:
            The path written (on rank 0), else ``None``.
        """

        st = self.state(epoch, batch_in_epoch, global_step)
        path = save_checkpoint(self.last_path, st) if self.info.is_main else None
        barrier(self.info)
        return path

    def end_epoch(self, epoch: int, metric: float | None, global_step: int) -> bool:
        """Record the epoch's selection metric (``None``: not evaluated), write ``last.pt`` and maybe ``best.pt``.

        Returns:
            Whether this epoch is the new best.
        """

        improved = False
        if metric is not None and (self.best_metric is None or metric > self.best_metric):
            self.best_metric, self.best_epoch, improved = metric, epoch, True
        self.best_metric, self.best_epoch, improved = broadcast_object(
            (self.best_metric, self.best_epoch, improved), self.info)
        st = self.state(epoch + 1, 0, global_step)
        if self.info.is_main:
            save_checkpoint(self.last_path, st)
            if improved:
                save_checkpoint(self.best_path, st)
        return improved

    def restore(self, state: dict[str, Any]) -> tuple[int, int, int]:
        """Load a checkpoint mapping into the parts and this manager.

        Returns:
            ``(epoch, batch_in_epoch, global_step)`` to continue from.

        Raises:
            ValueError: when the checkpoint's classes differ from the dataset's.
            CheckpointError: on a malformed RNG state.
        """
        p = self.parts
        stored = state.get("class_names")
        if int(state["num_classes"]) != len(self.class_names) or (stored is not None and list(stored) != self.class_names):
            raise ValueError(
                f"the checkpoint was trained on {state['num_classes']} classes, the dataset has {len(self.class_names)}"
                f"{'' if stored is None else ' with other names' if len(stored) == len(self.class_names) else ''}; "
                "resume with the data config the run was started with"
            )
        p.raw_model.load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            p.scaler.load_state_dict(state["scaler"])
        if p.ema is not None and state.get("ema") is not None:
            p.ema.load_state_dict(state["ema"])
        if p.queue is not None and state.get("queue") is not None:
            p.queue.load_state_dict(state["queue"])
        self.best_metric, self.best_epoch = state.get("best_metric"), state.get("best_epoch")
        rngs = state["rng"]
        restore_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
        return int(state["epoch"]), int(state["batch_in_epoch"]), int(state["global_step"])
