"""Fine-tune a timm backbone with λ·SCHaNe + (1 − λ)·CE in Lightning.

    python examples/lightning_module.py --backbone resnet50.a1_in1k --pretrained --data ./my_images --max-steps 1000
    python examples/lightning_module.py ... --devices 4 --strategy ddp   # the contrastive term sees all 4 GPUs' batches

``--data`` is a folder with one sub-folder of images per class (torchvision ``ImageFolder``).
"""

from __future__ import annotations

import argparse
import sys

import lightning.pytorch as pl
import timm
import torch
from torchvision import datasets
from torchvision import transforms as T

from schane.integrations.lightning import SCHaNeModule, TwoViewCollator, TwoViewTransform


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True, help="a timm model name")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (from its cache/hub)")
    p.add_argument("--data", required=True, help="an ImageFolder: one sub-folder per class")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="images per process (each gives two views)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--devices", default="auto")
    p.add_argument("--strategy", default="auto")
    args = p.parse_args(argv)

    backbone = timm.create_model(args.backbone, pretrained=args.pretrained, num_classes=0)  # pooled [B, d]
    cfg = timm.data.resolve_model_data_config(backbone)
    augment = T.Compose([
        T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
        T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"]),
    ])
    train_ds = datasets.ImageFolder(args.data, transform=TwoViewTransform(augment))  # [2, 3, H, W] per image
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,  # equal batches on every rank
        collate_fn=TwoViewCollator(as_dict=False))  # x [2B, 3, H, W]: first views, then second views; y [2B]

    module = SCHaNeModule(backbone, num_classes=len(train_ds.classes), lam=0.9, temperature=0.5, beta=1.0,
                          lr=args.lr, layer_decay=0.65)
    trainer = pl.Trainer(max_steps=args.max_steps, devices=args.devices, strategy=args.strategy,
                         enable_progress_bar=sys.stderr.isatty(), enable_checkpointing=False, logger=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, loader)
    m = trainer.callback_metrics
    if trainer.is_global_zero:
        print(f"after {trainer.global_step} steps: loss {float(m['train/loss']):.4f} "
              f"schane {float(m['train/schane']):.4f} ce {float(m['train/ce']):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
