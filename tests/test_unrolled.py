"""model.unrolled(n_loops=T): a TransformerLens HookedRootModule view over the unrolled depth."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tl_patching
from transformer_lens.utilities import get_act_name

import loop_lens as ll
from loop_lens.errors import HookNameError
from loop_lens.model.unrolled import UnrolledModel
from tests.conftest import tiny_model


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))


def _by_depth(result: ll.patching.PatchingResult) -> torch.Tensor:
    """Our PatchingResult's [n_loops, n_block, width] (with prelude and coda) as [depth, width]."""
    parts = [result.prelude] if result.prelude is not None else []
    parts.append(result.values.reshape(-1, result.values.shape[-1]))
    if result.coda is not None:
        parts.append(result.coda)
    return torch.cat(parts)


@pytest.fixture(scope="module")
def huginn():
    return ll.load("zoo:khop-huginn")


@pytest.fixture(scope="module")
def pair(huginn):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, huginn.cfg.d_vocab, (2, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % huginn.cfg.d_vocab
    return clean, corrupt


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 3].mean() - logits[:, -1, 4].mean()


def test_view_is_a_hooked_root_module_with_tl_names_and_cfg(huginn):
    v = huginn.unrolled(n_loops=3)
    from transformer_lens import HookedRootModule

    assert isinstance(v, HookedRootModule)
    c = huginn.cfg
    assert v.cfg.n_layers == c.n_prelude + 3 * c.n_block + c.n_coda == len(v.blocks)
    assert v.cfg.device == huginn.device and v.cfg.d_head == c.d_head and v.cfg.n_heads == c.n_heads
    assert "hook_embed" in v.hook_dict and "ln_final.hook_scale" in v.hook_dict
    for k in range(v.cfg.n_layers):
        assert get_act_name("resid_pre", k) in v.hook_dict
        assert get_act_name("z", k) in v.hook_dict
    # shares the weights: parameters are the model's own objects
    assert {id(p) for p in v.parameters()} == {id(p) for p in huginn.parameters()}
    assert v.loop_index(0) == ("prelude", None, 0)
    assert v.loop_index(1 + 2 * 1 + 1) == ("loop", 1, 1)
    assert v.loop_index(v.cfg.n_layers - 1) == ("coda", None, 0)
    assert v.loop_name("blocks.4.attn.hook_z") == "iter.1.blocks.1.attn.hook_z"


def test_forward_equals_model_and_cache_equals_loop_cache(huginn, pair):
    clean, _ = pair
    v = huginn.unrolled(n_loops=3)
    assert torch.equal(v(clean), huginn(clean, n_loops=3, seed=0))  # random start: seed=0 as patching uses
    loss = v(clean, return_type="loss")
    assert torch.equal(loss, huginn(clean, n_loops=3, seed=0, return_type="loss"))
    _, cache = v.run_with_cache(clean)
    _, ours = huginn.run_with_cache(clean, n_loops=3, seed=0)
    un = ours.unrolled()
    assert set(cache.keys()) == set(un.keys())
    for k in cache.keys():
        assert torch.equal(cache[k], un[k]), k
    # stop_at_layer: the residual entering layer k (a cached pattern takes the explicit attention path: close, not equal)
    assert close(v(clean, stop_at_layer=4), cache["blocks.4.hook_resid_pre"])
    assert torch.equal(v(clean, stop_at_layer=4), huginn(clean, n_loops=3, seed=0, stop_at_layer=4))


def test_hooks_on_the_view_patch_the_model(huginn, pair):
    clean, _ = pair
    v = huginn.unrolled(n_loops=3)
    k = v.depth_index(1, 0)

    def zero(act, hook):
        return torch.zeros_like(act)

    ours = huginn.run_with_hooks(clean, n_loops=3, seed=0, fwd_hooks=[("iter.1.blocks.0.hook_mlp_out", zero)])
    view = v.run_with_hooks(clean, fwd_hooks=[(f"blocks.{k}.hook_mlp_out", zero)])
    assert torch.equal(view, ours)
    assert not torch.equal(view, v(clean))
    assert not any(h._forward_hooks for h in v.hook_dict.values())  # hooks reset
    assert len(huginn.iter) == 0  # the model's carried hooks are gone too
    with pytest.raises(HookNameError, match="did you mean"):
        v.run_with_hooks(clean, fwd_hooks=[("blocks.4.hook_resid_pots", zero)])


@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
def test_tl_patching_sublayers_match_activation_patch(huginn, pair, site):
    clean, corrupt = pair
    T = 3
    v = huginn.unrolled(n_loops=T)
    _, clean_cache = v.run_with_cache(clean)
    tl = getattr(tl_patching, f"get_act_patch_{site}")(v, corrupt, clean_cache, _metric)
    ours = ll.patching.activation_patch(huginn, clean, corrupt, _metric, site=site, n_loops=T, seed=0)
    assert tl.shape == (v.cfg.n_layers, clean.shape[1])
    assert close(tl, _by_depth(ours))
    assert tl.abs().max() > 0


def test_tl_patching_resid_pre_matches_our_hooks(huginn, pair):
    clean, corrupt = pair
    T = 3
    v = huginn.unrolled(n_loops=T)
    _, clean_cache = v.run_with_cache(clean)
    tl = tl_patching.get_act_patch_resid_pre(v, corrupt, clean_cache, _metric)
    post = _by_depth(ll.patching.activation_patch(huginn, clean, corrupt, _metric, site="resid_post", n_loops=T, seed=0))
    # inside one iteration's block, the residual entering layer l + 1 is what layer l returned
    d = v.depth_index(1, 1)
    assert close(tl[d], post[d - 1])
    # anywhere else, compare with the same patch made through the model's own hook names
    _, ours_clean = huginn.run_with_cache(clean, n_loops=T, seed=0)
    for d in (0, v.depth_index(2, 0), v.cfg.n_layers - 1):
        name = v.loop_name(f"blocks.{d}.hook_resid_pre")
        for pos in (2, 7):
            def put(act, hook, pos=pos, name=name):
                act = act.clone()
                act[:, pos] = ours_clean[name][:, pos]
                return act

            logits = huginn.run_with_hooks(corrupt, n_loops=T, seed=0, fwd_hooks=[(name, put)])
            assert close(tl[d, pos], _metric(logits)), (d, pos)


