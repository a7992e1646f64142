"""``schane train``: fine-tune from a config (two views per image, ``lam * contrastive + (1 - lam) * CE``).

This module is the workflow around the engine's parts: it resolves the run directory and the resume point,
loads every split before the first step, builds the model, optimizer, schedule and objective
(:class:`~schane.engine.loop.TrainParts`), hands each epoch to :func:`~schane.engine.loop.train_one_epoch`,
validates and checkpoints through :class:`~schane.engine.checkpoint.CheckpointManager`, and evaluates the
selected weights on the test split once at the end.

One optimizer step sees ``data.batch_size`` images per process and micro-step (two augmented views each),
``optim.accum_steps`` micro-steps and ``WORLD_SIZE`` processes. The peak learning rate follows the linear
scaling rule ``optim.lr * effective_batch / optim.base_batch_size``. Each sample's augmentation is seeded by
``(train.seed, epoch, index)`` and the batch order by ``(train.seed, epoch)``, so a run resumed from a
mid-epoch checkpoint replays exactly the batches it had not consumed and ends with the same weights as an
uninterrupted run.

Examples:
    >>> from schane.config import load_config
    >>> cfg = load_config("configs/demo.yaml", ["loss.name=schane"])  # doctest: +SKIP
    >>> result = train(cfg)  # doctest: +SKIP
    >>> result.metrics["best_val_top1"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from schane.config import Config, save_config, to_dict
from schane.data.transforms import TwoViews
from schane.data.wds import training_stream
from schane.distributed import (
    PREEMPTED_EXIT_CODE,
    DistInfo,
    StopSignals,
    barrier,
    init_distributed,
    restarted_by_torchelastic,
    shutdown,
)
from schane.engine.batches import (
    IndexedDataset,
    SeededTransformDataset,
    epoch_batches,
    loader_batches,
    worker_init_fn,
)
from schane.engine.checkpoint import (
    CheckpointManager,
    evaluation_weights,
    load_checkpoint,
    remove_stale_temporaries,
)
from schane.engine.criterion import build_criterion
from schane.engine.device import resolve_amp, resolve_channels_last, resolve_device, to_channels_last
from schane.engine.ema import ModelEMA
from schane.engine.evaluate import classification_metrics, predict_logits, validate
from schane.engine.loop import StepInfo, TrainParts, train_one_epoch
from schane.engine.optim import build_optimizer, build_scheduler
from schane.engine.run_log import MetricsLogger, Throughput, truncate_metrics
from schane.engine.runlock import run_lock
from schane.engine.seeding import seed_everything
from schane.memory import EmbeddingQueue
from schane.models import build_model
from schane.models.small_maps import helps_on, small_map_convolutions
from schane.pipelines.run_report import write_run_report
from schane.pipelines.runs import check_config, config_diff, prepare_run_dir
from schane.pipelines.splits import dataset_splits, eval_transform_for, load_split, train_transform_for
from schane.progress import format_duration

logger = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any]], None]


class TrainingPreempted(Exception):
    """A stop signal ended the run at a step boundary after ``last.pt`` was written (every rank raises it).

    Attributes:
        checkpoint: the run's ``last.pt`` (continue with ``resume="auto"`` / ``--resume auto``).
        signal: the name of the signal that stopped the run.
        global_step: optimizer steps in the checkpoint.
        exit_code: what the command-line tool exits with (:data:`schane.distributed.PREEMPTED_EXIT_CODE`).
    """

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, checkpoint: Path, signal: str, global_step: int) -> None:
        super().__init__(f"stopped by {signal} at step {global_step}; {checkpoint} holds the run, continue it "
                         "with --resume auto")
        self.checkpoint, self.signal, self.global_step = checkpoint, signal, global_step


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        run_dir: the run directory (``config.yaml``, ``metrics.jsonl``, checkpoints, ``final.json``).
        best_checkpoint: ``best.pt`` (best validation top-1), or ``None`` without a validation split.
        last_checkpoint: ``last.pt`` (end of training; what ``--resume`` continues from).
        metrics: the contents of ``final.json``.
        report: ``report.md`` of the run (test split evaluated, ``train.report`` on), else ``None``.
    """

    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    metrics: dict[str, Any]
    report: Path | None = None


