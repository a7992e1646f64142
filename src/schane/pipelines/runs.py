"""Run directories, configs of runs and checkpoints loaded for evaluation, written once.

* :func:`load_run_config`, :func:`check_config`: a config checked in full, its dataset and dataset options
  against the dataset registry included (:mod:`schane.config` imports nothing of the data package);
* :func:`prepare_run_dir`: a run directory that can be written, checked before any work starts;
* :func:`config_diff`, :func:`with_overrides`: what differs between two configs (resume warnings, run reuse),
  a config with overrides applied;
* :func:`load_for_evaluation`, :func:`prepare_for_inference`: a trained model from a checkpoint, with
  config overrides, ready to run;
* :func:`check_class_names`: the data's classes are the checkpoint's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from schane.config import Config, apply_overrides, from_dict, load_config, to_dict, validate
from schane.data import dataset_info
from schane.engine.checkpoint import CheckpointError, CheckpointFieldError, load_checkpoint_model
from schane.engine.device import resolve_channels_last, resolve_device
from schane.models import SCHaNeModel

logger = logging.getLogger(__name__)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def check_config(cfg: Config) -> None:
    """Validate ``cfg`` in full before any work starts: every section, and ``data.name``/``data.options``
    against the dataset registry.

    Raises:
        ValueError: naming the offending dotted key.
    """
    validate(cfg, datasets=dataset_info)


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] | None = None) -> Config:
    """:func:`schane.config.load_config`, with the dataset and its options checked against the registry.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: on invalid YAML, unknown keys, wrong types, invalid values or an unknown dataset option.
    """
    return load_config(path, list(overrides or []), datasets=dataset_info)


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

    model: SCHaNeModel
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


def prepare_for_inference(model: ModuleT, cfg: Config, device: torch.device) -> ModuleT:
    """``model`` in eval mode on ``device``, channels-last when ``train.channels_last`` resolves so."""

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


__all__ = [
    "check_config",
    "load_run_config",
    "Loaded",
    "check_class_names",
    "config_diff",
    "load_for_evaluation",
    "prepare_for_inference",
    "prepare_run_dir",
    "with_overrides",
]
