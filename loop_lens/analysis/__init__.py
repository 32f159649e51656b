"""Analyses of looped runs: fixed points, attention stabilisation, lenses and stages.

Each function takes a model and a LoopCache (or prompts) and returns a small result object with
the tensors, a tidy `to_frame()` and a `plot()`. Lenses are `Lens` objects (`LogitLens`,
`CodaLens`, a fitted `TunedLens`); functions that take a lens accept its name or an instance. Iterations are counted
from 0 (the paper counts from 1).
"""

from loop_lens.analysis import streaming
from loop_lens.analysis._types import LoopedModel
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
from loop_lens.analysis.hierarchical import HierarchicalConvergence, hierarchical_convergence
from loop_lens.analysis.lens import (
    LENSES,
    CodaLens,
    Lens,
    LogitLens,
    StateLensResult,
    coda_lens,
    get_lens,
    lens_of_states,
    logit_lens_of_states,
)
from loop_lens.analysis.stages import DepthProfile, LensResult, depth_profile, logit_lens
from loop_lens.analysis.streaming import StreamingResult, stream_analyses
from loop_lens.analysis.sweeps import SweepResult, random_init_sweep
from loop_lens.analysis.trajectory import Trajectory, pca_trajectory
from loop_lens.analysis.tuned_lens import TunedLens

__all__ = [
    "LENSES", "AttentionStability", "CodaLens", "CyclicSimilarity", "DepthProfile", "FixedPoints", "HierarchicalConvergence", "Lens", "LensResult",
    "LogitLens", "LoopedModel", "StateLensResult", "StepSizes", "StreamingResult", "SweepResult", "TokenClasses",
    "Trajectory", "TunedLens", "aggregate", "attention_stability", "classify_tokens", "coda_lens", "colsum_concentration",
    "cyclic_similarity", "depth_profile", "fixed_points", "get_lens", "head_type_scores", "hierarchical_convergence", "iter_batches",
    "js_divergence_rows", "lens_of_states", "logit_lens", "logit_lens_of_states", "mixing_score", "over_prompts",
    "pca_trajectory", "random_init_sweep", "sink_score", "step_sizes", "stream_analyses", "streaming",
]
