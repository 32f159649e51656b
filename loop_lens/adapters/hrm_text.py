"""HRM-Text (`model_type: hrm_text`, transformers' `HrmTextForCausalLM`) -> HookedHrmTransformer.

Reads the config dict and tensors only; no checkpoint code runs. The mapping and the formulas
are in `docs/families/hrm_text.md`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from loop_lens.adapters.families import _rope_scaling, _rope_theta, _vocab
from loop_lens.adapters.io import CheckpointConfig, TensorSource, assemble, check_weight_dtype
from loop_lens.config import FLAG, POSITIVE_INT, POSITIVE_NUMBER, TEXT, LoopConfig
from loop_lens.errors import LoadError
from loop_lens.families.hrm import HookedHrmTransformer

Mapping = dict[str, tuple[str, Tensor]]
_STACKS = {"H_module": "blocks", "L_module": "low_blocks"}
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def hrm_text_config(config: dict[str, Any], src: TensorSource) -> LoopConfig:
    """The LoopConfig of an HRM-Text config dict (values checked by LoopConfig, named by key)."""
    r = CheckpointConfig(config)
    act = r.get("hidden_act", "hidden_act", default="silu")
    if act != "silu":
        raise LoadError(f"{r.origin} field 'hidden_act': HRM-Text's gated MLP is supported with 'silu' only, got {act!r}")
    # transformers rewrites num_hidden_layers to layers * H_cycles * (L_cycles + 1) and keeps the
    # real per-stack count in num_layers_per_stack; a config written before that holds it in num_hidden_layers
    per_stack = r.get("n_block", "num_layers_per_stack", "num_hidden_layers")
    scale = config.get("embedding_scale")
    if scale is None:
        init_range = r.checked("initializer_range", POSITIVE_NUMBER, "initializer_range", default=0.02)
        scale = 1.0 / init_range
        r.note("embed_scale", f"{r.origin} field 'initializer_range' (embedding_scale = 1 / initializer_range)")
    else:
        r.note("embed_scale", f"{r.origin} field 'embedding_scale'")
    return r.make(
        d_model=r.get("d_model", "hidden_size"),
        n_heads=r.get("n_heads", "num_attention_heads"),
        d_head=r.get("d_head", "head_dim", default=None),
        d_mlp=r.get("d_mlp", "intermediate_size"),
        d_vocab=_vocab(r, src, "model.embed_tokens.weight"),
        n_block=per_stack,
        default_loops=r.get("default_loops", "H_cycles", default=2),
        l_cycles=r.checked("l_cycles", POSITIVE_INT, "L_cycles", default=3),
        n_ctx=r.get("n_ctx", "max_position_embeddings", default=2048),
        norm_eps=r.get("norm_eps", "rms_norm_eps", default=1e-6),
        norm_weight=False,
        attn_gate=True,
        attn_bias=r.get("attn_bias", "attention_bias", default=False),
        mlp_bias=r.get("mlp_bias", "mlp_bias", default=False),
        rope_theta=_rope_theta(r, default=10000.0),
        rope_scaling=_rope_scaling(r),
        embed_scale=scale,
        injection="additive",
        initial_state="embed",
        final_norm=False,
        tie_embeddings=r.get("tie_embeddings", "tie_word_embeddings", default=False),
        family="hrm_text",
        model_name=r.checked("model_name", TEXT, "_name_or_path", default="") or "hrm-text",
        extra={"prefix_lm": r.checked("prefix_lm", FLAG, "prefix_lm", default=True)},
    )


def _fused(src: TensorSource, name: str, parts: tuple[str, ...], rows: int) -> dict[str, Tensor]:
    """Split a fused checkpoint weight (rows of each part stacked in `parts` order) into its parts."""
    tensor = src.take(name)
    if tensor.ndim != 2 or tensor.shape[0] != rows * len(parts):
        raise LoadError(f"tensor {name!r} in {src.origin} has shape {tuple(tensor.shape)}, expected "
                        f"[{rows * len(parts)}, d_model] ({' + '.join(parts)}, {rows} rows each)")
    return dict(zip(parts, torch.chunk(tensor, len(parts), dim=0)))


def hrm_text_mapping(cfg: LoopConfig, src: TensorSource) -> Mapping:
    """`{our parameter: (checkpoint tensor, tensor)}` for an HRM-Text state dict: the in-memory
    layout (`self_attn.{gate,q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`) or the one
    `save_pretrained` writes (fused `attn.gqkv_proj` = [gate; q; k; v], `attn.o_proj`, fused
    `mlp.gate_up_proj` = [gate; up]; biases unfused)."""
    out: Mapping = {}

    def put(ours: str, *candidates: str) -> None:
        theirs = next((c for c in candidates if src.has(c)), candidates[0])
        out[ours] = (theirs, src.take(theirs))

    put("embed.weight", "model.embed_tokens.weight")
    put("z_l_init", "model.z_L_init")
    if not cfg.tie_embeddings:
        put("unembed.weight", "lm_head.weight")
    elif src.has("lm_head.weight"):
        src.used.add("lm_head.weight")  # the tied copy of the embedding
    inner = cfg.n_heads * cfg.d_head
    for theirs_stack, ours_stack in _STACKS.items():
        for k in range(cfg.n_block):
            base, ours = f"model.{theirs_stack}.layers.{k}", f"{ours_stack}.{k}"
            gqkv = f"{base}.attn.gqkv_proj.weight"
            if src.has(gqkv):
                for proj, part in _fused(src, gqkv, ("gate_proj", "q_proj", "k_proj", "v_proj"), inner).items():
                    out[f"{ours}.attn.{proj}.weight"] = (gqkv, part)
            gate_up = f"{base}.mlp.gate_up_proj.weight"
            if src.has(gate_up):
                for proj, part in _fused(src, gate_up, ("gate_proj", "up_proj"), cfg.d_mlp).items():
                    out[f"{ours}.mlp.{proj}.weight"] = (gate_up, part)
            for proj in _ATTN:
                for what in ("weight", "bias") if cfg.attn_bias else ("weight",):
                    if f"{ours}.attn.{proj}.{what}" not in out:
                        put(f"{ours}.attn.{proj}.{what}", f"{base}.self_attn.{proj}.{what}", f"{base}.attn.{proj}.{what}")
            for proj in _MLP:
                for what in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                    if f"{ours}.mlp.{proj}.{what}" not in out:
                        put(f"{ours}.mlp.{proj}.{what}", f"{base}.mlp.{proj}.{what}")
    return out


def build(
    config: dict[str, Any],
    src: TensorSource,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    tokenizer: Any = None,
    origin: str = "config.json",
) -> HookedHrmTransformer:
    """Config + tensors -> a HookedHrmTransformer; every parameter must be mapped with a float
    tensor of the right shape (LoadError naming it otherwise); unused tensors warn once."""
    check_weight_dtype(dtype)
    cfg = hrm_text_config(config, src)
    mapped = hrm_text_mapping(cfg, src)
    return assemble(cfg, mapped, src, dtype=dtype, device=device, tokenizer=tokenizer)
