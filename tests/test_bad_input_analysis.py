"""Bad input to the analyses: each case asserts the error type and that the message names the
culprit (the argument, and how it disagrees with the cache or the model)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import loop_lens as ll
from loop_lens import analysis as A
from loop_lens.cache import LoopCache

B, S, T = 2, 6, 3


@pytest.fixture(scope="module")
def ctx() -> SimpleNamespace:
    """A Huginn-style zoo model with a padded run, a longer reference, a run of another input
    and a model of another config."""
    model = ll.load("zoo:khop-huginn")
    other = ll.load("zoo:khop-ouro")
    V = model.cfg.d_vocab
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    _, cache = model.run_with_cache(tokens, n_loops=T, seed=0, attention_mask=mask)
    _, short = model.run_with_cache(tokens, n_loops=T - 1, seed=0, attention_mask=mask)
    _, shorter_input = model.run_with_cache(tokens[:, :4], n_loops=T + 2, seed=0)
    _, other_cache = other.run_with_cache(tokens, n_loops=T)
    _, unbatched = model.run_with_cache(tokens[:1], n_loops=T, seed=0, remove_batch_dim=True)
    D = model.cfg.d_model
    empty = LoopCache({f"iter.{t}.blocks.{layer}.hook_resid_post": torch.zeros(1, 0, D) for t in range(T) for layer in range(2)},
                      model, n_loops=T)
    lens = A.logit_lens(model, cache, mask=mask)
    return SimpleNamespace(model=model, other=other, V=V, tokens=tokens, mask=mask, cache=cache, short=short,
                           shorter_input=shorter_input, other_cache=other_cache, unbatched=unbatched, empty=empty, lens=lens)


def wrong_mask(ctx):
    return torch.ones(B, S - 1, dtype=torch.long)


def two_mask(ctx):
    m = ctx.mask.clone()
    m[0, 0] = 2
    return m


def empty_row_mask(ctx):
    m = ctx.mask.clone()
    m[1] = 0
    return m


CASES = {
    # --- the lens by name
    "logit_lens lens='bogus'": (lambda c: A.logit_lens(c.model, c.cache, lens="bogus"), ValueError, "got 'bogus'"),
    "logit_lens lens=None": (lambda c: A.logit_lens(c.model, c.cache, lens=None), ValueError, "lens must be one of ['coda', 'logit']"),
    "lens_of_states lens=3": (lambda c: A.lens_of_states(c.model, c.cache, 3), ValueError, "or a Lens instance, got 3"),
    # --- model against cache
    "logit_lens other model": (lambda c: A.logit_lens(c.other, c.cache), ValueError, "model does not match the cache"),
    "attention_stability other model": (lambda c: A.attention_stability(c.other, c.cache, c.tokens), ValueError, "iter_norm: True vs False"),
    "coda_lens other model": (lambda c: A.coda_lens(c.other, c.cache), ValueError, "n_coda: 0 vs 1"),
    "logit_lens_of_states other model": (lambda c: A.logit_lens_of_states(c.other, c.cache), ValueError, "model does not match"),
    "logit_lens (cache, model) swapped": (lambda c: A.logit_lens(c.cache, c.model), TypeError, "cache must be a LoopCache"),
    "attention_stability model=cache": (lambda c: A.attention_stability(c.cache, c.cache, c.tokens), TypeError, "(model, cache) in that order"),
    # --- the cache itself
    "step_sizes of a dict": (lambda c: A.step_sizes(dict(c.cache.cache_dict)), TypeError, "cache must be a LoopCache"),
    "step_sizes of the unrolled view": (lambda c: A.step_sizes(c.cache.unrolled()), TypeError, "cache must be a LoopCache"),
    "step_sizes without a batch dim": (lambda c: A.step_sizes(c.unbatched), ValueError, "no batch dimension"),
    "step_sizes of 0 tokens": (lambda c: A.step_sizes(c.empty), ValueError, "0 tokens"),
    "pca_trajectory of 0 tokens": (lambda c: A.pca_trajectory(c.empty), ValueError, "0 tokens"),
    # --- tokens
    "attention_stability tokens shape": (lambda c: A.attention_stability(c.model, c.cache, c.tokens[:, :4]), ValueError,
                                         "tokens has shape [2, 4], but the cache holds [batch, pos] = [2, 6]"),
    "attention_stability tokens outside vocab": (lambda c: A.attention_stability(c.model, c.cache, c.tokens + c.V), ValueError,
                                                 "tokens must lie in the vocabulary [0, 23)"),
    "attention_stability float tokens": (lambda c: A.attention_stability(c.model, c.cache, c.tokens.float()), ValueError, "integer token ids"),
    "attention_stability tokens list": (lambda c: A.attention_stability(c.model, c.cache, c.tokens.tolist()), TypeError, "tokens must be an integer tensor"),
    "head_type_scores tokens shape": (lambda c: A.head_type_scores(torch.rand(2, 4, S, S), c.tokens[:1]), ValueError,
                                      "tokens has shape [1, 6], but the pattern holds [batch, pos] = [2, 6]"),
    # --- the mask
    "step_sizes mask shape": (lambda c: A.step_sizes(c.cache, mask=wrong_mask(c)), ValueError, "mask has shape [2, 5], but cache holds [batch, pos] = [2, 6]"),
    "fixed_points mask shape": (lambda c: A.fixed_points(c.cache, mask=wrong_mask(c)), ValueError, "mask has shape [2, 5]"),
    "cyclic_similarity mask shape": (lambda c: A.cyclic_similarity(c.cache, of="attention", mask=wrong_mask(c)), ValueError, "mask has shape [2, 5]"),
    "logit_lens mask shape": (lambda c: A.logit_lens(c.model, c.cache, mask=wrong_mask(c)), ValueError, "mask has shape [2, 5]"),
    "attention_stability mask shape": (lambda c: A.attention_stability(c.model, c.cache, c.tokens, wrong_mask(c)), ValueError, "mask has shape [2, 5]"),
    "depth_profile mask shape": (lambda c: A.depth_profile(c.cache, mask=wrong_mask(c)), ValueError, "mask has shape [2, 5]"),
    "depth_profile baseline of other input": (lambda c: A.depth_profile(c.cache, c.shorter_input, mask=c.mask), ValueError,
                                              "mask has shape [2, 6], but baseline_cache holds [batch, pos] = [2, 4]"),
    "colsum_concentration mask shape": (lambda c: A.colsum_concentration(torch.rand(2, 4, S, S), wrong_mask(c)), ValueError,
                                        "mask has shape [2, 5], but the pattern holds"),
    "mixing_score mask without batch dims": (lambda c: A.mixing_score(torch.rand(S, S), c.mask), ValueError, "a mask needs patterns [..., batch, head"),
    "step_sizes mask of 2s": (lambda c: A.step_sizes(c.cache, mask=two_mask(c)), ValueError, "mask must hold only 0 (padding) and 1"),
    "step_sizes mask all padding": (lambda c: A.step_sizes(c.cache, mask=empty_row_mask(c)), ValueError, "mask rows [1] have no real token"),
    "step_sizes mask as a list": (lambda c: A.step_sizes(c.cache, mask=c.mask.tolist()), TypeError, "mask must be a tensor"),
    # --- the reference run
    "fixed_points reference of another model": (lambda c: A.fixed_points(c.other_cache, reference=c.cache), ValueError,
                                                 "reference was made by a model whose config differs"),
    "fixed_points reference shorter": (lambda c: A.fixed_points(c.cache, reference=c.short), ValueError,
                                       "reference has n_loops=2, fewer than the cache's n_loops=3"),
    "fixed_points reference of another input": (lambda c: A.fixed_points(c.cache, reference=c.shorter_input), ValueError,
                                                "it must be a run of the same input"),
    "fixed_points reference not a cache": (lambda c: A.fixed_points(c.cache, reference=c.tokens), TypeError, "reference must be a LoopCache"),
    # --- k, targets
    "logit_lens k=0": (lambda c: A.logit_lens(c.model, c.cache, k=0), ValueError, "k=0 is out of range: it must lie in [1, 23]"),
    "logit_lens k > vocab": (lambda c: A.logit_lens(c.model, c.cache, k=24), ValueError, "k=24 is out of range"),
    "logit_lens k=2.5": (lambda c: A.logit_lens(c.model, c.cache, k=2.5), ValueError, "k must be an integer, got 2.5"),
    "logit_lens k=True": (lambda c: A.logit_lens(c.model, c.cache, k=True), ValueError, "k must be an integer, got True"),
    "entry_point k=0": (lambda c: c.lens.entry_point(k=0), ValueError, "k must be a positive integer, got 0"),
    "logit_lens targets outside vocab": (lambda c: A.logit_lens(c.model, c.cache, targets=torch.full((B, S), c.V)), ValueError,
                                         "targets must lie in the vocabulary [0, 23), got ids from 23 to 23"),
    "logit_lens negative targets": (lambda c: A.logit_lens(c.model, c.cache, targets=torch.full((B, S), -1)), ValueError, "got ids from -1"),
    "logit_lens targets shape": (lambda c: A.logit_lens(c.model, c.cache, targets=torch.zeros(B, dtype=torch.long)), ValueError,
                                 "targets has shape [2], but the cache holds [batch, pos] = [2, 6]"),
    "logit_lens float targets": (lambda c: A.logit_lens(c.model, c.cache, targets=torch.zeros(B, S)), ValueError, "targets must hold integer token ids"),
    # --- positions, batch items, layers, iterations
    "pca_trajectory position": (lambda c: A.pca_trajectory(c.cache, position=S), ValueError,
                                "position=6 is out of range: there are 6 positions (valid: -6 .. 5)"),
    "pca_trajectory batch": (lambda c: A.pca_trajectory(c.cache, batch=-3), ValueError, "batch=-3 is out of range: there are 2 batch items"),
    "pca_trajectory n_components": (lambda c: A.pca_trajectory(c.cache, n_components=0), ValueError, "n_components must be a positive integer"),
    "LensResult.grid position": (lambda c: c.lens.grid(position=-7), ValueError, "position=-7 is out of range"),
    "LensResult.plot batch": (lambda c: c.lens.plot(batch=2), ValueError, "batch=2 is out of range"),
    "LensResult.plot value": (lambda c: c.lens.plot(value="bogus"), ValueError, "value must be one of"),
    "classify_tokens layer": (lambda c: A.classify_tokens(c.cache, layer=2), ValueError, "layer=2 is out of range: there are 2 block layers"),
    "classify_tokens rho": (lambda c: A.classify_tokens(c.cache, rho=0), ValueError, "rho=0 must lie in (0, 1]"),
    "head_type iteration": (lambda c: A.attention_stability(c.model, c.cache, c.tokens).head_type(T), ValueError, "iteration=3 is out of range"),
    "sink_score key": (lambda c: A.sink_score(torch.rand(S, S), key=S), ValueError, "key=6 is out of range"),
    "cyclic_similarity of": (lambda c: A.cyclic_similarity(c.cache, of="bogus"), ValueError, "of must be 'resid' or 'attention'"),
    "stream lens_positions": (lambda c: A.stream_analyses(c.model, c.tokens, n_loops=2, lens_positions=[0, S]), ValueError,
                              "lens_positions entry=6 is out of range: there are 6 positions"),
    # --- streaming: n_loops, tokens, mask
    "stream n_loops=0": (lambda c: A.stream_analyses(c.model, c.tokens, n_loops=0), ValueError, "n_loops must be a positive integer, got 0"),
    "stream n_loops=-2": (lambda c: A.stream_analyses(c.model, c.tokens, n_loops=-2), ValueError, "n_loops must be a positive integer, got -2"),
    "stream n_loops=1.5": (lambda c: A.stream_analyses(c.model, c.tokens, n_loops=1.5), ValueError, "n_loops must be a positive integer, got 1.5"),
    "stream n_loops=True": (lambda c: A.stream_analyses(c.model, c.tokens, n_loops=True), ValueError, "n_loops must be a positive integer, got True"),
    "stream n_loops=np.float64": (lambda c: A.stream_analyses(c.model, c.tokens, n_loops=np.float64(2)), ValueError, "n_loops must be a positive integer, got np.float64"),
    "stream n_loops='3'": (lambda c: A.stream_analyses(c.model, c.tokens, n_loops="3"), ValueError, "n_loops must be a positive integer, got '3'"),
    "stream 0 tokens": (lambda c: A.stream_analyses(c.model, c.tokens[:, :0], n_loops=2), ValueError, "tokens holds 0 tokens"),
    "stream empty batch": (lambda c: A.stream_analyses(c.model, c.tokens[:0], n_loops=2), ValueError, "tokens holds an empty batch"),
    "stream tokens outside vocab": (lambda c: A.stream_analyses(c.model, c.tokens + c.V, n_loops=2), ValueError, "tokens must lie in the vocabulary"),
    "stream tokens 3-d": (lambda c: A.stream_analyses(c.model, c.tokens[None], n_loops=2), ValueError, "tokens must be a tensor [batch, pos] or [pos]"),
    "stream mask shape": (lambda c: A.stream_analyses(c.model, c.tokens, n_loops=2, attention_mask=wrong_mask(c)), ValueError,
                          "attention_mask has shape [2, 5], but tokens holds [batch, pos] = [2, 6]"),
    "stream nothing asked": (lambda c: A.stream_analyses(c.model, c.tokens, fixed_point=False, attention=False, lens_positions=None),
                             ValueError, "nothing to measure"),
    # --- many prompts
    "over_prompts empty list": (lambda c: A.over_prompts(c.model, [], A.step_sizes, n_loops=2), ValueError, "prompts is empty"),
    "over_prompts an empty prompt": (lambda c: A.over_prompts(c.model, [[1, 2], []], A.step_sizes, n_loops=2), ValueError, "prompt 1 is empty"),
    "over_prompts an empty string": (lambda c: A.over_prompts(c.model, ["ab|1=", ""], A.step_sizes, n_loops=2), ValueError, "prompt 1 is empty"),
    "over_prompts one string": (lambda c: A.over_prompts(c.model, "ab|1=", A.step_sizes, n_loops=2), TypeError, "got a single string"),
    "over_prompts text and ids": (lambda c: A.over_prompts(c.model, ["ab|1=", [1, 2]], A.step_sizes, n_loops=2), TypeError,
                                  "prompt 1 is token ids but prompt 0 is text"),
    "over_prompts a bare int": (lambda c: A.over_prompts(c.model, [[1, 2], 3], A.step_sizes, n_loops=2), TypeError, "prompt 1 must be a string or a sequence"),
    "over_prompts float ids": (lambda c: A.over_prompts(c.model, [[1.5, 2.0]], A.step_sizes, n_loops=2), ValueError, "prompt 0 must be a sequence of integer token ids"),
    "over_prompts 1-d tensor": (lambda c: A.over_prompts(c.model, c.tokens[0], A.step_sizes, n_loops=2), ValueError, "[n_prompts, pos]"),
    "over_prompts batch_size=0": (lambda c: A.over_prompts(c.model, [[1, 2]], A.step_sizes, n_loops=2, batch_size=0), ValueError,
                                  "batch_size must be a positive integer, got 0"),
    "over_prompts n_loops=0": (lambda c: A.over_prompts(c.model, [[1, 2]], A.step_sizes, n_loops=0), ValueError, "n_loops must be a positive integer, got 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_naming_the_culprit(ctx, case):
    call, error, message = CASES[case]
    with pytest.raises(error) as info:
        call(ctx)
    assert message in str(info.value), f"{case}: {info.value}"
    assert not any(hp.fwd_hooks for hp in ctx.model.hook_dict.values())


@pytest.mark.parametrize("n_loops", [np.int64(3), np.int32(3), torch.tensor(3).item(), 3])
def test_streaming_accepts_any_integral_loop_count(ctx, n_loops):
    result = A.stream_analyses(ctx.model, ctx.tokens, n_loops=n_loops, seed=0, attention_mask=ctx.mask, attention=False)
    assert result.steps.norm.shape[0] == 3
    torch.testing.assert_close(result.steps.norm, A.step_sizes(ctx.cache, mask=ctx.mask).norm, equal_nan=True)


@given(st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none(),
                 st.integers(1, 100).map(np.int64), st.integers(-3, 0).map(np.int32)))
def test_a_loop_count_is_exactly_a_positive_integral_value(value):
    from loop_lens.analysis._checks import loop_count

    integral = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if value is None:
        assert loop_count(value, 7) == 7
    elif integral and value >= 1:
        assert loop_count(value, 7) == int(value) and type(loop_count(value, 7)) is int
    else:
        shown = re.escape(repr(int(value) if integral else value))
        with pytest.raises(ValueError, match=f"n_loops must be (a positive integer|an integer), got {shown}"):
            loop_count(value, 7)
