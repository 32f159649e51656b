"""HRM-Text (nested two-timescale recurrence) against transformers' own `HrmTextForCausalLM`.

Every expected value comes from transformers' model (random tiny configurations written with
`save_pretrained`, and forward hooks on its `L_module` / `H_module` recording each call), never
from loop_lens.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hrm_models import VOCAB, HrmTextConfig, HrmTextForCausalLM, random_hrm, saved  # noqa: E402
from safetensors.torch import load_file, save_file

import loop_lens as ll
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, HookNameError, LoadError
from loop_lens.families.hrm import HookedHrmTransformer, parse_nested_hook_name
from loop_lens.model.names import hook_name, parse_hook_name


def _tokens(seed: int = 1, batch: int = 2, pos: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


CONFIGS = [
    dict(H_cycles=2, L_cycles=3, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=False),
    dict(H_cycles=1, L_cycles=1, num_hidden_layers=1, num_attention_heads=2, head_dim=16, tie_word_embeddings=True),
    dict(H_cycles=3, L_cycles=2, num_hidden_layers=3, num_attention_heads=8, head_dim=4, tie_word_embeddings=False),
    dict(H_cycles=2, L_cycles=4, num_hidden_layers=1, num_attention_heads=4, head_dim=6, tie_word_embeddings=True,
         attention_bias=True, mlp_bias=True, embedding_scale=3.0, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: f"H{f['H_cycles']}L{f['L_cycles']}x{f['num_hidden_layers']}")
def test_logits_equal_transformers(fields, tmp_path):
    hf = random_hrm(**fields)
    model = saved(hf, tmp_path)
    assert isinstance(model, HookedHrmTransformer) and model.cfg.family == "hrm_text"
    assert (model.cfg.default_loops, model.cfg.l_cycles, model.cfg.n_block) == (
        fields["H_cycles"], fields["L_cycles"], fields["num_hidden_layers"])
    tokens = _tokens()
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens)
        got_hf = ll.from_hf(hf)(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_hf, want, atol=1e-4, rtol=0)


def test_every_cycle_matters(tmp_path):
    """The comparison above is not vacuous: fewer H cycles, or z_L_init ignored, change the logits."""
    hf = random_hrm()
    model = saved(hf, tmp_path)
    tokens = _tokens()
    with torch.no_grad():
        full = model(tokens)
        assert (model(tokens, n_loops=1) - full).abs().max() > 1e-2
        model.z_l_init.zero_()
        assert (model(tokens) - full).abs().max() > 1e-2


def _with_h(hf: HrmTextForCausalLM, h_cycles: int) -> HrmTextForCausalLM:
    """transformers' model with the same weights and another H_cycles."""
    cfg = {**hf.config.to_dict(), "H_cycles": h_cycles, "num_hidden_layers": hf.config.num_layers_per_stack,
           "num_layers_per_stack": None}
    other = HrmTextForCausalLM(HrmTextConfig(**cfg)).eval()
    other.load_state_dict(hf.state_dict())
    return other


@pytest.mark.parametrize("h_cycles", [1, 3, 5])
def test_runtime_n_loops_sets_h_cycles(h_cycles, tmp_path):
    hf = random_hrm()
    model = saved(hf, tmp_path)
    tokens = _tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, n_loops=h_cycles), _with_h(hf, h_cycles)(tokens).logits, atol=1e-4, rtol=0)
        # exit=h reads z_H after H cycle h: transformers' model with h + 1 H cycles
        for h in range(h_cycles - 1):
            torch.testing.assert_close(model(tokens, n_loops=h_cycles, exit=h), _with_h(hf, h + 1)(tokens).logits, atol=1e-4, rtol=0)


