"""Streaming analyses: fixed-point, attention-stabilisation and lens summaries computed online
from hooks, keeping only the previous iteration's tensors and per-iteration scalars, so memory does
not grow with the activations of every iteration (a full cache at T = 128 does).

The results are the same objects the cache-based functions return (`StepSizes`,
`AttentionStability`), and equal to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from loop_lens.analysis import _checks
from loop_lens.analysis import attention as att
from loop_lens.analysis._types import LoopedModel, Mask
from loop_lens.analysis.fixed_points import StepSizes, step_metrics
from loop_lens.analysis.lens import Lens, block_lens
from loop_lens.analysis.result import Result, long_frame
from loop_lens.checks import single_loop
from loop_lens.model.names import parse_hook_name


class _Steps:
    """Running step sizes of one hook kind over (iteration, layer), kept on `device`."""

    def __init__(self, T: int, L: int, B: int, S: int, mask: Optional[Tensor], device: torch.device,
                 measure: Any = None, kind: str = ""):
        def nans(*shape: int) -> Tensor:
            return torch.full(shape, float("nan"), device=device)

        self.norm, self.relative, self.cosine = nans(T, L, B), nans(T, L, B), nans(T, L, B)
        self.per_token, self.per_token_cos = nans(T, L, B, S), nans(T, L, B, S)
        self.prev: dict[int, Tensor] = {}
        self.mask = mask
        self.measure, self.kind = measure, kind  # the model's measured_state, and the hook kind it reads

    def update(self, t: int, layer: int, x: Tensor) -> None:
        """Record the step from the previous iteration's `x` at this layer."""
        x = x.detach().float()
        if self.measure is not None:
            x = self.measure(x, self.kind)
        if self.mask is not None:
            x = x * self.mask[:, :, None].float()
        prev = self.prev.get(layer)
        if prev is not None and t > 0:
            metrics = step_metrics(x, prev)
            for out, m in zip((self.norm, self.relative, self.cosine, self.per_token, self.per_token_cos), metrics):
                out[t, layer] = m
        self.prev[layer] = x

    def result(self) -> StepSizes:
        """The steps as the cache-based `step_sizes` returns them."""
        return StepSizes(norm=self.norm, relative=self.relative, cosine=self.cosine, per_token=self.per_token,
                         per_token_cosine=self.per_token_cos)


ATTENTION_COLUMNS = ("change_frobenius", "change_js", "concentration", "sink", "mixing")


