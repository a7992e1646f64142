"""The same tiny images in four storages: class folders, a save_to_disk DatasetDict, the Hub's parquet
layout and WebDataset shards.

The Hugging Face stores are written by the ``datasets`` library itself (``Dataset.from_dict`` with
``Image()`` and ``ClassLabel`` features, ``DatasetDict.save_to_disk``, ``Dataset.to_parquet`` under
``data/{split}-00000-of-00001.parquet`` as the Hub lays out converted datasets); the shards by
``webdataset.TarWriter`` (``KEY.png`` + ``KEY.cls``, as webdataset's README shows), with ``classes.txt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["ant", "bee", "cat"]

def write_folders(root: Path, per_class: dict[str, int], size: int = 16, seed: int = 0,
                  classes: list[str] = CLASSES) -> Path:
    """``root/{train,test}/<class>/<i>.png``: noise whose dominant channel is the class (mod 3)."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.random((size, size, 3)) * 90
                a[..., c % 3] += 160
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i:03d}.png")
    return root

def _classes(folders: Path) -> list[str]:
    return sorted(p.name for p in (folders / "train").iterdir())

def _items(folders: Path, split: str) -> list[tuple[Path, int]]:
    classes = _classes(folders)
    return [(f, c) for c, name in enumerate(classes) for f in sorted((folders / split / name).glob("*.png"))]

def write_hf(folders: Path, out: Path, *, parquet: bool) -> Path:
    """The folders' images as a DatasetDict ``save_to_disk`` directory, or as ``data/{split}-*.parquet``."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    feats = Features({"image": Image(), "label": ClassLabel(names=_classes(folders))})
    dd = {}
    for split in ("train", "test"):
        items = _items(folders, split)
        dd[split] = Dataset.from_dict(
            {"image": [str(f) for f, _ in items], "label": [c for _, c in items]}, features=feats
        )
    if not parquet:
        DatasetDict(dd).save_to_disk(str(out))
        return out
    (out / "data").mkdir(parents=True)
    for split, ds in dd.items():
        ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    return out

def write_wds(folders: Path, out: Path, per_shard: int = 1000) -> Path:
    """The folders' images as ``{split}-%06d.tar`` WebDataset shards with ``classes.txt``."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        items = _items(folders, split)
        for s in range(0, len(items), per_shard):
            with wds.TarWriter(str(out / f"{split}-{s // per_shard:06d}.tar")) as sink:
                for f, c in items[s : s + per_shard]:
                    sink.write({"__key__": f"{c}_{f.stem}", "png": f.read_bytes(), "cls": str(c)})
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in _classes(folders)))
    return out

def rank_worker(r: int, port: int, root: str, out: str) -> None:
    """One of two gloo ranks: the keys of the training images it reads per epoch, by index and by stream.

    Lives here rather than in the test module so that a spawned rank imports only the data package."""
    import os

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from schane.data import get_dataset
    from schane.data.wds import ShardStream

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=r, world_size=2)
    torch.set_num_threads(1)
    from schane.engine.batches import epoch_batches

    seen = {}
    # what `schane train` reads: the indexed shards through the seeded DistributedSampler batches
    ds = get_dataset("wds", root, "train", val_fraction=0.0)
    for epoch in (0, 1):
        batches = epoch_batches(len(ds), 4, epoch=epoch, seed=0, rank=dist.get_rank(), world_size=2)
        seen[f"train{epoch}"] = [ds.samples[i].key for b in batches for i in b]
        # the stream, rank and world size from the process group (loader workers: the stream test)
        stream = ShardStream(root, "train", seed=0, shuffle_buffer=3)
        seen[f"stream{epoch}"] = _stream_keys(stream, 0, epoch, DataLoader)
        seen[f"lengths{epoch}"] = stream.rank_lengths()
    torch.save(seen, os.path.join(out, f"rank{r}.pt"))
    dist.destroy_process_group()

def _stream_keys(stream, workers, epoch, loader_cls):
    stream.set_epoch(epoch)
    return [stream.key(i) for _, _, i in loader_cls(stream, batch_size=None, num_workers=workers)]
