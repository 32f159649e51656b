"""Random-init sweeps: do randomly initialised looped blocks reach fixed points? (paper, section 4.2)

Norm styles x input injection x seeds, each run to T = 128 iterations on random tokens, with the
fixed-point measures of `fixed_points.py` summarised per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from loop_lens.analysis.fixed_points import fixed_points, step_sizes
from loop_lens.analysis.result import Result
from loop_lens.config import LoopConfig
from loop_lens.model.init import init_weights
from loop_lens.model.looped import HookedLoopedTransformer

STYLES = {
    "pre-norm": dict(norm_placement="pre"),
    "huginn": dict(norm_placement="sandwich_resid"),
    "ouro": dict(norm_placement="sandwich", iter_norm=True, final_norm=False),
}


def sweep_config(style: str, injection: bool, d_model: int = 64, n_heads: int = 4, n_block: int = 4, d_vocab: int = 256) -> LoopConfig:
    """A random-init looped model `(0, n_block x T, 0)` of one norm style, with or without a linear
    input injection (over concat[state, embedding], the state starting at zero)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {list(STYLES)}")
    loop = dict(injection="linear", initial_state="zeros") if injection else dict(injection="none", initial_state="embed")
    return LoopConfig(d_model=d_model, n_heads=n_heads, d_mlp=4 * d_model, d_vocab=d_vocab, n_block=n_block,
                      default_loops=4, n_ctx=512, model_name=f"random-{style}", **STYLES[style], **loop)


@dataclass
class SweepResult(Result):
    """One row per (style, injection, seed), plus the per-iteration relative step curves."""

    frame: pd.DataFrame
    curves: dict[tuple[str, bool, int], torch.Tensor]  # mean relative step per iteration
    tol: float

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    def summary(self) -> pd.DataFrame:
        """Per (style, injection): runs converged, median final step, min fixed-point cosine."""
        g = self.frame.groupby(["style", "injection"], sort=False)
        return pd.DataFrame({
            "runs": g.size(),
            "converged": g["converged"].sum(),
            "median_final_rel_step": g["final_rel_step"].median(),
            "median_convergence_iter": g["convergence_iter"].median(),
            "min_fixed_point_cos": g["min_layer_cos"].median(),
            "degenerate": g["degenerate"].sum(),
        }).reset_index()

    def plot(self, log: bool = True):
        import plotly.graph_objects as go

        fig = go.Figure()
        for (style, inj, seed), curve in self.curves.items():
            fig.add_scatter(y=curve.tolist(), mode="lines", name=f"{style} {'inj' if inj else 'no inj'} s{seed}",
                            legendgroup=f"{style}{inj}", line=dict(dash="solid" if inj else "dot"))
        fig.add_hline(y=self.tol, line_dash="dash", annotation_text="tol")
        fig.update_layout(title="Random-init blocks: relative step size by iteration", xaxis_title="iteration",
                          yaxis_title="relative step", yaxis_type="log" if log else "linear")
        return fig


def random_init_sweep(
    styles: Sequence[str] = tuple(STYLES),
    injections: Sequence[bool] = (True, False),
    seeds: Sequence[int] = (0, 1, 2),
    n_loops: int = 128,
    tol: float = 1e-3,
    seq_len: int = 32,
    batch: int = 2,
    init_std: float = 0.02,
    progress: bool = True,
    **config_kwargs,
) -> SweepResult:
    """Run every (style, injection, seed) model for `n_loops` iterations on random tokens.

    A run counts as converged when the relative step of every block layer stays below `tol` from
    some iteration on (`convergence_iter`); `degenerate` when the layers' fixed points collapse to
    one (min cosine > 1 - tol).
    """
    rows, curves = [], {}
    combos = [(s, i, seed) for s in styles for i in injections for seed in seeds]
    for style, inj, seed in tqdm(combos, desc="sweep", disable=not progress):
        cfg = sweep_config(style, inj, **config_kwargs)
        torch.manual_seed(seed)
        model = init_weights(HookedLoopedTransformer(cfg), std=init_std, seed=seed).eval()
        tokens = torch.randint(0, cfg.d_vocab, (batch, seq_len), generator=torch.Generator().manual_seed(1000 + seed))
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, n_loops=n_loops, names_filter=lambda n: n.endswith("hook_resid_post"))
        steps = step_sizes(cache)
        conv = steps.convergence_iteration(tol)  # [L, B]
        converged = bool((conv >= 0).all())
        fp = fixed_points(cache)
        curve = steps.relative.mean((1, 2))
        curves[(style, inj, seed)] = curve
        rows.append(dict(
            style=style, injection=inj, seed=seed,
            final_rel_step=float(steps.relative[-1].max()),
            converged=converged,
            convergence_iter=int(conv.max()) if converged else None,
            min_layer_cos=fp.min_layer_cosine,
            degenerate=converged and fp.degenerate(tol),
        ))
    return SweepResult(pd.DataFrame(rows), curves, tol)
