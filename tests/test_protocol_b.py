"""Protocol B: the (steps, lr) grid and its selection on validation episodes, the tuned parameters, the cached
frozen part, and the exact restore of the model."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from schane.config import ModelConfig, load_config
from schane.fewshot import (
    ProtoHead,
    Setting,
    evaluate_protocol_b,
    evaluate_protocol_b_grid,
    sample_episodes,
    settings_grid,
    tuned_parameters,
)
from schane.fewshot import protocol_b as pb
from schane.models import build_model
from schane.pipelines.fewshot import format_table
from schane.pipelines.scoring import TEST_SPLIT, VAL_SPLIT, FewShotStudy, FewShotViews
from test_fewshot_evaluators import ToyImages, ToyModel, failing_after

pytestmark = pytest.mark.usefixtures("one_thread")


def effnet(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="test_efficientnet", pretrained=False, proj_dim=8), num_classes=3)


class Images32(ToyImages):
    """ToyImages at 3x32x32 (what the tiny EfficientNet needs), with ``within`` more within-class noise."""

    def __init__(self, noise=0.0, seed=0, within=0.0):
        super().__init__(n_classes=6, per_class=8, noise=noise, seed=seed)
        self.base = nn.functional.interpolate(self.base, size=32, mode="nearest")
        g = torch.Generator().manual_seed(seed + 1)
        self.base = self.base + within * torch.randn(self.base.shape, generator=g)


def full_state(model):
    """Every tensor, flag and mode protocol B may touch, for an exact before/after comparison."""
    return (
        {k: (v.detach().clone(), v.stride(), v.data_ptr()) for k, v in model.state_dict().items()},
        [(n, p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        [(m.training, "forward" in vars(m)) for m in model.modules()],  # no convolution left re-routed
    )


def assert_same_state(before, after):
    (t0, f0, m0), (t1, f1, m1) = before, after
    assert t0.keys() == t1.keys()
    for k, (v, stride, ptr) in t0.items():
        v1, stride1, ptr1 = t1[k]
        assert torch.equal(v, v1) and stride == stride1 and ptr == ptr1, k  # same values, layout and storage
    assert [(n, g) for n, g, _ in f0] == [(n, g) for n, g, _ in f1]
    for (_, _, a), (_, _, b) in zip(f0, f1, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert m0 == m1


# --------------------------------------------------------------------------- grid and tuned parameters


def test_settings_grid_puts_zero_steps_first_once():
    assert settings_grid([20, 0, 5], [1e-3, 1e-4]) == [
        Setting(0, 0.0), Setting(5, 1e-3), Setting(20, 1e-3), Setting(5, 1e-4), Setting(20, 1e-4)]
    assert settings_grid(10, 1e-3) == [Setting(10, 1e-3)]  # scalars are one-value grids
    assert settings_grid([0], [1e-3, 1e-2]) == [Setting(0, 0.0)]
    for steps, lrs, msg in (([], [1e-3], "at least one"), ([-1], [1e-3], ">= 0"), ([1], [0.0], "> 0")):
        with pytest.raises(ValueError, match=msg):
            settings_grid(steps, lrs)


def test_tuned_parameters_all_last_head():
    model = effnet()
    names = [n for n, _ in model.named_parameters()]
    assert tuned_parameters(model, "all") == names
    assert tuned_parameters(model, "head") == []
    last1 = tuned_parameters(model, "last", last_layers=1)
    # timm numbers EfficientNet layers per block, the 1x1 conv head and its norm with the last block
    assert {n.split(".")[1] for n in last1 if n.startswith("backbone.")} == {"blocks", "conv_head", "bn2"}
    assert all(n.startswith(("backbone.blocks.4.", "backbone.conv_head", "backbone.bn2", "classifier", "projector"))
               for n in last1)
    last2 = tuned_parameters(model, "last", last_layers=2)
    assert set(last1) < set(last2) and any(n.startswith("backbone.blocks.3.") for n in last2)
    model.backbone.conv_head.weight.requires_grad_(False)  # frozen by the user: never tuned
    assert "backbone.conv_head.weight" not in tuned_parameters(model, "last")
    with pytest.raises(ValueError, match="params must be"):
        tuned_parameters(model, "some")
    with pytest.raises(ValueError, match="last_layers"):
        tuned_parameters(model, "last", last_layers=0)


def test_efficientnet_split_is_the_model_forward():
    model = effnet().eval()
    x = torch.randn(4, 3, 32, 32)
    for layers in (1, 2, 3):
        tuned = set(tuned_parameters(model, "last", last_layers=layers))
        split = pb._split(model, "last", tuned)
        assert "EfficientNet" in split.name
        with torch.no_grad():
            torch.testing.assert_close(split.tail(split.trunk(x)), model.forward_features(x), rtol=1e-5, atol=1e-6)
        # the trunk holds no tuned parameter: its output does not depend on them
        grads = torch.autograd.grad(split.tail(split.trunk(x)).sum(), [p for n, p in model.named_parameters()
                                                                       if n in tuned and n.startswith("backbone")])
        assert all(g is not None for g in grads)
    # the stem tuned, a replaced forward or another architecture: the whole model runs per step
    assert pb._split(model, "last", {"backbone.conv_stem.weight"}).trunk is pb._identity
    assert pb._split(ToyModel(), "last", {"backbone.0.weight"}).trunk is pb._identity
    assert pb._split(model, "all", set(tuned_parameters(model, "all"))).trunk is pb._identity


# --------------------------------------------------------------------------- what a grid computes


def test_zero_steps_is_the_nearest_prototype_classifier():
    plain, aug = ToyImages(noise=0.0), ToyImages(noise=0.5)
    model = ToyModel().eval()
    eps = sample_episodes(plain.targets, 4, 2, 3, 6, seed=1)
    acc = evaluate_protocol_b(model, eps, aug, plain, steps=0, progress=False)
    with torch.no_grad():
        ref = []
        for ep in eps:  # naive reference: float64 distances to the normalised support means
            f = nn.functional.normalize(model.forward_features(torch.stack([plain[i][0] for i in ep.support])), dim=1)
            protos = torch.stack([f[torch.tensor(ep.support_labels) == j].mean(0) for j in range(ep.ways)]).double()
            q = nn.functional.normalize(model.forward_features(torch.stack([plain[i][0] for i in ep.query])), dim=1)
            pred = torch.cdist(q.double(), protos).argmin(1)
            ref.append(100.0 * (pred == torch.tensor(ep.query_labels)).double().mean().item())
    np.testing.assert_allclose(acc, ref)
    assert isinstance(ProtoHead(torch.ones(2, 3)), nn.Module)


@pytest.mark.parametrize("params", ["all", "last", "head"])
def test_grid_equals_separate_runs(params):
    """Step counts read off one trajectory per lr equal separate runs; lrs do not share state."""
    plain, aug = Images32(), Images32(noise=0.5)
    model = effnet()
    eps = sample_episodes(plain.targets, 3, 1, 3, 3, seed=0)
    kw = dict(params=params, last_layers=1, seed=4, progress=False)
    grid = settings_grid([0, 1, 3], [3.0, 30.0] if params == "head" else [1e-2, 1e-1])
    res = evaluate_protocol_b_grid(model, eps, aug, plain, settings=grid, **kw)
    assert list(res) == grid
    for s in grid:
        alone = evaluate_protocol_b(model, eps, aug, plain, steps=s.steps, lr=s.lr or 1.0, **kw)
        np.testing.assert_array_equal(res[s], alone, err_msg=str(s))
    # fine-tuning does something: some setting differs from the prototype classifier on some episode
    assert any(not np.array_equal(res[s], res[Setting(0, 0.0)]) for s in grid[1:])


def test_cached_trunk_equals_the_uncached_model(monkeypatch):
    """The cached EfficientNet trunk and a cache budget of 0 give what running the whole model per step gives."""
    plain, aug = Images32(), Images32(noise=0.5)
    model = effnet()
    eps = sample_episodes(plain.targets, 3, 2, 3, 3, seed=2)
    kw = dict(settings=settings_grid([0, 2, 4], [3e-2]), params="last", last_layers=2, progress=False)
    cached = evaluate_protocol_b_grid(model, eps, aug, plain, **kw)
    no_budget = evaluate_protocol_b_grid(model, eps, aug, plain, cache_bytes=0, **kw)
    monkeypatch.setattr(pb, "_efficientnet_split", lambda *a: None)
    whole = evaluate_protocol_b_grid(model, eps, aug, plain, **kw)
    for s in cached:
        np.testing.assert_array_equal(cached[s], no_budget[s])
        np.testing.assert_allclose(cached[s], whole[s], atol=100 / 9 + 1e-9)  # at most one query flips on float noise
    assert np.mean([np.mean(np.abs(cached[s] - whole[s])) for s in cached]) < 2.0


@pytest.mark.parametrize("params, channels_last", [("all", True), ("last", True), ("head", None), ("all", False)])
def test_restores_tensors_flags_modes_and_grads_exactly(params, channels_last):
    plain, aug = Images32(), Images32(noise=0.5)
    model = effnet()
    model.train()
    model.backbone.blocks[0].eval()
    model.backbone.conv_stem.weight.requires_grad_(False)
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 3.0)  # a caller's gradient survives
    seen = []
    model.backbone.blocks[4][0].register_forward_hook(lambda m, i, o: seen.append(m.conv_pw.weight.detach().clone()))
    before = full_state(model)
    eps = sample_episodes(plain.targets, 3, 1, 2, 2, seed=0)
    from schane.config import LossConfig
    from schane.engine.criterion import build_criterion

    crit = build_criterion(LossConfig(name="schane", lam=0.5)).joint
    res = evaluate_protocol_b_grid(model, eps, aug, plain, settings=settings_grid([0, 3], [0.05]), params=params,
                                   last_layers=1, criterion=crit, channels_last=channels_last, progress=False)
    assert all(0 <= a <= 100 for v in res.values() for a in v)
    if params != "head":
        assert not all(torch.equal(seen[0], w) for w in seen[1:])  # the weights did move during fine-tuning
    assert_same_state(before, full_state(model))


def test_restores_after_error():
    plain = Images32()
    model = effnet()
    before = full_state(model)

    eps = sample_episodes(plain.targets, 2, 2, 2, 1, seed=0)
    for params in ("all", "last"):
        broken = failing_after(Images32, 10, noise=0.5)
        with pytest.raises(RuntimeError, match="disk failed"):
            evaluate_protocol_b(model, eps, broken, plain, steps=5, lr=0.5, params=params, progress=False)
        assert_same_state(before, full_state(model))


def test_augmented_copies_do_not_depend_on_the_episode_or_the_global_rng():
    plain, aug = ToyImages(), ToyImages(noise=0.5)
    model = ToyModel()
    eps = sample_episodes(plain.targets, 3, 2, 4, 4, seed=2)
    a = evaluate_protocol_b(model, eps, aug, plain, steps=2, lr=1e-2, seed=1, progress=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    b = evaluate_protocol_b(model, eps[::-1], aug, plain, steps=2, lr=1e-2, seed=1, progress=False)[::-1]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    np.testing.assert_array_equal(a, b)  # episode order changes nothing
    with pytest.raises(ValueError, match="settings"):
        evaluate_protocol_b_grid(model, eps, aug, plain, settings=[(2, 0.0)])
    with pytest.raises(ValueError, match="same split"):
        evaluate_protocol_b(model, eps, ToyImages(per_class=3), plain, steps=1)


# --------------------------------------------------------------------------- selection on validation episodes


class Mislabelled(Images32):
    """Augmented views that show another class: view of image ``i`` is an image of the next class (with noise),
    under ``i``'s label. Training on such views can only hurt."""

    def __getitem__(self, i):
        x, y = super().__getitem__((i + 8) % len(self))  # 8 images per class
        return x, self.targets[i]


