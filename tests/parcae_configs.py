"""Random Parcae configurations over the official code's documented switches, and checkpoints
written in the official on-disk layout (config.json = asdict(ParcaeConfig) + _class_name,
pytorch_model.bin = the state dict with freqs_cis and, when tied, both head keys)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import parcae_reference as ref
import torch

BASE = {  # every ParcaeConfig field (as dataclasses.asdict writes them), official defaults
    "name": "random-parcae", "hf_config": {}, "block_size": 24, "n_embd": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100, "padding_multiple": 64,
    "padded_vocab_size": None, "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
    "use_abacus": False, "randomize_positions_from": None, "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "RMSNorm", "attn_impl": "flash", "norm_eps": 1e-5, "mlp_class_name": "BaseMLP",
    "nonlin_name": "ReLU2", "bias": False, "qk_bias": False, "init_strategy": "scaled-zero", "init_orthogonal": True,
    "skip_initialization": False, "mup_model_scaling_factor": 1, "use_fused_head": "pytorch",
    "debias_attention": False, "center_attention": False, "clip_qkv": None, "qk_norm": True, "logit_softcap": None,
    "activation_checkpoint_impl": "per-iteration", "simple_ops": False, "strategy": "single",
    "injection_type": "diagonal", "n_layers_in_recurrent_block": 2, "n_layers_in_prelude": 1, "n_layers_in_coda": 1,
    "state_init": "like-init", "recurrent_embedding_dimension": 64, "recurrent_intermediation_embedding_dimension": 128,
    "recurrent_num_attention_heads": None, "prelude_norm": False, "sampling_scheme": "poisson-truncated-full",
    "mean_recurrence": 3, "mean_backprop_depth": 1, "lockstep_n": False, "lockstep_k": False,
    "curriculum_target": "forward", "recurrent_iteration_method": "per-batch", "tie_embeddings": False,
    "model_class_name": "Parcae", "_is_recurrent_block_config": False,
}


def random_config(rng: random.Random) -> dict:
    """One configuration drawn over the switches: widths, heads, GQA, state width and heads,
    layer counts, norm / MLP / nonlinearity classes, biases, qk bias / norm, clip_qkv, RoPE on or
    off, injection type, initial-state rule, init strategy (emb / logit scales), softcap, head
    tying and kind, iteration method and sampling scheme, padded vocabulary."""
    c = json.loads(json.dumps(BASE))
    use_rope = rng.random() < 0.85
    H = rng.choice([2, 4])
    hd = rng.choice([8, 16]) if H == 4 else 16
    D = H * hd
    K = rng.choice([k for k in (1, 2, 4) if H % k == 0])
    SH = rng.choice([1, 2, 4])
    shd = hd if use_rope else rng.choice([8, 16, 32])
    S = SH * shd if rng.random() < 0.6 else D
    if S == D and (S % SH or (use_rope and S // SH != hd)):
        SH = H
    c.update(
        n_embd=D, num_attention_heads=H, num_key_value_heads=K, intermediate_size=rng.choice([32, 48, 96]),
        recurrent_embedding_dimension=S, recurrent_num_attention_heads=SH if rng.random() < 0.8 or SH != H else None,
        recurrent_intermediation_embedding_dimension=rng.choice([32, 64]),
        n_layers_in_prelude=rng.choice([0, 1, 2]), n_layers_in_recurrent_block=rng.choice([1, 2, 3]),
        n_layers_in_coda=rng.choice([0, 1, 2]), mean_recurrence=rng.choice([1, 2, 3, 4]),
        norm_class_name=rng.choice(["RMSNorm", "LayerNorm"]), simple_ops=rng.random() < 0.15,
        mlp_class_name=rng.choice(["BaseMLP", "GatedMLP"]), nonlin_name=rng.choice(["ReLU2", "GELU", "SiLU", "ReLU", "Tanh"]),
        bias=rng.random() < 0.4, qk_bias=K == H and rng.random() < 0.4, qk_norm=rng.random() < 0.6,
        clip_qkv=rng.choice([None, None, 0.7, 2.0]), prelude_norm=rng.random() < 0.5,
        tie_embeddings=rng.random() < 0.5, use_fused_head=rng.choice(["pytorch", "cce", "full-triton"]),
        injection_type=rng.choice(["diagonal", "linear"] + (["add"] if S == D else [])),
        state_init=rng.choice(["like-init", "zero", "normal", "embed", "unit"]),
        init_strategy=rng.choice(["scaled-zero", "takase-scaled", "llama-by-dim-ls", "mitchell", "wang", "takase"]),
        logit_softcap=rng.choice([None, None, 15.0]),
        recurrent_iteration_method=rng.choice(["per-batch", "per-sequence", "per-token"]),
        sampling_scheme=rng.choice(["poisson-truncated-full", "poisson-full", "fixed", "poisson-unbounded"]),
        vocab_size=rng.randint(40, 130), padding_multiple=rng.choice([16, 64]),
        block_size=rng.choice([12, 24]), randomize_positions_from=rng.choice([None, None, 32]),
    )
    c["mean_backprop_depth"] = rng.randint(0, c["mean_recurrence"])
    c["rope_settings"]["use_rope"] = use_rope
    c["rope_settings"]["rope_base"] = rng.choice([10000, 50000])
    return c


def random_state_dict(c: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for every official tensor (norm weights near 1, the saved freqs_cis table)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in ref.official_shapes(c).items():
        if name == "freqs_cis":
            sd[name] = ref.freqs_cis(c)
        elif ".norm_" in name or name.startswith(("transformer.ln_f.", "transformer.ln_prelude.")):
            sd[name] = (1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(shape, generator=g)
        else:
            sd[name] = 0.3 * torch.randn(shape, generator=g)
    if c["tie_embeddings"]:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]  # shared storage, as the official state dict has
    return sd


def write_checkpoint(folder: Path, c: dict, sd: dict) -> Path:
    """config.json + pytorch_model.bin, as parcae_lm.save_pretrained / the fixture lay them out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**c, "_class_name": "ParcaeConfig"}, indent=2))
    torch.save(sd, folder / "pytorch_model.bin")
    return folder
