"""A lock on a run directory, so that two trainings never write into one run at the same time.

``run_dir/run.lock`` is held by the process that trains (rank 0 of a ``torchrun`` job, for the whole job) with an
exclusive ``flock``, which the kernel releases when the process ends however it ends, and it records who holds
it (JSON: ``pid``, ``host``, ``started`` (UTC), ``proc_start`` (the process's start time in clock ticks, so a
reused pid is not mistaken for the holder), ``torchelastic_run_id`` and ``slurm_job_id`` when set).

A second process is refused with one line naming the holder. A lock file left behind by a process that is gone
(killed with SIGKILL, a crashed node) is taken over, and a warning says whose it was:

* holder on this host: taken over when its pid is dead (or now belongs to another process);
* holder on another host: taken over only by the same job (the same ``TORCHELASTIC_RUN_ID``, e.g. an elastic
  restart whose rank 0 moved, or the same ``SLURM_JOB_ID``, e.g. a requeued job), since its pid cannot be
  checked from here; otherwise refused with the command to delete the file once that process is gone.

On file systems without ``flock`` support the recorded pid alone decides (a warning says so).

Examples:
    >>> with run_lock(Path("runs/demo/ce-seed0")):  # doctest: +SKIP
    ...     train_here()
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: the recorded pid alone decides
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLockedError(ValueError):
    """The run directory is in use by another process."""


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name may hold spaces
    except (IndexError, ValueError):
        return None


def _alive(pid: int, proc_start: int | None) -> bool:
    """Whether ``pid`` runs on this host and is the same process (same start time, when recorded)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start


def _job() -> dict[str, str | None]:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return {"torchelastic_run_id": run_id if run_id not in (None, "", "none") else None,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None}


def _same_job(holder: dict[str, Any]) -> bool:
    mine = _job()
    return any(mine[k] is not None and holder.get(k) == mine[k] for k in mine)


def describe(holder: dict[str, Any]) -> str:
    """``pid P on host H since T`` (and the job) for a lock record."""
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
    job = holder.get("torchelastic_run_id") or holder.get("slurm_job_id")
    return text + (f" (job {job})" if job else "")


class RunLock:
    """The lock of one run directory (see the module docstring).

    Args:
        run_dir: the run directory (must exist).

    Raises:
        RunLockedError: (from :meth:`acquire`) when another live process holds the lock.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.taken_over: dict[str, Any] | None = None

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _refuse(self, holder: dict[str, Any], extra: str = "") -> RunLockedError:
        who = describe(holder) if holder else "another process"
        return RunLockedError(
            f"run directory {self.path.parent} is in use by {who}: wait for it to finish, or pick another name "
            f"(--set name=NEW) or output_dir{extra}")

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunLockedError` naming its holder."""
        for _ in range(10):  # retried when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = self._flock(fd)
            if locked is False:
                holder = self._read()
                os.close(fd)
                raise self._refuse(holder)
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed the file after we opened it: open the new one
                os.close(fd)
                continue
            try:
                self._check_stale(self._read())
            except RunLockedError:
                os.close(fd)
                raise
            self._fd = fd
            self._write(fd)
            return self
        raise self._refuse(self._read())

    def _flock(self, fd: int) -> bool | None:
        """True: locked; False: held by another process; None: this file system has no flock."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            logger.warning("%s: this file system does not support file locks (%s); the recorded pid alone "
                           "guards the run directory", self.path, e.strerror or e)
            return None

    def _check_stale(self, holder: dict[str, Any]) -> None:
        """Decide on a lock record left in the file: nothing, ours to take over, or a live holder's."""
        if not holder:
            return
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname():
            if isinstance(pid, int) and pid != os.getpid() and _alive(pid, holder.get("proc_start")):
                raise self._refuse(holder)
            why = "that process is gone"
        elif _same_job(holder):
            why = "the same job restarted here"
        else:
            raise self._refuse(holder, f"; if that process is gone (a crashed node), delete {self.path}")
        self.taken_over = holder
        logger.warning("%s: took over the lock of %s (%s)", self.path, describe(holder), why)

    def _write(self, fd: int) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "proc_start": _proc_start(os.getpid()), **_job()}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing when not held)."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, *, enabled: bool = True) -> Iterator[RunLock | None]:
    """Hold the lock of ``run_dir`` for the ``with`` block (``enabled=False``: ranks other than 0, no lock).

    Raises:
        RunLockedError: when another live process holds it (the message names pid, host and start time).
    """
    if not enabled:
        yield None
        return
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()


__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "describe", "run_lock"]