def _record(hf: HrmTextForCausalLM) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Forward hooks on transformers' stacks and layers recording every call, in order."""
    calls: dict[str, list[torch.Tensor]] = {"L_in": [], "L_out": [], "H_in": [], "H_out": []}
    handles = []
    for stack, key in ((hf.model.L_module, "L"), (hf.model.H_module, "H")):
        handles.append(stack.register_forward_pre_hook(lambda m, args, kw, key=key: calls[f"{key}_in"].append(
            (args[0] if args else kw["hidden_states"]).detach().clone()), with_kwargs=True))
        handles.append(stack.register_forward_hook(lambda m, i, o, key=key: calls[f"{key}_out"].append(o.detach().clone())))
        for k, layer in enumerate(stack.layers):
            calls[f"{key}{k}_out"], calls[f"{key}{k}_gate"] = [], []
            handles.append(layer.register_forward_hook(
                lambda m, i, o, name=f"{key}{k}_out": calls[name].append(o.detach().clone())))
            handles.append(layer.self_attn.gate_proj.register_forward_hook(
                lambda m, i, o, name=f"{key}{k}_gate": calls[name].append(torch.sigmoid(o).detach().clone())))
    return calls, handles


def test_every_traversal_cached_equals_transformers_calls(tmp_path):
    hf = random_hrm(H_cycles=3, L_cycles=2, num_hidden_layers=2)
    model = saved(hf, tmp_path)
    H, L, K = 3, 2, 2
    tokens = _tokens(seed=5)
    calls, handles = _record(hf)
    with torch.no_grad():
        want = hf(tokens).logits
    for h in handles:
        h.remove()
    assert len(calls["L_out"]) == H * L and len(calls["H_out"]) == H  # every traversal recorded
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    close = dict(atol=1e-4, rtol=1e-4)
    for h in range(H):
        for lc in range(L):
            i = h * L + lc
            torch.testing.assert_close(cache[f"iter.{h}.low.{lc}.hook_state_pre"], calls["L_in"][i], **close)
            torch.testing.assert_close(cache[f"iter.{h}.low.{lc}.hook_state_post"], calls["L_out"][i], **close)
            for k in range(K):
                torch.testing.assert_close(cache[f"iter.{h}.low.{lc}.blocks.{k}.hook_resid_post"], calls[f"L{k}_out"][i], **close)
                gate = cache[f"iter.{h}.low.{lc}.blocks.{k}.attn.hook_gate"]
                torch.testing.assert_close(gate.flatten(-2), calls[f"L{k}_gate"][i], **close)
        torch.testing.assert_close(cache[f"iter.{h}.hook_injected"], calls["H_in"][h], **close)
        torch.testing.assert_close(cache[f"iter.{h}.hook_state_post"], calls["H_out"][h], **close)
        for k in range(K):
            torch.testing.assert_close(cache[f"iter.{h}.blocks.{k}.hook_resid_post"], calls[f"H{k}_out"][h], **close)
            torch.testing.assert_close(cache[f"iter.{h}.blocks.{k}.attn.hook_gate"].flatten(-2), calls[f"H{k}_gate"][h], **close)
    # z_H entering cycle 0 is the scaled embedding; entering cycle h > 0 it is H's output at h - 1
    torch.testing.assert_close(cache["iter.0.hook_state_pre"], hf.model.embed_tokens(tokens) * hf.config.embedding_scale, **close)
    torch.testing.assert_close(cache["iter.2.hook_state_pre"], calls["H_out"][1], **close)


