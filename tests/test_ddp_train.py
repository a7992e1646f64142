"""Two-process DDP training (gloo, CPU) through ``torch.distributed.run -m schane train`` equals the
single-process run on the same global batches (LayerNorm model, contrastive term gathered across ranks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from schane.config import save_config
from schane.engine.checkpoint import load_checkpoint
from schane.engine.run_log import read_metrics
from schane.pipelines.train import train
from test_train import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss", ["schane"])
def test_two_process_gloo_run_matches_single_process(image_root, tmp_path, loss):
    common = [f"loss.name={loss}", "loss.gather_distributed=true", "train.max_steps_per_epoch=2",
              "optim.base_batch_size=8", "train.seed=3"]
    # 2 ranks x 2 images = the single process's 4 images per step: same global batches, same peak lr
    ddp_cfg = tiny_cfg(image_root, tmp_path, "ddp", *common, "data.batch_size=2")
    cfg_file = tmp_path / "ddp.yaml"
    save_config(ddp_cfg, cfg_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "schane", "train", "--config", str(cfg_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single = train(tiny_cfg(image_root, tmp_path, "single", *common, "data.batch_size=4"))

    d = ddp_cfg.run_dir
    recs = read_metrics(d / "metrics.jsonl")
    start = [r for r in recs if r["kind"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["effective_batch"] == 4  # rank 0 only
    assert len([r for r in recs if r["kind"] == "train_step"]) == 2
    a, b = load_checkpoint(d / "last.pt"), load_checkpoint(single.last_checkpoint)
    assert a["global_step"] == b["global_step"] == 2 and len(a["rng"]) == 2
    # Same global batches, same gradients up to float rounding. Adam divides each gradient by its own running
    # magnitude, so for a weight whose gradient is ~0 a rounding difference can move it by a fraction of the
    # learning rate; a wrong gather or scaling moves whole layers by many steps. Tolerance: 10% of one step.
    atol = 0.1 * start[0]["peak_lr"]
    worst = max((v - b["model"][k]).abs().max().item() for k, v in a["model"].items())
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=atol, rtol=1e-4), (k, worst)
