"""Parcae checkpoints (SandyResearch `parcae_lm`): `config.json` + `pytorch_model.bin`.

The layout both official loaders read (`parcae_lm.from_pretrained`, receval's
`ModelingParcae.from_pretrained`): `config.json` is `dataclasses.asdict(ParcaeConfig)` plus
`"_class_name": "ParcaeConfig"`; `pytorch_model.bin` is the model's state dict (read here with
`torch.load(weights_only=True)`, never executed), holding the persistent `freqs_cis` buffer and,
for a tied head, both `transformer.wte.weight` and `lm_head.weight`.

Every config field is checked (a LoadError names the field); a field missing from the file takes
the official dataclass default, as the official loaders do. Every tensor the model needs must be
present with the right shape (the official loaders' `strict=False` would keep a random init).

`ll.load(dir)` detects the layout (`_class_name: ParcaeConfig`) and calls `build`; native saves
of the model (`model.save`) load through the native path like every family's.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from loop_lens.adapters.io import TensorSource, assemble, check_weight_dtype
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, LoadError
from loop_lens.families.parcae import (
    INJECTIONS,
    ITERATION_METHODS,
    MLPS,
    NONLINS,
    NORMS,
    STATE_INITS,
    HookedParcaeTransformer,
    ParcaeSettings,
    parcae_config,
    settings_of,
)

OFFICIAL_DEFAULTS: dict[str, Any] = {
    # parcae_lm.models.config.Config
    "name": "", "hf_config": {}, "block_size": 4096, "n_embd": 4096, "intermediate_size": None,
    "num_attention_heads": 32, "num_key_value_heads": None, "vocab_size": 50254, "padding_multiple": 512,
    "padded_vocab_size": None, "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50_000},
    "use_abacus": False, "randomize_positions_from": None, "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "LayerNorm", "attn_impl": "flash", "norm_eps": 1e-5, "mlp_class_name": "BaseMLP",
    "nonlin_name": "GELU", "bias": False, "qk_bias": False, "init_strategy": "scaled", "init_orthogonal": False,
    "skip_initialization": False, "mup_model_scaling_factor": 1, "use_fused_head": "pytorch",
    "debias_attention": False, "center_attention": False, "clip_qkv": None, "qk_norm": False, "logit_softcap": None,
    "activation_checkpoint_impl": "per-iteration", "simple_ops": False, "strategy": "single",
    # parcae_lm.models.parcae.config.ParcaeConfig
    "injection_type": "diagonal", "n_layers_in_recurrent_block": 4, "n_layers_in_prelude": 1, "n_layers_in_coda": 1,
    "state_init": "like-init", "recurrent_embedding_dimension": 1024,
    "recurrent_intermediation_embedding_dimension": 3520, "recurrent_num_attention_heads": None,
    "prelude_norm": False, "sampling_scheme": "poisson-truncated-full", "mean_recurrence": 32,
    "mean_backprop_depth": 8, "lockstep_n": False, "lockstep_k": False, "curriculum_target": "forward",
    "recurrent_iteration_method": "per-batch", "tie_embeddings": False, "model_class_name": "Parcae",
    "_is_recurrent_block_config": False,
}
"""Every ParcaeConfig field and its default (commit dee8363)."""
IGNORED_KEYS = ("_class_name", "init")  # receval's loader drops "init" too

INIT_STRATEGIES = (
    "mitchell", "normal", "llama", "llama-by-dim", "llama-by-dim-ls", "kaiming", "bert", "megatron", "megatron2",
    "small", "scaled", "scaled-geiping", "scaled-zero", "scaled-stuck", "takase", "takase-scaled", "wang",
    "deepnorm-straight", "deepnorm-subln", "noci-anagnostidis", "shaped", "deep-scale-simple", "deep-scale-full",
    "scaled-and-logit-scale", "bernstein", "illiterate", "scaled-large-embed",
)


def init_scalars(strategy: str, dim: int, n_layers: int) -> tuple[float, float, float]:
    """(embedding std, emb_scale, logit_scale) of an official init strategy for width `dim` and
    expected depth `n_layers` = n_prelude + n_coda + n_core * mean_recurrence: the table's
    "embedding" entry (else its "std"), "embed_scale" (else 1), "logit_scale" (else 1)."""
    small = math.sqrt(2 / (5 * dim))
    embedding_std = {
        "mitchell": 1 / math.sqrt(dim), "normal": 1 / math.sqrt(dim), "kaiming": math.sqrt(2.0 / dim),
        "bert": 0.02, "megatron": 0.02, "megatron2": math.sqrt(1 / (3 * dim)), "wang": 2 / n_layers / math.sqrt(dim),
        "deepnorm-straight": 0.02, "deepnorm-subln": 0.02, "deep-scale-simple": math.sqrt(1 / 3),
        "deep-scale-full": math.sqrt(1 / 3),
        **dict.fromkeys(("small", "scaled", "scaled-geiping", "scaled-zero", "scaled-stuck", "takase",
                         "takase-scaled"), small),
        **dict.fromkeys(("llama", "llama-by-dim", "llama-by-dim-ls", "noci-anagnostidis", "shaped",
                         "scaled-and-logit-scale", "bernstein", "illiterate", "scaled-large-embed"), 1.0),
    }[strategy]
    emb_scale = math.sqrt(dim) if strategy in ("takase", "takase-scaled") else 1.0
    logit_scale = {
        "takase-scaled": math.sqrt(2 / 5) / math.sqrt(dim),
        **dict.fromkeys(("llama-by-dim-ls", "noci-anagnostidis", "shaped", "deep-scale-simple", "deep-scale-full",
                         "scaled-and-logit-scale"), 1 / math.sqrt(dim)),
    }.get(strategy, 1.0)
    return float(embedding_std), float(emb_scale), float(logit_scale)


class _Fields:
    """The config dict read field by field; each check raises LoadError naming the field."""

    def __init__(self, config: dict[str, Any], origin: str):
        self.origin = origin
        unknown = sorted(k for k in config if k not in OFFICIAL_DEFAULTS and k not in IGNORED_KEYS)
        if unknown:
            raise LoadError(
                f"{origin}: unknown ParcaeConfig field(s) {unknown[:5]}; the official ParcaeConfig "
                "(commit dee8363) has no such field"
            )
        self.values = {**OFFICIAL_DEFAULTS, **{k: v for k, v in config.items() if k not in IGNORED_KEYS}}

    def fail(self, key: str, why: str) -> LoadError:
        return LoadError(f"{self.origin}: field {key!r}={self.values.get(key)!r} {why}")

    def int(self, key: str, minimum: int = 1, optional: bool = False) -> Optional[int]:
        v = self.values[key]
        if v is None and optional:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}" + (" or null" if optional else ""))
        return v

    def bool(self, key: str) -> bool:
        v = self.values[key]
        if not isinstance(v, bool):
            raise self.fail(key, "must be true or false")
        return v

    def number(self, key: str, optional: bool = False) -> Optional[float]:
        v = self.values[key]
        if v is None and optional:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise self.fail(key, "must be a positive finite number" + (" or null" if optional else ""))
        return float(v)

    def choice(self, key: str, options) -> str:
        v = self.values[key]
        if not isinstance(v, str) or v not in options:
            raise self.fail(key, f"must be one of {list(options)}")
        return v

    def str(self, key: str) -> str:
        v = self.values[key]
        if not isinstance(v, str):
            raise self.fail(key, "must be a string")
        return v


def _rope(f: _Fields) -> bool:
    """`rope_settings.use_rope` (receval's loader honours rope_settings; parcae_lm.from_pretrained
    drops the dict, i.e. always uses RoPE). The angles come from the saved freqs_cis buffer."""
    rope = f.values["rope_settings"]
    if not isinstance(rope, dict):
        raise f.fail("rope_settings", "must be an object with use_rope, rope_condense_ratio, rope_base")
    unknown = sorted(set(rope) - {"use_rope", "rope_condense_ratio", "rope_base"})
    if unknown:
        raise f.fail("rope_settings", f"has unknown key(s) {unknown}")
    use_rope = rope.get("use_rope", True)
    if not isinstance(use_rope, bool):
        raise LoadError(f"{f.origin}: field 'rope_settings.use_rope'={use_rope!r} must be true or false")
    return use_rope


def read_parcae_config(config: dict[str, Any], origin: str = "config.json") -> ParcaeSettings:
    """The ParcaeSettings of an official `config.json` dict; LoadError naming the field for any
    value the official code would refuse, fail on, or compute something we do not."""
    if config.get("_class_name") != "ParcaeConfig":
        raise LoadError(
            f"{origin}: field '_class_name'={config.get('_class_name')!r} must be 'ParcaeConfig' (a Parcae checkpoint)"
        )
    f = _Fields(config, origin)
    if f.choice("model_class_name", ("Parcae",)) and f.bool("_is_recurrent_block_config"):
        raise f.fail("_is_recurrent_block_config", "must be false: such a config builds no recurrent-width core")
    if f.int("mup_model_scaling_factor") != 1:
        raise f.fail("mup_model_scaling_factor", "must be 1: the saved widths are already scaled, and the official "
                                                 "loaders would scale them again and fail on every tensor")
    f.choice("block_class_name", ("TransformerPreNormBlock",))
    f.choice("attn_impl", ("flash", "sdpa", "debug-skip"))  # unused by Parcae's attention (always SDPA/FA3)
    for key in ("use_abacus", "init_orthogonal", "skip_initialization", "debias_attention", "center_attention",
                "lockstep_n", "lockstep_k"):
        f.bool(key)  # training / monitoring switches: checked, no effect on the forward
    f.str("activation_checkpoint_impl")
    simple_ops = f.bool("simple_ops")
    if f.str("strategy") == "axonn_tp" and not simple_ops:
        raise f.fail("strategy", "'axonn_tp' builds tensor-parallel layers (axonn), which this adapter does not read")
    name = f.str("name")
    hf_config = f.values["hf_config"]
    if not isinstance(hf_config, dict):
        raise f.fail("hf_config", "must be an object")
    effective_name = name or hf_config.get("name", name)
    norm = "RMSNorm" if simple_ops else f.choice("norm_class_name", NORMS)
    if isinstance(effective_name, str) and "Gemma" in effective_name and not simple_ops:
        raise f.fail("name", "contains 'Gemma', which makes the official code build its norms with add_unit_offset, "
                             "which they do not accept")
    head = f.choice("use_fused_head", ("pytorch", "cce", "full-triton", "hhe"))
    if head == "hhe":
        raise f.fail("use_fused_head", "'hhe' head returns no logits without labels; only pytorch, cce, full-triton")

    d_model = f.int("n_embd")
    n_heads = f.int("num_attention_heads")
    n_kv = f.int("num_key_value_heads", optional=True) or n_heads
    if d_model % n_heads:
        raise f.fail("n_embd", f"must be divisible by num_attention_heads={n_heads}")
    if n_heads % n_kv:
        raise f.fail("num_key_value_heads", f"must divide num_attention_heads={n_heads}")
    d_mlp = f.int("intermediate_size", optional=True) or 4 * d_model
    vocab = f.int("vocab_size")
    multiple = f.int("padding_multiple")
    padded = f.int("padded_vocab_size", optional=True)
    if padded is None:
        padded = vocab if vocab % multiple == 0 else vocab + multiple - vocab % multiple
    vocab = min(vocab, padded)
    d_state = f.int("recurrent_embedding_dimension")
    n_state_heads = f.int("recurrent_num_attention_heads", optional=True) or n_heads
    if d_state % n_state_heads:
        raise f.fail("recurrent_embedding_dimension", f"must be divisible by the core's {n_state_heads} heads "
                                                      "(recurrent_num_attention_heads, default num_attention_heads)")
    n_prelude, n_core = f.int("n_layers_in_prelude", 0), f.int("n_layers_in_recurrent_block")
    n_coda, mean_rec = f.int("n_layers_in_coda", 0), f.int("mean_recurrence")
    use_rope = _rope(f)
    if use_rope and (d_model // n_heads) % 2:
        raise f.fail("n_embd", f"gives an odd head width {d_model // n_heads}, which RoPE's pairs cannot rotate")
    if use_rope and d_state // n_state_heads != d_model // n_heads:
        raise f.fail(
            "recurrent_num_attention_heads",
            f"gives the core a head width {d_state // n_state_heads} unlike the prelude/coda's {d_model // n_heads}; "
            "the one freqs_cis table (built for n_embd // num_attention_heads) cannot rotate it, and the official "
            "code fails there too",
        )
    injection = f.choice("injection_type", INJECTIONS)
    if injection == "add" and d_state != d_model:
        raise f.fail("injection_type", f"'add' needs recurrent_embedding_dimension == n_embd, got {d_state} != {d_model}")
    strategy = f.choice("init_strategy", INIT_STRATEGIES)
    std, emb_scale, logit_scale = init_scalars(strategy, d_model, n_prelude + n_coda + n_core * mean_rec)
    scheme = f.str("sampling_scheme")
    if "curriculum-" in scheme:
        part = scheme.split("curriculum-")[1].removeprefix("sqrt-")
        if not part.isdigit() or int(part) < 1:
            raise f.fail("sampling_scheme", "must end in 'curriculum-<steps>' or 'curriculum-sqrt-<steps>' (steps >= 1)")
    f.int("block_size")
    positions = f.int("randomize_positions_from", optional=True) or f.values["block_size"]
    qk_bias = f.bool("qk_bias")
    if qk_bias and n_kv != n_heads:
        raise f.fail("qk_bias", f"with GQA (num_key_value_heads={n_kv} < {n_heads}) is not supported")
    tie = f.bool("tie_embeddings")
    try:
        return ParcaeSettings(
            d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, d_mlp=d_mlp,
            d_state=d_state, n_state_heads=n_state_heads,
            d_state_mlp=f.int("recurrent_intermediation_embedding_dimension"),
            d_vocab=padded, vocab_size=vocab, n_prelude=n_prelude, n_core=n_core, n_coda=n_coda,
            mean_recurrence=mean_rec, mean_backprop_depth=f.int("mean_backprop_depth", 0),
            n_positions=positions, norm=norm, norm_eps=f.number("norm_eps"),
            mlp=f.choice("mlp_class_name", MLPS), nonlin=f.choice("nonlin_name", NONLINS),
            bias=f.bool("bias"), qk_bias=qk_bias, qk_norm=f.bool("qk_norm"),
            clip_qkv=f.number("clip_qkv", optional=True), use_rope=use_rope, injection=injection,
            state_init=f.choice("state_init", STATE_INITS), state_std=std, emb_scale=emb_scale,
            logit_scale=logit_scale, logit_softcap=f.number("logit_softcap", optional=True),
            prelude_norm=f.bool("prelude_norm"), tie_embeddings=tie,
            iteration_method=f.choice("recurrent_iteration_method", ITERATION_METHODS),
            sampling_scheme=scheme, curriculum_target=f.choice("curriculum_target", ("forward", "backward", "both")),
            untied_head_transposed=head == "full-triton" and not tie,
        )
    except ConfigError as err:  # combinations the official code cannot run (value embeddings on a core too narrow)
        raise LoadError(f"{origin}: {err}") from err


_BLOCK_PARTS = {  # ours -> official, inside one block
    "ln1": "norm_1", "ln2": "norm_2", "attn.q_proj": "attn.c_q", "attn.k_proj": "attn.c_k", "attn.v_proj": "attn.c_v",
    "attn.o_proj": "attn.c_proj", "mlp.fc": "mlp.fc", "mlp.proj": "mlp.proj", "attn.ve_gate": "attn.ve_gate",
}
_STAGES = {"prelude_blocks": "transformer.prelude", "blocks": "transformer.core_block", "coda_blocks": "transformer.coda"}


def official_name(ours: str) -> str:
    """The checkpoint key of one of our parameter names."""
    head, _, rest = ours.partition(".")
    if head in _STAGES:
        layer, _, inner = rest.partition(".")
        module, _, leaf = inner.rpartition(".")
        if inner == "attn.qk_bias":
            return f"{_STAGES[head]}.{layer}.attn.qk_bias"
        return f"{_STAGES[head]}.{layer}.{_BLOCK_PARTS[module]}.{leaf}"
    simple = {"embed.weight": "transformer.wte.weight", "unembed.weight": "lm_head.weight",
              "rope_table.freqs_cis": "freqs_cis"}
    if ours in simple:
        return simple[ours]
    prefix = {"ln_prelude": "transformer.ln_prelude", "ln_final": "transformer.ln_f", "C": "transformer.C",
              "injection": "transformer.adapter", "value_embeds": "value_embeds"}
    return f"{prefix[head]}.{rest}"


def expected_unused(s: ParcaeSettings) -> set[str]:
    """Checkpoint keys the official model holds but never uses: value-embedding tables and gates
    on layers where the other half is missing (the parity rules differ), freqs_cis without RoPE,
    lm_head.weight of a tied head (the same tensor as wte)."""
    sites = s.value_embedding_sites()
    used_tables = set(sites.values())
    keys = {f"value_embeds.{k}.weight" for k in s.value_embedding_tables() if k not in used_tables}
    official_stage = {"prelude": "transformer.prelude", "core": "transformer.core_block", "coda": "transformer.coda"}
    for stage, layer in s.layer_ids():
        if s.has_gate((stage, layer)) and (stage, layer) not in sites:
            keys.add(f"{official_stage[stage]}.{layer}.attn.ve_gate.weight")
    if not s.use_rope:
        keys.add("freqs_cis")
    return keys


def parcae_mapping(cfg: LoopConfig, src: TensorSource) -> dict[str, tuple[str, Tensor]]:
    """`{our parameter: (checkpoint tensor, tensor)}` for every parameter and buffer of the
    config's model (its names from a model built on the meta device). An untied `full-triton`
    head stored as [d_model, vocab] is transposed, a qk_bias of shape [2, 1, heads, d_head] loses
    its axis, and a tied head reads `lm_head.weight` (the official load copies it last into the
    shared tensor). Tensors the official model holds but never uses (`expected_unused`) are
    marked used; shapes and dtypes are checked by `assemble`."""
    s = settings_of(cfg)
    with torch.device("meta"):
        want = HookedParcaeTransformer(cfg).state_dict()
    if s.tie_embeddings:
        want.pop("unembed.weight")
    src.used.update(k for k in expected_unused(s) if src.has(k))
    out: dict[str, tuple[str, Tensor]] = {}
    for ours, target in want.items():
        theirs = official_name(ours)
        if s.tie_embeddings and ours == "embed.weight" and src.has("lm_head.weight"):
            src.used.add("transformer.wte.weight")
            theirs = "lm_head.weight"
        if not src.has(theirs):
            raise LoadError(f"missing tensor {theirs!r} in {src.origin} (needed for {ours} of this config)")
        t = src.take(theirs)
        if ours.endswith("attn.qk_bias") and tuple(t.shape) == (2, 1, *target.shape[1:]):
            t = t[:, 0]
        if ours == "unembed.weight" and s.untied_head_transposed and tuple(t.shape) == tuple(target.shape[::-1]):
            t = t.T
        out[ours] = (theirs, t)
    return out


def build(config: dict[str, Any], src: TensorSource, dtype: Optional[torch.dtype] = None,
          device: Optional[Union[str, torch.device]] = None, tokenizer: Any = None,
          origin: str = "config.json") -> HookedParcaeTransformer:
    """An official Parcae config dict + its tensors -> a HookedParcaeTransformer (in eval mode);
    LoadError naming the field or tensor for anything the official code would refuse or that does
    not fit. Nothing in the checkpoint is executed."""
    check_weight_dtype(dtype)
    settings = read_parcae_config(config, origin)
    name = config.get("name") if isinstance(config.get("name"), str) and config.get("name") else "parcae"
    cfg = parcae_config(settings, model_name=name)
    mapped = parcae_mapping(cfg, src)
    return assemble(cfg, mapped, src, dtype=dtype, device=device, tokenizer=tokenizer)
