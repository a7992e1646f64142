"""What a weights file holds and what loading it into a backbone would do, without loading it.

``schane inspect-weights PATH --backbone NAME [--set model.backbone_kwargs.img_size=384]`` prints
:meth:`WeightsReport.format` and exits 2 with :meth:`WeightsReport.problem` when the file does not
fit. The backbone is built on the ``meta`` device, so even BEiT-3 large costs no memory, and the
plan is the one :func:`~schane.models.weights.load_backbone_weights` follows when training.

Examples:
    >>> report = inspect_weights("beit3_base_patch16_224.pth", "beit3_base_patch16_224")  # doctest: +SKIP
    >>> print(report.format())  # doctest: +SKIP
    >>> report.ignored_by_reason()["pretraining head (masked image modelling)"]  # doctest: +SKIP
    ['mim_head.weight', 'mim_head.bias']
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .weights import group_by_reason, plan_backbone_load, read_weights_file, unwrap_checkpoint

_SHOW = 4  # keys listed per group


@dataclass
class WeightsReport:
    """The contents of a weights file and its fit to one backbone.

    Attributes:
        path: the file.
        file_format: what the content was recognised as (PyTorch zip archive, legacy, safetensors).
        file_bytes: its size.
        wrapper: container keys walked to the state_dict (e.g. ``["model"]``).
        stripped_prefixes: key prefixes removed from every key (e.g. ``["module."]``).
        extras: other top-level entries ``{name: description}`` (e.g. ``epoch``, ``args``).
        n_tensors: tensors in the state_dict.
        n_params: their total number of elements.
        dtypes: ``{dtype: number of tensors}``.
        backbone: the backbone name.
        backbone_kwargs: its keyword arguments.
        loaded: ``{backbone key: shape}`` that would be copied.
        loaded_params: elements copied.
        ignored: ``{checkpoint key: reason}`` dropped on purpose.
        ignored_params: ``{checkpoint key: elements}`` for the ignored keys.
        interpolated: ``{key: (file shape, backbone shape)}``.
        fresh: ``{backbone key: reason}`` absent from the file and allowed to be.
        missing: backbone keys the file lacks.
        unexpected: file keys the backbone has no slot for.
        bad_shapes: shape mismatch descriptions.
    """

    path: str
    file_format: str
    file_bytes: int
    wrapper: list[str]
    stripped_prefixes: list[str]
    extras: dict[str, str]
    n_tensors: int
    n_params: int
    dtypes: dict[str, int]
    backbone: str
    backbone_kwargs: dict[str, Any]
    loaded: dict[str, tuple[int, ...]]
    loaded_params: int
    ignored: dict[str, str]
    ignored_params: dict[str, int]
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bad_shapes: list[str] = field(default_factory=list)
    _problem: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the file loads into the backbone (strictly)."""
        return self._problem is None

    def problem(self) -> str | None:
        """The one-line reason the file does not fit the backbone, or ``None``."""
        return self._problem

    def check(self) -> None:
        """Raise when the file does not fit.

        Raises:
            ValueError: with :meth:`problem` as the message.
        """
        if self._problem is not None:
            raise ValueError(self._problem)

    def ignored_by_reason(self) -> dict[str, list[str]]:
        """``{reason: [keys]}`` of the ignored keys, in file order."""
        return group_by_reason(self.ignored)

    def format(self) -> str:
        """A human-readable, multi-line description (what ``schane inspect-weights`` prints)."""
        kw = ", ".join(f"{k}={v!r}" for k, v in self.backbone_kwargs.items())
        extras = ", ".join(f"{k}: {v}" for k, v in self.extras.items()) or "none"
        dtypes = ", ".join(f"{d} ({n})" for d, n in self.dtypes.items())
        lines = [
            f"file          {self.path}",
            f"format        {self.file_format}, {self.file_bytes:,} bytes (recognised by content)",
            f"wrapper       {' -> '.join(repr(k) for k in self.wrapper) or 'none (a bare state_dict)'}",
            f"other entries {extras}",
            f"prefix        {', '.join(repr(p) for p in self.stripped_prefixes) or 'none'} stripped",
            f"holds         {_tensors(self.n_tensors)}, {self.n_params:,} parameters; dtypes: {dtypes}",
            f"backbone      {self.backbone}" + (f" ({kw})" if kw else ""),
            f"loaded        {_tensors(len(self.loaded))}, {self.loaded_params:,} parameters",
        ]
        groups = self.ignored_by_reason()
        total = sum(self.ignored_params.values())
        lines.append(f"ignored       {_tensors(len(self.ignored))}, {total:,} parameters" + (":" if groups else ""))
        for reason, keys in groups.items():
            n = sum(self.ignored_params[k] for k in keys)
            lines.append(f"  - {reason}: {_tensors(len(keys))}, {n:,} parameters ({_keys(keys)})")
        for key, (old, new) in self.interpolated.items():
            lines.append(f"interpolated  {key}: {old} -> {new}")
        for reason, keys in group_by_reason(self.fresh).items():
            lines.append(f"not in file   {', '.join(keys)}: {reason}")
        lines.append(f"missing       {len(self.missing)}" + (f" ({_keys(self.missing)})" if self.missing else ""))
        lines.append(
            f"unexpected    {len(self.unexpected)}" + (f" ({_keys(self.unexpected)})" if self.unexpected else "")
        )
        if self.bad_shapes:
            lines.append(f"wrong shape   {len(self.bad_shapes)} ({_keys(self.bad_shapes)})")
        lines.append(f"result        {'fits ' + self.backbone if self.ok else 'does not fit: ' + str(self._problem)}")
        return "\n".join(lines)