def peak_lr(cfg: Config, world_size: int) -> float:
    """``optim.lr`` scaled by ``effective_batch / optim.base_batch_size`` (unscaled when that is null)."""
    eff = cfg.data.batch_size * cfg.optim.accum_steps * world_size
    if cfg.optim.base_batch_size is None:
        return cfg.optim.lr
    return cfg.optim.lr * eff / cfg.optim.base_batch_size


def train(cfg: Config, resume: str | None = None, *, callback: StepCallback | None = None) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.loss``; evaluate, checkpoint, log.

    Launch under ``torchrun`` for DDP: the process group is initialised from the environment (gloo on CPU,
    NCCL on CUDA), each rank trains on its shard of a ``DistributedSampler`` (``drop_last``) and only rank 0
    logs and writes files.

    Args:
        cfg: the run configuration (validated again here).
        resume: a checkpoint to continue from, ``"auto"`` for ``run_dir/last.pt`` (a fresh start when it does
            not exist yet), or ``None`` for a fresh run. Resuming a finished run changes nothing and returns it.
            A process that torchrun restarted (``TORCHELASTIC_RESTART_COUNT > 0``) resumes as with ``"auto"``,
            and refuses a run directory whose checkpoint holds another config.
        callback: called on every rank after each optimizer step with a dict holding ``epoch``,
            ``global_step``, ``batch_in_epoch``, ``loss`` and ``checkpoint`` (path written at this step or ``None``).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: on an invalid config, a run directory that already holds a run (without ``resume``) or that
            another process trains into (:class:`~schane.engine.runlock.RunLockedError`, naming it), an
            unusable output path, a corrupt checkpoint or a too-small dataset.
        FileNotFoundError: when the data or the resume checkpoint is missing.
        TrainingPreempted: when one of ``train.stop_signals`` arrived: every rank stopped at the same step and
            ``last.pt`` holds the run.
    """
    check_config(cfg)
    info = init_distributed(cfg.train.device)
    try:
        result = _train(cfg, resume, callback, info)
        # every rank arrives before the group goes: a rank that destroys its group while rank 0 still writes the
        # run's last files can abort at exit under gloo ("terminate called without an active exception")
        barrier(info)
        return result
    finally:
        shutdown(info)


def _resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        p = run_dir / "last.pt"
        return p if p.exists() else None
    p = Path(resume)
    if not p.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint; pass an existing .pt file or 'auto'")
    return p


def _train(cfg: Config, resume: str | None, callback: StepCallback | None, info: DistInfo) -> TrainResult:
    run_dir = cfg.run_dir
    prepare_run_dir(run_dir, create=info.is_main)
    elastic = resume is None and restarted_by_torchelastic()
    if elastic:  # torchrun restarted the workers: continue the run they were training
        resume = "auto"
        if info.is_main:
            logger.info("torchrun restart %s: resuming from %s", os.environ.get("TORCHELASTIC_RESTART_COUNT"),
                        run_dir / "last.pt")
    with run_lock(run_dir, enabled=info.is_main):  # rank 0 holds the run directory for the whole job
        return _train_locked(cfg, resume, callback, info, run_dir, elastic)


def _train_locked(cfg: Config, resume: str | None, callback: StepCallback | None, info: DistInfo,
                  run_dir: Path, elastic: bool) -> TrainResult:
    resume_path = _resolve_resume(resume, run_dir)
    if resume_path is None and (run_dir / "last.pt").exists():
        raise ValueError(
            f"run directory {run_dir} already holds a run (last.pt); continue it with --resume auto, "
            "or pick another name (--set name=NEW) or output_dir"
        )
    if resume == "auto" and resume_path is None and info.is_main:
        logger.info("--resume auto: no %s yet, starting a fresh run", run_dir / "last.pt")
    state = load_checkpoint(resume_path) if resume_path is not None else None
    if elastic and state is not None and (diff := config_diff(state["config"], to_dict(cfg))):
        raise ValueError(f"{resume_path} holds a run of another config ({'; '.join(diff[:3])}); a restarted job "
                         "continues only its own run: pick another name (--set name=NEW) or output_dir")
    if state is not None and _finished(state, cfg) and (run_dir / "final.json").is_file():
        if info.is_main:
            logger.info("%s: the run is finished (epoch %d of %d); nothing to resume, reusing it",
                        run_dir, int(state["epoch"]), cfg.optim.epochs)
        return _result(run_dir, json.loads((run_dir / "final.json").read_text()))
    if info.is_main:
        remove_stale_temporaries(run_dir)
    run = _setup(cfg, info)
    start = _start(cfg, run, state, resume_path, info)
    log = _open_log(cfg, run, info, fresh=state is None)
    tp, t_loop = Throughput(), time.perf_counter()
    stop = StopSignals(cfg.train.stop_signals).install()
    # on a CPU, convolutions on small maps (the last stages at small image sizes) run as matrix products
    try:
        with small_map_convolutions(run.parts.raw_model, enabled=helps_on(run.parts.device)):
            last_val = _fit(cfg, run, start, log, callback, tp, stop)
    except BaseException:
        if log is not None:
            log.close()
        raise
    finally:
        stop.restore()
    final: dict[str, Any] = {
        "loss": cfg.loss.name,
        "epochs": cfg.optim.epochs,
        "global_step": run.global_step,
        "best_epoch": run.manager.best_epoch,
        "best_val_top1": run.manager.best_metric,
        "last_val": last_val,
        "train_images_per_s": tp.value,
        # wall time of this process's training loop (evaluation included; after a resume, the resumed part)
        "train_seconds": time.perf_counter() - t_loop,
        "test": None,
    }
    if info.is_main:
        assert log is not None  # the main process opens the log
        _final_test(cfg, run, final)
        (run_dir / "final.json").write_text(json.dumps(final, indent=2))
        log.log({"kind": "final", **{k: v for k, v in final.items() if not isinstance(v, dict)},
                 **({f"test_{k}": v for k, v in final["test"].items()} if final["test"] else {})})
        log.close()
        _summary(cfg, run, final)
    barrier(info)
    return _result(run_dir, final)


def _finished(state: dict[str, Any], cfg: Config) -> bool:
    return int(state["epoch"]) >= cfg.optim.epochs and int(state["batch_in_epoch"]) == 0


def _result(run_dir: Path, final: dict[str, Any]) -> TrainResult:
    best = run_dir / "best.pt"
    report = final.get("report")
    return TrainResult(run_dir=run_dir, best_checkpoint=best if best.exists() else None,
                       last_checkpoint=run_dir / "last.pt", metrics=final,
                       report=Path(report) if report else None)


@dataclass
class _Run:
    """What :func:`_setup` builds for a run."""

    parts: TrainParts
    manager: CheckpointManager
    train_ds: SeededTransformDataset
    val_ds: IndexedDataset | None
    test_ds: IndexedDataset | None
    n_batches: int
    steps_per_epoch: int
    peak_lr: float
    global_step: int = 0
    stream: Any = None


def _load_splits(cfg: Config, info: DistInfo) -> tuple[Any, Any, Any]:
    """``train`` (rank 0 first, so it downloads/caches alone), then ``val`` and ``test`` when used."""
    train_base = load_split(cfg, "train") if info.is_main else None
    barrier(info)
    if not info.is_main:
        train_base = load_split(cfg, "train")
    splits = dataset_splits(cfg)
    val = load_split(cfg, "val") if cfg.data.val_fraction > 0 and "val" in splits else None
    # the test split is read now, so that a missing test file stops the run before training, not after
    test = load_split(cfg, "test") if cfg.train.test_at_end and "test" in splits and info.is_main else None
    return train_base, val, test


def _setup(cfg: Config, info: DistInfo) -> _Run:

    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    train_base, val_base, test_base = _load_splits(cfg, info)
    num_classes = len(train_base.classes)
    if num_classes < 2:
        raise ValueError(f"dataset {cfg.data.name!r} has {num_classes} class(es) in its train split; need >= 2")
    if len(train_base) // (cfg.data.batch_size * info.world_size) < 1:  # before the model is built
        epoch_batches(len(train_base), cfg.data.batch_size, epoch=0, seed=cfg.train.seed, world_size=info.world_size)
    model = build_model(cfg.model, num_classes).to(device)
    channels_last = resolve_channels_last(cfg.train.channels_last, model)
    if channels_last:
        model = to_channels_last(model)  # 1x1 weights keep standard strides: DDP's buckets match their gradients
    train_ds = SeededTransformDataset(train_base, TwoViews(train_transform_for(cfg, model)), cfg.train.seed)
    eval_tf = eval_transform_for(cfg, model)
    val_ds = IndexedDataset(val_base, eval_tf) if val_base is not None and len(val_base) > 0 else None
    test_ds = IndexedDataset(test_base, eval_tf) if test_base is not None else None
    nb = len(train_base) // (cfg.data.batch_size * info.world_size)
    if nb < 1:  # raises the explanatory error
        epoch_batches(len(train_base), cfg.data.batch_size, epoch=0, seed=cfg.train.seed, world_size=info.world_size)
    stream = training_stream(cfg.data, train_ds.transform, cfg.train.seed, info.rank, info.world_size)
    if stream is not None:  # data.name=wds with data.options.stream=true: the shards read in order
        nb = stream.batches_per_epoch(cfg.data.batch_size, cfg.data.num_workers)
    accum = cfg.optim.accum_steps
    if cfg.train.max_steps_per_epoch is not None:
        nb = min(nb, cfg.train.max_steps_per_epoch * accum)
    steps_per_epoch = math.ceil(nb / accum)
    lr = peak_lr(cfg, info.world_size)
    if cfg.optim.min_lr > lr:
        raise ValueError(f"optim.min_lr ({cfg.optim.min_lr:g}) is above the peak learning rate {lr:g} "
                         f"(optim.lr scaled to the effective batch); lower optim.min_lr")
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    criterion = build_criterion(cfg.loss, gather_distributed=bool(cfg.loss.gather_distributed and info.distributed))
    queue = None
    if criterion.contrastive is not None and cfg.loss.queue_size > 0 and cfg.loss.lam > 0:
        queue = EmbeddingQueue(cfg.loss.queue_size, cfg.model.proj_dim)
    wrapped: torch.nn.Module = model
    if info.distributed:
        unused = criterion.contrastive is None or cfg.loss.lam in (0.0, 1.0)
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )
    parts = TrainParts(wrapped, model, optimizer, scheduler, scaler, criterion, device, amp_dtype, info, ema, queue,
                       accum, cfg.optim.clip_grad, channels_last)
    manager = CheckpointManager(cfg.run_dir, parts, to_dict(cfg), train_base.classes, cfg.train.ckpt_every_steps)
    return _Run(parts, manager, train_ds, val_ds, test_ds, nb, steps_per_epoch, lr, stream=stream)


def _start(cfg: Config, run: _Run, state: dict[str, Any] | None, path: Path | None, info: DistInfo) -> tuple[int, int]:
    """Restore a checkpoint (or seed a fresh run's ranks); return ``(epoch, batch_in_epoch)`` to start at."""
    if state is None:
        if info.distributed:
            torch.manual_seed(cfg.train.seed + info.rank)  # distinct dropout/drop-path per rank
        return 0, 0
    diff = config_diff(state["config"], to_dict(cfg))
    if diff and info.is_main:
        logger.warning("resuming %s with a changed config: %s", path, "; ".join(diff))
    epoch, batch, run.global_step = run.manager.restore(state)
    if info.is_main:
        logger.info("resumed from %s: epoch %d, batch %d, step %d", path, epoch, batch, run.global_step)
    return epoch, batch


def _open_log(cfg: Config, run: _Run, info: DistInfo, *, fresh: bool) -> MetricsLogger | None:
    if not info.is_main:
        return None
    cfg.run_dir.mkdir(parents=True, exist_ok=True)

    save_config(cfg, cfg.run_dir / "config.yaml")
    if not fresh:  # the log describes the weights' trajectory: records after the checkpoint's step go
        truncate_metrics(cfg.run_dir / "metrics.jsonl", run.global_step)
    log = MetricsLogger(cfg.run_dir, cfg.train.tensorboard)
    if fresh:
        p = run.parts
        log.log({
            "kind": "start", "world_size": info.world_size, "device": str(p.device),
            "amp": str(p.amp_dtype).replace("torch.", "") if p.amp_dtype else "fp32", "peak_lr": run.peak_lr,
            "effective_batch": cfg.data.batch_size * p.accum_steps * info.world_size,
            "steps_per_epoch": run.steps_per_epoch, "num_classes": len(run.manager.class_names),
            "train_images": len(run.train_ds), "val_images": len(run.val_ds) if run.val_ds is not None else 0,
        })
        logger.info("training %s: %d images of %d classes, %d epochs of %d steps, peak lr %.3g, world size %d, "
                    "run dir %s", cfg.name, len(run.train_ds), len(run.manager.class_names), cfg.optim.epochs,
                    run.steps_per_epoch, run.peak_lr, info.world_size, cfg.run_dir)
    return log


def _fit(cfg: Config, run: _Run, start: tuple[int, int], log: MetricsLogger | None,
         callback: StepCallback | None, tp: Throughput, stop: StopSignals) -> dict[str, Any] | None:
    """Every remaining epoch: train, validate, checkpoint. Returns the last validation's summary.

    Raises:
        TrainingPreempted: after a stop signal, once ``last.pt`` holds the step every rank stopped at.
    """
    p, info = run.parts, run.parts.info
    start_epoch, start_batch = start
    epochs, last_val = cfg.optim.epochs, None
    eta = _Eta(epochs * run.steps_per_epoch, run.global_step) if info.is_main else None
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        run.train_ds.epoch = epoch
        batches = epoch_batches(len(run.train_ds), cfg.data.batch_size, epoch=epoch, seed=cfg.train.seed,
                                rank=info.rank, world_size=info.world_size)[: run.n_batches]
        first = start_batch if epoch == start_epoch else 0
        if run.stream is None:
            loader = loader_batches(DataLoader(
                run.train_ds, batch_sampler=batches[first:], num_workers=cfg.data.num_workers,
                worker_init_fn=worker_init_fn,
                generator=torch.Generator().manual_seed(cfg.train.seed * 1000003 + epoch),
                pin_memory=p.device.type == "cuda",
            ))
        else:
            run.stream.set_epoch(epoch, first, cfg.data.batch_size)
            loader = loader_batches(DataLoader(run.stream, batch_size=cfg.data.batch_size,
                                               num_workers=cfg.data.num_workers, worker_init_fn=worker_init_fn,
                                               pin_memory=p.device.type == "cuda"), run.n_batches - first)
        on_step = _step_hook(cfg, run, log, callback, eta)
        stats, run.global_step = train_one_epoch(
            p, loader, epoch=epoch, n_batches=run.n_batches, first_batch=first, global_step=run.global_step,
            batch_size=cfg.data.batch_size, on_step=on_step, throughput=tp,
            progress=info.is_main, bars=cfg.train.progress, desc=f"epoch {epoch + 1}/{epochs}",
            # a log line every quarter epoch, at most every train.log_every_steps steps
            log_every=max(cfg.train.log_every_steps * p.accum_steps, math.ceil(run.n_batches / 4)),
            stop=lambda: stop.agreed(info, p.device),
        )
        if stats.stopped_at is not None:
            _preempt(run, log, stop, epoch, stats.stopped_at)
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": run.global_step, **stats.record(),
                                  "images_per_s": tp.value}
        metric = None
        if run.val_ds is not None and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs) and info.is_main:
            metric = _validate(cfg, run, record)
            last_val = {"top1": metric, **({"ema": True} if p.ema is not None else {})}
        run.manager.end_epoch(epoch, metric, run.global_step)
        if info.is_main:
            assert log is not None  # the main process opens the log
            if metric is not None:
                record["best_val_top1"] = run.manager.best_metric
            log.log(record, step=run.global_step)
            _epoch_line(cfg, epoch, record, time.perf_counter() - t0)
            if eta is not None and first == 0:
                eta.epoch(run.global_step, epochs - epoch - 1, time.perf_counter() - t0)
        barrier(info)
        if epoch + 1 < epochs and stop.agreed(info, p.device):  # last.pt of the epoch's end is written
            _preempt(run, log, stop, epoch + 1, 0, saved=True)
    return last_val


