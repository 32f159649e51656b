"""Streaming analyses equal the cache-based ones, without keeping every iteration."""

from __future__ import annotations

import torch
from conftest import tiny_model

from loop_lens.analysis.attention import attention_stability
from loop_lens.analysis.fixed_points import step_sizes
from loop_lens.analysis.stages import logit_lens
from loop_lens.analysis.streaming import stream_analyses


def test_streaming_equals_cache_based_analyses(tokens):
    model = tiny_model("huginn")
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    _, cache = model.run_with_cache(tokens, n_loops=7, seed=0, attention_mask=mask)
    streamed = stream_analyses(model, tokens, n_loops=7, seed=0, attention_mask=mask, lens_positions=[2, -1])
    ref_steps = step_sizes(cache, mask=mask)
    for name in ("norm", "relative", "cosine", "per_token", "per_token_cosine"):
        torch.testing.assert_close(getattr(streamed.steps, name), getattr(ref_steps, name), equal_nan=True)
    ref_att = attention_stability(model, cache, tokens, mask=mask)
    for name in ("change_frobenius", "change_js", "concentration", "sink", "mixing", "resid_step"):
        torch.testing.assert_close(getattr(streamed.attention, name), getattr(ref_att, name), equal_nan=True)
    for kind in ref_att.head_types:
        torch.testing.assert_close(streamed.attention.head_types[kind], ref_att.head_types[kind])
    lens = logit_lens(model, cache, mask=mask)
    torch.testing.assert_close(streamed.lens_top1, lens.top_ids[:, :, :, [2, 6], 0])
    torch.testing.assert_close(streamed.lens_top1_prob, lens.top_probs[:, :, :, [2, 6], 0])
    torch.testing.assert_close(streamed.lens_entropy, lens.entropy[:, :, :, [2, 6]])
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
