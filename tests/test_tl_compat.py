"""TransformerLens's API on the looped model itself: caching hooks over every iteration, hook_dict's
errors, stop_at_layer with listed names, forward's prepend_bos / padding_side / initial_state="zeros",
and the tokenizer helpers."""

from __future__ import annotations

import pytest
import torch

import loop_lens as ll
from loop_lens.errors import HookNameError
from tests.conftest import tiny_model


@pytest.fixture
def model():
    return tiny_model("pre")


def test_add_caching_hooks_reach_every_iteration_of_later_runs(model, tokens):
    cache = model.add_caching_hooks(names_filter=lambda n: n.endswith("hook_resid_post"))
    model(tokens, n_loops=5)
    assert "iter.4.blocks.1.hook_resid_post" in cache
    _, ours = model.run_with_cache(tokens, n_loops=5, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert set(cache) == set(ours.keys())
    for k in cache:
        assert torch.equal(cache[k], ours[k])
    model.reset_hooks()


def test_cache_all_includes_iterations(model, tokens):
    cache: dict = {}
    model.cache_all(cache)
    model(tokens, n_loops=2)
    assert set(cache) == set(model.hook_names(2))
    model.reset_hooks()
    assert len(model.iter) == 0


def test_get_caching_hooks_cover_a_run(model, tokens):
    cache, fwd, bwd = model.get_caching_hooks(names_filter=lambda n: "hook_pattern" in n, n_loops=4)
    assert bwd == []
    names = {n for n, _ in fwd}
    assert "iter.3.blocks.0.attn.hook_pattern" in names and "prelude.0.attn.hook_pattern" in names
    with model.hooks(fwd_hooks=fwd):
        model(tokens, n_loops=4)
    assert set(cache) == names
    default_cache, default_fwd, _ = model.get_caching_hooks()
    assert {n for n, _ in default_fwd} == set(model.hook_names(model.cfg.default_loops))


def test_hook_dict_names_the_call_for_a_missing_iteration(model):
    with pytest.raises(KeyError, match="pin_loops"):
        model.hook_dict["iter.2.blocks.0.hook_resid_post"]
    model.pin_loops(3)
    assert "iter.2.blocks.0.hook_resid_post" in model.hook_dict
    model.reset_hooks()  # pinned iterations survive the release of idle hook points
    assert "iter.2.blocks.0.hook_resid_post" in model.hook_dict
    model.pin_loops(0)
    assert len(model.iter) == 0


def test_listed_name_unreached_by_stop_at_layer_raises(model, tokens):
    depth_of = model.cfg.n_prelude + 1 * model.cfg.n_block  # iteration 1 starts here
    with pytest.raises(HookNameError, match="stop_at_layer"):
        model.run_with_cache(tokens, n_loops=3, stop_at_layer=depth_of, names_filter=["iter.1.blocks.0.hook_resid_post"])
    # reached names are cached as before
    _, cache = model.run_with_cache(tokens, n_loops=3, stop_at_layer=depth_of, names_filter=["iter.0.blocks.1.hook_resid_post"])
    assert "iter.0.blocks.1.hook_resid_post" in cache
    # a filter function whose every selected hook point lies past the stop raises too (the cache would be empty),
    # while one that selects some reached names caches those
    with pytest.raises(HookNameError, match="stop_at_layer"):
        model.run_with_cache(tokens, n_loops=3, stop_at_layer=depth_of, names_filter=lambda n: n.startswith("iter.2."))
    _, cache = model.run_with_cache(tokens, n_loops=3, stop_at_layer=depth_of, names_filter=lambda n: n.endswith("resid_post"))
    assert "iter.0.blocks.1.hook_resid_post" in cache and "iter.2.blocks.0.hook_resid_post" not in cache
    assert len(model.iter) == 0  # nothing left behind by the refused run


def test_initial_state_zeros_string_equals_a_zero_tensor(tokens):
    model = tiny_model("huginn")
    B, S = tokens.shape
    zeros = torch.zeros(B, S, model.cfg.d_model)
    assert torch.equal(model(tokens, initial_state="zeros"), model(tokens, initial_state=zeros))
    assert not torch.equal(model(tokens, initial_state="zeros"), model(tokens, seed=0))
    with pytest.raises(ValueError, match="'zeros' or 'embed'"):
        model(tokens, initial_state="ones")


def test_forward_prepend_bos_and_padding_side():
    model = ll.load("zoo:khop-huginn")
    text = "a b c"
    with_bos = model(text, prepend_bos=True, seed=0)
    without = model(text, prepend_bos=False, seed=0)
    t_with, t_without = model.to_tokens(text, prepend_bos=True), model.to_tokens(text, prepend_bos=False)
    assert torch.equal(with_bos, model(t_with, seed=0)) and torch.equal(without, model(t_without, seed=0))
    assert torch.equal(model(text, padding_side="right", seed=0), model(text, seed=0))
    with pytest.raises(ValueError, match="padding_side"):
        model(text, padding_side="left")


def test_tokenizer_helpers_on_model():
    model = ll.load("zoo:khop-huginn")
    toks = model.to_tokens("a b c")
    assert model.to_string(toks[0]) == model.tokenizer.decode(toks[0].tolist(), skip_special_tokens=False)
    assert model.to_string(toks) == [model.to_string(toks[0])]
    last = model.to_str_tokens(toks[0])[-1]
    assert model.to_single_token(last) == int(toks[0, -1])
    assert model.get_token_position(last, toks, mode="last") == toks.shape[1] - 1
    with pytest.raises(ValueError, match="not one"):
        model.to_single_token("a b")
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position(int(toks.max()) + 1, toks)
