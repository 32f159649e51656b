"""Fixed points and cyclic trajectories (the paper's section 4; Geiping et al. for token classes).

X_{l,t} is the residual after block layer l at iteration t (`iter.{t}.blocks.{l}.hook_resid_post`),
[batch, pos, d_model]. Iterations count from 0; the step at t compares X_{l,t} with X_{l,t-1}
and is NaN at t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from loop_lens.analysis import _checks
from loop_lens.analysis._types import Mask
from loop_lens.analysis.result import Result, first_stable, long_frame
from loop_lens.cache import LoopCache
from loop_lens.checks import tolerance

EPS = 1e-12


def block_states(
    cache: LoopCache, kind: str = "hook_resid_post", mask: Optional[Mask] = None, name: str = "cache"
) -> Float[Tensor, "T L B S D"]:
    """One hook kind over (iteration, block layer), in fp32, as the model measures its states
    (`model.measured_state`: on the unit sphere for nGPT models), padded positions zeroed; the
    cache (called `name` in errors) and the mask are checked first."""
    cache = _checks.loop_cache(cache, name)
    x = cache.model.measured_state(cache.stack(kind).float(), kind)
    _checks.not_empty(x.shape[2], x.shape[3], name)
    mask = _checks.mask_for(mask, x.shape[2], x.shape[3], x.device, holder=name)
    if mask is not None:
        x = x * mask[None, None, :, :, None].float()
    return x


def _cos(a: Tensor, b: Tensor, dim) -> Tensor:
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(EPS)


def step_metrics(x: Tensor, prev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Step from `prev` to `x` (both [..., S, D]): Frobenius norm over S x D, the same relative to
    ||x||, cosine of the flattened states, and per token (over D) the norm and cosine."""
    flat, pflat = x.flatten(-2), prev.flatten(-2)
    norm = (flat - pflat).norm(dim=-1)
    relative = norm / flat.norm(dim=-1).clamp_min(EPS)
    return norm, relative, _cos(flat, pflat, -1), (x - prev).norm(dim=-1), _cos(x, prev, -1)


@dataclass(kw_only=True)
class StepSizes(Result):
    """Per (iteration, layer, batch item): `||X_t - X_{t-1}||_F` over pos x d, the same relative to
    `||X_t||_F`, the cosine between consecutive states, and per token ([T, L, B, S])."""

    norm: Float[Tensor, "T L B"]
    relative: Float[Tensor, "T L B"]
    cosine: Float[Tensor, "T L B"]
    per_token: Float[Tensor, "T L B S"]
    per_token_cosine: Float[Tensor, "T L B S"]

    def convergence_iteration(self, tol: float = 1e-3) -> Tensor:
        """[L, B]: the first iteration t after which the relative step stays below `tol`
        (0 = already at a fixed point; -1 = never settles within the run)."""
        return first_stable(self.relative, tol)

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, layer, batch) with a step (t >= 1)."""
        frame = long_frame(self.norm, ["iteration", "layer", "batch"], "step")
        frame["relative_step"] = self.relative.reshape(-1).cpu().numpy()
        frame["cosine"] = self.cosine.reshape(-1).cpu().numpy()
        return frame.dropna()

    def plot(self, by: str = "layer", relative: bool = True, log: bool = True):
        """One line per layer across iterations (`by="layer"`), or per iteration across layers."""
        import plotly.express as px

        frame = self.to_frame().groupby(["iteration", "layer"], as_index=False).mean(numeric_only=True)
        y = "relative_step" if relative else "step"
        x, color = ("iteration", "layer") if by == "layer" else ("layer", "iteration")
        fig = px.line(frame, x=x, y=y, color=color, markers=True, log_y=log, title=f"Step size by {by}")
        fig.update_layout(legend_title=color)
        return fig


def step_sizes(cache: LoopCache, kind: str = "hook_resid_post", mask: Optional[Mask] = None) -> StepSizes:
    """Step sizes of each block layer's output between consecutive iterations."""
    x = block_states(cache, kind, mask)  # [T, L, B, S, D]
    nan = torch.full_like(x[:1, ..., 0], float("nan"))  # [1, L, B, S]: no step at t = 0
    norm, relative, cosine, per_token, per_token_cosine = (
        torch.cat([nan if m.ndim == nan.ndim else nan[..., 0], m]) for m in step_metrics(x[1:], x[:-1])
    )
    return StepSizes(norm=norm, relative=relative, cosine=cosine, per_token=per_token, per_token_cosine=per_token_cosine)


