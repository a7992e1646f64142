"""What a run records as it goes: the metrics lines of ``metrics.jsonl`` (written, read, truncated on resume)
and the throughput in images per second."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl``; optionally mirrors scalars to TensorBoard.

    Only the main process should create one.

    Raises:
        ImportError: when ``tensorboard=True`` and the ``tensorboard`` package is missing.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "train.tensorboard=true needs the tensorboard package: pip install 'schane[tensorboard]' "
                    "(or set train.tensorboard=false)"
                ) from e
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        rec = {"time": round(time.time(), 3), **{k: _jsonable(v) for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self._tb is not None and step is not None:
            kind = record.get("kind", "")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self._tb.add_scalar(f"{kind}/{k}" if kind else k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line).

    Blank lines are skipped; a malformed line (for example the last line of a run that was
    killed mid-write) is skipped with a warning.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file {p} not found; pass a run directory's metrics.jsonl")
    records = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipping a malformed line", p, i)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def truncate_metrics(path: str | Path, step: int) -> int:
    """Cut a run's ``metrics.jsonl`` back to a checkpoint's ``global_step``, atomically.

    On resume, the records logged after the checkpoint (steps above ``step``, and a ``final`` record) describe
    weights that no longer exist and would be logged again: they are removed, so that every step appears once.
    Malformed lines (a write cut by a kill) go too; records without a step (``start``) stay. The file is
    rewritten to a temporary file beside it and renamed over it, so it is the old or the new log, never a mix.

    Args:
        path: the ``metrics.jsonl`` (nothing happens when it does not exist).
        step: the checkpoint's ``global_step``.

    Returns:
        The number of lines removed.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    keep, dropped = [], 0
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        s = rec.get("step", rec.get("global_step")) if isinstance(rec, dict) else None
        later = isinstance(s, (int, float)) and not isinstance(s, bool) and s > step
        if not isinstance(rec, dict) or later or rec.get("kind") == "final":
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        logger.info("%s: removed %d record(s) logged after the checkpoint's step %d", p, dropped, step)
    return dropped


class Throughput:
    """Images per second over a sliding window of steps."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t: float | None = None

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self, images: int) -> None:
        if self._t is not None:
            self.seconds += time.perf_counter() - self._t
            self.images += images
            self._t = None

    @property
    def value(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


__all__ = [
    "MetricsLogger",
    "Throughput",
    "read_metrics",
    "truncate_metrics",
]