def study(within, noise, overrides=(), mislabelled=False):
    """A protocol-B study with the default grid on two class-disjoint toy splits (validation, test)."""
    cfg = load_config(None, ["fewshot.protocol=B", "fewshot.ways=3", "fewshot.shots=[2]", "fewshot.queries=4",
                             "train.progress=false", *overrides])
    views, episodes = FewShotViews(), {}
    for split, seed in ((VAL_SPLIT, 10), (TEST_SPLIT, 20)):
        plain = Images32(seed=seed, within=within)
        views.eval[split] = plain
        views.support[split] = (Mislabelled if mislabelled else Images32)(noise=noise, seed=seed, within=within)
        views.labels[split] = plain.targets
        episodes[split] = {2: sample_episodes(plain.targets, 3, 2, 4, 40, seed=seed)}
    return FewShotStudy(cfg, views, episodes, torch.device("cpu"))


def grid_on_test(st, model):
    fs = st.cfg.fewshot
    return st.evaluate(model, TEST_SPLIT, [2], settings_grid(fs.finetune_steps, fs.finetune_lr), "all settings")


@pytest.mark.parametrize("within, noise, mislabelled", [(0.0, 0.3, True), (1.5, 1.0, False)])
def test_default_selection_is_not_worse_than_the_prototype_classifier(within, noise, mislabelled):
    """Done means: with default settings, protocol B is not worse than its 0-step prototype classifier on the
    same test episodes. First fixture: augmented views that show another class, so fine-tuning hurts (a
    selection that ignored the validation episodes would lose); second: fine-tuning helps and the selection
    must find it."""
    st = study(within, noise, mislabelled=mislabelled)
    model = effnet()
    row = st.row("pretrained", None, None, [("none", lambda: model)], "pretrained")
    sel = row["selected"]["2"]
    test = np.asarray(row["per_episode"]["2"])
    every = {s: a.mean() for (_, s), a in grid_on_test(st, model).items()}
    zero = every[Setting(0, 0.0)]
    assert test.mean() >= zero
    np.testing.assert_allclose(test.mean(), every[Setting(sel["steps"], sel["lr"])])  # the selected setting ran
    # the choice is the best validation mean, and the 0-step setting was among the candidates
    grid = {(g["steps"], g["lr"]): g["val_acc"] for g in sel["val_grid"]}
    assert (0, 0.0) in grid and sel["val_acc"] == max(grid.values()) >= grid[(0, 0.0)]
    if mislabelled:  # fine-tuning hurts: some default settings are far worse on the test episodes
        assert min(every.values()) < zero - 10
    else:  # fine-tuning helps: the selection leaves the prototype classifier
        assert sel["steps"] > 0 and test.mean() > zero + 5
    table = format_table({"protocol": "B", "dataset": "toy", "backbone": "test_efficientnet", "ways": 3,
                          "queries": 4, "episodes": 40, "rows": [row], "differences": [], "seeds": []})
    assert "steps@learning rate" in table
    shown = f"{sel['steps']}@{sel['lr']:g}" if sel["steps"] else "0 steps"
    assert f"-, {shown} ({sel['val_acc']:.1f})" in table
    json.dumps(row)  # the selection is JSON-safe


