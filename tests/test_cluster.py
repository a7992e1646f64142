"""Cluster behaviour under ``torch.distributed.run`` (gloo, CPU, 2 ranks, tiny model): a SIGTERM to the
launcher stops both ranks at one step with a mid-epoch checkpoint, a SIGKILLed worker is restarted by
``--max-restarts=1`` and resumes by itself, two launchers (``--nnodes=2``, c10d rendezvous on loopback) equal
one; each ends with weights bit-identical to the uninterrupted single-node run. Also the job's log: step and
epoch lines once, from rank 0, with ``train.progress: false``."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from schane.config import save_config
from schane.distributed import PREEMPTED_EXIT_CODE
from schane.engine.checkpoint import load_checkpoint
from test_ddp_train import _free_port
from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 ranks x 2 images, 2 epochs of 4 steps, last.pt every 2 steps
COMMON = ["loss.name=schane", "data.batch_size=2", "optim.epochs=2", "train.max_steps_per_epoch=4",
          "train.ckpt_every_steps=2", "optim.base_batch_size=8", "train.seed=5", "train.test_at_end=false"]

# `schane train` (the CLI, its exit code included) with a step callback that the test steers through the
# environment: record rank 0's step in a file, slow every step down, or SIGKILL rank 1 at one step.
WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    import schane.pipelines.train as pt
    from schane.cli import main

    torch.set_num_threads(1)
    rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    step_file, sleep = os.environ.get("T_STEP_FILE"), float(os.environ.get("T_SLEEP", "0"))
    kill_at = int(os.environ.get("T_KILL_AT", "0"))

    def cb(info):
        if rank == 0 and step_file:
            with open(step_file + ".tmp", "w") as f:
                f.write(str(info["global_step"]))
            os.replace(step_file + ".tmp", step_file)
        if rank == 1 and restart == 0 and info["global_step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(sleep)

    train = pt.train
    pt.train = lambda cfg, resume=None: train(cfg, resume, callback=cb)
    sys.exit(main(sys.argv[1:]))
    """
)


