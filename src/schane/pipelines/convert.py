"""``schane convert``: any readable set written as WebDataset shards or the Hub's parquet layout.

The source is read through the registry like every other workflow's data (class folders, CSV, the paper's
releases, ...). Image files in JPEG, PNG or WebP are copied byte for byte; every other image (arrays of the
pickled releases, BMP, TIFF, ...) is written as a lossless PNG of its decoded RGB pixels, so the converted
set decodes to the same pixels with the same labels and class names.

* A classification source gives the splits ``train`` (the whole official training split: the validation
  hold-out is drawn again, with the same seed and the same images, when the converted set is read) and
  ``test``.
* A few-shot source gives one ``train`` split holding every image of the base, validation and novel classes,
  and ``OUT/class_splits/{train,val,test}.txt``: read it back with ``data.options.class_splits=OUT/class_splits``.

``--to wds`` writes ``OUT/{split}-%06d.tar`` (``KEY.<ext>`` + ``KEY.cls``, by ``webdataset.ShardWriter``)
and ``OUT/classes.txt``; ``--to hf`` writes ``OUT/data/{split}-%05d-of-%05d.parquet`` with an ``Image``
and a ``ClassLabel`` column (by ``datasets``), the layout of a Hub dataset repository.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schane.config import Config
from schane.data import list_datasets
from schane.data.custom import write_class_lists
from schane.data.hf import require_datasets
from schane.pipelines.runs import load_run_config
from schane.pipelines.splits import dataset_splits, load_split
from schane.progress import progress_bar

logger = logging.getLogger(__name__)

COPIED = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
"""Source file suffixes copied byte for byte, and the member extension they get."""


@dataclass
class ConvertResult:
    """What :func:`convert` wrote: ``out``, images per split, the class names and the files."""

    out: Path
    counts: dict[str, int]
    classes: list[str]
    files: list[Path] = field(default_factory=list)
    class_splits: Path | None = None


def source_config(source: str, overrides: Sequence[str] = ()) -> Config:
    """The config reading ``source``: ``NAME:ROOT`` (a registered dataset) or a folder (``image_folder``).

    Raises:
        ValueError: On an unknown dataset name or a malformed override.
    """

    name, sep, root = source.partition(":")
    if not sep or name.replace("-", "_").lower() not in list_datasets():
        name, root = "image_folder", source
    return load_run_config(None, [f"data.name={name}", f"data.root={root}", "data.val_fraction=0", *overrides])


def _encoded(ds: Any, i: int) -> tuple[bytes, str]:
    """Image ``i`` of ``ds`` encoded: the file's own bytes when it is JPEG/PNG/WebP, else a PNG of its pixels."""
    sample = ds.samples[i]
    if isinstance(sample, (str, Path)) and Path(sample).suffix.lower() in COPIED:
        ds.loader(sample)  # decodes it once: an unreadable file stops the conversion with its name
        return Path(sample).read_bytes(), COPIED[Path(sample).suffix.lower()]
    buf = io.BytesIO()
    ds.loader(sample).save(buf, format="PNG")
    return buf.getvalue(), "png"


def _splits(cfg: Config) -> tuple[dict[str, list[tuple[Any, list[int]]]], list[str], dict[str, list[str]] | None]:
    """``({out split: [(dataset, labels in the output's classes)]}, classes, few-shot class lists or None)``."""
    splits = dataset_splits(cfg)
    if "test_classes" not in splits:
        train = load_split(cfg, "train")
        test = load_split(cfg, "test")
        return {"train": [(train, train.targets)], "test": [(test, test.targets)]}, list(train.classes), None
    parts = {"train": load_split(cfg, "train"), "val": load_split(cfg, "val_classes"),
             "test": load_split(cfg, "test_classes")}
    classes: list[str] = []
    pooled = []
    for ds in parts.values():
        offset = len(classes)
        classes += list(ds.classes)
        pooled.append((ds, [offset + t for t in ds.targets]))
    if len(set(classes)) != len(classes):
        raise ValueError("the source's base, validation and novel classes share names; they cannot be pooled")
    return {"train": pooled}, classes, {k: list(v.classes) for k, v in parts.items()}


