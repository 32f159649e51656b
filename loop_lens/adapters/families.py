"""One function per checkpoint family: (HF-style config dict, tensors) -> (LoopConfig, mapping).

The mapping is `{our parameter name: (checkpoint tensor name, tensor)}`; `io.assemble` checks
shapes and builds the model. The formulas each family computes are in
`shared/docs/looped-architectures.md` and `docs/families/`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from loop_lens.adapters.io import TensorSource, make_config
from loop_lens.config import LoopConfig
from loop_lens.errors import LoadError

Mapping = dict[str, tuple[str, Tensor]]


def _get(config: dict[str, Any], *names: str, default: Any = LoadError) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    if default is LoadError:
        raise LoadError(f"config.json lacks {' / '.join(names)}")
    return default


def _rope_scaling(config: dict[str, Any]) -> Any:
    """llama3 rope scaling from `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise LoadError(f"rope_scaling type {kind!r} is not supported (supported: 'llama3')")
    return {k: v for k, v in scaling.items() if k != "rope_theta"}


def _rope_theta(config: dict[str, Any], *names: str, default: Any = LoadError) -> float:
    """RoPE theta from the named fields, or from transformers 5's `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    if params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return float(_get(config, *names, default=default))


def _vocab(src: TensorSource, embed_name: str, config: dict[str, Any]) -> int:
    """Vocabulary size as the embedding matrix has it (padded), else from the config."""
    if src.has(embed_name):
        return int(src.tensors[embed_name].shape[0])
    return int(_get(config, "padded_vocab_size", "vocab_size"))


class _Mapper:
    """Collects `{ours: (theirs, tensor)}`; `put` takes a tensor from the source by name."""

    def __init__(self, src: TensorSource):
        self.src, self.out = src, {}

    def put(self, ours: str, theirs: str) -> None:
        self.out[ours] = (theirs, self.src.take(theirs))

    def put_tensor(self, ours: str, theirs: str, tensor: Tensor) -> None:
        self.out[ours] = (theirs, tensor)


def _rows(m: _Mapper, theirs: str, parts: list[tuple[str, int]]) -> None:
    """Split a fused weight along dim 0 into our named parts of the given row counts."""
    w = m.src.take(theirs)
    total = sum(n for _, n in parts)
    if w.shape[0] != total:
        raise LoadError(f"tensor {theirs!r} has {w.shape[0]} rows, expected {total} ({[p for p, _ in parts]})")
    for (ours, _), chunk in zip(parts, torch.split(w, [n for _, n in parts], dim=0)):
        m.put_tensor(ours, theirs, chunk)


# ---------------------------------------------------------------------- Ouro
def ouro(config: dict[str, Any], src: TensorSource) -> tuple[LoopConfig, Mapping]:
    """Ouro / LoopLM: (0, L x T, 0), sandwich norms, per-iteration model.norm, exit gate."""
    if config.get("use_sliding_window"):
        raise LoadError("Ouro checkpoints with use_sliding_window=true are not supported")
    D, H = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    L = _get(config, "num_hidden_layers")
    tie = bool(config.get("tie_word_embeddings", False))
    threshold = config.get("early_exit_threshold")
    cfg = make_config(
        family="ouro",
        model_name=config.get("_name_or_path") or "ouro",
        d_model=D,
        n_heads=H,
        n_key_value_heads=config.get("num_key_value_heads") or H,
        d_head=config.get("head_dim") or D // H,
        d_mlp=_get(config, "intermediate_size"),
        d_vocab=_vocab(src, "model.embed_tokens.weight", config),
        n_block=L,
        default_loops=_get(config, "total_ut_steps", default=4),
        n_ctx=config.get("max_position_embeddings", 2048),
        norm_placement="sandwich",
        norm_eps=_get(config, "rms_norm_eps", default=1e-6),
        rope_style="rotate_half",
        rope_theta=_rope_theta(config, "rope_theta", default=10000.0),
        rope_scaling=_rope_scaling(config),
        iter_norm=True,
        final_norm=False,
        exit_gate=True,
        early_exit_threshold=1.0 if threshold is None else float(threshold),
        default_exit=_ouro_default_exit(config),
        tie_embeddings=tie,
    )
    m = _Mapper(src)
    m.put("embed.weight", "model.embed_tokens.weight")
    for i in range(L):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        m.put(q + "ln1.weight", p + "input_layernorm.weight")
        m.put(q + "ln1_post.weight", p + "input_layernorm_2.weight")
        m.put(q + "ln2.weight", p + "post_attention_layernorm.weight")
        m.put(q + "ln2_post.weight", p + "post_attention_layernorm_2.weight")
        for proj in "qkvo":
            m.put(q + f"attn.{proj}_proj.weight", p + f"self_attn.{proj}_proj.weight")
        for proj in ("gate", "up", "down"):
            m.put(q + f"mlp.{proj}_proj.weight", p + f"mlp.{proj}_proj.weight")
    m.put("ln_final.weight", "model.norm.weight")
    m.put("exit_gate.weight", "model.early_exit_gate.weight")
    m.put("exit_gate.bias", "model.early_exit_gate.bias")
    if not tie:
        m.put("unembed.weight", "lm_head.weight")
    return cfg, m.out


