"""Fine-tune a 🤗 transformers image classifier with λ·SCHaNe + (1 − λ)·CE using ``Trainer``.

    python examples/transformers_trainer.py --model google/vit-base-patch16-224-in21k --data ./my_images --out vit-schane
    accelerate launch --num_processes 4 examples/transformers_trainer.py --model ... --data ... --out ...

``--model`` is a folder written by ``save_pretrained`` or a Hub id in the local cache; ``--data`` is a folder with
one sub-folder of images per class (torchvision ``ImageFolder``). The result is saved with ``save_pretrained``:
``AutoModelForImageClassification.from_pretrained(OUT)`` loads it, class names in ``config.id2label``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torchvision import datasets
from torchvision import transforms as T
from transformers import AutoImageProcessor, AutoModelForImageClassification, TrainingArguments
from transformers.utils import logging as hf_logging

from schane.integrations.transformers import (
    SCHaNeTrainer,
    TwoViewCollator,
    TwoViewTransform,
    remove_projection_head,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="save_pretrained folder or cached Hub id")
    p.add_argument("--data", required=True, help="an ImageFolder: one sub-folder per class")
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="images per process (each gives two views)")
    p.add_argument("--lr", type=float, default=5e-5)
    args = p.parse_args(argv)
    if not sys.stderr.isatty():  # a log file: no progress bars
        hf_logging.disable_progress_bar()

    processor = AutoImageProcessor.from_pretrained(args.model)
    size = processor.size.get("height") or processor.size["shortest_edge"]
    augment = T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
        T.ToTensor(), T.Normalize(processor.image_mean, processor.image_std),
    ])
    train_ds = datasets.ImageFolder(args.data, transform=TwoViewTransform(augment))  # [2, 3, H, W] per image
    model = AutoModelForImageClassification.from_pretrained(
        args.model, num_labels=len(train_ds.classes), ignore_mismatched_sizes=True,
        id2label=dict(enumerate(train_ds.classes)), label2id={c: i for i, c in enumerate(train_ds.classes)})

    trainer = SCHaNeTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, warmup_steps=args.max_steps // 10, lr_scheduler_type="cosine",
            remove_unused_columns=False, dataloader_drop_last=True,  # equal batches on every process
            logging_steps=max(1, args.max_steps // 20), save_strategy="no", report_to=[],
            disable_tqdm=not sys.stderr.isatty(), use_cpu=not torch.cuda.is_available()),
        train_dataset=train_ds,
        data_collator=TwoViewCollator(),  # [2B, 3, H, W]: first views, then second views; labels [2B]
        lam=0.9, temperature=0.5, beta=1.0,
    )
    trainer.train()
    remove_projection_head(model)  # a plain transformers classifier again
    if trainer.is_world_process_zero():
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)
    for record in trainer.state.log_history:
        if "schane_loss" in record:
            print(f"step {record['step']}: loss {record['loss']:.4f} schane {record['schane_loss']:.4f} "
                  f"ce {record['ce_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
