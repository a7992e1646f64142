"""SCHaNe in 🤗 transformers' ``Trainer``: λ·SCHaNe + (1 − λ)·CE for any transformers image classifier.

Three pieces, usable together (:class:`SCHaNeTrainer`) or one by one with a stock ``Trainer``:

* :func:`add_projection_head` gives the model a projection head (``model.schane_projector``: Linear(d, d), ReLU,
  Linear(d, 128), L2-normalised) on the feature its classifier reads, and adds its output to the model's output as
  ``outputs["projections"]`` during training (:class:`SCHaNeClassifierOutput`). The head is a submodule, so the Trainer's optimizer trains it and
  DDP synchronises it; :func:`remove_projection_head` takes it off before a final ``save_pretrained``.
* :class:`SCHaNeTrainerLoss` is a ``compute_loss_func`` for ``Trainer(compute_loss_func=...)``. With more than one
  process (``accelerate launch`` / ``torchrun``) it contrasts each rank's anchors with every rank's embeddings and
  labels: the embeddings go through schane's differentiable all-gather (accelerate's ``gather`` has no backward, so
  gradients through it would be wrong), on the process group accelerate set up, and the gradients equal those of
  one process on the whole batch. It scales the loss by ``n / num_items_in_batch`` the way Trainer expects of a
  ``compute_loss_func`` (Trainer multiplies it by the number of processes when ``average_tokens_across_devices``,
  and does not divide it by the gradient-accumulation steps), so the optimizer sees the mean over the whole
  accumulated, all-process batch.
* :class:`SCHaNeTrainer` wires both and adds the loss components (``schane_loss``, ``ce_loss``, averaged over the
  steps since the last log and over processes) to the Trainer's logs.

Batches come from :class:`schane.integrations.views.TwoViewCollator` (two views per image, views first-then-second,
labels repeated to match).

Examples:
    >>> from transformers import AutoModelForImageClassification, TrainingArguments
    >>> model = AutoModelForImageClassification.from_pretrained("my_vit", num_labels=10)  # doctest: +SKIP
    >>> trainer = SCHaNeTrainer(model=model, args=TrainingArguments("out", remove_unused_columns=False),
    ...                         train_dataset=two_view_dataset, data_collator=TwoViewCollator())  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from schane.models.hf import _classifier_linear as find

try:
    from transformers import Trainer
    from transformers.utils import ModelOutput
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("schane.integrations.transformers needs transformers and accelerate: "
                      "pip install 'schane[hf]'") from None

from schane.distributed import is_distributed, world_size
from schane.integrations.views import TwoViewCollator, TwoViewTransform
from schane.losses import JointLoss, SCHaNeLoss
from schane.models.heads import ProjectionHead

PROJECTOR = "schane_projector"


@dataclass
class SCHaNeClassifierOutput(ModelOutput):
    """An image classifier's output with the SCHaNe projections (a ``ModelOutput``, so DDP can rebuild it).

    Attributes:
        loss: the model's own loss (``None`` when the labels are handled by ``compute_loss_func``).
        logits: ``[B, C]``.
        projections: unit-norm ``[B, P]`` (training only).
        hidden_states: as the model returned them.
        attentions: as the model returned them.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _classifier_linear(model: nn.Module) -> nn.Linear:

    parent, attr, _ = find(model)
    return getattr(parent, attr)


