"""WebDataset tar shards: an indexed, random-access reader and a sharded, seeded stream.

``data.name: wds`` reads ``root/{split}-*.tar``: each sample is ``KEY.{jpg,jpeg,png,webp}`` plus
``KEY.cls`` (an integer label), as ``webdataset.TarWriter`` writes them; class names come from
``root/classes.txt`` (one per line, in label order), else they are the label numbers.

Two ways to read the same shards, both with Python's own :mod:`tarfile` (no ``webdataset`` decoder runs,
so nothing is unpickled: webdataset's default decoders would unpickle ``.pyd``/``.pth`` members):

* :func:`build_wds` (the registry's ``wds``): one pass over the tar headers builds an index of where each
  image lies (shard, byte offset, size); images are then read by seeking. The set is a map-style
  :class:`~schane.data.base.ImageDataset`, so ``train``/``eval``/``fewshot``/``compare``/``embed`` use it
  like any other: the training order is the seeded ``DistributedSampler`` permutation, each training image
  is seen exactly once per epoch across ranks (less the ``drop_last`` remainder), and a resumed run is
  bit-identical to an uninterrupted one.
* :class:`ShardStream`: an :class:`~torch.utils.data.IterableDataset` that reads whole shards in order
  (the access pattern of object storage), split by shard across DDP ranks and then loader workers, with a
  seeded shuffle buffer; ``schane train`` uses it with ``data.options.stream: true``
  (:func:`training_stream`). Its order is a pure function of ``(seed, epoch, world size, workers)``; resume
  mid-epoch replays the epoch and skips what was consumed (see :meth:`ShardStream.set_epoch`).

Examples:
    >>> from schane.data import get_dataset
    >>> test = get_dataset("wds", "shards", "test")  # doctest: +SKIP
    >>> stream = ShardStream("shards", "train", seed=0, shuffle_buffer=1000)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from torch.utils.data import IterableDataset, get_worker_info

from schane.engine.seeding import sample_seed, seeded_rng

from .base import ImageDataset, decode_image_bytes, first_few, layout_not_found
from .custom import FEWSHOT_LAYOUT, fewshot_kind
from .registry import register_dataset
from .stored import STORED_SPLITS, pick_split, split_key

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image members a sample may hold (the first one found is used)."""

WDS_LAYOUT = """
root/{split}-*.tar     WebDataset shards, split = train, validation (or val), test; e.g. train-000000.tar
                       each sample: KEY.jpg (or .jpeg/.png/.webp) + KEY.cls (the integer label, as text)
root/classes.txt       optional: class names, one per line in label order (else the names are the label numbers)
Write them with `schane convert --data SRC --to wds OUT` or webdataset.TarWriter / ShardWriter.
Options stream (default false) and shuffle_buffer (1000): train from the shards read in order as a seeded
stream instead of the index (needs validation-*.tar shards, or data.val_fraction=0).
"""


def shard_files(root: Path) -> dict[str, list[Path]]:
    """``{stored split: sorted shard files}`` of ``root/{split}-*.tar``."""
    found: dict[str, list[Path]] = {}
    for f in sorted(Path(root).glob("*.tar")):
        name = f.name.split("-", 1)[0]
        if name in STORED_SPLITS and f.name != f"{name}.tar":
            found.setdefault(name, []).append(f)
    return found


def looks_like(root: Path) -> bool:
    """True when ``root`` is a folder of ``{split}-*.tar`` shards (looks at file names only)."""
    root = Path(root)
    return root.is_dir() and bool(shard_files(root))


@dataclass(frozen=True)
class Member:
    """Where one sample's image lies: ``shard`` (index into the shard list), byte ``offset`` and ``size``."""

    shard: int
    offset: int
    size: int
    key: str


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension rule: the extension starts at the first dot of the file's base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _parse_label(data: bytes, where: str) -> int:
    try:
        return int(data.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"dataset 'wds': {where} is not an integer label ({data[:20]!r})") from None


