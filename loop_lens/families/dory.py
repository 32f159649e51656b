"""Dory (NVIDIA Nemotron-Labs Dory1.0): a looped nGPT, `(p, k x T, c)` with unit-sphere layers.

What one decoder layer computes (`docs/families/dory.md` has the whole model and every hook):

    h  = x / |x|                                         ln1          (|.| = L2 length, in fp32)
    q, k = unit(q_proj h), unit(k_proj h) per head, RoPE (this layer type's theta)
    q  = q * (sqk * sqrt(d_head) / init)^2               learned query scale per channel
    z  = softmax(q k^T / sqrt(d_head) + causal[, sliding window]) v
    z  = z * sigmoid(gate_proj(h) * (s_gate * d_model^0.25 / init)^2)       attn.hook_gate
    a  = unit(o_proj(unit(z)))                           attn.ln_sub, ln1_post
    x  = h + |lambda_1 * alpha / init| * (a - h)         hook_attn_lerp = the second term
    h  = x / |x|                                         ln2
    m  = unit(down(unit(act(gate(h) * suv_gate sqrt(D)) * up(h) * suv_up sqrt(D))))
    x  = h + |lambda_2 * alpha / init| * (m - h)         hook_mlp_lerp = the second term

`init` is `initializer_range`, `alpha` is `ngpt_alpha_init`: nGPT stores every learned scale as
`s` and uses `s * s_init / init`. The loop: `e` = the prelude's output, each pass starts from
`unit(h) + unit(e)` (`iter.{t}.hook_state_pre`; `h = e` before the first pass), the coda follows,
then `unit(.)` (`ln_final`) and `lm_head(x) * logit_scale / init` (in fp32).

Weight modules own no hook points; each `forward` takes its site's hook container (or
`NO_HOOKS`), as in `loop_lens.model.components`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loop_lens.config import (
    NUMBER,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    LoopConfig,
    Rule,
    choice,
    show_value,
)
from loop_lens.errors import ConfigError
from loop_lens.model import sites
from loop_lens.model.components import Rotary
from loop_lens.model.hooks import NO_HOOKS, BlockHooks, has_hooks
from loop_lens.model.looped import HookedLoopedTransformer
from loop_lens.model.run import Run
from loop_lens.model.sites import Site

ATTENTION_TYPES = ("sliding_attention", "full_attention")
ROPE_TYPES = ("default", "linear", "llama3")
KV_CACHE_MODES = ("per_loop", "last_loop")
EPS = 1e-6  # transformers' DoryL2Norm() eps, added to the sum of squares

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}
"""`hidden_act` values and what transformers' ACT2FN computes for them."""

