"""An independent Parcae forward for the tests, written from the official code's semantics
(sandyresearch/parcae, parcae_lm, commit dee8363) in plain torch, reading the OFFICIAL config
dict and the OFFICIAL state dict directly (nothing of loop_lens is imported).

It is as direct as possible: each layer is written out with explicit matmuls, the attention
pattern is an explicit masked softmax (no SDPA), RoPE is the official "complex-like" product on
the saved freqs_cis table, and the loop is the official two-phase loop with its per-row
`torch.where` gating. It also knows the official tensor names and shapes (`official_shapes`),
so the tests can write random checkpoints in the official on-disk layout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def dims(c: dict) -> dict:
    """The derived sizes, as ParcaeConfig.__post_init__ / _create_recurrent_block_config derive them."""
    D, H = c["n_embd"], c["num_attention_heads"]
    K = c["num_key_value_heads"] or H
    padded = c["padded_vocab_size"]
    if padded is None:
        m = c["padding_multiple"]
        padded = c["vocab_size"] if c["vocab_size"] % m == 0 else c["vocab_size"] + m - c["vocab_size"] % m
    S = c["recurrent_embedding_dimension"]
    SH = c["recurrent_num_attention_heads"] or H
    p, k, cc = c["n_layers_in_prelude"], c["n_layers_in_recurrent_block"], c["n_layers_in_coda"]
    return dict(D=D, H=H, K=K, hd=D // H, V=padded, S=S, SH=SH, shd=S // SH, I=c["intermediate_size"] or 4 * D,
                SI=c["recurrent_intermediation_embedding_dimension"], p=p, k=k, c=cc,
                n_layer=k * c["mean_backprop_depth"], n_eff=p + k + cc)


def _has_ve(i: int, n: int) -> bool:
    return i % 2 == (n - 1) % 2


def layer_plan(c: dict) -> list[tuple[str, str, int, Optional[str], bool]]:
    """(stage, checkpoint prefix, layer_id, value_embeds key or None, has ve_gate) per layer."""
    d = dims(c)
    plan = []
    for i in range(d["p"]):
        plan.append(("prelude", f"transformer.prelude.{i}", i, str(i) if _has_ve(i, d["n_eff"]) else None,
                     _has_ve(i, d["n_layer"])))
    for j in range(d["k"]):
        lid = d["p"] + j
        plan.append(("core", f"transformer.core_block.{j}", lid, str(lid) if _has_ve(lid, d["n_eff"]) else None,
                     _has_ve(lid, d["n_layer"])))
    o = d["p"] + d["k"] * c["mean_recurrence"]
    for i in range(d["c"]):
        key = d["p"] + d["k"] + i
        plan.append(("coda", f"transformer.coda.{i}", o + i, str(key) if _has_ve(key, d["n_eff"]) else None,
                     _has_ve(o + i, d["n_layer"])))
    return plan


def official_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the official model's state dict and its shape."""
    d = dims(c)
    norm_bias = c["norm_class_name"] == "LayerNorm" and not c["simple_ops"]
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (d["V"], d["D"])}

    def linear(name: str, n_in: int, n_out: int, bias: bool) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name: str, n: int) -> None:
        shapes[f"{name}.weight"] = (n,)
        if norm_bias:
            shapes[f"{name}.bias"] = (n,)

    for stage, prefix, _, _, gate in layer_plan(c):
        W, H, K = (d["S"], d["SH"], d["SH"]) if stage == "core" else (d["D"], d["H"], d["K"])
        hd, inter = W // H, d["SI"] if stage == "core" else d["I"]
        norm(f"{prefix}.norm_1", W)
        linear(f"{prefix}.attn.c_q", W, H * hd, c["bias"])
        linear(f"{prefix}.attn.c_k", W, K * hd, c["bias"])
        linear(f"{prefix}.attn.c_v", W, K * hd, c["bias"])
        linear(f"{prefix}.attn.c_proj", W, W, c["bias"])
        if c["qk_bias"]:
            shapes[f"{prefix}.attn.qk_bias"] = (2, 1, H, hd)
        if gate:
            shapes[f"{prefix}.attn.ve_gate.weight"] = (K, 32)
        norm(f"{prefix}.norm_2", W)
        linear(f"{prefix}.mlp.fc", W, inter * (2 if c["mlp_class_name"] == "GatedMLP" else 1), c["bias"])
        linear(f"{prefix}.mlp.proj", inter, W, c["bias"])
    if c["injection_type"] == "diagonal":
        shapes.update({"transformer.adapter.A_log": (d["S"],), "transformer.adapter.dt_bias": (d["S"],),
                       "transformer.adapter.B": (d["S"], d["D"])})
    elif c["injection_type"] == "linear":
        linear("transformer.adapter.adapter", d["S"] + d["D"], d["S"], c["bias"])
    linear("transformer.C", d["S"], d["D"], c["bias"])
    norm("transformer.ln_f", d["D"])
    if c["prelude_norm"]:
        norm("transformer.ln_prelude", d["D"])
    for i in range(d["n_eff"]):
        if _has_ve(i, d["n_eff"]):
            shapes[f"value_embeds.{i}.weight"] = (d["V"], d["K"] * d["hd"])
    if c["use_fused_head"] == "full-triton" and not c["tie_embeddings"]:
        shapes["lm_head.weight"] = (d["D"], d["V"])
    else:
        shapes["lm_head.weight"] = (d["V"], d["D"])
    length = c["randomize_positions_from"] or c["block_size"]
    shapes["freqs_cis"] = (1, length, 1, d["hd"] // 2, 2)
    return shapes


def freqs_cis(c: dict) -> Tensor:
    """precompute_freqs_cis(n_embd // heads, length, rope_base, condense_ratio): [1, L, 1, hd/2, 2]."""
    d = dims(c)
    r = c["rope_settings"]
    inv = 1.0 / (r["rope_base"] ** (torch.arange(0, d["hd"], 2, dtype=torch.float32) / d["hd"]))
    t = torch.arange(c["randomize_positions_from"] or c["block_size"], dtype=torch.float32) / r["rope_condense_ratio"]
    f = torch.outer(t, inv)
    return torch.stack([f.cos()[None, :, None, :], f.sin()[None, :, None, :]], dim=4)


def scalars(c: dict) -> tuple[float, float, float]:
    """(embedding std, emb_scale, logit_scale) for the init strategies the tests draw."""
    D = c["n_embd"]
    L = c["n_layers_in_prelude"] + c["n_layers_in_coda"] + c["n_layers_in_recurrent_block"] * c["mean_recurrence"]
    table = {
        "scaled-zero": (math.sqrt(2 / (5 * D)), 1.0, 1.0),
        "scaled": (math.sqrt(2 / (5 * D)), 1.0, 1.0),
        "takase": (math.sqrt(2 / (5 * D)), math.sqrt(D), 1.0),
        "takase-scaled": (math.sqrt(2 / (5 * D)), math.sqrt(D), math.sqrt(2 / 5) / math.sqrt(D)),
        "llama-by-dim-ls": (1.0, 1.0, 1 / math.sqrt(D)),
        "mitchell": (1 / math.sqrt(D), 1.0, 1.0),
        "wang": (2 / L / math.sqrt(D), 1.0, 1.0),
        "bert": (0.02, 1.0, 1.0),
    }
    return table[c["init_strategy"]]


def initial_state(c: dict, shape: tuple[int, ...]) -> Tensor:
    """Parcae.initialize_state from the global RNG."""
    std, emb_scale, _ = scalars(c)
    rule = c["state_init"]
    if rule == "zero":
        return torch.zeros(shape)
    x = torch.randn(shape)
    if rule == "embed":
        return x.mul(1 / math.sqrt(c["n_embd"]))
    if rule == "like-init":
        torch.nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return x * emb_scale if emb_scale != 1 else x
    if rule == "unit":
        s, m = torch.std_mean(x, dim=-1, keepdim=True)
        return (x - m) / (s + 1e-8)
    return x


def sample_depths(c: dict, batch: int, seq_len: Optional[int]) -> tuple[Tensor, Tensor]:
    """Parcae._sample_batch_depths at model.step = 0, no curriculum."""
    shape = (batch, seq_len) if seq_len is not None else (batch,)
    t = max(c["mean_recurrence"] - c["mean_backprop_depth"], 0)
    s = c["mean_backprop_depth"]
    g = torch.Generator().manual_seed(514229)
    scheme = c["sampling_scheme"]
    if "poisson-truncated-full" in scheme:
        total = torch.clamp(torch.poisson(torch.full(shape, float(t + s)), generator=g), min=1)
        k = torch.clamp(total, max=s)
        n = total - k
    elif "poisson-full" in scheme:
        n = torch.zeros(shape)
        k = torch.clamp(torch.poisson(torch.full(shape, float(t + s)), generator=g), min=1)
    elif "fixed" in scheme:
        n, k = torch.full(shape, float(t)), torch.full(shape, float(s))
    else:
        n, k = torch.poisson(torch.full(shape, float(t)), generator=g), torch.full(shape, float(s))
    return n.long(), k.long()


def _norm(c: dict, sd: dict, name: str, x: Tensor) -> Tensor:
    w = sd[f"{name}.weight"]
    if c["norm_class_name"] == "LayerNorm" and not c["simple_ops"]:
        return F.layer_norm(x, (x.shape[-1],), w, sd[f"{name}.bias"], c["norm_eps"])
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + c["norm_eps"])).type_as(x) * w


