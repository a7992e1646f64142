"""The paper's models at full size: memory per image and time per image of a training step at 224 px, with
and without activation checkpointing (``model.grad_checkpointing``).

BEiT-3 base/16 (random init: the official weights are not needed to measure) and timm ViT-B/16, each built
from ``configs/paper/imagenet.yaml`` and trained through the pipeline's own parts (``build_model``,
``build_optimizer`` with layer decay, the schedule, the SCHaNe + CE criterion, ``train_step`` /
``optimizer_step``: two views per image, AdamW). Inputs are random images and labels.

Each configuration runs in a fresh process: two training steps, with 1 image and with 2 images (two views
each). Memory per image is the difference between the two steps of the memory held when the model's forward
returns, above the memory before the step: the activations kept for backward, which is what grows with the
batch (weights, AdamW state and gradients do not). The peak over forward + backward above the step's base is
reported too; at these tiny batches it falls late in backward, where the gradients (0.35 GB) dominate and most
activations are already freed, so its difference understates the per-image cost at large batches.

* CPU: the process's resident set (``VmRSS``; the peak: ``VmHWM``, reset before each step, Linux);
* CUDA (``--device cuda``): ``torch.cuda.memory_allocated`` / ``max_memory_allocated``.

Time per image is the 2-image step's wall time / 2 (and its CPU time: on a shared machine the wall time
also holds other processes' turns). ``--amp bf16`` runs under bf16 autocast.

Usage:
    PYTHONPATH=src python benchmarks/full_size.py                     # CPU, fp32, 4 configurations, < 5 min
    PYTHONPATH=src python benchmarks/full_size.py --device cuda --amp bf16 --batch 8 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"beit3-base": "beit3_base_patch16_224", "vit-b16": "vit_base_patch16_224"}
# glibc keeps freed blocks above its (adaptive) mmap threshold in the heap, and the resident set would then
# hide a step's allocations behind the previous step's; a fixed threshold maps every large tensor on its own
# and unmaps it when freed, so the peak resident set follows the live tensors.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def _peak_reset(device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _peak_rss import reset_peak_rss

    return reset_peak_rss()


def _peak(device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    from _peak_rss import status_mb

    return status_mb("VmHWM")


def _current(device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    from _peak_rss import status_mb

    return status_mb("VmRSS")


def measure(model: str, checkpointing: bool, *, device: str = "cpu", amp: str = "none",
            batches: tuple[int, int] = (1, 2), num_classes: int = 1000,
            overrides: list[str] | None = None) -> dict[str, Any]:
    """One configuration in this process: warm-up step, then one step per batch size in ``batches``.

    Args:
        model: a key of :data:`MODELS` or a backbone name.
        checkpointing: ``model.grad_checkpointing``.
        device: ``cpu`` or ``cuda``.
        amp: ``none`` (fp32), ``bf16`` or ``fp16`` (autocast).
        batches: the two batch sizes (images; two views each) whose peak difference gives memory per image.
        num_classes: classifier width.
        overrides: further ``key=value`` overrides of the paper config (toy sizes for smoke runs).

    Returns:
        ``{"model", "checkpointing", "amp", "mb_per_image", "s_per_image", "peaks_mb", "fixed_mb", ...}``.
    """
    import torch

    from schane.config import load_config
    from schane.engine.criterion import build_criterion
    from schane.engine.device import resolve_amp
    from schane.engine.loop import TrainParts, optimizer_step, train_step
    from schane.engine.optim import build_optimizer, build_scheduler
    from schane.models import build_model

    backbone = MODELS.get(model, model)
    cfg = load_config(ROOT / "configs" / "paper" / "imagenet.yaml",
                      [f"model.backbone={backbone}", "model.pretrained=false", f"model.grad_checkpointing={checkpointing}",
                       f"train.amp={amp}", f"train.device={device}", *(overrides or [])])
    dev = torch.device(device)
    torch.manual_seed(0)
    before = _peak_reset(dev)
    net = build_model(cfg.model, num_classes).to(dev)
    opt = build_optimizer(net, cfg.optim, cfg.optim.lr)
    sched = build_scheduler(opt, cfg.optim, 100)
    amp_dtype = resolve_amp(amp, dev)
    parts = TrainParts(net, net, opt, sched, torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16),
                       build_criterion(cfg.loss), dev, amp_dtype)
    net.train()
    size = cfg.data.img_size

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    held: list[float] = []
    # memory held when the model's forward returns: the activations kept for backward (+ the inputs)
    net.register_forward_hook(lambda mod, args, out: held.append(_current(dev)))

    def step(b: int) -> dict[str, float]:
        views = [torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)]
        labels = torch.randint(0, num_classes, (b,))
        base = _peak_reset(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(parts, views, labels, torch.arange(b), group_size=1, sync=True)  # forward + backward
        sync()
        fb = _peak(dev)
        _peak_reset(dev)
        optimizer_step(parts)
        sync()
        return {"base_mb": base, "after_forward_mb": held[-1] - base, "fwd_bwd_peak_mb": fb - base,
                "opt_peak_mb": _peak(dev), "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    runs = [step(b) for b in batches]  # the first also allocates AdamW's state (after its fwd+bwd peak)
    b1, b2 = batches
    return {
        "model": model, "backbone": backbone, "checkpointing": checkpointing, "amp": amp, "device": device,
        "img_size": size, "batches": list(batches), "steps": runs,
        "mb_per_image": (runs[1]["after_forward_mb"] - runs[0]["after_forward_mb"]) / (b2 - b1),
        "peak_mb_per_image": (runs[1]["fwd_bwd_peak_mb"] - runs[0]["fwd_bwd_peak_mb"]) / (b2 - b1),
        "s_per_image": runs[1]["wall_s"] / b2, "cpu_s_per_image": runs[1]["cpu_s"] / b2,
        # between steps: weights + AdamW state (gradients are freed by zero_grad(set_to_none)) + the runtime
        "between_steps_mb": runs[1]["base_mb"], "built_mb": runs[0]["base_mb"] - before,
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "threads": torch.get_num_threads(),
    }


def _markdown(rows: list[dict[str, Any]]) -> str:
    b1, b2 = rows[0]["batches"]
    out = [f"| model | checkpointing | precision | params (M) | between steps (MB) | held after forward, {b1} / {b2} "
           f"img (MB) | fwd+bwd peak above base, {b1} / {b2} img (MB) | memory per image (MB) | time per image, "
           "wall / CPU (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s1, s2 = r["steps"]
        out.append(f"| {r['model']} | {'on' if r['checkpointing'] else 'off'} | {r['amp'] if r['amp'] != 'none' else 'fp32'} "
                   f"| {r['params_m']:.1f} | {r['between_steps_mb']:.0f} | {s1['after_forward_mb']:.0f} / "
                   f"{s2['after_forward_mb']:.0f} | {s1['fwd_bwd_peak_mb']:.0f} / {s2['fwd_bwd_peak_mb']:.0f} "
                   f"| {r['mb_per_image']:.0f} | {r['s_per_image']:.2f} / {r['cpu_s_per_image']:.2f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none")
    ap.add_argument("--batch", nargs=2, type=int, default=[1, 2], metavar=("B1", "B2"))
    ap.add_argument("--out", default=None, help="write the rows as JSON")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: model:checkpointing
    args = ap.parse_args()
    if args.one:
        model, ck = args.one.split(":")
        print(json.dumps(measure(model, ck == "1", device=args.device, amp=args.amp, batches=tuple(args.batch))))
        return 0
    rows = []
    for model in args.models:
        for ck in (False, True):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--one", f"{model}:{int(ck)}", "--device", args.device,
                                   "--amp", args.amp, "--batch", *map(str, args.batch)],
                                  capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{model} checkpointing={ck}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(_markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
