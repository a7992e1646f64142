"""``--data PATH``: a run on the user's own images with settings that fit them, stated before work starts.

:func:`config_for_data` turns a path (a folder of class folders, a ``train/`` + ``val/``/``test/`` folder, a
CSV file or a folder holding ``train.csv``) into a complete :class:`~schane.config.Config`:

1. the storage is recognised (:func:`detect_data`) and the train/val/test splits are resolved: split folders
   where the data has them, else seeded stratified hold-outs (80/10/10 for a flat folder). The splits are
   written as file lists to ``RUN_DIR/splits/`` (:func:`~schane.data.custom.write_split_lists`), which the run,
   its resume, ``schane eval``/``embed`` and the report read back: images added to the folder later never
   move between splits, and test images never select anything.
2. :func:`recipe` chooses the image size, batch, learning rate, schedule and loss from the images (their
   count, classes and size) and the backbone. The rules and the measurements they were chosen on are in
   docs/own_data.md (``python benchmarks/own_data_rules.py``).
3. The layers are merged: schane's defaults < the recipe < ``--config FILE`` < ``--set key=value``. A key the
   user sets is never changed; the plan line says which settings were chosen and why.

Examples:
    >>> cfg, plan = config_for_data("photos/")  # doctest: +SKIP
    >>> print(plan.line())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schane.config import Config, apply_overrides, from_dict, plain_value, read_config_file
from schane.data import dataset_info, hf, wds
from schane.data.base import check_fewshot_capacity
from schane.data.custom import split_folders, write_split_lists
from schane.data.transforms import TwoViews
from schane.engine.criterion import build_criterion
from schane.engine.device import autocast, resolve_amp, resolve_channels_last, resolve_device
from schane.models import build_model
from schane.models.small_maps import helps_on, small_map_convolutions
from schane.pipelines.splits import read_split, train_transform_for
from schane.progress import format_duration

logger = logging.getLogger(__name__)

SPLITS_DIR = "splits"
"""The folder of the run directory holding the file lists of a ``--data`` run's splits."""

HOLDOUT = 0.1
"""Fraction of each class held out for validation and, where the data has no test split, for test."""

# The recipe's constants (chosen on validation splits: docs/own_data.md).
BATCH = 64
LR_CONV = 1e-2
LR_TRANSFORMER = 5e-4
TARGET_STEPS = 400
MIN_EPOCHS, MAX_EPOCHS = 3, 40
LAYER_DECAY = 0.8
LAM = 0.5
FEWSHOT_FRACTIONS = (0.6, 0.2, 0.2)

_FIXED_SIZE_FAMILIES = ("vit", "deit", "beit", "eva", "cait", "xcit", "swin", "levit", "pit", "flexivit", "vitamin")


@dataclass
class DataSummary:
    """What the data looks like: counts per split, classes and the images' typical size."""

    name: str
    root: str
    options: dict[str, Any]
    classes: list[str]
    counts: dict[str, int]
    made: list[str]
    median_side: int
    layout: str


