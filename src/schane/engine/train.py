"""The fine-tuning loop: two views per image, ``lam * contrastive + (1 - lam) * CE``, single process or DDP.

One optimizer step sees ``data.batch_size`` images per process and micro-step (two augmented
views each, so the model runs on ``2 * batch_size`` inputs), ``optim.accum_steps`` micro-steps
and ``WORLD_SIZE`` processes. The peak learning rate follows the linear scaling rule
``optim.lr * effective_batch / optim.base_batch_size``.

Each sample's augmentation is seeded by ``(train.seed, epoch, index)`` and the batch order by
``(train.seed, epoch)``, so a run resumed from a mid-epoch checkpoint replays exactly the
batches it had not consumed and ends with the same weights as an uninterrupted run.

Examples:
    >>> from schane.config import load_config
    >>> cfg = load_config("configs/demo.yaml", ["loss.name=schane"])  # doctest: +SKIP
    >>> result = train(cfg)  # doctest: +SKIP
    >>> result.metrics["best_val_top1"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from schane.config import Config, from_dict, save_config, to_dict, validate
from schane.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from schane.engine.ema import ModelEMA
from schane.engine.evaluate import evaluate
from schane.engine.utils import (
    DistInfo,
    IndexedDataset,
    MetricsLogger,
    SeededTransformDataset,
    Throughput,
    autocast,
    barrier,
    epoch_batches,
    init_distributed,
    resolve_amp,
    resolve_device,
    seed_everything,
    worker_init_fn,
)


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        run_dir: the run directory (``config.yaml``, ``metrics.jsonl``, checkpoints, ``final.json``).
        best_checkpoint: ``best.pt`` (best validation top-1), or ``None`` without a validation split.
        last_checkpoint: ``last.pt`` (end of training; what ``--resume`` continues from).
        metrics: the contents of ``final.json``.
    """

    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    metrics: dict[str, Any]


StepCallback = Callable[[dict[str, Any]], None]


