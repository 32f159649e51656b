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

from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from loop_lens.checks import check_n_loops, positive_int
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
from loop_lens.model import hooks as _hooks
from loop_lens.model.components import Rotary
from loop_lens.model.hooks import NO_HOOKS, NormHooks, has_hooks

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

DORY_HOOK_ATTRIBUTES = frozenset({"hook_attn_lerp", "hook_mlp_lerp", "ln_sub"})
"""Hook container attributes Dory's layers use that the shared containers do not have."""

# TEMPORARY (until the core's site table, issue 21): NO_HOOKS answers only names in
# hooks.HOOK_ATTRIBUTES, so extend that set here rather than editing loop_lens/model/hooks.py.
if not DORY_HOOK_ATTRIBUTES <= _hooks.HOOK_ATTRIBUTES:
    _hooks.HOOK_ATTRIBUTES = _hooks.HOOK_ATTRIBUTES | DORY_HOOK_ATTRIBUTES


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


def _pick(table: Any, kind: str) -> Any:
    """A per-attention-type entry (`rotary` / `rope` given as a dict or ModuleDict), or `table` itself."""
    if isinstance(table, (dict, nn.ModuleDict)):
        return table[kind]
    return table


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
        """`rotary` / `rope`: a Rotary and its (cos, sin), or dicts of them by attention type.
        `mask`: [batch, past + pos], 1 = real token. `kv(k, v)`: a KV cache site, as in
        `components.Attention` (rotated keys [batch, kv_head, pos, d_head] in, past + pos out)."""
        B, S, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv, self.d_head
        rotary, rope = _pick(rotary, self.attention_type), _pick(rope, self.attention_type)
        q = hooks.hook_q(unit(self.q_proj(x).view(B, S, H, hd)))
        k = hooks.hook_k(unit(self.k_proj(x).view(B, S, K, hd)))
        v = hooks.hook_v(self.v_proj(x).view(B, S, K, hd))
        q = hooks.hook_rot_q(rotary.rotate(q, rope))
        k = hooks.hook_rot_k(rotary.rotate(k, rope))
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
        self.factor = 1.0 / initializer_range
        nn.init.normal_(self.weight, std=initializer_range)

    def token_scale(self) -> Float[Tensor, " d_vocab"]:
        """The factor each token's logit is multiplied by (fp32)."""
        return self.logit_scale.float() * self.factor

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return F.linear(x, self.weight).float() * self.token_scale()


# --------------------------------------------------------------------------- hook containers


class DoryAttnHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_q = HookPoint()  # [batch, pos, head, d_head], unit per head, before RoPE
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head], unit per head, before RoPE
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_rot_q = HookPoint()  # after RoPE, before the sqk scale
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query, key], scaled, masked
        self.hook_pattern = HookPoint()  # [batch, head, query, key]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head], pattern @ v, before the gate
        self.hook_gate = HookPoint()  # [batch, pos, head, d_head], the sigmoid gate multiplying z
        self.ln_sub = NormHooks()  # sphere norm of the gated z, the o_proj input


class DoryMLPHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp], gate_proj(h) * suv_gate * sqrt(D)
        self.hook_pre_linear = HookPoint()  # up_proj(h) * suv_up * sqrt(D)
        self.hook_post = HookPoint()  # act(pre) * pre_linear
        self.ln_sub = NormHooks()  # sphere norm of hook_post, the down_proj input


class DoryLayerHooks(nn.Module):
    """The hook points of one Dory layer at one site, in firing order."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model], the layer's input (not unit)
        self.ln1 = NormHooks()  # hook_normalized = h, the unit input
        self.attn = DoryAttnHooks()
        self.ln1_post = NormHooks()  # on the attention output
        self.hook_attn_out = HookPoint()  # the unit attention output a (the target of the step)
        self.hook_attn_lerp = HookPoint()  # |lambda_1 alpha/init| * (a - h): what the step adds to h
        self.hook_resid_mid = HookPoint()  # h + hook_attn_lerp (not unit)
        self.ln2 = NormHooks()  # hook_normalized = the unit residual entering the MLP
        self.mlp = DoryMLPHooks()
        self.ln2_post = NormHooks()  # on the MLP output
        self.hook_mlp_out = HookPoint()  # the unit MLP output m
        self.hook_mlp_lerp = HookPoint()  # |lambda_2 alpha/init| * (m - h2)
        self.hook_resid_post = HookPoint()  # h2 + hook_mlp_lerp = what DoryDecoderLayer returns


class DoryPassHooks(nn.Module):
    """One pass of Dory's loop: `iter.{t}.*`."""

    def __init__(self, n_block: int) -> None:
        super().__init__()
        self.hook_state_pre = HookPoint()  # unit(h) + unit(e): what the pass's first layer receives
        self.blocks = nn.ModuleList(DoryLayerHooks() for _ in range(n_block))
        self.hook_state_post = HookPoint()  # the pass's last layer output (= blocks[-1].hook_resid_post)

    def clear_hook_contexts(self) -> None:
        for module in self.modules():
            if isinstance(module, HookPoint):
                module.clear_context()