def test_hook_intervention_matches_transformers(tmp_path):
    """Scaling the new z_L of one L cycle through our hook = scaling that call's output in transformers."""
    hf = random_hrm()
    model = saved(hf, tmp_path)
    tokens = _tokens(seed=7)
    target, seen = 1 * 3 + 1, []  # H cycle 1, L cycle 1

    def scale_call(module, inputs, output):
        seen.append(None)
        return output * 0.5 if len(seen) - 1 == target else None

    handle = hf.model.L_module.register_forward_hook(scale_call)
    with torch.no_grad():
        want = hf(tokens).logits
    handle.remove()
    got = model.run_with_hooks(tokens, fwd_hooks=[("iter.1.low.1.hook_state_post", lambda act, hook: act * 0.5)])
    plain = model(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (plain - want).abs().max() > 1e-3  # the intervention changed something


def test_hook_names_and_filters(tmp_path):
    hf = random_hrm(H_cycles=2, L_cycles=3, num_hidden_layers=2)
    model = saved(hf, tmp_path)
    names = model.hook_names(2)
    for want in ["iter.0.low.2.hook_state_pre", "iter.1.low.0.blocks.1.attn.hook_pattern", "iter.1.low.2.hook_state_post",
                 "iter.1.hook_injected", "iter.1.blocks.0.attn.hook_gate", "iter.1.hook_state_post", "iter.0.hook_state_pre"]:
        assert want in names
    assert "iter.0.low.3.hook_state_pre" not in names and "iter.2.hook_state_post" not in names
    # firing order: L cycles before the H stack in every H cycle
    assert names.index("iter.0.low.2.hook_state_post") < names.index("iter.0.hook_injected") < names.index("iter.1.low.0.hook_state_pre")
    # a filter reaches every traversal
    _, cache = model.run_with_cache(_tokens(), names_filter=lambda n: n.endswith("low.0.blocks.1.hook_resid_post") or n.endswith(".blocks.1.hook_resid_post"))
    assert sorted(cache.keys()) == sorted(
        [f"iter.{h}.low.{lc}.blocks.1.hook_resid_post" for h in range(2) for lc in range(3)]
        + [f"iter.{h}.blocks.1.hook_resid_post" for h in range(2)])
    # a hook where this run does not reach is refused
    with pytest.raises(HookNameError, match="iter.2"):
        model.run_with_cache(_tokens(), names_filter=["iter.2.low.0.hook_state_post"])
    with pytest.raises(HookNameError):
        model.run_with_cache(_tokens(), names_filter=["iter.0.low.3.hook_state_post"])  # L_cycles = 3
    # hook points exist only while something is hooked
    model.reset_hooks()
    assert len(model.iter) == 0


def test_hook_name_helpers():
    assert hook_name("resid_post", layer=1, iteration=2, low_cycle=0) == "iter.2.low.0.blocks.1.hook_resid_post"
    assert hook_name("state_pre", iteration=0, low_cycle=3) == "iter.0.low.3.hook_state_pre"
    assert hook_name("gate", layer=0, iteration=1) == "iter.1.blocks.0.attn.hook_gate"
    assert hook_name("injected", iteration=1) == "iter.1.hook_injected"
    assert parse_nested_hook_name("iter.2.low.0.blocks.1.attn.hook_gate") == (2, 0, 1, "attn.hook_gate")
    assert parse_nested_hook_name("iter.2.low.4.hook_state_post") == (2, 4, None, "hook_state_post")
    assert parse_nested_hook_name("iter.1.blocks.0.hook_resid_pre") == (1, None, 0, "hook_resid_pre")
    assert parse_nested_hook_name("iter.1.hook_injected") == (1, None, None, "hook_injected")
    assert parse_hook_name("iter.1.low.0.hook_state_pre").iteration == 1  # still an iteration-1 name
    for bad in ("prelude.0.hook_resid_post", "iter.x.hook_state_pre", "iter.1.low.0.blocks.1"):
        with pytest.raises(ValueError):
            parse_nested_hook_name(bad)
    with pytest.raises(ValueError, match="layer="):
        hook_name("resid_post", iteration=0, low_cycle=0)
    with pytest.raises(ValueError, match="iteration="):
        hook_name("state_pre", low_cycle=0)
    with pytest.raises(ValueError, match="low_cycle"):
        hook_name("state_pre", iteration=0, low_cycle=-1)


def test_stop_at_layer_counts_every_traversal(tmp_path):
    hf = random_hrm(H_cycles=2, L_cycles=3, num_hidden_layers=2)
    model = saved(hf, tmp_path)
    assert model.cfg.depth(2) == 2 * (3 + 1) * 2
    tokens = _tokens()
    wanted = ["iter.0.low.1.blocks.1.hook_resid_pre", "iter.1.low.0.blocks.0.hook_resid_pre", "iter.1.blocks.0.hook_resid_pre"]
    _, cache = model.run_with_cache(tokens, names_filter=wanted)
    # the unrolled depth lists every traversal in the order it runs: L cycles, then the H stack
    for depth, name in zip((3, 8, 14), wanted):
        torch.testing.assert_close(model(tokens, stop_at_layer=depth), cache[name])
    # the full depth: the last H stack's output before its closing norm (the final norm)
    _, full = model.run_with_cache(tokens, names_filter="iter.1.blocks.1.hook_resid_post")
    torch.testing.assert_close(model(tokens, stop_at_layer=model.cfg.depth(2)), full["iter.1.blocks.1.hook_resid_post"])


def test_bad_checkpoints_raise_load_error(tmp_path):
    hf = random_hrm()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(tmp_path / "model.safetensors")

    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(LoadError, match="hidden_act"):
        ll.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "L_cycles": 0}))
    with pytest.raises(LoadError, match="L_cycles"):
        ll.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))

    name = "model.L_module.layers.0.attn.gqkv_proj.weight"
    save_file({**tensors, name: tensors[name][:-1].contiguous()}, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="gqkv_proj"):
        ll.load(tmp_path)
    save_file({k: v for k, v in tensors.items() if k != "model.z_L_init"}, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="z_L_init"):
        ll.load(tmp_path)
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ll.load(tmp_path)
    assert any("model.extra.weight" in str(w.message) for w in caught)