@dataclass
class Plan:
    """The settings a ``--data`` run uses, with where each came from.

    Attributes:
        data: the data summary.
        chosen: ``{dotted key: (value, reason)}`` for the settings the recipe chose.
        user: the dotted keys the user's config file or ``--set`` gave (kept as given).
        cfg: the resulting config.
    """

    data: DataSummary
    chosen: dict[str, tuple[Any, str]]
    user: set[str]
    cfg: Config
    notes: list[str] = field(default_factory=list)
    step_seconds: float | None = None

    def line(self) -> str:
        """The plan, as the lines a run prints before any model is built."""
        d, c = self.data, self.cfg
        n_train = d.counts["train"]
        steps = max(1, n_train // c.data.batch_size // c.optim.accum_steps)
        if c.train.max_steps_per_epoch is not None:
            steps = min(steps, c.train.max_steps_per_epoch)
        split_text = ", ".join(f"{k} {v}" for k, v in d.counts.items())
        made = f" ({', '.join(d.made)} held out, seed {c.data.split_seed})" if d.made else ""
        lines = [
            f"plan: {sum(d.counts.values())} images of {len(d.classes)} classes in {d.root} ({d.layout}); "
            f"{split_text}{made}; images about {d.median_side} px",
            f"plan: {c.model.backbone} at {c.data.img_size} px, {c.optim.epochs} epochs x {steps} steps of "
            f"{c.data.batch_size} images = {c.optim.epochs * steps} steps, {_loss_text(c)}, lr {c.optim.lr:g} "
            f"(warmup {c.optim.warmup_epochs:g} epochs, cosine), run dir {c.run_dir}",
        ]
        why = [f"{k}={_fmt(v)} ({reason})" for k, (v, reason) in self.chosen.items()]
        if why:
            lines.append("plan: chosen for this data: " + "; ".join(why))
        if self.user:
            lines.append("plan: kept as you set them: " + ", ".join(sorted(self.user)))
        lines.extend(f"plan: {n}" for n in self.notes)
        if self.step_seconds is not None:
            total = self.estimate(steps)
            lines.append(f"plan: about {format_duration(total)} on this machine (one training step of {c.data.batch_size} "
                         f"images took {self.step_seconds:.2f} s here with its data; evaluation included; refined "
                         "after the first steps)")
        return "\n".join(lines)

    def estimate(self, steps_per_epoch: int) -> float:
        """Seconds of the whole run from the timed step: training steps plus one forward pass per evaluated
        image (validation every epoch, test once), a forward pass costing about a third of a training step."""
        c, n = self.cfg, self.data.counts
        per_image = (self.step_seconds or 0.0) / (2 * c.data.batch_size)
        evals = c.optim.epochs * n.get("val", 0) + n.get("test", 0)
        return (self.step_seconds or 0.0) * c.optim.epochs * steps_per_epoch + evals * per_image / 3


def time_training_step(cfg: Config, num_classes: int, train: Any = None, repeats: int = 2) -> float:
    """Seconds of one training step of ``cfg`` on this machine: both views of a batch of random images through
    the model and the joint loss, forward and backward, with the run's device, memory format and precision
    (the fastest of ``repeats`` after one warm-up step), plus reading and augmenting the batch's images from
    ``train`` (the training split, without transform; timed on up to 32 of its images, in the main process).
    """
    import time

    import torch


    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, num_classes).to(device).train()
    fmt = torch.channels_last if resolve_channels_last(cfg.train.channels_last, model) else torch.contiguous_format
    model = model.to(memory_format=fmt)
    crit = build_criterion(cfg.loss)
    amp = resolve_amp(cfg.train.amp, device)
    b, s = cfg.data.batch_size, cfg.data.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * b, 3, s, s, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (b,), generator=g).repeat(2).to(device)
    times = []
    with small_map_convolutions(model, enabled=helps_on(device)):
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            with autocast(device, amp):
                out = model(x)
            proj = out.projections.float() if crit.contrastive is not None else None
            res = crit.joint(out.logits.float(), y, proj, y if proj is not None else None, None, None)
            res.total.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return min(times[1:]) + (_loading_seconds(cfg, model, train) * b if train is not None and len(train) else 0.0)


