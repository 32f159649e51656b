"""Dory checkpoints (`config.json: "model_type": "dory"`): config + tensors -> LoopConfig + mapping.

Reads the three layouts a Dory folder can have, never running checkpoint code:

- transformers' `save_pretrained`: `backbone.layers.{i}.self_attn.g_proj.*`, `backbone.embeddings.*`
  (transformers renames its `model.layers.{i}.self_attn.gate_proj` on save);
- the released two-block layout: `backbone.layers.{2i}.mixer.*` (attention), `backbone.layers.{2i+1}.mixer.*`
  (MLP), `layers.{2i}.attn_alpha` / `layers.{2i+1}.mlp_alpha` (lambda_1 / lambda_2 of layer i);
- transformers' module names (`model.layers.{i}.self_attn.gate_proj.*`, `model.embed_tokens.*`).

Both `config.json` forms are read too: `layer_types` listing each decoder layer once, or (as
`DoryConfig.to_dict` writes it, and the releases) as an attention entry followed by `"mlp"`, with
every layer count doubled. `ll.load` detects the family by `model_type: dory` and calls `build`.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

import torch
from torch import Tensor

from loop_lens.adapters.io import CheckpointConfig, TensorSource, assemble, check_weight_dtype
from loop_lens.config import COUNT, FLAG, NUMBER, POSITIVE_INT, POSITIVE_NUMBER, LoopConfig, Rule, choice, show_value
from loop_lens.errors import ConfigError, LoadError
from loop_lens.families.dory import (
    ACTIVATIONS,
    ATTENTION_TYPES,
    KV_CACHE_MODES,
    DorySettings,
    HookedDoryTransformer,
    rope_problem,
)

Mapping = dict[str, tuple[str, Tensor]]

__all__ = ["build", "canonical_name", "dory_config", "dory_mapping"]

# DoryConfig's defaults, used where config.json leaves a key out (as transformers does)
_DEFAULT_ROPE_THETA = {"sliding_attention": 10_000.0, "full_attention": 10_000_000.0}
_LAYER_COUNTS = ("num_hidden_layers", "n_input_layers", "n_recurrent_layers", "n_output_layers")


def _layer_types(r: CheckpointConfig) -> tuple[Optional[list[str]], dict[str, Optional[int]]]:
    """`layer_types` (one attention type per decoder layer) and the four layer counts, with the
    two-block form (`[attn, "mlp", attn, "mlp", ...]`, counts doubled) collapsed."""
    counts = {
        "num_hidden_layers": r.checked("num_hidden_layers", POSITIVE_INT, "num_hidden_layers", default=36),
        "n_input_layers": r.checked("n_input_layers", COUNT, "n_input_layers", default=8),
        "n_recurrent_layers": r.checked("n_recurrent_layers", COUNT, "n_recurrent_layers", default=None),
        "n_output_layers": r.checked("n_output_layers", COUNT, "n_output_layers", default=8),
    }
    types = r.config.get("layer_types")
    if types is None:
        return None, counts
    where = f"{r.origin} field 'layer_types'"
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise LoadError(f"{where}: expected a non-empty list of strings, got {show_value(types)}")
    if "mlp" not in types:
        bad = sorted({t for t in types if t not in ATTENTION_TYPES})
        if bad:
            raise LoadError(f"{where}: unknown layer type(s) {bad}; expected {list(ATTENTION_TYPES)}")
        return types, counts
    # two-block form: each decoder layer is an attention block followed by an mlp block
    if len(types) % 2 or any(t != "mlp" for t in types[1::2]) or any(t not in ATTENTION_TYPES for t in types[::2]):
        raise LoadError(
            f"{where}: lists 'mlp' blocks, so it must alternate an attention type {list(ATTENTION_TYPES)} and 'mlp' "
            f"(attention first), got {show_value(types)}"
        )
    for key, value in counts.items():
        if value is not None and value % 2:
            raise LoadError(
                f"{r.origin} field {key!r}: {value} is odd, but 'layer_types' lists attention and mlp blocks "
                "separately, so every layer count must count both blocks (be even)"
            )
    halved = {key: (None if value is None else value // 2) for key, value in counts.items()}
    return types[::2], halved


def _rope(r: CheckpointConfig, kinds: set[str]) -> dict[str, dict[str, Any]]:
    """RoPE parameters for each attention type in use, from `rope_parameters` (DoryConfig's
    defaults when it is absent)."""
    params = r.config.get("rope_parameters")
    if params is None:
        return {kind: {"rope_type": "default", "rope_theta": _DEFAULT_ROPE_THETA[kind]} for kind in kinds}
    where = f"{r.origin} field 'rope_parameters'"
    if not isinstance(params, dict):
        raise LoadError(f"{where}: expected an object keyed by attention type, got {show_value(params)}")
    if "rope_type" in params or "rope_theta" in params:
        raise LoadError(
            f"{where}: Dory needs one entry per attention type ({sorted(kinds)}), got a single set of parameters "
            "(transformers' DoryForCausalLM cannot run this config either)"
        )
    out = {}
    for kind in sorted(kinds):
        if kind not in params:
            raise LoadError(f"{where}: no entry for {kind!r}, which 'layer_types' uses")
        problem = rope_problem(params[kind])
        if problem:
            raise LoadError(f"{r.origin} field 'rope_parameters.{kind}': {problem}")
        out[kind] = dict(params[kind])
    return out


def dory_config(config: dict[str, Any], origin: str = "config.json") -> LoopConfig:
    """The LoopConfig (layout and widths; Dory's own switches in `extra["dory"]`) of a Dory
    config.json, every key checked; LoadError naming the key otherwise."""
    r = CheckpointConfig(config, origin)
    if config.get("model_type") != "dory":
        raise LoadError(f"{origin} field 'model_type': expected 'dory', got {show_value(config.get('model_type'))}")
    types, counts = _layer_types(r)
    n_layers, n_in, n_out = counts["num_hidden_layers"], counts["n_input_layers"], counts["n_output_layers"]
    if types is None:  # DoryConfig's default pattern: every fourth layer is full attention
        types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n_layers)]
    if len(types) != n_layers:
        raise LoadError(f"{origin} field 'layer_types': {len(types)} decoder layers, but 'num_hidden_layers' says {n_layers}")
    n_rec = counts["n_recurrent_layers"]
    if n_rec is None:
        n_rec = n_layers - n_in - n_out
        if n_rec < 0:
            raise LoadError(f"{origin}: n_input_layers + n_output_layers = {n_in + n_out} exceeds num_hidden_layers = {n_layers}")
        r.note("n_block", f"{origin} fields 'num_hidden_layers' - 'n_input_layers' - 'n_output_layers'")
    elif n_in + n_rec + n_out != n_layers:
        raise LoadError(
            f"{origin}: n_input_layers + n_recurrent_layers + n_output_layers = {n_in} + {n_rec} + {n_out} "
            f"must equal num_hidden_layers = {n_layers}"
        )
    else:
        r.note("n_block", f"{origin} field 'n_recurrent_layers'")
    r.note("n_prelude", f"{origin} field 'n_input_layers'")
    r.note("n_coda", f"{origin} field 'n_output_layers'")
    checks: dict[str, tuple[Rule, Any]] = {
        "sliding_window": (POSITIVE_INT, 1024),
        "initializer_range": (POSITIVE_NUMBER, 0.0177),
        "ngpt_alpha_init": (NUMBER, 0.05),
        "hidden_act": (choice(tuple(ACTIVATIONS)), "silu"),
        "recurrent_kv_cache_mode": (choice(KV_CACHE_MODES), "per_loop"),
    }
    own = {key: r.checked(key, rule, key, default=default) for key, (rule, default) in checks.items()}
    try:
        settings = DorySettings(
            layer_types=tuple(types),
            sliding_window=own["sliding_window"],
            rope=_rope(r, set(types)),
            initializer_range=float(own["initializer_range"]),
            ngpt_alpha_init=float(own["ngpt_alpha_init"]),
            hidden_act=own["hidden_act"],
            kv_cache_mode=own["recurrent_kv_cache_mode"],
        )
    except ConfigError as err:  # the checks above should have caught it: name the config anyway
        raise LoadError(f"{origin} is not usable: {err}") from err
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        r.checked(key, FLAG, key, default=False)
    return r.make(
        family="dory",
        model_name=str(config.get("_name_or_path") or "dory"),
        d_model=r.get("d_model", "hidden_size", default=2560),
        n_heads=r.get("n_heads", "num_attention_heads", default=16),
        n_key_value_heads=r.get("n_key_value_heads", "num_key_value_heads", default=4),
        d_head=r.get("d_head", "head_dim", default=256),
        d_mlp=r.get("d_mlp", "intermediate_size", default=7168),
        d_vocab=r.get("d_vocab", "vocab_size", default=131072),
        n_ctx=r.get("n_ctx", "max_position_embeddings", default=8192),
        n_prelude=n_in,
        n_block=n_rec,
        n_coda=n_out,
        default_loops=r.get("default_loops", "n_recurrent_loops", default=2),
        attn_bias=r.get("attn_bias", "attention_bias", default=False),
        mlp_bias=r.get("mlp_bias", "mlp_bias", default=False),
        tie_embeddings=r.get("tie_embeddings", "tie_word_embeddings", default=False),
        # descriptive (Dory's layers are family code, loop_lens/families/dory.py); they pick the
        # shared layer hook sites Dory's layers fire: norms before and after each sublayer, the gate
        norm_placement="sandwich",
        norm_weight=False,
        qk_norm="head",
        attn_gate=True,
        injection="none",  # each pass's start unit(h) + unit(e) is iter.{t}.hook_state_pre
        extra={"dory": settings.to_extra()},
    )


_TWO_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(mixer|attn_alpha|mlp_alpha)(?=\.|$)")


def canonical_name(name: str) -> str:
    """A Dory tensor name in transformers' module naming (`model.layers.{i}.self_attn.gate_proj.weight`),
    from any of the three layouts (see the module docstring)."""
    if name.startswith("backbone."):
        name = "model." + name[len("backbone."):]
    if name.startswith("model.embeddings."):
        name = "model.embed_tokens." + name[len("model.embeddings."):]
    match = _TWO_BLOCK.match(name)
    if match:
        block, part = int(match[1]), match[2]
        part = {"attn_alpha": "lambda_1", "mlp_alpha": "lambda_2"}.get(part, ("self_attn", "mlp")[block % 2])
        name = f"model.layers.{block // 2}.{part}{name[match.end():]}"
    return name.replace(".self_attn.g_proj.", ".self_attn.gate_proj.")


def _index(source: TensorSource) -> dict[str, str]:
    """canonical name -> the checkpoint's name; LoadError when two checkpoint tensors claim one name."""
    index: dict[str, str] = {}
    for name in source.tensors:
        key = canonical_name(name)
        if key in index:
            raise LoadError(f"tensors {index[key]!r} and {name!r} in {source.origin} are both {key!r} (mixed layouts?)")
        index[key] = name
    return index


def _layer_params(prefix: str, cfg: LoopConfig) -> list[tuple[str, str]]:
    """(our name under the layer, transformers' name under the layer) for one decoder layer."""
    pairs = [(f"attn.{p}.weight", f"self_attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")]
    if cfg.attn_bias:
        pairs += [(f"attn.{p}.bias", f"self_attn.{p}.bias") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    pairs += [("attn.sqk", "self_attn.sqk"), ("attn.s_gate", "self_attn.s_gate")]
    pairs += [(f"mlp.{p}.weight", f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
    if cfg.mlp_bias:
        pairs += [(f"mlp.{p}.bias", f"mlp.{p}.bias") for p in ("gate_proj", "up_proj", "down_proj")]
    pairs += [("mlp.suv_gate", "mlp.suv_gate"), ("mlp.suv_up", "mlp.suv_up"), ("lambda_1", "lambda_1"), ("lambda_2", "lambda_2")]
    return [(f"{prefix}.{ours}", theirs) for ours, theirs in pairs]


def dory_mapping(cfg: LoopConfig, source: TensorSource) -> Mapping:
    """`{our parameter name: (checkpoint tensor name, tensor)}` for every parameter of a Dory model
    of `cfg`; LoadError naming the first tensor the checkpoint lacks."""
    index = _index(source)

    def take(canonical: str) -> tuple[str, Tensor]:
        if canonical not in index:
            raise LoadError(f"missing tensor {canonical!r} (or its backbone./two-block name) in {source.origin}")
        return index[canonical], source.take(index[canonical])

    mapped: Mapping = {"embed.weight": take("model.embed_tokens.weight")}
    stacks = (("prelude_blocks", 0, cfg.n_prelude), ("blocks", cfg.n_prelude, cfg.n_block),
              ("coda_blocks", cfg.n_prelude + cfg.n_block, cfg.n_coda))
    for stack, first, count in stacks:
        for layer in range(count):
            for ours, theirs in _layer_params(f"{stack}.{layer}", cfg):
                mapped[ours] = take(f"model.layers.{first + layer}.{theirs}")
    if not cfg.tie_embeddings:
        mapped["unembed.weight"] = take("lm_head.weight")
    mapped["unembed.logit_scale"] = take("lm_head.logit_scale")
    return mapped


def build(
    config: dict[str, Any],
    src: TensorSource,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    tokenizer: Any = None,
    origin: str = "config.json",
) -> HookedDoryTransformer:
    """A Dory config dict + tensors -> a HookedDoryTransformer: every parameter mapped with a
    float tensor of the right shape (LoadError naming it otherwise); unused tensors warn once."""
    check_weight_dtype(dtype)
    cfg = dory_config(config)
    return assemble(cfg, dory_mapping(cfg, src), src, dtype=dtype, device=device, tokenizer=tokenizer)
