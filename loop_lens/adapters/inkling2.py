"""Inkling 2 (`inkling2_loop_text` / `inkling2_loop`) checkpoints -> HookedInkling2Transformer.

Two tensor layouts are read:

- the one `save_pretrained` writes (the release's own names): `model.llm.layers.{i}.attn.wq_du`,
  `attn_res.attn_queries.{i-1}`, `controllers.{attn,k,v,mlp}.*`, interleaved `experts.w13_weight`,
  the unembedding padded to `vocab_size`, `middle_cycle_cross_pass_{,kv_}queries`; the multimodal
  release adds `model.visual.*` (the vision tower, skipped: text analysis only);
- transformers' in-memory names (`model.layers.{i}.self_attn.q_proj.linear`, ..., or
  `model.language_model.*` for `Inkling2LoopForConditionalGeneration`), as `ll.from_hf` reads them.

The release's quantized experts (in the release layout) are dequantized at load, as transformers'
`Inkling2LoopDequantizeExperts` does: NVFP4 (`w13_weight` two E2M1 codes per byte, low nibble first,
a float8 `_scale` per 16 values and a per-expert `_amax / _outer_scale_denominator`) and MXFP8
(float8 values, a power-of-two `_scale` `2 ** (s - 127)` per 32 values). With the load option
`packed_experts=True` (`ll.load(path, packed_experts=True)`) they stay packed instead and each
expert is dequantized when a token routes to it (`PackedInkling2Transformer`); every expert
tensor must then be quantized.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from loop_lens.adapters.io import CheckpointConfig, TensorSource, assemble, check_weight_dtype
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, LoadError
from loop_lens.families.inkling2 import E2M1 as E2M1  # re-exported: the codes' values
from loop_lens.families.inkling2 import (
    EXTRA_KEYS,
    FAMILY,
    HookedInkling2Transformer,
    PackedInkling2Transformer,
    dequantize_experts,
)

Mapping = dict[str, tuple[str, Tensor]]
MODEL_TYPES = ("inkling2_loop_text", "inkling2_loop")

_DEFAULTS = {  # transformers' Inkling2LoopTextConfig defaults, for keys a config.json may leave out
    "swa_num_attention_heads": 24, "swa_num_key_value_heads": 8, "swa_head_dim": 128, "sliding_window_size": 1024,
    "d_rel": 16, "rel_extent": 1024, "log_scaling_n_floor": 8192, "log_scaling_alpha": 0.1, "conv_kernel_size": 4,
    "n_routed_experts": 128, "num_experts_per_tok": 8, "route_scale": 8.0, "qk_l2_clip_threshold": 22.627416997969522,
    "rel_l2_clip_threshold": 8.0, "n_layers_per_attn_res_block": 6, "mlp_gate_softcap": 4.0, "mlp_up_softcap": 25.0,
    "final_logit_softcapping": 30.0, "loop_gate_rank": 64,
}
_ALIASES = {"sliding_window_size": ("sliding_window",), "n_routed_experts": ("num_local_experts",),
            "conv_kernel_size": ("sconv_kernel_size",), "route_scale": ("routed_scaling_factor",)}
_QUANTIZED = ("gate_up_proj_scale_inv", "down_proj_scale_inv")  # transformers' in-memory quantized experts
def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: `config` itself, or its `text_config` (the multimodal release)."""
    if config.get("model_type") == "inkling2_loop" or isinstance(config.get("text_config"), dict):
        inner = config.get("text_config")
        if not isinstance(inner, dict):
            raise LoadError(f"config.json: a multimodal Inkling 2 config needs a 'text_config' object, got {inner!r}")
        return inner
    return config


