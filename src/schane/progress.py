"""Progress reporting that reads well both in a terminal and in a cluster job's log.

When standard error is a terminal, :func:`progress` shows a tqdm bar. Otherwise (output redirected to a
file, ``make demo > log 2>&1``, a batch scheduler) bars would write hundreds of frames into the log, so it
writes nothing per item and, for loops marked ``log=True``, one ``logging`` line every ``log_every`` items
and one at the end. Library code reports through :mod:`logging` (logger names under ``schane``);
:func:`setup_logging` is what the command-line tool calls to print those records.

Examples:
    >>> from schane.progress import progress
    >>> total = sum(x for x in progress(range(5), desc="demo", enabled=False))
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("schane.progress")


def interactive() -> bool:
    """Whether standard error is a terminal (progress bars are shown only then)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


class _LogProgress:
    """A tqdm-like object that logs a line every ``every`` items instead of drawing a bar."""

    def __init__(self, total: int | None, desc: str, every: int | None, initial: int, log: bool,
                 log_end: bool = True) -> None:
        self.total, self.desc, self.n, self.log, self.log_end = total, desc, initial, log, log_end
        self.every = every or (max(1, -(-total // 10)) if total else 100)
        self._t0 = time.perf_counter()
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        before = self.n
        self.n += n
        if self.log and (self.n // self.every != before // self.every) and self.n != self.total:
            self._emit()

    def set_postfix(self, **kwargs: Any) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

    def _emit(self) -> None:
        elapsed = time.perf_counter() - self._t0
        of = f"/{self.total}" if self.total else ""
        tail = f", {self._postfix}" if self._postfix else ""
        logger.info("%s: %d%s (%.0f s%s)", self.desc, self.n, of, elapsed, tail)

    def close(self) -> None:
        if self.log and self.log_end and self.n:
            self._emit()
        self.log = False

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(
    total: int | None, *, desc: str = "", enabled: bool = True, log: bool = False, log_every: int | None = None,
    initial: int = 0, log_end: bool = True, bar: bool = True,
) -> Any:
    """A progress object with tqdm's ``update``/``set_postfix``/``close`` (and context-manager) interface.

    Args:
        total: number of items, or ``None`` when unknown.
        desc: label.
        enabled: ``False`` shows and logs nothing.
        log: when not on a terminal, log a line every ``log_every`` items (default: about ten lines per
            loop) and one at the end; inner loops pass ``False`` and stay silent in logs.
        log_every: items between log lines.
        initial: items already done (a resumed epoch).
        log_end: also log a line when the loop ends (off where the caller logs its own summary).
        bar: ``False`` never draws a bar (log lines instead, also on a terminal; ``train.progress: false``).
    """
    if enabled and bar and interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True)
    return _LogProgress(total, desc, log_every, initial, log and enabled, log_end)


def progress(
    iterable: Iterable[T], *, desc: str = "", total: int | None = None, enabled: bool = True, log: bool = False,
    log_every: int | None = None,
) -> Iterator[T]:
    """Iterate over ``iterable`` with a bar on a terminal, or occasional log lines elsewhere (see module doc)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = progress_bar(total, desc=desc, enabled=enabled, log=log, log_every=log_every)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def setup_logging(level: int = logging.INFO) -> None:
    """Print ``schane`` log records on standard error as plain lines (what the CLI calls once).

    Records keep their level name when it is a warning or worse. Calling it again does not add handlers.
    Under torchrun, ranks other than 0 print errors only and no Python warnings, so that a job's log holds
    each line and each framework warning once (rank 0's).
    """
    root = logging.getLogger("schane")
    if _rank() > 0:
        level = max(level, logging.ERROR)
        warnings.simplefilter("ignore")
    root.setLevel(level)
    if any(getattr(h, "_schane", False) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler._schane = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter())
    root.addHandler(handler)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be replaced after set-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min`` or ``3.5 h``: a duration as a log line states it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["format_duration", "interactive", "progress", "progress_bar", "setup_logging"]
