"""Answer flips: how the lens's top-1 token moves over the iterations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from loop_lens.analysis.lens import get_lens, vocab_labels
from loop_lens.checks import check_n_loops, single_loop
from loop_lens.patching.common import _cache, _seed, _tokens
from loop_lens.patching.sites import _positions
from loop_lens.result import Result


@dataclass(kw_only=True)
class AnswerFlips(Result):
    """Per prompt and position, how the lens's top-1 token moves over the iterations.

    `last_flip` is the last iteration whose top-1 differs from the previous iteration's (-1: it
    never changes), `flipped_from` / `flipped_to` the tokens of that change (-1 when none), and
    `holds_from` the first iteration from which the final top-1 holds."""

    top1: Int[Tensor, "T B S"]
    last_flip: Int[Tensor, "B S"]
    flipped_from: Int[Tensor, "B S"]
    flipped_to: Int[Tensor, "B S"]
    holds_from: Int[Tensor, "B S"]
    positions: list[int]
    lens: str
    str_tokens: Optional[list[str]] = field(default=None, repr=False)  # index = token id

    def token(self, token_id: int) -> str:
        """The text of a token id (the id itself without a tokenizer; "" for -1)."""
        if token_id < 0:
            return ""
        return self.str_tokens[token_id] if self.str_tokens is not None else str(token_id)

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, position): final answer, last flip, from, to, holds_from."""
        rows = []
        B = self.top1.shape[1]
        for b in range(B):
            for j, p in enumerate(self.positions):
                final = int(self.top1[-1, b, j])
                rows.append((b, p, final, self.token(final), int(self.last_flip[b, j]), self.token(int(self.flipped_from[b, j])),
                             self.token(int(self.flipped_to[b, j])), int(self.holds_from[b, j])))
        return pd.DataFrame(rows, columns=["prompt", "position", "final", "final_token", "last_flip", "flipped_from",
                                           "flipped_to", "holds_from"])

    def plot(self, **kwargs: Any):
        """Histogram of `holds_from`: how many answers are settled by each iteration."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Histogram(x=self.holds_from.flatten().tolist(), xbins=dict(size=1)))
        fig.update_layout(title=f"iteration from which the final answer holds ({self.lens} lens)",
                          xaxis_title="iteration", yaxis_title="count", **kwargs)
        return fig


def answer_flips(
    model: Any,
    tokens: Any,
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    lens: str = "coda",
    positions: Optional[Sequence[int]] = None,
) -> AnswerFlips:
    """Answer flips of the lens ("coda" or "logit", or a Lens) of the state leaving each iteration,
    for every prompt of `tokens` [batch, pos] at `positions` (default: the last)."""
    single_loop(model, "answer_flips")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    toks = _tokens(model, tokens, "tokens")
    S = toks.shape[1]
    pos = _positions([-1] if positions is None else positions, "state", S)
    reader = get_lens(model, lens)
    names = [f"iter.{t}.hook_state_post" for t in range(T)]
    _, acts = _cache(model, toks, names, n_loops=T, seed=_seed(model, seed))
    with torch.no_grad():
        top = torch.stack([reader(acts[n], n).argmax(-1)[:, pos] for n in names])  # [T, B, P]
    changed = top[1:] != top[:-1]  # [T-1, B, P]: the change into iteration t + 1
    steps = torch.arange(1, T, device=top.device).view(-1, 1, 1)
    last = torch.where(changed, steps, torch.full_like(steps, -1)).amax(0) if T > 1 else torch.full(top.shape[1:], -1, device=top.device)
    safe = last.clamp_min(1)
    before = top.gather(0, (safe - 1)[None])[0]
    after = top.gather(0, safe[None])[0]
    none = last < 0
    return AnswerFlips(top1=top, last_flip=last, flipped_from=torch.where(none, -1, before), flipped_to=torch.where(none, -1, after),
                       holds_from=last.clamp_min(0), positions=pos, lens=reader.name, str_tokens=vocab_labels(model))