def _error(field: str, problem: str) -> ConfigError:
    """A ConfigError naming the field of `cfg.extra["dory"]` (LoopConfig's convention)."""
    err = ConfigError(f"extra.dory.{field}: {problem}")
    err.fields, err.problem = (field,), problem
    return err


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DorySettings:
    """Dory's switches beyond LoopConfig's layout and widths; stored as `cfg.extra["dory"]`."""

    layer_types: tuple[str, ...]
    """Attention type of every decoder layer, prelude first, then the block, then the coda."""
    sliding_window: int
    """Keys a sliding layer's query sees, itself included (key j visible from query i when i - window < j <= i)."""
    rope: dict[str, dict[str, Any]]
    """Per attention type: `rope_type` (default / linear / llama3), `rope_theta` and the type's fields."""
    initializer_range: float
    ngpt_alpha_init: float
    hidden_act: str
    kv_cache_mode: str = "per_loop"
    """How `generate` caches the block's keys and values (see docs/families/dory.md)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.check()

    def check(self) -> None:
        """Type- and range-check every field; ConfigError naming the field."""
        if not self.layer_types or not all(isinstance(t, str) and t in ATTENTION_TYPES for t in self.layer_types):
            raise _error("layer_types", f"expected a non-empty list of {list(ATTENTION_TYPES)}, got {show_value(self.layer_types)}")
        rules: dict[str, Rule] = {
            "sliding_window": POSITIVE_INT,
            "initializer_range": POSITIVE_NUMBER,
            "ngpt_alpha_init": NUMBER,
            "hidden_act": choice(tuple(ACTIVATIONS)),
            "kv_cache_mode": choice(KV_CACHE_MODES),
        }
        for name, rule in rules.items():
            if not rule.ok(getattr(self, name)):
                raise _error(name, f"expected {rule.what}, got {show_value(getattr(self, name))}")
        if not isinstance(self.rope, dict):
            raise _error("rope", f"expected an object keyed by attention type, got {show_value(self.rope)}")
        for kind in sorted(set(self.layer_types)):
            if kind not in self.rope:
                raise _error("rope", f"no RoPE parameters for {kind!r} layers")
            problem = rope_problem(self.rope[kind])
            if problem:
                raise _error(f"rope.{kind}", problem)

    def to_extra(self) -> dict[str, Any]:
        """The JSON object stored in `LoopConfig.extra["dory"]`."""
        out = asdict(self)
        out["layer_types"] = list(self.layer_types)
        return out

    @classmethod
    def from_cfg(cls, cfg: LoopConfig) -> DorySettings:
        """The settings of a Dory LoopConfig; ConfigError when `cfg.extra["dory"]` is absent or wrong."""
        extra = cfg.extra.get("dory")
        if not isinstance(extra, dict):
            raise ConfigError("extra.dory: a Dory model needs its settings in LoopConfig.extra['dory']")
        unknown = sorted(set(extra) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"extra.dory: unknown field(s) {unknown}")
        try:
            settings = cls(**extra)
        except TypeError as err:  # a required field missing
            raise ConfigError(f"extra.dory: {err}") from err
        n_layers = cfg.n_prelude + cfg.n_block + cfg.n_coda
        if len(settings.layer_types) != n_layers:
            raise _error(
                "layer_types",
                f"{len(settings.layer_types)} entries, but n_prelude + n_block + n_coda = {n_layers} layers",
            )
        return settings


def rope_problem(params: Any) -> Optional[str]:
    """What is wrong with one attention type's RoPE parameters, or None."""
    if not isinstance(params, dict):
        return f"expected an object, got {show_value(params)}"
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        return f"rope_type {show_value(kind)} is not supported; supported: {list(ROPE_TYPES)}"
    fields = {"rope_theta": POSITIVE_NUMBER}
    if kind == "linear":
        fields["factor"] = POSITIVE_NUMBER
    if kind == "llama3":
        fields.update(factor=POSITIVE_NUMBER, original_max_position_embeddings=POSITIVE_INT,
                      low_freq_factor=POSITIVE_NUMBER, high_freq_factor=POSITIVE_NUMBER)
    unknown = sorted(set(params) - set(fields) - {"rope_type"})
    if unknown:
        return f"field(s) {unknown} are not read for rope_type {kind!r}"
    for key, rule in fields.items():
        if key not in params:
            return f"rope_type {kind!r} needs {key!r}"
        if not rule.ok(params[key]):
            return f"{key!r}: expected {rule.what}, got {show_value(params[key])}"
    if kind == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        return "llama3 needs high_freq_factor > low_freq_factor"
    return None


def make_rotary(params: dict[str, Any], d_head: int) -> Rotary:
    """A rotate-half `Rotary` for one attention type's RoPE parameters (checked by `rope_problem`)."""
    kind = params.get("rope_type", "default")
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if kind == "llama3" else None
    rotary = Rotary(SimpleNamespace(rope_style="rotate_half", d_head=d_head, rope_theta=params["rope_theta"], rope_scaling=scaling))
    if kind == "linear":  # positions divided by the factor
        rotary.inv_freq = rotary.inv_freq / params["factor"]
    return rotary


# --------------------------------------------------------------------------- components


def unit(x: Tensor, eps: float = EPS) -> Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dimension, in fp32, back in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class SphereNorm(nn.Module):
    """Projection onto the unit sphere (nGPT's norm): `x / sqrt(sum(x^2) + eps)`, no weight.

    Hooks: `hook_scale` = the length `sqrt(sum(x^2) + eps)` [..., 1] (the RMSNorm counterpart
    gives the RMS there), `hook_normalized` = the unit vector."""

    def __init__(self, eps: float = EPS):
        super().__init__()
        self.eps = eps

    def forward(self, x: Float[Tensor, "... d"], hooks=NO_HOOKS) -> Float[Tensor, "... d"]:
        xf = x.float()
        inv = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + self.eps)
        if has_hooks(hooks.hook_scale):
            inv = 1.0 / hooks.hook_scale(1.0 / inv)
        return hooks.hook_normalized((xf * inv).to(x.dtype))


