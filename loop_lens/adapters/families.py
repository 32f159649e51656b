"""One function per checkpoint family: (HF-style config dict, tensors) -> (LoopConfig, mapping).

The mapping is `{our parameter name: (checkpoint tensor name, tensor)}`; `io.assemble` checks
dtypes and shapes and builds the model. The formulas each family computes are in
`docs/families/`. Config values are read through `CheckpointConfig`, which remembers the key
behind each LoopConfig field, so `LoopConfig.validate` (the one place values are checked) is
reported in the checkpoint's own terms. Arithmetic on config values happens only after that
check: the mappings below use the validated `cfg`, never the raw dict.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from loop_lens.adapters.io import REQUIRED, CheckpointConfig, TensorSource
from loop_lens.config import COUNT, FLAG, POSITIVE_INT, LoopConfig, is_integer, show_value
from loop_lens.errors import LoadError

Mapping = dict[str, tuple[str, Tensor]]


def _rope_scaling(r: CheckpointConfig) -> Any:
    """RoPE scaling from `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5);
    None for the default kind. Anything else is passed on for LoopConfig to check."""
    scaling = r.get("rope_scaling", "rope_scaling", "rope_parameters", default=None)
    if not isinstance(scaling, dict):
        return scaling
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return None
    return {k: v for k, v in scaling.items() if k != "rope_theta"}


def _rope_theta(r: CheckpointConfig, *keys: str, default: Any) -> Any:
    """RoPE theta from the named keys, or from transformers 5's `rope_parameters.rope_theta`."""
    params = r.config.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return r.sub("rope_theta", "rope_parameters", "rope_theta", default)
    return r.get("rope_theta", *keys, default=default)


def _vocab(r: CheckpointConfig, src: TensorSource, embed_name: str) -> Any:
    """Vocabulary size as the embedding matrix has it (padded), else from the config. Warns when
    the config promises more tokens than the embedding has rows."""
    if not src.has(embed_name):
        return r.get("d_vocab", "padded_vocab_size", "vocab_size")
    embed = src.tensors[embed_name]
    if embed.ndim != 2:
        raise LoadError(f"tensor {embed_name!r} in {src.origin} has shape {tuple(embed.shape)}, expected [vocab, d_model]")
    rows = int(embed.shape[0])
    for key in ("vocab_size", "padded_vocab_size"):
        size = r.checked(key, POSITIVE_INT, key, default=None)
        if size is not None and size > rows:
            warnings.warn(
                f"{r.origin} field {key!r} is {size}, but {embed_name!r} in {src.origin} has only {rows} "
                f"rows: token ids >= {rows} cannot be embedded",
                UserWarning,
                stacklevel=4,
            )
    r.note("d_vocab", f"the rows of tensor {embed_name!r}")
    return rows


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
    if w.ndim != 2 or w.shape[0] != total:
        raise LoadError(
            f"tensor {theirs!r} in {m.src.origin} has shape {tuple(w.shape)}, expected {total} rows "
            f"({[p for p, _ in parts]})"
        )
    for (ours, _), chunk in zip(parts, torch.split(w, [n for _, n in parts], dim=0)):
        m.put_tensor(ours, theirs, chunk)


# ---------------------------------------------------------------------- Ouro
def ouro(config: dict[str, Any], src: TensorSource) -> tuple[LoopConfig, Mapping]:
    """Ouro / LoopLM: (0, L x T, 0), sandwich norms, per-iteration model.norm, exit gate."""
    r = CheckpointConfig(config)
    if r.checked("use_sliding_window", FLAG, "use_sliding_window", default=False):
        raise LoadError("Ouro checkpoints with use_sliding_window=true are not supported")
    cfg = r.make(
        family="ouro",
        model_name=r.get("model_name", "_name_or_path", default="ouro"),
        d_model=r.get("d_model", "hidden_size"),
        n_heads=r.get("n_heads", "num_attention_heads"),
        n_key_value_heads=r.get("n_key_value_heads", "num_key_value_heads", default=None),
        d_head=r.get("d_head", "head_dim", default=None),
        d_mlp=r.get("d_mlp", "intermediate_size"),
        d_vocab=_vocab(r, src, "model.embed_tokens.weight"),
        n_block=r.get("n_block", "num_hidden_layers"),
        default_loops=r.get("default_loops", "total_ut_steps", default=4),
        n_ctx=r.get("n_ctx", "max_position_embeddings", default=2048),
        norm_placement="sandwich",
        norm_eps=r.get("norm_eps", "rms_norm_eps", default=1e-6),
        rope_style="rotate_half",
        rope_theta=_rope_theta(r, "rope_theta", default=10000.0),
        rope_scaling=_rope_scaling(r),
        iter_norm=True,
        final_norm=False,
        exit_gate=True,
        early_exit_threshold=r.get("early_exit_threshold", "early_exit_threshold", default=1.0),
        default_exit=_ouro_default_exit(r),
        tie_embeddings=r.get("tie_embeddings", "tie_word_embeddings", default=False),
    )
    m = _Mapper(src)
    m.put("embed.weight", "model.embed_tokens.weight")
    for i in range(cfg.n_block):
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
    if not cfg.tie_embeddings:
        m.put("unembed.weight", "lm_head.weight")
    return cfg, m.out


def _ouro_default_exit(r: CheckpointConfig) -> Any:
    """The exit `OuroForCausalLM.forward` takes with no arguments: `early_exit_step` when set,
    else the threshold exit when `early_exit_threshold` is set, else the last step."""
    step = r.checked("default_exit", COUNT, "early_exit_step", default=None)
    if step is not None:
        return step
    if r.config.get("early_exit_threshold") is not None:
        r.note("default_exit", f"{r.origin} field 'early_exit_threshold'")
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
    r = CheckpointConfig(config)
    injection = r.get("injection", "injection_type", default="linear")
    if injection != "linear":
        raise LoadError(f"config.json field 'injection_type' {injection!r} is not supported (supported: 'linear')")
    d_model = r.get("d_model", "n_embd", "hidden_size")
    embed_scale = r.sub("embed_scale", "init_values", "embed_scale", default=1.0)
    if "embed_scale" in r.sources:
        r.note("init_scale", r.sources["embed_scale"])
    init_std = r.sub("init_std", "init_values", "std", default=None)
    if init_std is None:  # Huginn's default; an unusable d_model is refused by LoopConfig first
        init_std = (2 / (5 * d_model)) ** 0.5 if POSITIVE_INT.ok(d_model) else 0.0
    huginn = flavour == "huginn"
    cfg = r.make(
        family=flavour,
        model_name=r.get("model_name", "_name_or_path", default=flavour),
        d_model=d_model,
        n_heads=r.get("n_heads", "n_heads", "num_attention_heads"),
        n_key_value_heads=r.get("n_key_value_heads", "num_key_value_heads", default=None),
        d_head=r.get("d_head", "head_dim", default=None),
        d_mlp=r.get("d_mlp", "intermediate_size"),
        d_vocab=_vocab(r, src, "transformer.wte.weight"),
        n_prelude=r.get("n_prelude", "n_layers_in_prelude"),
        n_block=r.get("n_block", "n_layers_in_recurrent_block"),
        n_coda=r.get("n_coda", "n_layers_in_coda"),
        default_loops=r.get("default_loops", "mean_recurrence", default=32),
        n_ctx=r.get("n_ctx", "max_position_embeddings", "block_size", default=4096),
        norm_placement={"huginn": "sandwich_resid", "retro-llama": "pre", "retro-olmo2": "post"}[flavour],
        norm_eps=r.get("norm_eps", "norm_eps", "rms_norm_eps", default=1e-6),
        rope_style="adjacent" if huginn else "rotate_half",
        rope_theta=r.get("rope_theta", "rope_base", default=50000.0) if huginn else _rope_theta(r, "rope_theta", "rope_base", default=REQUIRED),
        rope_scaling=None if huginn else _rope_scaling(r),
        qk_bias=r.get("qk_bias", "qk_bias", default=False),
        qk_norm="full" if flavour == "retro-olmo2" else "none",
        embed_scale=embed_scale,
        injection="linear",
        initial_state="trunc_normal",
        init_std=init_std,
        init_scale=embed_scale,
        norm_after_loop=huginn,
        tie_embeddings=r.get("tie_embeddings", "tie_embeddings", "tie_word_embeddings", default=False),
    )
    H, K, hd = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    m = _Mapper(src)
    m.put("embed.weight", "transformer.wte.weight")
    for part, ours, count in (("prelude", "prelude_blocks", cfg.n_prelude), ("core_block", "blocks", cfg.n_block), ("coda", "coda_blocks", cfg.n_coda)):
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
    if not cfg.tie_embeddings:
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
    r = CheckpointConfig(config)
    kind = config.get("model_type")
    if kind not in FEEDFORWARD_TYPES:
        raise LoadError(f"cannot loop model_type {kind!r}; supported feedforward layouts: {list(FEEDFORWARD_TYPES)}")
    L = r.checked("layer count", POSITIVE_INT, "num_hidden_layers", "n_layer")
    if not (isinstance(block, tuple) and len(block) == 2 and all(is_integer(x) for x in block)):
        raise LoadError(f"block={block!r} must be two integers (a, b)")
    a, b = block
    if not (0 <= a < b <= L):
        raise LoadError(f"block={block} must satisfy 0 <= a < b <= {L} (the checkpoint's layer count)")
    if injection not in ("none", "additive"):
        raise LoadError(f"injection {injection!r} for ll.loop: use 'none' or 'additive'")
    r.note("default_loops", "argument n_loops")
    loop_fields = dict(
        n_prelude=a, n_block=b - a, n_coda=L - b, default_loops=n_loops, injection=injection,
        initial_state="zeros" if injection == "additive" else "embed",
    )
    layer_of = lambda i: ("prelude_blocks", i) if i < a else (("blocks", i - a) if i < b else ("coda_blocks", i - b))  # noqa: E731
    m = _Mapper(src)
    if kind == "gpt2":
        prefix = "transformer." if src.has("transformer.wte.weight") else ""
        cfg = r.make(
            family="gpt2", model_name=r.get("model_name", "_name_or_path", default="gpt2"), d_model=r.get("d_model", "n_embd"),
            n_heads=r.get("n_heads", "n_head"), d_mlp=r.get("d_mlp", "n_inner", default=None),
            d_vocab=_vocab(r, src, prefix + "wte.weight"), n_ctx=r.get("n_ctx", "n_positions"),
            normalization_type="LN", norm_eps=r.get("norm_eps", "layer_norm_epsilon", default=1e-5),
            mlp_type=_gpt2_activation(r), attn_bias=True, mlp_bias=True, positional_embedding_type="learned",
            tie_embeddings=True, **loop_fields,
        )
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

    act = r.get("hidden_act", "hidden_act", default="silu")
    if act != "silu":
        raise LoadError(f"config.json field 'hidden_act' {show_value(act)} is not supported for {kind} (expected 'silu')")
    qkv_bias = src.has("model.layers.0.self_attn.q_proj.bias")
    cfg = r.make(
        family=kind, model_name=r.get("model_name", "_name_or_path", default=kind), d_model=r.get("d_model", "hidden_size"),
        n_heads=r.get("n_heads", "num_attention_heads"), n_key_value_heads=r.get("n_key_value_heads", "num_key_value_heads", default=None),
        d_head=r.get("d_head", "head_dim", default=None), d_mlp=r.get("d_mlp", "intermediate_size"),
        d_vocab=_vocab(r, src, "model.embed_tokens.weight"), n_ctx=r.get("n_ctx", "max_position_embeddings", default=4096),
        norm_eps=r.get("norm_eps", "rms_norm_eps", default=1e-6), rope_theta=_rope_theta(r, "rope_theta", default=10000.0),
        rope_scaling=_rope_scaling(r), attn_bias=qkv_bias,
        tie_embeddings=r.get("tie_embeddings", "tie_word_embeddings", default=False), **loop_fields,
    )
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
                m.put_tensor(q + "attn.o_proj.bias", "(none: o_proj has no bias)", torch.zeros(cfg.d_model))
        for proj in ("gate", "up", "down"):
            m.put(q + f"mlp.{proj}_proj.weight", p + f"mlp.{proj}_proj.weight")
    m.put("ln_final.weight", "model.norm.weight")
    if not cfg.tie_embeddings:
        m.put("unembed.weight", "lm_head.weight")
    elif src.has("lm_head.weight"):
        src.take("lm_head.weight")
    return cfg, m.out


GPT2_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
"""GPT-2 `activation_function` values we run, and our `mlp_type` for each."""


def _gpt2_activation(r: CheckpointConfig) -> str:
    """Our mlp_type for a GPT-2 config's `activation_function`; an unknown one is refused."""
    act = r.get("mlp_type", "activation_function", default="gelu_new")
    if not isinstance(act, str) or act not in GPT2_ACTIVATIONS:
        raise LoadError(
            f"config.json field 'activation_function' (mlp_type): {show_value(act)} is not supported; "
            f"supported: {list(GPT2_ACTIVATIONS)}"
        )
    return GPT2_ACTIVATIONS[act]


# ---------------------------------------------------------------------- loop_lens's own format
def native(cfg: LoopConfig, src: TensorSource) -> tuple[LoopConfig, Mapping]:
    """loop_lens's native format: tensor names are our parameter names (`assemble` reports the
    ones the model has no parameter for)."""
    return cfg, {k: (k, src.take(k)) for k in list(src.tensors)}


LOOPED_FAMILIES: dict[str, Callable[..., tuple[LoopConfig, Mapping]]] = {
    "ouro": ouro,
    "huginn": lambda c, s: raven(c, s, "huginn"),
    "retro-llama": lambda c, s: raven(c, s, "retro-llama"),
    "retro-olmo2": lambda c, s: raven(c, s, "retro-olmo2"),
}
