"""Parcae (SandyResearch, "Parcae: Stable Looped Language Models"): a prelude, a looped core on a
recurrent state of its own width, a projection `C` back to the model width, and a coda.

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
    x = C(s)                                            hook_projected
    logits = softcap(lm_head(ln_f(coda(x))) * logit_scale)   coda.{l}.*, ln_final.*

Layers are pre-norm; attention may add a gated value embedding to v (`attn.hook_ve_gate`,
`attn.hook_ve`), clamps q/k/v (`clip_qkv`), adds a qk bias, rotates adjacent pairs with the saved
`freqs_cis` table, then applies a parameter-free RMS norm to q and k (`qk_norm`).

The family follows the one-loop core's `Family` interface (issue 21). Until the core lands,
`ParcaeModel` and `parcae_forward` at the bottom of this module are a TEMPORARY driver that runs
the family through that interface, so the family can be tested now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loop_lens.errors import ConfigError
from loop_lens.model.components import Attention, Norm, Rotary, causal_bias
from loop_lens.model.hooks import NO_HOOKS, NormHooks, has_hooks

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


def _hp(hooks: Any, name: str) -> Any:
    """`hooks.<name>`, or NO_HOOKS when `hooks` is NO_HOOKS (which does not know Parcae's own names)."""
    return hooks if hooks is NO_HOOKS else getattr(hooks, name)


class FreqsRotary(Rotary):
    """RoPE on adjacent pairs (x[2i], x[2i+1]) with the angles of the checkpoint's saved
    `freqs_cis` buffer [1, n_positions, 1, d_head/2, 2] (cos, sin), not recomputed from a theta:
    both official loaders use the saved table. `rotate` is the shared adjacent-pair rotation."""

    def __init__(self, n_positions: int, d_head: int):
        nn.Module.__init__(self)
        self.style = "adjacent"
        self.n_positions = n_positions
        self.register_buffer("freqs_cis", torch.zeros(1, n_positions, 1, d_head // 2, 2))
        self._cache: dict = {}

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
            gate = _hp(hooks, "hook_ve_gate")(2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS])))
            v = v + _hp(hooks, "hook_ve")(gate.unsqueeze(-1) * ve.view(B, S, K, hd))
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(min=-c, max=c), k.clamp(min=-c, max=c), v.clamp(min=-c, max=c)
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k, v = hooks.hook_q(q), hooks.hook_k(k), hooks.hook_v(v)
        if rope is not None:
            q, k = rotary.rotate(q, rope), rotary.rotate(k, rope)
        if self.qk_norm:
            q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
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
        state_term = _hp(hooks, "hook_state_term")(state_term)
        input_term = _hp(hooks, "hook_input_term")(input_term)
        return hooks.hook_injected(state_term + input_term)


# ---------------------------------------------------------------------------------------------------
# Hook containers (no weights). The core will build these from `ParcaeFamily.sites`; until then
# `ParcaeFamily.make_hooks` builds them for the temporary driver.
# ---------------------------------------------------------------------------------------------------


class ParcaeAttnHooks(nn.Module):
    def __init__(self, ve: bool) -> None:
        super().__init__()
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_rot_q = HookPoint()  # after RoPE and qk-norm
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query, key]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        if ve:
            self.hook_ve_gate = HookPoint()  # [batch, pos, kv_head], in (0, 2)
            self.hook_ve = HookPoint()  # [batch, pos, kv_head, d_head], gate * value embedding


class ParcaeMLPHooks(nn.Module):
    def __init__(self, gated: bool) -> None:
        super().__init__()
        self.hook_pre = HookPoint()
        if gated:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()


class ParcaeBlockHooks(nn.Module):
    def __init__(self, ve: bool, gated: bool) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.ln1 = NormHooks()
        self.attn = ParcaeAttnHooks(ve)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.ln2 = NormHooks()
        self.mlp = ParcaeMLPHooks(gated)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()


class ParcaePassHooks(nn.Module):
    """`iter.{t}.*`: one recurrence."""

    def __init__(self, s: ParcaeSettings) -> None:
        super().__init__()
        sites = s.value_embedding_sites()
        self.hook_state_pre = HookPoint()  # [batch, pos, d_state]: the state the pass starts from
        self.hook_state_term = HookPoint()  # [batch, pos, d_state]: the injection's state (decay) term
        self.hook_input_term = HookPoint()  # [batch, pos, d_state]: the injection's input term
        self.hook_injected = HookPoint()  # [batch, pos, d_state]: their sum, the core's input
        self.blocks = nn.ModuleList(
            ParcaeBlockHooks(("core", j) in sites, s.mlp == "GatedMLP") for j in range(s.n_core)
        )
        self.hook_state_post = HookPoint()  # [batch, pos, d_state]: the state after the pass


