"""Protocol A's regressions: batched torch solver vs one scikit-learn fit per episode.

Synthetic 1,280-d features (20 classes, 5 augmented copies per support image), 5-way
episodes with 15 queries per class; times :func:`schane.fewshot.evaluate_protocol_a` with
``solver="torch"`` and ``solver="sklearn"`` (``n_jobs`` 1 and 2), interleaved per shot, and
reports how often the two solvers' per-episode accuracies agree.

    python benchmarks/fewshot_logreg.py --episodes 600
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from schane.fewshot import FeatureBank, evaluate_protocol_a
from schane.fewshot.episodes import sample_episodes


def synthetic_bank(n_classes: int = 20, per_class: int = 40, d: int = 1280, n_aug: int = 5) -> tuple[FeatureBank, list[int]]:
    """Non-negative, overlapping class clusters (like pooled ReLU features) and their augmented copies."""
    g = torch.Generator().manual_seed(0)
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    centers = torch.randn(n_classes, d, generator=g)
    feats = torch.relu(0.15 * centers[labels] + torch.randn(len(labels), d, generator=g))
    aug = torch.stack([torch.relu(feats + 0.5 * torch.randn(feats.shape, generator=g)) for _ in range(n_aug)])
    index = {i: i for i in range(len(labels))}
    return FeatureBank(index, feats, index, aug), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the torch solver (median)")
    args = ap.parse_args()
    bank, labels = synthetic_bank()
    print(f"load average {os.getloadavg()}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| shots | episodes | solver | time (s) | mean acc (%) |")
    print("|---|---|---|---|---|")
    for shot in args.shots:
        eps = sample_episodes(labels, 5, shot, 15, args.episodes, seed=shot)
        runs: dict[str, np.ndarray] = {}
        for name, kw in [("torch", {}), ("sklearn n_jobs=1", {"solver": "sklearn", "n_jobs": 1}),
                         ("sklearn n_jobs=2", {"solver": "sklearn", "n_jobs": 2})]:
            times = []
            for _ in range(args.repeats if name == "torch" else 1):
                t = time.perf_counter()
                runs[name] = evaluate_protocol_a(bank, eps, C=args.C, progress=False, **kw)
                times.append(time.perf_counter() - t)
            print(f"| {shot} | {len(eps)} | {name} | {np.median(times):.2f} | {runs[name].mean():.2f} |", flush=True)
        same = np.mean(runs["torch"] == runs["sklearn n_jobs=1"])
        print(f"| {shot} | | episodes with equal accuracy, torch vs sklearn | {100 * same:.1f}% | |")


if __name__ == "__main__":
    main()
