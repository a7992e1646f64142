"""End-to-end training on a tiny image folder: every loss choice, run-directory contents, exact resume
after SIGKILL, refusal of corrupt checkpoints, evaluation helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from schane.config import load_config
from schane.engine.checkpoint import CheckpointError, load_checkpoint, load_checkpoint_model
from schane.engine.evaluate import evaluate, extract_features
from schane.engine.run_log import read_metrics
from schane.pipelines.evaluate import evaluate_checkpoint, format_evaluation
from schane.pipelines.train import peak_lr, train

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 3  # the image_root fixture (conftest.py)


def tiny_cfg(root, out, name, *extra):
    return load_config(
        None,
        [
            "data.name=image_folder", f"data.root={root}", "data.img_size=32", "data.batch_size=4",
            "data.eval_batch_size=16", "model.backbone=test_convnext", "model.pretrained=false",
            "optim.epochs=1", "optim.warmup_epochs=0.5", "optim.lr=1e-3", "optim.base_batch_size=null",
            "optim.layer_decay=null", "train.max_steps_per_epoch=2", "train.progress=false",
            "train.log_every_steps=1", f"output_dir={out}", f"name={name}", *extra,
        ],
    )


def _weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("loss", ["ce", "schane", "supcon", "simclr", "hcl"])
def test_each_loss_trains_end_to_end(image_root, tmp_path, loss):
    cfg = tiny_cfg(image_root, tmp_path, loss, f"loss.name={loss}", "optim.epochs=2")
    res = train(cfg)
    d = res.run_dir
    for f in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "final.json"):
        assert (d / f).is_file(), f
    final = json.loads((d / "final.json").read_text())
    assert final == json.loads(json.dumps(res.metrics))
    assert final["global_step"] == 4 and final["test"]["n"] > 0  # image_folder has a test split
    assert 0.0 <= final["test"]["top1"] <= final["test"]["top5"] <= 1.0
    recs = read_metrics(d / "metrics.jsonl")
    steps = [r for r in recs if r["kind"] == "train_step"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert len(steps) == 4 and len(epochs) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert all("val_top1" in r and r["images_per_s"] > 0 for r in epochs)
    if loss == "ce":
        assert all(r["contrastive"] is None for r in steps)
    else:
        assert all(r["contrastive"] is not None and r["contrastive"] > 0 for r in steps)
    # best.pt holds the epoch with the highest validation top-1 (ties: the earliest)
    vals = [r["val_top1"] for r in epochs]
    assert final["best_epoch"] == int(np.argmax(vals)) and final["best_val_top1"] == max(vals)

    # CE alone never updates the projection head; the contrastive objectives do.
    torch.manual_seed(cfg.train.seed)
    from schane.models import build_model

    init = build_model(cfg.model, N_CLASSES).state_dict()
    w = _weights(res.last_checkpoint)
    proj_moved = any(not torch.equal(w[k], init[k]) for k in init if k.startswith("projector"))
    cls_moved = any(not torch.equal(w[k], init[k]) for k in init if k.startswith("classifier"))
    assert cls_moved and proj_moved == (loss != "ce")


def test_peak_lr_is_linearly_scaled(image_root, tmp_path):
    cfg = tiny_cfg(image_root, tmp_path, "lr", "optim.base_batch_size=16", "optim.accum_steps=2", "optim.lr=0.01")
    assert peak_lr(cfg, world_size=3) == pytest.approx(0.01 * (4 * 2 * 3) / 16)
    res = train(cfg)
    start = read_metrics(res.run_dir / "metrics.jsonl")[0]
    assert start["kind"] == "start" and start["peak_lr"] == pytest.approx(0.01 * 8 / 16)
    assert start["effective_batch"] == 8 and start["steps_per_epoch"] == 2


def test_bf16_amp_ema_and_queue_options_run(image_root, tmp_path):
    pytest.importorskip("schane.memory")
    res = train(
        tiny_cfg(image_root, tmp_path, "opts", "train.amp=bf16", "train.ema_decay=0.5", "loss.queue_size=16",
                 "optim.clip_grad=1.0", "train.channels_last=true", "loss.chunk_size=3")
    )
    st = load_checkpoint(res.last_checkpoint)
    assert st["ema"] is not None and st["eval_weights"] == "ema" and st["queue"] is not None
    model, cfg, n = load_checkpoint_model(res.best_checkpoint)
    ema_w = st["ema"]["module"]
    assert n == N_CLASSES and all(torch.equal(v, ema_w[k]) for k, v in model.state_dict().items())


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from schane.config import load_config
    from schane.pipelines.train import train
    torch.set_num_threads(int(sys.argv[1]))
    cfg = load_config(None, sys.argv[3:])
    kill_at = int(sys.argv[2])

    def cb(info):
        if info["global_step"] == kill_at and info["checkpoint"] is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, resume="auto", callback=cb)
    raise SystemExit("not killed")
    """
)


