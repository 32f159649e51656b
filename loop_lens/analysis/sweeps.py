"""Random-init sweeps: do randomly initialised looped blocks reach fixed points? (paper, section 4.2)

Norm styles x input injection x seeds, each run to T = 128 iterations on random tokens, with the
fixed-point measures of `fixed_points.py` summarised per run. The options `init`,
`adapter_init`, `embed_scale` and `start` switch single conditions to Huginn's reference choices
(its weight initialisation, an adapter drawn like every other weight, embeddings times
sqrt(d_model), a truncated-normal start state); `docs/random-init-sweep.md` measures which of
them decides whether Huginn-style blocks converge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import pandas as pd
import torch
from tqdm.auto import tqdm

from loop_lens.analysis.fixed_points import block_states, fixed_points, step_sizes
from loop_lens.analysis.result import Result
from loop_lens.config import LoopConfig
from loop_lens.model.init import init_weights
from loop_lens.model.looped import HookedLoopedTransformer

STYLES = {
    "pre-norm": dict(norm_placement="pre"),
    "huginn": dict(norm_placement="sandwich_resid"),
    "ouro": dict(norm_placement="sandwich", iter_norm=True, final_norm=False),
}
INITS = ("default", "huginn")
ADAPTER_INITS = ("identity", "normal")
STARTS = ("zeros", "trunc_normal")
HUGINN_MEAN_LOOPS = 32  # Huginn's mean recurrence, which sets its output-projection scale


def _trunc_normal(shape: torch.Size, std: float, g: torch.Generator) -> torch.Tensor:
    """N(0, std) truncated at 3 std, as Huginn's reference draws every weight."""
    return torch.nn.init.trunc_normal_(torch.empty(shape), 0.0, std, -3 * std, 3 * std, generator=g)


@torch.no_grad()
def _huginn_init(model: HookedLoopedTransformer, seed: int) -> float:
    """Huginn's reference initialisation; returns its std, sqrt(2 / (5 d_model)).

    Every matrix (embedding and adapter included) is a truncated normal at that std, except the
    attention output, MLP down and MLP up projections: std / sqrt(2 x expected depth), with the
    expected depth n_block x 32 (Huginn's mean recurrence; no prelude or coda here). Norms at 1.
    """
    cfg = model.cfg
    std = math.sqrt(2 / (5 * cfg.d_model))
    out_std = std / math.sqrt(2 * cfg.n_block * HUGINN_MEAN_LOOPS)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.copy_(_trunc_normal(p.shape, out_std if name.endswith(("o_proj.weight", "down_proj.weight", "up_proj.weight")) else std, g))
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    return std


@torch.no_grad()
def _draw_adapter(model: HookedLoopedTransformer, kind: str, std: float, seed: int) -> None:
    """Redraw the injection adapter [D, 2D]: "identity" = [I | I] / sqrt 2 plus 0.1 std noise,
    "normal" = a truncated normal at `std`, like every other weight."""
    w = model.injection.adapter.weight
    noise = _trunc_normal(w.shape, std, torch.Generator().manual_seed(10_000 + seed))
    if kind == "normal":
        w.copy_(noise)
    else:
        D = w.shape[0]
        w.copy_(torch.cat([torch.eye(D), torch.eye(D)], dim=1) / math.sqrt(2) + 0.1 * noise)


