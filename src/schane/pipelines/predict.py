"""``schane predict``: the top-k classes of a trained model, with their probabilities, for a folder of images.

Output: a CSV with one row per readable image, ``path`` then ``top1_class, top1_index, top1_prob, ...,
topK_prob`` (softmax probabilities of the classifier). Unreadable images are skipped and listed in
``OUT.skipped.csv`` (``predictions.csv`` → ``predictions.skipped.csv``).

Examples:
    >>> result = predict_images("runs/x/best.pt", "new_photos/", "predictions.csv", topk=3)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from schane.engine.device import resolve_amp
from schane.pipelines.runs import load_for_evaluation
from schane.pipelines.splits import eval_transform_for
from schane.pipelines.user_images import ReadableImages, find_images, forward_images, write_skipped

logger = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """What :func:`predict_images` wrote.

    Attributes:
        out: the predictions CSV.
        n: images predicted (rows).
        topk: classes per row.
        skipped: images that could not be read, as ``(path, reason)``.
        skipped_file: the CSV listing them, or ``None``.
    """

    out: Path
    n: int
    topk: int
    skipped: list[tuple[str, str]]
    skipped_file: Path | None


def _out_path(out: str | Path) -> Path:
    p = Path(out).expanduser()
    if p.suffix.lower() != ".csv":
        raise ValueError(f"--out {p}: expected a .csv file name, e.g. predictions.csv")
    if p.is_dir():
        raise ValueError(f"--out {p} is a folder; pass a file name such as {p / 'predictions.csv'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder of --out {p} ({e.strerror or e}); pass a path you can write") from None
    return p


def predict_images(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    topk: int = 5,
    overrides: Sequence[str] | None = None,
    progress: bool = True,
) -> PredictResult:
    """Classify every image under a folder (walked recursively) with a trained model.

    The images go through the run's evaluation transform, in batches of ``data.eval_batch_size``.

    Args:
        checkpoint: a ``best.pt``/``last.pt`` written by ``schane train``.
        images: a folder of images (or one image file).
        out: the CSV to write.
        topk: classes per image (at most the number of classes).
        overrides: config overrides (``data.eval_batch_size=64``, ``train.device=cpu``, ...).
        progress: show progress.

    Returns:
        A :class:`PredictResult`.

    Raises:
        FileNotFoundError: when the checkpoint or the folder is missing.
        ValueError: on a corrupt checkpoint, an empty folder, ``topk < 1``, an unusable output path, or when no
            image could be read.
    """

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"--topk must be a positive integer, got {topk!r}")
    path = _out_path(out)
    loaded = load_for_evaluation(checkpoint, overrides)
    cfg = loaded.cfg
    files = find_images(images)
    names = [str(p) for p in files]
    k = min(topk, loaded.num_classes)
    if k < topk:
        logger.info("the model has %d classes: writing the top %d", loaded.num_classes, k)
    classes = loaded.class_names
    if classes is None:
        logger.warning("%s stores no class names (written by schane < 0.2): the class columns hold label indices",
                       checkpoint)
        classes = [str(i) for i in range(loaded.num_classes)]
    skipped: list[tuple[int, str]] = []
    skipped_path = path.parent / (path.stem + ".skipped.csv")
    header = ["path", *[f"top{r}_{c}" for r in range(1, k + 1) for c in ("class", "index", "prob")]]
    n = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for idx, o in forward_images(loaded.model, ReadableImages(files, eval_transform_for(cfg, loaded.model)),
                                     skipped, batch_size=cfg.data.eval_batch_size, device=loaded.device,
                                     amp_dtype=resolve_amp(cfg.train.amp, loaded.device),
                                     num_workers=cfg.data.num_workers, progress=progress, desc="predict"):
            prob, top = o.logits.float().softmax(dim=-1).topk(k, dim=-1)
            for i, p_row, t_row in zip(idx, prob.tolist(), top.tolist(), strict=True):
                w.writerow([names[i], *[v for c, p in zip(t_row, p_row, strict=True)
                                        for v in (classes[c], c, f"{p:.6f}")]])
            n += len(idx)
    if n == 0:
        path.unlink(missing_ok=True)
        write_skipped(skipped, names, skipped_path)
        raise ValueError(f"none of the {len(names)} images could be read (first: {skipped[0][1]}); "
                         f"they are listed in {skipped_path}")
    skipped_file = write_skipped(skipped, names, skipped_path)
    logger.info("predicted %d images (top %d) into %s", n, k, path)
    return PredictResult(path, n, k, [(names[i], why) for i, why in sorted(skipped)], skipped_file)


__all__ = ["PredictResult", "predict_images"]
