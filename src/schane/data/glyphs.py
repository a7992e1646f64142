"""``glyphs``: an Omniglot-like few-shot set rendered from the TrueType fonts matplotlib ships.

A class is one Unicode character; its samples are that character drawn in each of the 16
text fonts (DejaVu Sans / Sans Mono / Serif and STIX General, four styles each) that has a
glyph for it, each with a small random affine distortion and pixel noise. Grayscale (dark
strokes on white) is returned as RGB.

Which characters become classes (fixed for a given matplotlib font set):

1. Letters, digits, punctuation and symbols (Unicode categories L*, N*, P*, S* except modifier
   letters/symbols), without compatibility or canonical decompositions (so no accented
   precomposed letters, ligatures or superscripts), outside box drawing, block elements,
   Braille and the private-use area.
2. Present in at least ``min_fonts`` (8) fonts, counting only fonts whose rendering is not blank.
3. Large enough to see: median ink >= 2% of the canvas and median extent >= 30% of it.
4. Visually distinct: characters are visited in code-point order (ASCII first) and one is
   dropped when the cosine similarity of its 32x32 renderings to an already kept character,
   averaged over the reference fonts both have, is >= 0.85 (drops A/Α/А, O/О, ⍺/α, ...).

With matplotlib 3.11's fonts this gives 851 classes (8 to 16 fonts each, 12.5 on average).
Images are rendered once and cached as an ``.npz`` under ``cache_dir`` (default
``$SCHANE_CACHE/glyphs`` or ``~/.cache/schane/glyphs``).

Examples:
    >>> from schane.data import get_dataset
    >>> ds = get_dataset("glyphs", split="test_classes", cache_dir="/tmp/glyphs")  # doctest: +SKIP
    >>> len(ds.classes), len(ds)  # doctest: +SKIP
    (20, 400)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageFont

from schane.progress import progress as progress_iter

from .base import ArrayLoader, ImageDataset, fewshot_split
from .registry import register_dataset

logger = logging.getLogger(__name__)

# What np.load of a truncated or corrupt .npz raises: a cut zip directory gives BadZipFile, a cut or
# corrupt member EOFError, zlib.error or ValueError, a missing member KeyError.
_DAMAGED_NPZ = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)

GLYPH_FONTS = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
)
_REFERENCE_FONTS = (0, 4, 8, 12)  # regular Sans, Sans Mono, Serif, STIX: used for the distinctness test
_EXCLUDED_RANGES = ((0x2500, 0x259F), (0x2800, 0x28FF), (0xE000, 0xF8FF), (0xFFF0, 0xFFFF))
_SELECT_CANVAS = 64
_FONT_SCALE = 0.6  # font size / canvas side
_SIMILARITY_THRESHOLD = 0.85
_VERSION = 1

GLYPHS_LAYOUT = """
No download or data needed: rendered from matplotlib's bundled fonts (mpl-data/fonts/ttf) on first use
and cached as cache_dir/glyphs-v1-<hash>.npz (about 17 MB at 32 px x 20 samples) plus
cache_dir/selection-<hash>.json.
cache_dir: the cache_dir option, else root, else $SCHANE_CACHE/glyphs, else ~/.cache/schane/glyphs.
"""


@dataclass(frozen=True)
class GlyphSet:
    """All rendered glyph images.

    Attributes:
        images: ``uint8 [N, H, W]`` grayscale, dark glyph on white.
        labels: ``int64 [N]`` class index into ``codepoints``.
        fonts: ``int64 [N]`` index into ``font_names`` of the font each sample was drawn in.
        codepoints: ``int64 [C]`` the character of each class.
        font_names: The font files (stems) in font-index order.
    """

    images: np.ndarray
    labels: np.ndarray
    fonts: np.ndarray
    codepoints: np.ndarray
    font_names: tuple[str, ...]

    @property
    def class_names(self) -> list[str]:
        """``"U+0041 A"``-style names, one per class."""
        return [f"U+{cp:04X} {chr(cp)}" for cp in self.codepoints.tolist()]


def default_cache_dir() -> Path:
    """``$SCHANE_CACHE/glyphs`` if the variable is set, else ``~/.cache/schane/glyphs``."""
    base = os.environ.get("SCHANE_CACHE")
    return Path(base).expanduser() / "glyphs" if base else Path.home() / ".cache" / "schane" / "glyphs"


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _font_paths() -> list[Path]:
    folder = font_dir()
    paths = [folder / f"{name}.ttf" for name in GLYPH_FONTS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"glyphs: matplotlib's font folder {folder} lacks {missing}; reinstall matplotlib"
        )
    return paths


def _fonts_fingerprint() -> str:
    h = hashlib.sha1()
    for p in _font_paths():
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()[:12]


def _eligible(cp: int) -> bool:
    if cp < 0x21 or any(lo <= cp <= hi for lo, hi in _EXCLUDED_RANGES):
        return False
    ch = chr(cp)
    cat = unicodedata.category(ch)
    return cat[0] in "LNPS" and cat not in ("Lm", "Sk") and not unicodedata.decomposition(ch)


@lru_cache(maxsize=64)
def _font(index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_paths()[index]), size)


def _render_base(cp: int, font_index: int, canvas: int) -> np.ndarray:
    """Ink coverage ``uint8 [canvas, canvas]`` of one character, centred (anchor middle-middle)."""
    font = _font(font_index, max(4, int(round(canvas * _FONT_SCALE))))
    mask, (ox, oy) = font.getmask2(chr(cp), mode="L", anchor="mm")
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    w, h = mask.size
    if w == 0 or h == 0:
        return out
    glyph = np.frombuffer(bytes(mask), dtype=np.uint8).reshape(h, w)
    x0, y0 = canvas // 2 + ox, canvas // 2 + oy
    xs, ys = max(0, x0), max(0, y0)
    xe, ye = min(canvas, x0 + w), min(canvas, y0 + h)
    if xe > xs and ye > ys:
        out[ys:ye, xs:xe] = glyph[ys - y0 : ye - y0, xs - x0 : xe - x0]
    return out


def _select_classes(
    min_fonts: int, progress: bool
) -> tuple[dict[int, list[int]], dict[tuple[int, int], np.ndarray]]:
    """Characters that become classes, each with the fonts that render it (see the module docstring),
    and the ``_SELECT_CANVAS`` renders of the kept classes (reused by the renderer)."""
    from matplotlib.ft2font import FT2Font

    paths = _font_paths()
    cmaps = [{cp for cp, gid in FT2Font(str(p)).get_charmap().items() if gid} for p in paths]
    counts: dict[int, int] = {}
    for cmap in cmaps:
        for cp in cmap:
            counts[cp] = counts.get(cp, 0) + 1
    candidates = sorted(cp for cp, n in counts.items() if n >= min_fonts and _eligible(cp))
    c = _SELECT_CANVAS
    renders: dict[int, dict[int, np.ndarray]] = {}
    for cp in progress_iter(candidates, desc="glyphs: checking characters", enabled=progress):
        per_font = {}
        for fi, cmap in enumerate(cmaps):
            if cp in cmap:
                img = _render_base(cp, fi, c)
                if img.max() >= 128:  # not blank in this font
                    per_font[fi] = img
        if len(per_font) < min_fonts:
            continue
        ink = [float((v >= 128).mean()) for v in per_font.values()]
        extent = []
        for v in per_font.values():
            ys, xs = np.nonzero(v >= 128)
            extent.append(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / c)
        if np.median(ink) >= 0.02 and np.median(extent) >= 0.3:
            renders[cp] = per_font
    cps = sorted(renders, key=lambda cp: (cp >= 128, cp))
    n = len(cps)
    sim = np.zeros((n, n), dtype=np.float32)
    weight = np.zeros((n, n), dtype=np.float32)
    for fi in _REFERENCE_FONTS:
        has = np.array([fi in renders[cp] for cp in cps])
        feats = np.zeros((n, (c // 2) ** 2), dtype=np.float32)
        for i, cp in enumerate(cps):
            if has[i]:
                feats[i] = (
                    renders[cp][fi].astype(np.float32).reshape(c // 2, 2, c // 2, 2).mean((1, 3)).ravel()
                )
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-6)
        both = (has[:, None] & has[None, :]).astype(np.float32)
        sim += (feats @ feats.T) * both
        weight += both
    sim /= np.maximum(weight, 1.0)
    kept: list[int] = []
    for i in range(n):
        if not kept or float(sim[i, kept].max()) < _SIMILARITY_THRESHOLD:
            kept.append(i)
    classes = {cps[i]: sorted(renders[cps[i]]) for i in sorted(kept, key=lambda i: cps[i])}
    bases = {(cp, fi): img for cp in classes for fi, img in renders[cp].items()}
    return classes, bases


def glyph_classes(
    min_fonts: int = 8, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> dict[int, list[int]]:
    """The glyph classes: ``{codepoint: [font indices that render it]}`` (cached as JSON).

    Args:
        min_fonts: Minimum number of fonts with a non-blank glyph.
        cache_dir: Cache folder (default :func:`default_cache_dir`).
        progress: Show a progress bar while selecting.

    Returns:
        Classes in code-point order.

    Raises:
        ValueError: If ``min_fonts`` is not in ``1..16``.
    """
    return _selection(min_fonts, cache_dir, progress)[0]


def _selection(
    min_fonts: int, cache_dir: str | os.PathLike | None, progress: bool
) -> tuple[dict[int, list[int]], dict[tuple[int, int], np.ndarray]]:
    if not 1 <= min_fonts <= len(GLYPH_FONTS):
        raise ValueError(f"min_fonts must be in 1..{len(GLYPH_FONTS)}, got {min_fonts}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = f"v{_VERSION}-{min_fonts}-{_SIMILARITY_THRESHOLD}-{_SELECT_CANVAS}-{_fonts_fingerprint()}"
    path = folder / f"selection-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return {int(k): list(v) for k, v in json.loads(path.read_text())["classes"].items()}, {}
        except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError):
            pass  # a damaged cache file is recomputed
    logger.info("glyphs: selecting the characters every font draws distinctly (once; cached in %s)", folder)
    classes, bases = _select_classes(min_fonts, progress)
    _atomic_write(path, lambda f: f.write(json.dumps({"key": key, "classes": classes}).encode()))
    return classes, bases


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _affine_thetas(rng: np.random.Generator, n: int, distortion: float) -> torch.Tensor:
    """``[n, 2, 3]`` affine_grid matrices (output -> input, normalised coordinates) of random
    rotations (+-10 deg), shears (+-0.2), per-axis scales (exp(+-0.12)) and shifts (+-6%)."""
    theta = np.deg2rad(rng.uniform(-10, 10, n) * distortion)
    shear = rng.uniform(-0.2, 0.2, n) * distortion
    scale = np.exp(rng.uniform(-0.12, 0.12, (n, 2)) * distortion)
    shift = rng.uniform(-0.06, 0.06, (n, 2)) * 2.0 * distortion  # canvas spans 2 normalised units
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shear_m = np.tile(np.eye(2), (n, 1, 1))
    shear_m[:, 0, 1] = shear
    fwd = rot @ shear_m @ (np.eye(2)[None] * scale[:, None, :])
    inv = np.linalg.inv(fwd)
    offset = -np.einsum("nij,nj->ni", inv, shift)
    return torch.from_numpy(np.concatenate([inv, offset[:, :, None]], axis=2)).float()


def _render_classes(
    classes: dict[int, list[int]],
    bases: dict[tuple[int, int], np.ndarray],
    img_size: int,
    samples: int,
    seed: int,
    noise: float,
    distortion: float,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Distorted, noisy renders ``uint8 [C * samples, img_size, img_size]`` and their font indices."""
    canvas = _base_canvas(img_size)
    cps = sorted(classes)
    images = np.empty((len(cps) * samples, img_size, img_size), dtype=np.uint8)
    fonts = np.empty(len(cps) * samples, dtype=np.int64)
    chunk = 32
    for start in progress_iter(range(0, len(cps), chunk), desc="glyphs: rendering", enabled=progress):
        batch, thetas, noises = [], [], []
        for k, cp in enumerate(cps[start : start + chunk]):
            rng = np.random.default_rng([seed, cp])
            used = [classes[cp][j % len(classes[cp])] for j in range(samples)]
            row = (start + k) * samples
            fonts[row : row + samples] = used
            for fi in used:
                if (cp, fi) not in bases:
                    bases[(cp, fi)] = _render_base(cp, fi, canvas)
                batch.append(bases[(cp, fi)])
            thetas.append(_affine_thetas(rng, samples, distortion))
            noises.append(rng.normal(0.0, noise * 255.0, (samples, img_size, img_size)))
        # Box-downsample the base renders to the output size (anti-aliasing), then warp.
        src = F.adaptive_avg_pool2d(torch.from_numpy(np.stack(batch)[:, None]).float(), img_size)
        grid = F.affine_grid(torch.cat(thetas), [len(batch), 1, img_size, img_size], align_corners=False)
        ink = F.grid_sample(src, grid, mode="bilinear", align_corners=False)[:, 0].numpy()
        gray = 255.0 - ink + np.concatenate(noises)
        images[start * samples : start * samples + len(batch)] = np.clip(np.rint(gray), 0, 255).astype(
            np.uint8
        )
    return images, fonts


