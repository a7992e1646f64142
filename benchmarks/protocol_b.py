"""Protocol B's cost per episode: the 0.2 implementation against the current one.

The demo's benchmark: ImageNet-pretrained EfficientNet-Lite0 (``effnet-lite0-offline``) at 32 px on the glyphs
``val_classes`` split (rendered into the glyph cache on first use), 5-way episodes with 15 queries per class.

* ``before``: the 0.2 loop, reproduced below: per episode a deep copy of the state, a forward pass for the
  prototypes and one for the queries, and per step a forward+backward of the whole model on two fresh views,
  contiguous tensors, torch's default Adam.
* ``after``: :func:`schane.fewshot.evaluate_protocol_b_grid` (features of the untouched model once, the frozen
  part once per image and copy, channels-last, 1x1 convolutions as matrix products, fused Adam, restore of the
  tuned tensors only). Its per-episode time includes its share of the once-per-call work.

Rows: the 0.2 default (20 steps at lr 1e-3 on every parameter) before and after, the same 20 steps for each
``params`` choice, the default grid as the validation pass evaluates it, and ``--full`` episodes of the
default setting the selection chose on the demo (the test pass of one model and one shot).

    python benchmarks/protocol_b.py --episodes 10 --shots 1 5 --threads 1 2 --full 600
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F

from schane.config import load_config
from schane.engine.seeding import sample_seed, seeded_rng
from schane.fewshot import ProtoHead, evaluate_protocol_b_grid, sample_episodes, settings_grid
from schane.pipelines.fewshot import pretrained_model
from schane.pipelines.scoring import fewshot_views


def before_episode(model, ep, support, evalset, *, steps: int, lr: float) -> float:
    """One episode as schane 0.2 ran it (deep copy, whole model per step, restore by load_state_dict)."""
    saved = copy.deepcopy(model.state_dict())
    ys, yq = torch.as_tensor(ep.support_labels), torch.as_tensor(ep.query_labels)
    stack = lambda ds, ids: torch.stack([ds[i][0] for i in ids])  # noqa: E731
    try:
        model.eval()
        with torch.no_grad():
            fs = F.normalize(model.forward_features(stack(evalset, ep.support)).float(), dim=-1)
            protos = torch.stack([fs[ys == j].mean(0) for j in range(ep.ways)])
        head = ProtoHead(protos)
        opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=lr)
        y2 = torch.cat([ys, ys])
        for _ in range(steps):
            x = torch.cat([stack(support, ep.support), stack(support, ep.support)])
            loss = F.cross_entropy(head(model.forward_features(x)), y2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = head(model.forward_features(stack(evalset, ep.query))).argmax(1)
        return float((pred == yq).float().mean()) * 100
    finally:
        model.load_state_dict(saved)


def choose_params(args, model, sup, ev, labels, fs) -> None:
    """Each ``params`` choice with its own grid on the demo's validation-class episodes; per-episode results to
    ``--out`` and the best setting per choice, with the paired difference to the first choice."""
    import json

    from schane.fewshot.stats import mean_ci, paired_difference

    out = {}
    for shot in args.shots:
        base = None
        for spec in args.choose:
            params, lrs, steps, n = spec.split(":")
            n_eps = min(int(n), fs.val_episodes)
            eps = sample_episodes(labels, fs.ways, shot, fs.queries, n_eps, fs.episode_seed)
            grid = settings_grid([int(x) for x in steps.split(",")], [float(x) for x in lrs.split(",")])
            t = time.perf_counter()
            res = evaluate_protocol_b_grid(model, eps, sup, ev, settings=grid, params=params,
                                           last_layers=fs.finetune_last_layers, progress=False)
            dt = (time.perf_counter() - t) / n_eps
            best = max(res, key=lambda s: res[s].mean())
            out[f"{shot}-shot {spec}"] = {f"{s.steps}@{s.lr:g}": res[s].tolist() for s in res}
            line = " ".join(f"{s.steps}@{s.lr:g}={res[s].mean():.2f}" for s in res)
            ci = mean_ci(res[best])
            diff = ""
            if base is None:
                base = res[best]
            elif len(base) >= n_eps:
                d = paired_difference(res[best], base[:n_eps])
                diff = f"; best - first choice's best on the same episodes: {d.mean:+.2f} ± {d.half_width:.2f}"
            print(f"{shot}-shot {params} ({n_eps} episodes, {dt:.2f} s/episode): best {best.steps}@{best.lr:g} "
                  f"{ci.mean:.2f} ± {ci.half_width:.2f}{diff}\n  {line}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=10, help="episodes per timed row")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--full", type=int, default=600, help="episodes of the default setting (0: skip)")
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--choose", nargs="+", default=[], metavar="PARAMS:LRS:STEPS:EPISODES",
                    help="instead of timing: compare params choices on validation episodes, e.g. "
                         "head:0.03,0.1,0.3:0,20,40,80:200 (the first is the reference of the paired differences)")
    ap.add_argument("--out", default="", help="JSON file for the per-episode accuracies of --choose")
    args = ap.parse_args()
    cfg = load_config("src/schane/configs/demo.yaml", ["train.progress=false"])
    fs = cfg.fewshot
    model = pretrained_model(cfg, fs.ways)
    views = fewshot_views(cfg, model, ("val_classes",))
    sup, ev, labels = views.support["val_classes"], views.eval["val_classes"], views.labels["val_classes"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {load()}")
    print(f"defaults: params={fs.finetune_params} last_layers={fs.finetune_last_layers} "
          f"steps={fs.finetune_steps} lr={fs.finetune_lr}")
    if args.choose:
        torch.set_num_threads(args.threads[0])
        choose_params(args, model, sup, ev, labels, fs)
        print(f"\n{load()}")
        return
    print("| threads | shots | what | settings | episodes | s/episode | mean acc (%) |")
    print("|---|---|---|---|---|---|---|")

    def row(threads, shot, what, settings, n, seconds, acc):
        print(f"| {threads} | {shot} | {what} | {settings} | {n} | {seconds / n:.3f} | {acc:.2f} |", flush=True)

    for threads in args.threads:
        torch.set_num_threads(threads)
        for shot in args.shots:
            eps = sample_episodes(labels, fs.ways, shot, fs.queries, max(args.episodes, args.full), seed=0)
            few = eps[:args.episodes]
            if not args.skip_before:
                t = time.perf_counter()
                accs = []
                for i, ep in enumerate(few):
                    with seeded_rng(sample_seed(0, i)):
                        accs.append(before_episode(model, ep, sup, ev, steps=20, lr=1e-3))
                row(threads, shot, "before (0.2)", "all, 20@0.001", len(few), time.perf_counter() - t, np.mean(accs))
            for params in ("all", "last", "head"):
                t = time.perf_counter()
                res = evaluate_protocol_b_grid(model, few, sup, ev, settings=[(20, 1e-3)], params=params,
                                               last_layers=fs.finetune_last_layers, progress=False)
                row(threads, shot, "after", f"{params}, 20@0.001", len(few), time.perf_counter() - t,
                    next(iter(res.values())).mean())
            grid = settings_grid(fs.finetune_steps, fs.finetune_lr)
            t = time.perf_counter()
            res = evaluate_protocol_b_grid(model, few, sup, ev, settings=grid, params=fs.finetune_params,
                                           last_layers=fs.finetune_last_layers, progress=False)
            best = max(res, key=lambda s: res[s].mean())
            row(threads, shot, "after: validation grid", f"{fs.finetune_params}, {len(grid)} settings",
                len(few), time.perf_counter() - t, res[best].mean())
            if args.full:
                t = time.perf_counter()
                res = evaluate_protocol_b_grid(model, eps[:args.full], sup, ev, settings=[best],
                                               params=fs.finetune_params, last_layers=fs.finetune_last_layers,
                                               progress=False)
                row(threads, shot, "after: one setting", f"{fs.finetune_params}, {best.steps}@{best.lr:g}",
                    args.full, time.perf_counter() - t, res[best].mean())
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