def inkling2_config(config: dict[str, Any]) -> LoopConfig:
    """The LoopConfig of an Inkling 2 text config (values checked by LoopConfig, named by key)."""
    r = CheckpointConfig(text_config(config))
    c = r.config
    if c.get("scoring_func", "sigmoid") != "sigmoid":
        raise LoadError(f"{r.origin} field 'scoring_func': Inkling 2's router is supported with 'sigmoid' only, "
                        f"got {c['scoring_func']!r}")
    if c.get("loop_config") is not None:
        raise LoadError(f"{r.origin} field 'loop_config': give loop_layer_index_start / _end / loop_num_passes instead")
    L = r.get("n_layers", "num_hidden_layers", default=24)
    start = r.get("n_prelude", "loop_layer_index_start", default=6)
    end = r.get("loop_end", "loop_layer_index_end", default=18)
    extra: dict[str, Any] = {}
    for key in EXTRA_KEYS:
        if key in ("vocab_size", "layer_types"):
            continue
        extra[key] = r.get(key, key, *_ALIASES.get(key, ()), default=_DEFAULTS[key])
    layer_types = c.get("layer_types")
    if layer_types is None:
        layer_types = ["hybrid" if (i + 1) % 6 == 0 else "hybrid_sliding" for i in range(L)] if isinstance(L, int) else []
    extra["layer_types"] = layer_types
    unpadded = r.get("d_vocab", "unpadded_vocab_size", "vocab_size", default=200058)
    extra["vocab_size"] = r.get("embed_vocab", "vocab_size", default=201024)
    if not all(isinstance(v, (int, float, str, list)) and not isinstance(v, bool) for v in extra.values()):
        bad = {k: v for k, v in extra.items() if not isinstance(v, (int, float, str, list)) or isinstance(v, bool)}
        raise LoadError(f"{r.origin}: fields {sorted(bad)} must be numbers, got {bad}")
    try:
        cfg = r.make(
            d_model=r.get("d_model", "hidden_size", default=2304),
            n_heads=r.get("n_heads", "num_attention_heads", default=24),
            n_key_value_heads=r.get("n_key_value_heads", "num_key_value_heads", default=8),
            d_head=r.get("d_head", "head_dim", default=128),
            d_mlp=r.get("d_mlp", "moe_intermediate_size", "intermediate_size", default=1152),
            d_vocab=unpadded,
            n_prelude=start,
            n_block=end - start if isinstance(end, int) and isinstance(start, int) else end,
            n_coda=L - end if isinstance(end, int) and isinstance(L, int) else L,
            default_loops=r.get("default_loops", "loop_num_passes", default=3),
            n_ctx=r.get("n_ctx", "max_position_embeddings", default=1048576),
            norm_eps=r.get("norm_eps", "rms_norm_eps", default=1e-6),
            positional_embedding_type="none",
            attn_gate=True,
            family=FAMILY,
            model_name=c.get("_name_or_path") if isinstance(c.get("_name_or_path"), str) and c.get("_name_or_path")
            else "inkling2",
            extra=extra,
        )
    except ConfigError as err:
        raise LoadError(f"{r.origin}: {err}") from err
    from loop_lens.families.inkling2 import check_config

    try:
        check_config(cfg)
    except ConfigError as err:
        raise LoadError(f"{r.origin}: {err}") from err
    return cfg


def _layout(src: TensorSource) -> tuple[str, bool]:
    """(prefix of the text model, whether it is the release's own naming)."""
    for prefix, original in (("model.llm.", True), ("model.language_model.", False), ("model.", False)):
        if src.has(prefix + ("embed.weight" if original else "embed_tokens.weight")):
            return prefix, original
    raise LoadError(f"{src.origin} holds no Inkling 2 embedding (model.llm.embed.weight or model.embed_tokens.weight)")


Packed = dict[str, tuple[str, Tensor, Tensor, Optional[Tensor]]]