def _preempt(run: _Run, log: MetricsLogger | None, stop: StopSignals, epoch: int, batch: int,
             saved: bool = False) -> None:
    """Write ``last.pt`` at this step boundary (every rank), log the stop and raise :class:`TrainingPreempted`."""
    t0 = time.perf_counter()
    if not saved:
        run.manager.save_mid_epoch(epoch=epoch, batch_in_epoch=batch, global_step=run.global_step)
    seconds = time.perf_counter() - t0
    signal_name = stop.received or "a stop request"
    if log is not None:
        log.log({"kind": "stopped", "signal": signal_name, "epoch": epoch, "batch_in_epoch": batch,
                 "step": run.global_step, "checkpoint_seconds": seconds}, step=run.global_step)
        logger.warning("%s: stopped at epoch %d, batch %d (step %d); checkpoint written in %.1f s to %s; exit %d, "
                       "continue with --resume auto", signal_name, epoch + 1, batch, run.global_step, seconds,
                       run.manager.last_path, PREEMPTED_EXIT_CODE)
    raise TrainingPreempted(run.manager.last_path, signal_name, run.global_step)


def _validate(cfg: Config, run: _Run, record: dict[str, Any]) -> float:

    p = run.parts
    assert run.val_ds is not None  # _fit validates only with a validation split
    vals, metric = validate(
        p.raw_model, run.val_ds, ema_model=p.ema.module if p.ema is not None else None, batch_size=cfg.data.eval_batch_size,
        device=p.device, amp_dtype=p.amp_dtype, num_workers=cfg.data.num_workers, progress=cfg.train.progress,
    )
    record.update(vals)
    p.model.train()
    return metric


