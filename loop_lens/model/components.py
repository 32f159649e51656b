"""Components shared by every looped family: norms, RoPE, attention, MLP, block, injection.

Weight modules here never own hook points. Each `forward` takes a hooks container (see
`hooks.py`) so the recurrent block's weights exist once while its hook points exist once per
iteration. Passing `NO_HOOKS` runs the same computation with no hook calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from loop_lens.config import LoopConfig
from loop_lens.model.hooks import NO_HOOKS, has_hooks

Rope = Optional[tuple[Tensor, Tensor]]


class Norm(nn.Module):
    """RMSNorm (`w * x / sqrt(mean(x^2) + eps)`, in fp32, no +1 offset) or LayerNorm."""

    def __init__(self, d: int, kind: str = "RMS", eps: float = 1e-6, weight: bool = True):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d)) if weight else None  # None: parameterless
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "LN" else None

    def forward(self, x: Float[Tensor, "... d"], hooks=NO_HOOKS) -> Float[Tensor, "... d"]:
        xf = x.float()
        if self.kind == "LN":
            xf = xf - xf.mean(-1, keepdim=True)
        inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if has_hooks(hooks.hook_scale):
            inv = 1.0 / hooks.hook_scale(1.0 / inv)
        out = hooks.hook_normalized((xf * inv).to(x.dtype))
        if self.weight is not None:
            out = out * self.weight
        return out + self.bias if self.bias is not None else out


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict) -> Tensor:
    """HF Llama's "llama3" frequency rescaling (smooth between low and high frequencies)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotary position embeddings, rotate-half (NeoX/Llama) or adjacent pairs (GPT-J/Huginn)."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.style = cfg.rope_style
        d = cfg.d_head
        # on the CPU even while a model is built on the meta device (a meta arange imports sympy: 0.5 s)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
        if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cache: dict = {}

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [pos, d_head] in fp32."""
        key = (seq_len, device)
        if key not in self._cache:
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))  # [pos, d_head/2]
            if self.style == "rotate_half":
                emb = torch.cat([freqs, freqs], dim=-1)
            else:
                emb = freqs.repeat_interleave(2, dim=-1)
            self._cache = {key: (emb.cos(), emb.sin())}
        return self._cache[key]

    def at(self, positions: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [batch, pos, d_head] for per-row positions (generation with a KV cache)."""
        needed = int(positions.max()) + 1
        length = max(64, 1 << (needed - 1).bit_length())  # a power of two: one table serves many steps
        cos, sin = self(length, positions.device)
        return cos[positions], sin[positions]

    def rotate(self, x: Float[Tensor, "batch pos head d_head"], rope: tuple[Tensor, Tensor]) -> Tensor:
        """Rotate queries or keys by their positions' angles (`rope` = cos, sin: [pos, d_head] from
        `forward`, or [batch, pos, d_head] from `at`)."""
        cos, sin = (r[:, :, None, :] if r.ndim == 3 else r[None, :, None, :] for r in rope)
        xf = x.float()
        if self.style == "rotate_half":
            x1, x2 = xf.chunk(2, dim=-1)
            rotated = torch.cat([-x2, x1], dim=-1)
        else:
            rotated = torch.stack([-xf[..., 1::2], xf[..., 0::2]], dim=-1).flatten(-2)
        return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with GQA, optional qk bias (before RoPE) and qk-norm."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.d_head = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        self.scale = cfg.attn_scale
        D, H, K, hd = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(D, K * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(D, K * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.attn_bias)
        # cfg.attn_gate: a sigmoid gate per head and channel on the attention output, from the layer's input
        self.gate_proj = nn.Linear(D, H * hd, bias=cfg.attn_bias) if cfg.attn_gate else None
        self.q_bias = nn.Parameter(torch.zeros(H, hd)) if cfg.qk_bias else None
        self.k_bias = nn.Parameter(torch.zeros(K, hd)) if cfg.qk_bias else None
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "full":
            self.q_norm, self.k_norm = Norm(H * hd, "RMS", cfg.norm_eps), Norm(K * hd, "RMS", cfg.norm_eps)
        elif cfg.qk_norm == "head":
            self.q_norm, self.k_norm = Norm(hd, "RMS", cfg.norm_eps), Norm(hd, "RMS", cfg.norm_eps)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """Output weights in TransformerLens's layout."""
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_head, -1)

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return self.q_proj.weight.reshape(self.n_heads, self.d_head, -1).transpose(1, 2)

    @property
    def W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self.k_proj.weight.reshape(self.n_kv, self.d_head, -1).transpose(1, 2)

    @property
    def W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self.v_proj.weight.reshape(self.n_kv, self.d_head, -1).transpose(1, 2)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        hooks,
        rotary: Optional[Rotary],
        rope: Rope,
        mask: Optional[Tensor],
        kv: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend over this call's positions, or with `kv` (a KV cache site, see
        `loop_lens.generation`) over the cached positions too: `kv(k, v)` receives this call's
        rotated keys and values [batch, kv_head, pos, d_head] and returns the keys and values to
        attend to [batch, kv_head, past + pos, d_head]; `mask` then covers past + pos keys."""
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.d_head)
        k = k.view(B, S, self.n_kv, self.d_head)
        v = v.view(B, S, self.n_kv, self.d_head)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.q_bias is not None:
            q, k = q + self.q_bias, k + self.k_bias
        q, k, v = hooks.hook_q(q), hooks.hook_k(k), hooks.hook_v(v)
        if rope is not None:
            q, k = hooks.hook_rot_q(rotary.rotate(q, rope)), hooks.hook_rot_k(rotary.rotate(k, rope))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
        past = 0
        if kv is not None:
            k, v = kv(k, v)
            past = k.shape[2] - S
        if has_hooks(hooks.hook_attn_scores) or has_hooks(hooks.hook_pattern):
            if self.n_kv != self.n_heads:
                rep = self.n_heads // self.n_kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q @ k.transpose(-1, -2)) * self.scale  # [batch, head, q, k]
            scores = hooks.hook_attn_scores(scores + causal_bias(S, x.device, scores.dtype, mask, past))
            pattern = hooks.hook_pattern(torch.softmax(scores.float(), dim=-1).to(v.dtype))
            z = pattern @ v
        else:
            plain = mask is None and past == 0
            z = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=None if plain or (mask is None and S == 1) else causal_bias(S, x.device, q.dtype, mask, past),
                is_causal=plain,
                scale=self.scale,
                enable_gqa=self.n_kv != self.n_heads,
            )
        z = hooks.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        if self.gate_proj is not None:  # hook_gate: sigmoid(gate_proj(x)), [batch, pos, head, d_head]
            z = z * hooks.hook_gate(torch.sigmoid(self.gate_proj(x)).view(B, S, self.n_heads, self.d_head))
        return self.o_proj(z.reshape(B, S, -1))


def causal_bias(S: int, device: torch.device, dtype: torch.dtype, mask: Optional[Tensor], past: int = 0) -> Tensor:
    """Additive bias [1 or batch, 1, q, k]: 0 where attention is allowed, a large negative elsewhere.

    `mask` is [batch, past + pos] with 1 for real tokens; `past` cached keys come before the `S`
    queries' own. A query row that would be fully masked (a pad query with left padding) keeps
    attention to itself so softmax stays finite. A 3-d boolean `mask` [batch, pos, past + pos] is
    taken as the full pattern of allowed (query, key) pairs instead (a PrefixLM mask).
    """
    if mask is not None and mask.ndim == 3:
        neg = torch.finfo(dtype).min
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask.bool(), neg)[:, None]
    allowed = torch.ones(S, past + S, dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
        own = torch.ones(S, past + S, dtype=torch.bool, device=device).tril(diagonal=past).triu(diagonal=past)
        allowed = allowed | own[None, None]
    neg = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, neg)


_ACTS = {
    "swiglu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}


class MLP(nn.Module):
    """Gated (SwiGLU: down(silu(gate x) * up x)) or plain (down(act(up x))) MLP."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.gated = cfg.mlp_type == "swiglu"
        self.act = _ACTS[cfg.mlp_type]
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias) if self.gated else None
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: Float[Tensor, "batch pos d_model"], hooks) -> Float[Tensor, "batch pos d_model"]:
        if self.gated:
            pre = hooks.hook_pre(self.gate_proj(x))
            post = hooks.hook_post(self.act(pre) * hooks.hook_pre_linear(self.up_proj(x)))
        else:
            post = hooks.hook_post(self.act(hooks.hook_pre(self.up_proj(x))))
        return self.down_proj(post)


