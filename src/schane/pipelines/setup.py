"""The set-up every workflow shares, written once.

* :func:`load_split`: one split of the run's dataset, as ``cfg.data`` describes it (the only place outside
  :mod:`schane.data` that turns a config into a dataset);
* :func:`eval_transform_for`, :func:`train_transform_for`, :func:`support_transform_for`: the preprocessing
  of a model's pretrained weights (or the config's explicit choice);
* :func:`load_for_evaluation`: a trained model from a checkpoint, with config overrides and a check that
  the data's classes are the checkpoint's;
* :func:`fewshot_accuracies`: few-shot accuracy per episode under protocol A or B, the one function every
  workflow evaluates episodes with;
* :func:`config_diff`: what differs between two configs (resume warnings, run reuse);
* :func:`prepare_run_dir`: a run directory that can be written, checked before any work starts;
* :func:`find_images`, :class:`ReadableImages`, :func:`forward_images`, :func:`write_skipped`: a model run over
  images a user hands over (``schane embed``, ``schane predict``), skipping and listing the unreadable ones.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from schane.config import Config, apply_overrides, from_dict, to_dict

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- data


def load_split(cfg: Config, split: str, transform: Any = None) -> Any:
    """One split of ``cfg.data``'s dataset (``transform`` applied to each PIL image, ``None``: PIL images).

    The validation hold-out is seeded with ``data.split_seed``: every run of a study, whatever its training
    seed or loss, trains and selects on the same images.

    Raises:
        ValueError: on an unknown dataset, split or option.
        FileNotFoundError: when the data is missing.
    """
    d = cfg.data
    return read_split(d.name, d.root, split, transform, split_seed=d.split_seed, val_fraction=d.val_fraction,
                      download=d.download, options=d.options)


def read_split(name: str, root: str | None, split: str, transform: Any = None, *, split_seed: int,
               val_fraction: float, options: Mapping[str, Any], download: bool = False) -> Any:
    """One split of a dataset given by its parts rather than a config (``--data`` reads splits before its
    config exists); :func:`load_split` is this with ``cfg.data``'s values.

    Raises:
        ValueError: on an unknown dataset, split or option.
        FileNotFoundError: when the data is missing.
    """
    from schane.data import get_dataset

    return get_dataset(name, root, split, transform, seed=split_seed, val_fraction=val_fraction,
                       download=download, **options)


def dataset_splits(cfg: Config) -> tuple[str, ...]:
    """The splits ``cfg.data``'s dataset offers."""
    from schane.data import dataset_info

    return dataset_info(cfg.data.name, options=cfg.data.options).splits


def preprocessing_for(cfg: Config, model: nn.Module) -> Any:
    """The run's :class:`~schane.data.transforms.Preprocessing`: ``data.mean/std/crop_pct/eval_resize`` where
    set, else the values of ``model``'s pretrained weights."""
    from schane.data.transforms import resolve_preprocessing

    return resolve_preprocessing(cfg.data, model.data_config)


def eval_transform_for(cfg: Config, model: nn.Module) -> Any:
    """The deterministic evaluation transform for ``model`` at ``data.img_size``."""
    return preprocessing_for(cfg, model).eval_transform(cfg.data.img_size)


def train_transform_for(cfg: Config, model: nn.Module) -> Any:
    """One random training view for ``model`` (``aug.*`` settings)."""
    return preprocessing_for(cfg, model).train_transform(cfg.data.img_size, cfg.aug)


def support_transform_for(cfg: Config, model: nn.Module) -> Any:
    """The few-shot support augmentation for ``model``."""
    return preprocessing_for(cfg, model).support_transform(cfg.data.img_size)


def eval_dataset(cfg: Config, model: nn.Module, split: str) -> tuple[Any, Any]:
    """``(dataset with the evaluation transform, the plain split)`` for ``model``."""
    from schane.engine.utils import IndexedDataset

    base = load_split(cfg, split)
    return IndexedDataset(base, eval_transform_for(cfg, model)), base


# --------------------------------------------------------------------------- configs, run directories and checkpoints