class _Eta:
    """The estimated time of the whole run, logged once after the first steps and again after the first epoch."""

    STEPS = 5

    def __init__(self, total_steps: int, done: int) -> None:
        self.total, self.start_step, self.t0 = total_steps, done, time.perf_counter()
        self.told_steps = self.told_epoch = False

    def step(self, global_step: int) -> None:
        n = global_step - self.start_step
        if self.told_steps or n < self.STEPS:
            return
        self.told_steps = True
        per = (time.perf_counter() - self.t0) / n
        logger.info("estimated time: %s for the remaining %d steps (%.2f s per step after %d steps; evaluation "
                    "extra)", format_duration(per * (self.total - global_step)), self.total - global_step, per, n)

    def epoch(self, global_step: int, epochs_left: int, epoch_seconds: float) -> None:
        if self.told_epoch or epochs_left <= 0:
            return
        self.told_epoch = True
        logger.info("estimated time: %s for the remaining %d epochs (%.0f s per epoch with its evaluation)",
                    format_duration(epochs_left * epoch_seconds), epochs_left, epoch_seconds)


def _step_hook(cfg: Config, run: _Run, log: MetricsLogger | None, callback: StepCallback | None,
               eta: _Eta | None = None) -> Callable[[StepInfo], None]:
    def on_step(s: StepInfo) -> None:
        if eta is not None:
            eta.step(s.global_step)
        if log is not None and s.global_step % cfg.train.log_every_steps == 0:
            log.log({"kind": "train_step", "epoch": s.epoch, "step": s.global_step, "loss": s.loss, "ce": s.ce,
                     "contrastive": s.contrastive, "lr": s.lr, "images_per_s": s.images_per_s}, step=s.global_step)
        path = run.manager.maybe_save_mid_epoch(epoch=s.epoch, batch_in_epoch=s.batch_in_epoch,
                                                n_batches=run.n_batches, global_step=s.global_step)
        if callback is not None:
            callback({"epoch": s.epoch, "global_step": s.global_step, "batch_in_epoch": s.batch_in_epoch,
                      "loss": s.loss, "checkpoint": path})

    return on_step


