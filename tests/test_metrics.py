"""Embedding metrics on constructed inputs with known answers and against naive float64 loops."""

import math
import warnings

import numpy as np
import pytest
import torch

from schane.analysis.metrics import (
    alignment,
    class_similarity_gap,
    isoscore,
    isotropy,
    knn_accuracy,
    silhouette,
    uniformity,
)

# --------------------------------------------------------------------------- naive references


def naive_isotropy(W: np.ndarray, vecs: np.ndarray | None = None) -> float:
    """min/max of Z(c) over the eigenvectors of W^T W and their negations, as plain loops."""
    W = np.asarray(W, dtype=np.float64)
    if vecs is None:
        _, vecs = np.linalg.eigh(W.T @ W)
    zs = []
    for j in range(vecs.shape[1]):
        for sign in (1.0, -1.0):
            c = sign * vecs[:, j]
            z = 0.0
            for w in W:
                z += math.exp(float(np.dot(c, w)))
            zs.append(z)
    return min(zs) / max(zs)


def naive_isoscore(X: np.ndarray) -> float:
    """Rudman et al. (2022), Algorithm 1, step by step with an explicit PCA rotation."""
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[1]
    Xc = X - X.mean(axis=0)
    _, _, vt = np.linalg.svd(Xc, full_matrices=True)
    pca = Xc @ vt.T  # coordinates along the principal axes
    var = np.array([np.var(pca[:, j], ddof=1) for j in range(n)])
    var_hat = math.sqrt(n) * var / math.sqrt(sum(v * v for v in var))
    delta = math.sqrt(sum((v - 1.0) ** 2 for v in var_hat)) / math.sqrt(2 * (n - math.sqrt(n)))
    phi = (n - delta**2 * (n - math.sqrt(n))) ** 2 / n**2
    return (n * phi - 1) / (n - 1)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def two_clusters(n=20, d=8, noise=0.0, seed=0):
    """Two classes at antipodal points +e0 / -e0 (plus optional noise)."""
    rng = np.random.default_rng(seed)
    e = np.zeros(d)
    e[0] = 1.0
    X = np.concatenate([np.tile(e, (n, 1)), np.tile(-e, (n, 1))])
    X = X + noise * rng.standard_normal(X.shape)
    y = np.array([0] * n + [1] * n)
    return X, y


# --------------------------------------------------------------------------- isotropy


def test_isotropy_matches_naive_loop():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 5)) * 0.3 + 0.2
    assert isotropy(W) == pytest.approx(naive_isotropy(W), rel=1e-10)
    Wc = W - W.mean(0)
    assert isotropy(W, center=True) == pytest.approx(naive_isotropy(Wc), rel=1e-10)
    Wn = unit(W)
    assert isotropy(W, normalize=True) == pytest.approx(naive_isotropy(Wn), rel=1e-10)
    assert isotropy(W, normalize=True, center=True) == pytest.approx(naive_isotropy(Wn - Wn.mean(0)), rel=1e-10)


def test_isotropy_isotropic_gaussian_vs_squeezed():
    rng = np.random.default_rng(0)
    iso = rng.standard_normal((20000, 8)) * 0.2
    assert isotropy(iso) > 0.95
    # squeeze onto one direction: Z(+-u) ~ N exp(s^2/2) while Z(orthogonal) ~ N
    u = unit(rng.standard_normal((1, 8)))
    line = rng.standard_normal((20000, 1)) * 3.0 * u + 1e-3 * rng.standard_normal((20000, 8))
    assert isotropy(line) < 0.05
    # a shifted cloud (narrow cone) is anisotropic, and centring restores isotropy
    shifted = iso + 2.0 * u
    assert isotropy(shifted) < 0.1
    assert isotropy(shifted, center=True) > 0.95


def test_isotropy_is_invariant_to_eigenvector_signs_and_negation():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((40, 4)) * np.array([1.0, 0.5, 0.3, 0.1]) + np.array([0.4, -0.2, 0.1, 0.0])
    _, vecs = np.linalg.eigh(W.T @ W)
    flips = np.array([1.0, -1.0, -1.0, 1.0])
    assert naive_isotropy(W, vecs) == pytest.approx(naive_isotropy(W, vecs * flips), rel=1e-12)
    assert isotropy(W) == pytest.approx(isotropy(-W), rel=1e-12)
    # rotating the data rotates the eigenvectors: the value is unchanged
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    assert isotropy(W @ q) == pytest.approx(isotropy(W), rel=1e-8)


def test_isotropy_sign_choice_matters_without_negations():
    # a one-sided implementation would report min over +c only: check that negations change the answer
    W = np.array([[3.0, 0.0], [2.0, 0.1], [2.5, -0.1]])
    _, vecs = np.linalg.eigh(W.T @ W)
    one_sided = []
    for s in (1.0, -1.0):
        zs = [np.exp(W @ (s * vecs[:, j])).sum() for j in range(2)]
        one_sided.append(min(zs) / max(zs))
    assert not math.isclose(one_sided[0], one_sided[1], rel_tol=1e-3)
    assert isotropy(W) == pytest.approx(naive_isotropy(W), rel=1e-12)
    assert isotropy(W) <= min(one_sided) + 1e-12