def sweep_config(
    style: str,
    injection: bool,
    d_model: int = 64,
    n_heads: int = 4,
    n_block: int = 4,
    d_vocab: int = 256,
    embed_scale: float = 1.0,
    start: str = "zeros",
) -> LoopConfig:
    """A random-init looped model `(0, n_block x T, 0)` of one norm style, with or without a linear
    input injection over concat[state, embedding].

    With injection the state starts at `start`: zeros, or Huginn's truncated normal (std
    sqrt(2 / (5 d_model)), times sqrt(d_model)); without it the state starts at the embedding.
    The embedding is multiplied by `embed_scale` (Huginn: sqrt(d_model)).
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {list(STYLES)}")
    if start not in STARTS:
        raise ValueError(f"unknown start {start!r}; choose from {list(STARTS)}")
    if not injection:
        loop = dict(injection="none", initial_state="embed")
    elif start == "zeros":
        loop = dict(injection="linear", initial_state="zeros")
    else:
        loop = dict(injection="linear", initial_state="trunc_normal", init_std=math.sqrt(2 / (5 * d_model)),
                    init_scale=math.sqrt(d_model))
    return LoopConfig(d_model=d_model, n_heads=n_heads, d_mlp=4 * d_model, d_vocab=d_vocab, n_block=n_block,
                      default_loops=4, n_ctx=512, model_name=f"random-{style}", embed_scale=embed_scale,
                      **STYLES[style], **loop)


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


def _late_rate(relative: torch.Tensor) -> float:
    """Mean factor by which the largest relative step shrinks per iteration over the last quarter
    of the run (< 1: still contracting; ~1 once it sits at the fp32 floor or never contracts)."""
    worst = relative.flatten(1).amax(1)  # [T]
    k = (len(worst) - 1) // 4
    if k < 1:
        return float("nan")
    return float((worst[-1] / worst[-1 - k]) ** (1 / k))


def random_init_sweep(
    styles: Sequence[str] = tuple(STYLES),
    injections: Sequence[bool] = (True, False),
    seeds: Sequence[int] = (0, 1, 2),
    n_loops: int = 128,
    tol: float = 1e-3,
    seq_len: int = 32,
    batch: int = 2,
    init_std: float = 0.02,
    init: str = "default",
    adapter_init: Optional[str] = None,
    embed_scale: float = 1.0,
    start: str = "zeros",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    **config_kwargs,
) -> SweepResult:
    """Run every (style, injection, seed) model for `n_loops` iterations on random tokens.

    `init`: "default" = `init_weights` at `init_std` (adapter near [I | I] / sqrt 2); "huginn" =
    Huginn's reference scheme (`init_std` unused; adapter drawn like every other weight).
    `adapter_init` ("identity" or "normal") overrides the adapter alone. `embed_scale` and `start`
    go to `sweep_config`; `dtype` is the dtype the model runs in.

    A run counts as converged when the relative step of every block layer (Frobenius norm over
    positions x d_model, per batch item) stays below `tol` from some iteration on
    (`convergence_iter`); `degenerate` when the layers' fixed points collapse to one (min cosine
    > 1 - tol). Also per run: the largest per-token relative step at the last iteration, the
    per-iteration shrink factor of the step over the last quarter (`late_rate`) and the mean
    per-token norm of the (scaled) embedding over that of the last state (`embed_to_state`).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {list(INITS)}")
    if adapter_init is not None and adapter_init not in ADAPTER_INITS:
        raise ValueError(f"unknown adapter_init {adapter_init!r}; choose from {list(ADAPTER_INITS)}")
    rows, curves = [], {}
    combos = [(s, i, seed) for s in styles for i in injections for seed in seeds]
    for style, inj, seed in tqdm(combos, desc="sweep", disable=not progress):
        cfg = sweep_config(style, inj, embed_scale=embed_scale, start=start, **config_kwargs)
        torch.manual_seed(seed)
        model = HookedLoopedTransformer(cfg)
        if init == "huginn":
            std = _huginn_init(model, seed)
        else:
            std = init_std
            init_weights(model, std=init_std, seed=seed)
        if inj and adapter_init is not None:
            _draw_adapter(model, adapter_init, std, seed)
        model = model.to(dtype).eval()
        tokens = torch.randint(0, cfg.d_vocab, (batch, seq_len), generator=torch.Generator().manual_seed(1000 + seed))
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, n_loops=n_loops, seed=seed,
                                            names_filter=lambda n: n.endswith("hook_resid_post") or n == "hook_embed")
        steps = step_sizes(cache)
        conv = steps.convergence_iteration(tol)  # [L, B]
        converged = bool((conv >= 0).all())
        fp = fixed_points(cache)
        last = block_states(cache)[-1].norm(dim=-1)  # [L, B, S]: per-token norm of the last states
        curve = steps.relative.mean((1, 2))
        curves[(style, inj, seed)] = curve
        rows.append(dict(
            style=style, injection=inj, seed=seed,
            final_rel_step=float(steps.relative[-1].max()),
            final_token_rel_step=float((steps.per_token[-1] / last.clamp_min(1e-12)).max()),
            converged=converged,
            convergence_iter=int(conv.max()) if converged else None,
            late_rate=_late_rate(steps.relative[1:]),
            embed_to_state=float(cache["hook_embed"].float().norm(dim=-1).mean() / last.mean()),
            min_layer_cos=fp.min_layer_cosine,
            degenerate=converged and fp.degenerate(tol),
        ))
    return SweepResult(pd.DataFrame(rows), curves, tol)
