"""The hooked looped transformer: hook names and shapes, loop semantics, caches, config."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STYLES, tiny_config, tiny_model
from reference import unrolled_forward

import loop_lens as ll
from loop_lens import ConfigError, LoopConfig
from loop_lens.errors import HookNameError

BLOCK_HOOKS_ALWAYS = [
    "hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_block_style_exposes_contract_hooks_with_shapes(style, tokens):
    model = tiny_model(style)
    cfg = model.cfg
    _, cache = model.run_with_cache(tokens, n_loops=3)
    B, S = tokens.shape
    D, H, K, hd = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    shapes = {
        "hook_resid_pre": (B, S, D), "hook_resid_mid": (B, S, D), "hook_resid_post": (B, S, D),
        "hook_attn_out": (B, S, D), "hook_mlp_out": (B, S, D), "attn.hook_q": (B, S, H, hd),
        "attn.hook_k": (B, S, K, hd), "attn.hook_v": (B, S, K, hd), "attn.hook_z": (B, S, H, hd),
        "attn.hook_attn_scores": (B, H, S, S), "attn.hook_pattern": (B, H, S, S),
        "mlp.hook_pre": (B, S, cfg.d_mlp), "mlp.hook_post": (B, S, cfg.d_mlp),
    }
    for t in range(3):
        for layer in range(cfg.n_block):
            for kind in BLOCK_HOOKS_ALWAYS:
                assert tuple(cache[ll.hook_name(kind, layer=layer, iteration=t)].shape) == shapes[kind]
        assert tuple(cache[f"iter.{t}.hook_state_pre"].shape) == (B, S, D)
        assert tuple(cache[f"iter.{t}.hook_state_post"].shape) == (B, S, D)
        assert (f"iter.{t}.hook_injected" in cache.cache_dict) == (cfg.injection != "none")
        if cfg.exit_gate:
            assert tuple(cache[f"iter.{t}.hook_exit_logit"].shape) == (B, S)
    for kind in BLOCK_HOOKS_ALWAYS:
        assert f"prelude.0.{kind}" in cache.cache_dict and f"coda.0.{kind}" in cache.cache_dict
    assert tuple(cache["hook_embed"].shape) == (B, S, D)
    has_pre_norm = cfg.norm_placement != "post"
    assert ("iter.0.blocks.0.ln1.hook_normalized" in cache.cache_dict) == has_pre_norm
    assert ("iter.0.blocks.0.ln2.hook_normalized" in cache.cache_dict) == has_pre_norm
    assert ("iter.0.blocks.1.ln1_post.hook_normalized" in cache.cache_dict) == (cfg.norm_placement != "pre")
    assert torch.equal(cache.stack("pattern")[2, 1], cache["iter.2.blocks.1.attn.hook_pattern"])
    rows = cache["iter.1.blocks.0.attn.hook_pattern"].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert torch.all(cache["iter.1.blocks.0.attn.hook_pattern"].triu(1) == 0)


def test_loop_equals_block_written_out_as_feedforward_stack(tokens):
    model = tiny_model("pre")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for n_loops in (1, 2, 5):
        expected = unrolled_forward(sd, model.cfg, tokens, n_loops)
        torch.testing.assert_close(model(tokens, n_loops=n_loops), expected, atol=1e-5, rtol=1e-5)


def test_hook_on_iteration_two_changes_only_iteration_two_onwards(tokens):
    model = tiny_model("huginn")
    _, clean = model.run_with_cache(tokens, n_loops=4, seed=3)

    def scale(x, hook):
        return 2.0 * x

    with model.hooks(fwd_hooks=[("iter.2.blocks.0.hook_attn_out", scale)]):
        _, patched = model.run_with_cache(tokens, n_loops=4, seed=3)
    for t in range(4):
        same = torch.equal(clean[f"iter.{t}.hook_state_post"], patched[f"iter.{t}.hook_state_post"])
        assert same == (t < 2), t
    assert torch.equal(clean["iter.2.hook_state_pre"], patched["iter.2.hook_state_pre"])
    assert not torch.equal(clean["iter.2.blocks.0.hook_resid_mid"], patched["iter.2.blocks.0.hook_resid_mid"])


@pytest.mark.parametrize("n_loops", [1, 2, 7, 32, 128])
def test_any_loop_count_runs_without_rebuilding_weights(n_loops, tokens):
    model = tiny_model("pre")
    params_before = [p.data_ptr() for p in model.parameters()]
    logits, cache = model.run_with_cache(tokens, n_loops=n_loops, names_filter=lambda n: n.endswith("hook_state_post"))
    assert logits.shape == (2, 7, 40) and torch.isfinite(logits).all()
    assert cache.n_loops == n_loops and cache.stack("state_post").shape == (n_loops, 2, 7, 32)
    assert [p.data_ptr() for p in model.parameters()] == params_before
    assert len(model.iter) == 0  # iteration hook points live only while something is attached


def test_a_persistent_hook_keeps_its_iteration_hook_points_until_removed(tokens):
    model = tiny_model("pre")
    model.add_hook("iter.5.blocks.0.attn.hook_pattern", lambda x, hook: None)
    first = model.iter["5"].blocks[0].attn.hook_pattern
    model(tokens, n_loops=6)
    model.run_with_cache(tokens, n_loops=8)
    assert list(model.iter) == ["5"] and model.iter["5"].blocks[0].attn.hook_pattern is first
    model.reset_hooks()
    assert len(model.iter) == 0


def test_names_filter_as_string_list_and_callable(tokens):
    model = tiny_model("ouro")
    name = "iter.1.blocks.0.attn.hook_pattern"
    _, c1 = model.run_with_cache(tokens, names_filter=name)
    assert list(c1.cache_dict) == [name]
    _, c2 = model.run_with_cache(tokens, names_filter=[name, "hook_embed"])
    assert set(c2.cache_dict) == {name, "hook_embed"}
    _, c3 = model.run_with_cache(tokens, n_loops=5, names_filter=lambda n: n.endswith("hook_exit_logit"))
    assert sorted(c3.cache_dict) == [f"iter.{t}.hook_exit_logit" for t in range(5)]
    with pytest.raises(KeyError, match="names_filter"):
        c3["iter.0.blocks.0.hook_resid_post"]
    with pytest.raises(HookNameError, match="is at iteration 7, but this run has n_loops=2"):
        model.run_with_cache(tokens, n_loops=2, names_filter=["iter.7.hook_state_post"])
    assert "7" not in model.iter  # the refused filter leaves no hook points behind


def test_run_with_hooks_and_reset(tokens):
    model = tiny_model("pre")
    seen = []
    model.run_with_hooks(tokens, n_loops=9, fwd_hooks=[(lambda n: n.endswith("hook_state_post"), lambda x, hook: seen.append(hook.name))])
    assert seen == [f"iter.{t}.hook_state_post" for t in range(9)]
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_hooked_and_fast_attention_paths_agree(tokens):
    model = tiny_model("huginn")
    fast = model(tokens, seed=0)
    hooked, _ = model.run_with_cache(tokens, seed=0, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(fast, hooked, atol=1e-5, rtol=1e-5)


def test_initial_state_is_seedable_explicit_and_recoverable(tokens):
    model = tiny_model("huginn")
    _, c1 = model.run_with_cache(tokens, seed=11, names_filter="iter.0.hook_state_pre")
    _, c2 = model.run_with_cache(tokens, seed=11, names_filter="iter.0.hook_state_pre")
    _, c3 = model.run_with_cache(tokens, seed=12, names_filter="iter.0.hook_state_pre")
    s0 = c1["iter.0.hook_state_pre"]
    assert torch.equal(s0, c2["iter.0.hook_state_pre"]) and not torch.equal(s0, c3["iter.0.hook_state_pre"])
    bound = 3 * model.cfg.init_std * model.cfg.init_scale
    assert s0.abs().max() <= bound + 1e-6
    torch.testing.assert_close(model(tokens, initial_state=s0), model(tokens, seed=11))
    with pytest.raises(ValueError, match="initial_state has shape"):
        model(tokens, initial_state=s0[:, :3])


def test_padding_mask_leaves_real_tokens_unchanged(tokens):
    model = tiny_model("pre")
    short = tokens[:1, :4]
    padded = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, :4], model(short), atol=1e-5, rtol=1e-5)


def test_loss_and_stop_at_layer(tokens):
    model = tiny_model("pre")
    logits, loss = model(tokens, return_type="both")
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    _, cache = model.run_with_cache(tokens, n_loops=3)
    resid = model(tokens, n_loops=3, stop_at_layer=3)  # depth 3 = iteration 1, layer 0
    torch.testing.assert_close(resid, cache["iter.1.blocks.0.hook_resid_pre"])


def test_exit_modes_follow_the_exit_distribution(tokens):
    model = tiny_model("ouro", n_prelude=0, n_coda=0)
    logits, cache = model.run_with_cache(tokens, n_loops=4)
    steps = torch.stack([model(tokens, n_loops=4, exit=t) for t in range(4)])
    torch.testing.assert_close(steps[-1], logits)
    gates = cache.stack("exit_logit")
    lam = torch.sigmoid(gates)
    p = torch.stack([lam[0], lam[1] * (1 - lam[0]), lam[2] * (1 - lam[0]) * (1 - lam[1]), (1 - lam[0]) * (1 - lam[1]) * (1 - lam[2])])
    torch.testing.assert_close(p.sum(0), torch.ones_like(p[0]))
    torch.testing.assert_close(model(tokens, n_loops=4, exit="weighted"), (p[..., None] * steps).sum(0), atol=1e-5, rtol=1e-5)
    model.cfg.early_exit_threshold = 0.5
    first = (p.cumsum(0) >= 0.5).float().argmax(0)
    expected = steps.gather(0, first[None, ..., None].expand(1, *steps.shape[1:]))[0]
    torch.testing.assert_close(model(tokens, n_loops=4, exit="threshold"), expected)


def test_unrolled_cache_works_with_transformer_lens_helpers(tokens):
    model = tiny_model("pre", injection="none")
    logits, cache = model.run_with_cache(tokens, n_loops=3)
    un = cache.unrolled()
    depth = model.cfg.depth(3)
    assert depth == 1 + 3 * 2 + 1
    accum, labels = un.accumulated_resid(return_labels=True)
    assert accum.shape == (depth + 1, 2, 7, 32) and labels[-1] == "final_post"
    torch.testing.assert_close(accum[4], cache["iter.1.blocks.1.hook_resid_pre"])
    # a pre-norm model without injection is a plain residual stream: the parts sum to the whole
    parts = un.decompose_resid()
    torch.testing.assert_close(parts.sum(0), cache["coda.0.hook_resid_post"], atol=1e-5, rtol=1e-5)
    # the final accumulated residual through ln_final and W_U gives the logits
    final = un.accumulated_resid(apply_ln=True)[-1]
    torch.testing.assert_close(final @ model.W_U, logits, atol=1e-5, rtol=1e-5)
    scaled = un.apply_ln_to_stack(parts, layer=depth)
    torch.testing.assert_close(scaled.sum(0), cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)
    # direct logit attribution over the unrolled depth sums to the logit of the token
    attrs = un.logit_attrs(un.decompose_resid(), tokens=tokens[:, -1:].expand_as(tokens))  # [batch, pos], as TL 3.9 and 4 take it
    torch.testing.assert_close(attrs.sum(0)[:, -1], logits[torch.arange(2), -1, tokens[:, -1]], atol=1e-4, rtol=1e-4)
    assert cache.depth_index(1, 1) == 4 and cache.loop_index(4) == ("loop", 1, 1)
    assert cache.loop_index(0) == ("prelude", None, 0) and cache.loop_index(depth - 1) == ("coda", None, 0)


def test_hook_name_helpers_round_trip():
    assert ll.hook_name("pattern", layer=1, iteration=3) == "iter.3.blocks.1.attn.hook_pattern"
    assert ll.hook_name("resid_post", layer=0, phase="coda") == "coda.0.hook_resid_post"
    assert ll.hook_name("state_post", iteration=2) == "iter.2.hook_state_post"
    assert ll.hook_name("ln1.hook_scale", layer=0, phase="prelude") == "prelude.0.ln1.hook_scale"
    assert ll.parse_hook_name("iter.3.blocks.1.attn.hook_pattern") == ("loop", 3, 1, "attn.hook_pattern")
    assert ll.parse_hook_name("iter.12.hook_exit_logit") == ("loop", 12, None, "hook_exit_logit")
    assert ll.parse_hook_name("coda.0.hook_resid_post") == ("coda", None, 0, "hook_resid_post")
    assert ll.parse_hook_name("ln_final.hook_scale") == ("model", None, None, "ln_final.hook_scale")
    with pytest.raises(ValueError, match="unknown hook kind"):
        ll.hook_name("nonsense", layer=0, iteration=0)
    model = tiny_model("huginn")
    for name in model.hook_dict:  # every hook name the model has parses and rebuilds
        phase, it, layer, kind = ll.parse_hook_name(name)
        if phase != "model" and layer is not None:
            assert ll.hook_name(kind, layer=layer, iteration=it, phase=phase) == name


@pytest.mark.parametrize("style", sorted(STYLES))
def test_config_json_round_trip(style, tmp_path):
    cfg = tiny_config(style, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    assert LoopConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert LoopConfig.from_json(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(d_model=30, n_heads=4), "does not divide d_model"),
        (dict(n_key_value_heads=3), "n_key_value_heads=3 does not divide n_heads=4"),
        (dict(norm_placement="middle"), "unknown norm_placement 'middle'"),
        (dict(injection="gated"), "unknown injection"),
        (dict(mlp_type="tanh"), "unknown mlp_type"),
        (dict(default_loops=0), "default_loops"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2}), "unsupported rope_scaling"),
    ],
)
def test_bad_configs_raise_a_clear_error(fields, message):
    base = dict(d_model=32, n_heads=4, d_vocab=10, n_block=1)
    base.update(fields)
    with pytest.raises(ConfigError, match=message):
        LoopConfig(**base)
    with pytest.raises(ConfigError, match="unknown LoopConfig fields"):
        LoopConfig.from_dict({**dict(d_model=32, n_heads=4, d_vocab=10, n_block=1), "colour": 1})


@pytest.mark.parametrize("style", sorted(STYLES))
def test_native_save_and_load_round_trip(style, tmp_path, tokens):
    model = tiny_model(style)
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "loop_config.json").read_text())["norm_placement"] == model.cfg.norm_placement
    loaded = ll.load(tmp_path / "m")
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(loaded(tokens, seed=0), model(tokens, seed=0))
    if model.cfg.tie_embeddings:
        assert loaded.unembed.weight is loaded.embed.weight


def test_bad_tokens_and_loop_counts_are_rejected(tokens):
    model = tiny_model("pre")
    with pytest.raises(ValueError, match="n_loops must be a positive int"):
        model(tokens, n_loops=0)
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(tokens + 100)
    with pytest.raises(ValueError, match="carries no tokenizer"):
        model("hello")


def test_bf16_forward_is_close_to_fp32(tokens):
    model = tiny_model("huginn")
    ref = model(tokens, seed=0)
    out = model.to(torch.bfloat16)(tokens, seed=0)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_cache_options_keep_caches_small(tokens):
    model = tiny_model("huginn")
    _, full = model.run_with_cache(tokens, n_loops=3, seed=0)
    _, small = model.run_with_cache(tokens, n_loops=3, seed=0, pos_slice=-1, cache_dtype=torch.float16, device="cpu",
                                    names_filter=lambda n: n.endswith(("hook_resid_post", "hook_pattern")))
    resid = small["iter.2.blocks.1.hook_resid_post"]
    assert resid.dtype == torch.float16 and resid.shape == (2, 1, 32)
    torch.testing.assert_close(resid.float(), full["iter.2.blocks.1.hook_resid_post"][:, -1:], atol=1e-2, rtol=1e-2)
    assert small["iter.0.blocks.0.attn.hook_pattern"].shape == (2, 4, 1, 7)  # the last query row only
