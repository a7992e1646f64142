"""Images a user hands over (``schane embed``, ``schane predict``): found, read, run through a model, the
unreadable ones skipped and listed.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from schane.data.base import IMG_EXTENSIONS, CorruptImageError, load_image
from schane.engine.device import autocast, uses_channels_last
from schane.progress import progress as _progress

logger = logging.getLogger(__name__)


def find_images(path: str | Path) -> list[Path]:
    """The image files under a folder (walked recursively, sorted, hidden files and folders skipped), or the
    file itself when ``path`` is one image.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when it holds no image file (the accepted extensions are named).
    """

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass a folder of images (or one image file)")
    if root.is_file():
        if root.suffix.lower() not in IMG_EXTENSIONS:
            raise ValueError(f"{root} is not an image file (expected one of {', '.join(IMG_EXTENSIONS)})")
        return [root]
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in {root} or its subfolders; "
                         "pass a folder that holds images")
    return files


class ReadableImages(Dataset):
    """Images under a transform, where an unreadable image is an item that says so instead of an exception.

    Items are ``(index, image[3, H, W] | None, reason)``: the image is ``None`` and ``reason`` the error when
    the file cannot be read or decoded, so that a long run skips it rather than stopping.

    Args:
        source: image paths, or a dataset yielding ``(PIL image, label)`` (a split loaded without a transform).
        transform: applied to each PIL RGB image.
    """

    def __init__(self, source: Sequence[Path] | Dataset, transform: Any) -> None:
        self.source = source
        self.transform = transform
        self._paths = isinstance(source, (list, tuple))

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:

        try:
            img = (load_image(cast(Sequence[Path], self.source)[i]) if self._paths  # a list or tuple of paths
                   else cast(Dataset, self.source)[i][0])
        except (CorruptImageError, OSError) as e:  # undecodable, missing or unreadable (permissions, I/O error)
            return i, None, str(e)
        return i, self.transform(img), ""


def _collate_readable(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None,
                                                                                    list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    return [i for i, _ in good], torch.stack([x for _, x in good]) if good else None, bad


@torch.no_grad()
def forward_images(
    model: nn.Module,
    images: ReadableImages,
    skipped: list[tuple[int, str]],
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "images",
) -> Iterator[tuple[list[int], Any]]:
    """Run ``model`` over ``images`` in batches, in order; unreadable images are appended to ``skipped``.

    Inputs are channels-last when the model's convolutions are stored so (:func:`prepare_for_inference`).

    Args:
        model: an :class:`~schane.models.SCHaNeModel` (put in eval mode and on ``device``).
        images: the images (:class:`ReadableImages`).
        skipped: receives ``(index, reason)`` for each image that could not be read.
        batch_size: images per forward pass.
        device: where the model runs.
        amp_dtype: autocast dtype, or ``None`` for fp32.
        num_workers: DataLoader workers.
        progress: show progress (a bar on a terminal, a few log lines otherwise).
        desc: label of the progress output.

    Yields:
        ``(indices, output)``: the indices into ``images`` of a batch's readable images and the model's
        :class:`~schane.models.ModelOutput` for them (``logits[b, C]``, ``features[b, d]``, ``projections[b, p]``).
    """

    model = model.to(device).eval()
    channels_last = uses_channels_last(model)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_readable)
    for idx, x, bad in _progress(loader, desc=desc, enabled=progress, log=True):
        for i, why in bad:
            (logger.warning if len(skipped) < 10 else logger.debug)("skipping an unreadable image: %s", why)
            skipped.append((i, why))
        if x is None:
            continue
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            out = model(x)
        yield idx, out


def write_skipped(skipped: Sequence[tuple[int, str]], names: Sequence[str], path: Path) -> Path | None:
    """List the skipped images in ``path`` (CSV ``path,reason``); remove a stale list when none was skipped.

    Args:
        skipped: ``(index, reason)`` pairs (:func:`forward_images`).
        names: the path (or name) of each image, by index.
        path: the CSV to write.

    Returns:
        ``path`` when something was skipped, else ``None``.
    """
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows([names[i], why] for i, why in sorted(skipped))
    logger.warning("%d unreadable image(s) were skipped; they are listed in %s", len(skipped), path)
    return path


__all__ = [
    "ReadableImages",
    "find_images",
    "forward_images",
    "write_skipped",
]
