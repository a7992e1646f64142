"""Shared building blocks for the dataset readers.

Every reader turns its on-disk layout into an :class:`ImageDataset`: a list of samples
(file paths or indices into an in-memory array), integer labels ``0..C-1`` and class
names. The helpers here do the parts all readers share: seeded validation hold-outs,
few-shot class splits, the bundled split files and error messages that name the
expected layout.
"""

from __future__ import annotations

import importlib.resources
import io
import math
import os
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

Transform = Callable[[Image.Image], Any]

CLASSIFICATION_SPLITS = ("train", "val", "test")
FEWSHOT_SPLITS = ("train", "val", "val_classes", "test_classes")


class CorruptImageError(ValueError):
    """An image file (or encoded image) could not be decoded."""


_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# Decoding cap, in pixels (width x height of the decoded image). A larger JPEG is decoded at 1/2, 1/4 or 1/8 of
# its size (JPEG's draft mode, almost free) until it fits; a larger image of any other format is refused with
# one line naming the file (PIL would allocate about 4 bytes per pixel, several times over while converting).
# Set the environment variable SCHANE_MAX_IMAGE_PIXELS to change it. Files past PIL's own bomb limit
# (2 x Image.MAX_IMAGE_PIXELS, about 179 megapixels) are refused before anything is decoded.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def max_image_pixels() -> int:
    """The decoding cap in pixels: ``$SCHANE_MAX_IMAGE_PIXELS`` when set, else :data:`MAX_IMAGE_PIXELS`."""
    env = os.environ.get("SCHANE_MAX_IMAGE_PIXELS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"SCHANE_MAX_IMAGE_PIXELS must be a whole number of pixels, got {env!r}") from None
        if value >= 1:
            return value
    return MAX_IMAGE_PIXELS


def _fit_to_cap(img: Image.Image) -> None:
    """Use draft mode to decode a JPEG above the pixel cap at a reduced size; refuse other formats above it.

    Raises:
        ValueError: when the image would still be above the cap.
    """
    cap = max_image_pixels()
    w, h = img.size
    if w * h <= cap:
        return
    if img.format == "JPEG":
        f = math.sqrt(w * h / cap)
        # draft picks the largest scale 1/s (s in 1, 2, 4, 8) whose size is >= the request; asking for 1/(2f)
        # gives s > f, so the decoded size is under the cap whenever s <= 8 suffices
        img.draft(img.mode, (max(1, int(w / (2 * f))), max(1, int(h / (2 * f)))))
        if img.size[0] * img.size[1] <= cap:
            return
    raise ValueError(f"{w}x{h} = {w * h / 1e6:.0f} megapixels is above the decoding cap of {cap / 1e6:.0f} "
                     "megapixels (set SCHANE_MAX_IMAGE_PIXELS to raise it, or downscale the file)")


def _scaled_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((arr.astype(np.float64) - lo) * scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image to 8-bit RGB with its real value range.

    PIL's ``convert("RGB")`` clips wide samples at 255 (16-bit and 32-bit integers turn white, floats in
    ``[0, 1]`` black). Instead:

    * 16-bit grayscale (modes ``I;16*``, as 16-bit PNGs and TIFFs open) maps ``0..65535`` to ``0..255`` by
      ``round(value / 257)`` (65535 -> 255, 32896 -> 128);
    * 32-bit integers (mode ``I``) are scaled by their maximum: ``[min(0, lowest), max(highest, 255)]`` maps to
      ``0..255`` (so 8-bit values stay as they are, and a 32-bit TIFF of 0..1000 spans the whole range);
    * floats (mode ``F``) in ``[0, 1]`` are read as ``0..1``; other floats by their range
      ``[min(0, lowest), max(highest, 1)]``; a float image holding NaN or inf is refused;
    * 16-bit RGB(A) PNGs already open as 8-bit RGB(A) in PIL; every other mode (1, L, P, LA, PA, RGBA, CMYK,
      YCbCr, LAB, HSV, ...) goes through ``convert("RGB")``.

    Args:
        img: A decoded image in any PIL mode.

    Returns:
        The image in RGB mode.

    Raises:
        ValueError: for a float image with NaN or inf, or a mode PIL cannot convert to RGB (the message names
            the mode).
    """
    if img.mode in _WIDE_INT_MODES:
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    elif img.mode == "I":
        arr = np.asarray(img)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 255.0)
        img = Image.fromarray(_scaled_to_uint8(arr, min(0.0, lo), max(hi, 255.0)))
    elif img.mode == "F":
        arr = np.asarray(img)
        if arr.size and not np.isfinite(arr).all():
            raise ValueError("a float image (mode F) holding NaN or inf values cannot be shown as RGB")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        img = Image.fromarray(_scaled_to_uint8(arr, min(0.0, lo), max(hi, 1.0)))
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"images of mode {img.mode} cannot be converted to RGB ({err})") from err


class _Refused(ValueError):
    """A readable image that is not decoded: above the pixel cap, or of a mode that cannot be shown as RGB."""


def _decode(img: Image.Image) -> Image.Image:
    try:
        _fit_to_cap(img)
        return to_rgb(img)
    except ValueError as err:
        raise _Refused(str(err)) from err


def _open(source: Any) -> Image.Image:
    with warnings.catch_warnings():  # between PIL's warning and error limits: the pixel cap decides, quietly
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                  MemoryError, struct.error, EOFError)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as PIL RGB with its real value range (see :func:`to_rgb`).

    Images above the pixel cap (:data:`MAX_IMAGE_PIXELS`) are decoded at reduced size when JPEG, refused otherwise.

    Args:
        path: Image file.

    Returns:
        The decoded image in RGB mode.

    Raises:
        FileNotFoundError: If the file does not exist.
        CorruptImageError: If the file is not a readable image, is a decompression bomb, is above the pixel cap,
            or has a mode that cannot be shown as RGB (the message names the file).
    """
    try:
        with _open(path) as img:
            return _decode(img)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"image file {path} does not exist; check the dataset root and its layout"
        ) from None
    except Image.DecompressionBombError as err:
        raise CorruptImageError(f"image file {path} is refused as a decompression bomb ({err}); remove it or "
                                "downscale it") from err
    except _Refused as err:
        raise CorruptImageError(f"image file {path}: {err}") from err
    except _DECODE_ERRORS as err:
        raise CorruptImageError(
            f"cannot decode image file {path} ({err}); the file is corrupt or not an image: re-extract or remove it"
        ) from err