def _launcher(tmp_path, cfg_file, *torchrun_args, resume=False, env=None, nproc=2):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *torchrun_args, str(script),
           "train", "--config", str(cfg_file), *(["--resume", "auto"] if resume else [])]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def _single_node(tmp_path, cfg_file, *extra, **kw):
    return _launcher(tmp_path, cfg_file, "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                     *extra, **kw)


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _cfg(image_root, tmp_path, name):
    cfg = tiny_cfg(image_root, tmp_path, name, *COMMON)
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return cfg, path


def _assert_same_weights(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


@pytest.fixture(scope="module")
def reference(image_root, tmp_path_factory):
    """The uninterrupted single-node 2-rank run, and its launcher's log."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg, path = _cfg(image_root, tmp, "ref")
    code, log = _finish(_single_node(tmp, path))
    assert code == 0, log[-3000:]
    return cfg.run_dir / "last.pt", log


def test_job_log_has_step_and_epoch_lines_once_from_rank_0(reference):
    _, log = reference
    # train.progress=false (tiny_cfg): no bars, but the lines stay; rank 1 prints nothing of its own
    for line in ("epoch 1/2: 1/4", "epoch 1/2: 3/4", "epoch 2/2: 2/4", "epoch 1/2 | train loss",
                 "epoch 2/2 | train loss", "world size 2", "run directory:"):
        assert log.count(line) == 1, (line, log[-3000:])
    assert "Grad strides do not match" not in log


def test_sigterm_to_the_launcher_stops_every_rank_with_a_mid_epoch_checkpoint(image_root, tmp_path, reference):
    cfg, path = _cfg(image_root, tmp_path, "term")
    step_file = tmp_path / "step"
    proc = _single_node(tmp_path, path, env={"T_STEP_FILE": str(step_file), "T_SLEEP": "0.5"})
    deadline = time.monotonic() + 180
    while not (step_file.exists() and int(step_file.read_text()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    at = int(step_file.read_text())
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    code, log = _finish(proc, timeout=90)
    assert time.monotonic() - t0 < 90
    assert "stopped at epoch 1" in log and log.count("continue it with --resume auto") == 1, log[-3000:]
    assert f"exit {PREEMPTED_EXIT_CODE}" in log
    mid = load_checkpoint(cfg.run_dir / "last.pt")
    assert mid["epoch"] == 0 and 0 < mid["batch_in_epoch"] < 4 and abs(mid["global_step"] - at) <= 1, (at, mid["global_step"])

    code, log = _finish(_single_node(tmp_path, path, resume=True))
    assert code == 0 and f"batch {mid['batch_in_epoch']}" in log, log[-3000:]
    _assert_same_weights(reference[0], cfg.run_dir / "last.pt")


def test_elastic_restart_after_sigkill_resumes_by_itself(image_root, tmp_path, reference):
    cfg, path = _cfg(image_root, tmp_path, "elastic")
    # rank 1 dies at step 3 (epoch 1, after the mid-epoch last.pt of step 2); no --resume on the command
    code, log = _finish(_single_node(tmp_path, path, "--max-restarts=1", env={"T_KILL_AT": "3"}))
    assert code == 0, log[-4000:]
    assert "torchrun restart 1: resuming" in log and "resumed from" in log, log[-3000:]
    _assert_same_weights(reference[0], cfg.run_dir / "last.pt")


def test_two_node_loopback_run_equals_the_single_node_run(image_root, tmp_path, reference):
    cfg, path = _cfg(image_root, tmp_path, "twonode")
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [_launcher(tmp_path, path, "--nnodes=2", f"--node_rank={r}", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint={endpoint}", "--rdzv_id=twonode", nproc=1)
             for r in (0, 1)]
    for n in nodes:
        code, log = _finish(n)
        assert code == 0, log[-3000:]
    _assert_same_weights(reference[0], cfg.run_dir / "last.pt")


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    from schane.distributed import DistInfo, StopSignals

    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(["SIGTERM", "sigusr1"]).install()
    try:
        assert not stop.agreed(DistInfo())
        os.kill(os.getpid(), signal.SIGUSR1)  # the process lives on: only the flag is set
        time.sleep(0.01)
        assert stop.agreed(DistInfo()) and stop.received == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
    with pytest.raises(ValueError, match="SIGNOPE"):
        StopSignals(["SIGNOPE"])


class _SignalsItself(torch.utils.data.Dataset):
    """Each item sends SIGTERM to the process that loads it (a DataLoader worker)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGTERM)
        return torch.tensor(i)


def test_dataloader_workers_ignore_the_stop_signals():
    from schane.engine.batches import worker_init_fn

    loader = torch.utils.data.DataLoader(_SignalsItself(), batch_size=2, num_workers=1, worker_init_fn=worker_init_fn)
    assert torch.cat(list(loader)).tolist() == list(range(6))
    plain = torch.utils.data.DataLoader(_SignalsItself(), batch_size=2, num_workers=1)
    with pytest.raises(RuntimeError, match="DataLoader worker"):  # the default action ends the worker
        list(plain)


def test_a_restarted_process_resumes_its_own_run_and_refuses_another_config(image_root, tmp_path, monkeypatch):
    import json

    from schane.pipelines.train import train

    cfg = tiny_cfg(image_root, tmp_path, "own")
    first = train(cfg)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # as torchrun sets it in restarted workers
    again = train(cfg)  # no resume argument: the finished run is found and reused, not refused
    assert again.metrics == json.loads(json.dumps(first.metrics))
    with pytest.raises(ValueError, match="another config"):
        train(tiny_cfg(image_root, tmp_path, "own", "optim.lr=0.01"))


def test_cli_exits_143_after_a_stop_signal_and_resumes_bit_identically(image_root, tmp_path, monkeypatch, capsys):
    import schane.pipelines.train as pt
    from schane.cli import main

    cfg, path = _cfg(image_root, tmp_path, "usr1")
    plain = pt.train

    def cb(info):
        if info["global_step"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # during step 1: its boundary check sees it

    monkeypatch.setattr(pt, "train", lambda c, resume=None: plain(c, resume, callback=cb))
    before = signal.getsignal(signal.SIGUSR1)
    assert main(["train", "--config", str(path)]) == PREEMPTED_EXIT_CODE == 143
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored
    assert "stopped by SIGUSR1 at step 1" in capsys.readouterr().err
    mid = load_checkpoint(cfg.run_dir / "last.pt")
    assert (mid["epoch"], mid["batch_in_epoch"], mid["global_step"]) == (0, 1, 1)
    monkeypatch.setattr(pt, "train", plain)
    assert main(["train", "--config", str(path), "--resume", "auto"]) == 0
    ref = plain(tiny_cfg(image_root, tmp_path, "usr1-ref", *COMMON))
    _assert_same_weights(ref.last_checkpoint, cfg.run_dir / "last.pt")


class _Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def test_loader_batches_stops_workers_that_ignore_sigterm_on_every_way_out():
    from schane.engine.batches import loader_batches, worker_init_fn

    def loader():
        return torch.utils.data.DataLoader(_Slow(), batch_size=2, num_workers=1, worker_init_fn=worker_init_fn)

    assert [int(b[0]) for b in loader_batches(loader(), limit=3)] == [0, 2, 4]
    assert multiprocessing.active_children() == []
    batches = loader_batches(loader())
    next(batches)
    assert multiprocessing.active_children() != []  # a worker is running
    batches.close()  # as train_one_epoch closes it when an epoch ends in an error
    assert multiprocessing.active_children() == []