def test_resume_after_sigkill_is_bit_identical(image_root, tmp_path):
    extra = ["optim.epochs=2", "train.max_steps_per_epoch=3", "train.ckpt_every_steps=2",
             "train.ema_decay=0.9", "model.drop_path=0.2", "loss.name=schane"]
    ref = train(tiny_cfg(image_root, tmp_path, "ref", *extra))

    cfg = tiny_cfg(image_root, tmp_path, "killed", *extra)
    args = [f"{k}" for k in _as_overrides(cfg)]
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    # global step 4 = epoch 1 after its first batch: a mid-epoch checkpoint, then SIGKILL
    proc = subprocess.run(
        [sys.executable, str(script), str(torch.get_num_threads()), "4", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    mid = load_checkpoint(cfg.run_dir / "last.pt")
    assert (mid["epoch"], mid["batch_in_epoch"], mid["global_step"]) == (1, 1, 4)

    with pytest.raises(ValueError, match="--resume auto"):
        train(cfg)  # a fresh start would overwrite the killed run
    res = train(cfg, resume="auto")
    a, b = load_checkpoint(ref.last_checkpoint), load_checkpoint(res.last_checkpoint)
    assert a["global_step"] == b["global_step"] == 6
    for part in ("model",):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), k
    for k, v in a["ema"]["module"].items():
        assert torch.equal(v, b["ema"]["module"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["best_metric"] == b["best_metric"]


def _as_overrides(cfg):
    from schane.config import to_dict

    out = []

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("options", "backbone_kwargs", "sweeps"):
                walk(v, f"{prefix}{k}.")
            elif not isinstance(v, (list, dict)):
                out.append(f"{prefix}{k}={'null' if v is None else v}")
    walk(to_dict(cfg), "")
    return out


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_an_error_never_a_fresh_start(image_root, tmp_path, damage):
    cfg = tiny_cfg(image_root, tmp_path, "corrupt")
    cfg.run_dir.mkdir(parents=True)
    last = cfg.run_dir / "last.pt"
    torch.save({"format": "schane-checkpoint", "model": {"w": torch.randn(500)}, "config": {}, "num_classes": 3}, last)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(cfg, resume="auto")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(cfg, resume=str(last))
    assert not (cfg.run_dir / "metrics.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(cfg, resume=str(tmp_path / "missing.pt"))


class _Fixed(torch.nn.Module):
    """Returns stored logits for the indices it is fed (input = index as a 1x1x1 image)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x):
        return self.logits[x.flatten(1)[:, 0].long()]

    def forward_features(self, x):
        return self.logits[x.flatten(1)[:, 0].long()] * 2


def test_evaluate_against_naive_topk():
    g = torch.Generator().manual_seed(0)
    n, c = 37, 7
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), labels)
    m = _Fixed(logits.float())
    got = evaluate(m, ds, batch_size=5)
    top1 = top5 = 0
    nll = 0.0
    for i in range(n):
        order = sorted(range(c), key=lambda j: -float(logits[i, j]))
        top1 += order[0] == int(labels[i])
        top5 += int(labels[i]) in order[:5]
        row = [float(v) for v in logits[i]]
        mx = max(row)
        nll += -(row[int(labels[i])] - mx - np.log(sum(np.exp(v - mx) for v in row)))
    assert got["n"] == n and got["top1"] == top1 / n and got["top5"] == top5 / n
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    feats, labs = extract_features(m, ds, batch_size=4, progress=False)
    assert torch.allclose(feats, 2 * logits.float()) and torch.equal(labs, labels)
    bad = torch.utils.data.TensorDataset(torch.zeros(2, 1, 1, 1), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="classifier"):
        evaluate(m, bad)
    with pytest.raises(ValueError, match="empty"):
        evaluate(m, torch.utils.data.TensorDataset(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long)))


def test_evaluate_checkpoint_reproduces_validation(image_root, tmp_path):
    res = train(tiny_cfg(image_root, tmp_path, "ev"))
    val = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    got = evaluate_checkpoint(res.best_checkpoint, split="val", progress=False)
    assert got["top1"] == val["val_top1"] and got["loss"] == pytest.approx(val["val_loss"], rel=1e-5)
    assert "top-1" in format_evaluation(got) and got["dataset"] == "image_folder"
    test = evaluate_checkpoint(res.best_checkpoint, split="test", progress=False)
    assert test["top1"] == res.metrics["test"]["top1"]
    with pytest.raises(ValueError, match="no split"):
        evaluate_checkpoint(res.best_checkpoint, split="val_classes")
    with pytest.raises(ValueError, match="model"):
        evaluate_checkpoint(res.best_checkpoint, overrides=["model.backbone=resnet18"])


def test_gradient_accumulation_equals_the_large_batch(image_root, tmp_path):
    # CE is a mean over the batch, so 2 micro-batches of 2 images (accumulated) = 1 batch of 4 images:
    # the micro-batches of a group are exactly the large batch's images (same seeded permutation).
    common = ["loss.name=ce", "optim.base_batch_size=4", "train.max_steps_per_epoch=2"]
    big = train(tiny_cfg(image_root, tmp_path, "big", *common, "data.batch_size=4"))
    acc = train(tiny_cfg(image_root, tmp_path, "acc", *common, "data.batch_size=2", "optim.accum_steps=2"))
    a, b = _weights(big.last_checkpoint), _weights(acc.last_checkpoint)
    assert load_checkpoint(acc.last_checkpoint)["global_step"] == 2
    for k, v in a.items():
        assert torch.allclose(v, b[k], atol=2e-5, rtol=1e-4), k
