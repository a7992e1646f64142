"""Optimiser and learning-rate schedule: AdamW, layer-wise lr decay, per-step warmup + cosine.

Layer-wise decay follows timm / BEiT: the backbone's ``group_matcher()`` numbers its layers from
the input (stem = 0) upwards; the heads (classifier, projector, and any backbone parameter the
matcher leaves unmatched, e.g. BEiT-3's ``fc_norm``) form the top layer. A parameter in layer
``i`` of ``L`` layers gets ``lr_scale = layer_decay ** (L - 1 - i)``, so the heads train at the
full learning rate. Norm weights, biases, every other 1-D parameter and tokens / position
embeddings get no weight decay.

The scheduler sets, at optimiser step ``t`` (``W`` warmup steps, ``T`` total steps, peak ``lr``)::

    base(t) = lr * (t + 1) / W                                          if t < W
            = min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (t - W) / (T - W)))  otherwise (t >= T: min_lr)
    group_lr(t) = group["lr_scale"] * base(t)

as in the BEiT-3 release, where the scale multiplies the whole schedule.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

if TYPE_CHECKING:
    from schane.config import OptimConfig

# Parameters that are tokens or position tables: no weight decay whatever their rank.
_NO_DECAY_RE = re.compile(
    r"(^|\.)(cls_token|dist_token|reg_token|mask_token|pos_embed|pos_embedding|position_embeddings|"
    r"embed_positions|absolute_pos_embed|relative_position_bias_table|rel_pos_h|rel_pos_w|logit_scale)(\.|$)"
)


def _matcher_regexes(matcher: Any) -> list[re.Pattern[str]] | None:
    """The regexes of a timm dict group matcher (``None`` for callable matchers)."""
    if not isinstance(matcher, dict):
        return None
    out = []
    for spec in matcher.values():
        if spec is None:
            continue
        if isinstance(spec, (list, tuple)):
            out += [re.compile(s[0]) for s in spec]
        else:
            out.append(re.compile(spec))
    return out


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every parameter for layer-wise lr decay.

    The backbone is ``model.backbone`` when present (a :class:`~schane.models.SCHaNeModel`),
    else ``model`` itself. Its ``group_matcher(coarse=False)`` gives ids from 0 (stem) upwards;
    parameters it does not match, and all parameters outside the backbone, share the top id.

    Args:
        model: the model.

    Returns:
        ``({param_name: layer_id}, num_layers)``.
    """
    from timm.models import group_parameters

    backbone = getattr(model, "backbone", model)
    prefix = next((f"{n}." for n, m in model.named_modules() if m is backbone and n), "")
    names = [n for n, _ in model.named_parameters()]
    bb_names = [n for n, _ in backbone.named_parameters()]
    if hasattr(backbone, "group_matcher"):
        matcher = cast(Any, backbone).group_matcher(coarse=False)  # timm's method, not on nn.Module
        bb_map = group_parameters(backbone, matcher, reverse=True)
        regexes = _matcher_regexes(matcher)
        matched = {n for n in bb_names if regexes is None or any(r.match(n) for r in regexes)}
    else:
        warnings.warn(
            f"{type(backbone).__name__} has no group_matcher(); layer-wise lr decay treats the whole backbone as one layer",
            stacklevel=2,
        )
        bb_map = dict.fromkeys(bb_names, 0)
        matched = set(bb_names)
    ids_matched = sorted({bb_map[n] for n in matched})
    # Renumber densely so unmatched (head-like) ids at the end do not leave holes.
    dense = {old: i for i, old in enumerate(ids_matched)}
    top = len(ids_matched)
    out: dict[str, int] = {}
    bb_set = set(bb_names)
    for n in names:
        local = n[len(prefix) :] if prefix and n.startswith(prefix) else n
        if (not prefix or n.startswith(prefix)) and local in bb_set and local in matched:
            out[n] = dense[bb_map[local]]
        else:
            out[n] = top
    return out, top + 1


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names from ``no_weight_decay()`` of the model and its backbone, as full parameter names."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            prefix = f"{mod_name}." if mod_name else ""
            names |= {prefix + k for k in fn()}
    return names