def prepare_run_dir(run_dir: Path, *, create: bool = True) -> None:
    """Check that the run directory can be one, and create it, before any data or model is loaded.

    Raises:
        ValueError: when it or a parent is a file, or it cannot be created (no permission, read-only or
            system location); the message names the path and the key to change.
    """
    for p in [run_dir, *run_dir.parents]:
        if p.exists() and not p.is_dir():
            key = "name" if p == run_dir else "output_dir"
            raise ValueError(f"{p} is a file, not a directory: the run directory {run_dir} cannot be created there; "
                             f"set another {key}")
        if p.exists():
            break
    if not create:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the run directory {run_dir} ({e.strerror or e}); set output_dir to a "
                         "folder you can write") from None




def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], *, ignore: Sequence[str] = (), prefix: str = "") -> list[str]:
    """``"key: a -> b"`` for every dotted key whose value differs between two config dicts.

    Args:
        a, b: nested config mappings (:func:`schane.config.to_dict`).
        ignore: dotted keys or whole sections to skip.
        prefix: dotted prefix of ``a`` and ``b`` (recursion).
    """
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if key in ignore:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, ignore=ignore, prefix=key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def with_overrides(cfg: Config, overrides: Sequence[str] | None) -> Config:
    """``cfg`` with ``key=value`` overrides applied (parsed as on the command line) and validated."""
    return from_dict(apply_overrides(to_dict(cfg), list(overrides or [])))


@dataclass
class Loaded:
    """A trained model ready for evaluation.

    Attributes:
        model: the :class:`~schane.models.SCHaNeModel` in eval mode on ``device``.
        cfg: the run's config with the overrides applied.
        num_classes: the classifier's width.
        class_names: the training classes in label order (``None`` for checkpoints of schane < 0.2).
        device: where the model is.
        path: the checkpoint.
    """

    model: nn.Module
    cfg: Config
    num_classes: int
    class_names: list[str] | None
    device: torch.device
    path: Path


def load_for_evaluation(path: str | Path, overrides: Sequence[str] | None = None) -> Loaded:
    """Rebuild a trained model from its checkpoint for evaluation, with config overrides (``data.root=...``).

    Raises:
        FileNotFoundError: when the checkpoint is missing.
        ValueError: on a corrupt checkpoint, weights that do not fit the model of its config (one line naming the
            first mismatched tensors), or an override of a ``model.*`` key (the weights fix the model).
    """
    from schane.engine.checkpoint import CheckpointError, CheckpointFieldError, load_checkpoint_model
    from schane.engine.utils import resolve_device

    for item in overrides or []:
        if item.strip().startswith("model."):
            raise ValueError(f"override {item!r}: the model is fixed by the checkpoint's weights; override data.* etc.")
    try:
        model, cfg, num_classes = load_checkpoint_model(path)
    except CheckpointFieldError:  # one line, then one line per malformed field
        raise
    except CheckpointError as e:  # torch lists every mismatched tensor on its own line: keep the report one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if len(lines) <= 1:
            raise
        more = f"; ... ({len(lines) - 3} more)" if len(lines) > 3 else ""
        raise CheckpointError(f"{lines[0]} {'; '.join(lines[1:3])}{more}") from e
    cfg = with_overrides(cfg, overrides)
    _find_moved_split_lists(cfg, Path(path))
    device = resolve_device(cfg.train.device)
    model = prepare_for_inference(model, cfg, device)
    names = getattr(model, "class_names", None)
    return Loaded(model, cfg, num_classes, list(names) if names is not None else None, device, Path(path))


def _find_moved_split_lists(cfg: Config, checkpoint: Path) -> None:
    """A ``--data`` run's split lists where the run directory now is, when it was moved or copied since."""
    lists = cfg.data.options.get("split_lists")
    if lists is None or Path(lists).is_dir():
        return
    beside = checkpoint.parent / "splits"
    if (beside / "classes.txt").is_file():
        logger.info("split lists %s not found; reading those beside the checkpoint, %s", lists, beside)
        cfg.data.options = {**cfg.data.options, "split_lists": str(beside.resolve())}


