"""Halting (Ouro's exit gate): the exit distribution per token and the gate logit's direct
attribution onto the components that write the state it reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from loop_lens.checks import check_n_loops, integer, positive_int, single_loop
from loop_lens.patching.common import _cache, _tokens
from loop_lens.result import Result


@dataclass(kw_only=True)
class ExitDistribution(Result):
    """Ouro's exit distribution per token: `p[t]` = the probability of exiting at iteration t."""

    p: Float[Tensor, "T B S"]
    expected_step: Float[Tensor, "B S"]  # sum_t t p_t (iterations from 0)
    entropy: Float[Tensor, "B S"]  # nats
    crossing: Int[Tensor, "B S"]  # first t whose cumulative probability reaches `threshold` (T - 1 if none)
    threshold: float

    def to_frame(self) -> pd.DataFrame:
        """One row per (batch, position): expected exit step, entropy, threshold-crossing iteration."""
        B, S = self.expected_step.shape
        return pd.DataFrame({
            "batch": [b for b in range(B) for _ in range(S)], "position": [s for _ in range(B) for s in range(S)],
            "expected_step": self.expected_step.flatten().tolist(), "entropy": self.entropy.flatten().tolist(),
            "crossing": self.crossing.flatten().tolist(),
        })

    def plot(self, batch: int = 0, **kwargs: Any):
        """Heatmap of p over (iteration, position) for one prompt."""
        import plotly.graph_objects as go

        b = integer(batch, "batch")
        if not 0 <= b < self.p.shape[1]:
            raise ValueError(f"batch={b} is out of range for {self.p.shape[1]} prompts")
        fig = go.Figure(go.Heatmap(z=self.p[:, b].cpu().numpy(), colorscale="Blues", zmin=0, zmax=1))
        fig.update_layout(title="exit distribution p_t", xaxis_title="position", yaxis_title="iteration", **kwargs)
        return fig


def exit_distribution(
    model: Any, tokens: Any, n_loops: Optional[int] = None, threshold: Optional[float] = None
) -> ExitDistribution:
    """The exit gate's distribution over iterations per token (models with an exit gate), its
    expected exit step, entropy and the iteration where the cumulative probability reaches
    `threshold` (default: the model's `early_exit_threshold`)."""
    single_loop(model, "exit_distribution")
    if model.exit_gate is None:
        raise ValueError("exit_distribution needs a model with an exit gate (Ouro); this model has none")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    thr = float(model.cfg.early_exit_threshold if threshold is None else threshold)
    if not 0 < thr <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {thr}")
    toks = _tokens(model, tokens, "tokens")
    names = [f"iter.{t}.hook_exit_logit" for t in range(T)]
    _, acts = _cache(model, toks, names, n_loops=T)
    p = model.exit_distribution(torch.stack([acts[n] for n in names]))
    steps = torch.arange(T, device=p.device, dtype=p.dtype).view(-1, 1, 1)
    reached = torch.cumsum(p, dim=0) >= thr
    crossing = torch.where(reached.any(0), reached.float().argmax(0), T - 1)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(0)
    return ExitDistribution(p=p, expected_step=(steps * p).sum(0), entropy=entropy, crossing=crossing, threshold=thr)


