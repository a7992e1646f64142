"""Fine-tune a timm backbone with λ·SCHaNe + (1 − λ)·CE in a plain PyTorch loop (one process or torchrun).

    python examples/plain_pytorch.py --backbone resnet50.a1_in1k --pretrained --data ./my_images --max-steps 1000
    torchrun --nproc_per_node 4 examples/plain_pytorch.py ...   # DDP: the contrastive term sees all 4 batches

``--data`` is a folder with one sub-folder of images per class (torchvision ``ImageFolder``).
"""

from __future__ import annotations

import argparse
import os
import sys

import timm
import torch
import torch.distributed as dist
from torchvision import datasets
from torchvision import transforms as T

from schane.integrations.views import TwoViewCollator, TwoViewTransform
from schane.losses import JointLoss, SCHaNeLoss
from schane.models import ProjectionHead


class Net(torch.nn.Module):
    """Backbone → pooled feature → (linear classifier, L2-normalised projection head)."""

    def __init__(self, backbone: torch.nn.Module, num_classes: int, proj_dim: int = 128) -> None:
        super().__init__()
        d = backbone.num_features
        self.backbone, self.classifier, self.projector = backbone, torch.nn.Linear(d, num_classes), ProjectionHead(d, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)  # [N, d]
        return self.classifier(feats), self.projector(feats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True, help="a timm model name")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--data", required=True, help="an ImageFolder: one sub-folder per class")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="images per process (each gives two views)")
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")

    backbone = timm.create_model(args.backbone, pretrained=args.pretrained, num_classes=0)  # pooled [B, d]
    cfg = timm.data.resolve_model_data_config(backbone)
    augment = T.Compose([
        T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
        T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"]),
    ])
    train_ds = datasets.ImageFolder(args.data, transform=TwoViewTransform(augment))
    sampler = torch.utils.data.DistributedSampler(train_ds, drop_last=True) if distributed else None
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler,
                                         shuffle=sampler is None, drop_last=True,
                                         collate_fn=TwoViewCollator(as_dict=False))
    model = Net(backbone, len(train_ds.classes)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)

    criterion = JointLoss(SCHaNeLoss(temperature=0.5, beta=1.0, gather_distributed=distributed), lam=0.9)
    step = 0
    while step < args.max_steps:
        if sampler is not None:
            sampler.set_epoch(step)
        for x, y in loader:  # x [2B, 3, H, W]: first views, then second views; y [2B]
            x, y = x.to(device), y.to(device)
            logits, z = ddp(x)
            out = criterion(logits, y, z)  # with torchrun: contrasts against every rank's z and y
            optimizer.zero_grad()
            out.total.backward()
            optimizer.step()
            step += 1
            print(f"step {step}: loss {out.total.item():.4f} schane {out.contrastive.item():.4f} ce {out.ce.item():.4f}")
            if step == args.max_steps:
                break
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