def _epoch_line(cfg: Config, epoch: int, record: dict[str, Any], seconds: float) -> None:
    parts = [f"epoch {epoch + 1}/{cfg.optim.epochs}"]
    if "train_loss" in record:
        parts.append(f"train loss {record['train_loss']:.3f}, acc {100 * record['train_acc']:.1f}%")
    if "val_top1" in record:
        key = "val_ema_top1" if "val_ema_top1" in record else "val_top1"
        parts.append(f"val top-1 {100 * record[key]:.2f}% (best {100 * record['best_val_top1']:.2f}%)")
    parts.append(f"{record['images_per_s']:.0f} img/s, {seconds:.0f} s")
    logger.info(" | ".join(parts))


def _final_test(cfg: Config, run: _Run, final: dict[str, Any]) -> None:
    """Evaluate the selected weights (``best.pt``'s, else the last) on the test split, once."""
    if run.test_ds is None:
        return

    p = run.parts
    eval_model = copy.deepcopy(p.ema.module if p.ema is not None else p.raw_model)
    if run.manager.best_path.exists():
        best = load_checkpoint(run.manager.best_path)
        eval_model.load_state_dict(evaluation_weights(best))
        final["test_weights"] = f"best.pt (epoch {int(best['best_epoch']) + 1} of {cfg.optim.epochs})"
    else:
        final["test_weights"] = "last"
    logits, labels = predict_logits(eval_model, run.test_ds, batch_size=cfg.data.eval_batch_size, device=p.device,
                                    amp_dtype=p.amp_dtype, num_workers=cfg.data.num_workers,
                                    progress=cfg.train.progress)
    final["test"] = classification_metrics(logits, labels)
    if cfg.train.report:

        best_top1 = run.manager.best_metric
        report = write_run_report(cfg, cfg.run_dir, logits, labels, run.test_ds.base, weights=final["test_weights"],
                                  final={**final, "best_val_top1": best_top1})
        final["report"] = str(report)


def _summary(cfg: Config, run: _Run, final: dict[str, Any]) -> None:
    best, epoch = run.manager.best_metric, run.manager.best_epoch
    if best is not None:
        assert epoch is not None  # the manager records the best epoch with the best metric
        msg = f"done: best val top-1 {100 * best:.2f}% (epoch {epoch + 1})"
    else:
        msg = "done: no val split"
    if final["test"]:
        msg += f", test top-1 {100 * final['test']['top1']:.2f}%"
    where = f"report {final['report']}" if final.get("report") else f"run dir {cfg.run_dir}"
    logger.info("%s; %.0f s; %s", msg, final["train_seconds"], where)


__all__ = ["TrainResult", "TrainingPreempted", "peak_lr", "train"]