def param_groups_layer_decay(
    model: nn.Module, weight_decay: float, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr scales and weight-decay exclusions.

    Args:
        model: a :class:`~schane.models.SCHaNeModel` (or any module; see :func:`layer_ids`).
        weight_decay: decay for weight matrices / kernels.
        layer_decay: per-layer lr multiplier in ``(0, 1]``; ``None`` or 1 means no decay.

    Returns:
        Groups ``{"params", "weight_decay", "lr_scale", "layer_id", "group_name"}`` ordered by
        layer then decay; every trainable parameter appears in exactly one group.

    Raises:
        ValueError: for a negative weight decay, a layer decay outside ``(0, 1]``, or a model
            without trainable parameters.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] or None, got {layer_decay}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    ids, num_layers = layer_ids(model)
    no_decay_names = _no_decay_names(model)
    decay_factor = 1.0 if layer_decay is None else float(layer_decay)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in no_decay_names or bool(_NO_DECAY_RE.search(name))
        lid = ids[name]
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else float(weight_decay),
                "lr_scale": decay_factor ** (num_layers - 1 - lid),
                "layer_id": lid,
                "group_name": f"layer_{lid}_{'no_decay' if no_decay else 'decay'}",
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups_layer_decay` groups.

    Args:
        model: the model.
        optim_cfg: :class:`schane.config.OptimConfig` (``weight_decay``, ``layer_decay``, ``betas``).
        lr: peak learning rate (after any batch-size scaling); each group starts at ``lr * lr_scale``
            and keeps ``peak_lr = lr`` for the scheduler.

    Raises:
        ValueError: for ``lr <= 0`` or invalid decay settings.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    groups = param_groups_layer_decay(model, optim_cfg.weight_decay, optim_cfg.layer_decay)
    for g in groups:
        g["peak_lr"] = float(lr)
        g["lr"] = float(lr) * g["lr_scale"]
    return torch.optim.AdamW(
        groups, lr=float(lr), betas=(optim_cfg.betas[0], optim_cfg.betas[1]), weight_decay=optim_cfg.weight_decay
    )


def warmup_cosine(step: int, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Unscaled learning rate at optimiser step ``step`` (see the module docstring)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """Per-step linear warmup then cosine decay to ``min_lr``, times each group's ``lr_scale``.

    Call :meth:`step` once after every optimiser step. ``state_dict()`` / ``load_state_dict()``
    round-trip the position (``last_epoch`` counts steps) for exact resumption.

    Args:
        optimizer: optimiser whose groups may carry ``lr_scale`` (default 1) and ``peak_lr``
            (the unscaled peak; default: the group's current lr, which the scale then multiplies).
        warmup_steps: steps of linear warmup (0 for none).
        total_steps: total optimiser steps; the rate reaches ``min_lr`` there.
        min_lr: final (unscaled) learning rate.
        last_epoch: index of the last step taken (``-1`` for a fresh schedule).

    Raises:
        ValueError: for ``total_steps < 1``, ``warmup_steps`` outside ``[0, total_steps]`` or ``min_lr < 0``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {min_lr}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)
        for g in optimizer.param_groups:
            g.setdefault("lr_scale", 1.0)
            g.setdefault("peak_lr", g.get("initial_lr", g["lr"]))
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        step = max(self.last_epoch, 0)
        return [
            g["lr_scale"]
            * warmup_cosine(
                step,
                peak_lr=g["peak_lr"],
                min_lr=self.min_lr,
                warmup_steps=self.warmup_steps,
                total_steps=self.total_steps,
            )
            for g in self.optimizer.param_groups
        ]


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, steps_per_epoch: int
) -> WarmupCosineLR:
    """Warmup + cosine schedule over ``optim_cfg.epochs * steps_per_epoch`` optimiser steps.

    Args:
        optimizer: from :func:`build_optimizer`.
        optim_cfg: ``epochs``, ``warmup_epochs`` (may be fractional) and ``min_lr``.
        steps_per_epoch: optimiser steps per epoch (after gradient accumulation).

    Raises:
        ValueError: for ``steps_per_epoch < 1`` or a warmup longer than the run.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = int(optim_cfg.epochs) * int(steps_per_epoch)
    warmup = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    if warmup > total:
        raise ValueError(
            f"optim.warmup_epochs={optim_cfg.warmup_epochs} is longer than optim.epochs={optim_cfg.epochs}; lower it"
        )
    return WarmupCosineLR(optimizer, warmup_steps=warmup, total_steps=total, min_lr=optim_cfg.min_lr)
