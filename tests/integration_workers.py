"""Helpers and the per-process workers of test_integrations.py, in a module of their own so that a spawned process
imports only what its integration needs (transformers' Trainer or Lightning, not both)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from schane.integrations.views import TwoViewCollator

WORLD, PER_RANK, N_CLASSES = 2, 4, 4
LABELS = [0, 1, 2, 3, 1, 0, 3, 2]  # 8 images: every class on both ranks whatever the split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _views() -> torch.Tensor:
    """Two fixed views per image: ``[8, 2, 3, 32, 32]``."""
    return torch.randn(len(LABELS), 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _TwoViewSet(torch.utils.data.Dataset):
    def __init__(self, as_dict: bool) -> None:
        self.x, self.as_dict = _views(), as_dict

    def __len__(self) -> int:
        return len(LABELS)

    def __getitem__(self, i: int):
        return {"pixel_values": self.x[i], "labels": LABELS[i]} if self.as_dict else (self.x[i], LABELS[i])


def _full_batch(as_dict: bool = True):
    ds = _TwoViewSet(as_dict=as_dict)
    return TwoViewCollator(as_dict=as_dict)([ds[i] for i in range(len(ds))])


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in b)


def _hf_model(path: Path):
    from transformers import AutoModelForImageClassification

    from schane.integrations.transformers import add_projection_head

    model = AutoModelForImageClassification.from_pretrained(path)
    torch.manual_seed(0)
    return add_projection_head(model, proj_dim=16)


def _trainer_worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, PartialState
    from transformers import TrainerCallback, TrainingArguments

    # a forked child inherits accelerate's process-wide state from the parent (a Trainer run there): start afresh
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()

    from schane.integrations.transformers import SCHaNeTrainer

    grads = {}

    class Keep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update(_grads(model))

    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=PER_RANK, max_steps=1, optim="sgd",
                             learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             report_to=[], save_strategy="no", use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
                             logging_steps=1, dataloader_drop_last=True)
    trainer = SCHaNeTrainer(model=_hf_model(Path(model_dir)), args=args, train_dataset=_TwoViewSet(as_dict=True),
                            callbacks=[Keep()], proj_dim=16)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "schane_loss" in r]
    torch.save({"grads": grads, "logs": logs}, os.path.join(out_dir, f"rank{rank}.pt"))


def _trunk() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())


def _lightning_module():
    from schane.integrations.lightning import SCHaNeModule

    module = SCHaNeModule(_trunk(), N_CLASSES, num_features=8, proj_dim=16, lr=0.1, weight_decay=0.0)
    torch.manual_seed(1)
    for m in (module.classifier, module.projector):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return module


def _lightning_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    grads = {}

    class Keep(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads.update(_grads(module))

    loader = torch.utils.data.DataLoader(_TwoViewSet(as_dict=False), batch_size=PER_RANK,
                                         collate_fn=TwoViewCollator(as_dict=False))
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=DDPStrategy(process_group_backend="gloo"),
                         max_steps=1, enable_progress_bar=False, enable_checkpointing=False, logger=False,
                         enable_model_summary=False, callbacks=[Keep()])
    trainer.fit(_lightning_module(), loader)
    torch.save({"grads": grads, "logged": {k: float(v) for k, v in trainer.callback_metrics.items()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
