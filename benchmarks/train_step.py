"""Time of one training step with the SCHaNe objective vs CE alone on the same two-view batch.

Both objectives run the model on the same 2B views (B images x 2 augmentations), exactly as
``schane.engine.loop.train_step`` does: forward, joint loss, backward, AdamW step. The only difference
is the contrastive term (SCHaNe on the L2-normalised projections, weighted by lambda = 0.9)
and the gradient it sends back through the projection head. The two objectives are
interleaved (CE, SCHaNe, CE, SCHaNe, ...) so that load from other processes hits both alike;
the table reports the median over repeats.

With ``--channels-last`` it instead times the same CE training step with the model and inputs in the
default (NCHW) and the channels-last (NHWC) memory format, each with the convolution kernels and with the
small-map convolutions as matrix products, interleaved, and prints the speed-ups: what
``train.channels_last: auto`` and training on a CPU buy for convolutional backbones.

Usage:
    python benchmarks/train_step.py                       # effnet-lite0-offline, 128 px, batch 64, CPU
    python benchmarks/train_step.py --repeats 9 --threads 2
    python benchmarks/train_step.py --vit                 # also vit_small_patch16_224 on CUDA (if available)
    python benchmarks/train_step.py --channels-last --img-size 32   # the demo's step, NCHW vs channels-last
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from schane.config import ModelConfig, OptimConfig
from schane.losses import JointLoss, build_contrastive_loss
from schane.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    try:
        from schane.engine.optim import build_optimizer

        return build_optimizer(model, OptimConfig(), lr)
    except ImportError:
        return torch.optim.AdamW(model.parameters(), lr=lr)


def bench(
    backbone: str,
    img_size: int,
    batch: int,
    repeats: int,
    device: torch.device,
    amp: torch.dtype | None,
    pretrained: bool,
    num_classes: int = 100,
) -> dict[str, list[float]]:
    """Seconds per step for each objective (lists of ``repeats`` interleaved measurements)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, pretrained=pretrained), num_classes).to(device)
    model.train()
    opt = _make_optimizer(model, 1e-4)
    x = torch.randn(2 * batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device).repeat(2)
    objectives = {
        "ce": JointLoss(None),
        "schane": JointLoss(build_contrastive_loss("schane", temperature=0.5, beta=1.0), lam=0.9),
    }

    def step(joint: JointLoss) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        proj = out.projections.float() if joint.contrastive is not None else None
        res = joint(out.logits.float(), y, proj)
        res.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    for joint in objectives.values():  # warm-up (allocator, autotuning)
        step(joint)
    times: dict[str, list[float]] = {k: [] for k in objectives}
    for r in range(repeats):
        order = list(objectives) if r % 2 == 0 else list(reversed(objectives))
        for name in order:
            times[name].append(step(objectives[name]))
    return times


FORMATS = ("nchw", "channels_last", "nchw + small maps", "channels_last + small maps")