def prepare_for_inference(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """``model`` in eval mode on ``device``, channels-last when ``train.channels_last`` resolves so."""
    from schane.engine.utils import resolve_channels_last

    model = model.to(device).eval()
    if resolve_channels_last(cfg.train.channels_last, model):
        model = model.to(memory_format=torch.channels_last)
    return model


def check_class_names(trained: Sequence[str] | None, data: Sequence[str], where: str, *, allow: bool = False) -> None:
    """Refuse to evaluate a model on data whose classes are not the ones it was trained on.

    Args:
        trained: the checkpoint's class names (``None``: not stored, nothing to check).
        data: the data's class names, in label order.
        where: the data's description for the message.
        allow: only log a warning (evaluating a relabelled set on purpose).

    Raises:
        ValueError: listing the differences, unless ``allow``.
    """
    if trained is None:
        logger.warning("the checkpoint stores no class names (written by schane < 0.2): cannot check them against %s",
                       where)
        return
    trained, data = list(trained), list(data)
    if trained == data:
        return
    only_ckpt = [c for c in trained if c not in set(data)]
    only_data = [c for c in data if c not in set(trained)]
    if only_ckpt or only_data:
        what = (f"{len(only_ckpt)} class(es) only in the checkpoint ({', '.join(only_ckpt[:5])}"
                f"{', ...' if len(only_ckpt) > 5 else ''}), {len(only_data)} only in the data "
                f"({', '.join(only_data[:5])}{', ...' if len(only_data) > 5 else ''})")
    else:
        moved = [f"{i}: {a} vs {b}" for i, (a, b) in enumerate(zip(trained, data, strict=True)) if a != b]
        what = f"the same classes in another label order ({'; '.join(moved[:3])}{' ...' if len(moved) > 3 else ''})"
    msg = f"the classes of {where} are not the ones the checkpoint was trained on: {what}"
    if allow:
        logger.warning("%s (evaluating anyway: --allow-class-mismatch)", msg)
        return
    raise ValueError(msg + "; pass --allow-class-mismatch to evaluate a relabelled set on purpose")


# --------------------------------------------------------------------------- few-shot


@dataclass
class FewShotViews:
    """A few-shot split under the evaluation and the support transforms of one preprocessing."""

    eval: dict[str, Any] = field(default_factory=dict)
    support: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, list[int]] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)


def fewshot_views(cfg: Config, model: nn.Module, splits: Sequence[str]) -> FewShotViews:
    """Load ``splits`` (e.g. ``val_classes``, ``test_classes``) with ``model``'s evaluation and support views."""
    from schane.engine.utils import IndexedDataset

    views = FewShotViews()
    etf, stf = eval_transform_for(cfg, model), support_transform_for(cfg, model)
    for split in splits:
        base = load_split(cfg, split)
        views.eval[split] = IndexedDataset(base, etf)
        views.support[split] = IndexedDataset(base, stf)
        views.labels[split] = [int(t) for t in base.targets]
        views.classes[split] = list(base.classes)
    return views


def fewshot_accuracies(
    model: nn.Module,
    cfg: Config,
    views: FewShotViews,
    split: str,
    episodes: Mapping[int, Sequence[Any]],
    cs: Sequence[Any],
    *,
    device: torch.device,
    tag: str = "",
) -> dict[tuple[int, Any], np.ndarray]:
    """Per-episode accuracy (%) of one model on one split's episodes, under ``cfg.fewshot.protocol``.

    Protocol A (frozen features + logistic regression) builds one feature bank for all shots and fits every
    ``C`` of ``cs``; protocol B (per-episode fine-tuning) evaluates every :class:`~schane.fewshot.Setting`
    ``(steps, lr)`` of ``cs`` on the same episodes (one fine-tuning trajectory per learning rate; 0 steps, the
    prototype classifier, without fine-tuning).

    Args:
        model: the model (any mode; moved to ``device``).
        cfg: ``fewshot.*`` (protocol, support_aug, solver, n_jobs, finetune_*), ``loss.*`` for protocol B's
            joint objective, ``data.eval_batch_size``, ``data.num_workers``, ``train.progress``.
        views: the split's datasets (:func:`fewshot_views`).
        split: which split of ``views``.
        episodes: ``{shot: episodes}``.
        cs: protocol A: logistic-regression strengths ``C``; protocol B: ``(steps, lr)`` settings
            (``settings_grid(cfg.fewshot.finetune_steps, cfg.fewshot.finetune_lr)`` or a choice from it).
        device: where the model runs.
        tag: label of the progress output.

    Returns:
        ``{(shot, C or Setting): accuracies[n_episodes]}``.

    Raises:
        ValueError: when protocol B is given an entry of ``cs`` that is not a ``(steps, lr)`` pair.
    """
    from schane.engine.evaluate import extract_features
    from schane.fewshot import build_feature_bank, evaluate_protocol_a

    fs, show = cfg.fewshot, cfg.train.progress
    model = prepare_for_inference(model, cfg, device)
    out: dict[tuple[int, Any], np.ndarray] = {}
    if fs.protocol == "A":
        bank = build_feature_bank(
            model, views.eval[split], views.support[split], [e for s in episodes for e in episodes[s]],
            n_aug=fs.support_aug, seed=fs.episode_seed, batch_size=cfg.data.eval_batch_size, device=device,
            progress=show, extract_fn=partial(extract_features, num_workers=cfg.data.num_workers),
        )
        for shot in episodes:
            for c in cs:
                out[(shot, c)] = evaluate_protocol_a(
                    bank, episodes[shot], C=c, n_jobs=fs.n_jobs, solver=fs.solver, progress=show,
                    desc=f"{tag} {split} {shot}-shot C={c:g}",
                )
        return out
    return _protocol_b_accuracies(model, cfg, views, split, episodes, cs, tag=tag)


