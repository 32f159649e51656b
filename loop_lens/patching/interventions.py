"""Iteration interventions: skip an iteration, freeze after it, drop its injection, transplant a
state between runs, and a sweep of one intervention over the iterations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from loop_lens.checks import check_n_loops, integer, single_loop
from loop_lens.patching.common import Metric, _cache, _scalar, _seed, _tokens
from loop_lens.result import Result

INTERVENTIONS = ("skip", "freeze_after", "drop_injection")
"""The per-iteration interventions `intervene` and `intervention_sweep` take."""


@dataclass(kw_only=True)
class Intervened:
    """The output of one intervened run: its logits and `metric(logits)`."""

    logits: Float[Tensor, "batch pos d_vocab"]
    metric: float


def _intervention_hooks(model: Any, kind: str, t: int, T: int) -> list[tuple[str, Callable]]:
    """Forward hooks that make one intervention at iteration t of a T-iteration run."""
    pre: dict[int, Tensor] = {}

    def remember(act: Tensor, hook: Any) -> None:
        pre[int(hook.name.split(".")[1])] = act

    def keep_input(act: Tensor, hook: Any) -> Tensor:
        return pre[int(hook.name.split(".")[1])]

    if kind == "skip":  # iteration t hands on the state it received
        return [(f"iter.{t}.hook_state_pre", remember), (f"iter.{t}.hook_state_post", keep_input)]
    if kind == "freeze_after":  # every iteration after t hands on the state it received
        return [h for u in range(t + 1, T) for h in ((f"iter.{u}.hook_state_pre", remember), (f"iter.{u}.hook_state_post", keep_input))]
    if model.cfg.injection == "none":
        raise ValueError("kind='drop_injection' needs a model with input injection; this model has injection='none'")

    def without_input(act: Tensor, hook: Any) -> Tensor:  # the injection with the input e set to 0
        return model.injection(pre[t], torch.zeros_like(pre[t]))

    return [(f"iter.{t}.hook_state_pre", remember), (f"iter.{t}.hook_injected", without_input)]


def intervene(
    model: Any,
    tokens: Any,
    metric: Metric,
    kind: str,
    iteration: int,
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    exit: Union[None, str, int] = None,
) -> Intervened:
    """One run with one intervention at `iteration`: "skip" (the state passes through that
    iteration unchanged), "freeze_after" (every later iteration passes the state through), or
    "drop_injection" (that iteration's injection sees a zero input, `injection(s, 0)`)."""
    single_loop(model, "intervene")
    if kind not in INTERVENTIONS:
        raise ValueError(f"kind must be one of {list(INTERVENTIONS)}, got {kind!r}")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    t = integer(iteration, "iteration")
    if not 0 <= t < T:
        raise ValueError(f"iteration={t} is out of range for n_loops={T} (valid: 0 .. {T - 1})")
    toks = _tokens(model, tokens, "tokens")
    hooks = _intervention_hooks(model, kind, t, T)
    with torch.no_grad():
        logits = model.run_with_hooks(toks, n_loops=T, seed=_seed(model, seed), exit=exit, fwd_hooks=hooks)
        return Intervened(logits=logits, metric=float(_scalar(metric(logits))))


def transplant(
    model: Any,
    source: Any,
    target: Any,
    metric: Metric,
    source_iteration: int,
    target_iteration: int,
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    exit: Union[None, str, int] = None,
) -> Intervened:
    """The state leaving iteration `source_iteration` of a run on `source` enters iteration
    `target_iteration` of a run on `target` (the same shape; they may be the same prompt); both
    runs have `n_loops` iterations. Returns the target run's logits and metric."""
    single_loop(model, "transplant")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    src_t, dst_t = integer(source_iteration, "source_iteration"), integer(target_iteration, "target_iteration")
    for name, value in (("source_iteration", src_t), ("target_iteration", dst_t)):
        if not 0 <= value < T:
            raise ValueError(f"{name}={value} is out of range for n_loops={T} (valid: 0 .. {T - 1})")
    src, dst = _tokens(model, source, "source"), _tokens(model, target, "target")
    if src.shape != dst.shape:
        raise ValueError(f"target has shape {tuple(dst.shape)}, but source has {tuple(src.shape)}; a state fits only a run of the same shape")
    seed = _seed(model, seed)
    _, acts = _cache(model, src, [f"iter.{src_t}.hook_state_post"], n_loops=T, seed=seed, exit=exit)
    state = acts[f"iter.{src_t}.hook_state_post"]
    with torch.no_grad():
        logits = model.run_with_hooks(dst, n_loops=T, seed=seed, exit=exit,
                                      fwd_hooks=[(f"iter.{dst_t}.hook_state_pre", lambda act, hook: state)])
        return Intervened(logits=logits, metric=float(_scalar(metric(logits))))


@dataclass(kw_only=True)
class InterventionSweep(Result):
    """One intervention at each iteration t: `values[t]` = the metric with it, `baseline` = the
    metric of the plain run."""

    values: Float[Tensor, " T"]
    baseline: float
    kind: str
    n_loops: int

    def to_frame(self) -> pd.DataFrame:
        """One row per iteration: the metric, and its change from the plain run."""
        v = self.values.tolist()
        return pd.DataFrame({"kind": self.kind, "iteration": range(len(v)), "value": v,
                             "effect": [x - self.baseline for x in v]})

    def plot(self, **kwargs: Any):
        """The metric against the intervened iteration, the plain run as a dashed line."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(x=list(range(len(self.values))), y=self.values.tolist(), mode="lines+markers", name=self.kind))
        fig.add_hline(y=self.baseline, line_dash="dash", annotation_text="no intervention")
        fig.update_layout(title=f"{self.kind} at iteration t (T={self.n_loops})", xaxis_title="iteration t",
                          yaxis_title="metric", **kwargs)
        return fig


def intervention_sweep(
    model: Any,
    tokens: Any,
    metric: Metric,
    kind: str,
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    exit: Union[None, str, int] = None,
) -> InterventionSweep:
    """`intervene` at every iteration t in turn (one forward each)."""
    single_loop(model, "intervention_sweep")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    toks = _tokens(model, tokens, "tokens")
    with torch.no_grad():
        baseline = float(_scalar(metric(model(toks, n_loops=T, seed=_seed(model, seed), exit=exit))))
    values = torch.tensor([intervene(model, toks, metric, kind, t, n_loops=T, seed=seed, exit=exit).metric for t in range(T)])
    return InterventionSweep(values=values, baseline=baseline, kind=kind, n_loops=T)