def test_selection_reports_a_single_setting_without_validation():
    st = study(0.0, 0.5, ["fewshot.finetune_steps=5", "fewshot.finetune_lr=1e-3"])  # scalars: one-value grids
    assert st.cfg.fewshot.finetune_steps == [5] and st.cfg.fewshot.finetune_lr == [1e-3]
    calls = []
    model = effnet()
    row = st.row("pretrained", None, None, [("none", lambda: calls.append(1) or model)], "pretrained")
    assert row["selected"]["2"] == {"checkpoint": "none", "C": None, "steps": 5, "lr": 1e-3, "val_acc": None,
                                    "val_grid": []}
    assert len(calls) == 1  # nothing to choose: no validation pass


def test_augmented_copy_k_is_protocol_a_copy_k():
    """Protocol B's copy k of an image is the crop protocol A's feature bank draws as copy k."""
    from schane.engine.batches import SeededItems
    from schane.engine.seeding import sample_seed

    aug = ToyImages(noise=0.5)
    for k, i in ((0, 3), (4, 10)):
        torch.testing.assert_close(pb._seeded_item(aug, sample_seed(7, k, i), i)[0], SeededItems(aug, 7, k)[i][0],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("override, message", [
    ("fewshot.finetune_steps=[]", "finetune_steps"), ("fewshot.finetune_steps=[0, -1]", "finetune_steps"),
    ("fewshot.finetune_steps=[5, 5]", "repeat"), ("fewshot.finetune_lr=[1e-3, 0]", "finetune_lr"),
    ("fewshot.finetune_lr=[.inf]", "finetune_lr"), ("fewshot.finetune_lr=[1e-3, 1e-3]", "repeat"),
    ("fewshot.finetune_params=backbone", "finetune_params"), ("fewshot.finetune_last_layers=0", "last_layers"),
    ("fewshot.finetune_steps=[true]", "finetune_steps"),
])
def test_protocol_b_config_is_checked(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_protocol_b_config_reads_grids_and_scalars():
    cfg = load_config(None, ["fewshot.finetune_steps=[0, 40]", "fewshot.finetune_lr=0.1"])
    assert cfg.fewshot.finetune_steps == [0, 40] and cfg.fewshot.finetune_lr == [0.1]
    default = load_config(None).fewshot
    assert 0 in default.finetune_steps  # the prototype classifier is always a candidate by default
    assert settings_grid(default.finetune_steps, default.finetune_lr)[0] == Setting(0, 0.0)