class ParcaeHooks(nn.Module):
    """Every hook point of a run, by name (TEMPORARY, for `parcae_forward`; the core will own
    these): hook_embed, prelude.{l}.*, ln_prelude.*, iter.{t}.*, hook_projected, coda.{l}.*,
    ln_final.*."""

    def __init__(self, s: ParcaeSettings, n_loops: int = 0) -> None:
        super().__init__()
        self.settings = s
        sites, gated = s.value_embedding_sites(), s.mlp == "GatedMLP"
        self.hook_embed = HookPoint()
        self.prelude = nn.ModuleList(ParcaeBlockHooks(("prelude", i) in sites, gated) for i in range(s.n_prelude))
        if s.prelude_norm:
            self.ln_prelude = NormHooks()
        self.hook_prelude_out = HookPoint()  # [batch, pos, d_model]: e, injected at every recurrence
        self.iter = nn.ModuleDict()
        self.hook_projected = HookPoint()  # [batch, pos, d_model]: C(state), the coda's input
        self.coda = nn.ModuleList(ParcaeBlockHooks(("coda", i) in sites, gated) for i in range(s.n_coda))
        self.ln_final = NormHooks()
        self.ensure(n_loops)

    def ensure(self, n_loops: int) -> None:
        """Pass containers iter.0 .. iter.{n_loops-1}."""
        for t in range(len(self.iter), n_loops):
            self.iter[str(t)] = ParcaePassHooks(self.settings)

    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by its full name."""
        return {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}


# ---------------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------------


class ParcaeFamily:
    """Parcae on the one-loop core's `Family` interface. The carry is the recurrent state
    [batch, pos, d_state]; there is no exit gate. Besides the interface's methods, `prelude`
    (the prelude layers with their value embeddings, then ln_prelude) and `layer_extra` (the
    per-layer `ve=` input) are what the core needs from the family to run Parcae's outer layers."""

    name = "parcae"
    sites = {
        "layer": ("attn.hook_ve_gate", "attn.hook_ve"),  # value-embedding layers only
        "pass": ("hook_state_term", "hook_input_term"),
        "model": ("ln_prelude.hook_scale", "ln_prelude.hook_normalized", "hook_prelude_out", "hook_projected"),
    }

    def __init__(self, settings: ParcaeSettings):
        self.settings = settings

    # -- modules ---------------------------------------------------------------------------------
    def build(self, model: nn.Module) -> None:
        """Create Parcae's modules on `model`: embed, prelude_blocks, ln_prelude, injection, blocks
        (the core, width d_state), C, coda_blocks, ln_final, unembed, value_embeds (the tables the
        parity rules apply, keyed as in the checkpoint), rotary (the saved freqs_cis table)."""
        s = self.settings
        sites = s.value_embedding_sites()
        model.embed = nn.Embedding(s.d_vocab, s.d_model)
        model.prelude_blocks = nn.ModuleList(
            ParcaeBlock(s, s.d_model, s.d_mlp, s.n_heads, s.n_kv_heads, ("prelude", i) in sites)
            for i in range(s.n_prelude)
        )
        model.ln_prelude = Norm(s.d_model, NORMS[s.norm], s.norm_eps) if s.prelude_norm else None
        model.injection = ParcaeInjection(s.injection, s.d_model, s.d_state, s.bias)
        model.blocks = nn.ModuleList(
            ParcaeBlock(s, s.d_state, s.d_state_mlp, s.n_state_heads, s.n_state_heads, ("core", j) in sites)
            for j in range(s.n_core)
        )
        model.C = nn.Linear(s.d_state, s.d_model, bias=s.bias)
        model.coda_blocks = nn.ModuleList(
            ParcaeBlock(s, s.d_model, s.d_mlp, s.n_heads, s.n_kv_heads, ("coda", i) in sites)
            for i in range(s.n_coda)
        )
        model.ln_final = Norm(s.d_model, NORMS[s.norm], s.norm_eps)
        model.unembed = nn.Linear(s.d_model, s.d_vocab, bias=False)
        if s.tie_embeddings:
            model.unembed.weight = model.embed.weight
        model.value_embeds = nn.ModuleDict(
            {key: nn.Embedding(s.d_vocab, s.n_kv_heads * s.d_head) for key in sorted(set(sites.values()), key=int)}
        )
        model.rotary = FreqsRotary(s.n_positions, s.d_head) if s.use_rope else None

    def make_hooks(self, n_loops: int = 0) -> ParcaeHooks:
        """The hook containers of a run of `n_loops` recurrences (TEMPORARY: the core will build them)."""
        return ParcaeHooks(self.settings, n_loops)

    def layer_extra(self, model: nn.Module, run: Any, stage: str, layer: int) -> dict[str, Tensor]:
        """Extra keyword inputs of one layer: `ve=` (its value embedding of run.tokens) on the
        layers the parity rules pick, nothing elsewhere."""
        key = self.settings.value_embedding_sites().get((stage, layer))
        return {} if key is None else {"ve": model.value_embeds[key](run.tokens)}

    # -- the interface ---------------------------------------------------------------------------
    def embed(self, model: nn.Module, run: Any) -> Tensor:
        """wte(tokens) * emb_scale (the official code skips the product when emb_scale is 1)."""
        x = model.embed(run.tokens)
        return x * self.settings.emb_scale if self.settings.emb_scale != 1 else x

    def prelude(self, model: nn.Module, run: Any, x: Tensor, hooked: Any) -> Tensor:
        """The prelude layers (`prelude.{l}.*`), then ln_prelude (`ln_prelude.*`) when prelude_norm:
        e (`hook_prelude_out`), the tensor injected at every recurrence. `hooked` is the run's root
        hook container."""
        prelude_hooks = _hp(hooked, "prelude")
        for i, block in enumerate(model.prelude_blocks):
            x = run.layer(("prelude", i), block, prelude_hooks[i], x, **self.layer_extra(model, run, "prelude", i))
        if model.ln_prelude is not None:
            x = model.ln_prelude(x, _hp(hooked, "ln_prelude"))
        return _hp(hooked, "hook_prelude_out")(x)

    def begin(self, model: nn.Module, run: Any, e: Tensor) -> Tensor:
        """The state entering pass 0: `run.initial_state` when given, otherwise a draw by the
        checkpoint's `state_init` rule (`draw_initial_state`, from `run.generator` or, when that
        is None, the global RNG exactly as the official forward draws it)."""
        given = getattr(run, "initial_state", None)
        shape = (*e.shape[:-1], self.settings.d_state)
        if given is not None:
            if tuple(given.shape) != shape:
                raise ValueError(f"initial_state has shape {tuple(given.shape)}, expected {shape} (batch, pos, d_state)")
            return given.to(device=e.device, dtype=e.dtype)
        return draw_initial_state(self.settings, shape, e.dtype, e.device, getattr(run, "generator", None))

    def step(self, model: nn.Module, run: Any, t: int, carry: Tensor, e: Tensor, hooks: Any) -> Tensor:
        """Recurrence t: inject, then the core layers. Rows (or tokens) that `run.active[t]`
        marks inactive keep their state (the official per-row sampled depth)."""
        x = hooks.hook_state_pre(carry)
        x = model.injection(x, e, hooks)
        for j, block in enumerate(model.blocks):
            x = run.layer(("iter", t, j), block, hooks.blocks[j], x, **self.layer_extra(model, run, "core", j))
        active = getattr(run, "active", None)
        if active is not None:
            x = torch.where(active[t], x, carry)
        return hooks.hook_state_post(x)

    def gate(self, model: nn.Module, run: Any, t: int, carry: Tensor, hooks: Any) -> Optional[Tensor]:
        """Parcae has no exit gate."""
        return None

    def state(self, carry: Tensor) -> Tensor:
        """The recurrent state [batch, pos, d_state] (d_state may differ from d_model: `readout`
        maps it through C first)."""
        return carry

    def readout(self, model: nn.Module, run: Any, state: Tensor, hooked: Any) -> Tensor:
        """C (hook_projected), the coda layers (coda.{l}.*), ln_f (ln_final.*), lm_head over the
        padded vocabulary, in fp32, times logit_scale, then the logit softcap when set."""
        s = self.settings
        x = _hp(hooked, "hook_projected")(model.C(state))
        coda_hooks = _hp(hooked, "coda")
        for i, block in enumerate(model.coda_blocks):
            x = run.layer(("coda", i), block, coda_hooks[i], x, **self.layer_extra(model, run, "coda", i))
        x = model.ln_final(x, _hp(hooked, "ln_final"))
        logits = model.unembed(x).float() * s.logit_scale
        if s.logit_softcap is not None:
            logits = s.logit_softcap * torch.tanh(logits / s.logit_softcap)
        return logits


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
# TEMPORARY driver (until the one-loop core lands and registers this family): a plain holder of the
# family's modules and a forward that runs the family through the interface.
# ---------------------------------------------------------------------------------------------------


