"""gather_distributed: 2-process gloo DDP gradients equal single-process gradients on the concatenated batch."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import schane.losses._gather as gather_mod
from schane.distributed import gather_with_grad, is_distributed, rank, world_size
from schane.losses import build_contrastive_loss

WORLD, N, D_IN, D_OUT = 2, 6, 5, 4
# Per-rank class labels: 1, 2, 7 have positives only across ranks; 3 and 5 have no positive at all.
CLASS_LABELS = torch.tensor([0, 0, 1, 2, 3, 7, 4, 4, 5, 1, 2, 7])
# Instance ids: rank 0 holds view 1 of images 0-5, rank 1 view 2 (positives only across ranks), except that
# images 0 and 1 have both views on rank 0.
INSTANCE_IDS = torch.arange(6).repeat(2)
INSTANCE_IDS_MIXED = torch.tensor([0, 1, 0, 2, 3, 4, 1, 2, 5, 3, 4, 5])
CASES = {
    "schane": ("schane", {}, CLASS_LABELS, False),
    "schane_each_beta2": ("schane", {"positive_mode": "each", "beta": 2.0}, CLASS_LABELS, False),
    "schane_chunked_ref": ("schane", {"chunk_size": 4}, CLASS_LABELS, True),
    "supcon": ("supcon", {}, CLASS_LABELS, True),
    "simclr": ("simclr", {}, INSTANCE_IDS, False),
    "hcl": ("hcl", {"tau_plus": 0.1}, INSTANCE_IDS_MIXED, True),
}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * N, D_IN, dtype=torch.float64, generator=g)
    ref = torch.randn(5, D_OUT, dtype=torch.float64, generator=g)
    ref_y = torch.tensor([2, 3, 9, 0, 5])
    return x, ref, ref_y


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Linear(D_IN, D_OUT).double()


def _grads(model, loss_fn, x, y, ref, ref_y, use_ref):
    out = model(x)
    loss = loss_fn(out, y, ref, ref_y) if use_ref else loss_fn(out, y)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _worker(r: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=r, world_size=WORLD)
    torch.set_num_threads(1)
    x, ref, ref_y = _data()
    sl = slice(r * N, (r + 1) * N)
    results = {}
    for key, (name, kw, labels, use_ref) in CASES.items():
        model = DDP(_model())
        loss_fn = build_contrastive_loss(name, gather_distributed=True, **kw)
        results[key] = _grads(model, loss_fn, x[sl], labels[sl], ref, ref_y, use_ref)
    z = (torch.arange(3.0) + r).requires_grad_()
    gathered = gather_with_grad(z[:, None])
    (gathered.squeeze(1) * torch.arange(6.0)).sum().backward()  # d/dz_r = sum over ranks of slice r's weights
    results["gather_grad"] = z.grad
    results["info"] = (rank(), world_size(), is_distributed())
    loss_fn = build_contrastive_loss("schane", gather_distributed=True)
    try:
        loss_fn(torch.randn(4 if r == 0 else 3, 3), torch.zeros(4 if r == 0 else 3, dtype=torch.long))
        results["unequal"] = None
    except ValueError as e:
        results["unequal"] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{r}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("key", list(CASES))
def test_ddp_grads_equal_single_process(rank_results, key):
    name, kw, labels, use_ref = CASES[key]
    x, ref, ref_y = _data()
    full_loss, full_grads = _grads(
        _model(), build_contrastive_loss(name, **kw), x, labels, ref, ref_y, use_ref
    )
    assert any(g.abs().sum() > 0 for g in full_grads)
    for res in rank_results:
        _, grads = res[key]
        for a, b in zip(grads, full_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    # each rank's value is world_size x its share: their mean is the full-batch loss
    mean_loss = sum(res[key][0] for res in rank_results) / WORLD
    torch.testing.assert_close(mean_loss, full_loss, atol=1e-9, rtol=1e-9)


def test_gather_backward_sums_over_ranks(rank_results):
    for r, res in enumerate(rank_results):
        assert res["info"] == (r, WORLD, True)
        # rank r's rows sit at 3r..3r+2 in the gathered tensor; both ranks' losses weigh them by arange(6)
        torch.testing.assert_close(res["gather_grad"], WORLD * torch.arange(3.0) + WORLD * 3 * r)


def test_unequal_batch_sizes_raise(rank_results):
    for res in rank_results:
        assert (
            res["unequal"] is not None and "same batch size" in res["unequal"] and "[4, 3]" in res["unequal"]
        )


def test_without_process_group_is_noop_with_one_warning(monkeypatch):
    monkeypatch.setattr(gather_mod, "_warned_no_group", False)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    loss = build_contrastive_loss("schane", gather_distributed=True)
    with pytest.warns(UserWarning, match="not initialised"):
        v = loss(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(x, y)
    torch.testing.assert_close(v, build_contrastive_loss("schane")(x, y))
    assert gather_with_grad(x) is x