@dataclass(kw_only=True)
class FixedPoints(Result):
    """Distance and cosine of every X_{l,t} to the approximate fixed point X*_l (the reference
    run's last iteration), and the cosine matrix between the layers' fixed points."""

    distance: Float[Tensor, "T L B"]
    relative_distance: Float[Tensor, "T L B"]
    cosine: Float[Tensor, "T L B"]
    layer_cosine: Float[Tensor, "L L"]
    reference_loops: int

    @property
    def min_layer_cosine(self) -> float:
        """`min_j cos(X*_0, X*_j)`: near 1 means every layer collapsed to one (degenerate) point."""
        return float(self.layer_cosine[0].min())

    def degenerate(self, tol: float = 1e-3) -> bool:
        """True when all block layers share one fixed point (min cosine within `tol` of 1)."""
        return self.min_layer_cosine > 1 - tolerance(tol, "tol")

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, layer, batch)."""
        frame = long_frame(self.distance, ["iteration", "layer", "batch"], "distance")
        frame["relative_distance"] = self.relative_distance.reshape(-1).cpu().numpy()
        frame["cosine"] = self.cosine.reshape(-1).cpu().numpy()
        return frame

    def plot(self, relative: bool = True, log: bool = True):
        """Distance to the fixed point by iteration, one line per layer (batch mean)."""
        import plotly.express as px

        frame = self.to_frame().groupby(["iteration", "layer"], as_index=False).mean(numeric_only=True)
        y = "relative_distance" if relative else "distance"
        return px.line(frame, x="iteration", y=y, color="layer", markers=True, log_y=log,
                       title=f"Distance to the fixed point (T_ref = {self.reference_loops})")

    def plot_layer_cosine(self):
        """Heatmap of cos(X*_i, X*_j) between the block layers' fixed points."""
        import plotly.express as px

        return px.imshow(self.layer_cosine.cpu().numpy(), zmin=-1, zmax=1, color_continuous_scale="RdBu",
                         labels=dict(x="layer j", y="layer i", color="cos"), title="cos(X*_i, X*_j)")


def fixed_points(cache: LoopCache, reference: Optional[LoopCache] = None, mask: Optional[Mask] = None) -> FixedPoints:
    """Compare each iteration with the fixed point X*_l = the last iteration of `reference` (a
    long run of the same model on the same input, e.g. the paper's T_ref = 128), or of `cache`."""
    x = block_states(cache, mask=mask)
    ref_cache = cache if reference is None else _checks.reference_cache(reference, cache)
    star = block_states(ref_cache, mask=mask, name="reference")[-1]  # [L, B, S, D]
    if star.shape != x.shape[1:]:
        raise ValueError(f"reference holds [layer, batch, pos, d_model] = {list(star.shape)} per iteration, "
                         f"but the cache holds {list(x.shape[1:])}: it must be a run of the same input")
    flat, star_flat = x.flatten(3), star.flatten(2)  # [T, L, B, SD], [L, B, SD]
    distance = (flat - star_flat[None]).norm(dim=-1)
    relative = distance / star_flat.norm(dim=-1).clamp_min(EPS)[None]
    cosine = _cos(flat, star_flat[None], -1)
    unit = star_flat / star_flat.norm(dim=-1, keepdim=True).clamp_min(EPS)  # [L, B, SD]
    layer_cosine = torch.einsum("ibd,jbd->ijb", unit, unit).mean(-1)
    return FixedPoints(distance=distance, relative_distance=relative, cosine=cosine, layer_cosine=layer_cosine,
                       reference_loops=ref_cache.n_loops)


@dataclass(kw_only=True)
class CyclicSimilarity(Result):
    """Pairwise similarity over every (iteration, layer) pair, ordered by unrolled depth: residual
    cosine, or Frobenius distance of attention patterns (averaged over batch and heads)."""

    matrix: Float[Tensor, "TL TL"]
    labels: list[str]
    measure: str

    def to_frame(self) -> pd.DataFrame:
        """One row per pair of (iteration, layer) sites."""
        frame = long_frame(self.matrix, ["i", "j"], self.measure)
        frame["label_i"] = [self.labels[i] for i in frame["i"]]
        frame["label_j"] = [self.labels[j] for j in frame["j"]]
        return frame

    def plot(self):
        """Heatmap over every pair of sites, in depth order."""
        import plotly.express as px

        scale = "Viridis" if self.measure == "cosine" else "Viridis_r"
        return px.imshow(self.matrix.cpu().numpy(), x=self.labels, y=self.labels, color_continuous_scale=scale,
                         labels=dict(color=self.measure), title=f"Cyclic similarity ({self.measure})")


