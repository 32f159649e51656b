"""HookedParcaeTransformer: Parcae (SandyResearch, "Parcae: Stable Looped Language Models") on the
one-loop core: a prelude, a looped core on a recurrent state of its own width, a projection `C`
back to the model width, and a coda.

What it computes (the formulas are in `docs/families/parcae.md`)::

    x = wte(tokens) * emb_scale                         hook_embed
    x = prelude(x)  [; x = ln_prelude(x)]  ->  e        prelude.{l}.*, ln_prelude.*, hook_prelude_out
    s = initial state (like-init / zero / normal / embed / unit), width d_state
    for t in range(T):                                  iter.{t}.hook_state_pre
        s = state_term(s) + input_term(e)               iter.{t}.hook_state_term, hook_input_term, hook_injected
            diagonal: s * exp(-softplus(dt_bias) * exp(A_log))  +  softplus(dt_bias) * (e @ B^T)
            linear:   W[:, :S] s  +  W[:, S:] e (+ b)        add: s + e
        s = core(s)                                     iter.{t}.blocks.{l}.*
                                                        iter.{t}.hook_state_post
    x = C(s)                                            hook_latent (the coda's input, width d_model)
    logits = softcap(lm_head(ln_f(coda(x))) * logit_scale)   coda.{l}.*, ln_final.*

Layers are pre-norm; attention may add a gated value embedding to v (`attn.hook_ve_gate`,
`attn.hook_ve`), clamps q/k/v (`clip_qkv`), adds a qk bias, rotates adjacent pairs with the saved
`freqs_cis` table, then applies a parameter-free RMS norm to q and k (`qk_norm`).

Everything else (argument checks, hooks by name or filter created on demand, caches,
`stop_at_layer` over the unrolled depth, generation with a KV cache) is `HookedLoopedTransformer`'s.
Every Parcae switch lives in `cfg.extra["parcae"]` (a `ParcaeSettings`); the plain-loop fields of
the `LoopConfig` are set to what they mean for Parcae where they have a meaning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loop_lens import generation
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError
from loop_lens.model import sites
from loop_lens.model.components import Attention, Norm, Rotary, causal_bias
from loop_lens.model.hooks import NO_HOOKS, Hooks, has_hooks, pass_hooks
from loop_lens.model.looped import HookedLoopedTransformer, HookedNorm
from loop_lens.model.run import Run
from loop_lens.model.sites import Site

NORMS = {"RMSNorm": "RMS", "LayerNorm": "LN"}
"""The official `norm_class_name`s a Parcae model can build (its own RMSNorm, torch's LayerNorm),
and the kind our `Norm` computes for each."""
MLPS = ("BaseMLP", "GatedMLP")
INJECTIONS = ("diagonal", "linear", "add")
STATE_INITS = ("like-init", "zero", "normal", "embed", "unit")
ITERATION_METHODS = ("per-batch", "per-sequence", "per-token")
VE_GATE_CHANNELS = 32
"""The value-embedding gate reads the first 32 channels of the layer's (normed) input."""


class ReLU2(nn.Module):
    """Parcae's `ReLU2`: relu(x)^2 * 0.5."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).pow(2).mul(0.5)


# `nonlin_name` is looked up in torch.nn first, then ReLU2; these are the parameter-free,
# shape-preserving activations a Parcae MLP can use.
NONLINS = {
    name: getattr(nn, name)
    for name in ("GELU", "ReLU", "SiLU", "Tanh", "Sigmoid", "Mish", "ELU", "SELU", "CELU", "LeakyReLU",
                 "Softplus", "Hardswish", "Hardtanh", "Hardsigmoid", "ReLU6", "Softsign", "Tanhshrink",
                 "LogSigmoid", "Identity")
}
NONLINS["ReLU2"] = ReLU2


def _choice(field_name: str, value: Any, options) -> None:
    if value not in options:
        raise ConfigError(f"ParcaeSettings.{field_name}={value!r} is not one of {list(options)}")


@dataclass(frozen=True)
class ParcaeSettings:
    """Every switch of a Parcae model that changes what it computes (read from the official
    `ParcaeConfig` by `loop_lens.adapters.parcae`). Widths: the model width `d_model` (prelude,
    coda, embeddings) and the recurrent state's own width `d_state` (the core layers, with
    `n_state_heads` heads and no GQA, as the official recurrent block config sets)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    d_state: int
    n_state_heads: int
    d_state_mlp: int
    d_vocab: int  # the padded vocabulary: rows of wte and lm_head
    n_prelude: int
    n_core: int
    n_coda: int
    mean_recurrence: int
    mean_backprop_depth: int
    n_positions: int  # rows of the saved freqs_cis table
    vocab_size: int = 0  # the real vocabulary (<= d_vocab); 0 means d_vocab
    norm: str = "RMSNorm"
    norm_eps: float = 1e-5
    mlp: str = "BaseMLP"
    nonlin: str = "ReLU2"
    bias: bool = False
    qk_bias: bool = False
    qk_norm: bool = False
    clip_qkv: Optional[float] = None
    use_rope: bool = True
    injection: str = "diagonal"
    state_init: str = "like-init"
    state_std: float = 0.02  # std of the like-init draw (the init strategy's embedding std)
    emb_scale: float = 1.0
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None
    prelude_norm: bool = False
    tie_embeddings: bool = False
    iteration_method: str = "per-batch"
    sampling_scheme: str = "poisson-truncated-full"
    curriculum_target: str = "forward"
    untied_head_transposed: bool = False  # use_fused_head="full-triton" untied: lm_head.weight is [d_model, d_vocab]

    def __post_init__(self) -> None:
        _choice("norm", self.norm, NORMS)
        _choice("mlp", self.mlp, MLPS)
        _choice("nonlin", self.nonlin, NONLINS)
        _choice("injection", self.injection, INJECTIONS)
        _choice("state_init", self.state_init, STATE_INITS)
        _choice("iteration_method", self.iteration_method, ITERATION_METHODS)
        _choice("curriculum_target", self.curriculum_target, ("forward", "backward", "both"))
        for name in ("d_model", "n_heads", "n_kv_heads", "d_mlp", "d_state", "n_state_heads", "d_state_mlp",
                     "d_vocab", "n_core", "mean_recurrence", "n_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ParcaeSettings.{name}={value!r} must be a positive integer")
        for name in ("n_prelude", "n_coda", "mean_backprop_depth", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"ParcaeSettings.{name}={value!r} must be a non-negative integer")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ParcaeSettings: d_model={self.d_model} must divide into n_heads={self.n_heads}, and n_heads into "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.d_state % self.n_state_heads:
            raise ConfigError(
                f"ParcaeSettings: d_state={self.d_state} must divide into n_state_heads={self.n_state_heads}"
            )
        if self.use_rope and (self.d_head % 2 or self.d_state_head != self.d_head):
            raise ConfigError(
                f"ParcaeSettings: RoPE needs an even head width shared by every layer (the one freqs_cis table); "
                f"d_head={self.d_head}, core d_head={self.d_state_head}"
            )
        if self.injection == "add" and self.d_state != self.d_model:
            raise ConfigError(f"ParcaeSettings: injection='add' needs d_state == d_model, got {self.d_state} != {self.d_model}")
        if self.qk_bias and self.n_kv_heads != self.n_heads:
            raise ConfigError(
                f"ParcaeSettings: qk_bias with GQA (n_kv_heads={self.n_kv_heads} < n_heads={self.n_heads}) is not supported"
            )
        if self.untied_head_transposed and self.tie_embeddings:
            raise ConfigError("ParcaeSettings: untied_head_transposed only applies to an untied head")
        for (stage, layer), key in self.value_embedding_sites().items():
            width = self.d_state if stage == "core" else self.d_model
            kv_width = self.d_state if stage == "core" else self.n_kv_heads * self.d_head
            if width < VE_GATE_CHANNELS or kv_width != self.n_kv_heads * self.d_head:
                raise ConfigError(
                    f"ParcaeSettings: {stage} layer {layer} adds value embedding {key} (width "
                    f"{self.n_kv_heads * self.d_head}) to v of width {kv_width}, gated from the first "
                    f"{VE_GATE_CHANNELS} of {width} channels; the official code cannot run this either"
                )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_state_head(self) -> int:
        return self.d_state // self.n_state_heads

    # -- value embeddings: the official parity rules -------------------------------------------------
    def layer_ids(self) -> dict[tuple[str, int], int]:
        """The official `layer_id` of every layer (it decides the value-embedding gate): prelude l is
        l, core l is n_prelude + l, coda l is n_prelude + n_core * mean_recurrence + l."""
        ids = {("prelude", i): i for i in range(self.n_prelude)}
        ids.update({("core", j): self.n_prelude + j for j in range(self.n_core)})
        coda0 = self.n_prelude + self.n_core * self.mean_recurrence
        ids.update({("coda", i): coda0 + i for i in range(self.n_coda)})
        return ids

    def value_embedding_index(self) -> dict[tuple[str, int], int]:
        """Which `value_embeds.{i}` table a layer would read: prelude l -> l, core l ->
        n_prelude + l, coda l -> n_prelude + n_core + l."""
        idx = {("prelude", i): i for i in range(self.n_prelude)}
        idx.update({("core", j): self.n_prelude + j for j in range(self.n_core)})
        idx.update({("coda", i): self.n_prelude + self.n_core + i for i in range(self.n_coda)})
        return idx

    def has_gate(self, site: tuple[str, int]) -> bool:
        """An `attn.ve_gate` exists where layer_id has the parity of n_layer - 1, with the official
        n_layer = n_core * mean_backprop_depth."""
        return self.layer_ids()[site] % 2 == (self.n_core * self.mean_backprop_depth - 1) % 2

    def value_embedding_tables(self) -> list[str]:
        """The `value_embeds` keys a checkpoint holds: i where i has the parity of
        n_prelude + n_core + n_coda - 1."""
        n = self.n_prelude + self.n_core + self.n_coda
        return [str(i) for i in range(n) if i % 2 == (n - 1) % 2]

    def value_embedding_sites(self) -> dict[tuple[str, int], str]:
        """The layers that add a value embedding (both its table and its gate exist), and the table each reads."""
        tables = set(self.value_embedding_tables())
        index = self.value_embedding_index()
        return {site: str(i) for site, i in index.items() if str(i) in tables and self.has_gate(site)}


