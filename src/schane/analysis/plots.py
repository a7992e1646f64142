"""Pictures for embedding analysis: t-SNE maps, training curves and hyper-parameter sweeps.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas (no display and no
change to the global pyplot backend) and saved as PNG. Every function returns the path it wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from schane.analysis.metrics import _as_labels, _as_matrix
from schane.engine.run_log import read_metrics

if TYPE_CHECKING:
    from matplotlib.typing import LineStyleType

__all__ = [
    "balanced_subsample",
    "sweep_plot",
    "training_curves",
    "tsne_embed",
    "tsne_panels",
    "tsne_plot",
]

MAX_LEGEND_CLASSES = 20
_DPI = 130


# --------------------------------------------------------------------------- t-SNE


def balanced_subsample(labels: Any, max_points: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced random subsample of at most ``max_points`` samples.

    Each class gets an equal share; classes with fewer samples than their share give the
    remainder to the others. All samples are kept when there are at most ``max_points``.

    Args:
        labels: class labels ``[N]``.
        max_points: the subsample size (``>= 1``).
        seed: random seed.

    Returns:
        Sorted indices ``[min(N, max_points)]``.

    Raises:
        ValueError: if ``max_points < 1`` or ``labels`` is not 1-D.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    lab = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {lab.shape}")
    n = lab.shape[0]
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(lab == c)) for c in np.unique(lab)]
    quota = np.zeros(len(groups), dtype=int)
    sizes = np.array([len(g) for g in groups])
    left = max_points
    while left > 0:  # water-filling: share what is left among classes that still have samples
        open_ = np.flatnonzero(quota < sizes)
        share = max(left // len(open_), 1)
        for i in rng.permutation(open_):
            take = min(share, sizes[i] - quota[i], left)
            quota[i] += take
            left -= take
            if left == 0:
                break
    return np.sort(np.concatenate([g[:q] for g, q in zip(groups, quota, strict=True)]))


def tsne_embed(
    features: Any,
    labels: Any,
    *,
    max_points: int = 2000,
    perplexity: float = 30.0,
    seed: int = 0,
    pca_dim: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Two-dimensional t-SNE of a class-balanced subsample (PCA to ``pca_dim`` dimensions first).

    Args:
        features: features ``[N, D]``.
        labels: labels ``[N]``.
        max_points: subsample size (see :func:`balanced_subsample`).
        perplexity: t-SNE perplexity, lowered to ``(n - 1) / 3`` for small ``n``.
        seed: seed of the subsample, the PCA and t-SNE.
        pca_dim: PCA dimensions before t-SNE (skipped when the features are smaller).

    Returns:
        ``(xy[n, 2], labels[n])`` for the subsample.

    Raises:
        ValueError: on bad shapes or fewer than 3 samples.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    X = _as_matrix(features, "features", min_rows=3)
    lab = _as_labels(labels, X.shape[0])
    idx = balanced_subsample(lab, max_points, seed)
    X, lab = X[idx], lab[idx]
    n_comp = min(pca_dim, X.shape[0], X.shape[1])
    if X.shape[1] > n_comp:
        X = PCA(n_components=n_comp, random_state=seed).fit_transform(X)
    perp = float(min(perplexity, max((X.shape[0] - 1) / 3.0, 1.0)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, learning_rate="auto")
    xy = tsne.fit_transform(X.astype(np.float32))
    return np.asarray(xy), lab


def _palette(name: str) -> Sequence[Any]:
    """The colours of matplotlib's qualitative palette ``name`` (a ListedColormap)."""
    cmap = colormaps[name]
    assert isinstance(cmap, ListedColormap)
    return cast(Sequence[Any], cmap.colors)  # matplotlib's stubs type ``colors`` as any array-like


def _class_colors(classes: np.ndarray) -> tuple[dict[Any, Any], ListedColormap | None]:
    """A colour per class: qualitative palettes up to 20 classes, a continuous map beyond."""
    n = len(classes)
    if n <= 10:
        cols = _palette("tab10")[:n]
    elif n <= MAX_LEGEND_CLASSES:
        cols = _palette("tab20")[:n]
    else:
        cmap = colormaps["turbo"]
        cols = [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]
        return dict(zip(classes.tolist(), cols, strict=True)), ListedColormap(cols)
    return dict(zip(classes.tolist(), cols, strict=True)), None


def _class_name(c: Any, class_names: Sequence[str] | Mapping[Any, str] | None) -> str:
    name = None
    if isinstance(class_names, Mapping):
        name = class_names.get(c)
    elif class_names is not None and isinstance(c, (int, np.integer)) and 0 <= int(c) < len(class_names):
        name = class_names[int(c)]
    name = str(c) if name is None else str(name)
    return name if len(name) <= 18 else name[:17] + "…"


