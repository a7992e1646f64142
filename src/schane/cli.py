"""Command-line interface: ``schane train | eval | fewshot | sweep | report | analyze | compare | demo |
inspect-weights | export | embed | predict | convert``.

The CLI only parses arguments and calls a workflow of :mod:`schane.pipelines`; results go to standard
output, progress and log lines to standard error. A user-caused error (a bad config value, a missing file,
unreadable data, weights that are not available offline, a full disk, ...) is one line
``schane COMMAND: error: ...`` and exit code 2; a programming error keeps its traceback. Run
``schane COMMAND --help`` for each command's options.

Each command imports its workflow when it runs (``# lazy: start-up time``): importing every workflow costs
about 4.7 s on a 2-core CPU, importing this module 0.05 s, so ``schane --help`` and argument errors answer at
once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("schane")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML config file")
    _add_set(p, "dotted overrides, e.g. --set optim.lr=1e-3 loss.name=ce")


def _add_set(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=help_text)


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by 'schane train'")
    p.add_argument("--data", default=None, metavar="ROOT", help="dataset root (default: the checkpoint's data.root)")
    p.add_argument("--allow-class-mismatch", action="store_true",
                   help="evaluate even when the data's classes are not the checkpoint's (a relabelled set on purpose)")


def _data_overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"data.root={args.data}"] if args.data is not None else [])]


def _config_from_args(args: argparse.Namespace, *, fewshot: bool = False) -> Any:
    """The run's config: ``--data`` (settings chosen for the data, the plan logged) or ``--config``, with ``--set``."""
    from schane.pipelines.runs import load_run_config  # lazy: start-up time

    if args.data is not None:
        from schane.pipelines.own_data import config_for_data  # lazy: start-up time

        cfg, plan = config_for_data(args.data, args.config, args.overrides, fewshot=fewshot)
        logger.info("%s", plan.line())
        return cfg
    if args.config is None:
        raise ValueError("give the data with --data DIR (a folder of class folders or a CSV), or a config with "
                         "--config FILE")
    return load_run_config(args.config, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from schane.pipelines.train import TrainingPreempted, train  # lazy: start-up time

    cfg = _config_from_args(args)
    try:
        result = train(cfg, resume=args.resume)
    except TrainingPreempted as e:
        if _rank() == 0:
            print(f"schane train: {e}", file=sys.stderr)
        return e.exit_code
    if _rank() > 0:  # under torchrun rank 0 reports the run
        return 0
    if result.metrics.get("test"):
        t = result.metrics["test"]
        print(f"test top-1 {100 * t['top1']:.2f}%  top-5 {100 * t['top5']:.2f}%  ({result.run_dir / 'final.json'})")
    if result.report is not None:
        print(f"report: {result.report}")
    elif not result.metrics.get("test"):
        print(f"run directory: {result.run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from schane.pipelines.evaluate import evaluate_checkpoint, format_evaluation  # lazy: start-up time

    result = evaluate_checkpoint(args.checkpoint, split=args.split, overrides=_data_overrides(args),
                                 allow_class_mismatch=args.allow_class_mismatch)
    print(format_evaluation(result))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _cmd_fewshot(args: argparse.Namespace) -> int:
    from schane.pipelines.fewshot import format_table, run_fewshot  # lazy: start-up time

    cfg = _config_from_args(args, fewshot=True)
    results = run_fewshot(cfg)
    print(format_table(results))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from schane.config import load_config  # lazy: start-up time
    from schane.pipelines.sweep import (  # lazy: start-up time
        ExecutorOptions,
        parse_grid,
        parse_list,
        parse_seeds,
        run_sweep,
    )
    from schane.pipelines.sweep_report import format_summary  # lazy: start-up time

    grid = [parse_grid(g) for g in args.grid]  # before the config: a malformed --grid is the first error
    methods = parse_list(args.methods, "methods") if args.methods is not None else None
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    opts = ExecutorOptions(executor=args.executor, jobs=args.jobs, partition=args.partition,
                           gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time_min=args.time,
                           signal=args.signal)
    cfg = load_config(args.config, args.overrides)
    command = shlex.join(["schane", *args.argv])
    results = run_sweep(cfg, grid, methods, seeds, args.out, options=opts, command=command,
                        evaluation="validation" if args.validation_only else "auto")
    print(format_summary(results))
    return 1 if results["failed"] else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from schane.pipelines.run_report import report_for_run  # lazy: start-up time

    print(f"report: {report_for_run(args.run_dir, args.overrides)}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from schane.pipelines.compare import analyze_checkpoint, format_analysis  # lazy: start-up time

    result = analyze_checkpoint(args.checkpoint, split=args.split, out_dir=args.out, overrides=_data_overrides(args),
                                allow_class_mismatch=args.allow_class_mismatch)
    print(format_analysis(result))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from schane.pipelines.compare import run_compare  # lazy: start-up time
    from schane.pipelines.runs import load_run_config  # lazy: start-up time

    md = run_compare(load_run_config(args.config, args.overrides))
    print(md.read_text())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from schane.pipelines.demo import run_demo  # lazy: start-up time
    from schane.pipelines.fewshot import format_table  # lazy: start-up time
    from schane.pipelines.sweep import RunsFailed  # lazy: start-up time

    out = args.out or ("runs/ablation" if args.ablation else "runs/demo")
    try:
        report = run_demo(out_dir=out, seeds=args.seeds, overrides=args.overrides, ablation=args.ablation,
                          jobs=args.jobs)
    except RunsFailed as e:
        print(f"schane demo: {e}", file=sys.stderr)
        return 1
    print(format_table(json.loads((report.parent / "fewshot.json").read_text())))
    print(f"\nreport: {report}")
    return 0


def _cmd_inspect_weights(args: argparse.Namespace) -> int:
    from schane.config import load_config  # lazy: start-up time
    from schane.models.inspection import inspect_weights  # lazy: start-up time

    model = load_config(None, [f"model.backbone={args.backbone}", *args.overrides]).model
    report = inspect_weights(args.path, model.backbone, **model.backbone_kwargs)
    print(report.format())
    report.check()  # a file that does not fit: ValueError -> one line on stderr, exit 2
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from schane.pipelines.export import export_checkpoint  # lazy: start-up time

    r = export_checkpoint(args.checkpoint, args.out, heads=args.heads, force=args.force)
    names = "not stored in the checkpoint (schane < 0.2)" if r.class_names is None else f"{len(r.class_names)}"
    print(f"exported {r.kind} weights ({r.weights}) to {r.out_dir}: {', '.join(f.name for f in r.files)}")
    print(f"class names: {names}; classifier: {r.classifier_key or 'not in model.safetensors'}; "
          f"reloaded outside schane, largest output difference {r.max_abs_diff:.2e}")
    print(f"\n{r.snippet}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from schane.pipelines.embed import embed_images  # lazy: start-up time

    r = embed_images(args.checkpoint, args.data, out=args.out, split=args.split, projections=args.projections,
                     overrides=args.overrides)
    print(f"{r.n} images, {r.kind} of {r.dim} dimensions: {', '.join(str(f) for f in r.files)}")
    if r.skipped_file is not None:
        print(f"{len(r.skipped)} unreadable image(s) skipped: {r.skipped_file}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from schane.pipelines.predict import predict_images  # lazy: start-up time

    r = predict_images(args.checkpoint, args.images, args.out, topk=args.topk, overrides=args.overrides)
    print(f"{r.n} images, top {r.topk} classes: {r.out}")
    if r.skipped_file is not None:
        print(f"{len(r.skipped)} unreadable image(s) skipped: {r.skipped_file}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from schane.pipelines.convert import convert  # lazy: start-up time

    r = convert(args.data, args.to, args.out, shard_size=args.shard_size, overrides=args.overrides)
    counts = ", ".join(f"{k} {v}" for k, v in r.counts.items())
    print(f"{counts} images of {len(r.classes)} classes in {len(r.files)} file(s): {r.out}")
    if r.class_splits is not None:
        print(f"few-shot class lists: {r.class_splits} (data.options.class_splits={r.class_splits})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``schane`` argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="schane",
        description="Fine-tune pretrained image models with SCHaNe (supervised contrastive + hard negatives + CE).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model on your images (--data DIR) or from a config")
    _add_config_args(p, required=False)
    p.add_argument("--data", default=None, metavar="PATH",
                   help="your images: a folder of class folders (or train/ with val/ and test/), or a CSV of "
                        "path,label; settings that fit the data are chosen and printed before training")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' for the run's last.pt")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (top-1/top-5)")
    _add_checkpoint_args(p)
    p.add_argument("--split", default="test", help="split to evaluate: train, val or test")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    _add_set(p, "overrides of the checkpoint's config, e.g. data.eval_batch_size=64")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("fewshot", help="few-shot protocol: fine-tune on base classes, evaluate N-way K-shot episodes")
    _add_config_args(p, required=False)
    p.add_argument("--data", default=None, metavar="PATH",
                   help="your images (a folder of class folders or a CSV): the classes are split into base, "
                        "validation and novel classes, with settings chosen for the data and printed first")
    p.set_defaults(func=_cmd_fewshot)

    _add_sweep_command(sub)

    p = sub.add_parser("report", help="(re)write a run's report.md: test top-1 with its interval, curves, "
                                      "confusion matrix, per-class accuracy, misclassified images")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of 'schane train' (runs/NAME)")
    _add_set(p, "overrides of the run's config, e.g. data.root=/new/path")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("analyze", help="embedding metrics and t-SNE for one checkpoint")
    _add_checkpoint_args(p)
    p.add_argument("--split", default="test", help="split whose features are analysed (test = test_classes on few-shot sets)")
    p.add_argument("--out", default=None, help="output directory (default: next to the checkpoint)")
    _add_set(p, "overrides of the checkpoint's config, e.g. data.root=/path")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("compare", help="train CE, SCHaNe and ablations; write a comparison report")
    _add_config_args(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="the offline demo: CE vs SCHaNe few-shot on glyphs with EfficientNet-Lite0")
    p.add_argument("--out", default=None, help="report directory (default: runs/demo, or runs/ablation)")
    p.add_argument("--ablation", action="store_true",
                   help="CE, SupCon, SCHaNe with beta=0 and SCHaNe (each + CE) on the demo's data, budget and seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the demo's)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once, each in its own process with 1/N of the threads (default: 1, one "
                        "after another with all threads)")
    _add_set(p, "overrides of the demo config")
    p.set_defaults(func=_cmd_demo)

    _add_model_io_commands(sub)
    return parser


def _add_sweep_command(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="a grid of settings x methods x seeds, each run one job (local processes or a Slurm array); "
                      "paired comparisons per grid value, sweep.json, report.md and plots",
        description="Cross the --grid values; in each cell fine-tune every method once per seed (the runs 'schane "
                    "fewshot' would train), then evaluate: few-shot sets with schane fewshot's protocol on "
                    "identical episodes, classification sets with test top-1. Finished runs are reused and "
                    "unfinished ones resumed when the sweep is submitted again. Exit code 1 when a run failed "
                    "(listed with its log). See docs/sweeps.md.")
    p.add_argument("--config", "-c", required=True, help="YAML config file (the base of every cell)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values (YAML scalars), e.g. data.batch_size=16,32,64; keys that change "
                        "together: 'data.batch_size,optim.lr=16,7.5e-4;32,1.5e-3' (groups split by ';'). Repeat "
                        "--grid for a cross product")
    p.add_argument("--methods", default=None, metavar="M1,M2,...",
                   help="methods compared in every cell, e.g. ce,supcon,schane or schane_beta0, LOSS@key=value "
                        "(default: the config's fewshot.losses)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...", help="training seeds, e.g. 0,1,2 "
                   "(default: the config's fewshot.seeds)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="sweep directory: OUT/<cell>/<method>-seed<seed>, OUT/logs/, sweep.json, report.md, "
                        "sweep_<key>.png (default: the config's output_dir/name)")
    _add_set(p, "overrides of the config for every cell, e.g. --set optim.epochs=3")
    p.add_argument("--validation-only", action="store_true",
                   help="score each run on validation-class episodes only (to choose settings; the novel classes "
                        "are never loaded)")
    p.add_argument("--executor", default="local", choices=["local", "submitit-local", "slurm"],
                   help="local: parallel processes here (default); slurm: one submitit array job; submitit-local: "
                        "submitit's local executor (the Slurm code path without Slurm)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="runs at once (local: default the threads torch would use, or the number of GPUs; each run "
                        "gets 1/N of the threads; slurm: the array's parallelism, default all)")
    slurm = p.add_argument_group("Slurm (--executor slurm)")
    slurm.add_argument("--partition", default=None, help="Slurm partition")
    slurm.add_argument("--gpus-per-node", type=int, default=None, metavar="G", help="GPUs per job")
    slurm.add_argument("--cpus-per-task", type=int, default=None, metavar="C",
                       help="CPUs per job (also its threads)")
    slurm.add_argument("--time", type=int, default=240, metavar="MIN",
                       help="time limit per job in minutes (default 240); a job that reaches it stops at a step "
                            "boundary and is requeued, resuming its run")
    slurm.add_argument("--signal", default="SIGUSR1",
                       help="signal Slurm sends 120 s before the time limit (default SIGUSR1; one of "
                            "train.stop_signals)")
    p.set_defaults(func=_cmd_sweep)


def _add_model_io_commands(sub: Any) -> None:
    """The commands around weights and models: inspect-weights, export, embed, predict, convert."""
    p = sub.add_parser("inspect-weights", help="show what a weights file holds and what a backbone would load from it")
    p.add_argument("path", help="weights file (PyTorch checkpoint or safetensors, any name)")
    p.add_argument("--backbone", required=True, help="model.backbone name, e.g. beit3_base_patch16_224")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="model overrides, e.g. model.backbone_kwargs.img_size=384")
    p.set_defaults(func=_cmd_inspect_weights)

    p = sub.add_parser("export", help="write a checkpoint's weights as safetensors for timm (or torchscale) with "
                                      "class names, preprocessing and config")
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by 'schane train'")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (model.safetensors, config.json, ...)")
    p.add_argument("--heads", action="store_true",
                   help="also export the classifier (on the timm model's own head) and the projection head")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder that is not a previous export (overwrites its model.safetensors, "
                        "heads.safetensors, config.json and README.md; other files stay)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("embed", help="pooled features (or projections) of a folder of images or a dataset split")
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by 'schane train'")
    p.add_argument("--data", default=None, metavar="ROOT_OR_FOLDER",
                   help="a folder of images (walked recursively); with --split, the dataset root (default: the "
                        "checkpoint's data.root)")
    p.add_argument("--split", default=None, help="embed this split of the checkpoint's dataset (labels included)")
    p.add_argument("--projections", action="store_true",
                   help="write the unit-norm contrastive projections instead of the pooled features")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="FILE.npy (with FILE.csv of path,label,class beside it) or FILE.parquet (needs pyarrow)")
    _add_set(p, "overrides of the checkpoint's config, e.g. data.eval_batch_size=64 train.device=cpu")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("predict", help="top-k classes with probabilities for a folder of images")
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by 'schane train'")
    p.add_argument("--images", "--data", dest="images", required=True, metavar="FOLDER",
                   help="a folder of images (walked recursively)")
    p.add_argument("--out", default="predictions.csv", metavar="FILE", help="CSV to write (default: predictions.csv)")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes per image (default: 5)")
    _add_set(p, "overrides of the checkpoint's config, e.g. data.eval_batch_size=64 train.device=cpu")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("convert", help="write a dataset as WebDataset shards or Hugging Face parquet")
    p.add_argument("--data", required=True, metavar="SRC",
                   help="NAME:ROOT of any registered dataset (e.g. csv:data/, cifar_fs:~/data) or a folder of class folders")
    p.add_argument("--to", required=True, choices=["wds", "hf"],
                   help="wds: OUT/{split}-NNNNNN.tar + classes.txt; hf: OUT/data/{split}-NNNNN-of-NNNNN.parquet")
    p.add_argument("out", metavar="OUT", help="output folder (new or empty)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default: 1000)")
    _add_set(p, "overrides of the source's data config, e.g. data.options.test_fraction=0.3")
    p.set_defaults(func=_cmd_convert)


def error_message(e: BaseException) -> str:
    """The one line a user-caused error is reported as.

    An exception raised inside a DataLoader worker arrives re-raised with the worker's whole traceback as
    its message; only the original message is kept.
    """
    text = str(e)
    if "DataLoader worker process" in text and "Original Traceback" in text:
        lines = text.rstrip().splitlines()
        head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type(e).__name__)}: ")
        for i in range(len(lines) - 1, -1, -1):
            m = head.match(lines[i])
            if m:
                text = "\n".join([lines[i][m.end():], *lines[i + 1:]])
                break
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.strerror:
        text = e.strerror + (f": {e.filename}" if e.filename else "")
    return text


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from schane.models.weights import PretrainedWeightsUnavailable  # lazy: start-up time

    return (ValueError, FileNotFoundError, ImportError, FloatingPointError, OSError, PretrainedWeightsUnavailable)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``schane`` console script."""
    from schane.progress import setup_logging  # lazy: start-up time

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        where = f" (rank {_rank()})" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        print(f"schane {args.command}: error{where}: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