def add_projection_head(model: nn.Module, proj_dim: int = 128) -> nn.Module:
    """Give a transformers image classifier a SCHaNe projection head on its classifier's input feature.

    Args:
        model: e.g. ``ViTForImageClassification`` (its ``classifier`` must be one Linear, possibly inside a
            parameter-free ``Sequential``).
        proj_dim: projection size ``P``.

    Returns:
        ``model`` itself; in training mode its output gains ``projections [B, P]`` (unit norm).

    Raises:
        ValueError: when the model's classifier is not one Linear layer, or ``proj_dim`` is not positive.
    """
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim <= 0:
        raise ValueError(f"proj_dim must be a positive integer, got {proj_dim!r}")
    if hasattr(model, PROJECTOR):
        return model
    linear = _classifier_linear(model)
    model.add_module(PROJECTOR, ProjectionHead(linear.in_features, proj_dim))
    seen: dict[str, torch.Tensor] = {}

    def keep_feature(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen["feature"] = args[0]

    def add_projections(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        feature = seen.pop("feature", None)
        if module.training and feature is not None:
            fields = {k: output.get(k) for k in ("loss", "logits", "hidden_states", "attentions")}
            return SCHaNeClassifierOutput(**fields, projections=getattr(module, PROJECTOR)(feature))
        return output

    # torch's stubs type Module.__setattr__ values as Tensor | Module only; any value is accepted (stored as is)
    model._schane_hooks = (linear.register_forward_pre_hook(keep_feature),  # type: ignore[assignment]
                           model.register_forward_hook(add_projections, with_kwargs=True))
    return model


def remove_projection_head(model: nn.Module) -> nn.Module:
    """Take the projection head and its hooks off (before ``save_pretrained`` of the final classifier)."""
    for h in getattr(model, "_schane_hooks", ()):
        h.remove()
    if hasattr(model, PROJECTOR):
        delattr(model, PROJECTOR)
    model.__dict__.pop("_schane_hooks", None)
    return model


class SCHaNeTrainerLoss:
    """``compute_loss_func(outputs, labels, num_items_in_batch)``: λ·SCHaNe(projections) + (1 − λ)·CE(logits).

    Args:
        lam: weight of the contrastive term (0.9 in the paper).
        temperature: τ (0.5).
        beta: hard-negative concentration β (1.0).
        label_smoothing: of the CE term.
        gather_distributed: contrast against every process's embeddings when there are several (training only;
            evaluation batches stay per process).

    Raises:
        ValueError: for hyper-parameters out of range (see :class:`schane.losses.JointLoss`), or outputs without
            ``projections`` in training (the model has no :func:`add_projection_head`).
    """

    def __init__(self, lam: float = 0.9, temperature: float = 0.5, beta: float = 1.0, label_smoothing: float = 0.0,
                 gather_distributed: bool = True) -> None:
        self.gather_distributed = bool(gather_distributed)
        self.contrastive = SCHaNeLoss(temperature=temperature, beta=beta)
        self.joint = JointLoss(self.contrastive, lam=lam, label_smoothing=label_smoothing)
        self._sums: dict[str, float] = {}
        self._count = 0

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """The loss Trainer back-propagates.

        Args:
            outputs: the model's output with ``logits [N, C]`` and (training) ``projections [N, P]``; ``N = 2B``
                rows from :class:`~schane.integrations.views.TwoViewCollator`.
            labels: ``[N]``.
            num_items_in_batch: what Trainer counts over the accumulated batch (and processes), or ``None``.

        Returns:
            A scalar: ``total * N / num_items_in_batch`` (``total`` when it is ``None``).
        """
        logits = outputs["logits"]
        training = torch.is_grad_enabled()
        z = outputs.get("projections") if hasattr(outputs, "get") else None
        if z is None:
            if training and self.joint.lam > 0:
                raise ValueError("the model's outputs have no 'projections': call "
                                 "schane.integrations.transformers.add_projection_head(model) before training")
            return nn.functional.cross_entropy(logits.float(), labels.long())
        self.contrastive.gather_distributed = self.gather_distributed and training and is_distributed() \
            and world_size() > 1
        out = self.joint(logits, labels, z)
        if training:
            for key, value in (("schane_loss", out.contrastive), ("ce_loss", out.ce)):
                if value is not None:
                    self._sums[key] = self._sums.get(key, 0.0) + float(value.detach())
            self._count += 1
        total = out.total
        if num_items_in_batch is not None:
            total = total * (labels.numel() / float(num_items_in_batch))
        return total

    def pop_means(self) -> dict[str, float]:
        """This process's mean of each component over the training steps since the last call (then reset).

        The contrastive value of one process is the number of processes times its share, so the mean over
        processes is the loss of the whole batch."""
        means = {k: v / self._count for k, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return means


class SCHaNeTrainer(Trainer):
    """``transformers.Trainer`` that fine-tunes with λ·SCHaNe + (1 − λ)·CE and logs both terms.

    Takes every ``Trainer`` argument. Without ``compute_loss_func`` it uses :class:`SCHaNeTrainerLoss` with
    ``lam``, ``temperature``, ``beta``; it adds the projection head to ``model`` (:func:`add_projection_head`) and
    uses :class:`~schane.integrations.views.TwoViewCollator` when no ``data_collator`` is given.

    Args:
        *args: ``Trainer``'s positional arguments.
        lam: weight of the contrastive term.
        temperature: τ.
        beta: β.
        proj_dim: projection size.
        **kwargs: ``Trainer``'s keyword arguments.

    Raises:
        ValueError: when the model's classifier is not one Linear layer, or a hyper-parameter is out of range.
    """

    def __init__(self, *args: Any, lam: float = 0.9, temperature: float = 0.5, beta: float = 1.0,
                 proj_dim: int = 128, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            add_projection_head(model, proj_dim)
        kwargs.setdefault("compute_loss_func", SCHaNeTrainerLoss(lam=lam, temperature=temperature, beta=beta))
        kwargs.setdefault("data_collator", TwoViewCollator())
        super().__init__(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the mean loss components since the last log (over processes) to training logs."""
        fn = self.compute_loss_func
        if "loss" in logs and isinstance(fn, SCHaNeTrainerLoss):
            means = fn.pop_means()
            if means:
                keys = sorted(means)
                t = torch.tensor([means[k] for k in keys], device=self.args.device)
                t = self.accelerator.reduce(t, reduction="mean") if self.accelerator.num_processes > 1 else t
                logs.update({k: round(float(v), 4) for k, v in zip(keys, t.tolist(), strict=True)})
        super().log(logs, *args, **kwargs)


__all__ = ["SCHaNeClassifierOutput", "SCHaNeTrainer", "SCHaNeTrainerLoss", "TwoViewCollator", "TwoViewTransform", "add_projection_head",
           "remove_projection_head"]
