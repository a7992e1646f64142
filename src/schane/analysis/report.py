"""Comparison reports: ``schane compare`` and ``schane analyze``.

:func:`run_compare` trains (or reuses) one run per compared method and per swept value under
identical data, seeds and budgets, measures every model's accuracy and the geometry of its
pooled features on the evaluation split, and writes one report directory with ``report.md``,
``report.json`` and PNG figures. :func:`write_report` writes such a directory from rows that
were computed elsewhere (the demo uses it), :func:`compute_embedding_metrics` computes a row's
metrics from features, and :func:`analyze_checkpoint` analyses one checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from schane.analysis import metrics as M
from schane.analysis.plots import balanced_subsample

__all__ = [
    "METHODS",
    "analyze_checkpoint",
    "compute_embedding_metrics",
    "method_config",
    "run_compare",
    "write_report",
]

# name -> (label in the report, config overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("CE", {"loss.name": "ce"}),
    "schane": ("SCHaNe + CE", {"loss.name": "schane"}),
    "supcon": ("SupCon + CE", {"loss.name": "supcon"}),
    "simclr": ("SimCLR + CE", {"loss.name": "simclr"}),
    "hcl": ("SCHaNe w/o labels (hard-neg. NT-Xent) + CE", {"loss.name": "hcl"}),
    "schane_beta0": ("SCHaNe β=0 + CE", {"loss.name": "schane", "loss.beta": 0.0}),
}

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


def _fmt(value: Any, fmt: str) -> str:
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


def _accuracy_entries(row: Mapping[str, Any]) -> dict[str, tuple[float, float | None]]:
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
            acc_labels += [a for a in _accuracy_entries(r) if a not in acc_labels]
    tail = [] if prefix else ["train time"]
    header = ["method", *[f"{a} (%) ↑" for a in acc_labels], *[h for _, h, _ in METRIC_COLUMNS], *tail]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        acc = _accuracy_entries(r)
        cells = [str(r.get("label") or r["method"])]
        for a in acc_labels:
            if a not in acc:
                cells.append("—")
                continue
            mean, ci = acc[a]
            cells.append(f"{mean:.2f}" + (f" ± {ci:.2f}" if ci is not None else ""))
        cells += [_fmt(r.get(prefix + key), fmt) for key, _, fmt in METRIC_COLUMNS]
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


# --------------------------------------------------------------------------- configs per method


def _set_dotted(obj: Any, key: str, value: Any) -> Any:
    head, _, rest = key.partition(".")
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise ValueError(f"unknown config key {key!r} (valid under this section: {', '.join(sorted(names))})")
    if rest:
        return dataclasses.replace(obj, **{head: _set_dotted(getattr(obj, head), rest, value)})
    current = getattr(obj, head)
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) and value.is_integer():
        value = int(value)
    return dataclasses.replace(obj, **{head: value})


def _get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``(label, overrides)`` of a method name (see :data:`METHODS`) or ``LOSS@key=value,...``."""
    if method in METHODS:
        return METHODS[method]
    base, sep, spec = method.partition("@")
    if sep and base in METHODS:
        label, overrides = METHODS[base]
        overrides = dict(overrides)
        extra = []
        for item in spec.split(","):
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"method {method!r}: expected LOSS@key=value[,key=value], e.g. schane@loss.beta=0.5")
            import yaml

            overrides[key.strip()] = yaml.safe_load(raw)
            extra.append(f"{key.strip().split('.')[-1]}={raw}")
        return f"{label} ({', '.join(extra)})", overrides
    raise ValueError(
        f"unknown method {method!r}; use one of {', '.join(METHODS)} or LOSS@key=value (e.g. schane@loss.lam=0.5)"
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def method_config(cfg: Any, method: str, runs_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~schane.config.Config` of one compared run: ``cfg`` with the method's loss.

    Data, seeds, model and budget stay those of ``cfg``; only the loss settings (and
    ``overrides``) change, and the run directory becomes ``runs_dir/<method>``.

    Raises:
        ValueError: on an unknown method or override key, or an invalid resulting config.
    """
    from schane.config import validate

    _, ov = _parse_method(method)
    ov = {**ov, **(overrides or {})}
    run_name = _slug(method) + "".join(f"__{k.split('.')[-1]}={v}" for k, v in (overrides or {}).items())
    out = dataclasses.replace(cfg, name=_slug(run_name), output_dir=str(runs_dir))
    for key, value in ov.items():
        out = _set_dotted(out, key, value)
    validate(out)
    return out


# --------------------------------------------------------------------------- features and accuracy


def _eval_dataset(model: Any, cfg: Any, split: str) -> Any:
    from schane.data import get_dataset
    from schane.data.transforms import eval_transform
    from schane.engine.utils import IndexedDataset

    dc = model.data_config
    tf = eval_transform(cfg.data.img_size, tuple(dc["mean"]), tuple(dc["std"]), crop_pct=float(dc.get("crop_pct") or 0.875))
    base = get_dataset(
        cfg.data.name, cfg.data.root, split, None, seed=cfg.train.seed, val_fraction=cfg.data.val_fraction,
        download=cfg.data.download, **cfg.data.options,
    )
    return IndexedDataset(base, tf), base


def _resolve_split(cfg: Any, split: str) -> tuple[str, str]:
    """``(split, dataset kind)``; ``test`` means ``test_classes`` on few-shot datasets."""
    from schane.data import dataset_info

    info = dataset_info(cfg.data.name)
    if info.kind == "fewshot" and split == "test":
        split = "test_classes"
    if split not in info.splits:
        raise ValueError(f"dataset {cfg.data.name!r} has no split {split!r}; choose one of {', '.join(info.splits)}")
    return split, info.kind


def _features(model: Any, cfg: Any, split: str, device: torch.device, progress: bool) -> dict[str, Any]:
    from schane.engine.evaluate import extract_features

    ds, base = _eval_dataset(model, cfg, split)
    feats, labels = extract_features(
        model, ds, batch_size=cfg.data.eval_batch_size, device=device, progress=progress, num_workers=cfg.data.num_workers
    )
    out = {"features": feats, "labels": labels, "classes": list(getattr(base, "classes", []))}
    if cfg.analysis.projections:
        with torch.no_grad():
            proj = [model.projector(f.to(device)).float().cpu() for f in feats.split(1024)]
        out["projections"] = torch.cat(proj)
    return out


def _metrics_for(model: Any, cfg: Any, device: torch.device, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    split, kind = _resolve_split(cfg, cfg.analysis.split)
    data = _features(model, cfg, split, device, progress)
    reference = None
    if cfg.analysis.knn_reference == "train":
        if kind == "fewshot":
            raise ValueError(
                "analysis.knn_reference=train needs a classification dataset: the few-shot train split holds "
                "other classes than test_classes; use analysis.knn_reference=loo"
            )
        ref = _features(model, dataclasses.replace(cfg, analysis=dataclasses.replace(cfg.analysis, projections=False)),
                        "train", device, progress)
        reference = (ref["features"], ref["labels"])
    kw = {"k": cfg.analysis.knn_k, "max_points": cfg.analysis.metric_max_points, "seed": cfg.analysis.seed}
    row = compute_embedding_metrics(data["features"], data["labels"], reference=reference, **kw)
    if "projections" in data:
        proj = compute_embedding_metrics(data["projections"], data["labels"], **kw)
        row.update({f"proj_{k}": v for k, v in proj.items()})
    data["split"] = split
    return row, data


def _classification_accuracy(final: Mapping[str, Any], model: Any, cfg: Any, device: torch.device,
                             progress: bool) -> dict[str, tuple[float, float | None]]:
    test = final.get("test") if final else None
    if not test:
        from schane.engine.evaluate import evaluate

        ds, _ = _eval_dataset(model, cfg, "test")
        test = evaluate(model, ds, batch_size=cfg.data.eval_batch_size, device=device, progress=progress)
    p, n = float(test["top1"]), int(test.get("n") or 0)
    ci = 100.0 * 1.96 * math.sqrt(p * (1.0 - p) / n) if n > 0 else None  # normal approximation, 95%
    return {"top-1": (100.0 * p, ci)}


def _fewshot_accuracy(model: Any, cfg: Any, device: torch.device, progress: bool) -> dict[str, tuple[float, float | None]]:
    """``{"5-way K-shot": (mean %, 95% CI %)}`` on ``test_classes`` episodes (cfg.fewshot).

    Uses schane.fewshot's episode sampler and evaluators, so with the same
    ``fewshot.episode_seed`` the episodes equal those of ``schane fewshot``. Unlike that
    command, the checkpoint (``best.pt``) and the logistic-regression ``C``
    (``fewshot.logreg_c``) are fixed rather than chosen on ``val_classes`` episodes.
    """
    from functools import partial

    from schane.data.transforms import support_transform
    from schane.engine.evaluate import extract_features
    from schane.engine.utils import IndexedDataset
    from schane.fewshot.episodes import sample_episodes
    from schane.fewshot.evaluators import build_feature_bank, evaluate_protocol_a, evaluate_protocol_b
    from schane.fewshot.stats import mean_ci

    fs = cfg.fewshot
    eval_ds, base = _eval_dataset(model, cfg, "test_classes")
    dc = model.data_config
    support_ds = IndexedDataset(base, support_transform(cfg.data.img_size, tuple(dc["mean"]), tuple(dc["std"])))
    labels = [int(t) for t in base.targets]
    episodes = {s: sample_episodes(labels, fs.ways, s, fs.queries, fs.episodes, fs.episode_seed) for s in fs.shots}
    model = model.to(device).eval()
    per_shot: dict[int, np.ndarray] = {}
    if fs.protocol == "A":
        bank = build_feature_bank(
            model, eval_ds, support_ds, [e for eps in episodes.values() for e in eps], n_aug=fs.support_aug,
            seed=fs.episode_seed, batch_size=cfg.data.eval_batch_size, device=device, progress=progress,
            extract_fn=partial(extract_features, num_workers=cfg.data.num_workers),
        )
        for shot, eps in episodes.items():
            per_shot[shot] = evaluate_protocol_a(bank, eps, C=fs.logreg_c, progress=progress)
    else:
        for shot, eps in episodes.items():
            per_shot[shot] = evaluate_protocol_b(
                model, eps, support_ds, eval_ds, steps=fs.finetune_steps, lr=fs.finetune_lr, loss=fs.finetune_loss,
                lam=cfg.loss.lam, temperature=cfg.loss.temperature, beta=cfg.loss.beta, seed=fs.episode_seed,
                progress=progress,
            )
    out = {}
    for shot, accs in per_shot.items():
        ci = mean_ci(accs)
        out[f"{fs.ways}-way {shot}-shot"] = (ci.mean, None if math.isnan(ci.half_width) else ci.half_width)
    return out


# --------------------------------------------------------------------------- compare


# sections and keys that do not change what a run trains
_EVAL_ONLY = ("name", "output_dir", "analysis", "fewshot", "train.progress", "train.test_at_end")


def _training_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if key in _EVAL_ONLY:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _training_diff(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} vs {vb!r}")
    return out


def _run_or_reuse(run_cfg: Any, progress: bool) -> tuple[Path, dict[str, Any], float | None]:
    """Train ``run_cfg`` unless its run directory already holds a finished run with that config."""
    import yaml

    from schane.config import to_dict
    from schane.engine.train import train

    run_dir = run_cfg.run_dir
    timing = run_dir / "compare_time.json"
    if (run_dir / "final.json").is_file():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        diff = _training_diff(saved or {}, json.loads(json.dumps(to_dict(run_cfg))))
        if diff:
            raise ValueError(
                f"{run_dir} holds a finished run with a different training config ({'; '.join(diff[:5])}); "
                "delete that directory to retrain it, or set another output_dir/name for the comparison"
            )
        if progress:
            print(f"reusing {run_dir}")
    else:
        before = json.loads(timing.read_text())["train_time_s"] if timing.is_file() else 0.0
        start = time.perf_counter()
        train(run_cfg, resume="auto" if (run_dir / "last.pt").is_file() else None)
        timing.write_text(json.dumps({"train_time_s": before + time.perf_counter() - start}))
    final = json.loads((run_dir / "final.json").read_text())
    seconds = json.loads(timing.read_text())["train_time_s"] if timing.is_file() else _logged_seconds(run_dir)
    return run_dir, final, seconds


def _logged_seconds(run_dir: Path) -> float | None:
    """Training time from the first and last ``time`` stamps of ``metrics.jsonl`` (runs compare did not train)."""
    from schane.analysis.plots import read_metrics_jsonl

    try:
        stamps = [r["time"] for r in read_metrics_jsonl(run_dir / "metrics.jsonl") if isinstance(r.get("time"), (int, float))]
    except FileNotFoundError:
        return None
    return float(stamps[-1] - stamps[0]) if len(stamps) >= 2 else None


def _evaluate_run(run_cfg: Any, method: str, label: str, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    from schane.engine.checkpoint import load_checkpoint_model
    from schane.engine.utils import resolve_device

    run_dir, final, seconds = _run_or_reuse(run_cfg, progress)
    ckpt = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
    device = resolve_device(run_cfg.train.device)
    model, _, _ = load_checkpoint_model(ckpt, map_location=device)
    _, kind = _resolve_split(run_cfg, run_cfg.analysis.split)
    if kind == "fewshot":
        accuracy = _fewshot_accuracy(model, run_cfg, device, progress)
    else:
        accuracy = _classification_accuracy(final, model, run_cfg, device, progress)
    row_metrics, data = _metrics_for(model, run_cfg, device, progress)
    row = {
        "method": method,
        "label": label,
        "accuracy": accuracy,
        **row_metrics,
        "train_time_s": seconds,
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
    }
    return row, data


def run_compare(cfg: Any, *, progress: bool | None = None) -> Path:
    """Train and compare ``cfg.analysis.methods`` and sweeps; write ``cfg.run_dir / "report"``.

    Every run is ``cfg`` with only the loss changed (:func:`method_config`), so data, seeds,
    model and budget are identical. Runs live in ``report/runs/<method>`` and are reused when
    they finished with the same config (an interrupted run resumes). The report holds a table
    (accuracy ± 95% CI: top-1 on ``test`` for classification datasets, N-way K-shot episodes on
    ``test_classes`` for few-shot datasets; the embedding metrics; training time), t-SNE panels
    side by side, training curves and one accuracy-vs-value plot per sweep.

    Args:
        cfg: the comparison's :class:`~schane.config.Config`.
        progress: show progress (default ``cfg.train.progress``).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: on unknown methods or sweep keys, or a run directory holding another config.
        FileNotFoundError: when the data is missing.
    """
    from schane.analysis import plots

    show = cfg.train.progress if progress is None else progress
    report_dir = cfg.run_dir / "report"
    runs_dir = report_dir / "runs"
    acfg = cfg.analysis
    jobs: list[tuple[str, str, dict[str, Any], str | None]] = []  # (method, label, overrides, sweep key)
    if len(set(acfg.methods)) != len(acfg.methods):
        raise ValueError(f"analysis.methods lists a method twice: {acfg.methods}")
    for m in acfg.methods:
        jobs.append((m, _parse_method(m)[0], {}, None))
    base_values: dict[str, float] = {}
    for key, values in acfg.sweeps.items():
        if not values:
            raise ValueError(f"analysis.sweeps.{key}: list at least one value")
        base_values[key] = float(_get_dotted(method_config(cfg, "schane", runs_dir), key))
        for v in values:
            if "schane" in acfg.methods and float(v) == base_values[key]:
                continue  # the same run as the "schane" method: reused below
            jobs.append(("schane", f"SCHaNe + CE, {key.split('.')[-1]}={v:g}", {key: v}, key))
    run_cfgs = [method_config(cfg, m, runs_dir, ov) for m, _, ov, _ in jobs]  # validate everything first

    rows, sweep_rows = [], {}
    panels: dict[str, tuple[Any, Any]] = {}
    class_names: list[str] = []
    curves: dict[str, Path] = {}
    for (method, label, ov, key), run_cfg in zip(jobs, run_cfgs, strict=True):
        if show:
            print(f"== {label}: {run_cfg.run_dir}")
        row, data = _evaluate_run(run_cfg, method, label, show)
        if key is None:
            rows.append(row)
            panels[label] = (data["features"], data["labels"])
            class_names = class_names or data["classes"]
            curves[method] = run_cfg.run_dir
        else:
            row["sweep_value"] = float(ov[key])
            sweep_rows.setdefault(key, []).append(row)

    figures: dict[str, Path] = {}
    split = _resolve_split(cfg, acfg.split)[0]
    figures[f"t-SNE of the pooled {split} features"] = plots.tsne_panels(
        panels, report_dir / "tsne.png", class_names=class_names, max_points=acfg.max_points,
        perplexity=acfg.tsne_perplexity, seed=acfg.seed,
    )
    try:
        figures["Training curves"] = plots.training_curves(curves, report_dir / "curves.png")
    except (ValueError, FileNotFoundError) as e:
        print(f"warning: no training curves: {e}")
    schane_row = next((r for r in rows if r["method"] == "schane"), None)
    for key in acfg.sweeps:
        if schane_row is not None:  # the default SCHaNe run is a point of every sweep
            sweep_rows.setdefault(key, []).append({**schane_row, "sweep_value": base_values[key],
                                                   "label": f"SCHaNe + CE, {key.split('.')[-1]}={base_values[key]:g}"})
        sweep_rows[key] = sorted(sweep_rows.get(key, []), key=lambda r: r["sweep_value"])
    if sweep_rows:
        acc_label = _main_accuracy_label(rows or [r for rs in sweep_rows.values() for r in rs])
        sweeps = {
            k: [(r["sweep_value"], *_accuracy_entries(r)[acc_label]) for r in rs] for k, rs in sweep_rows.items()
        }
        baselines = {r["label"]: _accuracy_entries(r)[acc_label][0] for r in rows
                     if r["method"] != "schane" and acc_label in _accuracy_entries(r)}
        figures["Sweeps"] = plots.sweep_plot(
            sweeps, report_dir / "sweeps.png", ylabel=f"{acc_label} accuracy (%)", baselines=baselines,
            label="SCHaNe + CE (swept)",
        )
    notes = [
        f"dataset `{cfg.data.name}`, backbone `{cfg.model.backbone}`, {cfg.optim.epochs} epochs, "
        f"batch {cfg.data.batch_size}, seed {cfg.train.seed}; every run differs only in its loss",
        f"metrics on split `{split}`; k-NN: k={acfg.knn_k}, "
        + ("leave-one-out within the split" if acfg.knn_reference == "loo" else "train-split neighbours"),
        "accuracy ± 95% confidence interval",
    ]
    sections = {f"Sweep over `{k}` (SCHaNe + CE)": rs for k, rs in sweep_rows.items()}
    md = write_report(rows, figures, report_dir, title=f"schane comparison: {cfg.name}", notes=notes, sections=sections)
    if show:
        print(md.read_text())
    return md


def _main_accuracy_label(rows: Sequence[Mapping[str, Any]]) -> str:
    labels = [a for r in rows for a in _accuracy_entries(r)]
    if not labels:
        raise ValueError("no accuracy to plot in the sweep rows")
    return labels[-1]


# --------------------------------------------------------------------------- analyze


def analyze_checkpoint(
    path: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Embedding metrics and a t-SNE map of one checkpoint's pooled features; prints the table.

    Writes ``metrics.json`` and ``tsne_<split>.png`` to ``out_dir`` (default: an ``analysis``
    folder next to the checkpoint).

    Args:
        path: a checkpoint written by ``schane train``.
        split: the analysed split (``test`` means ``test_classes`` on few-shot datasets).
        out_dir: output directory.
        overrides: dotted overrides of the checkpoint's config (``data.*``, ``analysis.*``...).
        progress: show progress bars.

    Returns:
        The metrics (see :func:`compute_embedding_metrics`) plus ``split``, ``n`` and ``tsne``.

    Raises:
        FileNotFoundError: when the checkpoint or the data is missing.
        ValueError: on a bad split or override.
    """
    from schane.analysis.plots import tsne_plot
    from schane.config import apply_overrides, from_dict, to_dict
    from schane.engine.checkpoint import load_checkpoint_model
    from schane.engine.utils import resolve_device

    ckpt = Path(path)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found; pass a best.pt/last.pt written by 'schane train'")
    for item in overrides or []:
        if item.strip().startswith("model."):
            raise ValueError(f"override {item!r}: the model is fixed by the checkpoint's weights")
    model, cfg, _ = load_checkpoint_model(ckpt)
    cfg = from_dict(apply_overrides(to_dict(cfg), [*(overrides or []), f"analysis.split={split}"]))
    device = resolve_device(cfg.train.device)
    model.to(device)
    row, data = _metrics_for(model, cfg, device, progress)
    out = Path(out_dir) if out_dir is not None else ckpt.parent / "analysis"
    png = tsne_plot(
        data["features"], data["labels"], out / f"tsne_{data['split']}.png", class_names=data["classes"],
        title=f"{cfg.name} ({cfg.loss.name}), {data['split']}", max_points=cfg.analysis.max_points,
        perplexity=cfg.analysis.tsne_perplexity, seed=cfg.analysis.seed,
    )
    result = {"checkpoint": str(ckpt), "split": data["split"], "n": int(len(data["labels"])), **row, "tsne": str(png)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    names = {key: head for key, head, _ in METRIC_COLUMNS}
    fmts = {key: fmt for key, _, fmt in METRIC_COLUMNS}
    lines = [("checkpoint", str(ckpt)), ("split", f"{data['split']} ({result['n']} images)")]
    for key, value in row.items():
        base = key.removeprefix("proj_")
        name = names.get(base, base) + (" (projection)" if key.startswith("proj_") else "")
        lines.append((name, _fmt(value, fmts.get(base, "{:.4f}"))))
    lines.append(("t-SNE", str(png)))
    w = max(len(k) for k, _ in lines)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in lines))
    return result
