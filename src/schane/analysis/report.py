"""Comparison reports: one table row per method, the embedding metrics of each, figures.

:func:`compute_embedding_metrics` computes a row's metrics from features; :func:`write_report` writes a
report directory (``report.md``, ``report.json``, PNG figures) from rows. The workflows that train and
measure the compared models are :mod:`schane.pipelines.compare` (``schane compare``, ``schane analyze``)
and :mod:`schane.pipelines.demo`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from schane.analysis import metrics as M
from schane.analysis.plots import balanced_subsample

__all__ = ["METRIC_COLUMNS", "METRIC_LEGEND", "compute_embedding_metrics", "write_report"]

# (row key, column header, format); the accuracy columns come first and are built per row
METRIC_COLUMNS: list[tuple[str, str, str]] = [
    ("isotropy", "isotropy ↑", "{:.3f}"),
    ("isoscore", "IsoScore ↑", "{:.3f}"),
    ("alignment", "alignment ↓", "{:.3f}"),
    ("uniformity", "uniformity ↓", "{:.3f}"),
    ("intra", "intra cos", "{:.3f}"),
    ("inter", "inter cos", "{:.3f}"),
    ("class_gap", "class gap ↑", "{:.3f}"),
    ("silhouette", "silhouette ↑", "{:.3f}"),
    ("knn", "kNN acc ↑", "{:.1f}%"),
]

METRIC_LEGEND = """\
Metrics on the L2-normalised pooled backbone features of the evaluation split (definitions in docs/analysis.md):
- **isotropy**: partition-function ratio min_c Z(c) / max_c Z(c) of Mu & Viswanath (2018), 1 = isotropic.
- **IsoScore**: Rudman et al. (2022), fraction of dimensions used uniformly, 1 = isotropic, 0 = a line.
- **alignment**: mean squared distance between same-class pairs (Wang & Isola 2020), lower = tighter classes.
- **uniformity**: log E exp(-2 |x - y|^2) over all pairs (Wang & Isola 2020), lower = more uniform on the sphere.
- **intra / inter cos**: mean cosine similarity within / between classes; **class gap** = intra - inter.
- **silhouette**: mean silhouette coefficient with cosine distance, in [-1, 1].
- **kNN acc**: k-nearest-neighbour accuracy on the frozen features.
"""


# --------------------------------------------------------------------------- metrics


def compute_embedding_metrics(
    features: Any,
    labels: Any,
    *,
    k: int = 5,
    reference: tuple[Any, Any] | None = None,
    max_points: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Every embedding metric of one model's features, as a report row's metric entries.

    Every metric sees the L2-normalised features (isotropy and IsoScore too, so that models
    with different feature norms compare fairly; the other metrics are cosine-based anyway).
    Isotropy, IsoScore, the class similarities and k-NN use all samples; the pairwise metrics
    (alignment over same-class pairs, uniformity, silhouette) a class-balanced subsample of
    at most ``max_points`` samples drawn with ``seed``.

    Args:
        features: features ``[N, D]``.
        labels: labels ``[N]`` (at least two classes).
        k: neighbours for k-NN.
        reference: ``(features[M, D], labels[M])`` used as k-NN neighbours (e.g. the train
            split); ``None`` for leave-one-out within ``features``.
        max_points: subsample size of the pairwise metrics.
        seed: subsampling seed.

    Returns:
        ``{"isotropy", "isoscore", "alignment", "uniformity", "intra", "inter", "class_gap",
        "silhouette", "knn"}`` (``knn`` in percent).

    Raises:
        ValueError: on bad shapes or fewer than two classes.
    """
    X = M._l2_normalize(M._as_matrix(features, "features", min_rows=3))
    y = M._as_labels(labels, X.shape[0])
    sub = balanced_subsample(y, max_points, seed)
    Xs, ys = X[sub], y[sub]
    gap = M.class_similarity_gap(X, y)
    if reference is None:
        knn = M.knn_accuracy(X, y, k=k)
    else:
        knn = M.knn_accuracy(reference[0], reference[1], X, y, k=k)
    return {
        "isotropy": M.isotropy(X, normalize=True),
        "isoscore": M.isoscore(X),
        "alignment": M.alignment(Xs, labels=ys),
        "uniformity": M.uniformity(Xs),
        "intra": gap.intra,
        "inter": gap.inter,
        "class_gap": gap.gap,
        "silhouette": M.silhouette(Xs, ys, max_points=None),
        "knn": 100.0 * knn,
    }


# --------------------------------------------------------------------------- report writing