def test_tl_patching_heads_matches_activation_patch(huginn, pair):
    clean, corrupt = pair
    T = 2
    v = huginn.unrolled(n_loops=T)
    _, clean_cache = v.run_with_cache(clean)
    tl = tl_patching.get_act_patch_attn_head_out_all_pos(v, corrupt, clean_cache, _metric)
    ours = ll.patching.activation_patch(huginn, clean, corrupt, _metric, site="head", n_loops=T, seed=0)
    assert tl.shape == (v.cfg.n_layers, huginn.cfg.n_heads)
    assert close(tl, _by_depth(ours))


def test_gqa_views_and_weight_stacks():
    model = tiny_model("pre")  # n_heads 4, 2 key/value heads
    v = model.unrolled(n_loops=2)
    D, H, hd = model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head
    n = v.cfg.n_layers
    assert v.cfg.n_key_value_heads == 2
    assert v.W_Q.shape == (n, H, D, hd) and v.W_K.shape == (n, H, D, hd) and v.W_O.shape == (n, H, hd, D)
    assert v.W_in.shape == (n, D, model.cfg.d_mlp) and v.W_out.shape == (n, model.cfg.d_mlp, D)
    assert v.b_O.shape == (n, D) and v.b_Q.shape == (n, H, hd)
    assert v.OV.shape == (n, H, D, D) and v.QK.shape == (n, H, D, D)
    # depth 1 and depth 1 + n_block are the same shared layer
    assert torch.equal(v.W_Q[1], v.W_Q[1 + model.cfg.n_block])
    assert torch.equal(v.W_Q[1], model.blocks[0].attn.W_Q)
    # W_K repeats each key/value head over its query heads
    assert torch.equal(v.W_K[1, 0], v.W_K[1, 1]) and torch.equal(v.W_K[1, 0], model.blocks[0].attn.W_K[0])
    # hook_z @ W_O summed over heads is the attention output (no biases in this style)
    tokens = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(0))
    _, cache = v.run_with_cache(tokens)
    z = cache["blocks.1.attn.hook_z"]
    out = torch.einsum("bphd,hdm->bpm", z, v.W_O[1]) + v.b_O[1]
    if model.cfg.norm_placement == "pre":
        assert close(out, cache["blocks.1.hook_attn_out"])
    # k/v patching uses the key/value heads
    clean = tokens
    corrupt = (tokens + 1) % 40
    _, cc = v.run_with_cache(clean)
    k_patch = tl_patching.get_act_patch_attn_head_k_all_pos(v, corrupt, cc, lambda lg: lg[0, -1, 0])
    assert k_patch.shape == (n, 2)


def test_tokens_to_residual_directions_and_tl_cache_helpers(huginn, pair):
    clean, _ = pair
    v = huginn.unrolled(n_loops=2)
    _, cache = v.run_with_cache(clean)
    dirs = v.tokens_to_residual_directions(torch.tensor([3, 4]))
    assert dirs.shape == (2, huginn.cfg.d_model)
    acc = cache.accumulated_resid(apply_ln=False)
    assert acc.shape[0] == v.cfg.n_layers + 1


def test_view_refuses_what_it_cannot_do(huginn, pair):
    clean, _ = pair
    with pytest.raises(ValueError, match="return_type= is an argument"):
        UnrolledModel(huginn, 2, return_type="loss")
    v = huginn.unrolled(n_loops=2)
    with pytest.raises(ValueError, match="start_at_layer"):
        v(clean, start_at_layer=2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        v(clean, retrun_type="loss")
    with pytest.raises(ValueError, match="padding_side"):
        v(clean, padding_side="left")
    with pytest.raises(ValueError, match="set_use_split_qkv_input"):
        v.set_use_split_qkv_input(True)
    v.set_use_split_qkv_input(False)  # what TransformerLens's patching sets back: a no-op
    with pytest.raises(HookNameError, match="never fired"):
        v.run_with_cache(clean, names_filter=["blocks.5.hook_resid_post"], stop_at_layer=3)


def test_tokenizer_helpers_on_view(huginn):
    v = huginn.unrolled(n_loops=2)
    text = "a b c"
    toks = v.to_tokens(text)
    assert torch.equal(toks, huginn.to_tokens(text))
    assert v.to_str_tokens(text) == huginn.to_str_tokens(text)
    assert v.to_string(toks[0]) == huginn.tokenizer.decode(toks[0].tolist(), skip_special_tokens=False)
    tok = v.to_str_tokens(text)[-1]
    assert v.to_single_token(tok) == int(toks[0, -1])
    assert v.get_token_position(tok, toks) == toks.shape[1] - 1


def test_nested_hrm_view_matches_model():
    m = ll.load("zoo:khop-hrm")
    v = m.unrolled(n_loops=2)
    assert v.cfg.n_layers == m.cfg.depth(2)
    tokens = torch.randint(0, m.cfg.d_vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(v(tokens), m(tokens, n_loops=2))
    _, cache = v.run_with_cache(tokens)
    _, ours = m.run_with_cache(tokens, n_loops=2)
    un = ours.unrolled()
    for k in un.keys():
        assert torch.equal(cache[k], un[k]), k
    assert v.loop_index(0)[0] == "low"
