"""How the demo's settings were chosen: base-class validation top-1 and validation-class few-shot accuracy.

Each candidate is the shipped demo config (``src/schane/configs/demo.yaml``) with some overrides. It is
trained once (seed 0 unless ``--seed``), then measured exactly as the demo selects: the checkpoint (best.pt
or last.pt) and the logistic-regression C are chosen on ``val_classes`` episodes, whose accuracy is the
score. The novel (``test_classes``) images are never loaded. The pretrained backbone is measured on the
same validation episodes for reference. Wall time per run is printed too, to check the demo's budget.

Usage:
    python benchmarks/select_demo_settings.py --out runs/select \\
        --candidate ce-lr3e-3 loss.name=ce optim.lr=3e-3 \\
        --candidate schane-lam0.5 loss.name=schane loss.lam=0.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from schane.engine.checkpoint import load_checkpoint_model
from schane.engine.device import resolve_device
from schane.pipelines.demo import demo_config
from schane.pipelines.fewshot import _checkpoint_candidates, pretrained_model
from schane.pipelines.scoring import VAL_SPLIT, FewShotStudy, fewshot_views
from schane.pipelines.train import train
from schane.progress import setup_logging


def _study(cfg, model):
    from schane.fewshot.episodes import sample_episodes

    views = fewshot_views(cfg, model, (VAL_SPLIT,))
    fs = cfg.fewshot
    eps = {VAL_SPLIT: {s: sample_episodes(views.labels[VAL_SPLIT], fs.ways, s, fs.queries, fs.val_episodes,
                                          fs.episode_seed) for s in fs.shots}}
    return FewShotStudy(cfg, views, eps, resolve_device(cfg.train.device))


def _score(study, candidates) -> dict[int, tuple[str, float]]:
    """Per shot: the candidate (checkpoint) with the best mean validation-episode accuracy, as the demo picks."""
    fs = study.cfg.fewshot
    best: dict[int, tuple[str, float]] = {}
    for name, load in candidates:
        res = study.evaluate(load(), VAL_SPLIT, fs.shots, [fs.logreg_c], name)
        for (shot, _), accs in res.items():
            if shot not in best or accs.mean() > best[shot][1]:
                best[shot] = (name, float(accs.mean()))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/select")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidate", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="a candidate: its name, then config overrides")
    p.add_argument("--pretrained", action="store_true", help="also score the pretrained backbone")
    args = p.parse_args()
    setup_logging()
    out = Path(args.out)
    rows = []
    if args.pretrained:
        cfg = demo_config(out / "pretrained", seeds=[args.seed])
        m = pretrained_model(cfg, cfg.fewshot.ways)
        choice = _score(_study(cfg, m), [("none", lambda: m)])
        rows.append({"name": "pretrained", "val_fewshot": {s: c[1] for s, c in choice.items()}})
    for name, *overrides in args.candidate:
        cfg = demo_config(out / name, seeds=[args.seed], overrides=[f"train.seed={args.seed}", *overrides])
        t0 = time.perf_counter()
        res = train(cfg, resume="auto")
        seconds = time.perf_counter() - t0
        cands = _checkpoint_candidates(res.best_checkpoint, res.last_checkpoint)
        device = resolve_device(cfg.train.device)
        loaders = [(n, lambda p=p, d=device: load_checkpoint_model(p, map_location=d)[0]) for n, p in cands]
        choice = _score(_study(cfg, loaders[0][1]()), loaders)
        rows.append({"name": name, "overrides": overrides, "train_s": seconds,
                     "base_val_last": 100 * (res.metrics.get("last_val") or {}).get("top1", float("nan")),
                     "base_val_best": 100 * (res.metrics.get("best_val_top1") or float("nan")),
                     "val_fewshot": {s: c[1] for s, c in choice.items()}, "checkpoint": {s: c[0] for s, c in choice.items()}})
        (out / "selection.json").write_text(json.dumps(rows, indent=1))
    print(f"seed {args.seed}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| candidate | overrides | base val top-1 last / best (%) | val-class 1-shot (%) | val-class 5-shot (%) | train (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fs = r["val_fewshot"]
        base = f"{r['base_val_last']:.1f} / {r['base_val_best']:.1f}" if "base_val_last" in r else "—"
        t = f"{r['train_s']:.0f}" if "train_s" in r else "—"
        print(f"| {r['name']} | {' '.join(r.get('overrides', []))} | {base} | {fs[1]:.2f} | {fs[5]:.2f} | {t} |")


if __name__ == "__main__":
    main()