def inkling2_mapping(cfg: LoopConfig, src: TensorSource, packed: Optional[Packed] = None) -> Mapping:
    """`{our parameter: (checkpoint tensor, tensor)}` for an Inkling 2 state dict (either layout).
    With `packed` (a dict to fill), quantized experts are not dequantized: `packed[our module]`
    gets `(checkpoint tensor, weight, scale, factor or None)`, rows already in our order."""
    quantized = [k for k in src.tensors if k.rsplit(".", 1)[-1] in _QUANTIZED]
    if quantized:
        raise LoadError(f"{src.origin} holds transformers' quantized experts ({quantized[0]!r}, ...): load the "
                        "release's own files (ll.load on the checkpoint directory), which are dequantized here")
    prefix, original = _layout(src)
    out: Mapping = {}
    D = cfg.d_model

    def put(ours: str, name: str, shape: Optional[tuple[int, ...]] = None) -> None:
        tensor = src.take(prefix + name)
        if shape is not None:
            if tensor.numel() != int(torch.Size(shape).numel()):
                raise LoadError(f"tensor {prefix + name!r} in {src.origin} has shape {tuple(tensor.shape)}, "
                                f"expected {shape} for this config")
            tensor = tensor.reshape(shape)
        out[ours] = (prefix + name, tensor)

    P, K = cfg.n_prelude, cfg.n_block
    layers = [("prelude_blocks", l, l) for l in range(P)] + [("blocks", l, P + l) for l in range(K)] + \
             [("coda_blocks", l, P + K + l) for l in range(cfg.n_coda)]
    x = cfg.extra
    for stack, l, i in layers:
        ours = f"{stack}.{l}"
        sliding = x["layer_types"][i] == "hybrid_sliding"
        n_q = 1 if sliding else 3
        if original:
            lay, a = f"layers.{i}.", f"layers.{i}.attn."
            if i > 0:
                put(f"{ours}.attn_query", f"attn_res.attn_queries.{i - 1}", (n_q, D))
            put(f"{ours}.mlp_query", f"attn_res.mlp_queries.{i}", (1, D))
            names = {"q.weight": "wq_du.weight", "q_clip.scale": "q_l2_clip.scale", "k.weight": "wk_dv.weight",
                     "v.weight": "wv_dv.weight", "gate.weight": "gate_attn.weight", "o.weight": "wo_ud.weight",
                     "sink.weight": "attn_sink_proj.weight", "rel.weight": "wr_du.weight",
                     "rel_clip.scale": "rel_l2_clip.scale", "rel_proj": "rel_logits_proj.proj"}
            convs = ({"k_conv.weight": "k_sconv.weight", "v_conv.weight": "v_sconv.weight"} if sliding else
                     {"k_conv.static": "k_sconv.static_w", "k_conv.proj.weight": "k_sconv.weight_proj",
                      "v_conv.static": "v_sconv.static_w", "v_conv.proj.weight": "v_sconv.weight_proj"})
            for ours_name, theirs in {**names, **convs}.items():
                put(f"{ours}.attn.{ours_name}", a + theirs)
            put(f"{ours}.mlp.router", lay + "mlp.gate.weight")
            put(f"{ours}.mlp.bias", lay + "mlp.gate.bias")
            w13_name, w2_name = prefix + lay + "mlp.experts.w13_weight", prefix + lay + "mlp.experts.w2_weight"
            if packed is not None:
                weight, scale, factor = _packed(src, w13_name)  # re-laid out in place of what was read: no second copy
                weight = src.replace(w13_name, _deinterleave(weight))
                scale = src.replace(w13_name + "_scale", _deinterleave(scale))
                packed[f"{ours}.mlp.gate_up"] = (w13_name, weight, scale, factor)
                packed[f"{ours}.mlp.down"] = (w2_name, *_packed(src, w2_name))
            else:
                w13 = _experts(src, w13_name)  # rows interleaved: gate_0, up_0, gate_1, ...
                out[f"{ours}.mlp.gate_up"] = (w13_name, _deinterleave(w13))
                out[f"{ours}.mlp.down"] = (w2_name, _experts(src, w2_name))
            norms = ["attn_norm"] if sliding else ["q_input_norm", "k_input_norm", "v_input_norm"]
            for j, name in enumerate(norms):
                put(f"{ours}.ln_in.{j}.weight", lay + name + ".weight")
            put(f"{ours}.ln_mlp.weight", lay + "mlp_norm.weight")
            put(f"{ours}.attn_conv.weight", lay + "attn_sconv.weight")
            put(f"{ours}.mlp_conv.weight", lay + "mlp_sconv.weight")
            if stack == "blocks":
                for j, name in enumerate(("attn", "k", "v", "mlp")):
                    for ours_name, theirs in (("down", "down_weight"), ("forget", "forget_weight"), ("gain", "gain_weight")):
                        put(f"{ours}.message_gates.{j}.{ours_name}.weight", f"{lay}controllers.{name}.{theirs}")
        else:
            lay, a = f"layers.{i}.", f"layers.{i}.self_attn."
            if i > 0:
                put(f"{ours}.attn_query", lay + "attention_input.query", (n_q, D))
            put(f"{ours}.mlp_query", lay + "mlp_input.query", (1, D))
            names = {"q.weight": "q_proj.linear.weight", "q_clip.scale": "q_proj.norm.scale",
                     "k.weight": "k_proj.linear.weight", "v.weight": "v_proj.linear.weight",
                     "gate.weight": "o_proj.gate_proj.weight", "o.weight": "o_proj.linear.weight",
                     "sink.weight": "sink_proj.weight", "rel.weight": "relative_position_bias.linear.weight",
                     "rel_clip.scale": "relative_position_bias.norm.scale", "rel_proj": "relative_position_bias.proj"}
            convs = ({"k_conv.weight": "k_proj.sconv.conv1d.weight", "v_conv.weight": "v_proj.sconv.conv1d.weight"}
                     if sliding else
                     {"k_conv.static": "k_proj.sconv.static_weight", "k_conv.proj.weight": "k_proj.sconv.weight_proj.weight",
                      "v_conv.static": "v_proj.sconv.static_weight", "v_conv.proj.weight": "v_proj.sconv.weight_proj.weight"})
            for ours_name, theirs in {**names, **convs}.items():
                put(f"{ours}.attn.{ours_name}", a + theirs)
            put(f"{ours}.mlp.router", lay + "mlp.gate.weight")
            put(f"{ours}.mlp.bias", lay + "mlp.gate.e_score_correction_bias")
            put(f"{ours}.mlp.gate_up", lay + "mlp.experts.gate_up_proj")
            put(f"{ours}.mlp.down", lay + "mlp.experts.down_proj")
            norms = ["input_layernorm"] if sliding else ["q_input_layernorm", "k_input_layernorm", "v_input_layernorm"]
            for j, name in enumerate(norms):
                put(f"{ours}.ln_in.{j}.weight", lay + name + ".weight")
            put(f"{ours}.ln_mlp.weight", lay + "post_attention_layernorm.weight")
            put(f"{ours}.attn_conv.weight", lay + "post_attention_convolution.conv1d.weight")
            put(f"{ours}.mlp_conv.weight", lay + "post_mlp_convolution.conv1d.weight")
            if stack == "blocks":
                for j, name in enumerate(("q", "k", "v", "mlp")):
                    for ours_name, theirs in (("down", "down_proj"), ("forget", "forget_gate_proj"),
                                              ("gain", "message_gate_proj")):
                        put(f"{ours}.message_gates.{j}.{ours_name}.weight", f"{lay}{name}_message_gate.{theirs}.weight")

    if original:
        put("embed.weight", "embed.weight")
        put("embed_norm.weight", "embed_norm.weight")
        put("ln_final.weight", "norm.weight")
        put("final_query", "attn_res.output_query", (1, D))
        queries = src.take(prefix + "middle_cycle_cross_pass_queries")  # [query, mlp] per loop layer
        kv = src.take(prefix + "middle_cycle_cross_pass_kv_queries")  # [key, value] per loop layer
        if tuple(queries.shape) != (2 * K, D) or tuple(kv.shape) != (2 * K, D):
            raise LoadError(f"tensors {prefix}middle_cycle_cross_pass_queries / _kv_queries in {src.origin} have shapes "
                            f"{tuple(queries.shape)} / {tuple(kv.shape)}, expected ({2 * K}, {D}) each")
        q2, kv2 = queries.reshape(K, 2, D), kv.reshape(K, 2, D)
        out["message_queries"] = (prefix + "middle_cycle_cross_pass_queries",
                                  torch.cat([q2[:, :1], kv2, q2[:, 1:]], dim=1))
        unembed = src.take(prefix + "unembed.weight")  # padded to vocab_size with zero rows
        out["unembed.weight"] = (prefix + "unembed.weight", unembed[: cfg.d_vocab])
    else:
        put("embed.weight", "embed_tokens.weight")
        put("embed_norm.weight", "embed_tokens.embed_norm.weight")
        put("ln_final.weight", "norm.weight")
        put("final_query", "final_input.query", (1, D))
        put("message_queries", "message_input.query")
        out["unembed.weight"] = ("lm_head.weight", src.take("lm_head.weight"))
    for name in src.tensors:  # the multimodal release's vision tower: not used for text analysis
        if name.startswith(("model.visual.", "model.vision_tower.")):
            src.used.add(name)
    return out


