"""Forward+backward time and peak memory of the contrastive losses (a benchmark, not a test).

Compares, for N embeddings of dimension D with 100 classes:

* ``SCHaNeLoss`` (vectorised log-space, this library),
* ``SupConLoss`` (this library),
* ``pytorch_metric_learning.losses.SupConLoss`` (the reference library),
* a per-anchor Python loop of the SCHaNe formula, written the way the authors' release computes it
  (for each anchor row: select its positives and negatives, compute the weights, sum).

Time: median over ``--repeats`` runs, methods interleaved within each repeat so machine load hits all alike.
Memory: each (method, N) runs once in a fresh subprocess; we report the growth of the process's peak resident
set size caused by that one forward+backward: the peak mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` after the inputs exist and a small warm-up call, and read afterwards (Linux).
This counts every allocation torch makes on the CPU, including temporaries.

``--floor`` compares instead with the *matmul floor*: the four products that any implementation recomputing
the similarities in backward needs (``s = A C^T`` in forward, ``s`` again in backward, ``G C`` and ``G^T A``),
timed as plain ``torch`` products on the same inputs, interleaved with ``SCHaNeLoss`` (eager and compiled block
kernels), ``SupConLoss`` and PML ``SupConLoss``; it prints each method's time as a ratio to the floor.

Usage:
    python benchmarks/loss_speed.py                         # N in 512 2048 4096 8192
    python benchmarks/loss_speed.py --sizes 512 2048 --repeats 3
    python benchmarks/loss_speed.py --floor                 # N in 2048 4096, median of 5, vs the matmul floor
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _peak_rss import reset_peak_rss, status_mb
from schane.losses import SCHaNeLoss, SupConLoss

D, CLASSES, TAU, BETA = 128, 100, 0.5, 1.0


def release_style_loop(embeddings: torch.Tensor, labels: torch.Tensor, tau: float = TAU, beta: float = BETA):
    """SCHaNe with a Python loop over anchors, as in the authors' release.

    The similarity matrix is computed once; then for each anchor row: select its positives and negatives,
    compute the hard-negative weights ``imp = exp(beta * log(neg))`` normalised by their mean, and sum.
    (Gathering the negative *embeddings* per anchor instead is slower still and keeps a copy of them per
    anchor for backward, ~4 GB at N=2048.)
    """
    z = F.normalize(embeddings, dim=1)
    sim = torch.exp(z @ z.T / tau)
    losses = []
    for i in range(z.shape[0]):
        pos_mask = labels == labels[i]
        pos_mask[i] = False
        if not pos_mask.any():
            continue
        neg_mask = labels != labels[i]
        pos = sim[i][pos_mask].mean()
        neg = sim[i][neg_mask]
        imp = (beta * neg.log()).exp()
        reweight_neg = (imp * neg).sum() / imp.mean()
        losses.append(-torch.log(pos / (pos + reweight_neg)))
    return torch.stack(losses).mean()


def matmul_floor(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four ``[N, N]``-sized products of a recomputing contrastive loss, and nothing else.

    Forward ``s = A C^T``; backward ``s`` again, then ``G C`` and ``G^T A`` (``G`` = the recomputed ``s``
    standing in for the gradient block). Normalisation and scaling are done by the caller, outside the timing.
    """
    a = c = embeddings.detach()
    s = a @ c.T
    del s
    g = a @ c.T
    d_a = g @ c
    d_c = g.T @ a
    return d_a, d_c


