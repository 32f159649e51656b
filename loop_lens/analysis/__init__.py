"""Analyses of looped runs: fixed points, attention stabilisation, lenses and stages.

Each function takes a model and a LoopCache (or prompts) and returns a small result object with
the tensors, a tidy `to_frame()` and a `plot()`. Iterations are counted from 0 (the paper
counts from 1).
"""

from loop_lens.analysis import streaming
from loop_lens.analysis.attention import (
    AttentionStability,
    attention_stability,
    colsum_concentration,
    head_type_scores,
    js_divergence_rows,
    mixing_score,
    sink_score,
)
from loop_lens.analysis.batching import aggregate, iter_batches, over_prompts
from loop_lens.analysis.fixed_points import (
    CyclicSimilarity,
    FixedPoints,
    StepSizes,
    TokenClasses,
    classify_tokens,
    cyclic_similarity,
    fixed_points,
    step_sizes,
)
from loop_lens.analysis.lens import coda_lens, logit_lens_of_states
from loop_lens.analysis.stages import DepthProfile, LensResult, depth_profile, logit_lens
from loop_lens.analysis.sweeps import SweepResult, random_init_sweep
from loop_lens.analysis.trajectory import Trajectory, pca_trajectory

__all__ = [
    "AttentionStability", "CyclicSimilarity", "DepthProfile", "FixedPoints", "LensResult", "StepSizes",
    "SweepResult", "TokenClasses", "Trajectory", "aggregate", "attention_stability", "classify_tokens",
    "coda_lens", "colsum_concentration", "cyclic_similarity", "depth_profile", "fixed_points",
    "head_type_scores", "iter_batches", "js_divergence_rows", "logit_lens", "logit_lens_of_states",
    "mixing_score", "over_prompts", "pca_trajectory", "random_init_sweep", "sink_score", "step_sizes", "streaming",
]
