"""Few-shot evaluation library: episodes, frozen features, the logistic-regression solver, protocols A and B,
and the statistics of their results.

See docs/fewshot.md for the protocols. The ``schane fewshot`` workflow (fine-tune per loss and seed, select
on validation classes, test once) is :func:`schane.pipelines.fewshot.run_fewshot`.
"""

from .episodes import Episode, load_episodes, read_episodes_meta, sample_episodes, save_episodes
from .features import FeatureBank, build_feature_bank
from .logreg import logreg_fit_batched, logreg_predict
from .protocol_a import evaluate_protocol_a
from .protocol_b import (
    FINETUNE_PARAMS,
    ProtoHead,
    Setting,
    evaluate_protocol_b,
    evaluate_protocol_b_grid,
    finetune_episode,
    settings_grid,
    tuned_parameters,
)
from .stats import Interval, mean_ci, paired_difference, seed_summary

__all__ = [
    "FINETUNE_PARAMS",
    "Episode",
    "FeatureBank",
    "Interval",
    "ProtoHead",
    "Setting",
    "build_feature_bank",
    "evaluate_protocol_a",
    "evaluate_protocol_b",
    "evaluate_protocol_b_grid",
    "finetune_episode",
    "load_episodes",
    "logreg_fit_batched",
    "logreg_predict",
    "mean_ci",
    "paired_difference",
    "read_episodes_meta",
    "sample_episodes",
    "save_episodes",
    "seed_summary",
    "settings_grid",
    "tuned_parameters",
]