# --------------------------------------------------------------------------- the family

_LAYER_SITES = {
    "hook_attn_lerp": "[batch, pos, d_model] |lambda_1 alpha/init| * (hook_attn_out - ln1.hook_normalized)",
    "hook_mlp_lerp": "[batch, pos, d_model] |lambda_2 alpha/init| * (hook_mlp_out - ln2.hook_normalized)",
    "attn.hook_gate": "[batch, pos, head, d_head] sigmoid(gate_proj(h) * (s_gate d_model^0.25/init)^2)",
    "attn.ln_sub.hook_scale": "[batch, pos, 1] length of the gated z",
    "attn.ln_sub.hook_normalized": "[batch, pos, head * d_head] unit gated z, the o_proj input",
    "mlp.ln_sub.hook_scale": "[batch, pos, 1] length of mlp.hook_post",
    "mlp.ln_sub.hook_normalized": "[batch, pos, d_mlp] unit mlp.hook_post, the down_proj input",
}


class DoryFamily:
    """Dory on the one-loop core: prelude = the input layers, blocks = the recurrent layers (run
    `n_loops` times), coda = the output layers. The carry between passes is the last recurrent
    layer's output `h` (a tensor); each pass starts from `unit(h) + unit(e)`."""

    name = "dory"
    sites = {
        "layer": _LAYER_SITES,
        "pass": {
            "hook_state_pre": "[batch, pos, d_model] unit(h) + unit(e), the pass's start",
            "hook_state_post": "[batch, pos, d_model] the pass's output h (not unit)",
        },
        "model": {
            "hook_embed": "[batch, pos, d_model] token embedding (no scale)",
            "ln_final.hook_scale": "[batch, pos, 1] length of the coda's output",
            "ln_final.hook_normalized": "[batch, pos, d_model] its unit vector, the lm_head input",
        },
    }

    def build(self, model: nn.Module) -> None:
        """Create Dory's weight modules on `model` (which has `cfg`, a Dory LoopConfig): `embed`,
        `prelude_blocks`, `blocks`, `coda_blocks`, `rotaries` (one per attention type),
        `state_norm`, `ln_final`, `unembed` (tied to `embed` when `cfg.tie_embeddings`)."""
        cfg = model.cfg
        settings = DorySettings.from_cfg(cfg)
        model.dory = settings
        first_block, first_coda = cfg.n_prelude, cfg.n_prelude + cfg.n_block
        model.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        model.prelude_blocks = nn.ModuleList(DoryLayer(cfg, settings, i) for i in range(first_block))
        model.blocks = nn.ModuleList(DoryLayer(cfg, settings, first_block + i) for i in range(cfg.n_block))
        model.coda_blocks = nn.ModuleList(DoryLayer(cfg, settings, first_coda + i) for i in range(cfg.n_coda))
        model.rotaries = nn.ModuleDict({
            kind: make_rotary(settings.rope[kind], cfg.d_head) for kind in sorted(set(settings.layer_types))
        })
        model.state_norm = SphereNorm()
        model.ln_final = HookedSphereNorm()
        model.unembed = DoryUnembed(cfg.d_model, cfg.d_vocab, settings.initializer_range)
        if cfg.tie_embeddings:
            model.unembed.weight = model.embed.weight

    @staticmethod
    def rope(model: nn.Module, positions: Int[Tensor, "batch pos"] | int, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
        """(cos, sin) per attention type: for `positions` = a length S (positions 0..S-1, as
        transformers' forward without position_ids) or per-row positions [batch, pos]."""
        if isinstance(positions, int):
            return {kind: rot(positions, device) for kind, rot in model.rotaries.items()}
        return {kind: rot.at(positions) for kind, rot in model.rotaries.items()}

    def embed(self, model: nn.Module, run: Any) -> Tensor:
        return model.hook_embed(model.embed(run.tokens))

    def begin(self, model: nn.Module, run: Any, e: Tensor) -> Tensor:
        """The carry entering pass 0: the prelude's output itself (pass 0 starts from 2 unit(e))."""
        return e

    def step(self, model: nn.Module, run: Any, t: int, carry: Tensor, e: Tensor, hooks: Any) -> Tensor:
        x = hooks.hook_state_pre(model.state_norm(carry) + model.state_norm(e))
        for layer, block in enumerate(model.blocks):
            x = run.layer(("iter", t, layer), block, hooks.blocks[layer], x)
        return hooks.hook_state_post(x)

    def gate(self, model: nn.Module, run: Any, t: int, carry: Tensor, hooks: Any) -> None:
        return None  # Dory has no exit gate

    def state(self, carry: Tensor) -> Tensor:
        return carry

    def readout(self, model: nn.Module, run: Any, state: Tensor, hooked: bool) -> Tensor:
        """The coda, the final sphere norm, lm_head with the per-token logit scale (fp32 logits)."""
        x = state
        for layer, block in enumerate(model.coda_blocks):
            x = run.layer(("coda", layer), block, model.coda[layer] if hooked else NO_HOOKS, x)
        x = model.ln_final(x) if hooked else model.ln_final(x, NO_HOOKS)
        return model.unembed(x)



# --------------------------------------------------------------------------- TEMPORARY driver
# Everything below stands in for the one-loop core (issue 21) so the family can be tested now;
# the lead replaces it with the core's model class and deletes it. It runs the family through the
# interface only: embed -> prelude (run.layer) -> begin -> step per pass -> state -> readout.


class _DoryKV:
    """TEMPORARY: a KV cache per site, as transformers' `generate` keeps Dory's (see
    docs/families/dory.md). `per_loop`: every (pass, layer) has its own keys and values.
    `last_loop`: passes before the last read the last pass's cache of that layer (plus their own
    new keys) and write nothing; the last pass reads and writes it."""

    def __init__(self, mode: str, n_loops: int):
        self.mode, self.n_loops = mode, n_loops
        self.store: dict[tuple, tuple[Tensor, Tensor]] = {}

    def site(self, site: tuple) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        read = write = site
        if self.mode == "last_loop" and site[0] == "iter" and site[1] < self.n_loops - 1:
            read, write = ("iter", self.n_loops - 1, site[2]), None

        def kv(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            if read in self.store:
                past_k, past_v = self.store[read]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            if write is not None:
                self.store[write] = (k, v)
            return k, v

        return kv


@dataclass
class _DoryRun:
    """TEMPORARY: the core's run object, reduced to what Dory's layers need."""

    tokens: Tensor
    mask: Optional[Tensor]
    rotary: nn.ModuleDict
    rope: dict[str, tuple[Tensor, Tensor]]
    kv: Optional[_DoryKV] = None

    def layer(self, site: tuple, block: nn.Module, hooks: Any, x: Tensor, **extra: Any) -> Tensor:
        kv = self.kv.site(site) if self.kv is not None else None
        return block(x, hooks, self.rotary, self.rope, self.mask, kv, **extra)


class DoryModelLike(HookedRootModule):
    """TEMPORARY stand-in for the core's model: holds `cfg`, the hook containers (`hook_embed`,
    `prelude.{l}`, `iter.{t}` for t < `max_loops`, `coda.{l}`) and the weights `DoryFamily.build`
    creates. `model(tokens, n_loops=, attention_mask=, positions=)` runs `dory_forward`."""

    def __init__(self, cfg: LoopConfig, max_loops: int = 8):
        super().__init__()
        self.cfg = cfg
        self.family = DoryFamily()
        self.hook_embed = HookPoint()
        self.prelude = nn.ModuleList(DoryLayerHooks() for _ in range(cfg.n_prelude))
        self.iter = nn.ModuleDict()
        self.coda = nn.ModuleList(DoryLayerHooks() for _ in range(cfg.n_coda))
        self.family.build(self)
        self.ensure_passes(max(max_loops, cfg.default_loops))

    def ensure_passes(self, n_loops: int) -> None:
        """Hook containers for passes 0..n_loops-1 (created up front so hooks by name can reach them)."""
        if all(str(t) in self.iter for t in range(n_loops)):
            return
        for t in range(n_loops):
            if str(t) not in self.iter:
                self.iter[str(t)] = DoryPassHooks(self.cfg.n_block)
        self.setup()

    def forward(self, tokens: Tensor, n_loops: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                positions: Optional[Tensor] = None) -> Tensor:
        return dory_forward(self, tokens, n_loops, attention_mask=attention_mask, positions=positions)


def dory_forward(
    model_like: DoryModelLike,
    tokens: Int[Tensor, "batch pos"],
    n_loops: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """TEMPORARY end-to-end forward through the family interface; fp32 logits [batch, pos, vocab].

    `n_loops` defaults to the checkpoint's `n_recurrent_loops`. `attention_mask` [batch, pos]
    (1 = real token) masks padding keys; positions are 0..pos-1 as in transformers' forward
    without `position_ids`, or `positions` [batch, pos] (e.g. `cumsum(mask) - 1`, as generate)."""
    n_loops = check_n_loops(n_loops, model_like.cfg.default_loops)
    _check_inputs(model_like.cfg, tokens, attention_mask, positions)
    return _run(model_like, tokens, n_loops, attention_mask, positions, None)


def _check_inputs(cfg: LoopConfig, tokens: Any, attention_mask: Any, positions: Any) -> None:
    """TEMPORARY: ValueError naming the argument when tokens, attention_mask or positions are wrong."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be an integer tensor [batch, pos], got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.d_vocab):
        raise ValueError(f"tokens must lie in [0, {cfg.d_vocab}), got {int(tokens.min())}..{int(tokens.max())}")
    for name, value in (("attention_mask", attention_mask), ("positions", positions)):
        if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != tuple(tokens.shape)):
            raise ValueError(f"{name} must have the tokens' shape {tuple(tokens.shape)}, got {getattr(value, 'shape', value)!r}")
    if attention_mask is not None and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")


def _run(model_like: DoryModelLike, tokens: Tensor, n_loops: int, mask: Optional[Tensor],
         positions: Optional[Tensor], kv: Optional[_DoryKV]) -> Tensor:
    """TEMPORARY: embed -> prelude -> begin -> step per pass -> readout, through the family."""
    family = model_like.family
    model_like.ensure_passes(n_loops)
    rope = family.rope(model_like, tokens.shape[1] if positions is None else positions.long(), tokens.device)
    run = _DoryRun(tokens, mask, model_like.rotaries, rope, kv)
    x = family.embed(model_like, run)
    for layer, block in enumerate(model_like.prelude_blocks):
        x = run.layer(("prelude", layer), block, model_like.prelude[layer], x)
    e = x
    carry = family.begin(model_like, run, e)
    for t in range(n_loops):
        carry = family.step(model_like, run, t, carry, e, model_like.iter[str(t)])
    return family.readout(model_like, run, family.state(carry), hooked=True)


@torch.no_grad()
def dory_generate(
    model_like: DoryModelLike,
    tokens: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    n_loops: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
    kv_cache_mode: Optional[str] = None,
    use_cache: bool = True,
) -> Int[Tensor, "batch pos_out"]:
    """TEMPORARY greedy generation as transformers' `generate` does it for Dory: positions
    `cumsum(mask) - 1` (0 on padding), then one more per new token; with `use_cache`, a KV cache
    in `kv_cache_mode` (default: the checkpoint's `recurrent_kv_cache_mode`), else every step
    recomputes the whole sequence. Returns the prompt followed by the new tokens."""
    cfg = model_like.cfg
    n_loops = check_n_loops(n_loops, cfg.default_loops)
    max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
    mode = model_like.dory.kv_cache_mode if kv_cache_mode is None else kv_cache_mode
    if mode not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache_mode must be one of {list(KV_CACHE_MODES)}, got {mode!r}")
    _check_inputs(cfg, tokens, attention_mask, None)
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.to(tokens.dtype)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    kv = _DoryKV(mode, n_loops) if use_cache else None
    out = tokens
    logits = _run(model_like, tokens, n_loops, mask, positions, kv)
    for step in range(max_new_tokens):
        new = logits[:, -1].argmax(-1, keepdim=True).to(tokens.dtype)
        out = torch.cat([out, new], dim=1)
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if step == max_new_tokens - 1:
            break
        if kv is not None:
            logits = _run(model_like, new, n_loops, mask, positions[:, -1:], kv)
        else:
            logits = _run(model_like, out, n_loops, mask, positions, None)
    return out
