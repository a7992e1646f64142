"""Where the demo's time goes, and what the next speed-ups could be, measured with the demo's own settings.

Phases, each timed on the shipped demo config (``src/schane/configs/demo.yaml``, glyphs, EfficientNet-Lite0):

* data: one training epoch of two-view augmentation (the DataLoader alone, no model), ``num_workers`` 0 and 1;
* step: one training step (forward, loss, backward, AdamW) in NCHW and in channels-last, with the small-map
  convolutions as matrix products as training on a CPU runs them;
* epoch: one training epoch end to end (data + steps) with ``num_workers`` 0 and 1;
* eval: images/s of pooled-feature extraction at several batch sizes, NCHW and channels-last;
* bank: one few-shot feature bank (every validation-class image, evaluation view + ``support_aug`` copies).

Usage:
    python benchmarks/demo_phases.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils.data import DataLoader

from schane.data.transforms import TwoViews
from schane.engine.batches import SeededTransformDataset, epoch_batches, worker_init_fn
from schane.engine.criterion import build_criterion
from schane.engine.evaluate import extract_features
from schane.engine.optim import build_optimizer
from schane.models.small_maps import patch_convolutions
from schane.pipelines.demo import demo_config
from schane.pipelines.scoring import fewshot_views
from schane.pipelines.splits import eval_dataset, load_split, train_transform_for


def _median(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from schane.models import build_model

    cfg = demo_config("runs/bench-phases")
    base = load_split(cfg, "train")
    model = build_model(cfg.model, len(base.classes))
    ds = SeededTransformDataset(base, TwoViews(train_transform_for(cfg, model)), 0)
    batches = epoch_batches(len(ds), cfg.data.batch_size, epoch=0, seed=0)
    print(f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(batches)} batches of {cfg.data.batch_size} images (x2 views) at {cfg.data.img_size} px\n")
    print("| phase | setting | time |")
    print("|---|---|---|")

    def loader(workers: int) -> DataLoader:
        return DataLoader(ds, batch_sampler=batches, num_workers=workers, worker_init_fn=worker_init_fn)

    for w in (0, 1):
        t = _median(lambda w=w: [None for _ in loader(w)], args.repeats)
        print(f"| data: one epoch of two-view augmentation | num_workers={w} | {t:.2f} s |", flush=True)

    crit = build_criterion(cfg.loss).joint
    views = next(iter(loader(0)))
    for fmt in ("nchw", "channels_last"):
        m = build_model(cfg.model, len(base.classes))
        x = torch.cat(list(views[0]))
        if fmt == "channels_last":
            m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        patch_convolutions(m)  # as training on a CPU runs it (schane.models.small_maps)
        opt = build_optimizer(m, cfg.optim, cfg.optim.lr)
        y = views[1].repeat(2)

        def step(m=m, x=x, y=y, opt=opt) -> None:
            out = m(x)
            crit(out.logits, y, out.projections).total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        t = _median(step, max(args.repeats, 5))
        print(f"| step: forward, joint loss, backward, AdamW | {fmt} | {1000 * t:.0f} ms |", flush=True)
        if fmt == "channels_last":
            for w in (0, 1):
                def epoch(w=w, m=m, opt=opt) -> None:
                    for v, lab, _ in loader(w):
                        xx = torch.cat(list(v)).contiguous(memory_format=torch.channels_last)
                        out = m(xx)
                        crit(out.logits, lab.repeat(2), out.projections).total.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)

                t = _median(epoch, 1)
                print(f"| epoch: data + steps, channels-last | num_workers={w} | {t:.1f} s |", flush=True)

    pre = build_model(cfg.model, cfg.fewshot.ways).eval()
    ev, _ = eval_dataset(cfg, pre, "val_classes")
    for fmt in ("nchw", "channels_last"):
        m = pre if fmt == "nchw" else build_model(cfg.model, cfg.fewshot.ways).eval().to(memory_format=torch.channels_last)
        for bs in (128, 256, 512):
            t = _median(lambda m=m, bs=bs: extract_features(m, ev, batch_size=bs, progress=False), args.repeats)
            print(f"| eval: pooled features of {len(ev)} images | {fmt}, batch {bs} | {len(ev) / t:.0f} img/s |",
                  flush=True)

    from schane.fewshot import build_feature_bank
    from schane.fewshot.episodes import sample_episodes

    views_ = fewshot_views(cfg, pre, ("val_classes",))
    eps = [e for s in cfg.fewshot.shots for e in sample_episodes(views_.labels["val_classes"], cfg.fewshot.ways, s,
                                                                  cfg.fewshot.queries, cfg.fewshot.val_episodes, 0)]
    m = build_model(cfg.model, cfg.fewshot.ways).eval().to(memory_format=torch.channels_last)
    t = _median(lambda: build_feature_bank(m, views_.eval["val_classes"], views_.support["val_classes"], eps,
                                           n_aug=cfg.fewshot.support_aug, batch_size=cfg.data.eval_batch_size,
                                           progress=False), args.repeats)
    print(f"| bank: val_classes features, 1 + {cfg.fewshot.support_aug} views | channels-last | {t:.1f} s |")


if __name__ == "__main__":
    main()
