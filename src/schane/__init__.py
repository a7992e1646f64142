"""schane: fine-tune pretrained image models with SCHaNe (supervised contrastive learning with hard negatives)."""

__version__ = "0.2.0"