# ---------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------


def rotate_adjacent(x: Float[Tensor, "batch pos head d_head"], rope: tuple[Tensor, Tensor]) -> Tensor:
    """RoPE on adjacent pairs (x[2i], x[2i+1]) by `rope` = (cos, sin), [pos, d_head] or
    [batch, pos, d_head] (each angle repeated for its pair), computed in fp32."""
    cos, sin = (r[:, :, None, :] if r.ndim == 3 else r[None, :, None, :] for r in rope)
    xf = x.float()
    rotated = torch.stack([-xf[..., 1::2], xf[..., 0::2]], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


class FreqsRotary(nn.Module):
    """The angles of RoPE from the checkpoint's saved `freqs_cis` buffer [1, n_positions, 1,
    d_head/2, 2] (cos, sin), not recomputed from a theta: both official loaders use the saved
    table. The model keeps it as `rope_table` (its `rotary` is None: the core's Rotary computes
    its angles from `rope_theta`); `_rope` hands the layers its (cos, sin)."""

    def __init__(self, n_positions: int, d_head: int):
        super().__init__()
        self.n_positions = n_positions
        self.register_buffer("freqs_cis", torch.zeros(1, n_positions, 1, d_head // 2, 2))

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [pos, d_head] in fp32 for positions 0..seq_len-1."""
        if seq_len > self.n_positions:
            raise ValueError(
                f"sequence length {seq_len} exceeds the {self.n_positions} positions of the checkpoint's freqs_cis "
                "table (block_size); Parcae cannot attend beyond it"
            )
        table = self.freqs_cis[0, :seq_len, 0].to(device=device, dtype=torch.float32)
        return table[..., 0].repeat_interleave(2, dim=-1), table[..., 1].repeat_interleave(2, dim=-1)

    def at(self, positions: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [batch, pos, d_head] for per-row positions."""
        cos, sin = self(int(positions.max()) + 1, positions.device)
        return cos[positions], sin[positions]


def _attend(q: Tensor, k: Tensor, v: Tensor, hooks: Any, mask: Optional[Tensor], kv: Any) -> Tensor:
    """Causal attention of q [batch, pos, head, d_head] over k, v [batch, pos, kv_head, d_head]
    (or, with a KV cache site `kv`, over the cached keys too); returns z [batch, pos, head, d_head].
    The pattern is materialised only when hook_attn_scores or hook_pattern is hooked."""
    B, S, H, hd = q.shape
    K = k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    past = 0
    if kv is not None:
        k, v = kv(k, v)
        past = k.shape[2] - S
    if has_hooks(hooks.hook_attn_scores) or has_hooks(hooks.hook_pattern):
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        scores = hooks.hook_attn_scores(scores + causal_bias(S, q.device, scores.dtype, mask, past))
        pattern = hooks.hook_pattern(torch.softmax(scores.float(), dim=-1).to(v.dtype))
        z = pattern @ v
    else:
        plain = mask is None and past == 0
        z = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if plain or (mask is None and S == 1) else causal_bias(S, q.device, q.dtype, mask, past),
            is_causal=plain,
            enable_gqa=K != H,
        )
    return hooks.hook_z(z.transpose(1, 2))


class ParcaeAttention(Attention):
    """Parcae's causal self-attention. In order: q, k, v projections; v += 2*sigmoid(ve_gate(x[:32]))
    * value embedding (layers the parity rules pick); clamp q, k, v to +-clip_qkv; q, k += qk bias;
    RoPE on adjacent pairs; parameter-free RMS norm of q and k (qk_norm); causal softmax attention
    with GQA; output projection.

    Hooks: hook_q/k/v after the value embedding, clamp and bias (before RoPE); hook_rot_q/k what
    enters the scores (after RoPE and qk-norm); hook_ve_gate [batch, pos, kv_head] and hook_ve (the
    gated embedding added to v) on value-embedding layers. The W_Q/W_K/W_V/W_O views are the shared
    Attention's."""

    def __init__(self, d: int, n_heads: int, n_kv: int, *, bias: bool, qk_bias: bool, qk_norm: bool,
                 clip_qkv: Optional[float], ve: bool):
        nn.Module.__init__(self)  # the weights differ from the shared Attention's config-built ones
        self.n_heads, self.n_kv, self.d_head = n_heads, n_kv, d // n_heads
        hd = self.d_head
        self.scale = 1.0 / math.sqrt(hd)
        self.q_proj = nn.Linear(d, n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)
        self.qk_bias = nn.Parameter(torch.zeros(2, n_heads, hd)) if qk_bias else None
        self.qk_norm = qk_norm
        self.clip_qkv = clip_qkv
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, n_kv, bias=False) if ve else None

    def forward(
        self,
        x: Float[Tensor, "batch pos d"],
        hooks: Any,
        rotary: Optional[Rotary],
        rope: Any,
        mask: Optional[Tensor],
        kv: Any = None,
        ve: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch pos d"]:
        B, S, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv, self.d_head
        q = self.q_proj(x).view(B, S, H, hd)
        k = self.k_proj(x).view(B, S, K, hd)
        v = self.v_proj(x).view(B, S, K, hd)
        if self.ve_gate is not None and ve is not None:
            gate = hooks.hook_ve_gate(2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS])))
            v = v + hooks.hook_ve(gate.unsqueeze(-1) * ve.view(B, S, K, hd))
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(min=-c, max=c), k.clamp(min=-c, max=c), v.clamp(min=-c, max=c)
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k, v = hooks.hook_q(q), hooks.hook_k(k), hooks.hook_v(v)
        if rope is not None:
            q, k = rotate_adjacent(q, rope), rotate_adjacent(k, rope)
        if self.qk_norm:
            q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
        if rope is not None:  # hook_rot_q/k exist with RoPE only (as for every family)
            q, k = hooks.hook_rot_q(q), hooks.hook_rot_k(k)
        z = _attend(q, k, v, hooks, mask, kv)
        return self.o_proj(z.reshape(B, S, -1))