def index_shard(path: Path, shard: int) -> list[tuple[Member, int]]:
    """``[(image member, label)]`` of one shard, in the shard's order (reads headers and ``.cls`` members only).

    Raises:
        ValueError: If the file is not a tar, a sample lacks an image or a ``.cls``, or a label is not an integer.
    """
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                entry = samples.setdefault(key, {})
                if ext == "cls":
                    f = tar.extractfile(m)
                    assert f is not None
                    entry["cls"] = _parse_label(f.read(), f"{path.name}:{m.name}")
                elif ext in IMAGE_EXTENSIONS and "image" not in entry:
                    entry["image"] = Member(shard, m.offset_data, m.size, key)
    except tarfile.TarError as err:
        raise ValueError(f"dataset 'wds': {path} is not a readable tar file ({err}); rewrite the shard") from err
    no_image = [k for k, e in samples.items() if "image" not in e and "cls" in e]
    no_label = [k for k, e in samples.items() if "image" in e and "cls" not in e]
    if no_image or no_label:
        raise ValueError(
            f"dataset 'wds': {path.name}: {len(no_image)} sample(s) without an image "
            f"({first_few(no_image) or '-'}) and {len(no_label)} without a .cls label ({first_few(no_label) or '-'}); "
            f"each sample needs KEY.{{{','.join(IMAGE_EXTENSIONS)}}} and KEY.cls"
        )
    return [(e["image"], e["cls"]) for e in samples.values() if "image" in e]


class TarMembers:
    """Loader ``Member -> PIL RGB``: seeks to the image bytes in its shard and decodes them.

    Open files are kept per process and dropped on pickling, so the loader works in loader workers.

    Args:
        shards: The shard files (``Member.shard`` indexes them).
    """

    def __init__(self, shards: Sequence[Path]) -> None:
        self.shards = [Path(s) for s in shards]
        self._files: dict[int, BinaryIO] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"shards": self.shards, "_files": {}}

    def read(self, m: Member) -> bytes:
        """The encoded image bytes of ``m``."""
        f = self._files.get(m.shard)
        if f is None:
            f = self._files[m.shard] = open(self.shards[m.shard], "rb")  # noqa: SIM115  (kept open for reuse)
        f.seek(m.offset)
        return f.read(m.size)

    def __call__(self, m: Member) -> Any:
        return decode_image_bytes(self.read(m), f"{self.shards[m.shard].name}:{m.key}")


def read_classes(root: Path, labels: Sequence[int]) -> list[str]:
    """``root/classes.txt`` (one name per line, blank lines skipped), else ``["0", "1", ...]``.

    Raises:
        ValueError: If a label has no name, or a name is repeated.
    """
    top = max(labels, default=-1)
    file = Path(root) / "classes.txt"
    if not file.is_file():
        return [str(i) for i in range(top + 1)]
    names = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset 'wds': {file} names a class more than once")
    if top >= len(names) or min(labels, default=0) < 0:
        raise ValueError(
            f"dataset 'wds': labels run from {min(labels, default=0)} to {top} but {file} names {len(names)} classes; "
            "labels must lie in 0..(number of lines - 1)"
        )
    return names


def _index(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[tuple[Member, int]]]]:
    files = shard_files(root)
    if not files:
        raise layout_not_found("wds", root, ["{train,validation,val,test}-*.tar"], WDS_LAYOUT)
    return files, {k: [s for i, f in enumerate(v) for s in index_shard(f, i)] for k, v in files.items()}


