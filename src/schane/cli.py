"""Command-line interface: ``schane train | eval | fewshot | analyze | compare | demo | inspect-weights``.

The CLI only parses arguments and calls the library; every command's work lives in the
library module it names. Run ``schane COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. --set optim.lr=1e-3 loss.name=ce",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from schane.config import load_config
    from schane.engine.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result.metrics.get("test"):
        t = result.metrics["test"]
        print(f"test top-1 {100 * t['top1']:.2f}%  top-5 {100 * t['top5']:.2f}%  ({result.run_dir / 'final.json'})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from schane.engine.evaluate import evaluate_checkpoint

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.root={args.data}")
    result = evaluate_checkpoint(args.checkpoint, split=args.split, overrides=overrides)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _cmd_fewshot(args: argparse.Namespace) -> int:
    from schane.config import load_config
    from schane.fewshot.runner import run_fewshot

    cfg = load_config(args.config, args.overrides)
    run_fewshot(cfg)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from schane.analysis.report import analyze_checkpoint

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.root={args.data}")
    analyze_checkpoint(args.checkpoint, split=args.split, out_dir=args.out, overrides=overrides)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from schane.analysis.report import run_compare
    from schane.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_compare(cfg)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from schane.demo import run_demo

    run_demo(out_dir=args.out, seeds=args.seeds, overrides=args.overrides)
    return 0


def _cmd_inspect_weights(args: argparse.Namespace) -> int:
    from schane.config import load_config
    from schane.models.inspection import inspect_weights

    model = load_config(None, [f"model.backbone={args.backbone}", *args.overrides]).model
    report = inspect_weights(args.path, model.backbone, **model.backbone_kwargs)
    print(report.format())
    report.check()  # a file that does not fit: ValueError -> one line on stderr, exit 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``schane`` argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="schane",
        description="Fine-tune pretrained image models with SCHaNe (supervised contrastive + hard negatives + CE).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model from a config")
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' for the run's last.pt")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (top-1/top-5)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by 'schane train'")
    p.add_argument("--split", default="test", help="split to evaluate: train, val or test")
    p.add_argument("--data", default=None, metavar="ROOT", help="dataset root (default: the checkpoint's data.root)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides of the checkpoint's config, e.g. data.eval_batch_size=64")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("fewshot", help="few-shot protocol: fine-tune on base classes, evaluate N-way K-shot episodes")
    _add_config_args(p)
    p.set_defaults(func=_cmd_fewshot)

    p = sub.add_parser("analyze", help="embedding metrics and t-SNE for one checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by 'schane train'")
    p.add_argument("--split", default="test", help="split whose features are analysed (test = test_classes on few-shot sets)")
    p.add_argument("--data", default=None, metavar="ROOT", help="dataset root (default: the checkpoint's data.root)")
    p.add_argument("--out", default=None, help="output directory (default: next to the checkpoint)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides of the checkpoint's config, e.g. data.root=/path")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("compare", help="train CE, SCHaNe and ablations; write a comparison report")
    _add_config_args(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("demo", help="the offline demo: CE vs SCHaNe few-shot on glyphs with EfficientNet-Lite0")
    p.add_argument("--out", default="runs/demo", help="report directory")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the demo's)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides of the demo config")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("inspect-weights", help="show what a weights file holds and what a backbone would load from it")
    p.add_argument("path", help="weights file (PyTorch checkpoint or safetensors, any name)")
    p.add_argument("--backbone", required=True, help="model.backbone name, e.g. beit3_base_patch16_224")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="model overrides, e.g. model.backbone_kwargs.img_size=384")
    p.set_defaults(func=_cmd_inspect_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``schane`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"schane {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