def _base_canvas(img_size: int) -> int:
    return max(_SELECT_CANVAS, 2 * img_size)


def render_glyph_set(
    img_size: int = 32,
    samples_per_class: int = 20,
    *,
    seed: int = 0,
    min_fonts: int = 8,
    noise: float = 0.05,
    distortion: float = 1.0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> GlyphSet:
    """Render (or load from the cache) every glyph class.

    Sample ``j`` of a class is drawn in the class's ``j % n_fonts``-th font, so each class shows
    ``min(samples_per_class, n_fonts)`` distinct fonts; every sample has its own distortion.
    Everything is a function of ``seed`` and the class's code point, so renders are identical
    across calls and machines with the same fonts.

    Args:
        img_size: Output side in pixels (rendered at twice that and box-downsampled).
        samples_per_class: Images per class.
        seed: Seed of distortions and noise.
        min_fonts: Minimum number of fonts per class.
        noise: Std of the Gaussian pixel noise, as a fraction of 255.
        distortion: Scale of the random affine ranges (0 disables distortion).
        cache_dir: Cache folder (default :func:`default_cache_dir`).
        progress: Show progress bars.

    Returns:
        The :class:`GlyphSet`.

    Raises:
        ValueError: On a non-positive size or sample count, or negative noise/distortion.
    """
    if img_size < 8:
        raise ValueError(f"img_size must be >= 8 pixels, got {img_size}")
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    if noise < 0 or distortion < 0:
        raise ValueError(f"noise and distortion must be >= 0, got {noise} and {distortion}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    classes, bases = _selection(min_fonts, folder, progress)
    key = json.dumps(
        [
            _VERSION,
            img_size,
            samples_per_class,
            seed,
            noise,
            distortion,
            sorted(classes.items()),
            _fonts_fingerprint(),
        ]
    )
    path = folder / f"glyphs-v{_VERSION}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    cached = _MEMO.get(str(path))
    if cached is not None:
        return cached
    if path.is_file():
        try:
            with np.load(path) as z:
                gs = GlyphSet(z["images"], z["labels"], z["fonts"], z["codepoints"], GLYPH_FONTS)
            _MEMO[str(path)] = gs
            return gs
        except _DAMAGED_NPZ as err:  # a damaged cache file (e.g. cut short) is re-rendered
            logger.warning("glyphs: cache %s is damaged (%s: %s); rendering it again", path, type(err).__name__, err)
    cps = sorted(classes)
    logger.info("glyphs: rendering %d classes x %d images at %d px (once; cached in %s)", len(cps),
                samples_per_class, img_size, path)
    images, fonts = _render_classes(
        classes,
        bases if _base_canvas(img_size) == _SELECT_CANVAS else {},
        img_size,
        samples_per_class,
        seed,
        noise,
        distortion,
        progress,
    )
    gs = GlyphSet(
        images,
        np.repeat(np.arange(len(cps), dtype=np.int64), samples_per_class),
        fonts,
        np.asarray(cps, dtype=np.int64),
        GLYPH_FONTS,
    )
    _atomic_write(
        path,
        lambda f: np.savez(f, images=gs.images, labels=gs.labels, fonts=gs.fonts, codepoints=gs.codepoints),
    )
    _MEMO[str(path)] = gs
    return gs


_MEMO: dict[str, GlyphSet] = {}


@register_dataset("glyphs", "fewshot", GLYPHS_LAYOUT)
def build_glyphs(
    root: Any,
    split: str,
    transform: Callable | None,
    *,
    seed: int,
    val_fraction: float,
    download: bool,
    img_size: int = 32,
    samples_per_class: int = 20,
    n_train_classes: int = 64,
    n_val_classes: int = 16,
    n_test_classes: int = 20,
    glyph_seed: int = 0,
    min_fonts: int = 8,
    noise: float = 0.05,
    distortion: float = 1.0,
    cache_dir: str | None = None,
    progress: bool = True,
) -> ImageDataset:
    """Omniglot-like glyphs: 851 character classes rendered from matplotlib's fonts, no download.

    A permutation seeded with ``glyph_seed`` orders the classes; the first ``n_train_classes``
    are the base classes (``train``/``val``: seeded ``val_fraction`` hold-out with ``seed``), the
    next ``n_val_classes`` form ``val_classes`` and the next ``n_test_classes`` form
    ``test_classes`` (all three class-disjoint; 64/16/20 by default, up to 851 in all).
    ``glyph_seed`` also seeds the distortions and noise.

    Expected layout::

        nothing: rendered on first use and cached in cache_dir (or root, or ~/.cache/schane/glyphs)

    Raises:
        ValueError: If the class counts are < 1 or add up to more classes than exist.
    """
    counts = {
        "n_train_classes": n_train_classes,
        "n_val_classes": n_val_classes,
        "n_test_classes": n_test_classes,
    }
    for k, v in counts.items():
        if int(v) < 1:
            raise ValueError(f"glyphs: {k} must be >= 1, got {v}")
    gs = render_glyph_set(
        img_size,
        samples_per_class,
        seed=glyph_seed,
        min_fonts=min_fonts,
        noise=noise,
        distortion=distortion,
        cache_dir=cache_dir if cache_dir is not None else root,
        progress=progress,
    )
    total = n_train_classes + n_val_classes + n_test_classes
    n_classes = len(gs.codepoints)
    if total > n_classes:
        raise ValueError(
            f"glyphs: n_train_classes + n_val_classes + n_test_classes = {total} but only {n_classes} classes exist "
            f"(with min_fonts={min_fonts}); lower the counts"
        )
    names = gs.class_names
    order = [names[i] for i in np.random.default_rng(glyph_seed).permutation(n_classes)]
    lists = {
        "train": order[:n_train_classes],
        "val": order[n_train_classes : n_train_classes + n_val_classes],
        "test": order[n_train_classes + n_val_classes : total],
    }
    loader = ArrayLoader(gs.images)  # grayscale [N, H, W] -> RGB
    pooled = ImageDataset(range(len(gs.labels)), gs.labels.tolist(), names, loader, transform, "glyphs")
    return fewshot_split(pooled, lists, split, val_fraction, seed, "the rendered glyph set")
