"""Few-shot evaluators.

**Protocol A** (frozen features + logistic regression, the authors' protocol): the pooled
pre-projection features of a split's images are extracted once per model — one pass with
the deterministic evaluation view and ``n_aug`` seeded passes with the support augmentation
— and reused by every episode. Per episode an L2-regularised multinomial logistic
regression (scikit-learn ``LogisticRegression``, lbfgs, inverse regularisation ``C``) is
fitted on the L2-normalised features of the ``n_aug`` augmented copies of each support
image and scores the queries' evaluation-view features.

**Protocol B** (per-episode fine-tuning): starting from the same weights in every episode,
the whole model plus a new linear head over the episode's classes is fine-tuned for a few
Adam steps on the support set, with cross-entropy or the joint loss ``λ·SCHaNe + (1−λ)·CE``
(two augmented views of each support image give every anchor a positive even at 1-shot);
the queries are classified, and the weights, buffers, train/eval mode and ``requires_grad``
flags are restored exactly.
"""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from schane.fewshot.episodes import Episode

ExtractFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- feature bank


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


def _stable_seed(*parts: int) -> int:
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


class SeededItems(Dataset):
    """``dataset[i]`` computed under torch and Python RNGs seeded by ``(seed, copy, i)``.

    Wraps a dataset whose random transform runs inside ``__getitem__``: item ``i`` of copy
    ``k`` is then the same augmented view in every run, for every model, whatever subset,
    order or number of workers is used. The caller's RNG states are left untouched.

    Args:
        dataset: returns ``(image, label)`` with a random transform applied.
        seed: the augmentation seed.
        copy: which augmented copy (0, 1, ...).
    """

    def __init__(self, dataset: Dataset, seed: int, copy: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.copy = int(copy)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = _stable_seed(self.seed, self.copy, i)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                return self.dataset[i]
        finally:
            random.setstate(py_state)


def _default_extract() -> ExtractFn:
    from schane.engine.evaluate import extract_features

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
    if len(eval_dataset) != (len(support_dataset) if support_dataset is not None else len(eval_dataset)):
        raise ValueError("eval_dataset and support_dataset must be the same split (equal lengths)")
    extract = extract_fn or _default_extract()
    all_ids = sorted({i for e in episodes for i in (*e.support, *e.query)})
    sup_ids = sorted({i for e in episodes for i in e.support})
    if all_ids[-1] >= len(eval_dataset):
        raise ValueError(f"episode index {all_ids[-1]} is out of range for a split of {len(eval_dataset)} images")

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


# --------------------------------------------------------------------------- protocol A


def logreg_predict(
    support: torch.Tensor | np.ndarray,
    support_labels: Sequence[int] | np.ndarray,
    query: torch.Tensor | np.ndarray,
    *,
    C: float = 1.0,
    normalize: bool = True,
    max_iter: int = 1000,
) -> np.ndarray:
    """Fit an L2-regularised multinomial logistic regression and predict the queries.

    Args:
        support: ``[S, d]`` support features, or ``[A, S, d]`` for ``A`` augmented copies
            of each support image (all copies are training points with the image's label).
        support_labels: ``[S]`` labels of the support images.
        query: ``[Q, d]`` query features.
        C: inverse regularisation strength (scikit-learn's ``C``; larger is weaker).
        normalize: L2-normalise every feature vector first.
        max_iter: lbfgs iterations.

    Returns:
        ``[Q]`` predicted labels.

    Raises:
        ValueError: on mismatched shapes, ``C <= 0`` or fewer than two support classes.
    """
    from sklearn.linear_model import LogisticRegression

    xs = torch.as_tensor(support, dtype=torch.float32)
    xq = torch.as_tensor(query, dtype=torch.float32)
    y = np.asarray(support_labels, dtype=np.int64)
    if xs.ndim == 2:
        xs = xs.unsqueeze(0)
    if xs.ndim != 3 or xq.ndim != 2 or xs.shape[-1] != xq.shape[-1]:
        raise ValueError(f"expected support [S, d] or [A, S, d] and query [Q, d], got {tuple(np.shape(support))} and {tuple(np.shape(query))}")
    if xs.shape[1] != y.shape[0]:
        raise ValueError(f"{xs.shape[1]} support features but {y.shape[0]} labels")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    if np.unique(y).size < 2:
        raise ValueError("logistic regression needs at least two support classes")
    if normalize:
        xs = F.normalize(xs, dim=-1)
        xq = F.normalize(xq, dim=-1)
    a = xs.shape[0]
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(xs.reshape(-1, xs.shape[-1]).numpy(), np.tile(y, a))
    return clf.predict(xq.numpy())


def _episode_acc_a(bank: FeatureBank, ep: Episode, C: float, normalize: bool) -> float:
    pred = logreg_predict(bank.support_of(ep.support), ep.support_labels, bank.eval_of(ep.query), C=C, normalize=normalize)
    return float(np.mean(pred == np.asarray(ep.query_labels)) * 100.0)


def _work_acc_a(xs: torch.Tensor, ys: list[int], xq: torch.Tensor, yq: list[int], C: float, normalize: bool) -> float:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        pred = logreg_predict(xs, ys, xq, C=C, normalize=normalize)
    return float(np.mean(pred == np.asarray(yq)) * 100.0)


def evaluate_protocol_a(
    bank: FeatureBank,
    episodes: Sequence[Episode],
    *,
    C: float = 1.0,
    normalize: bool = True,
    n_jobs: int = 1,
    progress: bool = True,
    desc: str = "episodes",
) -> np.ndarray:
    """Per-episode query accuracy (%) of logistic regression on frozen features.

    Args:
        bank: features from :func:`build_feature_bank` covering these episodes.
        episodes: the episodes, evaluated in order.
        C: inverse L2 regularisation strength.
        normalize: L2-normalise features.
        n_jobs: parallel worker processes (joblib); 1 runs in-process, -1 uses all cores.
            Lists of fewer than 32 episodes always run in-process.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        ``[len(episodes)]`` accuracies in percent.

    Raises:
        ValueError: when an episode uses an image missing from the bank, or on bad ``C``.
    """
    from threadpoolctl import threadpool_limits

    if n_jobs == 1 or len(episodes) < 32:
        # one BLAS thread: these problems are tiny, and thread hand-offs cost more than they gain
        with threadpool_limits(limits=1):
            accs = [
                _episode_acc_a(bank, ep, C, normalize)
                for ep in tqdm(episodes, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
            ]
    else:
        from joblib import Parallel, delayed

        work = [(bank.support_of(ep.support), ep.support_labels, bank.eval_of(ep.query), ep.query_labels) for ep in episodes]
        bar = tqdm(work, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
        accs = Parallel(n_jobs=n_jobs, batch_size=16)(delayed(_work_acc_a)(*w, C, normalize) for w in bar)
    return np.asarray(accs, dtype=np.float64)


# --------------------------------------------------------------------------- protocol B


def _stack(ds: Dataset, ids: Sequence[int]) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in ids])


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class ProtoHead(nn.Module):
    """Linear head on L2-normalised features, initialised from class prototypes.

    With ``c_j`` the mean normalised feature of class ``j``, ``W_j = 2·s·c_j`` and
    ``b_j = −s·‖c_j‖²``, so ``logit_j = s·(‖f‖² − ‖f − c_j‖²)``: before any step the head is
    the nearest-prototype classifier, scaled by ``s``.

    Args:
        prototypes: ``[N, d]`` class means of normalised support features.
        scale: the logit scale ``s``.
    """

    def __init__(self, prototypes: torch.Tensor, scale: float = 10.0) -> None:
        super().__init__()
        self.linear = nn.Linear(prototypes.shape[1], prototypes.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(2.0 * scale * prototypes)
            self.linear.bias.copy_(-scale * prototypes.pow(2).sum(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(features, dim=-1))


def finetune_episode(
    model: nn.Module,
    episode: Episode,
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    loss: str = "ce",
    lam: float = 0.9,
    temperature: float = 0.5,
    beta: float = 1.0,
    head_scale: float = 10.0,
) -> float:
    """Fine-tune on one episode's support set, classify its queries, restore the model.

    Every step draws two fresh augmented views of each support image (``support_dataset``
    applies a random transform on each access). BatchNorm/dropout stay in eval mode: a few
    support images cannot re-estimate normalisation statistics. The prototype head
    (:class:`ProtoHead`, from the evaluation views of the support images) and all model
    parameters with ``requires_grad`` are updated by Adam.

    Args:
        model: a model whose ``forward(x)`` returns an object with ``features[B, d]`` and
            ``projections[B, p]`` and which has ``forward_features(x) -> [B, d]``.
        episode: the episode.
        support_dataset: the split with the support augmentation.
        eval_dataset: the same split with the evaluation transform.
        steps: optimisation steps (0: the prototype classifier alone).
        lr: Adam learning rate.
        loss: ``"ce"`` or ``"joint"`` (``lam·SCHaNe + (1−lam)·CE`` on the two views).
        lam: the joint loss's weight of the contrastive term.
        temperature: SCHaNe temperature.
        beta: SCHaNe hard-negative concentration.
        head_scale: logit scale of the prototype head.

    Returns:
        Query accuracy in percent.

    Raises:
        ValueError: on an unknown ``loss`` or ``steps < 0``.
    """
    if loss not in ("ce", "joint"):
        raise ValueError(f"loss must be 'ce' or 'joint', got {loss!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = _model_device(model)
    saved_state = copy.deepcopy(model.state_dict())
    saved_mode = [(m, m.training) for m in model.modules()]
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    ys = torch.as_tensor(episode.support_labels, device=device)
    yq = torch.as_tensor(episode.query_labels, device=device)
    criterion = None
    if loss == "joint":
        from schane.losses import JointLoss, build_contrastive_loss

        contrastive = build_contrastive_loss(
            "schane", temperature=temperature, beta=beta, positive_mode="mean", tau_plus=0.1,
            gather_distributed=False, chunk_size=None,
        )
        criterion = JointLoss(contrastive, lam=lam)
    try:
        model.eval()
        with torch.no_grad():
            fs = model.forward_features(_stack(eval_dataset, episode.support).to(device))
            fs = F.normalize(fs.float(), dim=-1)
            protos = torch.stack([fs[ys == j].mean(0) for j in range(episode.ways)])
        head = ProtoHead(protos, scale=head_scale).to(device)
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        y2 = torch.cat([ys, ys])
        for _ in range(steps):
            x = torch.cat([_stack(support_dataset, episode.support), _stack(support_dataset, episode.support)]).to(device)
            if criterion is None:
                logits = head(model.forward_features(x))
                total = F.cross_entropy(logits, y2)
            else:
                out = model(x)
                total = criterion(head(out.features), y2, out.projections).total
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        with torch.no_grad():
            pred = head(model.forward_features(_stack(eval_dataset, episode.query).to(device))).argmax(1)
        return float((pred == yq).float().mean().item() * 100.0)
    finally:
        model.load_state_dict(saved_state)
        for m, mode in saved_mode:
            m.training = mode
        for p, flag in saved_grad:
            p.requires_grad_(flag)
            p.grad = None


def evaluate_protocol_b(
    model: nn.Module,
    episodes: Sequence[Episode],
    support_dataset: Dataset,
    eval_dataset: Dataset,
    *,
    steps: int = 20,
    lr: float = 1e-3,
    loss: str = "ce",
    lam: float = 0.9,
    temperature: float = 0.5,
    beta: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "episodes",
) -> np.ndarray:
    """Per-episode accuracy (%) of per-episode fine-tuning (see :func:`finetune_episode`).

    Episode ``i``'s augmentations are drawn under torch and Python RNGs seeded by
    ``(seed, i)`` (the caller's RNG states are restored), so every model sees the same
    augmented views when images are loaded in the main process.

    Args:
        model: the model (restored after every episode).
        episodes: the episodes, evaluated in order.
        support_dataset: the split with the support augmentation.
        eval_dataset: the same split with the evaluation transform.
        steps, lr, loss, lam, temperature, beta: see :func:`finetune_episode`.
        seed: augmentation seed.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        ``[len(episodes)]`` accuracies in percent.

    Raises:
        ValueError: as :func:`finetune_episode`.
    """
    accs = []
    for i, ep in enumerate(tqdm(episodes, desc=desc, disable=not progress, leave=False)):
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stable_seed(seed, i))
            random.seed(_stable_seed(seed, i))
            accs.append(
                finetune_episode(
                    model, ep, support_dataset, eval_dataset, steps=steps, lr=lr, loss=loss, lam=lam,
                    temperature=temperature, beta=beta,
                )
            )
        random.setstate(py_state)
    return np.asarray(accs, dtype=np.float64)