def _items(sources: list[tuple[Any, list[int]]]) -> Iterator[tuple[bytes, str, int]]:
    for ds, labels in sources:
        for i, label in enumerate(labels):
            data, ext = _encoded(ds, i)
            yield data, ext, label


def _write_wds(out: Path, split: str, items: Iterator[tuple[bytes, str, int]], shard_size: int, bar: Any) -> list[Path]:
    try:
        import webdataset as wds
    except ImportError:
        raise ImportError("--to wds needs webdataset: pip install 'schane[data]'") from None
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for n, (data, ext, label) in enumerate(items):
            sink.write({"__key__": f"{n:08d}", ext: data, "cls": str(label)})
            bar.update(1)
    return sorted(out.glob(f"{split}-*.tar"))


def _write_hf(out: Path, split: str, items: Iterator[tuple[bytes, str, int]], total: int, shard_size: int,
              classes: list[str], bar: Any) -> list[Path]:

    require_datasets()  # a one-line error naming the extra when it is missing
    from datasets import ClassLabel, Dataset, Features, Image

    feats = Features({"image": Image(), "label": ClassLabel(names=classes)})
    n_files = max(1, -(-total // shard_size))
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n_files):
        rows: dict[str, list[Any]] = {"image": [], "label": []}
        for _ in range(min(shard_size, total - k * shard_size)):
            data, _, label = next(items)
            rows["image"].append({"bytes": data, "path": None})
            rows["label"].append(label)
            bar.update(1)
        path = out / "data" / f"{split}-{k:05d}-of-{n_files:05d}.parquet"
        Dataset.from_dict(rows, features=feats).to_parquet(str(path))
        files.append(path)
    return files


def convert(source: str, to: str, out: str | Path, *, shard_size: int = 1000, overrides: Sequence[str] = (),
            progress: bool = True) -> ConvertResult:
    """Write the set ``source`` to ``out`` as WebDataset shards (``to="wds"``) or Hub parquet (``to="hf"``).

    Args:
        source: ``NAME:ROOT`` (any registered dataset, e.g. ``csv:data/``, ``cifar_fs:~/data``) or a folder
            of class folders.
        to: ``"wds"`` or ``"hf"``.
        out: Output folder (must not exist, or be empty).
        shard_size: Images per shard (per parquet file).
        overrides: Config overrides for the source, e.g. ``data.options.class_fractions=[0.6,0.2,0.2]``.
        progress: Show a bar on a terminal (log lines elsewhere).

    Returns:
        What was written.

    Raises:
        ValueError: On a bad ``to`` or ``shard_size``, a non-empty ``out``, or an unreadable source.
        FileNotFoundError: If the source is missing.
        ImportError: If the writer's package is missing (the message names the pip command).
    """
    if to not in ("wds", "hf"):
        raise ValueError(f"--to must be wds or hf, got {to!r}")
    if int(shard_size) < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} exists and is not an empty folder; choose a new folder")
    cfg = source_config(source, overrides)
    splits, classes, lists = _splits(cfg)
    out.mkdir(parents=True, exist_ok=True)
    result = ConvertResult(out, {}, classes)
    for split, sources in splits.items():
        total = sum(len(labels) for _, labels in sources)
        with progress_bar(total, desc=f"convert {split}", enabled=progress, log=True) as bar:
            if to == "wds":
                result.files += _write_wds(out, split, _items(sources), int(shard_size), bar)
            else:
                result.files += _write_hf(out, split, _items(sources), total, int(shard_size), classes, bar)
        result.counts[split] = total
    if to == "wds":
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    if lists is not None:

        result.class_splits = write_class_lists(lists, out / "class_splits")
    logger.info("wrote %s: %s images of %d classes in %d file(s)", out,
                ", ".join(f"{k} {v}" for k, v in result.counts.items()), len(classes), len(result.files))
    return result


__all__ = ["ConvertResult", "convert", "source_config"]
