"""Attention-head stabilisation across iterations (the paper's section 5).

Patterns A are [..., query, key], rows are queries and sum to one (causal). n is the number of
(real) positions. Iterations count from 0; changes at t compare with t - 1 and are NaN at t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from loop_lens.analysis import _checks
from loop_lens.analysis._types import LoopedModel, Mask
from loop_lens.analysis.fixed_points import step_sizes
from loop_lens.analysis.result import Result, first_stable, long_frame
from loop_lens.cache import LoopCache

EPS = 1e-12
HEAD_TYPES = ("previous_token", "induction", "first_token", "diagonal")


def _pattern_mask(pattern: Tensor, mask: Optional[Mask]) -> Optional[Tensor]:
    """`mask` [B, S] checked against the shape of a pattern [..., B, H, S, S], on its device (the
    analyses check the mask's values once, before calling these)."""
    if mask is None:
        return None
    if pattern.ndim < 4:
        raise ValueError(f"a mask needs patterns [..., batch, head, query, key], got shape {list(pattern.shape)}")
    _checks.mask_shape(mask, pattern.shape[-4], pattern.shape[-1], holder="the pattern")
    return mask.to(pattern.device)


def _n(pattern: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Real positions per pattern, [...] (the pattern's leading dims)."""
    if mask is None:
        return torch.full(pattern.shape[:-2], pattern.shape[-1], dtype=pattern.dtype, device=pattern.device)
    n = mask.sum(-1).to(pattern.dtype)  # [B]; patterns are [..., B, H, q, k]
    return n.view(-1, 1).expand(pattern.shape[:-2])


def _query_mask(pattern: Tensor, mask: Optional[Tensor]) -> Tensor:
    """[..., q, 1] weights: 1 for real query rows. `mask` is [B, S]; with a mask, patterns are
    [..., B, H, q, k]."""
    if mask is None:
        return torch.ones(*pattern.shape[:-1], 1, dtype=pattern.dtype, device=pattern.device)
    m = mask.to(pattern.dtype)[:, None, :, None]  # [B, 1, q, 1]
    return m.expand(*pattern.shape[:-1], 1)


def colsum_concentration(pattern: Float[Tensor, "*lead q k"], mask: Optional[Mask] = None) -> Float[Tensor, "*lead"]:
    """`C = 1 + (1/log n) sum_j chat_j log chat_j` with `chat_j = (sum_i A_ij) / n`: 0 when every
    key receives the same total attention, 1 when one key receives all of it."""
    mask = _pattern_mask(pattern, mask)
    p = pattern.float() * _query_mask(pattern.float(), mask)
    n = _n(p, mask)
    chat = p.sum(-2) / n[..., None]  # [..., k]
    plogp = torch.where(chat > 0, chat * torch.log(chat.clamp_min(EPS)), torch.zeros_like(chat))
    return 1 + plogp.sum(-1) / torch.log(n.clamp_min(2))


def sink_score(pattern: Float[Tensor, "*lead q k"], key: int = 0, mask: Optional[Mask] = None) -> Float[Tensor, "*lead"]:
    """`(1/n) sum_i A_ik`: the average attention every query pays to key `key` (0 = first token)."""
    key = _checks.index(key, "key", pattern.shape[-1], "key positions")
    mask = _pattern_mask(pattern, mask)
    p = pattern.float() * _query_mask(pattern.float(), mask)
    return p[..., key].sum(-1) / _n(p, mask)


def mixing_score(pattern: Float[Tensor, "*lead q k"], mask: Optional[Mask] = None) -> Float[Tensor, "*lead"]:
    """Mean row entropy `(1/n) sum_i H(A_i,:)` in nats."""
    mask = _pattern_mask(pattern, mask)
    p = pattern.float()
    h = -torch.where(p > 0, p * torch.log(p.clamp_min(EPS)), torch.zeros_like(p)).sum(-1, keepdim=True)
    return (h * _query_mask(p, mask)).sum((-2, -1)) / _n(p, mask)


def js_divergence_rows(p: Float[Tensor, "*lead q k"], q: Float[Tensor, "*lead q k"], mask: Optional[Mask] = None) -> Float[Tensor, "*lead"]:
    """Jensen-Shannon divergence between matching rows of two patterns (nats), averaged over rows."""
    if p.shape != q.shape:
        raise ValueError(f"the two patterns differ in shape: {list(p.shape)} vs {list(q.shape)}")
    mask = _pattern_mask(p, mask)
    p, q = p.float(), q.float()
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log(a.clamp_min(EPS)) - torch.log(b.clamp_min(EPS))), torch.zeros_like(a)).sum(-1, keepdim=True)

    js = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    return (js * _query_mask(p, mask)).sum((-2, -1)) / _n(p, mask)


def pattern_change(a: Float[Tensor, "*lead q k"], prev: Float[Tensor, "*lead q k"], mask: Optional[Mask] = None) -> Float[Tensor, "*lead"]:
    """`||A - A_prev||_F` over the real query rows."""
    mask = _pattern_mask(a, mask)
    return ((a.float() - prev.float()) * _query_mask(a.float(), mask)).flatten(-2).norm(dim=-1)


def detection_patterns(tokens: Int[Tensor, "B S"]) -> dict[str, Float[Tensor, "B S S"]]:
    """Target patterns [B, query, key] per head type, on the tokens' device. Previous-token and
    induction follow TransformerLens's head detector: previous-token `D[i, i-1] = 1`; induction
    `D[i, j] = 1` for `1 <= j <= i` where the token before key j is the query's token,
    `tokens[j-1] == tokens[i]`. First-token `D[:, 0] = 1`; diagonal `D = I`."""
    B, S = tokens.shape
    pos = torch.arange(S, device=tokens.device)
    query, key = pos[:, None], pos[None, :]
    induction = torch.zeros(B, S, S, dtype=torch.bool, device=tokens.device)
    induction[:, :, 1:] = (tokens[:, :, None] == tokens[:, None, :-1]) & (key[:, :-1] < query)
    fixed = {"previous_token": key == query - 1, "first_token": (key == 0).expand(S, S), "diagonal": key == query}
    out = {kind: d.float().expand(B, S, S) for kind, d in fixed.items()}
    out["induction"] = induction.float()
    return {kind: out[kind] for kind in HEAD_TYPES}


def head_type_scores(pattern: Float[Tensor, "*lead B H q k"], tokens: Int[Tensor, "B S"]) -> dict[str, Float[Tensor, "*lead B H"]]:
    """TransformerLens's "mul" head-detector score, `sum(A * D) / sum(A)`, for each head type,
    computed for all heads at once; each batch item gets its own detection pattern."""
    if pattern.ndim < 4:
        raise ValueError(f"pattern must be [..., batch, head, query, key], got shape {list(pattern.shape)}")
    B, S = pattern.shape[-4], pattern.shape[-1]
    tokens = _checks.token_ids(tokens, "tokens", B, S, None, pattern.device, holder="the pattern")
    return scores_against(pattern, detection_patterns(tokens))


def scores_against(pattern: Float[Tensor, "*lead B H q k"], patterns: dict[str, Float[Tensor, "B q k"]]) -> dict[str, Float[Tensor, "*lead B H"]]:
    """`sum(A * D) / sum(A)` for each detection pattern D of `detection_patterns` (made once, used
    for every iteration)."""
    p = pattern.float()
    return {kind: (p * d[:, None]).sum((-2, -1)) / p.sum((-2, -1)).clamp_min(EPS) for kind, d in patterns.items()}


@dataclass(kw_only=True)
class AttentionStability(Result):
    """Per (iteration, block layer, batch item, head) attention metrics, with the residual step size
    of the same layer side by side."""

    change_frobenius: Float[Tensor, "T L B H"]
    change_js: Float[Tensor, "T L B H"]
    concentration: Float[Tensor, "T L B H"]
    sink: Float[Tensor, "T L B H"]
    mixing: Float[Tensor, "T L B H"]
    head_types: dict[str, Float[Tensor, "T L B H"]]  # one score tensor per kind in HEAD_TYPES
    resid_step: Float[Tensor, "T L B"]  # ||X_{l,t} - X_{l,t-1}|| of the layer's input
    kappa: Float[Tensor, "L H"]  # ||W_Q W_K^T||_2 per head (the paper's bound constant)
    d_head: int

    def stabilisation_iteration(self, tol: float = 1e-2) -> Int[Tensor, "L B H"]:
        """First iteration after which the Frobenius pattern change stays below `tol` (-1: never)."""
        return first_stable(self.change_frobenius, tol)

    def sink_rate(self, threshold: float = 0.3) -> Float[Tensor, "T L"]:
        """Fraction of heads (and batch items) whose first-token sink score is >= threshold."""
        return (self.sink >= threshold).float().mean((-2, -1))

    def bound_factor(self) -> Float[Tensor, "T L B H"]:
        """`kappa / sqrt(d_head) * ||X_t - X_{t-1}||`: the paper's bound on the pattern change, up
        to the constant B (the bound on the normed inputs), which is not estimated here."""
        return self.kappa[None, :, None, :] / math.sqrt(self.d_head) * self.resid_step[..., None]

    def head_type(self, iteration: int = -1) -> list[list[str]]:
        """[L][H]: the best-scoring head type at an iteration (batch mean)."""
        iteration = _checks.index(iteration, "iteration", self.change_frobenius.shape[0], "iterations")
        scores = torch.stack([self.head_types[k][iteration].mean(1) for k in HEAD_TYPES])  # [4, L, H]
        best = scores.argmax(0)
        return [[HEAD_TYPES[i] for i in row] for row in best.tolist()]

    def table(self, tol: float = 1e-2) -> pd.DataFrame:
        """The head-stability report: one row per (layer, head); `final_resid_step` is the layer
        input's last step ||X_{T-1} - X_{T-2}|| (batch mean), beside the pattern's last change."""
        stab = self.stabilisation_iteration(tol).float()
        stab = torch.where(stab < 0, torch.full_like(stab, float("nan")), stab).nanmedian(1).values  # [L, H]
        types = self.head_type(-1)
        L, H = self.kappa.shape
        rows = []
        for layer in range(L):
            for head in range(H):
                s = stab[layer, head].item()
                rows.append(dict(
                    layer=layer, head=head,
                    stabilisation_iteration=None if math.isnan(s) else int(s),
                    head_type=types[layer][head],
                    head_type_score=float(self.head_types[types[layer][head]][-1, layer, :, head].mean()),
                    concentration=float(self.concentration[-1, layer, :, head].mean()),
                    sink_score=float(self.sink[-1, layer, :, head].mean()),
                    mixing=float(self.mixing[-1, layer, :, head].mean()),
                    final_change=float(self.change_frobenius[-1, layer, :, head].mean()),
                    final_resid_step=float(self.resid_step[-1, layer].mean()),
                    kappa=float(self.kappa[layer, head]),
                ))
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, layer, batch, head)."""
        frame = long_frame(self.change_frobenius, ["iteration", "layer", "batch", "head"], "change_frobenius")
        for name in ("change_js", "concentration", "sink", "mixing"):
            frame[name] = getattr(self, name).reshape(-1).cpu().numpy()
        frame["resid_step"] = self.resid_step[..., None].expand_as(self.change_frobenius).reshape(-1).cpu().numpy()
        for kind, values in self.head_types.items():
            frame[f"score_{kind}"] = values.reshape(-1).cpu().numpy()
        return frame

    def plot(self, metric: str = "change_frobenius", log: bool = True):
        """One line per (layer, head) across iterations; the layer's residual step dashed beside it."""
        import plotly.graph_objects as go

        if metric not in ("change_frobenius", "change_js", "concentration", "sink", "mixing"):
            raise ValueError(f"metric must be one of change_frobenius, change_js, concentration, sink, mixing; got {metric!r}")
        values = getattr(self, metric).mean(2)  # [T, L, H]
        fig = go.Figure()
        T, L, H = values.shape
        for layer in range(L):
            for head in range(H):
                fig.add_scatter(x=list(range(T)), y=values[:, layer, head].tolist(), mode="lines", name=f"L{layer}H{head}")
            fig.add_scatter(x=list(range(T)), y=self.resid_step[:, layer].mean(-1).tolist(), mode="lines",
                            line=dict(dash="dash", color="black"), name=f"L{layer} resid step")
        fig.update_layout(title=f"{metric} by iteration", xaxis_title="iteration", yaxis_type="log" if log else "linear")
        return fig