@register_dataset(
    "wds", "classification", WDS_LAYOUT + FEWSHOT_LAYOUT, kind_for_options=lambda options: fewshot_kind("wds", options)
)
def build_wds(
    root: Any,
    split: str,
    transform: Callable | None,
    *,
    seed: int,
    val_fraction: float,
    download: bool,
    split_seed: int = 0,
    class_splits: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
    class_fractions: Sequence[float] | None = None,
    stream: bool = False,
    shuffle_buffer: int = 1000,
) -> ImageDataset:
    """One split of a folder of WebDataset shards (see ``WDS_LAYOUT``), indexed for random access.

    ``stream`` and ``shuffle_buffer`` do not change the split: they make ``schane train`` read the training
    shards as a :class:`ShardStream` (see :func:`training_stream`).

    Raises:
        FileNotFoundError: If the root is missing or holds no shards.
        ValueError: On a malformed shard or label, labels without a class name, a split that is not stored,
            or malformed few-shot options.
    """
    if root is None or not Path(str(root)).expanduser().is_dir():
        raise FileNotFoundError(
            f"root {root} for dataset 'wds' is not a directory; set data.root to a folder laid out as:\n{WDS_LAYOUT}"
        )
    path = Path(str(root)).expanduser()
    fewshot = fewshot_kind("wds", {"class_splits": class_splits, "class_fractions": class_fractions}) == "fewshot"
    stored_test = shard_files(path).get("test")
    if split == "test" and not fewshot and stored_test and (path / "classes.txt").is_file():
        # the test split alone: with classes.txt the training shards need not be indexed (evaluation at scale)
        samples = [s for i, f in enumerate(stored_test) for s in index_shard(f, i)]
        names = read_classes(path, [lab for _, lab in samples])
        return ImageDataset([m for m, _ in samples], [lab for _, lab in samples], names, TarMembers(stored_test),
                            transform, "wds", "test")
    files, index = _index(path)
    parts: dict[str, ImageDataset] = {}
    names = read_classes(path, [lab for v in index.values() for _, lab in v])
    for stored, samples in index.items():
        key = split_key(stored)
        if key in parts:
            raise ValueError(f"dataset 'wds': {path} holds both validation-*.tar and val-*.tar shards; keep one")
        assert key is not None
        loader = TarMembers(files[stored])
        parts[key] = ImageDataset(
            [m for m, _ in samples], [lab for _, lab in samples], names, loader, transform, "wds", key
        )
    if "train" in parts:
        # one loader for the pooled few-shot set: members of other splits point into other shard lists
        for key, ds in parts.items():
            if key != "train":
                ds.samples = [_Pooled(key, m) for m in ds.samples]
        parts = {
            k: ImageDataset(ds.samples, ds.targets, names, _PooledLoader(files), transform, "wds", k)
            for k, ds in parts.items()
        }
    return pick_split(
        "wds",
        parts,
        split,
        str(path),
        seed=seed,
        val_fraction=val_fraction,
        class_splits=class_splits,
        class_fractions=class_fractions,
        split_seed=split_seed,
        root=path,
    )


@dataclass(frozen=True)
class _Pooled:
    part: str
    member: Member


class _PooledLoader:
    """Loader over every stored split's shards: a plain ``Member`` is a train member."""

    def __init__(self, files: Mapping[str, Sequence[Path]]) -> None:
        self.loaders = {split_key(k): TarMembers(v) for k, v in files.items()}

    def __call__(self, sample: Member | _Pooled) -> Any:
        if isinstance(sample, _Pooled):
            return self.loaders[sample.part](sample.member)
        return self.loaders["train"](sample)


