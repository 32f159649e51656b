"""Hierarchical convergence of a nested (HRM) run: step sizes on both timescales.

An HRM model runs `for h: (for l: z_L = L(z_L + z_H)); z_H = H(z_H + z_L)`. With z_H^h =
`iter.{h}.hook_state_post` and z_L^{h,l} = `iter.{h}.low.{l}.hook_state_post`, both
[batch, pos, d_model], the relative step (`fixed_points.step_metrics`: Frobenius over pos x d per
batch item, padded positions left out) is measured

- for z_H between consecutive H cycles: `h_relative[h] = ||z_H^h - z_H^{h-1}|| / ||z_H^h||`;
- for z_L between consecutive L cycles in the order they run, the first L cycle of H cycle h
  against the last z_L of H cycle h - 1, so a "reset" of L when H moves shows as a jump.

Steps with nothing cached before them (h = 0 for z_H, (h, l) = (0, 0) for z_L) are NaN.

Fixed points on both timescales: `l_to_end[h, l] = ||z_L^{h,l} - z_L^{h,L-1}|| / ||z_L^{h,L-1}||`,
the distance of each L cycle to the end of its own H cycle (the local equilibrium L settles into
while z_H is held), and `h_to_end[h] = ||z_H^h - z_H^{H-1}|| / ||z_H^{H-1}||`, to the run's last z_H.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from loop_lens.analysis import _checks
from loop_lens.analysis._types import Mask
from loop_lens.analysis.fixed_points import step_metrics
from loop_lens.analysis.result import Result, long_frame
from loop_lens.cache import LoopCache


@dataclass(kw_only=True)
class HierarchicalConvergence(Result):
    """Relative (and absolute) steps of z_H across H cycles, [H, B], and of z_L across every L
    cycle, [H, L, B] (the first L cycle of each H cycle against the previous cycle's last z_L)."""

    h_step: Float[Tensor, "H B"]
    h_relative: Float[Tensor, "H B"]
    l_step: Float[Tensor, "H L B"]
    l_relative: Float[Tensor, "H L B"]
    h_to_end: Float[Tensor, "H B"]  # relative distance of z_H^h to the last z_H
    l_to_end: Float[Tensor, "H L B"]  # relative distance of z_L^{h,l} to its H cycle's last z_L

    def to_frame(self) -> pd.DataFrame:
        """One row per state: timescale ("L" or "H"), h, l (empty for H), batch, relative_step
        and step (the absolute Frobenius step; empty for the first state of each timescale), and
        to_end (relative distance to the end of its H cycle for z_L, to the last z_H for z_H)."""
        low = long_frame(self.l_relative, ["h", "l", "batch"], "relative_step")
        low["step"] = self.l_step.detach().reshape(-1).float().cpu().numpy()
        low["to_end"] = self.l_to_end.detach().reshape(-1).float().cpu().numpy()
        low.insert(0, "timescale", "L")
        high = long_frame(self.h_relative, ["h", "batch"], "relative_step")
        high["step"] = self.h_step.detach().reshape(-1).float().cpu().numpy()
        high["to_end"] = self.h_to_end.detach().reshape(-1).float().cpu().numpy()
        high.insert(0, "timescale", "H")
        high.insert(2, "l", pd.NA)
        frame = pd.concat([low, high], ignore_index=True)
        frame["l"] = frame["l"].astype("Int64")
        return frame[["timescale", "h", "l", "batch", "relative_step", "step", "to_end"]]

    def plot(self, log: bool = True):
        """The hierarchical-convergence picture (batch mean): z_L's relative step over every
        (h, l) in running order (a sawtooth when L settles inside each H cycle and is reset when
        H moves), and z_H's relative step at the end of each H cycle, on the same x axis."""
        import plotly.graph_objects as go

        H, L = self.l_relative.shape[:2]
        low = self.l_relative.detach().float().nanmean(-1).reshape(-1).cpu().numpy()
        high = self.h_relative.detach().float().nanmean(-1).cpu().numpy()
        labels = [f"h{h}.l{l}" for h in range(H) for l in range(L)]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=list(range(H * L)), y=low, mode="lines+markers", name="z_L (L cycles)"))
        fig.add_trace(go.Scatter(x=[h * L + L - 1 for h in range(H)], y=high, mode="lines+markers",
                                 name="z_H (H cycles)", marker=dict(symbol="diamond", size=10)))
        for h in range(1, H):
            fig.add_vline(x=h * L - 0.5, line_dash="dot", line_color="gray")
        fig.update_layout(title="Hierarchical convergence: relative step of z_L and z_H",
                          xaxis=dict(title="(H cycle, L cycle) in running order", tickmode="array",
                                     tickvals=list(range(H * L)), ticktext=labels),
                          yaxis=dict(title="relative step", type="log" if log else "linear"))
        return fig