@dataclass(kw_only=True)
class StreamingResult(Result):
    """What `stream_analyses` measured; the parts that were not asked for are None."""

    steps: Optional[StepSizes]
    attention: Optional[att.AttentionStability]
    lens_top1: Optional[Int[Tensor, "T L B P"]]  # token ids at the lens positions
    lens_top1_prob: Optional[Float[Tensor, "T L B P"]]
    lens_entropy: Optional[Float[Tensor, "T L B P"]]  # nats
    lens_positions: Sequence[int]  # non-negative positions, in the order asked for
    lens: Optional[str]  # the lens's name

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, layer, batch item): the steps (`step`, `relative_step`,
        `cosine`), the attention metrics as means over heads with the layer input's `resid_step`,
        and at each lens position p the columns `top1_at_p`, `top1_prob_at_p`, `entropy_at_p`."""
        dims = ["iteration", "layer", "batch"]
        columns: dict[str, Tensor] = {}
        if self.steps is not None:
            columns.update(step=self.steps.norm, relative_step=self.steps.relative, cosine=self.steps.cosine)
        if self.attention is not None:
            columns.update({name: getattr(self.attention, name).mean(-1) for name in ATTENTION_COLUMNS})
            columns["resid_step"] = self.attention.resid_step
        if self.lens_top1 is not None:
            for i, p in enumerate(self.lens_positions):
                columns[f"top1_at_{p}"] = self.lens_top1[..., i]
                columns[f"top1_prob_at_{p}"] = self.lens_top1_prob[..., i]
                columns[f"entropy_at_{p}"] = self.lens_entropy[..., i]
        first, *rest = columns
        frame = long_frame(columns[first], dims, first)
        for name in rest:
            values = columns[name].detach().cpu()
            frame[name] = (values.float() if values.is_floating_point() else values).reshape(-1).numpy()
        return frame

    def plot(self, value: str = "relative_step", log: bool = False):
        """One line per layer across iterations (batch mean) of a `to_frame()` column."""
        import plotly.express as px

        frame = self.to_frame()
        if value not in frame.columns or value in ("iteration", "layer", "batch"):
            raise ValueError(f"value must be one of the measured columns {list(frame.columns[3:])}, got {value!r}")
        frame = frame.groupby(["iteration", "layer"], as_index=False)[value].mean()
        return px.line(frame, x="iteration", y=value, color="layer", markers=True, log_y=log, title=f"{value} by iteration (streamed)")


def stream_analyses(
    model: LoopedModel,
    tokens: Int[Tensor, "B S"],
    n_loops: Optional[int] = None,
    attention_mask: Optional[Mask] = None,
    fixed_point: bool = True,
    attention: bool = True,
    lens_positions: Optional[Sequence[int]] = (-1,),
    lens: Union[str, Lens] = "logit",
    **run_kwargs: Any,
) -> StreamingResult:
    """One forward pass with hooks that reduce as they go.

    - `fixed_point`: step sizes of every block layer's output (as `step_sizes(cache)`).
    - `attention`: pattern change, concentration, sink, mixing, head types and the layer-input
      step (as `attention_stability(model, cache, tokens)`).
    - `lens_positions`: the lens's (`"logit"`, `"coda"` or a `Lens`) top-1 token, its
      probability and the entropy at these positions for every (iteration, layer); None to skip.
    """
    single_loop(model, "stream_analyses")
    cfg = model.cfg
    T = _checks.loop_count(n_loops, cfg.default_loops)
    if not (fixed_point or attention or lens_positions is not None):
        raise ValueError("nothing to measure: fixed_point and attention are False and lens_positions is None")
    if not isinstance(tokens, Tensor) or tokens.ndim not in (1, 2):
        raise ValueError(f"tokens must be a tensor [batch, pos] or [pos], got {getattr(tokens, 'shape', type(tokens).__name__)}")
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    B, S = tokens.shape
    _checks.not_empty(B, S, "tokens")
    device = model.device
    tokens = _checks.token_ids(tokens, "tokens", B, S, cfg.d_vocab, device, holder="tokens")
    attention_mask = _checks.mask_for(attention_mask, B, S, device, "attention_mask", holder="tokens")
    mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
    reader = None
    if lens_positions is not None:
        reader = block_lens(model, lens)
        pos = [_checks.index(p, "lens_positions entry", S, "positions") for p in lens_positions]
    L, H = cfg.n_block, cfg.n_heads
    hooks = []

    def locate(name: str) -> tuple[int, int]:
        parts = parse_hook_name(name)
        return parts.iteration, parts.layer

    def in_loop(suffix: str):
        return lambda name: name.startswith("iter.") and name.endswith(suffix)

    out_steps = _Steps(T, L, B, S, mask, device, model.measured_state, "hook_resid_post") if fixed_point else None
    if fixed_point:
        hooks.append((in_loop("hook_resid_post"), lambda x, hook: out_steps.update(*locate(hook.name), x)))
    if attention:
        in_steps = _Steps(T, L, B, S, mask, device, model.measured_state, "hook_resid_pre")
        buf = {k: torch.full((T, L, B, H), float("nan"), device=device) for k in ATTENTION_COLUMNS}
        types = {k: torch.full((T, L, B, H), float("nan"), device=device) for k in att.HEAD_TYPES}
        prev_pattern: dict[int, Tensor] = {}
        detection = att.detection_patterns(tokens)

        def on_pattern(a: Tensor, hook) -> None:
            t, layer = locate(hook.name)
            a = a.detach().float()
            if t > 0 and layer in prev_pattern:
                p = prev_pattern[layer]
                buf["change_frobenius"][t, layer] = att.pattern_change(a, p, mask)
                buf["change_js"][t, layer] = att.js_divergence_rows(a, p, mask)
            buf["concentration"][t, layer] = att.colsum_concentration(a, mask)
            buf["sink"][t, layer] = att.sink_score(a, 0, mask)
            buf["mixing"][t, layer] = att.mixing_score(a, mask)
            for kind, v in att.scores_against(a, detection).items():
                types[kind][t, layer] = v
            prev_pattern[layer] = a

        hooks.append((in_loop("attn.hook_pattern"), on_pattern))
        hooks.append((in_loop("hook_resid_pre"), lambda x, hook: in_steps.update(*locate(hook.name), x)))
    if reader is not None:
        top1 = torch.zeros(T, L, B, len(pos), dtype=torch.long, device=device)
        top1_prob = torch.zeros(T, L, B, len(pos), device=device)
        entropy = torch.zeros(T, L, B, len(pos), device=device)

        def on_lens(x: Tensor, hook) -> None:
            t, layer = locate(hook.name)
            with torch.no_grad():
                if reader.pointwise:  # read only the positions asked for
                    logits = reader(x[:, pos], hook.name, attention_mask)
                else:
                    logits = reader(x, hook.name, attention_mask)[:, pos]
                logp = F.log_softmax(logits.float(), -1)  # [B, P, V]
                top = logp.max(-1)
                top1[t, layer] = top.indices
                top1_prob[t, layer] = top.values.exp()
                entropy[t, layer] = -(logp.exp() * logp).sum(-1)

        hooks.append((in_loop("hook_resid_post"), on_lens))
    with torch.no_grad():
        model.run_with_hooks(tokens, n_loops=T, attention_mask=attention_mask, fwd_hooks=hooks, return_type=None, **run_kwargs)
    stability = None
    if attention:
        stability = att.AttentionStability(
            change_frobenius=buf["change_frobenius"], change_js=buf["change_js"], concentration=buf["concentration"],
            sink=buf["sink"], mixing=buf["mixing"], head_types=types, resid_step=in_steps.result().norm,
            kappa=att._kappa(model), d_head=cfg.d_head,
        )
    return StreamingResult(
        steps=out_steps.result() if out_steps else None,
        attention=stability,
        lens_top1=None if reader is None else top1,
        lens_top1_prob=None if reader is None else top1_prob,
        lens_entropy=None if reader is None else entropy,
        lens_positions=() if reader is None else pos,
        lens=None if reader is None else reader.name,
    )