def _deinterleave(w13: Tensor) -> Tensor:
    """The release's interleaved expert rows (gate_0, up_0, gate_1, ...) as [gate rows; up rows]."""
    E, rows, d = w13.shape
    return w13.reshape(E, rows // 2, 2, d).transpose(1, 2).reshape(E, rows, d)


def _packed(src: TensorSource, name: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """A quantized expert tensor as stored: (weight, scale, NVFP4 factor amax / denominator per
    expert, or None for MXFP8); LoadError when it is not quantized."""
    if not src.has(name + "_scale"):
        raise LoadError(f"packed_experts=True: tensor {name!r} in {src.origin} is not quantized (no {name + '_scale'!r}); "
                        "only a checkpoint whose experts are all NVFP4 / MXFP8 can keep them packed")
    weight, scale = src.take(name), src.take(name + "_scale")
    if not src.has(name + "_amax"):
        return weight, scale, None
    den = name + "_outer_scale_denominator"
    if not src.has(den):
        raise LoadError(f"{name}: NVFP4 experts have an _amax but no _outer_scale_denominator")
    factor = (src.take(name + "_amax").float() / src.take(den).float()).reshape(-1)
    E = weight.shape[0]
    factor = factor.expand(E).clone() if factor.numel() == 1 else factor
    if factor.numel() != E:
        raise LoadError(f"{name}: NVFP4 _amax / _outer_scale_denominator give {factor.numel()} factors for {E} experts")
    return weight, scale, factor


def _experts(src: TensorSource, name: str) -> Tensor:
    """An expert tensor of the release layout, dequantized when it comes with scales."""
    weight = src.take(name)
    if not src.has(name + "_scale"):
        return weight
    amax = src.take(name + "_amax") if src.has(name + "_amax") else None
    den = name + "_outer_scale_denominator"
    return dequantize_experts(weight, src.take(name + "_scale"), amax, src.take(den) if src.has(den) else None, name)


def build(
    config: dict[str, Any],
    src: TensorSource,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    tokenizer: Any = None,
    origin: str = "config.json",
    packed_experts: bool = False,
) -> HookedInkling2Transformer:
    """Config + tensors -> a HookedInkling2Transformer; every parameter must be mapped with a float
    tensor of the right shape (LoadError naming it otherwise); unused tensors warn once.

    `packed_experts=True`: keep the release's NVFP4 / MXFP8 experts packed, dequantizing one
    expert per call (a `PackedInkling2Transformer`); every expert tensor must be quantized."""
    check_weight_dtype(dtype)
    if not isinstance(packed_experts, bool):
        raise LoadError(f"packed_experts must be True or False, got {packed_experts!r}")
    cfg = inkling2_config(config)
    packed: Optional[Packed] = {} if packed_experts else None
    mapped = inkling2_mapping(cfg, src, packed)
    if packed is None:
        return assemble(cfg, mapped, src, dtype=dtype, device=device, tokenizer=tokenizer)
    if not packed:
        raise LoadError(f"packed_experts=True: {src.origin} has no experts in the release layout "
                        "(model.llm.layers.{i}.mlp.experts.w13_weight with their scales)")
    model = assemble(cfg, mapped, src, dtype=dtype, device=device, tokenizer=tokenizer,
                     model_cls=PackedInkling2Transformer)
    target = model.unembed.weight.device
    for module, (name, weight, scale, factor) in packed.items():
        model.get_submodule(module).set(weight.to(target), scale.to(target),
                                        None if factor is None else factor.to(target), name)
    return model
