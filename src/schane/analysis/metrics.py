"""Embedding metrics: isotropy, IsoScore, alignment/uniformity, class similarity, silhouette, k-NN.

Every function accepts a NumPy array or a torch tensor (any device, any float dtype) and
returns plain Python floats. The geometry is computed in float64 on the CPU except for the
k-NN search, which runs in torch on the input's device.

References:
    - Mu & Viswanath, "All-but-the-Top: Simple and Effective Postprocessing for Word
      Representations", ICLR 2018 (partition-function isotropy).
    - Rudman, Gillman, Rayne & Eickhoff, "IsoScore: Measuring the Uniformity of Embedding
      Space Utilization", Findings of ACL 2022.
    - Wang & Isola, "Understanding Contrastive Representation Learning through Alignment
      and Uniformity on the Hypersphere", ICML 2020.
    - Rousseeuw, "Silhouettes: a graphical aid to the interpretation and validation of
      cluster analysis", J. Comput. Appl. Math. 1987.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "ClassSimilarity",
    "alignment",
    "class_similarity_gap",
    "isoscore",
    "isotropy",
    "knn_accuracy",
    "silhouette",
    "uniformity",
]

_CHUNK = 1024


# --------------------------------------------------------------------------- input helpers


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_matrix(x: Any, name: str = "W", min_rows: int = 1) -> np.ndarray:
    """``x`` as a finite float64 matrix ``[N, D]``."""
    a = _to_numpy(x, name)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D] of N embeddings, got shape {tuple(a.shape)}")
    if a.shape[0] < min_rows or a.shape[1] < 1:
        raise ValueError(f"{name} needs at least {min_rows} rows and 1 column, got shape {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values; check the model's outputs")
    return a


def _as_labels(y: Any, n: int, name: str = "labels") -> np.ndarray:
    a = _to_numpy(y, name)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array with one label per row ({n}), got shape {tuple(a.shape)}")
    return a


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _logsumexp(a: np.ndarray, axis: int = 0) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


# --------------------------------------------------------------------------- isotropy


def isotropy(W: Any, center: bool = False, normalize: bool = False) -> float:
    r"""Partition-function isotropy of Mu & Viswanath (2018).

    .. math::
        I(W) = \frac{\min_{c \in C} Z(c)}{\max_{c \in C} Z(c)}, \qquad Z(c) = \sum_i \exp(c^\top w_i),

    where :math:`C` holds the unit eigenvectors of :math:`W^\top W` **and their negations**
    (an eigenvector's sign is arbitrary; taking both makes the value independent of the
    solver). ``I = 1`` for perfectly isotropic embeddings and tends to 0 when the embeddings
    occupy a narrow cone or a line. Computed in float64 with ``eigh`` on the rescaled Gram
    matrix and log-sum-exp, so huge embedding norms cannot overflow.

    Args:
        W: embeddings ``[N, D]`` (NumPy array or torch tensor).
        center: subtract the mean embedding first.
        normalize: L2-normalise each row first (applied before centring).

    Returns:
        The isotropy in ``[0, 1]``.

    Raises:
        ValueError: if ``W`` is not a finite 2-D array with at least one row.

    Examples:
        >>> import numpy as np
        >>> W = np.random.default_rng(0).standard_normal((5000, 4)) * 0.1
        >>> isotropy(W) > 0.95
        True
    """
    X = _as_matrix(W, "W")
    if normalize:
        X = _l2_normalize(X)
    if center:
        X = X - X.mean(axis=0, keepdims=True)
    scale = np.max(np.abs(X))
    if scale == 0.0:
        return 1.0  # every Z(c) equals N
    Xs = X / scale  # eigenvectors are scale-invariant; rescaling keeps X^T X finite
    _, vecs = np.linalg.eigh(Xs.T @ Xs)
    proj = X @ vecs  # [N, D]: c^T w_i for each eigenvector c
    log_z = np.concatenate([_logsumexp(proj, axis=0), _logsumexp(-proj, axis=0)])
    return float(np.exp(np.min(log_z) - np.max(log_z)))


def isoscore(W: Any) -> float:
    r"""IsoScore of Rudman et al. (2022): how uniformly the embeddings use their dimensions.

    Steps (the paper's Algorithm 1), for ``n`` = the embedding dimension:

    1. rotate the points onto their principal components (PCA, centred);
    2. take the variance vector :math:`\Sigma_D` of the rotated coordinates (the covariance
       eigenvalues);
    3. normalise it to length :math:`\sqrt{n}`: :math:`\hat\Sigma = \sqrt{n}\,\Sigma_D / \|\Sigma_D\|`;
    4. isotropy defect :math:`\delta = \|\hat\Sigma - \mathbf{1}\| / \sqrt{2(n - \sqrt{n})}`;
    5. fraction of dimensions used :math:`\phi = (n - \delta^2 (n - \sqrt{n}))^2 / n^2`;
    6. IsoScore :math:`\iota = (n\phi - 1) / (n - 1)`.

    ``ι = 1`` for an isotropic Gaussian, ``ι = 0`` for points on a line, and
    ``ι = (k - 1) / (n - 1)`` when the variance is spread evenly over ``k`` of ``n`` dimensions.
    Unlike :func:`isotropy` it ignores the mean (it is translation-invariant) and the scale.

    Args:
        W: embeddings ``[N, D]`` with ``N >= 2`` and ``D >= 2``.

    Returns:
        The IsoScore in ``[0, 1]``.

    Raises:
        ValueError: if ``W`` has fewer than 2 rows or columns, is not finite, or all points coincide.
    """
    X = _as_matrix(W, "W", min_rows=2)
    n = X.shape[1]
    if n < 2:
        raise ValueError("isoscore needs embeddings with at least 2 dimensions")
    X = X - X.mean(axis=0, keepdims=True)
    scale = np.max(np.abs(X))
    if scale == 0.0:
        raise ValueError("isoscore is undefined when all points coincide (zero variance)")
    X = X / scale  # IsoScore is scale-invariant
    # Variances along the principal axes are the covariance eigenvalues (PCA rotation).
    cov = X.T @ X / (X.shape[0] - 1)
    var = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
    sigma_hat = math.sqrt(n) * var / np.linalg.norm(var)
    delta = np.linalg.norm(sigma_hat - 1.0) / math.sqrt(2.0 * (n - math.sqrt(n)))
    phi = (n - delta**2 * (n - math.sqrt(n))) ** 2 / n**2
    iota = (n * phi - 1.0) / (n - 1.0)
    return float(min(max(iota, 0.0), 1.0))


# --------------------------------------------------------------------------- alignment / uniformity


def alignment(
    x: Any,
    y: Any | None = None,
    *,
    labels: Any | None = None,
    alpha: float = 2.0,
) -> float:
    r"""Alignment of Wang & Isola (2020): expected distance between positive pairs.

    :math:`\mathcal{L}_{align} = \mathbb{E}_{(x, y) \sim p_{pos}} \|f(x) - f(y)\|_2^\alpha` on
    L2-normalised features (lower is better, ``0`` when positives coincide, at most ``2^alpha``).

    Positive pairs are either the paired views ``(x[i], y[i])`` when ``y`` is given, or, when
    only ``labels`` are given, every pair ``i != j`` with the same label (class-level
    alignment: the usual choice for evaluating a supervised embedding without augmentations).

    Args:
        x: features ``[N, D]``.
        y: features of the second views ``[N, D]``, row ``i`` paired with ``x[i]``.
        labels: class labels ``[N]``, used when ``y`` is ``None``.
        alpha: distance exponent (``> 0``; Wang & Isola use 2).

    Returns:
        The mean ``alpha``-powered distance over positive pairs.

    Raises:
        ValueError: if neither ``y`` nor ``labels`` is given, shapes disagree, ``alpha <= 0``,
            or no class has two members.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    X = _l2_normalize(_as_matrix(x, "x"))
    if y is not None:
        Y = _l2_normalize(_as_matrix(y, "y"))
        if Y.shape != X.shape:
            raise ValueError(f"x and y must have the same shape (paired views), got {X.shape} and {Y.shape}")
        return float(np.mean(np.linalg.norm(X - Y, axis=1) ** alpha))
    if labels is None:
        raise ValueError("alignment needs positives: pass the second views y, or labels for same-class pairs")
    lab = _as_labels(labels, X.shape[0])
    total, count = 0.0, 0
    for c in np.unique(lab):
        Xc = X[lab == c]
        m = Xc.shape[0]
        if m < 2:
            continue
        for s in range(0, m, _CHUNK):
            block = Xc[s : s + _CHUNK]
            d2 = np.clip(2.0 - 2.0 * block @ Xc.T, 0.0, None)
            rows = np.arange(block.shape[0])
            d2[rows, rows + s] = 0.0  # exact zero on the diagonal (rounding would add ~1e-8 for alpha=1)
            total += float(np.sum(d2 ** (alpha / 2.0)))
        count += m * (m - 1)
    if count == 0:
        raise ValueError("alignment over same-class pairs needs at least one class with two or more samples")
    return total / count


def uniformity(x: Any, t: float = 2.0) -> float:
    r"""Uniformity of Wang & Isola (2020): log of the mean Gaussian potential between points.

    :math:`\mathcal{L}_{uniform} = \log \mathbb{E}_{x \ne y} \exp(-t \|f(x) - f(y)\|_2^2)` over all
    pairs of distinct samples of the L2-normalised features (lower is more uniform; ``0`` when
    all points coincide, ``-4t`` would mean every pair is antipodal).

    Args:
        x: features ``[N, D]`` with ``N >= 2``.
        t: the potential's scale (``> 0``; Wang & Isola use 2).

    Returns:
        The uniformity loss (a non-positive float).

    Raises:
        ValueError: if ``x`` has fewer than two rows or ``t <= 0``.
    """
    if t <= 0:
        raise ValueError(f"t must be > 0, got {t}")
    X = _l2_normalize(_as_matrix(x, "x", min_rows=2))
    n = X.shape[0]
    parts = []
    for s in range(0, n, _CHUNK):
        block = X[s : s + _CHUNK]
        d2 = np.clip(2.0 - 2.0 * block @ X.T, 0.0, None)
        rows = np.arange(s, s + block.shape[0])
        mask = np.arange(n)[None, :] > rows[:, None]  # pairs i < j
        parts.append(_logsumexp(-t * d2[mask]) if mask.any() else None)
    log_sum = _logsumexp(np.array([p for p in parts if p is not None]))
    return float(log_sum - math.log(n * (n - 1) / 2))


# --------------------------------------------------------------------------- class structure


class ClassSimilarity(NamedTuple):
    """Mean cosine similarity within classes, between classes, and their difference."""

    intra: float
    inter: float
    gap: float


def class_similarity_gap(features: Any, labels: Any) -> ClassSimilarity:
    r"""Mean intra-class and inter-class cosine similarity and the gap ``intra - inter``.

    ``intra`` averages :math:`\cos(x_i, x_j)` over ordered pairs ``i != j`` with the same label,
    ``inter`` over pairs with different labels. Computed exactly in ``O(N D)`` from class sums
    (:math:`\sum_{i \ne j \in c} x_i^\top x_j = \|\sum_{i \in c} x_i\|^2 - \sum_{i \in c} \|x_i\|^2`
    on unit vectors). A larger gap means tighter classes that sit further apart; it lies in
    ``[-2, 2]`` and equals 2 for classes collapsed onto antipodal points.

    Args:
        features: features ``[N, D]`` (a zero row counts as cosine 0 with everything).
        labels: class labels ``[N]`` with at least two classes and one class of two or more samples.

    Returns:
        A :class:`ClassSimilarity` ``(intra, inter, gap)``.

    Raises:
        ValueError: on shape mismatches or when either kind of pair does not exist.
    """
    X = _l2_normalize(_as_matrix(features, "features"))
    lab = _as_labels(labels, X.shape[0])
    classes, inv, counts = np.unique(lab, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise ValueError("class_similarity_gap needs at least two classes")
    sums = np.zeros((len(classes), X.shape[1]))
    np.add.at(sums, inv, X)
    sq = np.zeros(len(classes))
    np.add.at(sq, inv, np.sum(X * X, axis=1))
    intra_sum = float(np.sum(np.sum(sums * sums, axis=1) - sq))
    intra_pairs = int(np.sum(counts * (counts - 1)))
    total = X.sum(axis=0)
    all_sum = float(total @ total - np.sum(sq))
    n = X.shape[0]
    inter_pairs = n * n - int(np.sum(counts.astype(np.int64) ** 2))
    if intra_pairs == 0:
        raise ValueError("class_similarity_gap needs at least one class with two or more samples")
    intra = intra_sum / intra_pairs
    inter = (all_sum - intra_sum) / inter_pairs
    return ClassSimilarity(intra=intra, inter=inter, gap=intra - inter)


def silhouette(
    features: Any,
    labels: Any,
    *,
    metric: str = "cosine",
    max_points: int | None = 5000,
    seed: int = 0,
) -> float:
    """Mean silhouette coefficient of the labelled clusters (scikit-learn).

    For sample ``i`` with mean distance ``a`` to its own class and ``b`` to the nearest other
    class, ``s_i = (b - a) / max(a, b)``; the score is the mean over samples, in ``[-1, 1]``
    (1: compact, well-separated classes). Cosine distance by default. The cost is
    ``O(N^2)``, so more than ``max_points`` samples are subsampled at random (``seed``).

    Args:
        features: features ``[N, D]``.
        labels: class labels ``[N]`` with between 2 and ``N - 1`` distinct values.
        metric: any metric :func:`sklearn.metrics.silhouette_score` accepts.
        max_points: subsample size above which samples are drawn, or ``None`` for all.
        seed: subsampling seed.

    Returns:
        The mean silhouette coefficient.

    Raises:
        ValueError: on shape mismatches or an unsuitable number of classes.
    """
    from sklearn.metrics import silhouette_score

    X = _as_matrix(features, "features", min_rows=2)
    lab = _as_labels(labels, X.shape[0])
    k = len(np.unique(lab))
    if not 2 <= k <= X.shape[0] - 1:
        raise ValueError(f"silhouette needs between 2 and N-1 classes, got {k} classes for N={X.shape[0]}")
    sample = None if max_points is None or X.shape[0] <= max_points else int(max_points)
    return float(silhouette_score(X, lab, metric=metric, sample_size=sample, random_state=seed))


# --------------------------------------------------------------------------- k-NN


def knn_accuracy(
    train_features: Any,
    train_labels: Any,
    test_features: Any | None = None,
    test_labels: Any | None = None,
    *,
    k: int = 5,
    metric: str = "cosine",
    batch_size: int = 1024,
) -> float:
    """k-nearest-neighbour classification accuracy on frozen features.

    Each query takes the majority label of its ``k`` nearest reference features; a tie goes
    to the tied class whose member is nearest. With ``test_features`` the reference set is
    the training split and the queries are the test split; without them it is
    leave-one-out within one split (each sample's neighbours exclude itself).

    Args:
        train_features: reference features ``[M, D]``.
        train_labels: reference labels ``[M]``.
        test_features: query features ``[Q, D]``, or ``None`` for leave-one-out.
        test_labels: query labels ``[Q]`` (required with ``test_features``).
        k: neighbours (``>= 1``; capped at the number of references available).
        metric: ``"cosine"`` or ``"euclidean"``.
        batch_size: queries per similarity block.

    Returns:
        The fraction of queries classified correctly, in ``[0, 1]``.

    Raises:
        ValueError: on bad shapes, ``k < 1``, an unknown metric, or too few references.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    device = train_features.device if isinstance(train_features, torch.Tensor) else torch.device("cpu")
    ref = torch.as_tensor(_as_matrix(train_features, "train_features"), device=device)
    ref_lab = _as_labels(train_labels, ref.shape[0], "train_labels")
    loo = test_features is None
    if loo:
        if test_labels is not None:
            raise ValueError("test_labels given without test_features")
        if ref.shape[0] < 2:
            raise ValueError("leave-one-out k-NN needs at least two samples")
        qry, qry_lab = ref, ref_lab
    else:
        qry = torch.as_tensor(_as_matrix(test_features, "test_features"), device=device)
        if test_labels is None:
            raise ValueError("test_labels are required with test_features")
        qry_lab = _as_labels(test_labels, qry.shape[0], "test_labels")
        if qry.shape[1] != ref.shape[1]:
            raise ValueError(f"train and test features differ in dimension: {ref.shape[1]} vs {qry.shape[1]}")
    classes, ref_idx = np.unique(ref_lab, return_inverse=True)
    ref_idx_t = torch.as_tensor(ref_idx, device=device)
    kk = min(k, ref.shape[0] - (1 if loo else 0))
    if metric == "cosine":
        ref = torch.nn.functional.normalize(ref, dim=1)
        qry = torch.nn.functional.normalize(qry, dim=1)
    ref_sq = (ref * ref).sum(dim=1)
    preds = []
    for s in range(0, qry.shape[0], batch_size):
        q = qry[s : s + batch_size]
        if metric == "cosine":
            score = q @ ref.T
        else:
            score = -(ref_sq[None, :] - 2.0 * q @ ref.T)  # -||q - r||^2 up to a per-row constant
        if loo:
            rows = torch.arange(q.shape[0], device=device)
            score[rows, rows + s] = -torch.inf
        nn_idx = score.topk(kk, dim=1).indices  # sorted nearest first
        nn_cls = ref_idx_t[nn_idx]  # [B, k]
        votes = torch.zeros(q.shape[0], len(classes), device=device, dtype=torch.long)
        votes.scatter_add_(1, nn_cls, torch.ones_like(nn_cls))
        best = votes.max(dim=1, keepdim=True).values
        tied = votes.gather(1, nn_cls) == best  # which neighbours belong to a top-voted class
        first = tied.float().argmax(dim=1, keepdim=True)  # nearest neighbour among them
        preds.append(nn_cls.gather(1, first).squeeze(1).cpu())
    pred_labels = classes[torch.cat(preds).numpy()]
    return float(np.mean(pred_labels == qry_lab))