@pytest.mark.parametrize("scale", [1e4, 1e200])
def test_isotropy_huge_norms_do_not_overflow(scale):
    # points at +-s e_j with m_j pairs on axis j: log Z(+-e_j) = s + log m_j + O(e^-s),
    # so I -> min m / max m. exp(1e4) and (1e200)^2 overflow float64 if computed naively.
    counts = [1, 2, 3]
    rows = []
    for j, m in enumerate(counts):
        e = np.zeros(3)
        e[j] = scale
        rows += [e, -e] * m
    W = np.array(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = isotropy(W)
    assert math.isfinite(value)
    if scale == 1e4:
        assert value == pytest.approx(1 / 3, rel=1e-9)
    assert 0.0 <= value <= 1.0


def test_isotropy_accepts_torch_and_rejects_bad_input():
    W = torch.randn(30, 4, dtype=torch.float32)
    assert isotropy(W) == pytest.approx(naive_isotropy(W.double().numpy()), rel=1e-9)
    assert isotropy(torch.zeros(5, 3)) == 1.0
    with pytest.raises(ValueError, match="2-D"):
        isotropy(np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        isotropy(np.array([[1.0, np.nan]]))


# --------------------------------------------------------------------------- IsoScore


def test_isoscore_matches_naive_algorithm():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + 5.0
    assert isoscore(X) == pytest.approx(naive_isoscore(X), abs=1e-10)


def test_isoscore_known_values():
    rng = np.random.default_rng(4)
    n = 10
    gauss = rng.standard_normal((50000, n))
    assert isoscore(gauss) > 0.98
    # points on a line: the lower bound 0
    line = rng.standard_normal((1000, 1)) * unit(rng.standard_normal((1, n))) + 3.0
    assert isoscore(line) == pytest.approx(0.0, abs=1e-9)
    # variance spread evenly over k of n dimensions: (k - 1) / (n - 1) (Rudman et al., Thm.)
    k = 4
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    Z = rng.standard_normal((4000, k))
    Z = Z - Z.mean(0)
    Z = Z @ np.linalg.inv(np.linalg.cholesky(np.cov(Z.T))).T  # exactly equal variances, no covariance
    even = np.zeros((4000, n))
    even[:, :k] = Z
    assert isoscore(even @ q) == pytest.approx((k - 1) / (n - 1), abs=1e-9)
    # invariant to scale, translation and rotation
    assert isoscore(7.0 * gauss @ q + 2.0) == pytest.approx(isoscore(gauss), abs=1e-9)


def test_isoscore_rejects_degenerate_input():
    with pytest.raises(ValueError, match="coincide"):
        isoscore(np.ones((5, 3)))
    with pytest.raises(ValueError, match="2 dimensions"):
        isoscore(np.random.default_rng(0).standard_normal((5, 1)))


# --------------------------------------------------------------------------- alignment / uniformity


def naive_uniformity(X, t=2.0):
    X = unit(np.asarray(X, dtype=np.float64))
    vals = [math.exp(-t * float(np.sum((X[i] - X[j]) ** 2))) for i in range(len(X)) for j in range(i + 1, len(X))]
    return math.log(sum(vals) / len(vals))


def naive_alignment_labels(X, y, alpha=2.0):
    X = unit(np.asarray(X, dtype=np.float64))
    vals = [
        float(np.linalg.norm(X[i] - X[j])) ** alpha
        for i in range(len(X))
        for j in range(len(X))
        if i != j and y[i] == y[j]
    ]
    return sum(vals) / len(vals)


def test_alignment_and_uniformity_match_naive():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((37, 5))
    y = rng.integers(0, 4, 37)
    assert uniformity(X) == pytest.approx(naive_uniformity(X), rel=1e-10)
    assert uniformity(X, t=0.7) == pytest.approx(naive_uniformity(X, 0.7), rel=1e-10)
    assert alignment(X, labels=y) == pytest.approx(naive_alignment_labels(X, y), rel=1e-10)
    assert alignment(X, labels=y, alpha=1.0) == pytest.approx(naive_alignment_labels(X, y, 1.0), rel=1e-10)
    Y = X + 0.1 * rng.standard_normal(X.shape)
    ref = np.mean(np.sum((unit(X) - unit(Y)) ** 2, axis=1))
    assert alignment(torch.tensor(X), torch.tensor(Y)) == pytest.approx(ref, rel=1e-10)


def test_alignment_uniformity_known_values():
    X, y = two_clusters(n=10)
    assert alignment(X, labels=y) == pytest.approx(0.0, abs=1e-12)
    assert alignment(X, -X) == pytest.approx(4.0)  # antipodal "views": |x - y|^2 = 4
    # pairs i<j: 2*C(10,2) at distance 0, 10*10 at squared distance 4
    expected = math.log((2 * 45 + 100 * math.exp(-8.0)) / 190)
    assert uniformity(X) == pytest.approx(expected, rel=1e-12)
    # all points equal: uniformity 0; uniform points on a sphere: far lower
    assert uniformity(np.ones((10, 3))) == pytest.approx(0.0, abs=1e-12)
    sphere = np.random.default_rng(0).standard_normal((500, 64))
    assert uniformity(sphere) < -3.5


def test_alignment_uniformity_bad_input():
    X, _ = two_clusters(n=3)
    with pytest.raises(ValueError, match="positives"):
        alignment(X)
    with pytest.raises(ValueError, match="two or more"):
        alignment(X, labels=np.arange(6))
    with pytest.raises(ValueError, match="same shape"):
        alignment(X, X[:2])
    with pytest.raises(ValueError, match="at least 2 rows"):
        uniformity(X[:1])


# --------------------------------------------------------------------------- class gap, silhouette, k-NN


def naive_class_gap(X, y):
    X = unit(np.asarray(X, dtype=np.float64))
    intra, inter = [], []
    for i in range(len(X)):
        for j in range(len(X)):
            if i == j:
                continue
            (intra if y[i] == y[j] else inter).append(float(X[i] @ X[j]))
    return np.mean(intra), np.mean(inter)


def test_class_gap_matches_naive_and_known_values():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((41, 6))
    y = rng.integers(0, 5, 41)
    intra, inter = naive_class_gap(X, y)
    got = class_similarity_gap(X, y)
    assert got.intra == pytest.approx(intra, rel=1e-10)
    assert got.inter == pytest.approx(inter, rel=1e-10)
    assert got.gap == pytest.approx(intra - inter, rel=1e-10)
    X2, y2 = two_clusters(n=15, noise=1e-4)
    sep = class_similarity_gap(X2, y2)
    assert sep.gap == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="two classes"):
        class_similarity_gap(X, np.zeros(41))


def test_silhouette_separated_and_random():
    X, y = two_clusters(n=25, noise=0.01)
    assert silhouette(X, y) == pytest.approx(1.0, abs=1e-3)
    rng = np.random.default_rng(7)
    assert abs(silhouette(rng.standard_normal((200, 8)), rng.integers(0, 3, 200))) < 0.1
    with pytest.raises(ValueError, match="classes"):
        silhouette(X, np.zeros(len(X)))


def naive_knn(R, ry, Q=None, qy=None, k=3):
    loo = Q is None
    R = unit(np.asarray(R, dtype=np.float64))
    Q, qy = (R, ry) if loo else (unit(np.asarray(Q, dtype=np.float64)), qy)
    correct = 0
    for i, q in enumerate(Q):
        order = [j for j in np.argsort(-(R @ q), kind="stable") if not (loo and j == i)][:k]
        counts = {}
        for j in order:
            counts[ry[j]] = counts.get(ry[j], 0) + 1
        top = max(counts.values())
        pred = next(ry[j] for j in order if counts[ry[j]] == top)
        correct += pred == qy[i]
    return correct / len(Q)


def test_knn_separated_clusters_and_naive():
    X, y = two_clusters(n=10, noise=0.05)
    assert knn_accuracy(X, y, k=5) == 1.0
    Xt, yt = two_clusters(n=4, noise=0.05, seed=1)
    assert knn_accuracy(torch.tensor(X), torch.tensor(y), torch.tensor(Xt), torch.tensor(yt), k=3) == 1.0
    rng = np.random.default_rng(8)
    R, ry = rng.standard_normal((60, 4)), rng.integers(0, 3, 60)
    Q, qy = rng.standard_normal((25, 4)), rng.integers(0, 3, 25)
    for k in (1, 2, 4):
        assert knn_accuracy(R, ry, k=k) == pytest.approx(naive_knn(R, ry, k=k))
        assert knn_accuracy(R, ry, Q, qy, k=k) == pytest.approx(naive_knn(R, ry, Q, qy, k=k))


def test_knn_leave_one_out_excludes_self_and_euclidean():
    # with k=1 and itself included every point would be right; leave-one-out finds the other class
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert knn_accuracy(X, np.array([0, 1]), k=1) == 0.0
    assert knn_accuracy(X, np.array([0, 1]), X, np.array([0, 1]), k=1) == 1.0
    # euclidean distinguishes norms on one ray; cosine cannot
    R = np.array([[1.0], [10.0]])
    assert knn_accuracy(R, [0, 1], np.array([[9.0]]), [1], k=1, metric="euclidean") == 1.0
    with pytest.raises(ValueError, match="metric"):
        knn_accuracy(R, [0, 1], metric="l3")
    with pytest.raises(ValueError, match="test_labels"):
        knn_accuracy(R, [0, 1], R)
