"""Engine helpers: EMA against the formula, precision selection, seeded data order, logging."""

import json

import pytest
import torch
from torch import nn

from schane.engine.batches import SeededTransformDataset, epoch_batches
from schane.engine.device import resolve_amp, resolve_device
from schane.engine.ema import ModelEMA
from schane.engine.run_log import MetricsLogger, read_metrics


def test_ema_matches_formula_and_copies_int_buffers():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEMA(m, 0.9)
    ref = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in m.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        m.train()(torch.randn(5, 3))  # moves BN running stats and num_batches_tracked
        ema.update(m)
        for k, v in m.state_dict().items():
            if v.dtype.is_floating_point:
                ref[k] = 0.9 * ref[k] + 0.1 * v.double()
            else:
                ref[k] = v.clone()
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v.double(), ref[k].double(), atol=1e-6), k
    assert all(not p.requires_grad for p in ema.module.parameters())
    st = ema.state_dict()
    e2 = ModelEMA(m, 0.5)
    e2.load_state_dict(st)
    assert e2.decay == 0.9 and e2.updates == 3
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(m, 1.0)


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("none", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="train.amp"):
        resolve_amp("fp8", cpu)
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_epoch_batches_shard_the_same_global_batches():
    n, b = 37, 4
    single = epoch_batches(n, 2 * b, epoch=3, seed=5)
    r0 = epoch_batches(n, b, epoch=3, seed=5, rank=0, world_size=2)
    r1 = epoch_batches(n, b, epoch=3, seed=5, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(single) == 4  # drop_last: 37 // 8
    for t in range(4):
        assert sorted(r0[t] + r1[t]) == sorted(single[t])
    assert epoch_batches(n, b, epoch=3, seed=5) == epoch_batches(n, b, epoch=3, seed=5)
    assert epoch_batches(n, b, epoch=3, seed=5) != epoch_batches(n, b, epoch=4, seed=5)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_batches(5, 4, epoch=0, seed=0, world_size=2)


class _Base(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.zeros(2), i % 2


def test_seeded_transform_depends_only_on_seed_epoch_index():
    ds = SeededTransformDataset(_Base(), lambda x: x + torch.rand(2), seed=7)
    forward = [ds[i][0] for i in range(6)]
    torch.manual_seed(123)  # global RNG must not matter, nor the order
    backward = [ds[i][0] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    g = torch.get_rng_state()
    ds[0]
    assert torch.equal(g, torch.get_rng_state())  # the global stream is untouched
    ds.epoch = 1
    assert not torch.equal(ds[0][0], forward[0])
    assert ds[3][1:] == (1, 3)


def test_metrics_logger(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log({"kind": "epoch", "loss": torch.tensor(1.5), "bad": float("nan")})
    log.log({"kind": "epoch", "loss": 0.5})
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in recs] == [1.5, 0.5] and recs[0]["bad"] == "nan"
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install"):
        MetricsLogger(tmp_path, tensorboard=True)