def _ouro_default_exit(config: dict[str, Any]) -> Any:
    """The exit `OuroForCausalLM.forward` takes with no arguments: `early_exit_step` when set,
    else the threshold exit when `early_exit_threshold` is set, else the last step."""
    if config.get("early_exit_step") is not None:
        return int(config["early_exit_step"])
    if config.get("early_exit_threshold") is not None:
        return "threshold"
    return "last"


# ---------------------------------------------------------------------- Raven layout
def raven_flavour(tensors: dict[str, Tensor]) -> str:
    """'huginn' (sandwich blocks with norm_3/norm_4), 'retro-olmo2' (q_norm) or 'retro-llama'."""
    keys = tensors.keys()
    if any(".norm_3.weight" in k for k in keys):
        return "huginn"
    if any(k.endswith("attn.q_norm.weight") for k in keys):
        return "retro-olmo2"
    return "retro-llama"


def raven(config: dict[str, Any], src: TensorSource, flavour: str | None = None) -> tuple[LoopConfig, Mapping]:
    """Huginn-0125 and retrofitted recurrence (Llama / OLMo-2 flavours) in the Raven key layout."""
    flavour = flavour or raven_flavour(src.tensors)
    if flavour not in ("huginn", "retro-llama", "retro-olmo2"):
        raise LoadError(f"unknown Raven flavour {flavour!r}")
    injection = config.get("injection_type", "linear")
    if injection != "linear":
        raise LoadError(f"injection_type {injection!r} is not supported (supported: 'linear')")
    D, H = _get(config, "n_embd", "hidden_size"), _get(config, "n_heads", "num_attention_heads")
    K = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or D // H
    init = config.get("init_values") or {}
    embed_scale = float(init.get("embed_scale", 1.0))
    p_n, k_n, c_n = (
        _get(config, "n_layers_in_prelude"),
        _get(config, "n_layers_in_recurrent_block"),
        _get(config, "n_layers_in_coda"),
    )
    tie = bool(config.get("tie_embeddings", config.get("tie_word_embeddings", False)))
    huginn = flavour == "huginn"
    cfg = make_config(
        family=flavour,
        model_name=config.get("_name_or_path") or flavour,
        d_model=D,
        n_heads=H,
        n_key_value_heads=K,
        d_head=hd,
        d_mlp=_get(config, "intermediate_size"),
        d_vocab=_vocab(src, "transformer.wte.weight", config),
        n_prelude=p_n,
        n_block=k_n,
        n_coda=c_n,
        default_loops=int(_get(config, "mean_recurrence", default=32)),
        n_ctx=config.get("max_position_embeddings") or config.get("block_size") or 4096,
        norm_placement={"huginn": "sandwich_resid", "retro-llama": "pre", "retro-olmo2": "post"}[flavour],
        norm_eps=_get(config, "norm_eps", "rms_norm_eps", default=1e-6),
        rope_style="adjacent" if huginn else "rotate_half",
        rope_theta=_get(config, "rope_base", default=50000.0) if huginn else _rope_theta(config, "rope_theta", "rope_base"),
        rope_scaling=None if huginn else _rope_scaling(config),
        qk_bias=bool(config.get("qk_bias", False)),
        qk_norm="full" if flavour == "retro-olmo2" else "none",
        embed_scale=embed_scale,
        injection="linear",
        initial_state="trunc_normal",
        init_std=float(init.get("std", (2 / (5 * D)) ** 0.5)),
        init_scale=embed_scale,
        norm_after_loop=huginn,
        tie_embeddings=tie,
    )
    m = _Mapper(src)
    m.put("embed.weight", "transformer.wte.weight")
    for part, ours, count in (("prelude", "prelude_blocks", p_n), ("core_block", "blocks", k_n), ("coda", "coda_blocks", c_n)):
        for i in range(count):
            p, q = f"transformer.{part}.{i}.", f"{ours}.{i}."
            norms = {
                "huginn": {"norm_1": "ln1", "norm_2": "ln1_post", "norm_3": "ln2", "norm_4": "ln2_post"},
                "retro-llama": {"norm_1": "ln1", "norm_2": "ln2"},
                "retro-olmo2": {"norm_1": "ln1_post", "norm_2": "ln2_post"},
            }[flavour]
            for theirs, mine in norms.items():
                m.put(q + f"{mine}.weight", p + f"{theirs}.weight")
            _rows(m, p + "attn.Wqkv.weight", [(q + "attn.q_proj.weight", H * hd), (q + "attn.k_proj.weight", K * hd), (q + "attn.v_proj.weight", K * hd)])
            m.put(q + "attn.o_proj.weight", p + "attn.proj.weight")
            if cfg.qk_bias:
                bias = src.take(p + "attn.qk_bias")
                if tuple(bias.shape) != (2, 1, H, hd) or K != H:
                    raise LoadError(f"tensor {p + 'attn.qk_bias'!r} has shape {tuple(bias.shape)}, expected (2, 1, {H}, {hd}) with n_kv_heads == n_heads")
                m.put_tensor(q + "attn.q_bias", p + "attn.qk_bias", bias[0, 0])
                m.put_tensor(q + "attn.k_bias", p + "attn.qk_bias", bias[1, 0])
            if flavour == "retro-olmo2":
                m.put(q + "attn.q_norm.weight", p + "attn.q_norm.weight")
                m.put(q + "attn.k_norm.weight", p + "attn.k_norm.weight")
            I = cfg.d_mlp  # noqa: E741
            _rows(m, p + "mlp.fc.weight", [(q + "mlp.gate_proj.weight", I), (q + "mlp.up_proj.weight", I)])
            m.put(q + "mlp.down_proj.weight", p + "mlp.proj.weight")
    m.put("injection.adapter.weight", "transformer.adapter.weight")
    m.put("ln_final.weight", "transformer.ln_f.weight")
    if not tie:
        m.put("unembed.weight", "lm_head.weight")
    elif src.has("lm_head.weight"):
        src.take("lm_head.weight")  # a saved copy of the tied head
    return cfg, m.out


