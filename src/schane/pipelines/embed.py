"""``schane embed``: the pooled features (or the contrastive projections) of a trained model for a folder of
images or a split of the run's dataset, with paths and labels, for retrieval and clustering.

Output: ``FILE.npy`` (``float32 [N, D]``, row i = image i) + ``FILE.csv`` (``path,label,class`` per row; label and
class empty for a plain folder), or one ``FILE.parquet`` (columns ``path``, ``label``, ``class``, ``embedding``)
when pyarrow is installed. Unreadable images are skipped and listed in ``FILE.skipped.csv``.

Examples:
    >>> result = embed_images("runs/x/best.pt", "photos/", out="photos_emb.npy")  # doctest: +SKIP
    >>> result = embed_images("runs/x/best.pt", split="test", out="test_emb.parquet")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schane.engine.device import resolve_amp
from schane.pipelines.runs import load_for_evaluation
from schane.pipelines.splits import dataset_splits, eval_transform_for, load_split
from schane.pipelines.user_images import ReadableImages, find_images, forward_images, write_skipped

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = ("", ".npy", ".parquet")


@dataclass
class EmbedResult:
    """What :func:`embed_images` wrote.

    Attributes:
        files: the output files (``.npy`` + ``.csv``, or ``.parquet``).
        n: rows written (images embedded).
        dim: embedding size.
        kind: ``"features"`` (pooled backbone features) or ``"projections"`` (unit-norm contrastive embeddings).
        skipped: images that could not be read, as ``(path, reason)``.
        skipped_file: the CSV listing them, or ``None``.
    """

    files: list[Path]
    n: int
    dim: int
    kind: str
    skipped: list[tuple[str, str]]
    skipped_file: Path | None


def output_paths(out: str | Path) -> tuple[Path, str]:
    """``(base path without suffix, format)`` of an output file name: ``"npy"`` (``.npy`` or no suffix) or
    ``"parquet"``.

    Raises:
        ValueError: for another suffix, or a parquet file without pyarrow installed.
    """
    p = Path(out).expanduser()
    suffix = p.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {p}: expected a .npy file (written with a .csv beside it) or a .parquet file")
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(f"--out {p}: writing parquet needs pyarrow (pip install 'schane[data]'); or pass a .npy file "
                             "(a .csv of paths and labels is written beside it)") from None
    if p.exists() and p.is_dir():
        raise ValueError(f"--out {p} is a folder; pass a file name such as {p / 'embeddings.npy'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder of --out {p} ({e.strerror or e}); pass a path you can write") from None
    return p.parent / (p.name[: len(p.name) - len(suffix)]), "parquet" if suffix == ".parquet" else "npy"


def _source(cfg: Any, data: str | Path | None, split: str | None) -> tuple[Any, list[str], list[int] | None,
                                                                         list[str] | None]:
    """``(images for ReadableImages, a name per image, labels or None, class names or None)``."""
    if split is None:
        assert data is not None  # embed() asks for a folder or a split
        paths = find_images(data)
        return paths, [str(p) for p in paths], None, None
    splits = dataset_splits(cfg)
    if split not in splits:
        raise ValueError(f"dataset {cfg.data.name!r} has no split {split!r}; choose one of {', '.join(splits)}")
    base = load_split(cfg, split)
    if len(base) == 0:
        raise ValueError(f"split {split!r} of {cfg.data.name!r} has no images")
    samples = getattr(base, "samples", None)
    names = [str(s) if isinstance(s, (str, Path)) else f"{cfg.data.name}/{split}/{i}"
             for i, s in enumerate(samples if samples is not None else range(len(base)))]
    return base, names, [int(t) for t in base.targets], [str(c) for c in base.classes]


def embed_images(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    out: str | Path,
    split: str | None = None,
    projections: bool = False,
    overrides: Sequence[str] | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed images with a trained model: a folder of images (no labels), or a split of the run's dataset.

    The images go through the run's evaluation transform (:func:`~schane.pipelines.splits.eval_transform_for`),
    in batches of ``data.eval_batch_size`` with ``data.num_workers`` workers, under ``train.amp``.

    Args:
        checkpoint: a ``best.pt``/``last.pt`` written by ``schane train``.
        data: without ``split``, a folder walked recursively for image files (or one image file); with ``split``,
            the dataset's root (default: the checkpoint's ``data.root``).
        out: ``.npy`` (a ``.csv`` of ``path,label,class`` is written beside it) or ``.parquet``.
        split: a split of the checkpoint's dataset (``train``, ``val``, ``test``, ``val_classes``, ...); its labels
            and class names fill the ``label`` and ``class`` columns.
        projections: write the unit-norm projections ``[N, proj_dim]`` instead of the pooled features ``[N, d]``.
        overrides: config overrides (``data.eval_batch_size=64``, ``train.device=cpu``, ...).
        progress: show progress.

    Returns:
        An :class:`EmbedResult`.

    Raises:
        FileNotFoundError: when the checkpoint or the folder is missing.
        ValueError: on a corrupt checkpoint, an empty folder, an unknown split, an unusable output path, or when
            no image could be read.
    """

    if split is None and data is None:
        raise ValueError("pass --data FOLDER (a folder of images) or --split SPLIT (a split of the checkpoint's "
                         "dataset, --data then being its root)")
    base, fmt = output_paths(out)
    root = [f"data.root={data}"] if split is not None and data is not None else []
    loaded = load_for_evaluation(checkpoint, [*(overrides or []), *root])
    cfg = loaded.cfg
    source, names, labels, classes = _source(cfg, data, split)
    images = ReadableImages(source, eval_transform_for(cfg, loaded.model))
    kind = "projections" if projections else "features"
    rows: list[int] = []
    chunks: list[np.ndarray] = []
    skipped: list[tuple[int, str]] = []
    for idx, o in forward_images(loaded.model, images, skipped, batch_size=cfg.data.eval_batch_size,
                                 device=loaded.device, amp_dtype=resolve_amp(cfg.train.amp, loaded.device),
                                 num_workers=cfg.data.num_workers, progress=progress, desc=f"embed ({kind})"):
        rows += idx
        chunks.append((o.projections if projections else o.features).float().cpu().numpy())
    if not rows:
        write_skipped(skipped, names, _with(base, ".skipped.csv"))
        raise ValueError(f"none of the {len(names)} images could be read (first: {skipped[0][1]}); "
                         f"they are listed in {base}.skipped.csv")
    emb = np.concatenate(chunks).astype(np.float32, copy=False)
    meta: list[tuple[str, int | str, str]]
    if classes is not None:
        assert labels is not None  # _source gives class names only with labels
        meta = [(names[i], labels[i], classes[labels[i]]) for i in rows]
    else:
        meta = [(names[i], "" if labels is None else labels[i], "") for i in rows]
    files = _write(base, fmt, emb, meta)
    skipped_file = write_skipped(skipped, names, _with(base, ".skipped.csv"))
    logger.info("embedded %d images (%s, %d dims) into %s", len(rows), kind, emb.shape[1],
                ", ".join(str(f) for f in files))
    return EmbedResult(files, len(rows), int(emb.shape[1]), kind, [(names[i], why) for i, why in sorted(skipped)],
                       skipped_file)


def _with(base: Path, suffix: str) -> Path:
    return base.parent / (base.name + suffix)


def _write(base: Path, fmt: str, emb: np.ndarray, meta: list[tuple[str, Any, str]]) -> list[Path]:
    """Write ``emb[N, D]`` and one ``(path, label, class)`` row per embedding."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        n, d = emb.shape
        table = pa.table({
            "path": pa.array([m[0] for m in meta], pa.string()),
            "label": pa.array([None if m[1] == "" else int(m[1]) for m in meta], pa.int64()),
            "class": pa.array([m[2] or None for m in meta], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), d),
        })
        path = _with(base, ".parquet")
        pq.write_table(table, path)
        return [path]
    npy, table_csv = _with(base, ".npy"), _with(base, ".csv")
    np.save(npy, emb)
    with table_csv.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "class"])
        w.writerows(meta)
    return [npy, table_csv]


__all__ = ["EmbedResult", "embed_images", "output_paths"]
