"""EmbeddingQueue: FIFO order, detaching, checkpoint round trip, use as extra contrast samples."""

from __future__ import annotations

import pytest
import torch

from schane.losses import SCHaNeLoss
from schane.memory import EmbeddingQueue


def _batch(start: int, n: int, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return ids[:, None].float().repeat(1, dim), ids


def test_fifo_order_and_wraparound():
    q = EmbeddingQueue(size=5, dim=3)
    assert len(q) == 0 and q.get()[0].shape == (0, 3)
    q.enqueue(*_batch(0, 2))
    q.enqueue(*_batch(2, 2))
    assert q.get()[1].tolist() == [0, 1, 2, 3]
    q.enqueue(*_batch(4, 3))  # overwrites the two oldest
    emb, lab = q.get()
    assert lab.tolist() == [2, 3, 4, 5, 6] and len(q) == 5
    assert torch.equal(emb[:, 0], lab.float())
    q.enqueue(*_batch(10, 7))  # larger than the queue: keep the newest 5
    assert q.get()[1].tolist() == [12, 13, 14, 15, 16]
    q.reset()
    assert len(q) == 0


def test_detached_and_cast():
    q = EmbeddingQueue(size=4, dim=2)
    z = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    q.enqueue(z * 2, torch.tensor([1, 2, 3], dtype=torch.int32))
    emb, lab = q.get()
    assert not emb.requires_grad and emb.dtype == torch.float32 and lab.dtype == torch.long
    torch.testing.assert_close(emb, (z * 2).detach().float())


def test_state_dict_round_trip(tmp_path):
    q = EmbeddingQueue(size=6, dim=3)
    q.enqueue(*_batch(0, 4))
    q.enqueue(*_batch(4, 4))
    torch.save(q.state_dict(), tmp_path / "queue.pt")
    q2 = EmbeddingQueue(size=6, dim=3)
    q2.load_state_dict(torch.load(tmp_path / "queue.pt"))
    for a, b in zip(q.get(), q2.get(), strict=True):
        assert torch.equal(a, b)
    q.enqueue(*_batch(8, 1))
    q2.enqueue(*_batch(8, 1))
    assert torch.equal(q.get()[1], q2.get()[1])
    with pytest.raises(ValueError, match="same size and dim"):
        EmbeddingQueue(size=7, dim=3).load_state_dict(q.state_dict())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: EmbeddingQueue(0, 3), "size"),
        (lambda: EmbeddingQueue(4, -1), "dim"),
        (lambda: EmbeddingQueue(4, 3).enqueue(torch.randn(2, 4), torch.tensor([0, 1])), r"\[N, 3\]"),
        (lambda: EmbeddingQueue(4, 3).enqueue(torch.randn(2, 3), torch.tensor([0.0, 1.0])), "integer labels"),
        (lambda: EmbeddingQueue(4, 3).enqueue(torch.randn(2, 3), torch.tensor([0])), "integer labels"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_queue_as_reference_set_in_a_training_loop():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    q = EmbeddingQueue(size=8, dim=3)
    loss_fn = SCHaNeLoss(temperature=0.5)
    history = []
    for step in range(3):
        x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, step])
        z = lin(x)
        ref = q.get()
        loss = loss_fn(z, y, *ref)
        expected = (
            loss_fn(z, y, torch.cat(history)[-8:][:, :3], torch.cat(history)[-8:][:, 3].long())
            if history
            else loss_fn(z, y)
        )
        torch.testing.assert_close(loss, expected)
        loss.backward()
        q.enqueue(z, y)
        history.append(torch.cat([z.detach(), y[:, None].float()], dim=1))
    assert len(q) == 8