@dataclass(kw_only=True)
class GateAttribution(Result):
    """The exit gate's logit at each iteration split over what wrote the state it reads: the state
    entering the iteration (after any injection), each head's and each MLP's output in that
    iteration, and the constant terms; `values.sum(1) + bias == gate` (direct attribution, with
    every norm's scale frozen at its value in the run)."""

    values: Float[Tensor, "T C B S"]
    labels: list[str]  # the C components
    bias: Float[Tensor, "T B S"]  # gate bias plus the norms' and projections' constant terms
    gate: Float[Tensor, "T B S"]  # the gate logit of the run

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, component, batch, position): the component's share of the logit."""
        T, C, B, S = self.values.shape
        v = self.values.detach().cpu().float()
        rows = [(t, self.labels[c], b, s, float(v[t, c, b, s])) for t in range(T) for c in range(C) for b in range(B) for s in range(S)]
        return pd.DataFrame(rows, columns=["iteration", "component", "batch", "position", "gate_logit"])

    def top(self, k: int = 10, position: int = -1) -> pd.DataFrame:
        """The `k` (iteration, component) pairs with the largest mean |share| at `position`."""
        k = positive_int(k, "k")
        S = self.values.shape[-1]
        p = integer(position, "position")
        if not -S <= p < S:
            raise ValueError(f"position={p} is out of range for {S} positions")
        mean = self.values[..., p % S].mean(-1)  # [T, C]
        order = mean.abs().flatten().argsort(descending=True)[:k]
        C = mean.shape[1]
        return pd.DataFrame([(int(i) // C, self.labels[int(i) % C], float(mean.flatten()[i])) for i in order],
                            columns=["iteration", "component", "gate_logit"])

    def plot(self, position: int = -1, **kwargs: Any):
        """Heatmap over (iteration, component) of the mean share at one position."""
        import plotly.graph_objects as go

        S = self.values.shape[-1]
        p = integer(position, "position")
        if not -S <= p < S:
            raise ValueError(f"position={p} is out of range for {S} positions")
        z = self.values[..., p % S].mean(-1).detach().cpu().float().numpy()
        fig = go.Figure(go.Heatmap(z=z, x=self.labels, y=[f"t{t}" for t in range(z.shape[0])], colorscale="RdBu", zmid=0))
        fig.update_layout(title="exit-gate logit by component", xaxis_title="component", yaxis_title="iteration", **kwargs)
        return fig


def _frozen_norm(norm: Any, x: Tensor, scale: Tensor) -> Tensor:
    """The linear part of a norm with its scale frozen: `w * center(x) / scale` (no bias)."""
    xf = x.float()
    if norm.kind == "LN":
        xf = xf - xf.mean(-1, keepdim=True)
    return xf / scale.float() * norm.weight.float()


def gate_attribution(model: Any, tokens: Any, n_loops: Optional[int] = None) -> GateAttribution:
    """Direct attribution of the exit gate's logit at each iteration onto the components that write
    the state it reads ("which heads drive halting"). Models with an exit gate whose layers add
    their outputs to the residual stream (`norm_placement` "pre" or "sandwich", as Ouro)."""
    single_loop(model, "gate_attribution")
    cfg = model.cfg
    if model.exit_gate is None:
        raise ValueError("gate_attribution needs a model with an exit gate (Ouro); this model has none")
    if cfg.norm_placement not in ("pre", "sandwich"):
        raise ValueError(f"gate_attribution needs layers whose outputs add to the residual stream (norm_placement 'pre' or "
                         f"'sandwich'); this model has {cfg.norm_placement!r}")
    T = check_n_loops(n_loops, cfg.default_loops)
    toks = _tokens(model, tokens, "tokens")
    entry = "hook_injected" if cfg.injection != "none" else "hook_state_pre"
    names = []
    for t in range(T):
        names += [f"iter.{t}.{entry}", f"iter.{t}.hook_exit_logit"] + ([f"iter.{t}.ln_state.hook_scale"] if cfg.iter_norm else [])
        for l in range(cfg.n_block):
            names += [f"iter.{t}.blocks.{l}.attn.hook_z", f"iter.{t}.blocks.{l}.hook_mlp_out"]
            if cfg.norm_placement == "sandwich":
                names.append(f"iter.{t}.blocks.{l}.ln1_post.hook_scale")
    _, acts = _cache(model, toks, names, n_loops=T)
    g_w, g_b = model.exit_gate.weight[0].float(), model.exit_gate.bias.float() if model.exit_gate.bias is not None else 0.0
    labels = ["state in"] + [f"L{l}{part}" for l in range(cfg.n_block) for part in [f"H{h}" for h in range(cfg.n_heads)] + [" attn const", " mlp"]]
    values, biases = [], []
    with torch.no_grad():
        for t in range(T):
            if cfg.iter_norm:
                scale = acts[f"iter.{t}.ln_state.hook_scale"]
                read = lambda c, scale=scale: _frozen_norm(model.ln_final, c, scale) @ g_w  # noqa: E731
                const = (model.ln_final.bias.float() @ g_w if model.ln_final.bias is not None else 0.0) + g_b
            else:
                read = lambda c: c.float() @ g_w  # noqa: E731
                const = g_b
            parts = [read(acts[f"iter.{t}.{entry}"])]
            bias = torch.zeros_like(parts[0]) + const
            for l, blk in enumerate(model.blocks):
                z = acts[f"iter.{t}.blocks.{l}.attn.hook_z"]  # [B, S, H, hd]
                per_head = torch.einsum("bshd,hdm->bshm", z.float(), blk.attn.W_O.float())  # [B, S, H, D]
                o_bias = blk.attn.o_proj.bias.float() if blk.attn.o_proj.bias is not None else torch.zeros_like(per_head[0, 0, 0])
                if cfg.norm_placement == "sandwich":
                    post = blk.ln1_post
                    s1 = acts[f"iter.{t}.blocks.{l}.ln1_post.hook_scale"][:, :, None]  # [B, S, 1, 1]
                    heads = _frozen_norm(post, per_head, s1)
                    attn_const = _frozen_norm(post, o_bias.expand_as(per_head[:, :, 0]), s1[:, :, 0])
                    if post.bias is not None:
                        attn_const = attn_const + post.bias.float()
                else:
                    heads, attn_const = per_head, o_bias.expand_as(per_head[:, :, 0])
                parts += [read(heads[:, :, h]) for h in range(cfg.n_heads)]
                parts += [read(attn_const), read(acts[f"iter.{t}.blocks.{l}.hook_mlp_out"])]
            values.append(torch.stack(parts))
            biases.append(bias)
    gate = torch.stack([acts[f"iter.{t}.hook_exit_logit"] for t in range(T)])
    return GateAttribution(values=torch.stack(values), labels=labels, bias=torch.stack(biases), gate=gate)
