"""Few-shot evaluation: episodes, frozen-feature and fine-tuning evaluators, confidence intervals.

See docs/fewshot.md for the protocol. ``run_fewshot`` (``schane fewshot``) is in
:mod:`schane.fewshot.runner`; import it from there or from this package.
"""

from .episodes import Episode, load_episodes, read_episodes_meta, sample_episodes, save_episodes
from .evaluators import (
    FeatureBank,
    ProtoHead,
    build_feature_bank,
    evaluate_protocol_a,
    evaluate_protocol_b,
    finetune_episode,
    logreg_predict,
)
from .stats import Interval, mean_ci, paired_difference, seed_summary

__all__ = [
    "Episode",
    "FeatureBank",
    "Interval",
    "ProtoHead",
    "build_feature_bank",
    "evaluate_protocol_a",
    "evaluate_protocol_b",
    "finetune_episode",
    "load_episodes",
    "logreg_predict",
    "mean_ci",
    "paired_difference",
    "read_episodes_meta",
    "run_fewshot",
    "sample_episodes",
    "save_episodes",
    "seed_summary",
]


def __getattr__(name: str):  # lazy: the runner pulls in the engine and data modules
    if name == "run_fewshot":
        from .runner import run_fewshot

        return run_fewshot
    raise AttributeError(f"module 'schane.fewshot' has no attribute {name!r}")
