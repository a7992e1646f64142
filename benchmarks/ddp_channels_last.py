"""DDP step time with channels-last weights: every 4-D weight channels-last (``model.to(channels_last)``)
against :func:`schane.engine.device.to_channels_last` (1x1 weights keep standard strides, so DDP's gradient
buckets match their gradients), in one 2-rank torchrun run (gloo, CPU).

Both variants run in the same processes, alternating rounds, with the pipeline's small-map convolutions on
(as ``schane train`` on a CPU). Each reports the weights whose gradient strides differ from the bucket's
(what triggers "Grad strides do not match bucket view strides") and the median step time.

Usage:
    PYTHONPATH=src python benchmarks/ddp_channels_last.py [--backbone effnet-lite0-offline] [--img 64]
        [--batch 16] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from schane.config import ModelConfig
    from schane.engine.device import to_channels_last
    from schane.models import build_model
    from schane.models.small_maps import small_map_convolutions

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    variants = {}
    for name in ("all channels-last", "1x1 standard strides"):
        torch.manual_seed(0)
        m = build_model(ModelConfig(backbone=args.backbone, pretrained=False), 10)
        m = m.to(memory_format=torch.channels_last) if name == "all channels-last" else to_channels_last(m)
        variants[name] = (m, DistributedDataParallel(m), torch.optim.SGD(m.parameters(), lr=0.01))
    x = torch.randn(args.batch, 3, args.img, args.img).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    times: dict[str, list[float]] = {k: [] for k in variants}
    mismatched: dict[str, int] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (m, ddp, opt) in variants.items():
            with small_map_convolutions(m):
                for _ in range(args.steps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    out = ddp(x)  # the heads of schane's joint loss: both take part
                    loss = torch.nn.functional.cross_entropy(out.logits, y) + out.projections.square().mean()
                    loss.backward()
                    mismatched[name] = sum(p.grad.stride() != p.stride() for p in m.parameters() if p.grad is not None)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if r:
                        times[name].append(time.perf_counter() - t0)
    if rank == 0:
        print(f"| variant | weights whose grad strides differ from the bucket | DDP step, median of {len(times[name])} (ms) |")
        print("|---|---|---|")
        for name in variants:
            print(f"| {name} | {mismatched[name]} | {1000 * statistics.median(times[name]):.1f} |")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="effnet-lite0-offline")
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="images per rank (one view)")
    p.add_argument("--steps", type=int, default=8, help="steps per round and variant")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if "RANK" in os.environ:
        _worker(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", __file__, *sys.argv[1:]]
    raise SystemExit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))


if __name__ == "__main__":
    main()