def cyclic_similarity(cache: LoopCache, of: str = "resid", mask: Optional[Mask] = None) -> CyclicSimilarity:
    """`of="resid"`: cosine of residual streams (padded positions left out); `of="attention"`:
    Frobenius distance of attention patterns (padded query rows left out)."""
    if of not in ("resid", "attention"):
        raise ValueError(f"of must be 'resid' or 'attention', got {of!r}")
    cache = _checks.loop_cache(cache)
    T, L = cache.n_loops, cache.cfg.n_block
    labels = [f"t{t}.l{l}" for t in range(T) for l in range(L)]
    if of == "resid":
        x = block_states(cache, mask=mask).flatten(3)  # [T, L, B, SD]
        x = x.reshape(T * L, x.shape[2], -1)
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)
        matrix = torch.einsum("ibd,jbd->ijb", unit, unit).mean(-1)
        return CyclicSimilarity(matrix=matrix, labels=labels, measure="cosine")
    a = cache.stack("attn.hook_pattern").float()  # [T, L, B, H, S, S]
    B, S = a.shape[2], a.shape[-1]
    _checks.not_empty(B, S)
    mask = _checks.mask_for(mask, B, S, a.device)
    if mask is not None:
        a = a * mask[:, None, :, None].float()  # [B, 1, q, 1]: padded query rows out
    a = a.reshape(T * L, B * a.shape[3], -1).transpose(0, 1)  # [B*H, TL, S*S]
    matrix = torch.cdist(a, a).mean(0)
    return CyclicSimilarity(matrix=matrix, labels=labels, measure="frobenius_distance")


TOKEN_CLASSES = ("fixed_point", "orbit", "slider", "unknown")


@dataclass(kw_only=True)
class TokenClasses(Result):
    """Per (batch, position): fixed point / orbit / slider / unknown (Geiping et al. 2025), from
    the cosine distance of the last block layer's output at each iteration to its final value."""

    labels: list[list[str]]
    distance: Float[Tensor, "T B S"]
    period: Int[Tensor, "B S"]  # the detected period for orbits (0 otherwise)
    rho: float
    tau: float

    def to_frame(self) -> pd.DataFrame:
        """One row per (batch, position): the class and the period."""
        rows = [
            dict(batch=b, position=s, token_class=label, period=int(self.period[b, s]))
            for b, row in enumerate(self.labels)
            for s, label in enumerate(row)
        ]
        return pd.DataFrame(rows)

    def counts(self) -> pd.Series:
        """How many tokens fall in each class."""
        return self.to_frame()["token_class"].value_counts().reindex(TOKEN_CLASSES, fill_value=0)

    def plot(self, batch: int = 0):
        """Each token's cosine distance to its final state by iteration, dashed by class."""
        import plotly.express as px

        batch = _checks.index(batch, "batch", self.distance.shape[1], "batch items")
        frame = long_frame(self.distance[:, batch], ["iteration", "position"], "cosine_distance")
        frame["token_class"] = [self.labels[batch][p] for p in frame["position"]]
        return px.line(frame, x="iteration", y="cosine_distance", color="position", line_dash="token_class",
                       title="Cosine distance to the final state, per token")


def classify_tokens(
    cache: LoopCache,
    rho: float = 0.9,
    tau: float = 0.05,
    max_period: int = 8,
    layer: int = -1,
) -> TokenClasses:
    """Label each token's trajectory over a long run.

    With d_t = 1 - cos(x_t, x_{T-1}) for the output of block layer `layer`:
    - fixed point: d_t <= tau for the last `rho` fraction of iterations;
    - orbit: not a fixed point, and for some period p in 2..max_period the state returns,
      1 - cos(x_t, x_{t-p}) <= tau over the second half of the run, while consecutive states
      differ (mean 1 - cos(x_t, x_{t-1}) > tau there), so a slow drift is not an orbit;
    - slider: neither, and d_t decreases monotonically over the last `rho` fraction (a drift);
    - unknown: anything else.
    """
    cache = _checks.loop_cache(cache)
    layer = _checks.index(layer, "layer", cache.cfg.n_block, "block layers")
    max_period = _checks.positive_int(max_period, "max_period")
    if not 0 < rho <= 1:
        raise ValueError(f"rho={rho} must lie in (0, 1]: it is the fraction of iterations a fixed point holds")
    x = block_states(cache)[:, layer]  # [T, B, S, D]
    T = x.shape[0]
    final = x[-1]
    d = 1 - _cos(x, final[None], -1)  # [T, B, S]
    tail = max(1, int(round(rho * T)))
    fixed = (d[T - tail :] <= tau).all(0)
    half = T // 2
    period = torch.zeros(d.shape[1:], dtype=torch.long, device=d.device)
    for p in range(max_period, 1, -1):  # the smallest period wins
        if T - p <= half:
            continue
        back = 1 - _cos(x[half + p :], x[half : T - p], -1)  # [T-half-p, B, S]
        period = torch.where((back <= tau).all(0), p, period)
    moving = (1 - _cos(x[half + 1 :], x[half:-1], -1)).mean(0) > tau
    orbit = ~fixed & (period > 0) & moving
    steps = d[T - tail :]
    slider = ~fixed & ~orbit & (steps[1:] <= steps[:-1]).all(0) & (steps[:-1] - steps[1:]).gt(0).any(0)
    labels = [
        ["fixed_point" if fixed[b, s] else "orbit" if orbit[b, s] else "slider" if slider[b, s] else "unknown" for s in range(d.shape[2])]
        for b in range(d.shape[1])
    ]
    return TokenClasses(labels=labels, distance=d, period=torch.where(orbit, period, torch.zeros_like(period)), rho=rho, tau=tau)