def _scatter(ax: Any, xy: np.ndarray, lab: np.ndarray, colors: dict[Any, Any]) -> None:
    size = float(np.clip(3000.0 / max(len(xy), 1), 3.0, 30.0))
    order = np.random.default_rng(0).permutation(len(xy))  # no class is painted entirely on top
    ax.scatter(
        xy[order, 0],
        xy[order, 1],
        c=[colors[v] for v in lab[order].tolist()],
        s=size,
        alpha=0.8,
        linewidths=0,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.75")


def _add_class_key(
    fig: Figure,
    axes: list[Any],
    classes: np.ndarray,
    colors: dict[Any, Any],
    cmap: ListedColormap | None,
    class_names: Sequence[str] | Mapping[Any, str] | None,
    below: bool,
    ncol: int = 10,
) -> None:
    if cmap is not None:
        norm = BoundaryNorm(np.arange(len(classes) + 1) - 0.5, len(classes))
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.03, pad=0.02)
        cb.set_label(f"class ({len(classes)} classes; colour = class index)")
        ticks = np.unique(np.linspace(0, len(classes) - 1, min(len(classes), 8)).round().astype(int))
        cb.set_ticks(ticks.tolist())
        cb.set_ticklabels([_class_name(classes[t], class_names) for t in ticks])
        return
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=7, color=colors[c], label=_class_name(c, class_names))
        for c in classes.tolist()
    ]
    if below:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=ncol,
            frameon=False,
            fontsize=9,
            title="class",
        )
    else:
        axes[-1].legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
            fontsize=9,
            title="class",
        )


def tsne_plot(
    features: Any,
    labels: Any,
    path: str | Path,
    *,
    class_names: Sequence[str] | Mapping[Any, str] | None = None,
    title: str | None = None,
    max_points: int = 2000,
    perplexity: float = 30.0,
    seed: int = 0,
) -> Path:
    """Save a t-SNE map of ``features`` coloured by class as a PNG.

    Up to 20 classes get distinct colours and a legend with their names; more classes are
    drawn with a continuous colour map and a colour bar labelled with a few class names.

    Args:
        features: features ``[N, D]``.
        labels: labels ``[N]``.
        path: output PNG path (parent directories are created).
        class_names: names indexed by label (a sequence) or a ``{label: name}`` mapping.
        title: figure title.
        max_points: class-balanced subsample size.
        perplexity: t-SNE perplexity.
        seed: random seed.

    Returns:
        The written path.

    Raises:
        ValueError: on bad shapes.
    """
    return tsne_panels(
        {title or "": (features, labels)},
        path,
        class_names=class_names,
        max_points=max_points,
        perplexity=perplexity,
        seed=seed,
    )


def tsne_panels(
    panels: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    *,
    class_names: Sequence[str] | Mapping[Any, str] | None = None,
    title: str | None = None,
    max_points: int = 2000,
    perplexity: float = 30.0,
    seed: int = 0,
    precomputed: bool = False,
) -> Path:
    """Side-by-side t-SNE maps, one panel per method, with one shared class key.

    Args:
        panels: ``{panel title: (features[N, D], labels[N])}``, or ``(xy[N, 2], labels[N])``
            with ``precomputed=True``.
        path: output PNG path.
        class_names: names indexed by label, or a ``{label: name}`` mapping.
        title: figure title.
        max_points: class-balanced subsample size per panel.
        perplexity: t-SNE perplexity.
        seed: random seed (the same for every panel).
        precomputed: the panels already hold 2-D t-SNE coordinates.

    Returns:
        The written path.

    Raises:
        ValueError: if ``panels`` is empty or a panel has bad shapes.
    """
    if not panels:
        raise ValueError("tsne_panels needs at least one panel {title: (features, labels)}")
    embedded = {}
    for name, (feats, labs) in panels.items():
        if precomputed:
            xy = _as_matrix(feats, f"panel {name!r} coordinates")
            embedded[name] = (xy, _as_labels(labs, xy.shape[0]))
        else:
            embedded[name] = tsne_embed(feats, labs, max_points=max_points, perplexity=perplexity, seed=seed)
    classes = np.unique(np.concatenate([lab for _, lab in embedded.values()]))
    colors, cmap = _class_colors(classes)
    k = len(embedded)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    many = cmap is not None
    legend_below = k > 1 and not many
    width = 4.2 * cols + (2.4 if (k == 1 and not many) else 0.0) + (1.2 if many else 0.0)
    longest = max(len(_class_name(c, class_names)) for c in classes.tolist())
    legend_cols = max(1, min(len(classes), int(width / (0.55 + 0.085 * longest))))
    legend_rows = math.ceil(len(classes) / legend_cols) + 1 if legend_below else 0
    height = 4.0 * rows + 0.3 * legend_rows + (0.4 if title else 0.0)
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(k)]
    for ax, (name, (xy, lab)) in zip(axes, embedded.items(), strict=True):
        _scatter(ax, xy, lab, colors)
        if name:
            ax.set_title(name, fontsize=12)
    if title:
        fig.suptitle(title, fontsize=13)
    _add_class_key(fig, axes, classes, colors, cmap, class_names, below=legend_below, ncol=legend_cols)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=_DPI)
    return out


