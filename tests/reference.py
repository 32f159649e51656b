"""An independent, plain-function forward pass for pre-norm RMS / rotate-half models, written
from the formulas in looped-architectures.md (no loop_lens components), for cross-checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_half(x, theta):  # x [b, h, s, d]
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.outer(torch.arange(s).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def layer(x, sd, prefix, cfg):
    b, s, _ = x.shape
    H, K, hd = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    h = rms(x, sd[prefix + "ln1.weight"], cfg.norm_eps)
    q = (h @ sd[prefix + "attn.q_proj.weight"].T).view(b, s, H, hd).transpose(1, 2)
    k = (h @ sd[prefix + "attn.k_proj.weight"].T).view(b, s, K, hd).transpose(1, 2)
    v = (h @ sd[prefix + "attn.v_proj.weight"].T).view(b, s, K, hd).transpose(1, 2)
    q, k = rope_half(q, cfg.rope_theta), rope_half(k, cfg.rope_theta)
    k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    att = (q @ k.transpose(-1, -2)) / hd**0.5
    att = att.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    x = x + (att @ v).transpose(1, 2).reshape(b, s, -1) @ sd[prefix + "attn.o_proj.weight"].T
    h = rms(x, sd[prefix + "ln2.weight"], cfg.norm_eps)
    m = F.silu(h @ sd[prefix + "mlp.gate_proj.weight"].T) * (h @ sd[prefix + "mlp.up_proj.weight"].T)
    return x + m @ sd[prefix + "mlp.down_proj.weight"].T


def unrolled_forward(sd, cfg, tokens, n_loops):
    """prelude, then the block's layers written out n_loops times, then the coda."""
    x = sd["embed.weight"][tokens] * cfg.embed_scale
    names = [f"prelude_blocks.{i}." for i in range(cfg.n_prelude)]
    names += [f"blocks.{i}." for _ in range(n_loops) for i in range(cfg.n_block)]
    names += [f"coda_blocks.{i}." for i in range(cfg.n_coda)]
    for prefix in names:
        x = layer(x, sd, prefix, cfg)
    return rms(x, sd["ln_final.weight"], cfg.norm_eps) @ sd["unembed.weight"].T
