"""Episode sampler, episode JSON files and the confidence-interval formulas."""

import math

import numpy as np
import pytest

from schane.fewshot.episodes import Episode, load_episodes, read_episodes_meta, sample_episodes, save_episodes
from schane.fewshot.stats import mean_ci, paired_difference, seed_summary, t_quantile


def _labels(n_classes=8, per_class=20, shuffle_seed=1):
    labels = np.repeat(np.arange(n_classes), per_class)
    return np.random.default_rng(shuffle_seed).permutation(labels)


def test_sampler_shapes_disjoint_and_remapped():
    labels = _labels()
    eps = sample_episodes(labels, ways=5, shots=3, queries=4, n_episodes=50, seed=7)
    assert len(eps) == 50
    for e in eps:
        assert isinstance(e, Episode)
        assert (e.ways, e.shots, e.queries) == (5, 3, 4)
        assert len(e.support) == 15 and len(e.query) == 20
        assert len(set(e.support) | set(e.query)) == 35  # no duplicates, support ∩ query = ∅
        assert len(set(e.classes)) == 5
        assert e.support_labels == [j for j in range(5) for _ in range(3)]
        assert e.query_labels == [j for j in range(5) for _ in range(4)]
        for idx, lab in zip(e.support + e.query, e.support_labels + e.query_labels, strict=True):
            assert labels[idx] == e.classes[lab]  # remapped label j ↔ original class classes[j]


def test_sampler_deterministic_and_prefix_stable():
    labels = _labels()
    a = sample_episodes(labels, 5, 1, 15 - 10, 20, seed=3)
    b = sample_episodes(labels, 5, 1, 5, 20, seed=3)
    c = sample_episodes(labels, 5, 1, 5, 8, seed=3)
    d = sample_episodes(labels, 5, 1, 5, 20, seed=4)
    assert a == b
    assert a[:8] == c
    assert a != d


def test_sampler_covers_classes_and_images():
    labels = _labels(n_classes=6, per_class=10)
    eps = sample_episodes(labels, 3, 2, 2, 300, seed=0)
    seen_classes = {c for e in eps for c in e.classes}
    seen_images = {i for e in eps for i in e.support + e.query}
    assert seen_classes == set(range(6))
    assert len(seen_images) == 60


def test_sampler_errors():
    labels = _labels(n_classes=4, per_class=5)
    with pytest.raises(ValueError, match="only 4 classes"):
        sample_episodes(labels, 5, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="need 6 images per class"):
        sample_episodes(labels, 2, 1, 5, 1, 0)
    short = np.concatenate([labels, [9, 9]])
    with pytest.raises(ValueError, match="class 9: 2"):
        sample_episodes(short, 2, 1, 2, 1, 0)
    with pytest.raises(ValueError, match="shots"):
        sample_episodes(labels, 2, 0, 2, 1, 0)
    with pytest.raises(ValueError, match="1-D"):
        sample_episodes(np.zeros((2, 2), dtype=int), 2, 1, 1, 1, 0)


def test_json_round_trip_and_mismatch(tmp_path):
    labels = _labels()
    eps = sample_episodes(labels, 5, 2, 3, 12, seed=1)
    p = save_episodes(tmp_path / "sub" / "eps.json", eps, labels, "test_classes", seed=1, extra={"dataset": "toy"})
    assert load_episodes(p) == eps
    assert load_episodes(p, labels=labels, split="test_classes") == eps
    meta = read_episodes_meta(p)
    assert meta["num_images"] == len(labels) and meta["shots"] == 2 and meta["extra"] == {"dataset": "toy"}
    with pytest.raises(ValueError, match="split"):
        load_episodes(p, split="val_classes")
    with pytest.raises(ValueError, match="expects 160 images"):
        load_episodes(p, labels=labels[:-1])
    swapped = labels.copy()
    swapped[[0, 1]] = swapped[[1, 0]] if swapped[0] != swapped[1] else (swapped[0], (swapped[0] + 1) % 8)
    with pytest.raises(ValueError, match="hash"):
        load_episodes(p, labels=swapped)
    with pytest.raises(FileNotFoundError):
        load_episodes(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a schane episode file"):
        load_episodes(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="out of range"):
        save_episodes(tmp_path / "x.json", eps, labels[:10], "test_classes")


# --------------------------------------------------------------------------- statistics


def _naive_ci(xs, z=1.96):
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1)  # sample variance, ddof = 1
    return m, z * math.sqrt(var) / math.sqrt(n)


def test_mean_ci_hand_computation():
    xs = [60.0, 80.0, 100.0, 40.0, 73.3333]
    ci = mean_ci(xs)
    m, h = _naive_ci(xs)
    assert ci.mean == pytest.approx(m) and ci.half_width == pytest.approx(h) and ci.n == 5
    # a tiny case by hand: [0, 2] -> mean 1, s = sqrt(2), half width 1.96 * sqrt(2) / sqrt(2) = 1.96
    ci2 = mean_ci([0.0, 2.0])
    assert ci2.mean == 1.0 and ci2.half_width == pytest.approx(1.96) and ci2.std == pytest.approx(math.sqrt(2))
    assert (ci2.low, ci2.high) == pytest.approx((1 - 1.96, 1 + 1.96))
    one = mean_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.half_width) and not one.excludes_zero
    assert one.to_dict()["half_width"] is None
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError, match="nan"):
        mean_ci([1.0, float("nan")])


def test_paired_difference_is_ci_of_differences():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(60, 15, size=400)  # shared per-episode difficulty
    a = difficulty + 2.0 + rng.normal(0, 1, 400)
    b = difficulty + rng.normal(0, 1, 400)
    d = paired_difference(a, b)
    m, h = _naive_ci(list(a - b))
    assert d.mean == pytest.approx(m) and d.half_width == pytest.approx(h)
    assert d.excludes_zero and d.low > 0
    # pairing removes the shared difficulty: far narrower than either unpaired interval
    assert d.half_width < 0.2 * mean_ci(a).half_width
    noise = rng.normal(0, 1, 400)
    same = paired_difference(b + noise, b + noise[::-1])  # mean difference exactly 0
    assert same.low < 0 < same.high and not same.excludes_zero
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])


def test_seed_summary_uses_student_t():
    vals = [3.1, -2.4, 1.3]  # per-seed differences in points
    s = seed_summary(vals)
    m = sum(vals) / 3
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 2)
    assert t_quantile(2) == pytest.approx(4.302652729911275, rel=1e-9)  # tabulated t_{0.975, 2}
    assert s.mean == pytest.approx(m) and s.std == pytest.approx(sd)
    assert s.half_width == pytest.approx(4.302652729911275 * sd / math.sqrt(3))
    assert not s.excludes_zero  # three seeds that disagree in sign: the interval is wide
    assert t_quantile(10**6) == pytest.approx(1.96, abs=1e-3)
    assert math.isnan(seed_summary([1.0]).half_width)
    with pytest.raises(ValueError, match="confidence"):
        seed_summary(vals, confidence=1.5)