def test_config_and_save_guards(tmp_path):
    with pytest.raises(ConfigError, match="l_cycles"):
        LoopConfig(d_model=16, n_heads=2, d_vocab=10, n_block=1, n_prelude=1, l_cycles=2, injection="additive")
    with pytest.raises(ConfigError, match="norm_weight"):
        LoopConfig(d_model=16, n_heads=2, d_vocab=10, n_block=1, norm_weight=False, normalization_type="LN")
    with pytest.raises(ConfigError, match="l_cycles"):
        HookedHrmTransformer(LoopConfig(d_model=16, n_heads=2, d_vocab=10, n_block=1, final_norm=False))


def test_native_save_round_trips(tmp_path):
    """`model.save` writes loop_lens's native format; `ll.load` gives back the same nested model
    (its L cycles, PrefixLM flag and every weight), computing the same logits."""
    hf = random_hrm(H_cycles=2, L_cycles=3, prefix_lm=True)
    model = saved(hf, tmp_path / "ckpt")
    model.save(tmp_path / "native")
    again = ll.load(tmp_path / "native")
    assert isinstance(again, HookedHrmTransformer) and again.cfg == model.cfg
    assert again.state_dict().keys() == model.state_dict().keys()
    tokens, tt = _tokens(), _prefix_types()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, token_type_ids=tt), hf(tokens, token_type_ids=tt).logits, atol=1e-4, rtol=0)


def _prefix_types(batch: int = 2, pos: int = 9) -> torch.Tensor:
    """Prompt 0: a 4-token prefix; prompt 1: a 6-token prefix (1 = bidirectional prefix block)."""
    tt = torch.zeros(batch, pos, dtype=torch.long)
    tt[0, :4], tt[1, :6] = 1, 1
    return tt


@pytest.mark.parametrize("fields", CONFIGS[:3], ids=lambda f: f"H{f['H_cycles']}L{f['L_cycles']}x{f['num_hidden_layers']}")
def test_prefix_lm_token_type_ids_equal_transformers(fields, tmp_path):
    hf = random_hrm(**fields, prefix_lm=True)
    model = saved(hf, tmp_path)
    tokens, tt = _tokens(), _prefix_types()
    with torch.no_grad():
        want = hf(tokens, token_type_ids=tt).logits
        got = model(tokens, token_type_ids=tt)
        causal = model(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - causal)[:, :5].abs().max() > 1e-3  # the prefix block changed the prefix positions
    # hooks and caches see the same run
    logits, cache = model.run_with_cache(tokens, token_type_ids=tt, names_filter="iter.0.low.0.blocks.0.attn.hook_pattern")
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    pattern = cache["iter.0.low.0.blocks.0.attn.hook_pattern"]
    assert pattern[0, :, 0, 3].min() > 0 and pattern[0, :, 0, 4].max() == 0  # prefix sees prefix ahead, not beyond
    assert pattern[0, :, 5, 6:].max() == 0  # after the prefix: causal


def test_prefix_lm_with_padding_equals_transformers(tmp_path):
    hf = random_hrm(prefix_lm=True)
    model = saved(hf, tmp_path)
    tokens, tt = _tokens(), _prefix_types()
    mask = torch.ones_like(tokens)
    mask[1, -2:] = 0  # right padding
    with torch.no_grad():
        want = hf(tokens, token_type_ids=tt, attention_mask=mask).logits
        got = model(tokens, token_type_ids=tt, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)  # real positions