def _lin(sd: dict, name: str, x: Tensor) -> Tensor:
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def _act(c: dict, x: Tensor) -> Tensor:
    if c["nonlin_name"] == "ReLU2":
        return F.relu(x).pow(2) * 0.5
    return getattr(torch.nn, c["nonlin_name"])()(x)


def _rope(x: Tensor, fc: Tensor) -> Tensor:
    """x [B, T, H, hd]; the official adjacent-pair rotation with fc [1, T, 1, hd/2, 2]."""
    x2 = x.unflatten(-1, (-1, 2)).float()
    out = torch.stack([x2[..., 0] * fc[..., 0] - x2[..., 1] * fc[..., 1],
                       x2[..., 1] * fc[..., 0] + x2[..., 0] * fc[..., 1]], -1).flatten(3)
    return out.type_as(x)


def _block(c: dict, sd: dict, prefix: str, x: Tensor, fc: Tensor, ve: Optional[Tensor], heads: tuple[int, int]) -> Tensor:
    B, T, W = x.shape
    H, K = heads
    hd = W // H
    h = _norm(c, sd, f"{prefix}.norm_1", x)
    q = _lin(sd, f"{prefix}.attn.c_q", h).view(B, T, H, hd)
    k = _lin(sd, f"{prefix}.attn.c_k", h).view(B, T, K, hd)
    v = _lin(sd, f"{prefix}.attn.c_v", h).view(B, T, K, hd)
    if ve is not None:
        gate = 2 * torch.sigmoid(h[..., :32] @ sd[f"{prefix}.attn.ve_gate.weight"].T)
        v = v + gate[..., None] * ve.view(B, T, K, hd)
    if c["clip_qkv"] is not None:
        q, k, v = (t.clamp(-c["clip_qkv"], c["clip_qkv"]) for t in (q, k, v))
    if c["qk_bias"]:
        qb, kb = sd[f"{prefix}.attn.qk_bias"].split(1, dim=0)
        q, k = q + qb, k + kb
    if c["rope_settings"]["use_rope"]:
        q, k = _rope(q, fc), _rope(k, fc)
    if c["qk_norm"]:
        q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
    k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    y = torch.einsum("bhqk,bkhd->bqhd", pattern, v).reshape(B, T, W)
    x = _lin(sd, f"{prefix}.attn.c_proj", y) + x
    h = _lin(sd, f"{prefix}.mlp.fc", _norm(c, sd, f"{prefix}.norm_2", x))
    if c["mlp_class_name"] == "GatedMLP":
        a, b = h.chunk(2, dim=-1)
        h = _act(c, a) * b
    else:
        h = _act(c, h)
    return _lin(sd, f"{prefix}.mlp.proj", h) + x