class ParcaeMLP(nn.Module):
    """`BaseMLP`: proj(act(fc x)); `GatedMLP`: fc gives [a | b], proj(act(a) * b).
    Hooks: hook_pre (fc x, or a), hook_pre_linear (b, gated only), hook_post (what proj reads)."""

    def __init__(self, d: int, d_mlp: int, *, gated: bool, nonlin: str, bias: bool):
        super().__init__()
        self.gated = gated
        self.fc = nn.Linear(d, 2 * d_mlp if gated else d_mlp, bias=bias)
        self.proj = nn.Linear(d_mlp, d, bias=bias)
        self.act = NONLINS[nonlin]()

    @property
    def down_proj(self) -> nn.Linear:
        """The output projection under the shared MLP's name (TransformerLens's `W_out` view reads it)."""
        return self.proj

    def forward(self, x: Float[Tensor, "batch pos d"], hooks: Any) -> Float[Tensor, "batch pos d"]:
        h = self.fc(x)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            post = hooks.hook_post(self.act(hooks.hook_pre(a)) * hooks.hook_pre_linear(b))
        else:
            post = hooks.hook_post(self.act(hooks.hook_pre(h)))
        return self.proj(post)


class ParcaeBlock(nn.Module):
    """Parcae's `TransformerPreNormBlock`: x += attn(norm_1(x)); x += mlp(norm_2(x)). The norms are
    the shared `Norm` (RMS or LayerNorm); `ve` is the layer's value embedding (or None)."""

    def __init__(self, s: ParcaeSettings, d: int, d_mlp: int, n_heads: int, n_kv: int, ve: bool):
        super().__init__()
        self.ln1 = Norm(d, NORMS[s.norm], s.norm_eps)
        self.attn = ParcaeAttention(d, n_heads, n_kv, bias=s.bias, qk_bias=s.qk_bias, qk_norm=s.qk_norm,
                                    clip_qkv=s.clip_qkv, ve=ve)
        self.ln2 = Norm(d, NORMS[s.norm], s.norm_eps)
        self.mlp = ParcaeMLP(d, d_mlp, gated=s.mlp == "GatedMLP", nonlin=s.nonlin, bias=s.bias)
        self.ln1_post = self.ln2_post = None  # pre-norm only (TransformerLens's view asks)

    def forward(
        self,
        x: Float[Tensor, "batch pos d"],
        hooks: Any,
        rotary: Optional[Rotary] = None,
        rope: Any = None,
        mask: Optional[Tensor] = None,
        kv: Any = None,
        ve: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch pos d"]:
        x = hooks.hook_resid_pre(x)
        a = self.attn(self.ln1(x, hooks.ln1), hooks.attn, rotary, rope, mask, kv, ve=ve)
        x = hooks.hook_resid_mid(x + hooks.hook_attn_out(a))
        m = self.mlp(self.ln2(x, hooks.ln2), hooks.mlp)
        return hooks.hook_resid_post(x + hooks.hook_mlp_out(m))


class ParcaeInjection(nn.Module):
    """`transformer.adapter`: the new state from the old state s and the prelude output e, as the
    sum of a state term and an input term (hooked separately, then `hook_injected` on the sum).

    - diagonal: s * exp(-softplus(dt_bias) * exp(A_log))  +  softplus(dt_bias) * (e @ B^T)
    - linear:   s @ W[:, :d_state]^T  +  (e @ W[:, d_state:]^T + b)   (W acts on concat[s, e])
    - add:      s  +  e
    """

    def __init__(self, kind: str, d_model: int, d_state: int, bias: bool):
        super().__init__()
        self.kind, self.d_state = kind, d_state
        if kind == "diagonal":
            self.A_log = nn.Parameter(torch.zeros(d_state))
            self.dt_bias = nn.Parameter(torch.zeros(d_state))
            self.B = nn.Parameter(torch.zeros(d_state, d_model))
        elif kind == "linear":
            self.adapter = nn.Linear(d_state + d_model, d_state, bias=bias)

    def decay(self) -> Tensor:
        """The diagonal system's per-channel retention exp(-softplus(dt_bias) * exp(A_log)) [d_state]."""
        if self.kind != "diagonal":
            raise ValueError(f"decay() is defined for the diagonal injection, not {self.kind!r}")
        return torch.exp(-F.softplus(self.dt_bias) * torch.exp(self.A_log))

    def forward(self, s: Float[Tensor, "batch pos d_state"], e: Float[Tensor, "batch pos d_model"],
                hooks: Any = NO_HOOKS) -> Float[Tensor, "batch pos d_state"]:
        if self.kind == "diagonal":
            dt = F.softplus(self.dt_bias)
            state_term, input_term = s * torch.exp(-dt * torch.exp(self.A_log)), dt * (e @ self.B.T)
        elif self.kind == "linear":
            W = self.adapter.weight
            state_term = s @ W[:, : self.d_state].T
            input_term = F.linear(e, W[:, self.d_state:], self.adapter.bias)
        else:
            state_term, input_term = s, e
        state_term = hooks.hook_state_term(state_term)
        input_term = hooks.hook_input_term(input_term)
        return hooks.hook_injected(state_term + input_term)



# ---------------------------------------------------------------------------------------------------
# Randomness: the initial state and the plain call's sampled depths, as the official code draws them
# ---------------------------------------------------------------------------------------------------


def draw_initial_state(s: ParcaeSettings, shape: tuple[int, ...], dtype: torch.dtype, device: Any,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """The initial state by `s.state_init`, drawn in the official order (so with the same RNG
    state it is the same tensor): zero; normal = randn; embed = randn / sqrt(d_model); like-init =
    randn, then refilled in place by a truncated normal (std s.state_std, cut at +-3 std), times
    emb_scale when that is not 1; unit = randn standardised over the last axis (std + 1e-8)."""
    if s.state_init == "zero":
        return torch.zeros(shape, dtype=dtype, device=device)
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if s.state_init == "embed":
        return x.mul(1 / math.sqrt(s.d_model))
    if s.state_init == "like-init":
        std = s.state_std
        torch.nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return x * s.emb_scale if s.emb_scale != 1 else x
    if s.state_init == "unit":
        std, mean = torch.std_mean(x, dim=-1, keepdim=True)
        return (x - mean) / (std + 1e-8)
    return x  # normal


def _scheduled_means(s: ParcaeSettings, step: int) -> tuple[int, int]:
    """(t, s): the no-grad and with-grad mean depths at training step `step`, after the curriculum
    named in the sampling scheme ("...curriculum-{n}" linear, "...curriculum-sqrt-{n}")."""
    t_full, s_full = max(s.mean_recurrence - s.mean_backprop_depth, 0), s.mean_backprop_depth
    if "curriculum-" not in s.sampling_scheme:
        return t_full, s_full
    part = s.sampling_scheme.split("curriculum-")[1]
    sqrt_schedule = part.startswith("sqrt-")
    ramp = int(part.split("sqrt-")[1]) if sqrt_schedule else int(part)
    if step > ramp:
        return t_full, s_full
    progress = 1 - math.sqrt(1 - step / ramp) if sqrt_schedule else step / ramp
    t_mean = max(math.ceil(progress * t_full), 0) if s.curriculum_target in ("forward", "both") else t_full
    s_mean = max(math.ceil(progress * s_full), 1) if s.curriculum_target in ("backward", "both") else s_full
    return t_mean, s_mean


def sample_depths(s: ParcaeSettings, batch: int, seq_len: Optional[int] = None, step: int = 0) -> tuple[Tensor, Tensor]:
    """(n, k) per row ([batch]) or per token ([batch, seq_len]), as the official plain call draws
    them for recurrent_iteration_method "per-sequence" / "per-token" (even in eval mode): a CPU
    generator seeded 514229 + step (the model's training step counter, 0 after loading), then by
    the sampling scheme: poisson-truncated-full: total = max(Poisson(t+s), 1), k = min(total, s),
    n = total - k; poisson-full: n = 0, k = max(Poisson(t+s), 1); fixed: n = t, k = s; otherwise
    n = Poisson(t), k = s. A row then runs n + k recurrences."""
    shape = (batch, seq_len) if seq_len is not None else (batch,)
    t, k_mean = _scheduled_means(s, step)
    generator = torch.Generator(device="cpu")
    generator.manual_seed((514229 + step) % (2**31 - 1))
    scheme = s.sampling_scheme
    if "poisson-truncated-full" in scheme:
        total = torch.clamp(torch.poisson(torch.full(shape, float(t + k_mean)), generator=generator), min=1)
        k = torch.clamp(total, max=k_mean)
        n = total - k
    elif "poisson-full" in scheme:
        n = torch.zeros(shape, dtype=torch.long)
        k = torch.clamp(torch.poisson(torch.full(shape, float(t + k_mean)), generator=generator), min=1)
    elif "fixed" in scheme:
        n, k = torch.full(shape, t, dtype=torch.long), torch.full(shape, k_mean, dtype=torch.long)
    else:
        n = torch.poisson(torch.full(shape, float(t)), generator=generator)
        k = torch.full(shape, k_mean, dtype=torch.long)
    return n.long(), k.long()


def plain_call_schedule(s: ParcaeSettings, batch: int, seq_len: int, step: int = 0
                        ) -> tuple[int, Optional[list[Tensor]], Tensor]:
    """What the official `model(tokens)` without `num_steps_pair` runs in eval mode: (number of
    passes, per-pass active masks or None, recurrences per row [batch] or token [batch, pos]).

    per-batch: mean_recurrence passes for every row (its sampler returns that in eval mode).
    per-sequence / per-token: the depths of `sample_depths`; the loop runs max(n) passes where a
    row is active while pass < n, then max(k) passes where it is active while pass - max(n) < k;
    an inactive row (token) keeps its state, but still serves as keys and values to the others."""
    if s.iteration_method == "per-batch":
        return s.mean_recurrence, None, torch.full((batch,), s.mean_recurrence, dtype=torch.long)
    per_token = s.iteration_method == "per-token"
    n, k = sample_depths(s, batch, seq_len if per_token else None, step)
    shape = (lambda m: m[..., None]) if per_token else (lambda m: m[:, None, None])
    masks = [shape(i < n) for i in range(int(n.max()))] + [shape(i < k) for i in range(int(k.max()))]
    return len(masks), masks, n + k




# ---------------------------------------------------------------------------------------------------
# The config: every Parcae switch in cfg.extra["parcae"], the plain-loop fields set where they mean something
# ---------------------------------------------------------------------------------------------------


def settings_of(cfg: LoopConfig) -> ParcaeSettings:
    """The ParcaeSettings a Parcae LoopConfig carries (`cfg.extra["parcae"]`); ConfigError naming
    the field when it is missing or wrong."""
    data = cfg.extra.get("parcae")
    if not isinstance(data, dict):
        raise ConfigError("extra: a Parcae config (family='parcae') carries its switches in extra['parcae'] (an object)")
    names = {f.name for f in dataclasses.fields(ParcaeSettings)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"extra['parcae']: unknown field(s) {unknown}")
    try:
        return ParcaeSettings(**data)
    except TypeError as err:  # a required field missing
        raise ConfigError(f"extra['parcae']: {err}") from err


def parcae_config(s: ParcaeSettings, model_name: str = "parcae") -> LoopConfig:
    """The LoopConfig of a Parcae model: layout, widths of the prelude/coda (the core's are in
    `extra['parcae']`), RoPE (adjacent pairs, `n_ctx` = the freqs_cis table's rows), the injection,
    the start-state rule (`zeros` for state_init='zero', else a random draw: `trunc_normal` with the
    like-init std), and every switch in `extra['parcae']`."""
    mlp = "swiglu" if s.mlp == "GatedMLP" else {"ReLU2": "relu2", "ReLU": "relu", "GELU": "gelu"}.get(s.nonlin, "gelu")
    return LoopConfig(
        d_model=s.d_model, n_heads=s.n_heads, n_key_value_heads=s.n_kv_heads, d_mlp=s.d_mlp, d_vocab=s.d_vocab,
        n_prelude=s.n_prelude, n_block=s.n_core, n_coda=s.n_coda, default_loops=s.mean_recurrence,
        n_ctx=s.n_positions, normalization_type=NORMS[s.norm], norm_eps=s.norm_eps, mlp_type=mlp,
        attn_bias=s.bias, mlp_bias=s.bias,
        positional_embedding_type="rotary" if s.use_rope else "none", rope_style="adjacent",
        qk_bias=s.qk_bias, qk_norm="head" if s.qk_norm else "none", embed_scale=s.emb_scale,
        injection={"add": "additive"}.get(s.injection, s.injection),
        initial_state="zeros" if s.state_init == "zero" else "trunc_normal", init_std=s.state_std,
        tie_embeddings=s.tie_embeddings, family="parcae", model_name=model_name,
        extra={"parcae": dataclasses.asdict(s)},
    )


# ---------------------------------------------------------------------------------------------------
# Hook sites
# ---------------------------------------------------------------------------------------------------


def _is_parcae(c: Any) -> bool:
    return getattr(c, "family", None) == "parcae"


VE_SITES = ("attn.hook_ve_gate", "attn.hook_ve")
sites.register([
    Site("attn.hook_ve_gate", "layer", "B S K", _is_parcae, "Parcae: 2*sigmoid(ve_gate(x[..., :32])), value-embedding layers only"),
    Site("attn.hook_ve", "layer", "B S K hd", _is_parcae, "Parcae: the gated value embedding added to v"),
], before={"attn.hook_ve_gate": "attn.hook_q", "attn.hook_ve": "attn.hook_q"})
sites.register([
    Site("hook_state_term", "pass", "B S Ds", _is_parcae, "Parcae: the injection's state term (diagonal: s * decay)"),
    Site("hook_input_term", "pass", "B S Ds", _is_parcae, "Parcae: the injection's input term (diagonal: dt * (e @ B^T))"),
], before={"hook_state_term": "hook_injected", "hook_input_term": "hook_injected"})
sites.register([
    *[Site(f"ln_prelude.{leaf}", "model", shape, lambda c: _is_parcae(c) and c.extra["parcae"].get("prelude_norm", False),
           "Parcae: the norm after the prelude (prelude_norm)") for leaf, shape in (("hook_scale", "B S 1"), ("hook_normalized", "B S D"))],
    Site("hook_prelude_out", "model", "B S D", _is_parcae, "Parcae: e, the prelude's output injected at every recurrence"),
], before={"ln_prelude.hook_scale": "hook_latent", "ln_prelude.hook_normalized": "hook_latent", "hook_prelude_out": "hook_latent"})


def parcae_layer_hooks(cfg: LoopConfig, ve: bool) -> Hooks:
    """One layer's hook points: the layer sites of the config, the value-embedding ones only on
    layers that add a value embedding."""
    return Hooks(s.path for s in sites.sites("layer", cfg) if ve or s.path not in VE_SITES)


def parcae_pass_hooks(cfg: LoopConfig) -> Hooks:
    """One recurrence's hook points, `iter.{t}.*`: hook_state_pre, hook_state_term, hook_input_term,
    hook_injected, the core layers' `blocks.{l}.*`, hook_state_post."""
    ve = settings_of(cfg).value_embedding_sites()
    return pass_hooks(cfg, [parcae_layer_hooks(cfg, ("core", j) in ve) for j in range(cfg.n_block)])


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class HookedParcaeTransformer(HookedLoopedTransformer):
    """A Parcae model: prelude, `n_loops` recurrences of the core on a state of width `d_state`,
    `C` back to `d_model`, coda.

    Parameters: `embed`, `prelude_blocks`, `ln_prelude` (prelude_norm), `injection` (the adapter:
    `A_log`, `dt_bias`, `B`, or a linear map), `blocks` (the core, width d_state), `C`,
    `coda_blocks`, `ln_final`, `unembed`, `value_embeds` (the tables the parity rules use),
    `rope_table` (the saved freqs_cis). `model.settings` holds every switch.

    `model(tokens)` runs `mean_recurrence` recurrences for every row (what the official evaluation
    and `generate` pass); `n_loops=T` any count. `sampled_depths=True` (a run option of `forward`,
    `run_with_cache`, `run_with_hooks`) reproduces the official plain call without
    `num_steps_pair`, which samples a depth per row (or token) even in eval mode:
    `model.sampled_depths(tokens)` gives those depths. The start state is drawn by the
    checkpoint's `state_init` rule from torch's global RNG as the official forward does (or
    `generator=`, or `seed=` per prompt); `initial_state=` [batch, pos, d_state] gives it.
    """

    iteration_hooks_cls = staticmethod(parcae_pass_hooks)

    def __init__(self, cfg: LoopConfig, tokenizer: Any = None):
        if cfg.family != "parcae":
            raise ConfigError(f"family: HookedParcaeTransformer builds family='parcae' configs, got {cfg.family!r}")
        self.settings = settings_of(cfg)
        self._run_opts: dict[str, Any] = {"sampled_depths": False, "train_step": 0}
        self._readout_tokens: Optional[Tensor] = None  # the latest forward's tokens (for finish)
        super().__init__(cfg, tokenizer)

    def _build(self, cfg: LoopConfig) -> None:
        s = self.settings
        ve = s.value_embedding_sites()
        D, S = s.d_model, s.d_state

        def layer(stage: str, i: int, width: int, d_mlp: int, heads: int, kv: int) -> ParcaeBlock:
            return ParcaeBlock(s, width, d_mlp, heads, kv, (stage, i) in ve)

        self.embed = nn.Embedding(s.d_vocab, D)
        self.hook_embed = HookPoint()  # [batch, pos, d_model], after emb_scale
        self.rotary = None  # the angles come from the saved table (`rope_table`, `_rope`)
        self.rope_table = FreqsRotary(s.n_positions, s.d_head) if s.use_rope else None
        self.prelude_blocks = nn.ModuleList(layer("prelude", i, D, s.d_mlp, s.n_heads, s.n_kv_heads) for i in range(s.n_prelude))
        self.prelude = nn.ModuleList(parcae_layer_hooks(cfg, ("prelude", i) in ve) for i in range(s.n_prelude))
        self.ln_prelude = HookedNorm(D, NORMS[s.norm], s.norm_eps) if s.prelude_norm else None
        self.hook_prelude_out = HookPoint()  # [batch, pos, d_model]: e, injected at every recurrence
        self.injection = ParcaeInjection(s.injection, D, S, s.bias)
        self.blocks = nn.ModuleList(layer("core", j, S, s.d_state_mlp, s.n_state_heads, s.n_state_heads) for j in range(s.n_core))
        self.exit_gate = None
        self.C = nn.Linear(S, D, bias=s.bias)
        self.hook_latent = HookPoint()  # [batch, pos, d_model]: C(s), the coda's input
        self.coda_blocks = nn.ModuleList(layer("coda", i, D, s.d_mlp, s.n_heads, s.n_kv_heads) for i in range(s.n_coda))
        self.coda = nn.ModuleList(parcae_layer_hooks(cfg, ("coda", i) in ve) for i in range(s.n_coda))
        self.ln_final = HookedNorm(D, NORMS[s.norm], s.norm_eps)
        self.unembed = nn.Linear(D, s.d_vocab, bias=False)
        if s.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.value_embeds = nn.ModuleDict(
            {key: nn.Embedding(s.d_vocab, s.n_kv_heads * s.d_head) for key in sorted(set(ve.values()), key=int)}
        )

    # ------------------------------------------------------------------ run options
    @contextmanager
    def _options(self, sampled_depths: Any = False, train_step: Any = 0) -> Iterator[dict[str, Any]]:
        """Parcae's run options: `sampled_depths=True` (the official plain call's per-row depths,
        drawn with the model's training step counter `train_step`, 0 after loading)."""
        if not isinstance(sampled_depths, bool):
            raise ValueError(f"sampled_depths must be True or False, got {sampled_depths!r}")
        if isinstance(train_step, bool) or not isinstance(train_step, int) or train_step < 0:
            raise ValueError(f"train_step must be an integer >= 0, got {train_step!r}")
        before = self._run_opts
        self._run_opts = {"sampled_depths": sampled_depths, "train_step": train_step}
        try:
            yield dict(self._run_opts)
        finally:
            self._run_opts = before

    def _current_options(self) -> dict[str, Any]:
        return dict(self._run_opts)

    def sampled_depths(self, input: Any, train_step: int = 0) -> Tensor:
        """The recurrences each row ([batch]) or token ([batch, pos], per-token iteration) runs in
        the official plain call on `input` (what `sampled_depths=True` runs): the official sampler,
        a CPU generator seeded 514229 + train_step; `mean_recurrence` for every row with
        per-batch iteration."""
        with self._options(train_step=train_step):
            tokens, _ = self.as_tokens(input)
            return plain_call_schedule(self.settings, *tokens.shape, self._run_opts["train_step"])[2]

    def _sampled_loops(self, input: Any, n_loops: Any) -> int:
        """The passes of a plain call on `input` (the sampled depths' two phases); refuses n_loops."""
        if n_loops is not None:
            raise ValueError("pass n_loops= or sampled_depths=True, not both: the plain call samples each row's depth")
        tokens, _ = self.as_tokens(input)
        T = plain_call_schedule(self.settings, *tokens.shape, self._run_opts["train_step"])[0]
        if T == 0:
            raise ValueError("the plain call sampled 0 recurrences for every row of this input (the official code "
                             "fails there too); run a fixed count with n_loops=")
        return T

    def forward(self, input: Any, n_loops: Optional[int] = None, *, sampled_depths: bool = False, train_step: int = 0,
                **kwargs: Any) -> Any:
        """`HookedLoopedTransformer.forward` (`n_loops=None`: mean_recurrence), plus
        `sampled_depths=True`: the official plain call, each row (or token) running its own
        sampled depth (`model.sampled_depths(input, train_step)`); the run has as many passes as
        the two sampled phases need, a row keeps its state in the passes it does not run."""
        with self._options(sampled_depths=sampled_depths, train_step=train_step):
            if sampled_depths:
                n_loops = self._sampled_loops(input, n_loops)
            return super().forward(input, n_loops, **kwargs)

    def _loops_of(self, args: tuple, kwargs: dict) -> int:
        if kwargs.get("sampled_depths"):
            with self._options(sampled_depths=True, train_step=kwargs.get("train_step", 0)):
                input = args[0] if args else kwargs.get("input")
                return self._sampled_loops(input, kwargs.get("n_loops", args[1] if len(args) > 1 else None))
        return super()._loops_of(args, kwargs)

    def generate(self, *args: Any, sampled_depths: bool = False, **kwargs: Any) -> Any:
        """`loop_lens.generation.generate`: a fixed count of recurrences per token (`n_loops=`,
        default mean_recurrence, as the official `generate` passes); `sampled_depths=` is refused."""
        if sampled_depths:
            raise ValueError("generate runs n_loops recurrences per token (default mean_recurrence, as the official "
                             "generate passes); sampled_depths=True is a forward option (the plain call)")
        return generation.generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ the network
    def _ve(self, tokens: Tensor, stage: str, layer: int) -> dict[str, Tensor]:
        """`ve=` (the layer's value embedding of the tokens) on layers the parity rules pick."""
        key = self.settings.value_embedding_sites().get((stage, layer))
        return {} if key is None else {"ve": self.value_embeds[key](tokens)}

    def _embed(self, tokens: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """wte(tokens) * emb_scale (the official code skips the product when emb_scale is 1)."""
        x = self.embed(tokens)
        return self.hook_embed(x * self.settings.emb_scale if self.settings.emb_scale != 1 else x)

    def _prelude(self, x: Tensor, run: Run) -> Tensor:
        """The prelude layers (with their value embeddings), then ln_prelude (prelude_norm): e."""
        for i, (blk, hooks) in enumerate(zip(self.prelude_blocks, self.prelude)):
            x = run.layer(("prelude", i), blk, hooks, x, **self._ve(run.tokens, "prelude", i))
        if self.ln_prelude is not None:
            x = self.ln_prelude(x)
        return self.hook_prelude_out(x)

    def _state_shape(self, batch: int, pos: int) -> tuple[int, int, int]:
        return (batch, pos, self.settings.d_state)

    def initial_state(self, e: Tensor, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                      attention_mask: Optional[Tensor] = None) -> Tensor:
        """The state entering recurrence 0, [*e.shape[:-1], d_state], by the checkpoint's
        `state_init` rule (`draw_initial_state`): from `generator`, or torch's global RNG in the
        official order; with `seed=` (and no generator) each prompt draws its own over its real
        tokens (`attention_mask`) from a generator seeded with `seed`."""
        s = self.settings
        shape = (*e.shape[:-1], s.d_state)
        if seed is None or generator is not None:
            return draw_initial_state(s, shape, e.dtype, e.device, generator)
        out = torch.zeros(shape, dtype=e.dtype, device=e.device)
        for b in range(shape[0]):
            real = attention_mask[b].bool() if attention_mask is not None else slice(None)
            n = int(attention_mask[b].sum()) if attention_mask is not None else shape[1]
            g = torch.Generator(device=e.device).manual_seed(int(seed))
            out[b, real] = draw_initial_state(s, (n, s.d_state), e.dtype, e.device, g)
        return out

    def _begin(self, e: Tensor, run: Run) -> Tensor:
        """The state entering pass 0: the rule's draw, zeros, or the given tensor (Parcae's state
        has its own width, so it never starts at the embedding)."""
        if isinstance(run.start, str):
            if run.start == "zeros":
                return e.new_zeros(self._state_shape(*e.shape[:2]))
            raise ValueError(f"initial_state={run.start!r}: a Parcae state (width {self.settings.d_state}) does not start "
                             "at the prelude output; use None (the checkpoint's state_init rule) or 'zeros'")
        return super()._begin(e, run)

    def _pass(self, run: Run, t: int, carry: Tensor, e: Tensor, hooks: Any) -> Tensor:
        """Recurrence t: the injection (its two terms hooked, then their sum), the core layers at
        the state width. With sampled depths, rows (tokens) the pass does not run keep their state
        (they still serve as keys and values, as in the official loop)."""
        s = hooks.hook_state_pre(carry)
        x = self.injection(s, e, hooks)
        for j, blk in enumerate(self.blocks):
            x = run.layer(("iter", t, j), blk, hooks.blocks[j], x, **self._ve(run.tokens, "core", j))
        active = run.options.get("active")
        if active is not None:
            x = torch.where(active[t], x, s)
        return hooks.hook_state_post(x)

    def _to_coda(self, s: Tensor, hooked: bool) -> Tensor:
        """C(s): the state back at the model width (`hook_latent`)."""
        x = self.C(s)
        return self.hook_latent(x) if hooked else x

    def _coda(self, x: Tensor, run: Run) -> Tensor:
        for i, (blk, hooks) in enumerate(zip(self.coda_blocks, self.coda)):
            x = run.layer(("coda", run.coda_t, i), blk, hooks, x, **self._ve(run.tokens, "coda", i))
        return x

    def _readout(self, state: Tensor, run: Run, t: Optional[int] = None) -> Tensor:
        x = self._to_coda(state, hooked=False)
        for i, blk in enumerate(self.coda_blocks):
            x = run.layer(("coda", t, i), blk, NO_HOOKS, x, count=False, **self._ve(run.tokens, "coda", i))
        return self._unembed(x, hooked=False)

    def _unembed(self, x: Tensor, hooked: bool = True) -> Tensor:
        """ln_f, lm_head over the padded vocabulary, in fp32, times logit_scale, then the softcap."""
        s = self.settings
        x = self.ln_final(x) if hooked else self.ln_final(x, NO_HOOKS)
        logits = self.unembed(x).float() * s.logit_scale
        if s.logit_softcap is not None:
            logits = s.logit_softcap * torch.tanh(logits / s.logit_softcap)
        return logits

    def _prepare(self, input: Any, *args: Any, **kwargs: Any) -> Run:
        """The base checks, then the run options; with sampled depths, each pass's active rows.
        Remembers the run's tokens for `finish` (the coda's value embeddings read them)."""
        run = super()._prepare(input, *args, **kwargs)
        run.options.update(self._run_opts)
        if self._run_opts["sampled_depths"]:
            _, masks, depths = plain_call_schedule(self.settings, *run.tokens.shape, self._run_opts["train_step"])
            run.options["active"] = None if masks is None else [m.to(run.tokens.device) for m in masks]
        self._readout_tokens = run.tokens
        return run

    def finish(self, state: Tensor, attention_mask: Optional[Tensor] = None, tokens: Any = None) -> Tensor:
        """Logits from a recurrent state [batch, pos, d_state]: C, the coda, ln_f, lm_head (the coda
        lens), unhooked. A coda layer that adds a value embedding reads the tokens: `tokens=`
        [batch, pos], by default those of the model's latest forward run (`run_with_cache`: the
        run a cache-based analysis reads), which must have the state's batch and length."""
        B, S = state.shape[:2]
        if tokens is not None:
            tokens, _ = self.as_tokens(tokens, "tokens")
        elif any(stage == "coda" for stage, _ in self.settings.value_embedding_sites()):
            tokens = getattr(self, "_readout_tokens", None)
            if tokens is None:
                raise ValueError("finish / the coda lens: a coda layer of this Parcae model adds a value embedding of "
                                 "the tokens; pass tokens= (no forward run to take them from yet)")
        else:
            tokens = torch.zeros(B, S, dtype=torch.long, device=state.device)  # read by no layer
        if tuple(tokens.shape) != (B, S):
            raise ValueError(f"finish / the coda lens: the tokens (tokens= or the latest run's) have shape "
                             f"{tuple(tokens.shape)}, but the state is [batch, pos] = {(B, S)}; pass the state's tokens=")
        rope = self._rope(S, state.device)
        return self._readout(state, Run(tokens.to(state.device), 0, "last", attention_mask, None, rope, None))

    def _rope(self, S: int, device: torch.device, positions: Optional[Tensor] = None) -> Any:
        """(cos, sin) from the saved freqs_cis table, for 0..S-1 or per-row `positions`."""
        if self.rope_table is None:
            return None
        return self.rope_table(S, device) if positions is None else self.rope_table.at(positions)

    def _additivity_breaks(self, per_head: bool) -> list[str]:
        return [*super()._additivity_breaks(per_head), "Parcae's state is mapped by C before the coda (and the core "
                f"runs at the state width {self.settings.d_state})"]

    def logit_lens_readout(self, x: Tensor, hook: Optional[str], normed: bool) -> Tensor:
        """The logit lens of an activation: `_unembed` (ln_f, lm_head, logit_scale, softcap) of it,
        after `C` when it is a recurrent state (`iter.{t}.*`, or `hook=None` for a state leaving a
        recurrence), i.e. the coda skipped. `lens='coda'` reads a state through the coda too."""
        loop_state = hook is None or hook.startswith("iter.")
        width = self.settings.d_state if loop_state else self.settings.d_model
        if x.shape[-1] != width:
            where = f"at {hook}" if hook else "(a recurrent state: hook=None)"
            raise ValueError(f"the logit lens {where} reads width {width}, got {x.shape[-1]}")
        return self._unembed(self.C(x) if loop_state else x, hooked=False)

    def hook_names(self, n_loops: Optional[int] = None) -> list[str]:
        """The base's, with ln_prelude.* and hook_prelude_out where they fire (after the prelude)."""
        names = super().hook_names(n_loops)
        early = [n for n in names if n.startswith(("ln_prelude.", "hook_prelude_out"))]
        rest = [n for n in names if n not in early]
        at = next(i for i, n in enumerate(rest) if n.startswith("iter."))
        return rest[:at] + early + rest[at:]