def bench_memory_format(backbone: str, img_size: int, batch: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per CE training step (forward, loss, backward, AdamW) with NCHW and with channels-last tensors,
    each with the convolution kernels and with small-map convolutions as matrix products (what training on a
    CPU uses: :mod:`schane.models.small_maps`)."""
    from schane.models.small_maps import patch_convolutions

    steps = {}
    for fmt in FORMATS:
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=backbone, pretrained=True), 128)
        x = torch.randn(2 * batch, 3, img_size, img_size)
        if fmt.startswith("channels_last"):
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if fmt.endswith("small maps"):
            patch_convolutions(model)
        model.train()
        opt = _make_optimizer(model, 1e-4)
        y = torch.randint(0, 128, (2 * batch,))
        joint = JointLoss(None)

        def step(model=model, x=x, y=y, opt=opt, joint=joint) -> float:
            t0 = time.perf_counter()
            joint(model(x).logits.float(), y).total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        step()  # warm-up
        steps[fmt] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            times[name].append(steps[name]())
    return times


def bench_extra_work(backbone: str, batch: int, repeats: int = 30, num_classes: int = 100) -> float:
    """Median seconds of the work only the SCHaNe objective adds: the SCHaNe loss forward+backward
    on the 2B projections and the backward through the projection head (its forward runs in both)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, pretrained=False), num_classes)
    feats = torch.randn(2 * batch, model.num_features, requires_grad=True)
    y = torch.randint(0, num_classes, (batch,)).repeat(2)
    loss = build_contrastive_loss("schane", temperature=0.5, beta=1.0)
    times = []
    for _ in range(repeats + 3):
        proj = model.projector(feats)
        t0 = time.perf_counter()
        (0.9 * loss(proj.float(), y)).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def _row(label: str, times: dict[str, list[float]]) -> str:
    ce, sc = statistics.median(times["ce"]), statistics.median(times["schane"])
    return f"| {label} | {1000 * ce:.0f} ms | {1000 * sc:.0f} ms | {100 * (sc / ce - 1):+.1f}% |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64, help="images per step (the model sees 2x views)")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--vit", action="store_true", help="also time vit_small_patch16_224 at 224 px on CUDA")
    ap.add_argument(
        "--extra-only", action="store_true", help="only time the work SCHaNe adds (fast, low noise)"
    )
    ap.add_argument("--channels-last", action="store_true",
                    help="time a CE step in NCHW vs channels-last memory format instead")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.channels_last:
        _print_memory_format(args)
        return

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, cuda={'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"
    )
    print(f"interleaved repeats: {args.repeats}, median reported\n")
    print("| model (device, batch, views) | CE step | SCHaNe step | SCHaNe overhead |")
    print("|---|---|---|---|")
    cpu = torch.device("cpu")
    extra = bench_extra_work("effnet-lite0-offline", args.batch)
    print(
        f"| effnet-lite0-offline: SCHaNe-only work (loss fwd+bwd + projector bwd, {2 * args.batch} x 128) "
        f"| | +{1000 * extra:.1f} ms | |",
        flush=True,
    )
    if args.extra_only:
        return
    t = bench("effnet-lite0-offline", args.img_size, args.batch, args.repeats, cpu, None, pretrained=True)
    print(
        _row(f"effnet-lite0-offline {args.img_size}px (CPU fp32, B={args.batch}, {2 * args.batch} views)", t),
        flush=True,
    )
    print(
        f"  raw CE ms: {[round(1000 * v) for v in t['ce']]}\n  raw SCHaNe ms: {[round(1000 * v) for v in t['schane']]}"
    )
    if args.vit:
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            t = bench(
                "vit_small_patch16_224", 224, args.batch, args.repeats, dev, torch.bfloat16, pretrained=False
            )
            print(_row(f"vit_small_patch16_224 224px (CUDA bf16, B={args.batch}, {2 * args.batch} views)", t))
        else:
            print("| vit_small_patch16_224 224px (CUDA) | not measured: no GPU | | |")


def _print_memory_format(args: argparse.Namespace) -> None:
    import os

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print(f"interleaved repeats: {args.repeats}, median reported\n")
    print(f"effnet-lite0-offline at {args.img_size} px, CPU fp32, batch {args.batch} ({2 * args.batch} views)\n")
    print("| memory format | convolutions | step (median) | speed-up over NCHW + kernels | raw (ms) |")
    print("|---|---|---|---|---|")
    t = bench_memory_format("effnet-lite0-offline", args.img_size, args.batch, args.repeats)
    ref = statistics.median(t["nchw"])
    for fmt in FORMATS:
        m = statistics.median(t[fmt])
        layout, _, small = fmt.partition(" + ")
        print(f"| {layout} | {'small maps as matrix products' if small else 'kernels'} | {1000 * m:.0f} ms "
              f"| {ref / m:.2f}x | {[round(1000 * v) for v in t[fmt]]} |")

if __name__ == "__main__":
    main()