def _tensors(n: int) -> str:
    return f"{n} tensor" + ("" if n == 1 else "s")


def _keys(keys: list[str]) -> str:
    more = f", ... +{len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _skeleton(backbone: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The backbone without weights, on the meta device (names and shapes only)."""
    from .backbones import create_backbone

    with torch.device("meta"):
        model, _ = create_backbone(backbone, pretrained=False, checkpoint=None, **kwargs)
    return model


def inspect_weights(path: str | os.PathLike[str], backbone: str, **backbone_kwargs: Any) -> WeightsReport:
    """Describe a weights file and what loading it into ``backbone`` would load, ignore or miss.

    Nothing is trained or copied: the file is read safely (as for training) and the backbone is
    built on the ``meta`` device.

    Args:
        path: the weights file (any name; recognised by content).
        backbone: a ``model.backbone`` name (timm, ``effnet-lite0-offline`` or BEiT-3).
        **backbone_kwargs: ``model.backbone_kwargs`` (e.g. ``img_size=384`` for BEiT-3).

    Returns:
        A :class:`WeightsReport`; ``report.ok`` says whether the file fits.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an unreadable, unrecognised or refused file, one without a state_dict, or an
            unknown backbone / keyword argument.
    """
    p = Path(path)
    obj, fmt = read_weights_file(p)
    contents = unwrap_checkpoint(obj, source=str(p))
    sd = contents.state_dict
    model = _skeleton(backbone, dict(backbone_kwargs))
    plan = plan_backbone_load(model, sd, source=str(p))
    ignored = {**contents.dropped, **plan.ignored}
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
    return WeightsReport(
        path=str(p),
        file_format=fmt,
        file_bytes=p.stat().st_size,
        wrapper=contents.wrapper,
        stripped_prefixes=contents.stripped_prefixes,
        extras=contents.extras,
        n_tensors=len(sd) + len(contents.dropped),
        n_params=sum(v.numel() for v in sd.values()) + sum(contents.dropped_params.values()),
        dtypes=dict(dtypes.most_common()),
        backbone=backbone,
        backbone_kwargs=dict(backbone_kwargs),
        loaded={k: tuple(v.shape) for k, v in plan.to_load.items()},
        loaded_params=sum(v.numel() for v in plan.to_load.values()),
        ignored=ignored,
        ignored_params={**contents.dropped_params, **{k: _numel(k, sd) for k in plan.ignored}},
        interpolated=plan.interpolated,
        fresh=plan.fresh,
        missing=plan.missing,
        unexpected=plan.unexpected,
        bad_shapes=plan.bad_shapes,
        _problem=plan.problem(),
    )


def _numel(key: str, sd: dict[str, torch.Tensor]) -> int:
    # a key the backbone renamed (BEiT-3 files saved without the "beit3." prefix) has its old name in sd
    found = sd.get(key, sd.get(key.removeprefix("beit3.")))
    return 0 if found is None else found.numel()
