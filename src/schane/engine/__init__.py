"""The training engine in parts (the model for its layout is timm's ``train.py`` and ``checkpoint_saver.py``).

* :mod:`.loop`: :class:`~.loop.TrainParts`, :func:`~.loop.train_step`, :func:`~.loop.train_one_epoch`;
* :mod:`.evaluate`: :func:`~.evaluate.evaluate`, :func:`~.evaluate.validate` (with the selection metric),
  :func:`~.evaluate.extract_features`;
* :mod:`.checkpoint`: atomic save/load, :class:`~.checkpoint.CheckpointManager` (what goes into a checkpoint,
  last/best/periodic policy, which weights are evaluated), :func:`~.checkpoint.load_checkpoint_model`;
* :mod:`.criterion`: :func:`~.criterion.build_criterion`, the objective built from ``LossConfig``;
* :mod:`.optim`: AdamW with layer-wise lr decay, warmup + cosine per step; :mod:`.ema`: weight EMA;
* :mod:`.utils`: seeding, seeded datasets, device and precision, run logging.

Training from a config (set-up, resume, the epoch loop, the final test) is the workflow
:func:`schane.pipelines.train.train`.
"""