class _Floor:
    """The matmul floor as a method: :func:`_step` times :func:`matmul_floor` on a normalised copy of ``x``."""

    def __init__(self) -> None:
        self._cache: dict[int, torch.Tensor] = {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised copy of ``x`` (made once per input tensor, outside the timing)."""
        key = id(x)
        if key not in self._cache:
            self._cache = {key: F.normalize(x.detach(), dim=1)}
        return self._cache[key]


def _methods(temperature: float = TAU, floor: bool = False):
    from pytorch_metric_learning.losses import SupConLoss as PMLSupCon

    if floor:
        return {
            "matmul floor": _Floor(),
            "SCHaNeLoss": SCHaNeLoss(temperature=temperature, beta=BETA, backend="eager"),
            "SCHaNeLoss (backend=compile)": SCHaNeLoss(temperature=temperature, beta=BETA, backend="compile"),
            "SupConLoss": SupConLoss(temperature=temperature, backend="eager"),
            "PML SupConLoss": PMLSupCon(temperature=temperature),
        }
    return {
        "SCHaNeLoss": SCHaNeLoss(temperature=temperature, beta=BETA),
        "SupConLoss": SupConLoss(temperature=temperature),
        "PML SupConLoss": PMLSupCon(temperature=temperature),
        "per-anchor loop": release_style_loop,
    }


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _step(fn, x, y) -> float:
    if isinstance(fn, _Floor):
        z = fn.prepare(x)
        t0 = time.perf_counter()
        matmul_floor(z, y)
        return time.perf_counter() - t0
    x = x.clone().requires_grad_()
    t0 = time.perf_counter()
    fn(x, y).backward()
    return time.perf_counter() - t0


def memory_child(method: str, n: int, floor: bool = False) -> None:
    """Runs in a fresh process: print the peak-RSS growth (MB) of one forward+backward."""
    fn = _methods(floor=floor)[method]
    x, y = _inputs(n)
    xs, ys = _inputs(64, seed=1)
    _step(fn, xs, ys)  # load kernels, compile, allocator warm-up
    if isinstance(fn, _Floor):
        fn.prepare(x)  # its normalised copy of x is an input, not part of the peak
    base = reset_peak_rss()
    _step(fn, x, y)
    print(json.dumps({"peak_mb": status_mb("VmHWM") - base}))


def measure_memory(method: str, n: int, floor: bool = False) -> float:
    extra = ["--floor"] if floor else []
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", method, str(n), *extra],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per N (median reported)")
    ap.add_argument("--loop-max-n", type=int, default=2048, help="largest N at which the loop is run (once)")
    ap.add_argument("--loop-mem-max-n", type=int, default=512, help="largest N for the loop's memory run")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true", help="compare with the matmul floor (N 2048 4096, median of 5)")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), floor=args.floor)
        return
    args.sizes_given = args.sizes is not None
    if args.floor:
        floor_main(args)
        return
    if args.sizes is None:
        args.sizes = [512, 2048, 4096, 8192]

    methods = _methods()
    results: dict[tuple[str, int], dict] = {}
    for n in args.sizes:
        x, y = _inputs(n)
        for fn in methods.values():  # warm-up at this size (skip the slow loop)
            if fn is not release_style_loop:
                _step(fn, x, y)
        times: dict[str, list[float]] = {m: [] for m in methods}
        repeats = args.repeats if n <= 2048 else max(3, args.repeats // 2)
        for r in range(repeats):
            for m, fn in methods.items():
                if fn is release_style_loop and (n > args.loop_max_n or (r > 0 and n > 512)):
                    continue
                times[m].append(_step(fn, x, y))
        for m in methods:
            entry: dict = {}
            if times[m]:
                entry["time"] = statistics.median(times[m])
                entry["runs"] = len(times[m])
            results[(m, n)] = entry
        # extrapolate the loop as a power law fitted to the two largest measured sizes (marked in the table)
        if not times["per-anchor loop"]:
            measured = [
                k
                for k in args.sizes
                if k < n and not results.get(("per-anchor loop", k), {}).get("extrapolated")
            ]
            measured = [k for k in measured if "time" in results.get(("per-anchor loop", k), {})]
            if len(measured) >= 2:
                n0, n1 = sorted(measured)[-2:]
                t0, t1 = results[("per-anchor loop", n0)]["time"], results[("per-anchor loop", n1)]["time"]
                p = math.log(t1 / t0) / math.log(n1 / n0)
                results[("per-anchor loop", n)] = {
                    "time": t1 * (n / n1) ** p,
                    "extrapolated": True,
                    "power": p,
                }
        if not args.no_memory:
            for m in methods:
                if m == "per-anchor loop" and n > args.loop_mem_max_n:
                    continue
                results[(m, n)]["peak_mb"] = measure_memory(m, n)
        print(
            f"N={n} done: "
            + ", ".join(f"{m}={results[(m, n)].get('time', float('nan')):.3f}s" for m in methods),
            file=sys.stderr,
            flush=True,
        )

    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    print(f"Command: `{cmd}`  ")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={D}, {CLASSES} classes, "
        f"tau={TAU}, beta={BETA}\n"
    )
    print("| N | method | fwd+bwd time (s) | peak memory (MB) | time vs PML SupCon | loop / SCHaNe |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        pml = results[("PML SupConLoss", n)].get("time")
        sch = results[("SCHaNeLoss", n)].get("time")
        for m in methods:
            e = results[(m, n)]
            t = e.get("time")
            ts = "-" if t is None else f"{t:.3f}"
            if e.get("extrapolated"):
                ts = f"~{t:.1f} (extrapolated, N^{e['power']:.2f})"
            mem = f"{e['peak_mb']:.0f}" if "peak_mb" in e else "-"
            ratio = f"{t / pml:.2f}" if t is not None and pml else "-"
            loop = f"{t / sch:.0f}x" if m == "per-anchor loop" and t is not None and sch else ""
            print(f"| {n} | {m} | {ts} | {mem} | {ratio} | {loop} |")


def _load() -> str:
    return "load average " + " / ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"


def floor_main(args: argparse.Namespace) -> None:
    """``--floor``: every method interleaved with the matmul floor, median of ``--repeats`` (at least 5)."""
    sizes = args.sizes if args.sizes_given else [2048, 4096]
    repeats = max(args.repeats, 5)
    methods = _methods(floor=True)
    load_before = _load()
    results: dict[tuple[str, int], dict] = {}
    for n in sizes:
        x, y = _inputs(n)
        for fn in methods.values():  # warm-up at this size (compiles the compiled kernels)
            _step(fn, x, y)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(repeats):
            order = list(methods.items())
            order = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
            for m, fn in order:
                times[m].append(_step(fn, x, y))
        for m in methods:
            results[(m, n)] = {"time": statistics.median(times[m]), "all": times[m]}
            if not args.no_memory:
                results[(m, n)]["peak_mb"] = measure_memory(m, n, floor=True)
        print(
            f"N={n} done: " + ", ".join(f"{m}={results[(m, n)]['time']:.3f}s" for m in methods),
            file=sys.stderr,
            flush=True,
        )
    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    print(f"Command: `{cmd}`  ")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={D}, {CLASSES} classes, "
        f"tau={TAU}, beta={BETA}, fwd+bwd median of {repeats}  "
    )
    print(f"Load: before {load_before}; after {_load()}\n")
    print("| N | method | fwd+bwd time (ms) | vs floor | vs PML SupCon | peak memory (MB) | all runs (ms) |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        fl = results[("matmul floor", n)]["time"]
        pml = results[("PML SupConLoss", n)]["time"]
        for m in methods:
            e = results[(m, n)]
            mem = f"{e['peak_mb']:.0f}" if "peak_mb" in e else "-"
            runs = " ".join(f"{v * 1e3:.0f}" for v in e["all"])
            print(
                f"| {n} | {m} | {e['time'] * 1e3:.0f} | {e['time'] / fl:.2f}x | {e['time'] / pml:.2f} | {mem} | "
                f"{runs} |"
            )


if __name__ == "__main__":
    main()
