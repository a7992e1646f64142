"""Protocol A (feature bank + logistic regression) and protocol B (per-episode fine-tuning)."""

from types import SimpleNamespace

import joblib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from schane.fewshot import (
    ProtoHead,
    build_feature_bank,
    evaluate_protocol_a,
    evaluate_protocol_b,
    finetune_episode,
    logreg_fit_batched,
    logreg_predict,
)
from schane.fewshot.episodes import sample_episodes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only contend


class ToyImages(Dataset):
    """Tiny 3x8x8 images: class c is a fixed random pattern plus noise; ``noise`` re-drawn per access."""

    def __init__(self, n_classes=6, per_class=12, noise=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(n_classes, 3, 8, 8, generator=g)
        self.targets = [c for c in range(n_classes) for _ in range(per_class)]
        self.base = torch.stack([patterns[c] + 0.3 * torch.randn(3, 8, 8, generator=g) for c in self.targets])
        self.noise = noise

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        x = self.base[i]
        if self.noise:
            x = x + self.noise * torch.randn_like(x)  # the "augmentation": uses the global torch RNG
        return x, self.targets[i]


class ToyModel(nn.Module):
    """forward_features -> [B, 16]; forward -> (logits, features, projections) like SCHaNeModel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16))
        self.classifier = nn.Linear(16, 4)
        self.projector = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        self.num_features = 16

    def forward_features(self, x):
        return self.backbone(x)

    def forward(self, x):
        f = self.forward_features(x)
        return SimpleNamespace(logits=self.classifier(f), features=f,
                               projections=nn.functional.normalize(self.projector(f), dim=-1))


def simple_extract(model, dataset, *, batch_size=64, device=None, progress=False):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    with torch.no_grad():
        return model.forward_features(torch.stack(xs)), torch.as_tensor(ys)


def test_logreg_separable_features_near_perfect():
    rng = np.random.default_rng(0)
    d, ways = 32, 5
    means = rng.normal(0, 1, (ways, d)) * 4
    ys = np.repeat(np.arange(ways), 1)
    xs = means[ys] + rng.normal(0, 0.3, (ways, d))
    yq = np.repeat(np.arange(ways), 40)
    xq = means[yq] + rng.normal(0, 0.3, (len(yq), d))
    assert (logreg_predict(xs, ys, xq) == yq).mean() >= 0.99
    np.testing.assert_array_equal(logreg_predict(xs, ys, xq, solver="sklearn"), logreg_predict(xs, ys, xq))
    # arbitrary label values come back as given
    np.testing.assert_array_equal(logreg_predict(xs, ys * 3 + 7, xq), logreg_predict(xs, ys, xq) * 3 + 7)
    # normalisation makes the classifier blind to each vector's scale
    scale = rng.uniform(0.1, 10, (len(yq), 1))
    np.testing.assert_array_equal(logreg_predict(xs, ys, xq * scale), logreg_predict(xs, ys, xq))
    with pytest.raises(ValueError, match="labels"):
        logreg_predict(xs, ys[:-1], xq)
    with pytest.raises(ValueError, match="C must be"):
        logreg_predict(xs, ys, xq, C=0)
    with pytest.raises(ValueError, match="two support classes"):
        logreg_predict(xs[:1], ys[:1], xq)


def test_feature_bank_protocol_a_end_to_end():
    plain, aug = ToyImages(), ToyImages(noise=0.5)
    eps = sample_episodes(plain.targets, 5, 1, 5, 12, seed=0) + sample_episodes(plain.targets, 5, 5, 5, 12, seed=1)
    model = ToyModel().eval()
    state = torch.get_rng_state()
    bank = build_feature_bank(model, plain, aug, eps, n_aug=3, seed=4, progress=False, extract_fn=simple_extract)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    used = {i for e in eps for i in e.support + e.query}
    assert bank.eval_features.shape == (len(used), 16)
    assert bank.aug_features.shape[0] == 3 and bank.n_aug == 3
    e = eps[-1]
    assert bank.support_of(e.support).shape == (3, 25, 16)
    assert torch.allclose(bank.eval_of(e.query), simple_extract(model, torch.utils.data.Subset(plain, e.query))[0])
    assert not torch.equal(bank.aug_features[0], bank.aug_features[1])  # the copies differ
    again = build_feature_bank(model, plain, aug, eps, n_aug=3, seed=4, progress=False, extract_fn=simple_extract)
    assert torch.equal(again.aug_features, bank.aug_features)  # seeded
    other = build_feature_bank(model, plain, aug, eps, n_aug=3, seed=5, progress=False, extract_fn=simple_extract)
    assert not torch.equal(other.aug_features, bank.aug_features)
    # an image's augmented copies do not depend on which other images are extracted with it
    alone = build_feature_bank(model, plain, aug, eps[-1:], n_aug=3, seed=4, progress=False, extract_fn=simple_extract)
    assert torch.allclose(alone.support_of(eps[-1].support), bank.support_of(eps[-1].support))
    acc = evaluate_protocol_a(bank, eps, C=10.0, progress=False)
    assert acc.shape == (24,) and np.all((acc >= 0) & (acc <= 100))
    assert acc[12:].mean() > 80  # clusters are well separated even through a random conv net
    # reference: the episode's features recomputed from the images directly, then fitted
    e = eps[3]
    xq = simple_extract(model, torch.utils.data.Subset(plain, e.query))[0]
    ref = logreg_predict(bank.support_of(e.support), e.support_labels, xq, C=10.0)
    assert acc[3] == pytest.approx(100 * np.mean(ref == np.asarray(e.query_labels)))
    no_aug = build_feature_bank(model, plain, None, eps, n_aug=0, progress=False, extract_fn=simple_extract)
    assert torch.equal(no_aug.support_of(e.support)[0], no_aug.eval_of(e.support))
    with pytest.raises(ValueError, match="support_dataset"):
        build_feature_bank(model, plain, None, eps, n_aug=2, progress=False, extract_fn=simple_extract)
    with pytest.raises(ValueError, match="no evaluation-view feature"):
        no_aug.eval_of([10_000])


def test_protocol_a_parallel_matches_serial():
    plain, aug = ToyImages(), ToyImages(noise=0.5)
    eps = sample_episodes(plain.targets, 3, 1, 3, 40, seed=0)
    bank = build_feature_bank(ToyModel().eval(), plain, aug, eps, n_aug=2, progress=False, extract_fn=simple_extract)
    with joblib.parallel_config(backend="threading"):  # the parallel code path without process start-up
        parallel = evaluate_protocol_a(bank, eps, n_jobs=2, progress=False, solver="sklearn")
    serial = evaluate_protocol_a(bank, eps, progress=False, solver="sklearn")
    np.testing.assert_array_equal(serial, parallel)
    # the batched solver, whole or in chunks of any size, gives the same per-episode accuracies
    np.testing.assert_array_equal(evaluate_protocol_a(bank, eps, progress=False), serial)
    np.testing.assert_array_equal(evaluate_protocol_a(bank, eps, progress=False, chunk_size=7), serial)
    with pytest.raises(ValueError, match="solver"):
        evaluate_protocol_a(bank, eps, solver="newton")
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_protocol_a(bank, eps, chunk_size=0)


def _random_episodes(n_ep, ways, support, d, seed, spread=0.3):
    """``n_ep`` episodes of non-negative, overlapping clusters, L2-normalised (float64)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_ep, ways, d, generator=g, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(support).expand(n_ep, -1)
    x = spread * centers.gather(1, y.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(n_ep, y.shape[1], d, generator=g, dtype=torch.float64)
    q = spread * centers.repeat_interleave(6, 1) + torch.randn(n_ep, 6 * ways, d, generator=g, dtype=torch.float64)
    return nn.functional.normalize(x.relu(), dim=-1), y, nn.functional.normalize(q.relu(), dim=-1)


@pytest.mark.parametrize("ways,support", [(5, 5), (5, 25), (2, 6)])  # 1-shot and 5-shot with 5 copies; binary
def test_batched_logreg_matches_sklearn(ways, support):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    for C in (0.1, 1.0, 20.0):
        x, y, q = _random_episodes(2, ways, support, 32, seed=int(C * 10) + support)
        w, b = logreg_fit_batched(x, y, ways, C=C)
        assert w.shape == (2, ways, 32) and b.shape == (2, ways) and w.dtype == torch.float64
        for e in range(2):
            # the reference: scikit-learn fitted to convergence on the same objective
            with threadpool_limits(limits=1):
                ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x[e].numpy(), y[e].numpy())
            coef = ref.coef_ if ways > 2 else np.concatenate([np.zeros_like(ref.coef_), ref.coef_])
            np.testing.assert_allclose(w[e].numpy(), coef, atol=1e-5)
            prob = torch.softmax(q[e] @ w[e].T + b[e], dim=-1).numpy()
            assert np.abs(prob - ref.predict_proba(q[e].numpy())).max() < 1e-4
            np.testing.assert_array_equal(prob.argmax(1), ref.predict(q[e].numpy()))


def test_batched_logreg_optimality_and_edge_cases():
    x, y, _ = _random_episodes(4, 5, 10, 20, seed=3)
    x[1] = x[1, ::10].repeat_interleave(10, 0)  # each class's rows identical: a singular Gram matrix
    x[2] = x[2, :, :4].repeat(1, 5)  # rank 4 < S: support spans only 4 dimensions
    C = 2.0
    w, b = logreg_fit_batched(x, y, 5, C=C)
    # naive gradient of sum_i CE + ||W||^2/(2C) at the solution, episode by episode, from the formula
    for e in range(4):
        we, be = w[e].clone().requires_grad_(), b[e].clone().requires_grad_()
        loss = sum(-torch.log_softmax(x[e, i] @ we.T + be, 0)[y[e, i]] for i in range(x.shape[1]))
        (loss + we.pow(2).sum() / (2 * C)).backward()
        assert we.grad.abs().max() < 1e-6 and be.grad.abs().max() < 1e-6
    # the optimum lies in the span of the support features: nothing orthogonal to episode 2's 4-dim span
    assert torch.allclose(w[2], w[2][:, :4].repeat(1, 5), atol=1e-9)
    assert torch.allclose(b.sum(1), torch.zeros(4, dtype=torch.float64), atol=1e-9)  # centred intercepts
    # episodes are independent: fitting one alone gives the same answer
    w0, b0 = logreg_fit_batched(x[3:], y[3:], 5, C=C)
    assert torch.allclose(w0[0], w[3], atol=1e-7) and torch.allclose(b0[0], b[3], atol=1e-7)
    with pytest.raises(ValueError, match="labels must lie"):
        logreg_fit_batched(x, y + 1, 5)
    with pytest.raises(ValueError, match="C must be"):
        logreg_fit_batched(x, y, 5, C=-1.0)
    with pytest.raises(ValueError, match="expected support"):
        logreg_fit_batched(x[0], y, 5)


def test_batched_logreg_separable_accuracy():
    x, y, q = _random_episodes(20, 5, 5, 64, seed=7, spread=4.0)
    w, b = logreg_fit_batched(x, y, 5, C=1.0)
    pred = (torch.bmm(q, w.transpose(1, 2)) + b.unsqueeze(1)).argmax(-1)
    assert (pred == torch.arange(5).repeat_interleave(6)).double().mean() > 0.99


def test_proto_head_is_nearest_prototype():
    g = torch.Generator().manual_seed(0)
    protos = nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1) * 0.8
    f = torch.randn(50, 16, generator=g)
    fn = nn.functional.normalize(f, dim=1)
    ref = torch.cdist(fn.double(), protos.double()).argmin(1)
    assert torch.equal(ProtoHead(protos)(f).argmax(1), ref)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_protocol_b_restores_weights_exactly():
    plain, aug = ToyImages(), ToyImages(noise=0.5)
    model = ToyModel()
    model.train()
    model.backbone[0].bias.requires_grad_(False)
    seen = []
    inner = model.forward_features

    def spy(x):
        seen.append(model.backbone[0].weight.detach().clone())
        return inner(x)

    model.forward_features = spy
    before = _snapshot(model)
    ep = sample_episodes(plain.targets, 4, 2, 3, 1, seed=0)[0]
    acc = finetune_episode(model, ep, aug, plain, steps=3, lr=0.05)
    assert 0 <= acc <= 100
    assert not torch.equal(seen[0], seen[-1])  # the weights did move during fine-tuning
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # parameters and BatchNorm buffers, bit for bit
    assert model.training and all(m.training for m in model.modules())
    assert not model.backbone[0].bias.requires_grad and model.backbone[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def failing_after(dataset_cls, n_reads, **kwargs):
    """A ``dataset_cls(**kwargs)`` whose item reads fail (``RuntimeError: disk failed``) after ``n_reads``."""

    class Broken(dataset_cls):
        calls = 0

        def __getitem__(self, i):
            self.calls += 1
            if self.calls > n_reads:
                raise RuntimeError("disk failed")
            return super().__getitem__(i)

    return Broken(**kwargs)


def test_protocol_b_restores_after_error():
    plain = ToyImages()
    model = ToyModel()
    before = _snapshot(model)

    ep = sample_episodes(plain.targets, 2, 2, 2, 1, seed=0)[0]
    with pytest.raises(RuntimeError):
        finetune_episode(model, ep, failing_after(ToyImages, 10, noise=0.5), plain, steps=5, lr=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_protocol_b_accuracy_and_determinism():
    plain, aug = ToyImages(), ToyImages(noise=0.3)
    model = ToyModel()
    eps = sample_episodes(plain.targets, 3, 2, 4, 4, seed=2)
    a = evaluate_protocol_b(model, eps, aug, plain, steps=2, lr=1e-2, seed=1, progress=False)
    b = evaluate_protocol_b(model, eps, aug, plain, steps=2, lr=1e-2, seed=1, progress=False)
    np.testing.assert_array_equal(a, b)
    assert a.mean() > 70
    with pytest.raises(ValueError, match="steps"):
        finetune_episode(model, eps[0], aug, plain, steps=-1)


def test_protocol_b_joint_loss_restores_weights():
    from schane.config import LossConfig
    from schane.engine.criterion import build_criterion

    plain, aug = ToyImages(), ToyImages(noise=0.5)
    model = ToyModel()
    before = _snapshot(model)
    ep = sample_episodes(plain.targets, 3, 1, 3, 1, seed=0)[0]  # 1-shot: the two views are the positives
    acc = finetune_episode(model, ep, aug, plain, steps=2, lr=1e-2,
                           criterion=build_criterion(LossConfig(name="schane", lam=0.9)).joint)
    assert 0 <= acc <= 100
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