def _nested_states(cache: LoopCache) -> tuple[Tensor, Tensor]:
    """z_H [H, B, S, D] and z_L [H, L, B, S, D] in fp32, after checking the cache holds them."""
    cache = _checks.loop_cache(cache)
    L = int(getattr(cache, "l_cycles", 0) or 0)  # the run's L cycles (a NestedLoopCache)
    if L < 1:
        raise ValueError("cache is not from a nested (HRM) model (cfg.l_cycles = 0): hierarchical_convergence "
                         "needs z_H and z_L per cycle; use step_sizes for a single-timescale loop")
    H = cache.n_loops
    high = [f"iter.{h}.hook_state_post" for h in range(H)]
    low = [f"iter.{h}.low.{l}.hook_state_post" for h in range(H) for l in range(L)]
    missing = [n for n in high + low if n not in cache.cache_dict]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"cache lacks {shown}: hierarchical_convergence needs iter.{{h}}.hook_state_post and "
                         f"iter.{{h}}.low.{{l}}.hook_state_post for every H cycle (n_loops={H}) and L cycle "
                         f"(l_cycles={L}); cache them, e.g. names_filter=lambda n: n.endswith('hook_state_post')")
    z_h = torch.stack([cache.cache_dict[n] for n in high]).float()
    z_l = torch.stack([cache.cache_dict[n] for n in low]).float()
    return z_h, z_l.reshape(H, L, *z_l.shape[1:])


def hierarchical_convergence(cache: LoopCache, mask: Optional[Mask] = None) -> HierarchicalConvergence:
    """Relative steps of z_H across H cycles and of z_L across L cycles for a cached HRM run
    (`iter.*.hook_state_post` and `iter.*.low.*.hook_state_post` must be cached)."""
    z_h, z_l = _nested_states(cache)
    H, L, B, S = z_l.shape[:4]
    _checks.not_empty(B, S)
    mask = _checks.mask_for(mask, B, S, z_h.device)
    if mask is not None:
        keep = mask[:, :, None].float()
        z_h, z_l = z_h * keep, z_l * keep
    nan = torch.full((1, B), float("nan"), device=z_h.device)
    h_step, h_relative = (torch.cat([nan, m]) for m in step_metrics(z_h[1:], z_h[:-1])[:2])
    flat = z_l.reshape(H * L, B, S, -1)  # every L cycle in running order
    l_step, l_relative = (torch.cat([nan, m]).reshape(H, L, B) for m in step_metrics(flat[1:], flat[:-1])[:2])
    h_to_end = _distance(z_h, z_h[-1:])
    l_to_end = _distance(z_l, z_l[:, -1:])
    return HierarchicalConvergence(h_step=h_step, h_relative=h_relative, l_step=l_step, l_relative=l_relative,
                                   h_to_end=h_to_end, l_to_end=l_to_end)


def _distance(x: Tensor, end: Tensor) -> Tensor:
    """||x - end|| / ||end|| over (pos, d_model), per batch item; `end` broadcasts over x's leading axes."""
    return (x - end).flatten(-2).norm(dim=-1) / end.flatten(-2).norm(dim=-1).clamp_min(1e-12)