class HookedSphereNorm(SphereNorm):
    """A sphere norm used at one site only (`ln_final`), so it owns its hook points."""

    def __init__(self, eps: float = EPS):
        super().__init__(eps)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor, hooks=None) -> Tensor:
        return super().forward(x, self if hooks is None else hooks)


def window_bias(
    S: int,
    past: int,
    window: Optional[int],
    mask: Optional[Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Additive attention bias [1 or batch, 1, S, past + S]: 0 where allowed, a large negative elsewhere.

    Query i sits at index past + i; key j is allowed when j <= past + i, (with a window) when
    j > past + i - window, and (with `mask`, [batch, past + S], 1 = real token) when it is real.
    A query whose row would be empty (a pad query under left padding) keeps its own key so the
    softmax stays finite; real queries are unaffected."""
    qi = torch.arange(S, device=device)[:, None] + past
    kj = torch.arange(past + S, device=device)[None, :]
    allowed = kj <= qi
    if window is not None:
        allowed = allowed & (kj > qi - window)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = (allowed & mask.bool()[:, None, None, :]) | (kj == qi)[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def rotate_half(x: Float[Tensor, "batch pos head d_head"], rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate-half RoPE of queries or keys by (cos, sin) [pos, d_head] or [batch, pos, d_head] (in fp32)."""
    cos, sin = (r[:, :, None, :] if r.ndim == 3 else r[None, :, None, :] for r in rope)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class DoryAttention(nn.Module):
    """nGPT attention: unit q/k per head, RoPE, learned query scale `sqk`, sigmoid output gate
    scaled by `s_gate`, a sphere norm before `o_proj`; causal, or a sliding window."""

    def __init__(self, cfg: LoopConfig, settings: DorySettings, attention_type: str):
        super().__init__()
        D, H, K, hd = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        self.n_heads, self.n_kv, self.d_head = H, K, hd
        self.attention_type = attention_type
        self.window = settings.sliding_window if attention_type == "sliding_attention" else None
        init = settings.initializer_range
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(D, K * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(D, K * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.attn_bias)
        self.gate_proj = nn.Linear(D, H * hd, bias=False)
        self.sqk = nn.Parameter(torch.full((H * hd,), init))
        self.s_gate = nn.Parameter(torch.full((H * hd,), init))
        self.sqk_factor = hd**0.5 / init  # s_init / initializer_range
        self.s_gate_factor = D**0.25 / init
        self.scale = hd**-0.5
        self.ln_sub = SphereNorm()

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        """Query weights in TransformerLens's layout (queries are then made unit per head)."""
        return self.q_proj.weight.reshape(self.n_heads, self.d_head, -1).transpose(1, 2)

    @property
    def W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self.k_proj.weight.reshape(self.n_kv, self.d_head, -1).transpose(1, 2)

    @property
    def W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self.v_proj.weight.reshape(self.n_kv, self.d_head, -1).transpose(1, 2)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """Output weights in TransformerLens's layout (their input is the unit gated z)."""
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_head, -1)

    def query_scale(self) -> Float[Tensor, "head d_head"]:
        """What multiplies the rotated unit queries: `(sqk * sqrt(d_head) / init)^2`."""
        return (self.sqk * self.sqk_factor).square().view(self.n_heads, self.d_head)

    def gate_scale(self) -> Float[Tensor, "head d_head"]:
        """What multiplies `gate_proj(h)` inside the sigmoid: `(s_gate * d_model^0.25 / init)^2`."""
        return (self.s_gate * self.s_gate_factor).square().view(self.n_heads, self.d_head)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        hooks,
        rotary: Any,
        rope: Any,
        mask: Optional[Tensor],
        kv: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`rope`: (cos, sin) by attention type (the model's `_rope`); `rotary` is not read.
        `mask`: [batch, past + pos], 1 = real token. `kv(k, v)`: a KV cache site, as in
        `components.Attention` (rotated keys [batch, kv_head, pos, d_head] in, past + pos out)."""
        B, S, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv, self.d_head
        rope = rope[self.attention_type]
        q = hooks.hook_q(unit(self.q_proj(x).view(B, S, H, hd)))
        k = hooks.hook_k(unit(self.k_proj(x).view(B, S, K, hd)))
        v = hooks.hook_v(self.v_proj(x).view(B, S, K, hd))
        q = hooks.hook_rot_q(rotate_half(q, rope))
        k = hooks.hook_rot_k(rotate_half(k, rope))
        q = q * self.query_scale()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
        if kv is not None:
            k, v = kv(k, v)
        past = k.shape[2] - S
        bias = window_bias(S, past, self.window, mask, q.dtype, x.device)
        if has_hooks(hooks.hook_attn_scores) or has_hooks(hooks.hook_pattern):
            if K != H:
                k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
            scores = hooks.hook_attn_scores((q @ k.transpose(-1, -2)) * self.scale + bias)
            pattern = hooks.hook_pattern(torch.softmax(scores.float(), dim=-1).to(v.dtype))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale, enable_gqa=K != H)
        z = hooks.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        gate = hooks.hook_gate(torch.sigmoid(self.gate_proj(x).view(B, S, H, hd) * self.gate_scale()))
        return self.o_proj(self.ln_sub((z * gate).reshape(B, S, H * hd), hooks.ln_sub))


class DoryMLP(nn.Module):
    """Scaled gated MLP: `down(unit(act(gate(h) * suv_gate sqrt(D)) * up(h) * suv_up sqrt(D)))`."""

    def __init__(self, cfg: LoopConfig, settings: DorySettings):
        super().__init__()
        D, d_mlp = cfg.d_model, cfg.d_mlp
        self.act = ACTIVATIONS[settings.hidden_act]
        self.gate_proj = nn.Linear(D, d_mlp, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(D, d_mlp, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(d_mlp, D, bias=cfg.mlp_bias)
        self.suv_gate = nn.Parameter(torch.ones(d_mlp))
        self.suv_up = nn.Parameter(torch.ones(d_mlp))
        self.suv_factor = D**0.5
        self.ln_sub = SphereNorm()

    def forward(self, x: Float[Tensor, "batch pos d_model"], hooks) -> Float[Tensor, "batch pos d_model"]:
        pre = hooks.hook_pre(self.gate_proj(x) * (self.suv_gate * self.suv_factor))
        pre_linear = hooks.hook_pre_linear(self.up_proj(x) * (self.suv_up * self.suv_factor))
        post = hooks.hook_post(self.act(pre) * pre_linear)
        return self.down_proj(self.ln_sub(post, hooks.ln_sub))


class DoryLayer(nn.Module):
    """One Dory decoder layer: two nGPT interpolation steps on the unit sphere. Returns what
    transformers' `DoryDecoderLayer` returns (not normalised: the next layer's `ln1` does that)."""

    def __init__(self, cfg: LoopConfig, settings: DorySettings, index: int):
        super().__init__()
        self.index = index  # position in the checkpoint's layer list
        self.attention_type = settings.layer_types[index]
        self.ln1, self.ln1_post, self.ln2, self.ln2_post = SphereNorm(), SphereNorm(), SphereNorm(), SphereNorm()
        self.attn = DoryAttention(cfg, settings, self.attention_type)
        self.mlp = DoryMLP(cfg, settings)
        init = settings.initializer_range
        self.lambda_1 = nn.Parameter(torch.full((cfg.d_model,), init))
        self.lambda_2 = nn.Parameter(torch.full((cfg.d_model,), init))
        self.lambda_factor = settings.ngpt_alpha_init / init

    def rates(self) -> tuple[Float[Tensor, " d_model"], Float[Tensor, " d_model"]]:
        """The interpolation rates actually used: `|lambda_i * ngpt_alpha_init / init|`."""
        return (self.lambda_1 * self.lambda_factor).abs(), (self.lambda_2 * self.lambda_factor).abs()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        hooks,
        rotary: Any = None,
        rope: Any = None,
        mask: Optional[Tensor] = None,
        kv: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        rate_attn, rate_mlp = self.rates()
        x = hooks.hook_resid_pre(x)
        h = self.ln1(x, hooks.ln1)
        a = hooks.hook_attn_out(self.ln1_post(self.attn(h, hooks.attn, rotary, rope, mask, kv), hooks.ln1_post))
        x = hooks.hook_resid_mid(h + hooks.hook_attn_lerp(rate_attn * (a - h)))
        h = self.ln2(x, hooks.ln2)
        m = hooks.hook_mlp_out(self.ln2_post(self.mlp(h, hooks.mlp), hooks.ln2_post))
        return hooks.hook_resid_post(h + hooks.hook_mlp_lerp(rate_mlp * (m - h)))


class DoryUnembed(nn.Module):
    """`lm_head` with the per-token logit scale: `(x W^T) * logit_scale / init`, in fp32."""

    def __init__(self, d_model: int, d_vocab: int, initializer_range: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))
        self.logit_scale = nn.Parameter(torch.full((d_vocab,), initializer_range))
        self.register_parameter("bias", None)  # as nn.Linear's, for code reading an unembedding's bias
        self.out_features = d_vocab
        self.factor = 1.0 / initializer_range
        nn.init.normal_(self.weight, std=initializer_range)

    def token_scale(self) -> Float[Tensor, " d_vocab"]:
        """The factor each token's logit is multiplied by (fp32)."""
        return self.logit_scale.float() * self.factor

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return F.linear(x, self.weight).float() * self.token_scale()


# --------------------------------------------------------------------------- hook sites


def _is_dory(cfg: Any) -> bool:
    return cfg.family == "dory"


sites.register(
    [
        Site("attn.ln_sub.hook_scale", "layer", "B S 1", _is_dory, "Dory: length of the gated z (attn_sub_norm)"),
        Site("attn.ln_sub.hook_normalized", "layer", "B S HD", _is_dory, "Dory: the unit gated z, o_proj's input"),
        Site("hook_attn_lerp", "layer", "B S D", _is_dory,
             "Dory: |lambda_1 alpha/init| * (hook_attn_out - ln1.hook_normalized), what the attention step adds"),
        Site("mlp.ln_sub.hook_scale", "layer", "B S 1", _is_dory, "Dory: length of mlp.hook_post (ffn_sub_norm)"),
        Site("mlp.ln_sub.hook_normalized", "layer", "B S M", _is_dory, "Dory: the unit mlp.hook_post, down_proj's input"),
        Site("hook_mlp_lerp", "layer", "B S D", _is_dory,
             "Dory: |lambda_2 alpha/init| * (hook_mlp_out - ln2.hook_normalized), what the MLP step adds"),
    ],
    attributes={"ln_sub"},
    before={
        "attn.ln_sub.hook_scale": "ln1_post.hook_scale",
        "attn.ln_sub.hook_normalized": "ln1_post.hook_scale",
        "hook_attn_lerp": "hook_resid_mid",
        "mlp.ln_sub.hook_scale": "ln2_post.hook_scale",
        "mlp.ln_sub.hook_normalized": "ln2_post.hook_scale",
    },
)


# --------------------------------------------------------------------------- the model


class HookedDoryTransformer(HookedLoopedTransformer):
    """Dory: prelude = the input layers, `blocks` = the recurrent layers (run `n_loops` times),
    coda = the output layers, every layer an nGPT layer on the unit sphere (`DoryLayer`).

    The carry between passes is the last recurrent layer's output `h`; pass t starts from
    `iter.{t}.hook_state_pre` = `unit(h) + unit(e)` (`e` = the prelude's output, `h = e` before
    pass 0). Logits: `lm_head(unit(coda(h))) * logit_scale / init` (fp32). `model.generate`
    keeps its KV cache as the checkpoint's `recurrent_kv_cache_mode` says (`per_loop`: one per
    (pass, layer), `last_loop`: passes before the last read the last pass's cache and write
    nothing), or as `generate(..., kv_cache_mode=)` says.
    """

    def __init__(self, cfg: LoopConfig, tokenizer: Any = None):
        if cfg.family != "dory":
            raise ConfigError(f"family: a HookedDoryTransformer needs family='dory', got {cfg.family!r}")
        self.dory = DorySettings.from_cfg(cfg)
        self._kv_mode = self.dory.kv_cache_mode  # the KV-cache mode of the generation under way
        super().__init__(cfg, tokenizer)

    def _build(self, cfg: LoopConfig) -> None:
        """Embedding, Dory layers in three stacks, one RoPE per attention type, the final sphere
        norm and the unembedding with its per-token logit scale."""
        s = self.dory
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()
        self.rotary = None  # the layers read one RoPE per attention type (`_rope`)
        self.rotaries = nn.ModuleDict({kind: make_rotary(s.rope[kind], cfg.d_head) for kind in sorted(set(s.layer_types))})
        first_block, first_coda = cfg.n_prelude, cfg.n_prelude + cfg.n_block
        self.prelude_blocks = nn.ModuleList(DoryLayer(cfg, s, i) for i in range(first_block))
        self.prelude = nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_prelude))
        self.blocks = nn.ModuleList(DoryLayer(cfg, s, first_block + i) for i in range(cfg.n_block))
        self.injection = self.exit_gate = None
        self.state_norm = SphereNorm()  # unit(h) and unit(e) at each pass's start
        self.coda_blocks = nn.ModuleList(DoryLayer(cfg, s, first_coda + i) for i in range(cfg.n_coda))
        self.coda = nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_coda))
        self.ln_final = HookedSphereNorm()
        self.hook_latent = HookPoint()
        self.unembed = DoryUnembed(cfg.d_model, cfg.d_vocab, s.initializer_range)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding with the per-token logit scale folded in: logits = unit(x) @ W_U."""
        return (self.unembed.weight.T.float() * self.unembed.token_scale()).to(self.unembed.weight.dtype)

    def _rope(self, S: int, device: torch.device, positions: Optional[Tensor] = None) -> dict[str, tuple[Tensor, Tensor]]:
        """(cos, sin) per attention type, for positions 0..S-1 or per-row `positions` [batch, pos]."""
        if positions is None:
            return {kind: rot(S, device) for kind, rot in self.rotaries.items()}
        return {kind: rot.at(positions) for kind, rot in self.rotaries.items()}

    def _pass(self, run: Run, t: int, h: Tensor, e: Tensor, hooks: Any) -> Tensor:
        """Pass t: start from unit(h) + unit(e), run the recurrent layers."""
        x = hooks.hook_state_pre(self.state_norm(h) + self.state_norm(e))
        for layer, blk in enumerate(self.blocks):
            x = run.layer(("iter", t, layer), blk, hooks.blocks[layer], x)
        return hooks.hook_state_post(x)

    def measured_state(self, x: Tensor, kind: str) -> Tensor:
        """Residual-stream activations on the unit sphere (every Dory layer and every pass reads
        only the direction of its input; the length is not part of the state)."""
        if kind.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_state_post", "hook_latent")):
            return unit(x)
        return x

    # ------------------------------------------------------------------ generation's KV cache
    @contextmanager
    def _options(self, kv_cache_mode: Optional[str] = None) -> Iterator[dict[str, Any]]:
        """Dory's generation option: `kv_cache_mode=` ("per_loop" or "last_loop"; default the
        checkpoint's `recurrent_kv_cache_mode`)."""
        mode = self.dory.kv_cache_mode if kv_cache_mode is None else kv_cache_mode
        if mode not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache_mode must be one of {list(KV_CACHE_MODES)}, got {mode!r}")
        before, self._kv_mode = self._kv_mode, mode
        try:
            yield {"kv_cache_mode": mode}
        finally:
            self._kv_mode = before

    def _kv_policy(self, site: tuple, n_loops: int) -> tuple[tuple, bool]:
        """`last_loop`: a recurrent layer in a pass before the last reads the last pass's cached
        keys of that layer (plus its own new ones) and appends nothing, as transformers'
        `DoryPastReader`; `per_loop`: every (pass, layer) its own."""
        if self._kv_mode == "last_loop" and site[0] == "iter" and site[1] < n_loops - 1:
            return ("iter", n_loops - 1, *site[2:]), False
        return site, True

    def _additivity_breaks(self, per_head: bool) -> list[str]:
        return ["Dory's nGPT layers put the residual back on the unit sphere at every sublayer (h + rate * (a - h) "
                "from unit inputs), and every pass starts from unit(h) + unit(e)"]