# ---------------------------------------------------------------------------------------------------------
# The stream


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """Samples of ``root/{split}-*.tar`` read shard by shard: split across ranks and workers, shuffled, seeded.

    Each epoch the shard list is permuted with ``(seed, epoch)``; rank ``r`` of ``W`` takes shards
    ``r, r + W, ...`` of that order and loader worker ``k`` of ``K`` takes every ``K``-th of the rank's
    shards. Every sample then goes through a shuffle buffer of ``shuffle_buffer`` samples seeded with
    ``(seed, epoch, rank, worker)``, is decoded (:func:`~schane.data.base.decode_image_bytes`) and
    transformed under an RNG seeded with ``(seed, epoch, rank, worker, position)``. Each item is
    ``(transform(image), label, sample id)``; the id (``0..N-1``, the sample's place in the sorted shards)
    is the same in every epoch and process, and :meth:`key` names it.

    The epoch length is stated, from the index. Without a batch size (``set_epoch(e)``) every worker
    yields all samples of its shards: across ranks and workers each sample comes exactly once per epoch,
    and :meth:`rank_lengths` gives each rank's count. With ``set_epoch(e, batch_size=B)`` (what
    ``schane train`` does) every worker of every rank yields the same number of whole batches,
    ``min`` over ranks and workers of ``samples // B``, so DDP ranks take the same number of steps and a
    DataLoader takes batches from its workers in strict turn: :meth:`batches_per_epoch` is that count
    times the workers. The samples beyond it (less than a batch per worker plus the difference between the
    fullest and the emptiest worker) are not seen that epoch; the next epoch's permutation hands out other
    shards.

    Args:
        root: Folder of shards.
        split: Stored split name (``train``, ``validation``/``val``, ``test``).
        transform: Applied to each PIL RGB image (``None``: the PIL image).
        seed: Seed of shard order, shuffle buffer and transform.
        shuffle_buffer: Samples held for shuffling (0 or 1: shard order).
        rank: This process's rank (default: from ``torch.distributed`` when initialised, else 0).
        world_size: Number of ranks (default: likewise, else 1).

    Raises:
        FileNotFoundError: If there are no shards of ``split``.
        ValueError: On malformed shards (see :func:`index_shard`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        files = shard_files(self.root) if self.root.is_dir() else {}
        stored = [s for s in STORED_SPLITS if split_key(s) == split_key(split)] if split_key(split) else []
        self.shards = next((files[s] for s in stored if s in files), [])
        if not self.shards:
            raise FileNotFoundError(f"dataset 'wds': no {split}-*.tar shards in {self.root}; expected:\n{WDS_LAYOUT}")
        indexed = [index_shard(f, i) for i, f in enumerate(self.shards)]
        self.sizes = [len(v) for v in indexed]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._keys = [f"{self.shards[m.shard].name}:{m.key}" for v in indexed for m, _ in v]
        self.targets = [lab for v in indexed for _, lab in v]
        self.classes = read_classes(self.root, self.targets)
        self.transform = transform
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        r, w = _dist_rank_world()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        self.epoch = 0
        self.batches_done = 0
        self.batch_size: int | None = None

    def set_epoch(self, epoch: int, batches_done: int = 0, batch_size: int | None = None) -> None:
        """Start epoch ``epoch``; with ``batch_size``, in whole batches, after ``batches_done`` of them.

        Resume mid-epoch: the order is a pure function of ``(seed, epoch, world size, workers)``, so a
        resumed run replays the epoch's shards and drops, before decoding, what its workers already gave:
        the DataLoader took batches from its ``K`` workers in turn, so worker ``k`` skips
        ``batch_size * ceil((batches_done - k) / K)`` samples, and since a new DataLoader starts with its
        worker 0, loader worker ``j`` takes the part of worker ``(j + batches_done) mod K``. With the same seed, world size and number
        of workers the rest of the epoch is identical to an uninterrupted run (same images, order and views).

        Raises:
            ValueError: If ``batches_done`` is given without ``batch_size``, or either is negative.
        """
        if batches_done and batch_size is None:
            raise ValueError("resume a stream mid-epoch with set_epoch(epoch, batches_done, batch_size)")
        if batches_done < 0 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"batches_done must be >= 0 and batch_size >= 1, got {batches_done}, {batch_size}")
        self.epoch, self.batches_done, self.batch_size = int(epoch), int(batches_done), batch_size

    def key(self, sample_id: int) -> str:
        """``SHARD:KEY`` of a sample id."""
        return self._keys[int(sample_id)]

    def _order(self) -> list[int]:
        return random.Random(self.seed * 1_000_003 + self.epoch).sample(range(len(self.shards)), len(self.shards))

    def rank_shards(self, rank: int) -> list[int]:
        """The shard indices rank ``rank`` reads this epoch."""
        return self._order()[rank :: self.world_size]

    def rank_lengths(self) -> list[int]:
        """Samples each rank holds this epoch (all of them are yielded when no batch size is set)."""
        return [sum(self.sizes[i] for i in self.rank_shards(r)) for r in range(self.world_size)]

    def __len__(self) -> int:
        return self.rank_lengths()[self.rank]

    def _check_workers(self, num_workers: int) -> None:
        fewest = min(len(self.rank_shards(r)) for r in range(self.world_size))
        if fewest < max(1, num_workers):
            raise ValueError(
                f"dataset 'wds': {len(self.shards)} shard(s) over {self.world_size} rank(s) leave {fewest} shard(s) "
                f"on a rank but the loader has {num_workers} workers; write at least world size x workers shards "
                "(schane convert --shard-size) or use fewer workers"
            )

    def worker_shards(self, worker: int, num_workers: int, rank: int | None = None) -> list[int]:
        """The shard indices loader worker ``worker`` of ``num_workers`` reads on ``rank`` (default: this rank).

        Raises:
            ValueError: If a rank has fewer shards than workers (a worker would idle).
        """
        self._check_workers(num_workers)
        return self.rank_shards(self.rank if rank is None else rank)[worker :: max(1, num_workers)]

    def batches_per_worker(self, batch_size: int, num_workers: int) -> int:
        """Whole batches every worker of every rank yields this epoch (``min`` of ``samples // batch_size``).

        Raises:
            ValueError: If a rank has fewer shards than workers, or a worker's shards hold less than a batch.
        """
        k = max(1, num_workers)
        counts = [sum(self.sizes[i] for i in self.worker_shards(w, k, r)) for r in range(self.world_size) for w in range(k)]
        m = min(counts) // batch_size
        if m < 1:
            raise ValueError(
                f"dataset 'wds': a loader worker's shards hold {min(counts)} samples, less than one batch of "
                f"{batch_size} ({self.world_size} rank(s) x {k} worker(s) over {len(self.shards)} shards); lower "
                "data.batch_size or data.num_workers, or write more samples per shard"
            )
        return m

    def batches_per_epoch(self, batch_size: int, num_workers: int) -> int:
        """Batches one rank's DataLoader yields per epoch (:meth:`batches_per_worker` x workers).

        Raises:
            ValueError: As :meth:`batches_per_worker`.
        """
        return self.batches_per_worker(batch_size, num_workers) * max(1, num_workers)

    def _samples(self, shards: Sequence[int]) -> Iterator[tuple[bytes, int, int]]:
        for i in shards:
            pending: dict[str, dict[str, Any]] = {}
            position = 0
            with tarfile.open(self.shards[i], mode="r|") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_name(m.name)
                    if ext != "cls" and ext not in IMAGE_EXTENSIONS:
                        continue
                    f = tar.extractfile(m)
                    assert f is not None
                    entry = pending.setdefault(key, {})
                    if ext == "cls":
                        entry["cls"] = _parse_label(f.read(), f"{self.shards[i].name}:{m.name}")
                    elif "image" not in entry:
                        entry["image"] = f.read()
                    if "cls" in entry and "image" in entry:
                        del pending[key]
                        yield entry["image"], entry["cls"], self.starts[i] + position
                        position += 1

    def _shuffled(self, shards: Sequence[int], rng: random.Random) -> Iterator[tuple[bytes, int, int]]:
        buffer: list[tuple[bytes, int, int]] = []
        for item in self._samples(shards):
            if self.shuffle_buffer <= 1:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # a DataLoader takes its first batch from worker 0: after b batches, loader worker j plays the part
        # of worker (j + b) mod K of the uninterrupted epoch
        worker = (worker + self.batches_done) % workers
        rng = random.Random(sample_seed(self.seed, self.epoch, self.rank, worker))
        total, skip = None, 0
        if self.batch_size is not None:
            total = self.batches_per_worker(self.batch_size, workers) * self.batch_size
            skip = self.batch_size * max(0, -(-(self.batches_done - worker) // workers))
        for position, (data, label, sample_id) in enumerate(self._shuffled(self.worker_shards(worker, workers), rng)):
            if total is not None and position >= total:
                return
            if position < skip:
                continue
            img = decode_image_bytes(data, self.key(sample_id))
            if self.transform is not None:
                with seeded_rng(sample_seed(self.seed, self.epoch, self.rank, worker, position)):
                    img = self.transform(img)
            yield img, label, sample_id


def training_stream(data: Any, transform: Callable[[Any], Any], seed: int, rank: int, world_size: int) -> ShardStream | None:
    """The training stream of a run whose data is ``wds`` with the option ``stream: true``, else ``None``.

    Args:
        data: The run's data config (``name``, ``root``, ``options``, ``val_fraction``).
        transform: The training transform (two views).
        seed: The run's training seed.
        rank: This process's rank.
        world_size: Number of ranks.

    Raises:
        ValueError: If the option is not a boolean, or the validation hold-out would be drawn from the
            training shards (the stream reads whole shards and cannot leave held-out images out).
        FileNotFoundError: If there are no training shards.
    """
    options = getattr(data, "options", {}) or {}
    if str(getattr(data, "name", "")).lower() != "wds" or not options.get("stream", False):
        return None
    if not isinstance(options["stream"], bool):
        raise ValueError(f"data.options.stream must be true or false, got {options['stream']!r}")
    root = Path(str(data.root)).expanduser()
    stored = shard_files(root) if root.is_dir() else {}
    if data.val_fraction > 0 and not ({"validation", "val"} & set(stored)):
        raise ValueError(
            f"data.options.stream=true reads whole training shards, so the validation hold-out cannot be left out "
            f"of them: add validation-*.tar shards to {root}, or set data.val_fraction=0"
        )
    return ShardStream(root, "train", transform, seed=seed, shuffle_buffer=int(options.get("shuffle_buffer", 1000)),
                       rank=rank, world_size=world_size)