def forward(c: dict, sd: dict, ids: Tensor, steps: Optional[int], x0: Tensor) -> dict[str, Tensor]:
    """Logits and internals: `steps` recurrences for every row, or (steps=None) the official plain
    call's per-row (per-token) sampled depths for per-sequence/per-token iteration, which in
    eval mode is mean_recurrence for per-batch."""
    d = dims(c)
    _, emb_scale, logit_scale = scalars(c)
    B, T = ids.shape
    fc = sd["freqs_cis"][:, :T]
    plan = layer_plan(c)
    out: dict[str, list] = {"prelude": [], "states": [x0], "injected": [], "core": [], "coda": []}

    def ve_of(key: Optional[str], gate: bool) -> Optional[Tensor]:
        return sd[f"value_embeds.{key}.weight"][ids] if key is not None and gate else None

    x = sd["transformer.wte.weight"][ids]
    if emb_scale != 1:
        x = x * emb_scale
    out["embeddings"] = x
    for stage, prefix, _, key, gate in plan:
        if stage == "prelude":
            x = _block(c, sd, prefix, x, fc, ve_of(key, gate), (d["H"], d["K"]))
            out["prelude"].append(x)
    if c["prelude_norm"]:
        x = _norm(c, sd, "transformer.ln_prelude", x)
    e = out["e"] = x

    def update(s: Tensor) -> Tensor:
        if c["injection_type"] == "diagonal":
            dt = F.softplus(sd["transformer.adapter.dt_bias"])
            s = s * torch.exp(-dt * torch.exp(sd["transformer.adapter.A_log"])) + dt * (e @ sd["transformer.adapter.B"].T)
        elif c["injection_type"] == "linear":
            s = _lin(sd, "transformer.adapter.adapter", torch.cat([s, e], dim=-1))
        else:
            s = s + e
        out["injected"].append(s)
        layers = []
        for stage, prefix, _, key, gate in plan:
            if stage == "core":
                s = _block(c, sd, prefix, s, fc, ve_of(key, gate), (d["SH"], d["SH"]))
                layers.append(s)
        out["core"].append(torch.stack(layers))
        return s

    s = x0
    if steps is not None:
        for _ in range(steps):
            s = update(s)
            out["states"].append(s)
    elif c["recurrent_iteration_method"] == "per-batch":
        for _ in range(c["mean_recurrence"]):
            s = update(s)
            out["states"].append(s)
    else:
        per_token = c["recurrent_iteration_method"] == "per-token"
        n, k = sample_depths(c, B, T if per_token else None)
        out["depths"] = n + k
        for phase in (n, k):
            for i in range(int(phase.max())):
                active = (i < phase)[..., None] if per_token else (i < phase)[:, None, None]
                s = torch.where(active, update(s), s)
                out["states"].append(s)
    x = out["projected"] = _lin(sd, "transformer.C", s)
    for stage, prefix, _, key, gate in plan:
        if stage == "coda":
            x = _block(c, sd, prefix, x, fc, ve_of(key, gate), (d["H"], d["K"]))
            out["coda"].append(x)
    x = out["ln_f"] = _norm(c, sd, "transformer.ln_f", x)
    if c["tie_embeddings"]:
        logits = x @ sd["transformer.wte.weight"].T
    elif c["use_fused_head"] == "full-triton":
        logits = x @ sd["lm_head.weight"]
    else:
        logits = x @ sd["lm_head.weight"].T
    logits = logits.float() * logit_scale
    if c["logit_softcap"] is not None:
        logits = c["logit_softcap"] * torch.tanh(logits / c["logit_softcap"])
    out["logits"] = logits
    return {k: (torch.stack(v) if isinstance(v, list) and v else v) for k, v in out.items()}