def _loading_seconds(cfg: Config, model: Any, train: Any, n: int = 32) -> float:
    """Seconds to read one training image and make its two augmented views."""
    import time


    views = TwoViews(train_transform_for(cfg, model))
    idx = range(0, len(train), max(1, len(train) // n))[:n]
    t0 = time.perf_counter()
    for i in idx:
        views(train[i][0])
    return (time.perf_counter() - t0) / len(idx)


def _loss_text(c: Config) -> str:
    if c.loss.name == "ce":
        return "loss CE"
    return f"loss {c.loss.lam:g} x {c.loss.name} + {1 - c.loss.lam:g} x CE"


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def detect_data(path: str | Path) -> tuple[str, str, dict[str, Any], str]:
    """``(data.name, data.root, data.options, layout)`` for a path given with ``--data``.

    A ``.csv`` file is the ``csv`` set with that file as ``train_csv`` (a ``test.csv`` beside a ``train.csv``
    is its test split); a folder with ``train.csv`` is the ``csv`` set; a ``save_to_disk`` directory or the
    Hub's parquet layout is ``hf``, a folder of ``{split}-*.tar`` shards ``wds``; any other folder is
    ``image_folder`` (split folders or one folder per class).

    Raises:
        FileNotFoundError: when the path does not exist.
        ValueError: when it is a file other than a CSV.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder; pass a folder of class folders or a CSV")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise ValueError(f"--data {path}: expected a folder of images or a .csv file of 'path,label' rows")
        opts: dict[str, Any] = {"train_csv": str(p.resolve())}
        if p.name == "train.csv" and (p.parent / "test.csv").is_file():
            opts["test_csv"] = str((p.parent / "test.csv").resolve())
        return "csv", str(p.parent.resolve()), opts, "CSV file"
    if (p / "train.csv").is_file():
        return "csv", str(p.resolve()), {}, "train.csv" + (" + test.csv" if (p / "test.csv").is_file() else "")
    if hf.looks_like(p):
        return "hf", str(p.resolve()), {}, "Hugging Face dataset"
    if wds.looks_like(p):
        return "wds", str(p.resolve()), {}, "WebDataset shards"
    folders = split_folders(p)
    layout = " + ".join(f.name + "/" for f in folders.values()) if folders else "one folder per class"
    return "image_folder", str(p.resolve()), {}, layout


def summarize_data(name: str, root: str, options: Mapping[str, Any], *, split_seed: int,
                   val_fraction: float) -> tuple[DataSummary, dict[str, Any]]:
    """Read the three splits once (no image is decoded) and sample the images' sizes.

    Returns:
        The summary and the splits (datasets without transform).

    Raises:
        ValueError / FileNotFoundError: as the dataset reader does (layout, empty classes, ...).
    """
    names = dataset_info(name, options=options).splits
    splits = {s: read_split(name, root, s, split_seed=split_seed, val_fraction=val_fraction, options=options)
              for s in names}
    train = splits["train"]
    made: list[str] = []
    if "test" not in splits:
        made = ["val"]
    elif name == "image_folder":
        have = split_folders(Path(root))
        made = [s for s in ("val", "test") if s not in have]
    elif name == "csv":
        made = ["val"] + ([] if options.get("test_csv") or (Path(root) / "test.csv").is_file() else ["test"])
    summary = DataSummary(name, root, dict(options), list(train.classes), {s: len(d) for s, d in splits.items()},
                          made, _median_side(train), "")
    return summary, splits


def _median_side(ds: Any, n: int = 200) -> int:
    """The median shorter side of up to ``n`` evenly spaced images of a split (file headers only where the
    samples are files; decoded otherwise)."""
    from PIL import Image

    samples = getattr(ds, "samples", None)
    step = max(1, len(ds) // n)
    sides = []
    for i in range(0, len(ds), step)[:n]:
        try:
            if samples is not None and isinstance(samples[i], (str, Path)):
                with Image.open(samples[i]) as im:
                    sides.append(min(im.size))
            else:
                sides.append(min(ds[i][0].size))
        except Exception:  # an unreadable image is reported by the loader with its name; here it is skipped
            continue
    return int(statistics.median(sides)) if sides else 224


def _fixed_size(backbone: str) -> bool:
    b = backbone.lower()
    return b.startswith("beit3") or any(b.startswith(f) for f in _FIXED_SIZE_FAMILIES)


def _default_size(backbone: str) -> int:
    if backbone.startswith("beit3") or backbone == "effnet-lite0-offline":
        return 224
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone.partition(".")[0] if "." not in backbone else backbone)
        return int(cfg.input_size[-1]) if cfg is not None else 224
    except Exception:  # an unknown name is reported when the model is built
        return 224


def recipe(summary: DataSummary, backbone: str, batch_size: int | None = None) -> dict[str, tuple[Any, str]]:
    """The settings chosen for this data and backbone: ``{dotted key: (value, reason)}``.

    Rules (see docs/own_data.md for the comparison they were chosen on):

    * image size: convolutional backbones train at the images' median shorter side rounded up to a
      multiple of 32 (at least 32, at most the backbone's pretraining size), so small images are not blown
      up; transformers with fixed position tables (ViT, DeiT, BEiT, BEiT-3, Swin, ...) use their own size;
    * batch: 64 images (two views each), fewer when the training split is small (at least 4 batches);
    * learning rate: 1e-2 for convolutional backbones (AdamW, layer decay 0.8; the best mean validation
      top-1 of 1e-3, 3e-3 and 1e-2 over three sets), 5e-4 for transformers; used as given (no batch scaling);
    * epochs: enough for about 400 optimizer steps, between 3 and 40 epochs; warmup 10% of them;
    * loss: SCHaNe + CE with lambda = 0.5 (the demo's selection; the paper's 0.9 under-trains the
      classifier at small budgets).
    """
    n_train = summary.counts["train"]
    default = _default_size(backbone)
    out: dict[str, tuple[Any, str]] = {}
    if _fixed_size(backbone):
        out["data.img_size"] = (default, f"{backbone} has a fixed input size")
    else:
        size = max(32, min(default, 32 * math.ceil(summary.median_side / 32)))
        out["data.img_size"] = (size, f"images about {summary.median_side} px: not enlarged to {default}")
    batch = batch_size or BATCH
    if batch_size is None:
        while batch > 8 and n_train < 4 * batch:
            batch //= 2
        out["data.batch_size"] = (batch, "halved from 64 until the training split holds 4 batches"
                                  if batch < BATCH else "two views each")
    steps = max(1, n_train // batch)
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps)))
    out["optim.epochs"] = (epochs, f"about {TARGET_STEPS} steps at {steps} steps per epoch (3-40 epochs)")
    out["optim.warmup_epochs"] = (round(0.1 * epochs, 2), "10% of the epochs")
    conv = not _fixed_size(backbone)
    out["optim.lr"] = (LR_CONV if conv else LR_TRANSFORMER,
                       "convolutional backbone" if conv else "transformer backbone")
    out["optim.base_batch_size"] = (None, "lr used as given")
    out["optim.layer_decay"] = (LAYER_DECAY, "")
    out["optim.min_lr"] = (1e-5, "")
    out["loss.lam"] = (LAM, "SCHaNe + CE, lambda chosen at small budgets")
    out["data.eval_batch_size"] = (256, "")
    out["data.val_fraction"] = (HOLDOUT, "")
    out["train.log_every_steps"] = (max(1, min(20, steps // 4)), "")
    return out


def _dotted_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key not in ("data.options", "model.backbone_kwargs"):
            keys |= _dotted_keys(v, key + ".")
        else:
            keys.add(key)
    return keys


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _get_dotted(data: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = data
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return plain_value(node)


def _user_layers(config: str | Path | None, overrides: Sequence[str] | None, name: str,
                 notes: list[str]) -> tuple[dict[str, Any], set[str]]:
    """The config file and ``--set`` items as one mapping, less the data keys ``--data`` replaces, and the
    dotted keys they set."""
    user: dict[str, Any] = read_config_file(config) if config is not None else {}
    user_data = user.setdefault("data", {}) if isinstance(user.get("data"), dict) or "data" not in user else None
    if user_data is None:
        raise ValueError(f"config file {config}: 'data' must be a mapping")
    for key in ("name", "root"):
        if key in user_data:
            notes.append(f"data.{key} of {config} replaced by --data")
            user_data.pop(key)
    takes = set(dataset_info(name).options)
    dropped = sorted(set(user_data.get("options") or {}) - takes)
    if dropped:
        notes.append(f"data.options {', '.join(dropped)} of {config} dropped: not options of {name}")
        user_data["options"] = {k: v for k, v in (user_data.get("options") or {}).items() if k in takes}
    apply_overrides(user, list(overrides or []))
    user_keys = _dotted_keys(user) - {"data", "data.options"}
    if not user.get("data"):
        user.pop("data", None)
    return user, user_keys


def _finish(cfg: Config, splits: Mapping[str, Any], root: str, opts: Mapping[str, Any], *, fewshot: bool,
            write_splits: bool, notes: list[str]) -> None:
    """Few-shot: check the episodes against the classes. Classification: write (or reuse) the split lists and
    point the config at them."""
    if fewshot:
        for part in ("val_classes", "test_classes"):
            ds = splits[part]
            check_fewshot_capacity(cfg.data.name, part, ds.targets, ds.classes, cfg.fewshot.ways,
                                   max(cfg.fewshot.shots), cfg.fewshot.queries)
    elif write_splits and cfg.data.name in ("image_folder", "csv"):  # stored sets (hf, wds) keep their splits
        lists = cfg.run_dir / SPLITS_DIR
        if (lists / "classes.txt").is_file():
            notes.append(f"split lists reused from {lists}")
        else:
            write_split_lists(splits, Path(root), lists)
        cfg.data.options = {"split_lists": str(lists.resolve())}
        cfg.data.options.update({k: v for k, v in opts.items() if k in ("train_csv", "classes")})


def config_for_data(path: str | Path, config: str | Path | None = None,
                    overrides: Sequence[str] | None = None, *, write_splits: bool = True,
                    fewshot: bool = False, time_step: bool = True) -> tuple[Config, Plan]:
    """The config of a run on the data at ``path``: recipe < ``config`` file < ``overrides``.

    ``data.name``/``data.root`` come from ``path``; options of the config file that the detected dataset
    does not take (e.g. the glyph options of configs/demo.yaml) are dropped with a note. The run's
    ``name`` defaults to the data folder's name.

    Args:
        path: the data (folder or CSV).
        config: an optional YAML file layered on top of the recipe.
        overrides: ``key=value`` items layered on top of the file.
        write_splits: write the split file lists to ``RUN_DIR/splits/`` (kept when they already exist) and
            point ``data.options.split_lists`` at them (classification runs).
        fewshot: a few-shot study (``schane fewshot --data``): the classes are split into base, validation and
            novel classes (``class_fractions`` [0.6, 0.2, 0.2] unless the config sets ``class_splits`` or
            ``class_fractions``), and the episodes' ways, shots and queries are checked against the classes
            before any model is built.
        time_step: time one training step on this machine (:func:`time_training_step`) for the plan's
            estimate of the whole run.

    Returns:
        ``(config, plan)``.

    Raises:
        ValueError / FileNotFoundError: on a bad path, an unreadable layout or an invalid config.
    """
    name, root, options, layout = detect_data(path)
    notes: list[str] = []
    user, user_keys = _user_layers(config, overrides, name, notes)
    split_seed = int(_get_dotted(user, "data.split_seed", 0))
    val_fraction = float(_get_dotted(user, "data.val_fraction", HOLDOUT))
    opts = {**options, **({"test_fraction": HOLDOUT} if "test_fraction" in dataset_info(name).options else {}),
            "split_seed": split_seed, **(_get_dotted(user, "data.options") or {})}
    opts.pop("split_lists", None)
    if fewshot:
        opts.pop("test_fraction", None)
        if opts.get("class_splits") is None and opts.get("class_fractions") is None:
            opts["class_fractions"] = list(FEWSHOT_FRACTIONS)
            notes.append(f"classes split {'/'.join(f'{f:g}' for f in FEWSHOT_FRACTIONS)} into base/validation/novel "
                         f"classes (seed {split_seed}); set data.options.class_splits to choose them")
    elif dataset_info(name, options=opts).kind != "classification":
        raise ValueError("--data with class_splits/class_fractions is a few-shot set: use 'schane fewshot --data'")
    # holding 10% out for test first, then 10% of the whole for validation: 80/10/10
    vf = val_fraction if "data.val_fraction" in user_keys or fewshot else HOLDOUT / (1 - HOLDOUT)
    summary, splits = summarize_data(name, root, opts, split_seed=split_seed, val_fraction=vf)
    summary.layout = layout
    backbone = str(_get_dotted(user, "model.backbone", Config().model.backbone))
    batch = _get_dotted(user, "data.batch_size")
    chosen = recipe(summary, backbone, batch_size=int(batch) if batch is not None else None)
    chosen["data.val_fraction"] = (round(vf, 6), "")
    merged: dict[str, Any] = {"name": Path(root).name + ("-fewshot" if fewshot else "")}
    for key, (value, _) in chosen.items():
        _set_dotted(merged, key, value)
    merged["data"] = {**merged.get("data", {}), "name": name, "root": root, "options": opts}
    _merge(merged, user)
    if "optim.warmup_epochs" not in user_keys and "optim.epochs" in user_keys:
        epochs = int(plain_value(merged["optim"]["epochs"]))
        merged["optim"]["warmup_epochs"] = round(0.1 * epochs, 2)
        chosen["optim.warmup_epochs"] = (merged["optim"]["warmup_epochs"], "10% of the epochs")
    cfg = from_dict(merged, strict_paths=True)
    if summary.counts["train"] < cfg.data.batch_size:
        raise ValueError(f"the training split has {summary.counts['train']} images, fewer than one global batch of "
                         f"{cfg.data.batch_size}; lower data.batch_size")
    _finish(cfg, splits, root, opts, fewshot=fewshot, write_splits=write_splits, notes=notes)
    step = time_training_step(cfg, len(summary.classes), splits["train"]) if time_step else None
    shown = {k: v for k, v in chosen.items() if k not in user_keys and v[1]}
    return cfg, Plan(summary, shown, user_keys, cfg, notes, step)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> None:
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict) and k != "options":
            _merge(base[k], v)
        elif k == "options" and isinstance(v, Mapping) and isinstance(base.get(k), dict):
            base[k].update(v)
        else:
            base[k] = v


__all__ = ["DataSummary", "Plan", "config_for_data", "detect_data", "recipe", "summarize_data"]