def test_token_type_ids_checked_or_ignored(tmp_path):
    model = saved(random_hrm(prefix_lm=True), tmp_path / "a")
    tokens = _tokens()
    with pytest.raises(ValueError, match="token_type_ids must be an integer tensor"):
        model(tokens, token_type_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="only 0"):
        model(tokens, token_type_ids=torch.full((2, 9), 2))
    hf = random_hrm(prefix_lm=False)
    plain = saved(hf, tmp_path / "b")
    with pytest.warns(UserWarning, match="prefix_lm=False"):
        got = plain(tokens, token_type_ids=_prefix_types())
    with torch.no_grad():
        torch.testing.assert_close(got, hf(tokens, token_type_ids=_prefix_types()).logits, atol=1e-4, rtol=0)


def _with(hf: HrmTextForCausalLM, **fields) -> HrmTextForCausalLM:
    """transformers' model with the same weights and other cycle counts."""
    cfg = {**hf.config.to_dict(), "num_hidden_layers": hf.config.num_layers_per_stack, "num_layers_per_stack": None, **fields}
    other = HrmTextForCausalLM(HrmTextConfig(**cfg)).eval()
    other.load_state_dict(hf.state_dict())
    return other


@pytest.mark.parametrize("l_cycles", [1, 2, 5])
def test_runtime_l_cycles_equal_transformers(l_cycles, tmp_path):
    hf = random_hrm(H_cycles=2, L_cycles=3)
    model = saved(hf, tmp_path)
    tokens = _tokens(seed=4)
    with torch.no_grad():
        want = _with(hf, L_cycles=l_cycles)(tokens).logits
        torch.testing.assert_close(model(tokens, l_cycles=l_cycles), want, atol=1e-4, rtol=0)
        both = _with(hf, L_cycles=l_cycles, H_cycles=3)(tokens).logits
        torch.testing.assert_close(model(tokens, n_loops=3, l_cycles=l_cycles), both, atol=1e-4, rtol=0)
    logits, cache = model.run_with_cache(tokens, l_cycles=l_cycles)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    assert cache.l_cycles == l_cycles and cache.depth == 2 * (l_cycles + 1) * 2
    assert {n for n in cache.keys() if ".low." in n} == {n for n in model.hook_names(l_cycles=l_cycles) if ".low." in n}
    assert f"iter.1.low.{l_cycles - 1}.hook_state_post" in cache.keys() and f"iter.1.low.{l_cycles}.hook_state_post" not in cache.keys()
    assert model.cfg.l_cycles == 3 and len(model.hook_names()) == len(model.hook_names(l_cycles=3))  # the default is untouched


def test_hooks_in_extra_l_cycles(tmp_path):
    model = saved(random_hrm(H_cycles=2, L_cycles=2), tmp_path)
    tokens = _tokens()
    seen = []
    name = "iter.1.low.4.hook_state_post"
    model.run_with_hooks(tokens, l_cycles=5, fwd_hooks=[(name, lambda x, hook: seen.append(hook.name))])
    assert seen == [name]
    with pytest.raises(HookNameError, match="l_cycles=2"):
        model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: None)])
    with pytest.raises(HookNameError, match="L cycle 4"):
        model.run_with_cache(tokens, names_filter=[name])
    with pytest.raises(ValueError, match="l_cycles must be a positive integer"):
        model(tokens, l_cycles=0)
    assert not model.iter  # nothing left attached or created