class Block(nn.Module):
    """One transformer layer; `cfg.norm_placement` picks where its norms sit."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.placement = cfg.norm_placement
        mk = lambda: Norm(cfg.d_model, cfg.normalization_type, cfg.norm_eps, weight=cfg.norm_weight)  # noqa: E731
        self.ln1 = mk() if self.placement != "post" else None
        self.ln2 = mk() if self.placement != "post" else None
        self.ln1_post = mk() if self.placement != "pre" else None
        self.ln2_post = mk() if self.placement != "pre" else None
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        hooks,
        rotary: Optional[Rotary] = None,
        rope: Rope = None,
        mask: Optional[Tensor] = None,
        kv: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """One layer; `kv` is a KV cache site for attention (see `Attention.forward`)."""
        x = hooks.hook_resid_pre(x)
        a_in = x if self.ln1 is None else self.ln1(x, hooks.ln1)
        a = self.attn(a_in, hooks.attn, rotary, rope, mask, kv)
        x = self._add(x, a, self.ln1_post, hooks.ln1_post, hooks.hook_attn_out)
        x = hooks.hook_resid_mid(x)
        m_in = x if self.ln2 is None else self.ln2(x, hooks.ln2)
        m = self.mlp(m_in, hooks.mlp)
        x = self._add(x, m, self.ln2_post, hooks.ln2_post, hooks.hook_mlp_out)
        return hooks.hook_resid_post(x)

    def _add(self, x: Tensor, out: Tensor, post_norm: Optional[Norm], norm_hooks, out_hook) -> Tensor:
        """Residual update. `out_hook` sees what the sublayer adds (after its norm, if any)."""
        if self.placement == "sandwich_resid":
            return post_norm(x + out_hook(out), norm_hooks)
        if post_norm is not None:
            out = post_norm(out, norm_hooks)
        return x + out_hook(out)


class Injection(nn.Module):
    """How the input embedding `e` re-enters the state `s` at the start of every iteration."""

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        self.kind = cfg.injection
        D = cfg.d_model
        if self.kind == "linear":
            self.adapter = nn.Linear(2 * D, D, bias=False)  # acts on concat([s, e])
        elif self.kind == "diagonal":
            self.A_log = nn.Parameter(torch.zeros(D))
            self.dt_bias = nn.Parameter(torch.zeros(D))
            self.B = nn.Parameter(torch.eye(D))

    def forward(self, s: Float[Tensor, "batch pos d"], e: Float[Tensor, "batch pos d"]) -> Tensor:
        if self.kind == "linear":
            return self.adapter(torch.cat([s, e], dim=-1))
        if self.kind == "additive":
            return s + e
        dt = F.softplus(self.dt_bias)
        return torch.exp(-dt * torch.exp(self.A_log)) * s + dt * (e @ self.B.T)