# --------------------------------------------------------------------------- training curves


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_loss(k: str) -> bool:
    return "loss" in k or k in ("ce", "contrastive") or k.endswith(("_ce", "_contrastive"))


def _is_acc(k: str) -> bool:
    return ("acc" in k or "top1" in k) and not _is_loss(k)


def _x_key(records: list[dict[str, Any]]) -> str | None:
    """``step`` when every metric record carries one (the engine's logs), else ``epoch``, else ``None``."""
    metric_recs = [
        r for r in records
        if any((_is_loss(k) or _is_acc(k)) and not k.startswith("best_") and _is_number(v) for k, v in r.items())
    ]
    if metric_recs and all(_is_number(r.get("step")) for r in metric_recs):
        return "step"
    if any(_is_number(r.get("epoch")) for r in metric_recs):
        return "epoch"
    return None


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x, y, x_label)`` for one metric, averaging records that share an x value."""
    xkey = _x_key(records)
    xs: dict[float, list[float]] = {}
    for i, r in enumerate(records):
        if not _is_number(r.get(key)):
            continue
        x = r.get(xkey) if xkey else i
        if not _is_number(x):
            continue
        xs.setdefault(float(x), []).append(float(r[key]))
    x = np.array(sorted(xs))
    y = np.array([np.mean(xs[v]) for v in x]) if len(x) else np.array([])
    return x, y, xkey or "record"


def _metric_keys(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in keys and _is_number(v):
                keys.append(k)
    keys = [k for k in keys if not k.startswith("best_")]
    # per-step "loss"/"ce"/"contrastive" and the per-epoch "train_*" means say the same thing:
    # keep the per-step values on a step axis, the epoch means on an epoch axis
    by_step = _x_key(records) == "step"

    def duplicate(k: str) -> bool:
        if k in ("loss", "ce", "contrastive"):
            return not by_step and f"train_{k}" in keys
        if k in ("train_loss", "train_ce", "train_contrastive"):
            return by_step and k.removeprefix("train_") in keys
        return False

    losses = [k for k in keys if _is_loss(k) and not duplicate(k)]
    accs = [k for k in keys if _is_acc(k)]
    return losses, accs


_STYLES: list[LineStyleType] = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
_MARKERS = ["o", "s", "^", "D", "v", "x"]


def training_curves(
    runs: Mapping[str, str | Path] | str | Path,
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Plot loss components and accuracies against epochs from ``metrics.jsonl`` files.

    Every numeric loss key (containing ``loss``, or ``ce``/``contrastive`` and their
    ``train_``/``loss_`` forms) goes to the left panel and every key containing ``acc`` or ``top1``
    (``train_acc``, ``val_top1``...) to the right one; a colour per run, a line style per key.
    The x axis is the optimizer ``step`` when every record carries one (the engine's logs:
    per-step ``loss``/``ce``/``contrastive`` and per-epoch validation at the epoch's last step;
    the per-epoch ``train_*`` means are then redundant and dropped), else ``epoch`` (records
    sharing an epoch are averaged, and per-step keys give way to ``train_*`` means). Missing
    keys, and series that are all zero (CE's unused contrastive term), are skipped. Accuracies stored as fractions are shown in percent.

    Args:
        runs: ``{run name: metrics.jsonl path or run directory}``, or one path.
        path: output PNG path.
        title: figure title.

    Returns:
        The written path.

    Raises:
        FileNotFoundError: if a metrics file does not exist.
        ValueError: if no run has a numeric loss or accuracy value.
    """
    if not isinstance(runs, Mapping):
        runs = {"": runs}
    data = {}
    for name, p in runs.items():
        p = Path(p)
        data[name] = read_metrics(p / "metrics.jsonl" if p.is_dir() else p)
    loss_keys: list[str] = []
    acc_keys: list[str] = []
    own_keys: dict[str, set[str]] = {}
    for name, recs in data.items():
        lk, ak = _metric_keys(recs)
        own_keys[name] = set(lk) | set(ak)
        loss_keys += [k for k in lk if k not in loss_keys]
        acc_keys += [k for k in ak if k not in acc_keys]
    if not loss_keys and not acc_keys:
        raise ValueError("no numeric loss or accuracy values found in the metrics files " + ", ".join(map(str, runs.values())))
    panels = [("loss", loss_keys)] * bool(loss_keys) + [("accuracy (%)", acc_keys)] * bool(acc_keys)
    fig = Figure(figsize=(6.0 * len(panels) + 2.2, 4.2), dpi=_DPI, layout="constrained")
    palette = _palette("tab10")
    xlabel = "epoch"
    for j, (ylabel, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        run_handles, key_handles = [], []
        all_x: list[float] = []
        plotted: set[str] = set()
        for r, (name, recs) in enumerate(data.items()):
            color = palette[r % len(palette)]
            if name:
                run_handles.append(Line2D([], [], color=color, label=name))
            for s, key in enumerate(keys):
                if key not in own_keys[name]:
                    continue
                x, y, xlabel = _series(recs, key)
                if not len(x) or not np.any(y):
                    continue  # absent, or logged as 0 by a run without that term (CE's contrastive)
                if ylabel.startswith("accuracy") and np.nanmax(y) <= 1.0:
                    y = 100.0 * y
                all_x += x.tolist()
                plotted.add(key)
                style, marker = _STYLES[s % len(_STYLES)], _MARKERS[s % len(_MARKERS)]
                ax.plot(x, y, color=color, linestyle=style, marker=marker if len(x) < 30 else None, markersize=4)
        for s, key in enumerate(keys):
            if key not in plotted:
                continue
            key_handles.append(
                Line2D([], [], color="0.3", linestyle=_STYLES[s % len(_STYLES)], marker=_MARKERS[s % len(_MARKERS)],
                       markersize=4, label=key)
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if all_x and min(all_x) == max(all_x):  # a single evaluation (e.g. one epoch)
            ax.set_xlim(all_x[0] - 1, all_x[0] + 1)
        ax.grid(alpha=0.3)
        leg = ax.legend(handles=key_handles, loc="best", fontsize=8, frameon=False)
        if run_handles and j == len(panels) - 1:
            ax.add_artist(leg)
            ax.legend(
                handles=run_handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False, title="run"
            )
    if title:
        fig.suptitle(title, fontsize=13)
    return _save(fig, path)


# --------------------------------------------------------------------------- sweeps


def sweep_plot(
    sweeps: Mapping[str, Sequence[tuple[float, float, float | None]]],
    path: str | Path,
    *,
    ylabel: str = "accuracy (%)",
    baselines: Mapping[str, float] | None = None,
    title: str | None = None,
    label: str = "SCHaNe",
) -> Path:
    """Accuracy against a swept hyper-parameter, with error bars; one panel per swept key.

    Args:
        sweeps: ``{swept key (e.g. "loss.lam"): [(value, mean, error or None), ...]}``.
        path: output PNG path.
        ylabel: y-axis label.
        baselines: horizontal reference lines drawn in every panel, e.g. ``{"ce": 71.2}``.
        title: figure title.
        label: legend label of the swept method.

    Returns:
        The written path.

    Raises:
        ValueError: if ``sweeps`` is empty or a sweep has no points.
    """
    if not sweeps:
        raise ValueError("sweep_plot needs at least one sweep {key: [(value, mean, err), ...]}")
    pretty = {"loss.lam": "λ (contrastive weight)", "loss.temperature": "τ (temperature)", "loss.beta": "β (hardness)"}
    k = len(sweeps)
    fig = Figure(figsize=(4.6 * k + 0.4, 3.8), dpi=_DPI, layout="constrained")
    palette = _palette("tab10")
    for i, (key, points) in enumerate(sweeps.items()):
        pts = sorted((float(v), float(m), None if e is None else float(e)) for v, m, e in points)
        if not pts:
            raise ValueError(f"sweep {key!r} has no points")
        ax = fig.add_subplot(1, k, i + 1)
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = [p[2] if p[2] is not None else 0.0 for p in pts]
        ax.errorbar(x, y, yerr=err, color=palette[0], marker="o", capsize=4, linewidth=1.8, label=label)
        for j, (bname, bval) in enumerate((baselines or {}).items()):
            ax.axhline(bval, color=palette[(j + 1) % len(palette)], linestyle="--", linewidth=1.2, label=bname)
        ax.set_xlabel(pretty.get(key, key))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(x) <= 8:
            ax.set_xticks(x)
        ax.legend(fontsize=8, frameon=False, loc="best")
    if title:
        fig.suptitle(title, fontsize=13)
    return _save(fig, path)