# ---------------------------------------------------------------------- feedforward checkpoints
FEEDFORWARD_TYPES = ("llama", "qwen2", "mistral", "gpt2")


def feedforward(
    config: dict[str, Any], src: TensorSource, block: tuple[int, int], n_loops: int, injection: str
) -> tuple[LoopConfig, Mapping]:
    """Loop layers [a, b) of a Llama / Qwen2 / Mistral / GPT-2 checkpoint `n_loops` times."""
    kind = config.get("model_type")
    if kind not in FEEDFORWARD_TYPES:
        raise LoadError(f"cannot loop model_type {kind!r}; supported feedforward layouts: {list(FEEDFORWARD_TYPES)}")
    L = _get(config, "num_hidden_layers", "n_layer")
    a, b = block
    if not (0 <= a < b <= L):
        raise LoadError(f"block={block} must satisfy 0 <= a < b <= {L} (the checkpoint's layer count)")
    if injection not in ("none", "additive"):
        raise LoadError(f"injection {injection!r} for ll.loop: use 'none' or 'additive'")
    loop_fields = dict(
        n_prelude=a, n_block=b - a, n_coda=L - b, default_loops=n_loops, injection=injection,
        initial_state="zeros" if injection == "additive" else "embed",
    )
    layer_of = lambda i: ("prelude_blocks", i) if i < a else (("blocks", i - a) if i < b else ("coda_blocks", i - b))  # noqa: E731
    m = _Mapper(src)
    if kind == "gpt2":
        D = _get(config, "n_embd")
        cfg = make_config(
            family="gpt2", model_name=config.get("_name_or_path") or "gpt2", d_model=D, n_heads=_get(config, "n_head"),
            d_mlp=config.get("n_inner") or 4 * D, d_vocab=_get(config, "vocab_size"), n_ctx=_get(config, "n_positions"),
            normalization_type="LN", norm_eps=_get(config, "layer_norm_epsilon", default=1e-5),
            mlp_type={"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(config.get("activation_function", "gelu_new"), "gelu_new"),
            attn_bias=True, mlp_bias=True, positional_embedding_type="learned", tie_embeddings=True, **loop_fields,
        )
        prefix = "transformer." if src.has("transformer.wte.weight") else ""
        m.put("embed.weight", prefix + "wte.weight")
        m.put("pos_embed.weight", prefix + "wpe.weight")
        for i in range(L):
            p = f"{prefix}h.{i}."
            q = "{}.{}.".format(*layer_of(i))
            for ln, mine in (("ln_1", "ln1"), ("ln_2", "ln2")):
                m.put(q + f"{mine}.weight", p + f"{ln}.weight")
                m.put(q + f"{mine}.bias", p + f"{ln}.bias")
            w = src.take(p + "attn.c_attn.weight").T  # Conv1D stores [in, out]
            bias = src.take(p + "attn.c_attn.bias")
            for proj, wc, bc in zip("qkv", w.chunk(3, 0), bias.chunk(3, 0)):
                m.put_tensor(q + f"attn.{proj}_proj.weight", p + "attn.c_attn.weight", wc)
                m.put_tensor(q + f"attn.{proj}_proj.bias", p + "attn.c_attn.bias", bc)
            m.put_tensor(q + "attn.o_proj.weight", p + "attn.c_proj.weight", src.take(p + "attn.c_proj.weight").T)
            m.put(q + "attn.o_proj.bias", p + "attn.c_proj.bias")
            m.put_tensor(q + "mlp.up_proj.weight", p + "mlp.c_fc.weight", src.take(p + "mlp.c_fc.weight").T)
            m.put(q + "mlp.up_proj.bias", p + "mlp.c_fc.bias")
            m.put_tensor(q + "mlp.down_proj.weight", p + "mlp.c_proj.weight", src.take(p + "mlp.c_proj.weight").T)
            m.put(q + "mlp.down_proj.bias", p + "mlp.c_proj.bias")
            for buf in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of older saves
                if src.has(p + buf):
                    src.take(p + buf)
        m.put("ln_final.weight", prefix + "ln_f.weight")
        m.put("ln_final.bias", prefix + "ln_f.bias")
        if src.has("lm_head.weight"):
            src.take("lm_head.weight")  # tied to wte
        return cfg, m.out

    D, H = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    qkv_bias = src.has("model.layers.0.self_attn.q_proj.bias")
    tie = bool(config.get("tie_word_embeddings", False))
    cfg = make_config(
        family=kind, model_name=config.get("_name_or_path") or kind, d_model=D, n_heads=H,
        n_key_value_heads=config.get("num_key_value_heads") or H, d_head=config.get("head_dim") or D // H,
        d_mlp=_get(config, "intermediate_size"), d_vocab=_get(config, "vocab_size"),
        n_ctx=config.get("max_position_embeddings", 4096), norm_eps=_get(config, "rms_norm_eps", default=1e-6),
        rope_theta=_rope_theta(config, "rope_theta", default=10000.0), rope_scaling=_rope_scaling(config),
        attn_bias=qkv_bias, tie_embeddings=tie, **loop_fields,
    )
    if config.get("hidden_act", "silu") != "silu":
        raise LoadError(f"hidden_act {config['hidden_act']!r} is not supported for {kind} (expected 'silu')")
    m.put("embed.weight", "model.embed_tokens.weight")
    for i in range(L):
        p = f"model.layers.{i}."
        q = "{}.{}.".format(*layer_of(i))
        m.put(q + "ln1.weight", p + "input_layernorm.weight")
        m.put(q + "ln2.weight", p + "post_attention_layernorm.weight")
        for proj in "qkvo":
            m.put(q + f"attn.{proj}_proj.weight", p + f"self_attn.{proj}_proj.weight")
        if qkv_bias:
            for proj in "qkv":
                m.put(q + f"attn.{proj}_proj.bias", p + f"self_attn.{proj}_proj.bias")
            o_bias = p + "self_attn.o_proj.bias"
            if src.has(o_bias):
                m.put(q + "attn.o_proj.bias", o_bias)
            else:
                m.put_tensor(q + "attn.o_proj.bias", "(none: o_proj has no bias)", torch.zeros(D))
        for proj in ("gate", "up", "down"):
            m.put(q + f"mlp.{proj}_proj.weight", p + f"mlp.{proj}_proj.weight")
    m.put("ln_final.weight", "model.norm.weight")
    if not tie:
        m.put("unembed.weight", "lm_head.weight")
    elif src.has("lm_head.weight"):
        src.take("lm_head.weight")
    return cfg, m.out


# ---------------------------------------------------------------------- loop_lens's own format
def native(cfg: LoopConfig, src: TensorSource) -> tuple[LoopConfig, Mapping]:
    """loop_lens's native format: tensor names are our parameter names."""
    return cfg, {k: (k, src.take(k)) for k in list(src.tensors)}


LOOPED_FAMILIES: dict[str, Callable[..., tuple[LoopConfig, Mapping]]] = {
    "ouro": ouro,
    "huginn": lambda c, s: raven(c, s, "huginn"),
    "retro-llama": lambda c, s: raven(c, s, "retro-llama"),
    "retro-olmo2": lambda c, s: raven(c, s, "retro-olmo2"),
}
