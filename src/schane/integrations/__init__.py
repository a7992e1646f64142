"""Entry points for other people's training loops (optional extras).

* :mod:`schane.integrations.views`: the two-view transform and collator (torch only).
* :mod:`schane.integrations.transformers`: 🤗 ``Trainer`` with λ·SCHaNe + (1 − λ)·CE (``pip install 'schane[hf]'``).
* :mod:`schane.integrations.lightning`: a ``LightningModule`` with the same loss (``pip install 'schane[lightning]'``).

Each one gets right the three things a hand-written integration gets wrong: the embeddings are gathered across
processes with a gradient (:func:`schane.distributed.gather_with_grad`), the labels are gathered with them, and the
two views are concatenated as ``[all first views; all second views]`` with the labels repeated in the same order.
"""