def _protocol_b_accuracies(model: nn.Module, cfg: Config, views: FewShotViews, split: str,
                           episodes: Mapping[int, Sequence[Any]], settings: Sequence[Any],
                           *, tag: str) -> dict[tuple[int, Any], np.ndarray]:
    import schane.fewshot as fewshot

    if not all(isinstance(s, tuple) and len(s) == 2 for s in settings):
        raise ValueError(f"protocol B evaluates (steps, lr) settings, got {list(settings)!r}; build them with "
                         "schane.fewshot.settings_grid(cfg.fewshot.finetune_steps, cfg.fewshot.finetune_lr)")
    fs = cfg.fewshot
    grid = [fewshot.Setting(int(s), float(lr) if int(s) > 0 else 0.0) for s, lr in settings]
    criterion = None
    if fs.finetune_loss == "joint":
        from schane.engine.criterion import build_criterion

        criterion = build_criterion(cfg.loss).joint
    # one call for all shots: the frozen part's outputs of an image are computed once for every shot
    every = [e for shot in episodes for e in episodes[shot]]
    res = fewshot.evaluate_protocol_b_grid(
        model, every, views.support[split], views.eval[split], settings=grid, params=fs.finetune_params,
        last_layers=fs.finetune_last_layers, criterion=criterion, seed=fs.episode_seed,
        batch_size=cfg.data.eval_batch_size, progress=cfg.train.progress,
        desc=f"{tag} {split} {'+'.join(str(s) for s in episodes)}-shot B",
    )
    out: dict[tuple[int, Any], np.ndarray] = {}
    start = 0
    for shot in episodes:
        n = len(episodes[shot])
        for given, setting in zip(settings, grid, strict=True):
            out[(shot, given)] = res[setting][start:start + n]
        start += n
    return out


# --------------------------------------------------------------------------- images a user hands over


def find_images(path: str | Path) -> list[Path]:
    """The image files under a folder (walked recursively, sorted, hidden files and folders skipped), or the
    file itself when ``path`` is one image.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when it holds no image file (the accepted extensions are named).
    """
    from schane.data.base import IMG_EXTENSIONS

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
        from schane.data.base import CorruptImageError, load_image

        try:
            img = load_image(self.source[i]) if self._paths else self.source[i][0]
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
    from schane.engine.utils import autocast, uses_channels_last
    from schane.progress import progress as _progress

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
    "FewShotViews",
    "Loaded",
    "ReadableImages",
    "check_class_names",
    "config_diff",
    "dataset_splits",
    "eval_dataset",
    "eval_transform_for",
    "fewshot_accuracies",
    "fewshot_views",
    "find_images",
    "forward_images",
    "load_for_evaluation",
    "load_split",
    "preprocessing_for",
    "prepare_for_inference",
    "prepare_run_dir",
    "support_transform_for",
    "train_transform_for",
    "with_overrides",
    "write_skipped",
]
