"""Large contrast sets: 1,024 anchors against 8k-65k embeddings, chunked vs unchunked (a benchmark).

The contrast set is the 1,024 anchors plus ``M - 1,024`` reference embeddings (as from a memory queue), D=128,
100 classes, ``SCHaNeLoss(temperature=0.5, beta=1)``. Each (M, mode) runs in a fresh subprocess: time is the
median of ``--repeats`` forward+backward passes, peak memory is the growth of the process's peak resident set
size over its resident size after the inputs exist and a small warm-up call (the kernel's peak mark ``VmHWM`` is
reset through ``/proc/self/clear_refs`` at that point; Linux only).

Usage:
    python benchmarks/large_contrast.py
    python benchmarks/large_contrast.py --sizes 8192 32768 --chunk-size 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from _peak_rss import reset_peak_rss, status_mb
from schane.losses import SCHaNeLoss

ANCHORS, D, CLASSES = 1024, 128, 100


def child(m: int, chunk: int | None, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ANCHORS, D, generator=g)
    y = torch.randint(0, CLASSES, (ANCHORS,), generator=g)
    ref = torch.randn(m - ANCHORS, D, generator=g)
    ref_y = torch.randint(0, CLASSES, (m - ANCHORS,), generator=g)
    loss_fn = SCHaNeLoss(chunk_size=chunk)
    small = x[:64].clone().requires_grad_()
    loss_fn(small, y[:64], ref[:64], ref_y[:64]).backward()  # warm-up
    base = reset_peak_rss()
    times = []
    for _ in range(repeats):
        xa = x.clone().requires_grad_()
        t0 = time.perf_counter()
        loss_fn(xa, y, ref, ref_y).backward()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"time": statistics.median(times), "peak_mb": status_mb("VmHWM") - base}))


def run(m: int, chunk: int | None, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(m), str(chunk or 0), str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, chunk, rep = (int(v) for v in args.child)
        child(m, chunk or None, rep)
        return
    rows = []
    for m in args.sizes:
        for chunk in (None, args.chunk_size):
            r = run(m, chunk, args.repeats)
            rows.append((m, chunk, r))
            print(f"M={m} chunk={chunk}: {r}", file=sys.stderr, flush=True)
    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    print(f"Command: `{cmd}`  ")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {ANCHORS} anchors, D={D}, {CLASSES} classes\n"
    )
    print(
        "| contrast set M | mode | fwd+bwd time (s) | peak memory (MB) | one [1024, M] float32 matrix (MB) |"
    )
    print("|---|---|---|---|---|")
    for m, chunk, r in rows:
        mode = "unchunked" if chunk is None else f"chunk_size={chunk}"
        full = ANCHORS * m * 4 / 2**20
        print(f"| {m} | {mode} | {r['time']:.2f} | {r['peak_mb']:.0f} | {full:.0f} |")


if __name__ == "__main__":
    main()