def format_cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if fmt == "{:.3f}" and value != 0 and abs(value) < 5e-4:
        return f"{value:.1e}"  # e.g. the isotropy of a narrow cone: 3.2e-09, not 0.000
    return fmt.format(value)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def accuracy_entries(row: Mapping[str, Any]) -> dict[str, tuple[float, float | None]]:
    acc = row.get("accuracy")
    if acc is None:
        return {}
    if isinstance(acc, Mapping):
        out = {}
        for label, v in acc.items():
            if isinstance(v, Mapping):
                out[str(label)] = (float(v["mean"]), None if v.get("ci") is None else float(v["ci"]))
            elif isinstance(v, (tuple, list)):
                out[str(label)] = (float(v[0]), None if len(v) < 2 or v[1] is None else float(v[1]))
            else:
                out[str(label)] = (float(v), None)
        return out
    ci = row.get("accuracy_ci")
    return {str(row.get("accuracy_label", "accuracy")): (float(acc), None if ci is None else float(ci))}


def _table(rows: Sequence[Mapping[str, Any]], prefix: str = "") -> list[str]:
    acc_labels: list[str] = []
    if not prefix:
        for r in rows:
            acc_labels += [a for a in accuracy_entries(r) if a not in acc_labels]
    tail = [] if prefix else ["train time"]
    header = ["method", *[f"{a} (%) ↑" for a in acc_labels], *[h for _, h, _ in METRIC_COLUMNS], *tail]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        acc = accuracy_entries(r)
        cells = [str(r.get("label") or r["method"])]
        for a in acc_labels:
            if a not in acc:
                cells.append("—")
                continue
            mean, ci = acc[a]
            cells.append(f"{mean:.2f}" + (f" ± {ci:.2f}" if ci is not None else ""))
        cells += [format_cell(r.get(prefix + key), fmt) for key, _, fmt in METRIC_COLUMNS]
        if not prefix:
            cells.append(_fmt_time(r.get("train_time_s")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(
    rows: Sequence[Mapping[str, Any]],
    figures: Mapping[str, str | Path] | None,
    out_dir: str | Path,
    *,
    title: str = "schane comparison report",
    notes: Sequence[str] | str | None = None,
    sections: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> Path:
    """Write ``report.md`` (and ``report.json``) with one table row per method plus figures.

    A row is a mapping with ``method`` (required) and optionally ``label`` (shown instead of
    ``method``), ``accuracy`` — either ``{column label: (mean %, ci %)}`` (e.g.
    ``{"5-way 5-shot": (81.2, 0.6)}``), or a number with ``accuracy_ci`` and ``accuracy_label`` —
    the metric keys of :func:`compute_embedding_metrics` and ``train_time_s``; the same keys
    prefixed ``proj_`` go to a table of projection-head metrics. Missing values are shown as
    ``—``. Figures outside ``out_dir`` are copied into it.

    Args:
        rows: the main table's rows, in display order.
        figures: ``{caption: PNG path}``, in display order.
        out_dir: the report directory (created).
        title: the report's heading.
        notes: lines describing the setup, shown under the title.
        sections: further tables, ``{heading: rows}`` (e.g. one per sweep).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: when a row has no ``method``.
        FileNotFoundError: when a figure does not exist.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_rows = [*rows, *(r for rs in (sections or {}).values() for r in rs)]
    for r in all_rows:
        if "method" not in r:
            raise ValueError(f"every report row needs a 'method' key, got keys {sorted(r)}")
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes] if isinstance(notes, str) else [f"- {n}" for n in notes]
        lines.append("")
    lines += _table(rows) + [""]
    for heading, srows in (sections or {}).items():
        lines += [f"## {heading}", "", *_table(srows), ""]
    proj_rows = [r for r in all_rows if any(str(k).startswith("proj_") for k in r)]
    if proj_rows:
        lines += ["## Metrics of the projection-head outputs", "", *_table(proj_rows, prefix="proj_"), ""]
    lines += [METRIC_LEGEND]
    fig_entries = []
    for caption, path in (figures or {}).items():
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"figure {src} ({caption!r}) does not exist")
        dst = out / src.name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        fig_entries.append((caption, dst.name))
        lines += [f"## {caption}", "", f"![{caption}]({dst.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines).rstrip() + "\n")

    def plain(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        if isinstance(v, Path):
            return str(v)
        return v

    payload = {
        "title": title,
        "rows": plain(list(rows)),
        "sections": plain(dict(sections or {})),
        "figures": {c: f for c, f in fig_entries},
    }
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=str))
    return md