def _kappa(model: LoopedModel) -> Float[Tensor, "L H"]:
    """Spectral norm of W_Q W_K^T for every head of the recurrent block."""
    out = []
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            wq = attn.W_Q.float()  # [H, D, hd]
            wk = attn.W_K.float().repeat_interleave(attn.n_heads // attn.n_kv, dim=0)
            # W_Q W_K^T = Q_q (R_q R_k^T) Q_k^T with orthonormal Q's: the same spectral norm from
            # d_head x d_head factors instead of d_model x d_model products (384 SVDs of 2048^2 at 1.4B)
            rq, rk = torch.linalg.qr(wq, mode="r").R, torch.linalg.qr(wk, mode="r").R
            out.append(torch.linalg.matrix_norm(rq @ rk.transpose(1, 2), ord=2))
    return torch.stack(out)


def attention_stability(
    model: LoopedModel, cache: LoopCache, tokens: Int[Tensor, "B S"], mask: Optional[Mask] = None
) -> AttentionStability:
    """All attention metrics from a cache holding `attn.hook_pattern` and `hook_resid_pre` for
    every iteration; `tokens` [B, S] (the run's input) give the head-type detection patterns."""
    cache = _checks.loop_cache(cache)
    _checks.same_model(model, cache)
    T, L = cache.n_loops, model.cfg.n_block
    first = cache["iter.0.blocks.0.attn.hook_pattern"]  # [B, H, S, S]
    B, S = first.shape[0], first.shape[-1]
    _checks.not_empty(B, S)
    tok = _checks.token_ids(tokens, "tokens", B, S, model.cfg.d_vocab, first.device)
    mask = _checks.mask_for(mask, B, S, first.device)
    # one block layer at a time, in fp32: all of them at once held T x L x B x H x S^2 fp32 values
    # and temporaries of that size (1.6 GB each for a 24-layer, 16-head model at T = 16, 256 tokens)
    per_layer: dict[str, list[Tensor]] = {k: [] for k in ("change", "js", "concentration", "sink", "mixing")}
    types: dict[str, list[Tensor]] = {}
    for layer in range(L):
        a = torch.stack([cache[f"iter.{t}.blocks.{layer}.attn.hook_pattern"] for t in range(T)]).float()  # [T, B, H, S, S]
        nan = torch.full_like(a[:1, ..., 0, 0], float("nan"))
        per_layer["change"].append(torch.cat([nan, pattern_change(a[1:], a[:-1], mask)]))
        per_layer["js"].append(torch.cat([nan, js_divergence_rows(a[1:], a[:-1], mask)]))
        per_layer["concentration"].append(colsum_concentration(a, mask))
        per_layer["sink"].append(sink_score(a, 0, mask))
        per_layer["mixing"].append(mixing_score(a, mask))
        for kind, score in head_type_scores(a, tok).items():
            types.setdefault(kind, []).append(score)
        del a
    stacked = {k: torch.stack(v, dim=1) for k, v in per_layer.items()}  # [T, L, B, H]
    steps = step_sizes(cache, "hook_resid_pre", mask)
    return AttentionStability(
        change_frobenius=stacked["change"],
        change_js=stacked["js"],
        concentration=stacked["concentration"],
        sink=stacked["sink"],
        mixing=stacked["mixing"],
        head_types={kind: torch.stack(v, dim=1) for kind, v in types.items()},
        resid_step=steps.norm,
        kappa=_kappa(model),
        d_head=model.cfg.d_head,
    )
