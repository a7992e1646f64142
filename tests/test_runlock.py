"""The run-directory lock: concurrent runs refused with the holder named, stale locks taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import schane
from schane.cli import main
from schane.engine.runlock import LOCK_NAME, RunLock, RunLockedError, run_lock

SRC = str(Path(schane.__file__).resolve().parents[1])


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited early: {proc.communicate()}")
        assert time.monotonic() - t0 < timeout, "the holder did not start"
        time.sleep(0.05)


HOLD = """
    import sys, time
    from pathlib import Path
    from schane.engine.runlock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    Path(sys.argv[2]).write_text("held")
    time.sleep(600)
"""


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    ready = tmp_path / "ready"
    holder = _python(HOLD, str(tmp_path), str(ready))
    try:
        _wait_for(ready, holder)
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()} since " in msg and "\n" not in msg
        assert "--set name=NEW" in msg
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up: the file stays, the kernel drops the flock
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="schane.engine.runlock"):
        lock = RunLock(tmp_path).acquire()
    assert lock.taken_over["pid"] == holder.pid
    assert f"took over the lock of pid {holder.pid}" in caplog.text and "that process is gone" in caplog.text
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def _plant(folder: Path, **record) -> None:
    base = {"pid": 4_000_000, "host": "other-node", "started": "2026-01-01T00:00:00Z", "proc_start": None,
            "torchelastic_run_id": None, "slurm_job_id": None}
    (folder / LOCK_NAME).write_text(json.dumps({**base, **record}))


def test_a_lock_of_another_host_is_taken_over_only_by_the_same_job(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _plant(tmp_path, torchelastic_run_id="job-7")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8")
    with pytest.raises(RunLockedError, match=f"pid 4000000 on host other-node .*job job-7.*delete {tmp_path}"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")  # an elastic restart of that job, rank 0 on this host now
    with run_lock(tmp_path) as lock:
        assert lock.taken_over["torchelastic_run_id"] == "job-7"
        assert json.loads((tmp_path / LOCK_NAME).read_text())["torchelastic_run_id"] == "job-7"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id names no job
    _plant(tmp_path, torchelastic_run_id="none")
    with pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    # a live process of this host (our parent) whose start time is not the recorded one: the pid was reused
    _plant(tmp_path, pid=os.getppid(), host=socket.gethostname(), proc_start=1)
    if not Path(f"/proc/{os.getppid()}/stat").exists():
        pytest.skip("no /proc: process start times cannot be read here")
    with run_lock(tmp_path) as lock:
        assert lock.taken_over["pid"] == os.getppid()
    _plant(tmp_path, pid=os.getppid(), host=socket.gethostname(), proc_start=None)  # alive, no start time: refused
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}"):
        RunLock(tmp_path).acquire()


TRAIN = """
    import sys, time
    from pathlib import Path
    from schane.config import load_config
    from schane.pipelines.train import train
    root, out, ready, go = sys.argv[1:5]
    cfg = load_config(None, [
        "data.name=image_folder", f"data.root={root}", "data.img_size=32", "data.batch_size=4",
        "data.eval_batch_size=16", "model.backbone=test_convnext", "model.pretrained=false", "optim.epochs=1",
        "optim.warmup_epochs=0", "optim.lr=1e-3", "optim.base_batch_size=null", "optim.layer_decay=null",
        "train.max_steps_per_epoch=2", "train.progress=false", "train.log_every_steps=1", "train.test_at_end=false",
        f"output_dir={out}", "name=shared", "train.seed=0"])

    def wait(step):
        if step["global_step"] == 1:
            Path(ready).write_text("training")
            while not Path(go).exists():
                time.sleep(0.05)

    train(cfg, callback=wait)
"""


def test_two_trainings_into_one_run_directory(image_root, tmp_path, capsys):
    out, ready, go = tmp_path / "runs", tmp_path / "ready", tmp_path / "go"
    first = _python(TRAIN, str(image_root), str(out), str(ready), str(go))
    try:
        _wait_for(ready, first, timeout=300)
        cfg = tmp_path / "second.yaml"
        cfg.write_text("train:\n  seed: 1\n")
        rc = main(["train", "--config", str(cfg), "--set", "data.name=image_folder", f"data.root={image_root}", "data.img_size=32",
                   "model.backbone=test_convnext", "model.pretrained=false", f"output_dir={out}", "name=shared"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("schane train: error: run directory "), err
        assert f"in use by pid {first.pid} on host {socket.gethostname()} since " in err[-1]
        go.write_text("go")
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    run = out / "shared"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("start") == 1  # nothing of the refused run in the log
    assert [r["step"] for r in records if r["kind"] == "train_step"] == [1, 2]
    assert "seed: 0" in (run / "config.yaml").read_text()
    assert (run / "last.pt").exists() and not (run / LOCK_NAME).exists()