@dataclass
class ParcaeRun:
    """TEMPORARY stand-in for the core's run object: the inputs of one forward."""

    tokens: Tensor
    rotary: Optional[FreqsRotary]
    rope: Any
    mask: Optional[Tensor] = None
    initial_state: Optional[Tensor] = None
    generator: Optional[torch.Generator] = None
    active: Optional[list[Tensor]] = None
    sites: list = field(default_factory=list)

    def layer(self, site: tuple, block: nn.Module, hooks: Any, x: Tensor, **extra: Any) -> Tensor:
        """One layer (the core's `run.layer`: stop_at_layer and the KV cache hang here)."""
        self.sites.append(site)
        return block(x, hooks, self.rotary, self.rope, self.mask, None, **extra)


class ParcaeModel(nn.Module):
    """TEMPORARY holder of a Parcae model's modules (built by `ParcaeFamily.build`), so the family
    can be loaded and run before the core exists. `model(tokens, n_loops)` is `parcae_forward`."""

    def __init__(self, settings: ParcaeSettings):
        super().__init__()
        self.settings = settings
        self.family = ParcaeFamily(settings)
        self.family.build(self)

    def forward(self, tokens: Tensor, n_loops: Optional[int] = None, **kwargs: Any) -> Tensor:
        return parcae_forward(self, tokens, n_loops, **kwargs)


