"""Frozen features of the images a set of few-shot episodes uses, extracted once per model.

The pooled pre-projection features of a split's images are extracted once per model: one pass with the
deterministic evaluation view and ``n_aug`` seeded passes with the support augmentation. Every episode of
protocol A then reads its support and query features from this :class:`FeatureBank`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from schane.engine.batches import SeededItems
from schane.engine.evaluate import extract_features
from schane.fewshot.episodes import Episode

ExtractFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FeatureBank:
    """Features of the images a set of episodes uses, extracted once per model.

    Attributes:
        eval_index: ``{dataset index: row}`` into ``eval_features``.
        eval_features: ``[R, d]`` evaluation-view features (float32, CPU).
        aug_index: ``{dataset index: row}`` into ``aug_features`` (support images only).
        aug_features: ``[n_aug, S, d]`` features of the augmented copies (``n_aug`` may be 0).
    """

    eval_index: dict[int, int]
    eval_features: torch.Tensor
    aug_index: dict[int, int]
    aug_features: torch.Tensor

    @property
    def n_aug(self) -> int:
        return int(self.aug_features.shape[0])

    def _rows(self, index: dict[int, int], ids: Sequence[int], what: str) -> list[int]:
        try:
            return [index[i] for i in ids]
        except KeyError as e:
            raise ValueError(
                f"image {e.args[0]} has no {what} feature in this bank; build the bank from the same episodes"
            ) from None

    def eval_of(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), d]`` evaluation-view features."""
        return self.eval_features[self._rows(self.eval_index, ids, "evaluation-view")]

    def support_of(self, ids: Sequence[int]) -> torch.Tensor:
        """``[max(n_aug, 1), len(ids), d]``: the augmented copies, or the evaluation view when ``n_aug == 0``."""
        if self.n_aug == 0:
            return self.eval_of(ids).unsqueeze(0)
        return self.aug_features[:, self._rows(self.aug_index, ids, "augmented")]


def _default_extract() -> ExtractFn:

    return extract_features


def build_feature_bank(
    model: nn.Module,
    eval_dataset: Dataset,
    support_dataset: Dataset | None,
    episodes: Sequence[Episode],
    *,
    n_aug: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
    extract_fn: ExtractFn | None = None,
) -> FeatureBank:
    """Extract the features the episodes need: each image once per view.

    Only images that occur in some episode are processed: every support and query image
    with ``eval_dataset`` (deterministic view), and every support image ``n_aug`` more times
    with ``support_dataset`` (random augmentation). Copy ``k`` of image ``i`` is drawn under
    RNGs seeded by ``(seed, k, i)`` (:class:`SeededItems`), so every model sees the same
    crops of the same images and the global RNG is left untouched.

    Args:
        model: a model with ``forward_features`` (``extract_fn`` decides how it is called).
        eval_dataset: the split with the evaluation transform, returning ``(image, label)``.
        support_dataset: the same split with the support augmentation (unused when ``n_aug == 0``).
        episodes: every episode the bank must serve (e.g. the 1-shot and 5-shot lists).
        n_aug: augmented copies per support image (0: use the evaluation view).
        seed: augmentation seed.
        batch_size: extraction batch size.
        device: where the model runs (default: the model's device).
        progress: show progress bars.
        extract_fn: ``f(model, dataset, *, batch_size, device, progress) -> (features[N, d], labels[N])``;
            defaults to :func:`schane.engine.evaluate.extract_features`.

    Returns:
        The :class:`FeatureBank`.

    Raises:
        ValueError: when ``n_aug < 0``, no episodes are given, or ``support_dataset`` is missing.
    """
    if n_aug < 0:
        raise ValueError(f"n_aug must be >= 0, got {n_aug}")
    if not episodes:
        raise ValueError("build_feature_bank needs at least one episode")
    if n_aug > 0 and support_dataset is None:
        raise ValueError("n_aug > 0 needs a support_dataset with the support augmentation")
    n_eval = len(cast(Sized, eval_dataset))  # torch's Dataset type declares no __len__; these are sized datasets
    if n_eval != (len(cast(Sized, support_dataset)) if support_dataset is not None else n_eval):
        raise ValueError("eval_dataset and support_dataset must be the same split (equal lengths)")
    extract = extract_fn or _default_extract()
    all_ids = sorted({i for e in episodes for i in (*e.support, *e.query)})
    sup_ids = sorted({i for e in episodes for i in e.support})
    if all_ids[-1] >= n_eval:
        raise ValueError(f"episode index {all_ids[-1]} is out of range for a split of {n_eval} images")

    def run(ds: Dataset, ids: list[int]) -> torch.Tensor:
        feats, _ = extract(model, Subset(ds, ids), batch_size=batch_size, device=device, progress=progress)
        return feats.detach().float().cpu()

    eval_features = run(eval_dataset, all_ids)
    aug = []
    for k in range(n_aug):
        aug.append(run(SeededItems(support_dataset, seed, k), sup_ids))  # type: ignore[arg-type]
    d = eval_features.shape[1]
    aug_features = torch.stack(aug) if aug else torch.empty(0, len(sup_ids), d)
    return FeatureBank(
        eval_index={i: r for r, i in enumerate(all_ids)},
        eval_features=eval_features,
        aug_index={i: r for r, i in enumerate(sup_ids)},
        aug_features=aug_features,
    )


__all__ = ["ExtractFn", "FeatureBank", "build_feature_bank"]
