"""The workflows: train and evaluate from a config, the few-shot study, sweeps, compare/analyze, the demo, and
taking a fine-tuned model out (export, embed, predict).

Each is a thin sequence of library calls on the shared set-up, split by job: :mod:`~schane.pipelines.splits`
(a run's dataset splits and preprocessing), :mod:`~schane.pipelines.runs` (run directories, configs of runs,
checkpoints loaded for evaluation), :mod:`~schane.pipelines.scoring` (few-shot scoring under protocol A or B)
and :mod:`~schane.pipelines.user_images` (images a user hands over). The command-line tool calls them and
nothing else. The library packages (``losses``, ``data``, ``models``,
``engine``, ``fewshot``, ``analysis``) never import this package.

Examples:
    >>> from schane.config import load_config
    >>> from schane.pipelines import train
    >>> result = train(load_config("configs/demo.yaml", ["name=mine"]))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TrainResult": "train",
    "train": "train",
    "evaluate_checkpoint": "evaluate",
    "run_fewshot": "fewshot",
    "format_table": "fewshot",
    "run_compare": "compare",
    "analyze_checkpoint": "compare",
    "method_config": "compare",
    "run_sweep": "sweep",
    "run_demo": "demo",
    "demo_config": "demo",
    "export_checkpoint": "export",
    "embed_images": "embed",
    "predict_images": "predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: each workflow pulls in what it needs only when used
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"schane.pipelines.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'schane.pipelines' has no attribute {name!r}")