def peak_lr(cfg: Config, world_size: int) -> float:
    """``optim.lr`` scaled by ``effective_batch / optim.base_batch_size`` (unscaled when that is null)."""
    eff = cfg.data.batch_size * cfg.optim.accum_steps * world_size
    if cfg.optim.base_batch_size is None:
        return cfg.optim.lr
    return cfg.optim.lr * eff / cfg.optim.base_batch_size


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


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        key = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def _gather_nograd(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _item(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _build_loss(cfg: Config, info: DistInfo) -> tuple[nn.Module, nn.Module | None]:
    from schane.losses import JointLoss, build_contrastive_loss

    if cfg.loss.name == "ce":
        return JointLoss(None), None
    contrastive = build_contrastive_loss(
        cfg.loss.name,
        temperature=cfg.loss.temperature,
        beta=cfg.loss.beta,
        positive_mode=cfg.loss.positive_mode,
        tau_plus=cfg.loss.tau_plus,
        gather_distributed=bool(cfg.loss.gather_distributed and info.distributed),
        chunk_size=cfg.loss.chunk_size,
    )
    return JointLoss(contrastive, lam=cfg.loss.lam), contrastive


def _load_split(cfg: Config, split: str) -> Any:
    from schane.data import get_dataset

    return get_dataset(
        cfg.data.name,
        cfg.data.root,
        split,
        None,
        seed=cfg.train.seed,
        val_fraction=cfg.data.val_fraction,
        download=cfg.data.download,
        **cfg.data.options,
    )


def train(cfg: Config, resume: str | None = None, *, callback: StepCallback | None = None) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.loss``; evaluate, checkpoint, log.

    Launch under ``torchrun`` for DDP: the process group is initialised from the environment
    (gloo on CPU, NCCL on CUDA), each rank trains on its shard of a ``DistributedSampler``
    (``drop_last``) and only rank 0 logs and writes files.

    Args:
        cfg: the run configuration (validated again here).
        resume: a checkpoint to continue from, ``"auto"`` for ``run_dir/last.pt`` (a fresh start
            when it does not exist yet), or ``None`` for a fresh run.
        callback: called on every rank after each optimizer step with a dict holding ``epoch``,
            ``global_step``, ``batch_in_epoch``, ``loss`` and ``checkpoint`` (path written at this
            step or ``None``).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: on an invalid config, a run directory that already holds a run (without
            ``resume``), a corrupt checkpoint or a too-small dataset.
        FileNotFoundError: when the data or the resume checkpoint is missing.
    """
    validate(cfg)
    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, callback, info)
    finally:
        if info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, resume: str | None, callback: StepCallback | None, info: DistInfo) -> TrainResult:
    from schane.data.transforms import TwoViews, eval_transform, train_transform
    from schane.engine.optim import build_optimizer, build_scheduler
    from schane.models import build_model

    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    run_dir = cfg.run_dir
    resume_path = _resolve_resume(resume, run_dir)
    if resume_path is None and (run_dir / "last.pt").exists():
        raise ValueError(
            f"run directory {run_dir} already holds a run (last.pt); continue it with --resume auto, "
            "or pick another name (--set name=NEW) or output_dir"
        )
    if resume == "auto" and resume_path is None and info.is_main:
        print(f"--resume auto: no {run_dir / 'last.pt'} yet, starting a fresh run")
    state = load_checkpoint(resume_path) if resume_path is not None else None
    show = cfg.train.progress and info.is_main

    # ---------------------------------------------------------------- data and model
    seed_everything(cfg.train.seed)
    if info.is_main:
        train_base = _load_split(cfg, "train")
    barrier(info)  # rank 0 downloads/caches first
    if not info.is_main:
        train_base = _load_split(cfg, "train")
    num_classes = len(train_base.classes)
    if num_classes < 2:
        raise ValueError(f"dataset {cfg.data.name!r} has {num_classes} class(es) in its train split; need >= 2")
    model = build_model(cfg.model, num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dc = model.data_config
    mean, std = tuple(dc["mean"]), tuple(dc["std"])
    crop_pct = float(dc.get("crop_pct", 0.875) or 0.875)
    train_ds = SeededTransformDataset(
        train_base, TwoViews(train_transform(cfg.data.img_size, mean, std, cfg.aug)), cfg.train.seed
    )
    from schane.data import dataset_info

    splits = dataset_info(cfg.data.name).splits
    eval_tf = eval_transform(cfg.data.img_size, mean, std, crop_pct=crop_pct)
    val_ds = None
    if cfg.data.val_fraction > 0 and "val" in splits:
        val_base = _load_split(cfg, "val")
        val_ds = IndexedDataset(val_base, eval_tf) if len(val_base) > 0 else None

    n_batches_full = len(train_base) // (cfg.data.batch_size * info.world_size)
    if n_batches_full < 1:
        epoch_batches(len(train_base), cfg.data.batch_size, epoch=0, seed=cfg.train.seed, world_size=info.world_size)
    accum = cfg.optim.accum_steps
    nb = n_batches_full
    if cfg.train.max_steps_per_epoch is not None:
        nb = min(nb, cfg.train.max_steps_per_epoch * accum)
    steps_per_epoch = math.ceil(nb / accum)

    lr = peak_lr(cfg, info.world_size)
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    joint, contrastive = _build_loss(cfg, info)
    queue = None
    if contrastive is not None and cfg.loss.queue_size > 0 and cfg.loss.lam > 0:
        from schane.memory import EmbeddingQueue

        queue = EmbeddingQueue(cfg.loss.queue_size, cfg.model.proj_dim)
    supervised = bool(getattr(contrastive, "supervised", True))

    raw_model = model
    if info.distributed:
        unused = contrastive is None or cfg.loss.lam in (0.0, 1.0)
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )

    # ---------------------------------------------------------------- resume
    start_epoch, start_batch, global_step = 0, 0, 0
    best_metric: float | None = None
    best_epoch: int | None = None
    if state is not None:
        diff = _config_diff(state["config"], to_dict(cfg))
        if diff and info.is_main:
            print(f"warning: resuming {resume_path} with a changed config: " + "; ".join(diff), file=sys.stderr)
        if int(state["num_classes"]) != num_classes:
            raise ValueError(
                f"checkpoint {resume_path} has {state['num_classes']} classes, the dataset {num_classes}; "
                "resume with the data config the run was started with"
            )
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if queue is not None and state.get("queue") is not None:
            queue.load_state_dict(state["queue"])
        start_epoch, start_batch = int(state["epoch"]), int(state["batch_in_epoch"])
        global_step = int(state["global_step"])
        best_metric, best_epoch = state.get("best_metric"), state.get("best_epoch")
        rngs = state["rng"]
        restore_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        if info.is_main:
            print(f"resumed from {resume_path}: epoch {start_epoch}, batch {start_batch}, step {global_step}")
    elif info.distributed:
        torch.manual_seed(cfg.train.seed + info.rank)  # distinct dropout/drop-path per rank

    logger = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        logger = MetricsLogger(run_dir, cfg.train.tensorboard)
        if state is None:
            logger.log(
                {
                    "kind": "start",
                    "world_size": info.world_size,
                    "device": str(device),
                    "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                    "peak_lr": lr,
                    "effective_batch": cfg.data.batch_size * accum * info.world_size,
                    "steps_per_epoch": steps_per_epoch,
                    "num_classes": num_classes,
                    "train_images": len(train_base),
                    "val_images": len(val_ds) if val_ds is not None else 0,
                }
            )

    def make_state(epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        rng = capture_rng_state()
        rngs = [rng]
        if info.distributed:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng)
        return {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "ema": ema.state_dict() if ema is not None else None,
            "queue": queue.state_dict() if queue is not None else None,
            "rng": rngs,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_step": global_step,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "config": to_dict(cfg),
            "num_classes": num_classes,
            "eval_weights": "ema" if ema is not None else "model",
        }

    # ---------------------------------------------------------------- loop
    tp = Throughput()
    t_loop = time.perf_counter()
    epochs = cfg.optim.epochs
    last_val: dict[str, Any] | None = None
    ep_bar = tqdm(range(start_epoch, epochs), desc="epochs", disable=not show, position=0, dynamic_ncols=True)
    for epoch in ep_bar:
        model.train()
        train_ds.epoch = epoch
        batches = epoch_batches(
            len(train_base), cfg.data.batch_size, epoch=epoch, seed=cfg.train.seed,
            rank=info.rank, world_size=info.world_size,
        )[:nb]
        first = start_batch if epoch == start_epoch else 0
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000003 + epoch)
        loader = DataLoader(
            train_ds,
            batch_sampler=batches[first:],
            num_workers=cfg.data.num_workers,
            worker_init_fn=worker_init_fn,
            generator=gen,
            pin_memory=device.type == "cuda",
        )
        sums = {"loss": 0.0, "ce": 0.0, "contrastive": 0.0, "correct": 0, "seen": 0, "n": 0}
        bar = tqdm(
            total=nb, initial=first, desc=f"epoch {epoch + 1}/{epochs}", disable=not show,
            leave=False, position=1, dynamic_ncols=True,
        )
        tp.start()
        for b, (views, labels, ids) in enumerate(loader, start=first):
            group_start = (b // accum) * accum
            group_size = min(accum, nb - group_start)
            is_step = b + 1 == group_start + group_size
            x = torch.cat(list(views)).to(device, non_blocking=True)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels.to(device).repeat(2)
            cl = y if supervised else ids.to(device).repeat(2)
            ref_e = ref_l = None
            if queue is not None and len(queue) > 0:
                ref_e, ref_l = queue.get()
                ref_e, ref_l = ref_e.to(device), ref_l.to(device)
            sync = is_step or not info.distributed
            ctx = model.no_sync() if not sync else _null()
            with ctx:
                with autocast(device, amp_dtype):
                    out = model(x)
                proj = out.projections.float() if contrastive is not None else None
                res = joint(out.logits.float(), y, proj, cl if proj is not None else None, ref_e, ref_l)
                scaler.scale(res.total / group_size).backward()
            if queue is not None:
                queue.enqueue(_gather_nograd(proj.detach(), info), _gather_nograd(cl, info))
            sums["loss"] += float(res.total.detach())
            sums["ce"] += _item(res.ce) or 0.0
            sums["contrastive"] += _item(res.contrastive) or 0.0
            sums["correct"] += int((out.logits.detach().argmax(1) == y).sum())
            sums["seen"] += y.numel()
            sums["n"] += 1
            ckpt_path = None
            if is_step:
                if cfg.optim.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(raw_model)
                global_step += 1
                tp.stop(group_size * cfg.data.batch_size * info.world_size)
                loss_now = float(res.total.detach())
                if not math.isfinite(loss_now):
                    raise FloatingPointError(
                        f"loss is {loss_now} at epoch {epoch} step {global_step}; lower optim.lr or use train.amp=none"
                    )
                if info.is_main and global_step % cfg.train.log_every_steps == 0:
                    logger.log(
                        {
                            "kind": "train_step",
                            "epoch": epoch,
                            "step": global_step,
                            "loss": loss_now,
                            "ce": _item(res.ce),
                            "contrastive": _item(res.contrastive),
                            "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0),
                            "images_per_s": tp.value,
                        },
                        step=global_step,
                    )
                k = cfg.train.ckpt_every_steps
                if k is not None and global_step % k == 0 and b + 1 < nb:
                    st = make_state(epoch, b + 1)
                    if info.is_main:
                        ckpt_path = save_checkpoint(run_dir / "last.pt", st)
                    barrier(info)
                if callback is not None:
                    callback(
                        {
                            "epoch": epoch,
                            "global_step": global_step,
                            "batch_in_epoch": b + 1,
                            "loss": loss_now,
                            "checkpoint": ckpt_path,
                        }
                    )
                tp.start()
            bar.update(1)
            bar.set_postfix(
                loss=f"{sums['loss'] / sums['n']:.3f}",
                acc=f"{sums['correct'] / max(sums['seen'], 1):.3f}",
                img_s=f"{tp.value:.1f}",
            )
        bar.close()
        tp.stop(0)
        start_batch = 0

        # ------------------------------------------------------------ end of epoch
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": global_step}
        if sums["n"]:
            record.update(
                train_loss=sums["loss"] / sums["n"],
                train_ce=sums["ce"] / sums["n"],
                train_contrastive=sums["contrastive"] / sums["n"],
                train_acc=sums["correct"] / max(sums["seen"], 1),
            )
        record["images_per_s"] = tp.value
        improved = False
        do_eval = val_ds is not None and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs)
        if do_eval and info.is_main:
            kw = {"batch_size": cfg.data.eval_batch_size, "device": device, "amp_dtype": amp_dtype,
                  "num_workers": cfg.data.num_workers, "progress": show}
            val = evaluate(raw_model, val_ds, **kw)
            record.update({f"val_{k}": v for k, v in val.items()})
            select = val["top1"]
            if ema is not None:
                val_ema = evaluate(ema.module, val_ds, **kw)
                record.update({f"val_ema_{k}": v for k, v in val_ema.items()})
                select = val_ema["top1"]
            last_val = {"top1": select, **({"ema": True} if ema is not None else {})}
            if best_metric is None or select > best_metric:
                best_metric, best_epoch, improved = select, epoch, True
            record["best_val_top1"] = best_metric
        if info.distributed:
            best_metric, best_epoch, improved = _broadcast((best_metric, best_epoch, improved), info)
        st = make_state(epoch + 1, 0)
        if info.is_main:
            save_checkpoint(run_dir / "last.pt", st)
            if improved:
                save_checkpoint(run_dir / "best.pt", st)
            logger.log(record, step=global_step)
            ep_bar.set_postfix(
                loss=f"{record.get('train_loss', float('nan')):.3f}",
                val_top1=f"{record.get('val_top1', float('nan')):.3f}",
                img_s=f"{tp.value:.1f}",
            )
        barrier(info)
        model.train()
    ep_bar.close()

    # ---------------------------------------------------------------- final evaluation
    best_path = run_dir / "best.pt"
    final: dict[str, Any] = {
        "loss": cfg.loss.name,
        "epochs": epochs,
        "global_step": global_step,
        "best_epoch": best_epoch,
        "best_val_top1": best_metric,
        "last_val": last_val,
        "train_images_per_s": tp.value,
        # wall time of this process's training loop (evaluation included; after a resume, the resumed part)
        "train_seconds": time.perf_counter() - t_loop,
        "test": None,
    }
    if info.is_main:
        if cfg.train.test_at_end and "test" in splits:
            test_base = _load_split(cfg, "test")
            eval_model = copy.deepcopy(ema.module if ema is not None else raw_model)
            if best_path.exists():
                bst = load_checkpoint(best_path)
                w = bst["ema"]["module"] if bst.get("eval_weights") == "ema" and bst.get("ema") else bst["model"]
                eval_model.load_state_dict(w)
                final["test_weights"] = f"best.pt (epoch {bst['best_epoch']})"
            else:
                final["test_weights"] = "last"
            final["test"] = evaluate(
                eval_model, IndexedDataset(test_base, eval_tf), batch_size=cfg.data.eval_batch_size,
                device=device, amp_dtype=amp_dtype, num_workers=cfg.data.num_workers, progress=show,
            )
        (run_dir / "final.json").write_text(json.dumps(final, indent=2))
        logger.log({"kind": "final", **{k: v for k, v in final.items() if not isinstance(v, dict)},
                    **({f"test_{k}": v for k, v in final["test"].items()} if final["test"] else {})})
        logger.close()
        if cfg.train.progress:
            msg = "done: " + (
                f"best val top-1 {best_metric:.4f} (epoch {best_epoch + 1})" if best_metric is not None else "no val split"
            )
            if final["test"]:
                msg += f", test top-1 {final['test']['top1']:.4f}"
            print(msg + f"; run dir {run_dir}")
    barrier(info)
    return TrainResult(
        run_dir=run_dir,
        best_checkpoint=best_path if best_path.exists() else None,
        last_checkpoint=run_dir / "last.pt",
        metrics=final,
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _broadcast(obj: Any, info: DistInfo) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    """The resolved :class:`Config` stored in a checkpoint mapping."""
    return from_dict(state["config"])


__all__ = ["TrainResult", "train", "peak_lr", "config_from_checkpoint"]
