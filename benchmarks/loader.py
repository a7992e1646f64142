"""Loader throughput: images/s through the training transform from class folders, HF parquet and WebDataset shards.

The same JPEG images (``--images`` of them, ``--size`` px, smooth colour fields with noise so that they
compress like photos) are written as JPEG class folders, then converted with ``schane convert`` to the
Hub's parquet layout and to WebDataset shards (the JPEG bytes are copied, so every storage decodes the same
files). Each storage is read the way ``schane train`` reads it: ``SeededTransformDataset`` with the two-view
training transform at ``--img-size`` (RandomResizedCrop, flip, colour jitter, grayscale, normalise; two views
per image), batched by a ``DataLoader`` with 0, 1 and 2 workers over the seeded epoch batches. The shards are
also read as a :class:`schane.data.wds.ShardStream` (sequential tar reads, shuffle buffer 256, the same
two views). The time
includes starting the workers; nothing is cached between rows except by the operating system.

Usage:
    python benchmarks/loader.py --images 128 --repeats 3   # 500x375-px JPEGs, 224-px views, 0/1/2 workers
    python benchmarks/loader.py --images 512 --workers 0 2 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from schane.data import get_dataset
from schane.data.transforms import TwoViews, train_transform
from schane.data.wds import ShardStream
from schane.engine.batches import SeededTransformDataset, epoch_batches, worker_init_fn
from schane.pipelines.convert import convert

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 8) -> Path:
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for i in range(n):
        c = i % classes
        base = np.stack([np.sin(6 * xx * rng.random() + k) * np.cos(6 * yy * rng.random() + c) for k in range(3)], -1)
        img = (127 + 100 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        d = root / "train" / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
        (root / "test" / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for c in range(classes):  # the folder reader wants a test split: one image per class
        src = next((root / "train" / f"class_{c}").iterdir())
        (root / "test" / f"class_{c}" / src.name).write_bytes(src.read_bytes())
    return root


def time_map(name: str, root: Path, workers: int, img_size: int, batch: int, options: dict) -> tuple[float, int]:
    base = get_dataset(name, str(root), "train", val_fraction=0.0, **options)
    ds = SeededTransformDataset(base, TwoViews(train_transform(img_size, MEAN, STD)), seed=0)
    batches = epoch_batches(len(ds), batch, epoch=0, seed=0)
    t0 = time.perf_counter()
    n = 0
    loader = DataLoader(ds, batch_sampler=batches, num_workers=workers, worker_init_fn=worker_init_fn)
    for (v1, _v2), _labels, _idx in loader:
        n += v1.shape[0]
    return time.perf_counter() - t0, n


def time_stream(root: Path, workers: int, img_size: int, batch: int) -> tuple[float, int]:
    stream = ShardStream(root, "train", TwoViews(train_transform(img_size, MEAN, STD)), seed=0, shuffle_buffer=256)
    t0 = time.perf_counter()
    n = 0
    for (v1, _v2), _labels, _keys in DataLoader(stream, batch_size=batch, num_workers=workers):
        n += v1.shape[0]
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        folders = write_jpegs(tmp_path / "folders", args.images, tuple(args.size))
        convert(str(folders), "hf", tmp_path / "hf", shard_size=args.shard_size, progress=False)
        convert(str(folders), "wds", tmp_path / "wds", shard_size=args.shard_size, progress=False)
        mb = sum(f.stat().st_size for f in (folders / "train").rglob("*.jpg")) / 2**20
        print(f"# {args.images} JPEGs ({mb:.1f} MiB), {args.size[0]}x{args.size[1]} px -> two {args.img_size}-px "
              f"views each; batch {args.batch}; torch threads 1; {os.cpu_count()} CPUs; {platform.processor() or platform.machine()}")
        print(f"# median (min–max) of {args.repeats} interleaved repeats")
        print("| storage | read as | workers | images/s | views/s |")
        print("|---|---|---:|---:|---:|")
        storages = [("JPEG class folders", "image_folder", folders, {}),
                    ("HF parquet (Hub layout)", "hf", tmp_path / "hf", {"cache_dir": str(tmp_path / "cache")}),
                    ("WebDataset shards", "wds", tmp_path / "wds", {})]
        get_dataset("hf", str(tmp_path / "hf"), "train", cache_dir=str(tmp_path / "cache"))  # parquet -> arrow once
        rows = [(w, label, "index", name, root, opts) for w in args.workers for label, name, root, opts in storages]
        rows += [(w, "WebDataset shards", "ShardStream", "stream", tmp_path / "wds", {}) for w in args.workers
                 if (args.images // args.shard_size) >= max(w, 1)]
        rates: dict[int, list[float]] = {i: [] for i in range(len(rows))}
        for rep in range(args.repeats):  # interleaved, every other repeat in reverse: load drifts hit all rows alike
            order = list(range(len(rows)))[:: 1 if rep % 2 == 0 else -1]
            for i in order:
                w, _, how, name, root, opts = rows[i]
                if how == "index":
                    sec, n = time_map(name, root, w, args.img_size, args.batch, opts)
                else:
                    sec, n = time_stream(root, w, args.img_size, args.batch)
                rates[i].append(n / sec)
        for i, (w, label, how, *_rest) in enumerate(rows):
            r = rates[i]
            print(f"| {label} | {how} | {w} | {statistics.median(r):.0f} ({min(r):.0f}–{max(r):.0f}) | "
                  f"{2 * statistics.median(r):.0f} |")


if __name__ == "__main__":
    main()