# An npz member that expands more than NPZ_MAX_RATIO times, to more than NPZ_MAX_RATIO_FROM bytes, is refused:
# image data deflates about 1-3x, so only a crafted (or corrupt) file goes past it.
NPZ_MAX_RATIO = 100
NPZ_MAX_RATIO_FROM = 64 * 2**20


def npz_member_header(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` of an ``.npz``, read from its ``.npy`` header without reading the data.

    The header is checked against the zip entry: the data it announces must be what the entry holds once
    uncompressed, so a small file cannot make the reader allocate more than the shape says, and a check of the
    shape before :func:`numpy.load` bounds what is read.

    Raises:
        ValueError: when the file is not an npz, lacks ``key``, the header is malformed, holds Python objects,
            or announces more or less data than the entry holds (the message names the file).
    """
    import zipfile

    name = f"{key}.npy"
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise ValueError(f"{path} has no array {key!r} (it holds {', '.join(zf.namelist()[:5])})") from None
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _fortran, dtype = read(f, max_header_size=10000)
                offset = f.tell()
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(str(path)):
            raise
        raise ValueError(f"cannot read the header of array {key!r} in {path} ({err}); the file is corrupt or not "
                         "an npz") from err
    if dtype.hasobject:
        raise ValueError(f"{path}: array {key!r} holds Python objects; only numeric arrays are read")
    if info.file_size > NPZ_MAX_RATIO_FROM and info.file_size > NPZ_MAX_RATIO * max(info.compress_size, 1):
        raise ValueError(f"{path}: array {key!r} ({shape} of {dtype}) expands {info.compress_size} compressed bytes "
                         f"to {info.file_size}, over {NPZ_MAX_RATIO}x; refused as a zip bomb (or a corrupt file)")
    need = offset + math.prod(shape) * dtype.itemsize
    if info.file_size != need:
        raise ValueError(f"{path}: array {key!r} announces shape {shape} of {dtype} ({need} bytes with its header) "
                         f"but its zip entry holds {info.file_size} bytes; the file is corrupt")
    return tuple(int(n) for n in shape), dtype


def decode_image_bytes(data: bytes, what: str) -> Image.Image:
    """Decode an encoded image (PNG/JPEG bytes) to PIL RGB; ``what`` names it in errors.

    Raises:
        CorruptImageError: If the bytes are not a readable image.
    """
    try:
        with _open(io.BytesIO(data)) as img:
            return _decode(img)
    except _Refused as err:
        raise CorruptImageError(f"{what}: {err}") from err
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"cannot decode {what} ({err}); the file is corrupt: re-extract it") from err


def array_to_image(arr: np.ndarray, bgr: bool = False) -> Image.Image:
    """Convert a uint8 array ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` to PIL RGB.

    Args:
        arr: The image array.
        bgr: The three channels are stored blue, green, red (OpenCV's order); they are reversed.

    Returns:
        The image in RGB mode.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif bgr and arr.ndim == 3:
        arr = np.ascontiguousarray(arr[:, :, ::-1])
    return Image.fromarray(arr.astype(np.uint8, copy=False)).convert("RGB")


class ArrayLoader:
    """Loader for in-memory images: ``loader(i)`` is image ``i`` of ``data`` as PIL RGB.

    A class rather than a closure so that datasets stay picklable for DataLoader workers.

    Args:
        data: Images ``uint8 [N, H, W]``, ``[N, H, W, 1]`` or ``[N, H, W, 3]`` (anything indexable).
        bgr: Channels are stored in OpenCV's blue-green-red order and are flipped to RGB.
    """

    def __init__(self, data: Any, bgr: bool = False) -> None:
        self.data = data
        self.bgr = bgr

    def __call__(self, index: int) -> Image.Image:
        return array_to_image(self.data[index], self.bgr)


class ImageDataset(Dataset):
    """A labelled image dataset: ``ds[i] -> (transform(PIL RGB image), label)``.

    Args:
        samples: One entry per image, passed to ``loader`` (a path, an index into an array, ...).
        targets: Integer label per sample, in ``0..len(classes)-1``.
        classes: Class names; ``classes[label]`` names a label.
        loader: Turns a sample entry into a PIL RGB image.
        transform: Applied to the PIL image (``None`` returns the PIL image).
        name: Dataset name (for ``repr``).
        split: Split name (for ``repr``).

    Raises:
        ValueError: If lengths differ or a label is out of range.
    """

    def __init__(
        self,
        samples: Sequence[Any],
        targets: Sequence[int],
        classes: Sequence[str],
        loader: Callable[[Any], Image.Image],
        transform: Transform | None = None,
        name: str = "",
        split: str = "",
    ) -> None:
        if len(samples) != len(targets):
            raise ValueError(f"{len(samples)} samples but {len(targets)} targets; they must match one to one")
        self.samples = list(samples)
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = [str(c) for c in classes]
        if self.targets and (min(self.targets) < 0 or max(self.targets) >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1} (one per class name)")
        self.loader = loader
        self.transform = transform
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.loader(self.samples[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, images={len(self)}, "
            f"classes={len(self.classes)})"
        )

    def subset(
        self, indices: Sequence[int], *, split: str | None = None, relabel: bool = False
    ) -> ImageDataset:
        """A new dataset with only ``indices`` (labels remapped to ``0..C'-1`` when ``relabel``)."""
        samples = [self.samples[i] for i in indices]
        targets = [self.targets[i] for i in indices]
        classes = self.classes
        if relabel:
            kept = sorted(set(targets))
            remap = {old: new for new, old in enumerate(kept)}
            targets = [remap[t] for t in targets]
            classes = [self.classes[k] for k in kept]
        return ImageDataset(
            samples, targets, classes, self.loader, self.transform, self.name, split or self.split
        )


# ---------------------------------------------------------------------------------------------------------
# Validation and errors


def check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    """Raise a ValueError naming the allowed splits when ``split`` is not one of them."""
    if split not in allowed:
        raise ValueError(f"dataset {name!r} has splits {tuple(allowed)}; got split={split!r}")


def check_val_fraction(val_fraction: float) -> None:
    """Raise a ValueError unless ``0 <= val_fraction < 1``."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def require_root(name: str, root: str | os.PathLike | None, layout: str) -> Path:
    """Return ``root`` as a Path, or raise FileNotFoundError showing the expected layout.

    Raises:
        FileNotFoundError: If ``root`` is None or not an existing directory.
    """
    if root is None:
        raise FileNotFoundError(
            f"dataset {name!r} needs a root directory: pass root=... (data.root in a config). Expected layout:\n{layout}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"root {path} for dataset {name!r} is not a directory; set root=... (data.root) to the folder laid "
            f"out as:\n{layout}"
        )
    return path


def require_file(name: str, path: Path, layout: str, hint: str = "") -> Path:
    """Return ``path`` if it exists, else raise FileNotFoundError showing the expected layout."""
    if not path.exists():
        extra = f" {hint}" if hint else ""
        raise FileNotFoundError(
            f"dataset {name!r}: {path} not found.{extra} Set root=... (data.root) to the folder laid out as:\n{layout}"
        )
    return path


def folder_listing(path: Path, limit: int = 20) -> str:
    """The first ``limit`` entries of ``path`` (folders end with ``/``) for error messages."""
    try:
        entries = sorted(path.iterdir(), key=lambda p: p.name)
    except OSError:
        return "(cannot list the folder)"
    if not entries:
        return "(the folder is empty)"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    more = f", ... ({len(entries)} entries in all)" if len(entries) > limit else ""
    return ", ".join(names) + more


def layout_not_found(
    name: str, root: Path, tried: Sequence[str], layout: str, part: str | None = None
) -> FileNotFoundError:
    """A FileNotFoundError listing what ``root`` holds, the layouts tried and the expected layout.

    Args:
        name: Dataset name.
        root: The folder that was searched.
        tried: One line per layout that was looked for.
        layout: The dataset's full layout description.
        part: The split part (``train``/``val``/``test``) that was looked for, if any.

    Returns:
        The error (for the caller to raise).
    """
    what = f" for the {part} part" if part else ""
    lines = "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
    return FileNotFoundError(
        f"dataset {name!r}: no known layout found under {root}{what}; set data.root to a folder in one of the "
        f"layouts below.\nFound: {folder_listing(root)}\n"
        f"Layouts tried:\n{lines}\nExpected layout:\n{layout}"
    )


def first_few(items: Sequence[Any], limit: int = 5) -> str:
    """``a, b, c, ... (N in all)``: the first ``limit`` items of a list of offenders."""
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def check_classes_present(name: str, wanted: Sequence[str], available: Sequence[str], where: str) -> None:
    """Raise a ValueError naming every class in ``wanted`` that is absent from ``available``."""
    have = set(available)
    missing = [c for c in wanted if c not in have]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise ValueError(
            f"dataset {name!r}: {len(missing)} listed class(es) missing from {where}: {shown}. "
            "Check that root points at the complete dataset."
        )


def check_no_empty_class(name: str, targets: Sequence[int], classes: Sequence[str], where: str) -> None:
    """Raise a ValueError naming classes with no images."""
    counts = (
        np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(classes))
        if len(targets)
        else np.zeros(len(classes), dtype=np.int64)
    )
    empty = [classes[int(i)] for i in np.flatnonzero(counts == 0)]
    if empty:
        shown = ", ".join(empty[:20]) + (f", ... ({len(empty)} in all)" if len(empty) > 20 else "")
        raise ValueError(
            f"dataset {name!r}: class(es) with no images in {where}: {shown}. Remove them or add images."
        )


# ---------------------------------------------------------------------------------------------------------
# Splits


def holdout_indices(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, per-class (stratified) hold-out of ``val_fraction`` of each class.

    Each class with ``n >= 2`` images gives ``max(1, round(val_fraction * n))`` images to the
    hold-out (never all of them); a class with one image stays in train. ``val_fraction=0``
    gives an empty hold-out.

    Args:
        targets: Label per sample.
        val_fraction: Fraction of each class to hold out, in ``[0, 1)``.
        seed: Seed of the permutation.

    Returns:
        ``(train_indices, val_indices)``, both sorted.

    Raises:
        ValueError: If ``val_fraction`` is outside ``[0, 1)``.
    """
    check_val_fraction(val_fraction)
    targets_arr = np.asarray(targets, dtype=np.int64)
    if val_fraction == 0 or targets_arr.size == 0:
        return list(range(len(targets_arr))), []
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(targets_arr):
        idx = np.flatnonzero(targets_arr == c)
        if idx.size < 2:
            continue
        k = min(idx.size - 1, max(1, int(round(val_fraction * idx.size))))
        val.extend(rng.permutation(idx)[:k].tolist())
    val_set = set(val)
    train = [i for i in range(len(targets_arr)) if i not in val_set]
    return train, sorted(val)


def classification_split(
    train_full: ImageDataset, test: ImageDataset | None, split: str, val_fraction: float, seed: int
) -> ImageDataset:
    """Pick ``train``/``val`` (seeded hold-out of the official train) or ``test`` (official test).

    Raises:
        ValueError: If ``split`` is unknown or a class of the training set has no images.
    """
    check_split(train_full.name, split, CLASSIFICATION_SPLITS)
    if split == "test":
        if test is None:
            raise ValueError(f"dataset {train_full.name!r} has no test split")
        test.split = "test"
        return test
    check_no_empty_class(train_full.name, train_full.targets, train_full.classes, "the training split")
    tr, va = holdout_indices(train_full.targets, val_fraction, seed)
    return train_full.subset(tr if split == "train" else va, split=split)


def fewshot_split(
    pooled: ImageDataset,
    class_lists: Mapping[str, Sequence[str]],
    split: str,
    val_fraction: float,
    seed: int,
    where: str,
) -> ImageDataset:
    """Build a few-shot split from all images of all classes.

    Args:
        pooled: Every image of every class (labels index ``pooled.classes``).
        class_lists: ``{"train": [...], "val": [...], "test": [...]}`` class names per split.
        split: ``train``/``val`` (base classes, seeded hold-out), ``val_classes``, ``test_classes``.
        val_fraction: Hold-out fraction of the base-class images for ``val``.
        seed: Hold-out seed.
        where: Description of the data for error messages.

    Returns:
        The split, labels ``0..C-1`` in the order of its class list.

    Raises:
        ValueError: If the split is unknown, the class lists overlap, a listed class is missing
            or has no images.
    """
    check_split(pooled.name, split, FEWSHOT_SPLITS)
    seen: dict[str, str] = {}
    for part, names in class_lists.items():
        for c in names:
            if c in seen and seen[c] != part:
                raise ValueError(
                    f"dataset {pooled.name!r}: class {c!r} is in both the {seen[c]} and {part} lists"
                )
            seen[c] = part
    part = {"train": "train", "val": "train", "val_classes": "val", "test_classes": "test"}[split]
    names = list(class_lists[part])
    check_classes_present(pooled.name, names, pooled.classes, where)
    pos = {c: i for i, c in enumerate(pooled.classes)}
    remap = {pos[c]: i for i, c in enumerate(names)}
    idx = [i for i, t in enumerate(pooled.targets) if t in remap]
    ds = ImageDataset(
        [pooled.samples[i] for i in idx],
        [remap[pooled.targets[i]] for i in idx],
        names,
        pooled.loader,
        pooled.transform,
        pooled.name,
        split,
    )
    check_no_empty_class(pooled.name, ds.targets, ds.classes, where)
    if split in ("train", "val"):
        tr, va = holdout_indices(ds.targets, val_fraction, seed)
        ds = ds.subset(tr if split == "train" else va, split=split)
    return ds


def check_fewshot_capacity(
    name: str,
    split: str,
    targets: Sequence[int],
    classes: Sequence[str],
    ways: int,
    shots: int,
    queries: int,
) -> None:
    """Check that a few-shot split can hold ``ways``-way episodes of ``shots + queries`` images a class.

    Run before any training, so that a split too small for the episodes is named at once (by class
    name) rather than after the base-class fine-tuning.

    Args:
        name: Dataset name (for messages).
        split: The split's name (``val_classes``, ``test_classes``).
        targets: ``[M]`` label of every image of the split, in ``0..len(classes)-1``.
        classes: The split's class names.
        ways: Classes per episode.
        shots: The largest number of support images per class.
        queries: Query images per class.

    Raises:
        ValueError: If the split has fewer than ``ways`` classes, or a class has fewer than
            ``shots + queries`` images (the first few are named with their counts).
    """
    counts = (
        np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(classes))
        if len(targets)
        else (np.zeros(len(classes), dtype=np.int64))
    )
    present = int(np.count_nonzero(counts))
    if present < ways:
        raise ValueError(
            f"dataset {name!r}: {split} has {present} class(es) ({first_few(list(classes))}) but {ways}-way episodes "
            f"need at least {ways}: lower fewshot.ways to at most {present}, or give {split} more classes "
            "(data.options.class_splits / class_fractions for your own data)"
        )
    need = shots + queries
    short = [f"{classes[i]} ({int(n)})" for i, n in enumerate(counts) if n < need]
    if short:
        raise ValueError(
            f"dataset {name!r}: {len(short)} class(es) of {split} have fewer than shots + queries = {shots} + "
            f"{queries} = {need} images: {first_few(short)}; lower fewshot.queries or fewshot.shots, or add images "
            "(or move those classes out of the validation/novel lists)"
        )


# ---------------------------------------------------------------------------------------------------------
# Bundled split files


def split_path(*parts: str) -> Any:
    """A Traversable for a file under the package's ``splits/`` directory."""
    return importlib.resources.files("schane.data").joinpath("splits", *parts)


def read_split_lines(*parts: str) -> list[str]:
    """Non-empty, stripped lines of a bundled split file, e.g. ``read_split_lines("cifar_fs", "train.txt")``."""
    text = split_path(*parts).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted, hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS
    )


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def class_folders_dataset(
    name: str, folder: Path, names: Sequence[str], transform: Transform | None
) -> ImageDataset:
    """Images in ``folder/<class name>/*`` for the classes ``names`` (labels in the order of ``names``).

    Raises:
        ValueError: If a listed class has no folder under ``folder``.
    """
    present = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    check_classes_present(name, names, present, str(folder))
    samples: list[Path] = []
    targets: list[int] = []
    for label, c in enumerate(names):
        files = list_image_files(folder / c)
        samples.extend(files)
        targets.extend([label] * len(files))
    return ImageDataset(samples, targets, names, load_image, transform, name)


FEWSHOT_PART = {"train": "train", "val": "train", "val_classes": "val", "test_classes": "test"}
"""The class list (part) each few-shot split draws from: base-class splits use ``train``."""