def parcae_forward(
    model: ParcaeModel,
    tokens: Int[Tensor, "batch pos"],
    n_loops: Optional[int] = None,
    *,
    hooks: Optional[ParcaeHooks] = None,
    initial_state: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    sampled_depths: bool = False,
    train_step: int = 0,
) -> Float[Tensor, "batch pos d_vocab"]:
    """TEMPORARY driver: logits [batch, pos, d_vocab (padded)] of `n_loops` recurrences (default
    mean_recurrence, what the official evaluation and generation pass), running the family through
    the interface: embed -> prelude -> begin -> step per recurrence -> readout.

    `sampled_depths=True` reproduces the official plain call (no `num_steps_pair`): each row (or
    token, per recurrent_iteration_method) runs its own sampled depth (`plain_call_schedule`, with
    the model's training step counter `train_step`, 0 for a loaded checkpoint); `n_loops` must then
    be None. `initial_state` [batch, pos, d_state] replaces the draw; otherwise the state is drawn
    from `generator` (None: the global RNG, as the official forward does). `hooks` (from
    `model.family.make_hooks()`) fires every hook point; it grows to the run's passes."""
    fam, s = model.family, model.settings
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError("tokens must be an integer tensor [batch, pos]")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= s.d_vocab):
        raise ValueError(f"tokens must lie in [0, {s.d_vocab}), got {int(tokens.min())}..{int(tokens.max())}")
    if sampled_depths and n_loops is not None:
        raise ValueError("pass n_loops or sampled_depths=True, not both: the plain call samples each row's depth")
    if n_loops is not None and (not isinstance(n_loops, int) or isinstance(n_loops, bool) or n_loops < 0):
        raise ValueError(f"n_loops must be a non-negative integer, got {n_loops!r}")
    B, S = tokens.shape
    rope = model.rotary(S, tokens.device) if model.rotary is not None else None
    run = ParcaeRun(tokens, model.rotary, rope, initial_state=initial_state, generator=generator)
    root = hooks if hooks is not None else NO_HOOKS
    x = _hp(root, "hook_embed")(fam.embed(model, run))
    e = fam.prelude(model, run, x, root)
    carry = fam.begin(model, run, e)
    if sampled_depths:
        T, run.active, _ = plain_call_schedule(s, B, S, train_step)
    else:
        T = s.mean_recurrence if n_loops is None else n_loops
    if hooks is not None:
        hooks.ensure(T)
    for t in range(T):
        pass_hooks = hooks.iter[str(t)] if hooks is not None else NO_HOOKS
        carry = fam.step(model, run, t, carry, e, pass_hooks)
        fam.gate(model, run, t, carry, pass_hooks)
    return fam.readout(model, run, fam.state(carry), root)
