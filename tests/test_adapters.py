"""Adapters beyond the fixtures: GQA, llama3 RoPE scaling, OLMo-2 flavour, other layer counts,
looping feedforward checkpoints, and every kind of bad input.

transformers' own LlamaForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel / Olmo2ForCausalLM (random
weights, saved to a temporary directory) are the references for the feedforward parts.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from conftest import golden, require
from safetensors.torch import load_file, save_file

import loop_lens as ll
from loop_lens.adapters.io import UnexpectedTensorsWarning

transformers = require("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def _hf(model_cls, config_cls, seed=0, **fields):
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields)).eval()
    with torch.no_grad():  # non-trivial norm weights so a misplaced norm shows
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def llama(layers=4, seed=0, **extra):
    fields = dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
                  tie_word_embeddings=False)
    fields.update(extra)
    return _hf(transformers.LlamaForCausalLM, transformers.LlamaConfig, seed, **fields)


def gpt2(layers=3, seed=0):
    return _hf(transformers.GPT2LMHeadModel, transformers.GPT2Config, seed, vocab_size=61, n_embd=48, n_layer=layers, n_head=4, n_positions=64)


@pytest.fixture
def ids():
    return torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def unrolled_hf(model, block, n_loops):
    """The same transformers model with layers [a, b) written out n_loops times."""
    a, b = block
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    order = list(range(a)) + list(range(a, b)) * n_loops + list(range(b, len(layers)))
    clone = type(model)(model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": len(order), "n_layer": len(order)})).eval()
    clone.load_state_dict(model.state_dict(), strict=False)
    target = clone.model.layers if hasattr(clone, "model") else clone.transformer.h
    for i, src in enumerate(order):
        target[i].load_state_dict(layers[src].state_dict())
    return clone


# ---------------------------------------------------------------------- looping feedforward checkpoints
@pytest.mark.parametrize("extra", [{}, {"rope_scaling": LLAMA3_SCALING}], ids=["plain", "llama3-rope"])
def test_loop_llama_with_gqa_reproduces_transformers(extra, ids, tmp_path):
    hf = llama(**extra)
    hf.save_pretrained(tmp_path)
    model = ll.loop(tmp_path, block=(1, 2), n_loops=1)
    assert model.cfg.n_key_value_heads == 2 and model.cfg.layout == "(1, 1 x 1, 2)"
    torch.testing.assert_close(model(ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    looped = ll.loop(tmp_path, block=(1, 3), n_loops=3)
    torch.testing.assert_close(looped(ids), hf_logits(unrolled_hf(hf, (1, 3), 3), ids), atol=1e-4, rtol=1e-4)


def test_loop_qwen2_with_qkv_bias_reproduces_transformers(ids, tmp_path):
    hf = _hf(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, 0, vocab_size=61, hidden_size=48, intermediate_size=80,
             num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64, tie_word_embeddings=True)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    hf.save_pretrained(tmp_path)
    model = ll.loop(tmp_path, block=(0, 3), n_loops=1)
    torch.testing.assert_close(model(ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_loop_gpt2_reproduces_transformers(ids, tmp_path):
    hf = gpt2()
    hf.save_pretrained(tmp_path)
    model = ll.loop(tmp_path, block=(1, 2), n_loops=1)
    torch.testing.assert_close(model(ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    looped = ll.loop(hf, block=(1, 2), n_loops=4)  # from the in-memory model this time
    torch.testing.assert_close(looped(ids), hf_logits(unrolled_hf(hf, (1, 2), 4), ids), atol=1e-4, rtol=1e-4)


def test_loop_with_additive_injection_starts_from_the_prelude_output(ids):
    hf = llama()
    plain = ll.loop(hf, block=(1, 3), n_loops=1)
    injected = ll.loop(hf, block=(1, 3), n_loops=1, injection="additive")
    torch.testing.assert_close(injected(ids), plain(ids))  # zero start + e = e
    _, cache = injected.run_with_cache(ids, n_loops=2)
    torch.testing.assert_close(cache["iter.1.hook_injected"], cache["iter.0.hook_state_post"] + cache["prelude.0.hook_resid_post"])


def test_from_hf_converts_an_in_memory_model(ids):
    hf = llama()
    model = ll.from_hf(hf)
    assert model.cfg.layout == "(0, 4 x 1, 0)"
    torch.testing.assert_close(model(ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_from_bridge_reads_the_wrapped_model(ids):
    class FakeBridge:  # TransformerBridge keeps the transformers model at .original_model
        def __init__(self, m):
            self.original_model = m
            self.tokenizer = None

    hf = llama()
    torch.testing.assert_close(ll.from_bridge(FakeBridge(hf))(ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ll.LoadError, match="TransformerBridge"):
        ll.from_bridge(object())


# ---------------------------------------------------------------------- Raven layout beyond the fixtures
def _raven_checkpoint(hf, flavour, prelude, core, coda, tmp_path, scaling=None):
    """Write an HF Llama / OLMo-2 as a retrofitted-recurrence checkpoint: the adapter passes `e`
    straight through ([0 | I]), so at n_loops=1 it must compute the original network."""
    c = hf.config
    D, H, K, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    sd = hf.state_dict()
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"], "transformer.adapter.weight": torch.cat([torch.zeros(D, D), torch.eye(D)], 1)}
    parts = [("prelude", i) for i in range(prelude)] + [("core_block", i) for i in range(core)] + [("coda", i) for i in range(coda)]
    for layer, (part, i) in enumerate(parts):
        p, q = f"model.layers.{layer}.", f"transformer.{part}.{i}."
        a = "self_attn."
        out[q + "attn.Wqkv.weight"] = torch.cat([sd[p + a + "q_proj.weight"], sd[p + a + "k_proj.weight"], sd[p + a + "v_proj.weight"]])
        out[q + "attn.proj.weight"] = sd[p + a + "o_proj.weight"]
        out[q + "mlp.fc.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[q + "mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"]
        if flavour == "llama":
            out[q + "norm_1.weight"], out[q + "norm_2.weight"] = sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"]
        else:
            out[q + "norm_1.weight"], out[q + "norm_2.weight"] = sd[p + "post_attention_layernorm.weight"], sd[p + "post_feedforward_layernorm.weight"]
            out[q + "attn.q_norm.weight"], out[q + "attn.k_norm.weight"] = sd[p + a + "q_norm.weight"], sd[p + a + "k_norm.weight"]
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp_path / "model.safetensors"))
    config = {"model_type": "huginn_raven", "n_embd": D, "n_heads": H, "num_key_value_heads": K, "head_dim": hd,
              "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size, "n_layers_in_prelude": prelude,
              "n_layers_in_recurrent_block": core, "n_layers_in_coda": coda, "mean_recurrence": 1, "norm_eps": c.rms_norm_eps,
              "rope_theta": (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0)),
              "rope_scaling": scaling, "injection_type": "linear", "init_values": {"std": 0.02, "embed_scale": 1.0}, "tie_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("layout", [(1, 2, 1), (0, 3, 1), (2, 1, 0)])
def test_retro_llama_flavour_with_gqa_and_llama3_scaling(layout, ids, tmp_path):
    hf = llama(layers=sum(layout), rope_scaling=LLAMA3_SCALING)
    path = _raven_checkpoint(hf, "llama", *layout, tmp_path, scaling=LLAMA3_SCALING)
    model = ll.load(path)
    assert model.cfg.family == "retro-llama" and model.cfg.rope_scaling["rope_type"] == "llama3"
    torch.testing.assert_close(model(ids, n_loops=1, seed=0), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_retro_olmo2_flavour_reproduces_transformers(ids, tmp_path):
    hf = _hf(transformers.Olmo2ForCausalLM, transformers.Olmo2Config, 0, vocab_size=61, hidden_size=48, intermediate_size=80,
             num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    hf.config.head_dim = 8
    model = ll.load(_raven_checkpoint(hf, "olmo2", 1, 1, 1, tmp_path))
    assert model.cfg.family == "retro-olmo2" and model.cfg.norm_placement == "post" and model.cfg.qk_norm == "full"
    torch.testing.assert_close(model(ids, n_loops=1, seed=0), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_family_override_and_sharded_and_bin_sources(tmp_path, ids):
    src = golden("retro-llama-tiny")
    ref = ll.load(src)
    s0 = torch.zeros(2, 9, 64)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(sharded / "a.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(sharded / "b.safetensors"))
    weight_map = {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(names)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(src / "config.json", binary)
    torch.save(tensors, binary / "pytorch_model.bin")
    toks = ids % 120
    for path in (sharded, binary):
        model = ll.load(path, family="retro-llama")
        torch.testing.assert_close(model(toks, initial_state=s0), ref(toks, initial_state=s0))


def test_bf16_checkpoints_load_as_bf16_unless_asked(tmp_path):
    src = golden("huginn-tiny")
    shutil.copy(src / "config.json", tmp_path)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}, str(tmp_path / "model.safetensors"))
    assert ll.load(tmp_path).dtype == torch.bfloat16
    assert ll.load(tmp_path, dtype=torch.float32).dtype == torch.float32


# ---------------------------------------------------------------------- bad input
def _copy(tmp_path, name="huginn-tiny"):
    dst = tmp_path / name
    shutil.copytree(golden(name), dst)
    (dst / "expected.safetensors").unlink()
    return dst


def _edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_missing_tensor_is_named(tmp_path):
    path = _copy(tmp_path)
    _edit_tensors(path, lambda t: t.pop("transformer.core_block.1.mlp.proj.weight"))
    before = _snapshot(path)
    with pytest.raises(ll.LoadError, match=r"missing tensor 'transformer.core_block.1.mlp.proj.weight'"):
        ll.load(path)
    assert _snapshot(path) == before


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    path = _copy(tmp_path)
    _edit_tensors(path, lambda t: t.update({"transformer.coda.0.attn.proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(ll.LoadError, match=r"'transformer.coda.0.attn.proj.weight'.*shape \(64, 32\), expected \(64, 64\)"):
        ll.load(path)


def test_unexpected_extra_tensor_warns_and_still_loads(tmp_path):
    path = _copy(tmp_path, "ouro-tiny")
    _edit_tensors(path, lambda t: t.update({"model.mystery.weight": torch.zeros(3)}))
    with pytest.warns(UnexpectedTensorsWarning, match="model.mystery.weight"):
        model = ll.load(path)
    assert model.cfg.family == "ouro"


def test_truncated_safetensors_file_is_reported(tmp_path):
    path = _copy(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ll.LoadError, match="truncated or corrupt"):
        ll.load(path)


def test_config_that_is_not_json_is_reported(tmp_path):
    path = _copy(tmp_path)
    (path / "config.json").write_text("{ not json")
    with pytest.raises(ll.LoadError, match="config.json is not valid JSON"):
        ll.load(path)


def test_unknown_family_lists_the_known_ones(tmp_path):
    path = _copy(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mamba"
    (path / "config.json").write_text(json.dumps(config))
    _edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("transformer.core_block")])
    with pytest.raises(ll.LoadError, match=r"cannot tell the family.*'mamba'.*known families.*ouro.*huginn"):
        ll.load(path)
    with pytest.raises(ll.LoadError, match="unknown family 'gpt9'"):
        ll.load(golden("huginn-tiny"), family="gpt9")


def test_feedforward_checkpoint_points_to_loop(tmp_path):
    llama().save_pretrained(tmp_path)
    with pytest.raises(ll.LoadError, match=r"feedforward llama checkpoint.*ll.loop"):
        ll.load(tmp_path)
    with pytest.raises(ll.LoadError, match=r"block=\(3, 9\)"):
        ll.loop(tmp_path, block=(3, 9))


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ll.LoadError, match="does not exist"):
        ll.load(tmp_path / "nowhere")


def test_no_code_from_the_checkpoint_is_imported_or_run(tmp_path):
    path = _copy(tmp_path)
    marker = tmp_path / "ran"
    for name in ("modeling_raven.py", "raven_config_minimal.py", "raven_modeling_minimal.py", "__init__.py"):
        (path / name).write_text(f"open({str(marker)!r}, 'w').write('x')\nraise RuntimeError('checkpoint code was executed')\n")
    config = json.loads((path / "config.json").read_text())
    assert "auto_map" in config  # the real format points at remote code; we must ignore it
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnexpectedTensorsWarning)
        model = ll.load(path)
    assert model.cfg.family == "huginn" and not marker.exists()


def test_a_tensor_source_replace_keeps_one_copy_and_counts_as_used():
    """A family re-laying out a tensor (Inkling 2's interleaved expert rows) swaps it for the new
    form in the source, so the source holds no second copy until assemble consumes it."""
    from loop_lens.adapters.io import TensorSource
    from loop_lens.errors import LoadError

    read, kept = torch.ones(2, 3), torch.zeros(2, 3)
    src = TensorSource({"a": read, "b": torch.ones(1)}, "ckpt")
    assert src.replace("a", kept) is kept and src.tensors["a"] is kept
    assert src.unused() == ["b"]
    with pytest.raises(LoadError, match="missing tensor 'c'"):
        src.replace("c", kept)
