"""Streaming analyses: fixed-point, attention-stabilisation and logit-lens summaries computed
online from hooks, keeping only the previous iteration's tensors and per-iteration scalars, so
memory does not grow with the activations of every iteration (a full cache at T = 128 does).

The results are the same objects the cache-based functions return (`StepSizes`,
`AttentionStability`), and equal to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from loop_lens.analysis import attention as att
from loop_lens.analysis.fixed_points import StepSizes, step_metrics
from loop_lens.model.hooks import NO_HOOKS
from loop_lens.model.names import parse_hook_name


class _Steps:
    """Running step sizes of one hook kind over (iteration, layer)."""

    def __init__(self, T: int, L: int, B: int, S: int, mask: Optional[Tensor]):
        nan = float("nan")
        self.norm = torch.full((T, L, B), nan)
        self.relative = torch.full((T, L, B), nan)
        self.cosine = torch.full((T, L, B), nan)
        self.per_token = torch.full((T, L, B, S), nan)
        self.per_token_cos = torch.full((T, L, B, S), nan)
        self.prev: dict[int, Tensor] = {}
        self.mask = mask

    def update(self, t: int, l: int, x: Tensor) -> None:
        x = x.detach().float()
        if self.mask is not None:
            x = x * self.mask.to(x.device)[:, :, None].float()
        prev = self.prev.get(l)
        if prev is not None and t > 0:
            metrics = step_metrics(x, prev)
            for out, m in zip((self.norm, self.relative, self.cosine, self.per_token, self.per_token_cos), metrics):
                out[t, l] = m.cpu()
        self.prev[l] = x

    def result(self) -> StepSizes:
        return StepSizes(self.norm, self.relative, self.cosine, self.per_token, self.per_token_cos)


@dataclass
class StreamingResult:
    """What `stream_analyses` measured; fields are None for parts that were not asked for."""

    steps: Optional[StepSizes]
    attention: Optional[att.AttentionStability]
    lens_top1: Optional[Tensor]  # [T, L, B, P] token ids at the lens positions
    lens_top1_prob: Optional[Tensor]  # [T, L, B, P]
    lens_entropy: Optional[Tensor]  # [T, L, B, P]
    lens_positions: Sequence[int]


def stream_analyses(
    model,
    tokens: Tensor,
    n_loops: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
    fixed_point: bool = True,
    attention: bool = True,
    lens_positions: Optional[Sequence[int]] = (-1,),
    **run_kwargs,
) -> StreamingResult:
    """One forward pass with hooks that reduce as they go.

    - `fixed_point`: step sizes of every block layer's output (as `step_sizes(cache)`).
    - `attention`: pattern change, concentration, sink, mixing, head types and the layer-input
      step (as `attention_stability(model, cache, tokens)`).
    - `lens_positions`: logit-lens top-1 token, its probability and the entropy at these
      positions for every (iteration, layer); None to skip.
    """
    cfg = model.cfg
    T = n_loops or cfg.default_loops
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    B, S = tokens.shape
    L, H = cfg.n_block, cfg.n_heads
    mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
    model.ensure_loops(T)
    hooks = []

    def locate(name: str) -> tuple[int, int]:
        parts = parse_hook_name(name)
        return parts.iteration, parts.layer

    out_steps = _Steps(T, L, B, S, mask) if fixed_point else None
    if fixed_point:
        hooks.append((lambda n: n.startswith("iter.") and n.endswith("hook_resid_post"),
                      lambda x, hook: out_steps.update(*locate(hook.name), x)))
    if attention:
        in_steps = _Steps(T, L, B, S, mask)
        nan = float("nan")
        buf = {k: torch.full((T, L, B, H), nan) for k in ("change", "js", "conc", "sink", "mix")}
        types = {k: torch.full((T, L, B, H), nan) for k in att.HEAD_TYPES}
        prev_pattern: dict[int, Tensor] = {}
        qmask = None

        def on_pattern(a: Tensor, hook) -> None:
            nonlocal qmask
            t, l = locate(hook.name)
            a = a.detach().float()
            if t > 0 and l in prev_pattern:
                p = prev_pattern[l]
                buf["change"][t, l] = att.pattern_change(a, p, mask).cpu()
                buf["js"][t, l] = att.js_divergence_rows(a, p, mask).cpu()
            buf["conc"][t, l] = att.colsum_concentration(a, mask).cpu()
            buf["sink"][t, l] = att.sink_score(a, 0, mask).cpu()
            buf["mix"][t, l] = att.mixing_score(a, mask).cpu()
            for kind, v in att.head_type_scores(a, tokens).items():
                types[kind][t, l] = v.cpu()
            prev_pattern[l] = a

        hooks.append((lambda n: n.startswith("iter.") and n.endswith("attn.hook_pattern"), on_pattern))
        hooks.append((lambda n: n.startswith("iter.") and n.endswith("hook_resid_pre"),
                      lambda x, hook: in_steps.update(*locate(hook.name), x)))
    lens = None
    if lens_positions is not None:
        pos = [p if p >= 0 else S + p for p in lens_positions]
        lens = {k: torch.zeros(T, L, B, len(pos)) for k in ("prob", "ent")}
        lens["top"] = torch.zeros(T, L, B, len(pos), dtype=torch.long)

        def on_lens(x: Tensor, hook) -> None:
            t, l = locate(hook.name)
            with torch.no_grad():
                logp = F.log_softmax(model.unembed(model.ln_final(x[:, pos], NO_HOOKS)).float(), -1)  # [B, P, V]
                top = logp.max(-1)
                lens["top"][t, l] = top.indices.cpu()
                lens["prob"][t, l] = top.values.exp().cpu()
                lens["ent"][t, l] = -(logp.exp() * logp).sum(-1).cpu()

        hooks.append((lambda n: n.startswith("iter.") and n.endswith("hook_resid_post"), on_lens))
    with torch.no_grad():
        model.run_with_hooks(tokens, n_loops=T, attention_mask=attention_mask, fwd_hooks=hooks, return_type=None, **run_kwargs)
    stability = None
    if attention:
        stability = att.AttentionStability(
            change_frobenius=buf["change"], change_js=buf["js"], concentration=buf["conc"], sink=buf["sink"],
            mixing=buf["mix"], head_types=types, resid_step=in_steps.result().norm, kappa=att._kappa(model),
            d_head=cfg.d_head,
        )
    return StreamingResult(
        steps=out_steps.result() if out_steps else None,
        attention=stability,
        lens_top1=lens["top"] if lens else None,
        lens_top1_prob=lens["prob"] if lens else None,
        lens_entropy=lens["ent"] if lens else None,
        lens_positions=lens_positions or (),
    )
