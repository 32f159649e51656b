"""HookedInkling2Transformer: Inkling 2 (`inkling2_loop`), a looped MoE whose passes talk through messages.

Layers `[0, n_prelude)` run once, the loop layers run `n_loops` times (the checkpoint's
`loop_num_passes` by default), the coda layers once. There is no single residual stream: a pass
carries a *partial sum* (what the layers since the last block boundary added) and the *block
states* (one stored state per block of `n_layers_per_attn_res_block` layers), and every
sublayer reads a learned softmax over that depth ("attention residuals"):

```
h = norm(embed(tokens)); blocks = []                       hook_embed
prelude layers (h, blocks)                                 prelude.{l}.*
pass 0: the loop layers continue from the prelude          iter.0.blocks.{l}.*
pass t > 0: restart from the prelude's (h, blocks); each loop layer l first reads 4 messages
    (query, key, value, MLP) from the previous pass's loop block states and final partial sum,
    and gates its inputs with them: (1 - tanh(W_f z)) x + tanh(W_m z) m        iter.{t}.blocks.{l}.*
coda layers continue from the last pass                    coda.{l}.*
logits = 30 tanh(unembed(norm(depth_mix(blocks, h))) / 30) final.*
```

The carry between passes is an `InklingCarry(hidden, blocks)`. Each layer: attention-input depth
mix, (messages), attention (no RoPE: a hidden-state-conditioned relative bias, log-scaled
queries in full-attention layers, attention sinks, short depthwise convolutions on K/V, L2-clipped
q/k, a sigmoid output gate), a convolution on its output, the MLP-input depth mix, a sigmoid-routed
top-k MoE of softcapped SwiGLU experts, a convolution on its output.

Everything else (argument checks, hooks by name or filter created on demand, caches,
`stop_at_layer` over the unrolled depth) is `HookedLoopedTransformer`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loop_lens.cache import LoopCache
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, HookNameError, LoadError, SaveError
from loop_lens.model import sites
from loop_lens.model.hooks import NO_HOOKS, Hooks
from loop_lens.model.looped import HookedLoopedTransformer
from loop_lens.model.names import parse_hook_name
from loop_lens.model.run import Run, StopAtLayer
from loop_lens.model.schedule import Schedule, Step
from loop_lens.model.sites import Site

FAMILY = "inkling2"
MESSAGE_INPUTS = ("q", "k", "v", "mlp")
"""The four inputs a loop layer gates with a message (the order of `hook_messages`' axis 2)."""

# The checkpoint's switches the plain loop does not read, in `cfg.extra` under their transformers names.
EXTRA_KEYS = ("vocab_size", "swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim",
              "sliding_window_size", "d_rel", "rel_extent", "log_scaling_n_floor", "log_scaling_alpha", "layer_types",
              "conv_kernel_size", "n_routed_experts", "num_experts_per_tok", "route_scale", "qk_l2_clip_threshold",
              "rel_l2_clip_threshold", "n_layers_per_attn_res_block", "mlp_gate_softcap", "mlp_up_softcap",
              "final_logit_softcapping", "loop_gate_rank")


def _ours(c: Any) -> bool:
    return getattr(c, "family", None) == FAMILY


# ---------------------------------------------------------------------- hook sites
_LAYER = [
    Site("hook_message_weights", "layer", "B S 4 N", _ours,
         "loop layers, passes >= 1: softmax over the previous pass's loop block states + final partial sum, per message"),
    Site("hook_messages", "layer", "B S 4 D", _ours, "loop layers, passes >= 1: the q / k / v / MLP messages"),
    Site("hook_attn_depth", "layer", "B S Q N", _ours,
         "attention-input depth mix: softmax over block states + partial sum (Q = 1 sliding, 3 = q/k/v full)"),
    *[Site(f"gate_{i}.hook_{g}", "layer", "B S D", _ours,
           f"loop layers, passes >= 1: {'tanh(W_f z), the forget gate' if g == 'forget' else 'tanh(W_m z), the message gate'} "
           f"on the {i} input")
      for i in MESSAGE_INPUTS for g in ("forget", "gate")],
    Site("attn.hook_rel_bias", "layer", "B H S S", _ours, "the relative position bias added to the scores"),
    Site("attn.hook_sink", "layer", "B H S", _ours, "the sink logit per query (an extra key with zero value)"),
    Site("attn.hook_sink_mass", "layer", "B H S", _ours, "attention mass on the sink (1 - the pattern's row sum)"),
    Site("hook_mlp_depth", "layer", "B S N", _ours, "MLP-input depth mix: softmax over block states + partial sum"),
    Site("mlp.hook_router_logits", "layer", "B S E", _ours, "router logits (sigmoid scores = sigmoid(logits))"),
    Site("mlp.hook_experts", "layer", "B S k", _ours, "chosen experts (int64, ascending)"),
    Site("mlp.hook_expert_weights", "layer", "B S k", _ours, "their weights (normalised scores times route_scale)"),
]
_MODEL = [
    Site("final.hook_weights", "model", "B S N", _ours, "the final depth mix's weights over block states + partial sum"),
    Site("final.hook_mixed", "model", "B S D", _ours, "the final depth mix, before the final norm"),
]
sites.register(_LAYER, before={s.path: "hook_resid_pre" for s in _LAYER[:2]})
sites.register(_MODEL)

_MESSAGE_PATHS = ("hook_message_weights", "hook_messages",
                  *(f"gate_{i}.hook_{g}" for i in MESSAGE_INPUTS for g in ("forget", "gate")))


def layer_paths(layer_idx: int, loop: bool) -> list[str]:
    """The hook paths of one Inkling layer, in firing order."""
    gates = [f"gate_{i}.hook_{g}" for i in ("q", "k", "v") for g in ("forget", "gate")]
    return [
        *(["hook_message_weights", "hook_messages"] if loop else []),
        "hook_resid_pre",
        *(["hook_attn_depth"] if layer_idx > 0 else []),
        *(gates if loop else []),
        "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rel_bias", "attn.hook_sink", "attn.hook_attn_scores",
        "attn.hook_pattern", "attn.hook_sink_mass", "attn.hook_z", "attn.hook_gate",
        "hook_attn_out", "hook_resid_mid", "hook_mlp_depth",
        *(["gate_mlp.hook_forget", "gate_mlp.hook_gate"] if loop else []),
        "mlp.hook_router_logits", "mlp.hook_experts", "mlp.hook_expert_weights", "hook_mlp_out", "hook_resid_post",
    ]


def InklingPassHooks(cfg: LoopConfig) -> Hooks:  # noqa: N802 (a container kind)
    """One pass: `iter.{t}.blocks.{l}.*` for each loop layer, then `iter.{t}.hook_state_post`
    (the pass's final partial sum)."""
    out = Hooks()
    out.place("blocks", nn.ModuleList(Hooks(layer_paths(cfg.n_prelude + l, True)) for l in range(cfg.n_block)))
    out.place("hook_state_post")
    return out


# ---------------------------------------------------------------------- components
class InklingCarry(NamedTuple):
    """What crosses between passes (and from the prelude into the loop): the partial sum since
    the last block boundary [batch, pos, d_model] and the stored block states [batch, pos, n, d_model]."""

    hidden: Tensor
    blocks: Tensor


def _rms(x: Tensor, eps: float) -> Tensor:
    """Parameterless RMS norm in fp32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """`(w * x / rms(x))` computed in fp32, cast back to the input dtype."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return (self.weight * _rms(x, self.eps)).to(x.dtype)


def softcap(x: Tensor, cap: float) -> Tensor:
    return torch.tanh(x / cap) * cap


def l2_clip(x: Tensor, threshold: float) -> Tensor:
    """Scale each head vector down to L2 norm `threshold` where it is longer (fp32)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * (threshold / (norm + 1e-6)).clamp(max=1.0)


class ScaledClip(nn.Module):
    """A learned per-head scale, the L2 clip, and (full attention) the log scaling
    `1 + alpha * log(max((position + 1) / n_floor, 1))`."""

    def __init__(self, heads: int, dim: int, threshold: float, log: Optional[tuple[float, int]]):
        super().__init__()
        self.threshold, self.log = threshold, log
        self.scale = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        out = l2_clip(x.float() * self.scale.float(), self.threshold).to(x.dtype)
        if self.log is None:
            return out
        alpha, floor = self.log
        tau = 1.0 + alpha * torch.log(((positions + 1).float() / floor).clamp(min=1.0))
        return (out.float() * tau[..., None, None]).to(x.dtype)


def _with_past(inp: Tensor, past: Optional[Tensor], kernel: int) -> Tensor:
    """[B, S, C] inputs after the `kernel - 1` earlier ones (`past`, generation's convolution
    state; zeros at the start of a sequence)."""
    if past is None:
        past = inp.new_zeros(inp.shape[0], kernel - 1, inp.shape[2])
    return torch.cat([past.to(inp.dtype), inp], dim=1)


class ShortConv(nn.Module):
    """A causal depthwise convolution over the sequence (padding zeroed first), plus the input,
    over sqrt(kernel + 1). Returns the output and the last `kernel - 1` (masked) inputs, the state
    a later call continuing the sequence takes as `past`."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel))

    def forward(self, x: Tensor, pad_mask: Optional[Tensor], dynamic_input: Optional[Tensor] = None,
                past: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        xf = x.float()
        inp = _with_past(xf if pad_mask is None else xf * pad_mask[:, :, None], past, self.kernel)
        out = F.conv1d(inp.transpose(1, 2), self.weight.float(), groups=x.shape[-1]).transpose(1, 2)
        return ((out + xf) / math.sqrt(self.kernel + 1)).to(x.dtype), inp[:, inp.shape[1] - self.kernel + 1:]


class DynamicShortConv(nn.Module):
    """A causal short convolution whose taps are static per channel plus per token (projected
    from the projection's input, shared within a head); plus the input, over sqrt(2 kernel + 1).
    `static[lag]` weights the token `lag` steps back."""

    def __init__(self, channels: int, d_in: int, heads: int, kernel: int):
        super().__init__()
        self.kernel, self.heads = kernel, heads
        self.static = nn.Parameter(torch.zeros(kernel, channels))
        self.proj = nn.Linear(d_in, heads * kernel, bias=False)

    def forward(self, x: Tensor, pad_mask: Optional[Tensor], dynamic_input: Tensor,
                past: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        B, S, C = x.shape
        K, H = self.kernel, self.heads
        taps = self.static.float().T.reshape(H, C // H, K) + self.proj(dynamic_input).float().view(B, S, H, 1, K)
        xf = x.float()
        inp = _with_past(xf if pad_mask is None else xf * pad_mask[:, :, None], past, K)
        windows = inp.transpose(1, 2).unfold(-1, K, 1).flip(-1)  # [B, C, S, K], [..., lag]
        windows = windows.transpose(1, 2).reshape(B, S, H, C // H, K)
        out = (windows * taps).sum(-1).reshape(B, S, C)
        return ((out + xf) / math.sqrt(2 * K + 1)).to(x.dtype), inp[:, inp.shape[1] - K + 1:]


def _conv(conv: nn.Module, name: str, x: Tensor, pad_mask: Optional[Tensor], kv: Any,
          dynamic_input: Optional[Tensor] = None) -> Tensor:
    """Run a short convolution; in generation, continue from the inputs the site kept last step
    (its KV view's `past_state(name)`) and keep this call's last ones (`keep_state`)."""
    out, tail = conv(x, pad_mask, dynamic_input, None if kv is None else kv.past_state(name))
    if kv is not None:
        kv.keep_state(name, tail)
    return out


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The 16 values of an FP4 (E2M1) code."""


def dequantize_experts(weight: Tensor, scale: Tensor, amax: Optional[Tensor] = None,
                       denominator: Optional[Tensor] = None, name: str = "experts") -> Tensor:
    """Quantized expert weights -> fp32 [experts, rows, columns].

    NVFP4 (`amax` given): `weight` [E, rows, columns / 2] bytes holding two E2M1 codes (the even
    element in the low nibble), `scale` [E, rows, columns / 16] one float8 scale per 16 values, and
    a per-expert factor `amax / denominator`. MXFP8: `weight` [E, rows, columns] float8 values,
    `scale` [E, rows, columns / 32] exponents, each block times `2 ** (scale - 127)`."""
    if weight.ndim != 3 or scale.ndim != 3 or scale.shape[:2] != weight.shape[:2]:
        raise LoadError(f"{name}: quantized experts need a [experts, rows, ...] weight and scale, got "
                        f"{tuple(weight.shape)} and {tuple(scale.shape)}")
    E, rows = weight.shape[:2]
    if amax is not None:
        if denominator is None:
            raise LoadError(f"{name}: NVFP4 experts have an _amax but no _outer_scale_denominator")
        columns, block = 2 * weight.shape[2], 16
        if scale.shape[2] * block != columns:
            raise LoadError(f"{name}: NVFP4 scale {tuple(scale.shape)} does not give one scale per 16 of {columns} columns")
        codes = weight.view(torch.uint8) if weight.dtype == torch.int8 else weight.to(torch.uint8)
        table = torch.tensor(E2M1, dtype=torch.float32)
        low, high = table[(codes & 0xF).long()], table[(codes >> 4).long()]
        values = torch.stack([low, high], dim=-1).reshape(E, rows, columns // block, block) * scale.float()[..., None]
        factor = (amax.float() / denominator.float()).reshape(-1)
        factor = factor.expand(E) if factor.numel() == 1 else factor
        if factor.numel() != E:
            raise LoadError(f"{name}: NVFP4 _amax / _outer_scale_denominator give {factor.numel()} factors for {E} experts")
        values = values * factor[:, None, None, None]
    else:
        columns, block = weight.shape[2], 32
        if scale.shape[2] * block != columns:
            raise LoadError(f"{name}: MXFP8 scale {tuple(scale.shape)} does not give one scale per 32 of {columns} columns")
        values = weight.float().reshape(E, rows, columns // block, block) * torch.exp2(scale.float() - 127)[..., None]
    return values.reshape(E, rows, columns)


def depth_attend(query: Tensor, blocks: Tensor, partial: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over depth: `query` [Q, D] reads the normalised [blocks..., partial] at every
    position. Returns the weights [B, S, Q, N] and the normalised stack [B, S, N, D]."""
    stacked = _rms(torch.cat([blocks, partial.unsqueeze(-2)], dim=-2), 1e-6)
    scores = torch.einsum("qd,bsnd->bsqn", query.float(), stacked) * stacked.shape[-1] ** -0.5
    return scores.softmax(-1), stacked


class MessageGate(nn.Module):
    """`(1 - tanh(W_f z)) x + tanh(W_m z) m` with `z = W_down [rms(x); rms(m)]`."""

    def __init__(self, d: int, rank: int, eps: float):
        super().__init__()
        self.eps = eps
        self.down = nn.Linear(2 * d, rank, bias=False)
        self.forget = nn.Linear(rank, d, bias=False)
        self.gain = nn.Linear(rank, d, bias=False)

    def forward(self, x: Tensor, m: Tensor, hooks: Any) -> Tensor:
        x, m = x.float(), m.float()
        z = self.down(torch.cat([_rms(x, self.eps), _rms(m, self.eps)], -1).to(self.down.weight.dtype)).float()
        f = hooks.hook_forget(torch.tanh(self.forget(z.to(self.forget.weight.dtype)).float()))
        g = hooks.hook_gate(torch.tanh(self.gain(z.to(self.gain.weight.dtype)).float()))
        return (1 - f) * x + g * m


class InklingAttention(nn.Module):
    """Sliding or full attention: relative bias, sinks, short convolutions on K/V (dynamic taps in
    full layers), L2-clipped q/k (log-scaled q and relative states in full layers), unweighted-RMS
    values, a sigmoid output gate."""

    def __init__(self, cfg: LoopConfig, x: dict, sliding: bool):
        super().__init__()
        D = cfg.d_model
        self.sliding = sliding
        self.H = x["swa_num_attention_heads"] if sliding else cfg.n_heads
        self.K = x["swa_num_key_value_heads"] if sliding else cfg.n_key_value_heads
        self.hd = x["swa_head_dim"] if sliding else cfg.d_head
        self.window = x["sliding_window_size"] if sliding else None
        self.extent = x["sliding_window_size"] if sliding else x["rel_extent"]
        self.eps = cfg.norm_eps
        self.k_threshold = x["qk_l2_clip_threshold"]
        log = None if sliding else (x["log_scaling_alpha"], x["log_scaling_n_floor"])
        kernel = x["conv_kernel_size"]
        self.q = nn.Linear(D, self.H * self.hd, bias=False)
        self.q_clip = ScaledClip(self.H, self.hd, x["qk_l2_clip_threshold"], log)
        self.k = nn.Linear(D, self.K * self.hd, bias=False)
        self.v = nn.Linear(D, self.K * self.hd, bias=False)
        conv = (lambda: ShortConv(self.K * self.hd, kernel)) if sliding else (
            lambda: DynamicShortConv(self.K * self.hd, D, self.K, kernel))
        self.k_conv, self.v_conv = conv(), conv()
        self.gate = nn.Linear(D, self.H * self.hd, bias=False)
        self.o = nn.Linear(self.H * self.hd, D, bias=False)
        self.sink = nn.Linear(D, self.H, bias=False)
        self.rel = nn.Linear(D, self.H * x["d_rel"], bias=False)
        self.rel_clip = ScaledClip(self.H, x["d_rel"], x["rel_l2_clip_threshold"], log)
        self.rel_proj = nn.Parameter(torch.zeros(x["d_rel"], self.extent))

    def forward(self, xq: Tensor, xk: Tensor, xv: Tensor, hooks: Any, positions: Tensor,
                pad_mask: Optional[Tensor], kv: Any = None) -> Tensor:
        B, S, _ = xq.shape
        dtype = xq.dtype
        new_mask = None if pad_mask is None else pad_mask[:, -S:]  # this call's positions (generation: the new ones)
        q = hooks.hook_q(self.q_clip(self.q(xq).view(B, S, self.H, self.hd), positions))
        k = _conv(self.k_conv, "k_conv", self.k(xk), new_mask, kv, xk).view(B, S, self.K, self.hd)
        k = hooks.hook_k(l2_clip(k.float(), self.k_threshold).to(dtype))
        v = _conv(self.v_conv, "v_conv", self.v(xv), new_mask, kv, xv).view(B, S, self.K, self.hd)
        v = hooks.hook_v(_rms(v, self.eps).to(dtype))
        if kv is not None:  # generation's view of the site: this call's keys after the cached ones
            k, v = (a.transpose(1, 2) for a in kv(k.transpose(1, 2), v.transpose(1, 2)))
        Sk = k.shape[1]

        dist = torch.arange(Sk - S, Sk, device=xq.device)[:, None] - torch.arange(Sk, device=xq.device)[None, :]
        rel = self.rel_clip(self.rel(xq).view(B, S, self.H, -1), positions)
        rel = (rel @ self.rel_proj.to(rel.dtype)).transpose(1, 2)  # [B, H, S, extent]
        bias = rel.gather(-1, dist.clamp(0, self.extent - 1).expand(B, self.H, S, Sk))
        bias = hooks.hook_rel_bias(bias.masked_fill((dist < 0) | (dist >= self.extent), 0.0))
        sink = hooks.hook_sink(self.sink(xq).transpose(1, 2))  # [B, H, S]

        allowed = dist >= 0
        if self.window is not None:
            allowed = allowed & (dist < self.window)
        allowed = allowed[None] if pad_mask is None else allowed[None] & pad_mask.bool()[:, None, :]
        rep = self.H // self.K
        kr, vr = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) * self.hd ** -0.5 + bias
        scores = hooks.hook_attn_scores(scores.masked_fill(~allowed[:, None], float("-inf")))
        probs = torch.cat([scores, sink[..., None]], dim=-1).float().softmax(-1)
        pattern = hooks.hook_pattern(probs[..., :-1].to(dtype))
        hooks.hook_sink_mass(probs[..., -1].to(dtype))
        z = hooks.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, vr))
        gate = hooks.hook_gate(torch.sigmoid(self.gate(xq).float()).view(B, S, self.H, self.hd))
        return self.o((z.float() * gate).to(dtype).reshape(B, S, -1))


class PackedExperts(nn.Module):
    """Quantized expert weights kept as stored (NVFP4 codes or MXFP8 values, their block scales
    and, for NVFP4, the per-expert factor amax / denominator), dequantized one expert at a time
    (`expert(e)`: fp32 [rows, columns], bit-equal to `dequantize_experts` of the whole tensor).
    The tensors are non-persistent buffers set after load (`set`)."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.shape = shape
        for name in ("weight", "scale", "factor"):
            self.register_buffer(name, None, persistent=False)

    def set(self, weight: Tensor, scale: Tensor, factor: Optional[Tensor], name: str) -> None:
        E, rows, cols = self.shape
        got = dequantize_experts(weight[:1], scale[:1], None if factor is None else factor[:1],
                                 None if factor is None else torch.ones(()), name).shape[1:]
        if weight.shape[0] != E or tuple(got) != (rows, cols):
            raise LoadError(f"{name}: packed experts give [{weight.shape[0]}, {got[0]}, {got[1]}], expected {list(self.shape)}")
        self.weight, self.scale, self.factor = weight, scale, factor

    def expert(self, e: int) -> Tensor:
        factor = None if self.factor is None else self.factor[e:e + 1]
        one = None if factor is None else torch.ones((), device=factor.device)
        return dequantize_experts(self.weight[e:e + 1], self.scale[e:e + 1], factor, one)[0]

    def extra_repr(self) -> str:
        kind = "MXFP8" if self.factor is None else "NVFP4"
        return f"{kind}, {list(self.shape)}"


class InklingMoE(nn.Module):
    """Sigmoid router with a correction bias on the choice only, top-k, weights normalised and
    times `route_scale`; softcapped SwiGLU experts summed in fp32. With `packed`, the experts
    are `PackedExperts` dequantized per expert call."""

    def __init__(self, cfg: LoopConfig, x: dict, packed: bool = False):
        super().__init__()
        E, D, M = x["n_routed_experts"], cfg.d_model, cfg.d_mlp
        self.top_k, self.scale = x["num_experts_per_tok"], x["route_scale"]
        self.gate_cap, self.up_cap = x["mlp_gate_softcap"], x["mlp_up_softcap"]
        self.router = nn.Parameter(torch.zeros(E, D))
        self.bias = nn.Parameter(torch.zeros(E), requires_grad=False)
        if packed:
            self.gate_up: Any = PackedExperts((E, 2 * M, D))
            self.down: Any = PackedExperts((E, D, M))
        else:
            self.gate_up = nn.Parameter(torch.zeros(E, 2 * M, D))  # [gate rows; up rows] per expert
            self.down = nn.Parameter(torch.zeros(E, D, M))

    def _weight(self, which: Any, e: int, dtype: torch.dtype) -> Tensor:
        return which.expert(e).to(dtype) if isinstance(which, PackedExperts) else which[e]

    def forward(self, x: Tensor, hooks: Any) -> Tensor:
        B, S, D = x.shape
        logits = hooks.hook_router_logits(F.linear(x.float(), self.router.float()))
        scores = torch.sigmoid(logits)
        chosen = torch.topk(scores + self.bias.float(), self.top_k, dim=-1).indices.sort(-1).values
        chosen = hooks.hook_experts(chosen)
        weights = scores.gather(-1, chosen)
        weights = hooks.hook_expert_weights(weights / (weights.sum(-1, keepdim=True) + 1e-20) * self.scale)
        flat, idx, w = x.reshape(-1, D), chosen.reshape(B * S, -1), weights.reshape(B * S, -1)
        out = torch.zeros(B * S, D, dtype=torch.float32, device=x.device)
        for e in idx.unique().tolist():
            tok, slot = torch.where(idx == e)
            gate, up = F.linear(flat[tok], self._weight(self.gate_up, e, x.dtype)).chunk(2, dim=-1)
            gate, up = gate.float(), up.float()
            h = (softcap(gate, self.gate_cap) * torch.sigmoid(gate) * softcap(up, self.up_cap)).to(x.dtype)
            y = F.linear(h, self._weight(self.down, e, x.dtype)) * w[tok, slot, None]
            out.index_add_(0, tok, y.float())
        return out.to(x.dtype).view(B, S, D)


class InklingLayer(nn.Module):
    """One decoder layer (prelude, loop or coda): depth mix, (message gates), attention, its
    convolution, the block bookkeeping, the MLP depth mix, (message gate), MoE, its convolution.
    Returns the new partial sum (transformers' decoder layer output)."""

    def __init__(self, cfg: LoopConfig, layer_idx: int, loop: bool, packed: bool = False):
        super().__init__()
        x = cfg.extra
        D, eps = cfg.d_model, cfg.norm_eps
        self.layer_idx, self.loop = layer_idx, loop
        self.sliding = x["layer_types"][layer_idx] == "hybrid_sliding"
        self.boundary = layer_idx % x["n_layers_per_attn_res_block"] == 0
        n_q = 1 if self.sliding else 3
        self.attn_query = nn.Parameter(torch.zeros(n_q, D)) if layer_idx > 0 else None
        self.mlp_query = nn.Parameter(torch.zeros(1, D))
        self.attn = InklingAttention(cfg, x, self.sliding)
        self.mlp = InklingMoE(cfg, x, packed)
        self.ln_in = nn.ModuleList(RMSNorm(D, eps) for _ in range(n_q))  # one (sliding) or q, k, v (full)
        self.ln_mlp = RMSNorm(D, eps)
        self.attn_conv = ShortConv(D, x["conv_kernel_size"])
        self.mlp_conv = ShortConv(D, x["conv_kernel_size"])
        if loop:
            self.message_gates = nn.ModuleList(MessageGate(D, x["loop_gate_rank"], eps) for _ in MESSAGE_INPUTS)

    def forward(self, h: Tensor, hooks: Any, rotary: Any, positions: Tensor, pad_mask: Optional[Tensor], kv: Any,
                blocks: Tensor, messages: Optional[Tensor] = None) -> Tensor:
        dtype = h.dtype
        h = hooks.hook_resid_pre(h)
        if self.attn_query is None:
            inputs = [h] * (1 if self.sliding else 3)
        else:
            w, stacked = depth_attend(self.attn_query, blocks, h)
            w = hooks.hook_attn_depth(w)
            inputs = list(torch.einsum("bsqn,bsnd->bsqd", w, stacked).unbind(-2))
        gates = hooks if self.loop else NO_HOOKS
        if self.sliding:
            x = inputs[0]
            if messages is None:
                qkv = [self.ln_in[0](x)] * 3
            else:
                qkv = [self.ln_in[0](self.message_gates[i](x, messages[..., i, :], getattr(gates, f"gate_{name}")))
                       for i, name in enumerate(("q", "k", "v"))]
        else:
            if messages is not None:
                inputs = [self.message_gates[i](x, messages[..., i, :], getattr(gates, f"gate_{name}"))
                          for i, (x, name) in enumerate(zip(inputs, ("q", "k", "v")))]
            qkv = [norm(x) for norm, x in zip(self.ln_in, inputs)]
        a = self.attn(*(t.to(dtype) for t in qkv), hooks.attn, positions, pad_mask, kv)
        new_mask = None if pad_mask is None else pad_mask[:, -h.shape[1]:]  # generation: the new positions
        a = hooks.hook_attn_out(_conv(self.attn_conv, "attn_conv", a, new_mask, kv)).float()
        if self.boundary:
            blocks, partial = torch.cat([blocks, h.unsqueeze(-2)], dim=-2), a
        else:
            partial = h.float() + a
        partial = hooks.hook_resid_mid(partial)
        w, stacked = depth_attend(self.mlp_query, blocks, partial)
        w = hooks.hook_mlp_depth(w[..., 0, :])
        m = torch.einsum("bsn,bsnd->bsd", w, stacked)
        if messages is not None:
            m = self.message_gates[3](m, messages[..., 3, :], gates.gate_mlp)
        y = hooks.hook_mlp_out(_conv(self.mlp_conv, "mlp_conv", self.mlp(self.ln_mlp(m).to(dtype), hooks.mlp), new_mask, kv))
        return hooks.hook_resid_post((partial + y).to(dtype))


# ---------------------------------------------------------------------- the model
class InklingLoopCache(LoopCache):
    """The LoopCache of an Inkling 2 run. Names and `stack` work as usual; the unrolled
    TransformerLens view (`unrolled()`, `accumulated_resid`, `decompose_resid`, `logit_attrs`,
    ...) refuses: those helpers read a residual stream, and Inkling 2 has none."""

    def _unrolled_view(self) -> Any:
        raise ValueError(f"TransformerLens's residual-stream helpers do not apply: {self.model._additivity_breaks(False)[0]}. "
                         "Read the hook points themselves (cache['iter.{t}.blocks.{l}.hook_resid_post'], the depth "
                         "weights hook_attn_depth / hook_mlp_depth, final.hook_weights) or model.finish(carry)")


def check_config(cfg: LoopConfig) -> None:
    """Refuse an Inkling config whose switches do not fit together (ConfigError naming them)."""
    x = cfg.extra
    missing = [k for k in EXTRA_KEYS if k not in x]
    if missing:
        raise ConfigError(f"extra: an Inkling 2 config needs {missing} in cfg.extra")
    L = cfg.n_prelude + cfg.n_block + cfg.n_coda
    if not isinstance(x["layer_types"], list) or len(x["layer_types"]) != L or \
            any(t not in ("hybrid", "hybrid_sliding") for t in x["layer_types"]):
        raise ConfigError(f"extra.layer_types: expected {L} entries of 'hybrid' / 'hybrid_sliding', got {x['layer_types']!r}")
    per = x["n_layers_per_attn_res_block"]
    if cfg.n_prelude <= 0 or cfg.n_block <= 0 or cfg.n_prelude % per or (cfg.n_prelude + cfg.n_block) % per:
        raise ConfigError(f"n_prelude / n_block: the loop layers [{cfg.n_prelude}, {cfg.n_prelude + cfg.n_block}) must "
                          f"start after layer 0 and start and end on multiples of n_layers_per_attn_res_block={per}")
    if not 0 < x["num_experts_per_tok"] <= x["n_routed_experts"]:
        raise ConfigError(f"extra.num_experts_per_tok={x['num_experts_per_tok']} must lie in [1, n_routed_experts="
                          f"{x['n_routed_experts']}]")
    if cfg.n_heads % cfg.n_key_value_heads or x["swa_num_attention_heads"] % x["swa_num_key_value_heads"]:
        raise ConfigError("n_key_value_heads / extra.swa_num_key_value_heads must divide the attention heads")
    if x["vocab_size"] < cfg.d_vocab:
        raise ConfigError(f"extra.vocab_size={x['vocab_size']} (embedding rows) is smaller than d_vocab={cfg.d_vocab}")


class HookedInkling2Transformer(HookedLoopedTransformer):
    """Inkling 2 (Thinking Machines' looped MoE), hooked per pass.

    Parameters: `embed` (+ `embed_norm`), `prelude_blocks`, `blocks` (the loop layers, once),
    `coda_blocks`, `message_queries` [n_block, 4, d_model], `final_query`, `ln_final`, `unembed`.
    `n_loops=` is the number of passes (default: the checkpoint's `loop_num_passes`).

    Hook names: `prelude.{l}.*`, `iter.{t}.blocks.{l}.*`, `coda.{l}.*` (docs/hooks.md); the
    message sites exist from pass 1 on (pass 0 receives none).
    """

    iteration_hooks_cls = staticmethod(InklingPassHooks)
    _cache_cls = InklingLoopCache
    packed_experts = False  # PackedInkling2Transformer: quantized experts kept packed
    single_loop_refusal = ("Inkling 2 models (no single residual stream: block states and a partial sum, read "
                           "through learned depth mixes): run the model with run_with_cache / run_with_hooks and "
                           "use loop_lens.families.inkling2's analyses, or model.finish(carry) for the logits of a carry")

    def __init__(self, cfg: LoopConfig, tokenizer: Any = None):
        if cfg.family != FAMILY:
            raise ConfigError(f"family: HookedInkling2Transformer builds family {FAMILY!r}, got {cfg.family!r}")
        check_config(cfg)
        super().__init__(cfg, tokenizer)

    def _build(self, cfg: LoopConfig) -> None:
        x, D = cfg.extra, cfg.d_model
        self.rotary, self.injection, self.exit_gate = None, None, None
        self.embed = nn.Embedding(x["vocab_size"], D)
        self.embed_norm = RMSNorm(D, cfg.norm_eps)
        self.hook_embed = HookPoint()  # [batch, pos, d_model], after the embedding norm
        P, K = cfg.n_prelude, cfg.n_block
        packed = self.packed_experts
        self.prelude_blocks = nn.ModuleList(InklingLayer(cfg, l, False, packed) for l in range(P))
        self.prelude = nn.ModuleList(Hooks(layer_paths(l, False)) for l in range(P))
        self.blocks = nn.ModuleList(InklingLayer(cfg, P + l, True, packed) for l in range(K))
        self.coda_blocks = nn.ModuleList(InklingLayer(cfg, P + K + l, False, packed) for l in range(cfg.n_coda))
        self.coda = nn.ModuleList(Hooks(layer_paths(P + K + l, False)) for l in range(cfg.n_coda))
        self.message_queries = nn.Parameter(torch.zeros(K, 4, D))
        self.final_query = nn.Parameter(torch.zeros(1, D))
        self.final = Hooks(["hook_weights", "hook_mixed"])
        self.ln_final = RMSNorm(D, cfg.norm_eps)
        self.unembed = nn.Linear(D, cfg.d_vocab, bias=False)

    # ------------------------------------------------------------------ hook names
    def loop_hook_names(self, iteration: int = 0) -> list[str]:
        """The hook names of one pass; pass 0 has no message sites (it receives no messages)."""
        names = super().loop_hook_names(iteration)
        return [n for n in names if not (iteration == 0 and self._is_message_site(n))]

    @staticmethod
    def _is_message_site(name: str) -> bool:
        return any(name.endswith("." + p) for p in _MESSAGE_PATHS)

    def _hook_point(self, name: str) -> Any:
        if name.startswith("iter.0.") and self._is_message_site(name):
            raise HookNameError(f"{name!r} never fires: pass 0 receives no messages (message sites exist from "
                                "iter.1 on)")
        return super()._hook_point(name)

    @property
    def _silent_hooks(self) -> frozenset[str]:
        return frozenset()

    def _schedule(self, n_loops: int) -> Schedule:
        c = self.cfg
        return Schedule(
            n_loops,
            prelude=tuple(f"prelude.{l}" for l in range(c.n_prelude)),
            steps=tuple(Step((l,), f"blocks.{l}", "blocks", l) for l in range(c.n_block)),
            coda=tuple(f"coda.{l}" for l in range(c.n_coda)),
            final_norm=None,  # the final depth mix comes first: no plain norm reads the last layer's output
            options=self._current_options(),
        )

    def _additivity_breaks(self, per_head: bool) -> list[str]:
        return ["Inkling 2 has no residual stream: each layer's output is a partial sum since the last block "
                "boundary, every sublayer reads a learned softmax over normalised block states (attention residuals), "
                "passes after the first restart from the prelude and receive the previous pass only through gated "
                "messages, and the logits read a final depth mix"]

    @staticmethod
    def _check_start(seed: Any, generator: Any, initial_state: Any, shape: tuple[int, int, int]) -> None:
        given = [n for n, v in (("seed", seed), ("generator", generator), ("initial_state", initial_state)) if v is not None]
        if given:
            raise ValueError(f"{given[0]}=: Inkling 2 has no start state to choose (pass 0 continues from the prelude, "
                             "later passes restart from it)")

    # ------------------------------------------------------------------ the network
    def _rope(self, S: int, device: torch.device, positions: Optional[Tensor] = None) -> Tensor:
        """What the layers take as positions: the position ids [1 or batch, pos] (log scaling)."""
        return torch.arange(S, device=device)[None] if positions is None else positions

    def _embed(self, tokens: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self.hook_embed(self.embed_norm(self.embed(tokens)))

    def _stack(self, layers: Any, hooks: Any, site: Any, carry: InklingCarry, run: Run,
               messages: Optional[Any] = None) -> InklingCarry:
        """Run layers from `carry`, storing the layer input as a block state after each boundary layer."""
        h, blocks = carry
        for l, blk in enumerate(layers):
            msg = None if messages is None else messages(l, hooks[l])
            new = run.layer(site(l), blk, hooks[l], h, blocks=blocks, messages=msg)
            if blk.boundary:
                blocks = torch.cat([blocks, h.unsqueeze(-2)], dim=-2)
            h = new
        return InklingCarry(h, blocks)

    def _prelude(self, x: Tensor, run: Run) -> InklingCarry:
        start = InklingCarry(x, x.new_zeros(*x.shape[:-1], 0, x.shape[-1]))
        return self._stack(self.prelude_blocks, self.prelude, lambda l: ("prelude", l), start, run)

    def _begin(self, e: InklingCarry, run: Run) -> InklingCarry:
        return e

    def _state(self, carry: InklingCarry) -> InklingCarry:
        return carry

    def _freeze(self, carry: InklingCarry, before: InklingCarry, live: Tensor) -> InklingCarry:
        if before.blocks.shape != carry.blocks.shape:
            return carry
        return InklingCarry(torch.where(live[..., None], carry.hidden, before.hidden),
                            torch.where(live[..., None, None], carry.blocks, before.blocks))

    def messages(self, layer: int, previous: InklingCarry, n_prelude_blocks: int) -> tuple[Tensor, Tensor]:
        """The depth weights [B, S, 4, N] and the 4 messages [B, S, 4, D] loop layer `layer` reads
        from the previous pass's carry (its loop block states and final partial sum)."""
        w, stacked = depth_attend(self.message_queries[layer], previous.blocks[..., n_prelude_blocks + 1:, :],
                                  previous.hidden)
        return w, stacked

    def _pass(self, run: Run, t: int, carry: InklingCarry, e: InklingCarry, hooks: Any) -> InklingCarry:
        """Pass t: pass 0 continues from the prelude; later passes restart from it, each loop layer
        gating its inputs with messages from the previous pass."""
        message_fn = None
        if t > 0:
            n_pre = e.blocks.shape[-2]

            def message_fn(l: int, layer_hooks: Any) -> Tensor:
                w, stacked = self.messages(l, carry, n_pre)
                w = layer_hooks.hook_message_weights(w)
                return layer_hooks.hook_messages(torch.einsum("bsqn,bsnd->bsqd", w, stacked))

        out = self._stack(self.blocks, hooks.blocks, lambda l: ("iter", t, l), e, run, message_fn)
        return InklingCarry(hooks.hook_state_post(out.hidden), out.blocks)

    def _to_coda(self, s: InklingCarry, hooked: bool) -> InklingCarry:
        return s

    def _coda(self, carry: InklingCarry, run: Run) -> InklingCarry:
        out = self._stack(self.coda_blocks, self.coda, lambda l: ("coda", run.coda_t, l), carry, run)
        if run.stop_at_layer == run.depth:
            raise StopAtLayer(out.hidden)
        return out

    def _unembed(self, carry: InklingCarry, hooked: bool = True) -> Tensor:
        """The final depth mix, the final norm, the unembedding, the final softcap (fp32 logits)."""
        hooks = self.final if hooked else NO_HOOKS
        w, stacked = depth_attend(self.final_query, carry.blocks, carry.hidden)
        w = hooks.hook_weights(w[..., 0, :])
        mixed = hooks.hook_mixed(torch.einsum("bsn,bsnd->bsd", w, stacked))
        x = self.ln_final(mixed).to(carry.hidden.dtype)
        return softcap(self.unembed(x).float(), self.cfg.extra["final_logit_softcapping"])

    def _readout(self, state: InklingCarry, run: Run, t: Optional[int] = None) -> Tensor:
        x = state
        for layer, blk in enumerate(self.coda_blocks):
            new = run.layer(("coda", t, layer), blk, NO_HOOKS, x.hidden, count=False, blocks=x.blocks)
            blocks = torch.cat([x.blocks, x.hidden.unsqueeze(-2)], dim=-2) if blk.boundary else x.blocks
            x = InklingCarry(new, blocks)
        return self._unembed(x, hooked=False)

    def finish(self, state: Any, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Logits from a carry leaving a pass (`InklingCarry(hidden, blocks)`): the coda, the
        final depth mix, norm, unembedding and softcap, with no hooks."""
        if not isinstance(state, InklingCarry):
            raise TypeError(f"state: Inkling 2 reads a pass's carry InklingCarry(hidden [B, S, D], blocks "
                            f"[B, S, n, D]), not a {type(state).__name__} (it has no single residual stream)")
        S = state.hidden.shape[1]
        run = Run(state.hidden, 0, "last", attention_mask, None, self._rope(S, state.hidden.device), None)
        return self._readout(state, run)

    # ------------------------------------------------------------------ the report
    random_start = False
    report_hooks = ("mlp.hook_experts", "mlp.hook_router_logits", "attn.hook_sink_mass",
                    *(f"gate_{i}.hook_{g}" for i in MESSAGE_INPUTS for g in ("forget", "gate")))
    report_heads_refusal = ("Inkling 2's layers differ in head count (sliding and full attention), its queries and keys "
                            "pass short convolutions and L2 clips, and each query also attends to a sink, so the "
                            "head-stability bound (kappa = ||W_Q W_K^T||) does not apply; the sink mass per pass and "
                            "layer is shown below instead")

    def _describe_layout(self, n_loops: int, options: dict[str, Any]) -> str:
        c = self.cfg
        return (f"Inkling 2: {c.n_prelude} prelude layers, {c.n_block} loop layers run {n_loops} times (pass 0 continues "
                "from the prelude; each later pass restarts from the prelude's output and reads the previous pass only "
                f"through gated messages), {c.n_coda} coda layers. There is no residual stream: a layer's output "
                "(hook_resid_post, the state the convergence, fixed-point and trajectory sections measure) is the "
                "partial sum since the last block boundary, and every sublayer reads a learned softmax over the stored "
                "block states and that sum. The lens reads a layer's output with the block states stored up to it, "
                "through the model's own final depth mix, final norm, unembedding and softcap (the coda lens runs "
                "the coda first).")

    def _report_sections(self, report: Any, cache: Any, tokens: Tensor, mask: Optional[Tensor], stabilisation_tol: float,
                         convergence_tol: float) -> dict[str, Any]:
        """Inkling 2's own sections: router stabilisation across passes, message-gate openness per
        pass (from pass 1 on), and the attention mass on the sink per pass and layer. Returns their numbers."""
        from loop_lens.report import _table_html
        from loop_lens.viz import figure_html, parts

        block = parts()
        stab = router_stability(cache, attention_mask=mask)
        overlap = stab.mean_overlap()  # [T, K]
        entropy = _masked_mean(stab.entropy, mask)
        rows = pd.DataFrame([{"pass": t, "loop layer": l, "expert overlap with pass 0": float(overlap[t, l]),
                              "router entropy (nats)": float(entropy[t, l])}
                             for t in range(overlap.shape[0]) for l in range(overlap.shape[1])])
        report.sections.append(("Router stabilisation across passes", figure_html(stab.plot()) + block.note(
            f"Per loop layer: the mean share of the {stab.top_k} chosen experts that pass 0 also chose at the same "
            "token (1 = routes as pass 0), and the entropy of the router's normalised sigmoid scores, over real "
            "tokens.") + _table_html(rows, index="")))
        numbers: dict[str, Any] = {"router_stability": {"overlap": overlap, "entropy": entropy, "top_k": stab.top_k}}
        sink = torch.stack([torch.stack([_masked_mean(_cache_get(cache, f"iter.{t}.blocks.{l}.attn.hook_sink_mass")
                                                      .float().mean(1), mask) for l in range(self.cfg.n_block)])
                            for t in range(cache.n_loops)])  # [T, K]
        if cache.n_loops > 1:
            gates = message_gates(cache, attention_mask=mask)
            report.sections.append(("Message-gate openness per pass", figure_html(gates.plot()) + block.note(
                "Passes after the first gate each loop layer's q / k / v / MLP inputs as (1 - f) x + g m with f = "
                "tanh(W_f z), g = tanh(W_m z): gate = mean |g| (how much of the message enters), keep = mean 1 - f "
                "(how much of the pass's own input stays), over real tokens and channels.")
                + _table_html(gates.to_frame(), index="")))
            numbers["message_gates"] = {"gate": gates.gate, "keep": gates.keep, "inputs": list(MESSAGE_INPUTS)}
        else:
            report.sections.append(("Message-gate openness per pass", block.note(
                "This run has one pass: messages (and their gates) exist from pass 1 on.")))
        frame = pd.DataFrame([{"pass": t, "loop layer": l, "sink mass": float(sink[t, l])}
                              for t in range(sink.shape[0]) for l in range(sink.shape[1])])
        report.sections.append(("Attention mass on the sink", block.note(
            "The attention each query puts on the sink (an extra key with zero value), mean over heads and real "
            "tokens, per pass and loop layer.") + _table_html(frame, index="")))
        numbers["sink_mass"] = sink
        return numbers

    # ------------------------------------------------------------------ lenses
    def lens_state(self, cache: Any, hook: str) -> InklingCarry:
        """The carry at a loop layer's output, rebuilt from `cache`: `iter.{t}.blocks.{l}.hook_resid_post`
        (the partial sum) with the block states stored up to that layer (the inputs, `hook_resid_pre`,
        of every boundary layer in the prelude and in pass t up to l); `iter.{t}.hook_state_post` is
        the carry leaving pass t. The lenses read it through the model's own final depth mix."""
        parsed = parse_hook_name(hook)
        t = parsed.iteration
        if t is None or parsed.kind not in ("hook_resid_post", "hook_state_post") or \
                (parsed.kind == "hook_resid_post" and parsed.layer is None):
            raise ValueError(f"hook {hook!r}: an Inkling 2 lens reads a loop layer's output "
                             "(iter.{t}.blocks.{l}.hook_resid_post) or a pass's carry (iter.{t}.hook_state_post)")
        last = self.cfg.n_block - 1 if parsed.kind == "hook_state_post" else parsed.layer
        hidden = _cache_get(cache, hook)
        blocks = [_cache_get(cache, f"prelude.{l}.hook_resid_pre") for l, blk in enumerate(self.prelude_blocks)
                  if blk.boundary]
        blocks += [_cache_get(cache, f"iter.{t}.blocks.{l}.hook_resid_pre") for l in range(last + 1)
                   if self.blocks[l].boundary]
        return InklingCarry(hidden, torch.stack(blocks, dim=-2))

    def logit_lens_readout(self, x: Any, hook: Optional[str], normed: bool) -> Tensor:
        """The logit lens of a carry: the final depth mix over its block states and partial sum,
        the final norm, the unembedding and the final softcap (`_unembed`), skipping the coda."""
        if not isinstance(x, InklingCarry):
            raise TypeError(f"x: Inkling 2's logit lens reads a carry InklingCarry(hidden, blocks), not a "
                            f"{type(x).__name__}: a layer's output is a partial sum read through a depth mix over "
                            "the block states; build the carry with model.lens_state(cache, hook) (logit_lens and "
                            "lens_of_states do)")
        return self._unembed(x, hooked=False)

    def generate(self, *args: Any, use_past_kv_cache: bool = True, adaptive: Optional[str] = None, **kwargs: Any) -> Any:
        """`HookedLoopedTransformer.generate` with per-pass caches: every (pass, layer) site keeps its
        keys and values and the last inputs of its four short convolutions (K, V, attention output,
        MoE output), as transformers' Inkling cache does. `adaptive=` exits need
        `use_past_kv_cache=False` (the convolution state of a position that stopped iterating is not kept)."""
        if use_past_kv_cache and adaptive is not None:
            raise ValueError(f"adaptive={adaptive!r} with use_past_kv_cache=True: Inkling 2's per-pass convolution "
                             "caches are not kept for positions that stop iterating early; pass "
                             "use_past_kv_cache=False (generation then recomputes the sequence at every step)")
        return super().generate(*args, use_past_kv_cache=use_past_kv_cache, adaptive=adaptive, **kwargs)


class PackedInkling2Transformer(HookedInkling2Transformer):
    """Inkling 2 with the release's quantized experts kept packed (NVFP4 / MXFP8 as stored) and
    dequantized one expert at a time when a token routes to it: `ll.load(path, packed_experts=True)`.
    Its outputs equal the model whose experts are dequantized at load. Each layer's
    `mlp.gate_up` / `mlp.down` is a `PackedExperts` (not a parameter), so `state_dict()` holds no
    expert weights and `save` refuses; load with the dtype you want (`dtype=`) rather than casting
    the model afterwards (a cast would also round the NVFP4 per-expert factors)."""

    packed_experts = True

    def save(self, directory: Any, overwrite: bool = False) -> Any:
        raise SaveError("save: this Inkling 2 model keeps its experts packed (ll.load(..., packed_experts=True)), "
                        "and a native save holds dense weights only; load it without packed_experts to save it")


# ---------------------------------------------------------------------- analyses
def _cache_get(cache: Any, name: str) -> Tensor:
    try:
        return cache[name]
    except KeyError:
        raise KeyError(f"the cache has no {name!r}: run run_with_cache with a names_filter that keeps it") from None


@dataclass(kw_only=True)
class RouterStability:
    """Do later passes route like pass 0? Per pass, loop layer and token.

    `overlap` [n_loops, n_block, batch, pos]: |experts(t) & experts(0)| / k (1 at pass 0);
    `entropy` [n_loops, n_block, batch, pos]: entropy (nats) of the router's normalised sigmoid
    scores, sigmoid(logits) / sum; `mask` [batch, pos] real tokens (None: all)."""

    overlap: Tensor
    entropy: Tensor
    top_k: int
    mask: Optional[Tensor] = None

    def mean_overlap(self) -> Tensor:
        """[n_loops, n_block]: overlap averaged over real tokens."""
        return _masked_mean(self.overlap, self.mask)

    def to_frame(self) -> pd.DataFrame:
        T, K, B, S = self.overlap.shape
        rows = []
        for t in range(T):
            for l in range(K):
                for b in range(B):
                    for s in range(S):
                        if self.mask is None or bool(self.mask[b, s]):
                            rows.append({"pass": t, "layer": l, "batch": b, "pos": s,
                                         "overlap": float(self.overlap[t, l, b, s]), "entropy": float(self.entropy[t, l, b, s])})
        return pd.DataFrame(rows, columns=["pass", "layer", "batch", "pos", "overlap", "entropy"])

    def plot(self) -> go.Figure:
        mean = self.mean_overlap()
        fig = go.Figure()
        for l in range(mean.shape[1]):
            fig.add_trace(go.Scatter(x=list(range(mean.shape[0])), y=mean[:, l].tolist(), mode="lines+markers",
                                     name=f"loop layer {l}"))
        fig.update_layout(title="Router stabilisation: expert overlap with pass 0", xaxis_title="pass",
                          yaxis_title=f"mean |experts & experts(pass 0)| / {self.top_k}", yaxis_range=[0, 1.05])
        return fig


@dataclass(kw_only=True)
class MessageGates:
    """How open the message gates are, per pass >= 1, loop layer and input (q, k, v, mlp).

    `gate` [n_loops - 1, n_block, 4]: mean |tanh(W_m z)| (how much of the message enters);
    `keep` [n_loops - 1, n_block, 4]: mean 1 - tanh(W_f z) (how much of the pass's own input stays),
    over real tokens and channels. Row i is pass i + 1."""

    gate: Tensor
    keep: Tensor

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for i in range(self.gate.shape[0]):
            for l in range(self.gate.shape[1]):
                for j, name in enumerate(MESSAGE_INPUTS):
                    rows.append({"pass": i + 1, "layer": l, "input": name, "gate": float(self.gate[i, l, j]),
                                 "keep": float(self.keep[i, l, j])})
        return pd.DataFrame(rows, columns=["pass", "layer", "input", "gate", "keep"])

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        fig = go.Figure()
        for name in MESSAGE_INPUTS:
            part = frame[frame["input"] == name]
            fig.add_trace(go.Bar(x=[f"pass {p} / layer {l}" for p, l in zip(part["pass"], part["layer"])],
                                 y=part["gate"].tolist(), name=name))
        fig.update_layout(title="Message-gate openness (mean |tanh(W_m z)|)", barmode="group", yaxis_range=[0, 1])
        return fig


def _masked_mean(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean over the last two axes [batch, pos] (real tokens only with `mask`)."""
    if mask is None:
        return x.float().mean((-2, -1))
    m = mask.to(x.device).float()
    return (x.float() * m).sum((-2, -1)) / m.sum().clamp_min(1)


def _layers(cache: Any) -> tuple[int, int]:
    T = getattr(cache, "n_loops", None)
    K = getattr(getattr(cache, "cfg", None), "n_block", None)
    if T is None or K is None:
        raise ValueError("cache: give a LoopCache of an Inkling 2 run (its n_loops and cfg.n_block)")
    return T, K


def router_stability(cache: Any, attention_mask: Optional[Tensor] = None) -> RouterStability:
    """Router stabilisation across passes, from a cache holding `iter.{t}.blocks.{l}.mlp.hook_experts`
    and `mlp.hook_router_logits` for every pass and loop layer."""
    T, K = _layers(cache)
    overlap, entropy = [], []
    for t in range(T):
        o_t, h_t = [], []
        for l in range(K):
            chosen = _cache_get(cache, f"iter.{t}.blocks.{l}.mlp.hook_experts")
            first = _cache_get(cache, f"iter.0.blocks.{l}.mlp.hook_experts")
            same = (chosen[..., :, None] == first[..., None, :]).any(-1).float().sum(-1) / chosen.shape[-1]
            o_t.append(same)
            p = torch.sigmoid(_cache_get(cache, f"iter.{t}.blocks.{l}.mlp.hook_router_logits").float())
            p = p / p.sum(-1, keepdim=True)
            h_t.append(-(p * p.clamp_min(1e-30).log()).sum(-1))
        overlap.append(torch.stack(o_t))
        entropy.append(torch.stack(h_t))
    top_k = int(_cache_get(cache, "iter.0.blocks.0.mlp.hook_experts").shape[-1])
    return RouterStability(overlap=torch.stack(overlap), entropy=torch.stack(entropy), top_k=top_k, mask=attention_mask)


def message_gates(cache: Any, attention_mask: Optional[Tensor] = None) -> MessageGates:
    """Message-gate openness per pass >= 1, from a cache holding
    `iter.{t}.blocks.{l}.gate_{q,k,v,mlp}.hook_{forget,gate}`."""
    T, K = _layers(cache)
    if T < 2:
        raise ValueError(f"cache: message gates exist from pass 1 on; this run has n_loops={T}")
    gate = torch.zeros(T - 1, K, 4)
    keep = torch.zeros(T - 1, K, 4)
    for t in range(1, T):
        for l in range(K):
            for j, name in enumerate(MESSAGE_INPUTS):
                g = _cache_get(cache, f"iter.{t}.blocks.{l}.gate_{name}.hook_gate").float().abs().mean(-1)
                f = _cache_get(cache, f"iter.{t}.blocks.{l}.gate_{name}.hook_forget").float().mean(-1)
                gate[t - 1, l, j] = _masked_mean(g, attention_mask)
                keep[t - 1, l, j] = _masked_mean(1 - f, attention_mask)
    return MessageGates(gate=gate, keep=keep)