def test_nested_cache_stacks_and_unrolled_depth(tmp_path):
    """The unrolled depth lists every traversal in the order it runs: depth d of the cache is what
    `stop_at_layer=d` stops before, for every d, with a runtime l_cycles unlike the checkpoint's."""
    hf = random_hrm(H_cycles=2, L_cycles=3, num_hidden_layers=2)
    model = saved(hf, tmp_path)
    tokens = _tokens()
    H, L, K = 2, 2, 2
    logits, cache = model.run_with_cache(tokens, l_cycles=L)
    high, low = cache.stack("hook_resid_post"), cache.stack("hook_resid_post", low=True)
    assert high.shape == (H, K, 2, 9, 32) and low.shape == (H, L, K, 2, 9, 32)
    assert cache.stack("hook_state_post", low=True).shape == (H, L, 2, 9, 32)
    torch.testing.assert_close(low[1, 0, 1], cache["iter.1.low.0.blocks.1.hook_resid_post"], atol=0, rtol=0)
    torch.testing.assert_close(high[1, 0], cache["iter.1.blocks.0.hook_resid_post"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="H stack"):
        cache.stack("hook_injected", low=True)

    unrolled = cache.unrolled()
    depth = H * (L + 1) * K
    assert cache.depth == depth == unrolled.model.cfg.n_layers
    with torch.no_grad():
        for d in range(depth):
            want = model(tokens, l_cycles=L, stop_at_layer=d)
            torch.testing.assert_close(unrolled[f"blocks.{d}.hook_resid_pre"], want, atol=1e-5, rtol=0)  # cached: explicit softmax
            assert cache["resid_pre", d] is unrolled[f"blocks.{d}.hook_resid_pre"]
            phase, h, cycle, layer = cache.loop_index(d)
            assert cache.depth_index(h, layer, cycle) == d
            assert cache.loop_name(f"blocks.{d}.hook_resid_pre") == (
                f"iter.{h}.low.{cycle}.blocks.{layer}.hook_resid_pre" if phase == "low" else f"iter.{h}.blocks.{layer}.hook_resid_pre")
    assert [cache.loop_index(d)[0] for d in range(0, depth, K)] == ["low", "low", "loop"] * H
    for name in cache.keys():
        assert cache.loop_name(cache.unrolled_name(name)) == name
    with pytest.raises(IndexError):
        cache.depth_index(0, 0, low_cycle=L)

    # TransformerLens's helpers on the unrolled depth: the final norm is the one closing the last H stack
    resid = cache.accumulated_resid(apply_ln=True)
    assert resid.shape[0] == depth + 1
    torch.testing.assert_close(model.unembed(resid[-1]), logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="nested loop"):
        cache.decompose_resid()
    sliced = cache.apply_slice_to_batch_dim(0)
    assert type(sliced).__name__ == "NestedLoopCache" and sliced.l_cycles == L


def test_filter_hooks_reach_every_l_cycle_of_every_run(tmp_path):
    """A filter hook applies to whatever each run reaches: more L cycles after fewer, and fewer
    after more (no refusal), as it does for H cycles."""
    model = saved(random_hrm(H_cycles=2, L_cycles=3), tmp_path)
    tokens = _tokens()
    low_post = lambda n: ".low." in n and n.endswith("hook_state_post")  # noqa: E731
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    with torch.no_grad():
        want4 = model.run_with_hooks(tokens, l_cycles=4, fwd_hooks=[(low_post, zero)])
        want1 = model.run_with_hooks(tokens, l_cycles=1, fwd_hooks=[(low_post, zero)])
        seen = []
        with model.hooks(fwd_hooks=[(low_post, zero), (low_post, lambda x, hook: seen.append(hook.name))]):
            model(tokens, l_cycles=1)
            got4 = model(tokens, l_cycles=4)
            got1 = model(tokens, l_cycles=1)
    torch.testing.assert_close(got4, want4, atol=0, rtol=0)
    torch.testing.assert_close(got1, want1, atol=0, rtol=0)
    assert seen[2:10] == [f"iter.{h}.low.{l}.hook_state_post" for h in range(2) for l in range(4)]
    assert not model.iter  # all dropped again when the context ends


def test_l_cycles_belong_to_one_call(tmp_path):
    """A call inside a hook of a run with l_cycles=5 runs the checkpoint's own L cycles; a run with
    many L cycles and no hooks leaves no hook points behind, and spares shrink back."""
    model = saved(random_hrm(H_cycles=2, L_cycles=3), tmp_path)
    tokens = _tokens()
    with torch.no_grad():
        plain = model(tokens[:1])
        inner = []

        def call_inside(x, hook):
            if not inner:  # once: the inner call fires this hook too
                inner.append(None)
                inner[0] = (model(tokens[:1]), len(model.hook_names(1)))

        model.run_with_hooks(tokens, l_cycles=5, fwd_hooks=[("iter.0.hook_state_post", call_inside)])
        model(tokens, l_cycles=40)
    torch.testing.assert_close(inner[0][0], plain, atol=0, rtol=0)
    assert inner[0][1] == len(model.hook_names(1)) == len(model.hook_names(1, l_cycles=3))
    assert not model.iter
    _, cache = model.run_with_cache(tokens, l_cycles=6, names_filter=lambda n: n.endswith("hook_state_post"))
    assert cache.l_cycles == 6 and not model.iter
    assert all(len(spare.low) == 3 for spare in model._spare_hooks)


def test_single_loop_tools_refuse_nested_models(tmp_path):
    """Patching and the streaming analyses resume or reduce a single-timescale loop; on an HRM
    model they would be silently wrong (z_L restarts), so they refuse, naming themselves."""
    from loop_lens import patching
    from loop_lens.analysis.streaming import stream_analyses

    model = saved(random_hrm(), tmp_path)
    tokens = _tokens()
    metric = lambda logits: logits[..., -1, 3].mean()  # noqa: E731
    for name, call in (("activation_patch", lambda: patching.activation_patch(model, tokens, tokens, metric)),
                       ("attribution_patch", lambda: patching.attribution_patch(model, tokens, tokens, metric)),
                       ("intervene", lambda: patching.intervene(model, tokens, metric, "skip", 0)),
                       ("answer_flips", lambda: patching.answer_flips(model, tokens)),
                       ("stream_analyses", lambda: stream_analyses(model, tokens))):
        with pytest.raises(ValueError, match=f"{name} runs a single-timescale loop"):
            call()


def test_generate_equals_transformers_greedy_and_a_plain_loop(tmp_path):
    """Greedy generation (through the model's one loop, with its KV cache per traversal) equals
    transformers' own greedy generate, and a loop over the growing sequence written here; padded
    batches give each row what it gets alone; sampling repeats with a seed; l_cycles= reaches
    every step; adaptive exits with the KV cache equal recomputing the sequence at every step."""
    hf = random_hrm(H_cycles=2, L_cycles=2)
    model = saved(hf, tmp_path)
    tokens = _tokens(seed=7, batch=1, pos=5)
    with torch.no_grad():
        want = hf.generate(tokens, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = model.generate(tokens, max_new_tokens=6, stop_at_eos=False, verbose=False)
    assert torch.equal(got, want)

    def plain(seq, n, **run):
        with torch.no_grad():
            for _ in range(n):
                seq = torch.cat([seq, model(seq[None], **run)[0, -1].argmax()[None]])
        return seq

    torch.testing.assert_close(model.generate(tokens, max_new_tokens=4, stop_at_eos=False, verbose=False, l_cycles=5,
                                              n_loops=3)[0], plain(tokens[0], 4, l_cycles=5, n_loops=3), atol=0, rtol=0)
    batch = _tokens(seed=8, batch=2, pos=6)
    mask = torch.ones_like(batch)
    mask[1, :2] = 0  # left padding
    result = model.generate(batch, attention_mask=mask, max_new_tokens=3, stop_at_eos=False, verbose=False, return_type="result")
    assert torch.equal(result.generated[0], plain(batch[0], 3)[6:]) and torch.equal(result.generated[1], plain(batch[1, 2:], 3)[4:])
    assert result.iterations.tolist() == [[2, 2, 2], [2, 2, 2]]
    sampled = [model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=True, seed=3, stop_at_eos=False,
                              verbose=False) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])
    for adaptive, threshold in (("kl", 5e-2), ("argmax", 2)):
        kw = dict(attention_mask=mask, max_new_tokens=4, n_loops=5, stop_at_eos=False, verbose=False, return_type="result",
                  adaptive=adaptive, threshold=threshold, l_cycles=3)
        cached, recomputed = model.generate(batch, **kw), model.generate(batch, use_past_kv_cache=False, **kw)
        assert torch.equal(cached.tokens, recomputed.tokens) and torch.equal(cached.iterations, recomputed.iterations)
        assert 0 < int(cached.iterations.min()) and int(cached.iterations.max()) <= 5
        if adaptive == "argmax":  # on this model the rows exit after different numbers of H cycles
            assert len(set(cached.iterations.flatten().tolist())) > 1
    with pytest.raises(TypeError, match="l_cyles"):
        model.generate(tokens, max_new_tokens=2, l_cyles=2, verbose=False)
