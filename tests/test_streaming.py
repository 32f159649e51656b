"""Streaming analyses equal the cache-based ones, without keeping every iteration."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from loop_lens.analysis.attention import attention_stability
from loop_lens.analysis.fixed_points import step_sizes
from loop_lens.analysis.result import Result
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


def test_streaming_result_table_and_picture(tokens):
    model = tiny_model("huginn")
    streamed = stream_analyses(model, tokens, n_loops=5, seed=0, lens_positions=[0, -1])
    assert isinstance(streamed, Result) and streamed.lens == "logit" and list(streamed.lens_positions) == [0, 6]
    frame = streamed.to_frame()
    T, L, B = 5, 2, 2
    assert len(frame) == T * L * B and list(frame.columns[:3]) == ["iteration", "layer", "batch"]
    assert {"step", "relative_step", "cosine", "change_frobenius", "resid_step", "top1_at_0", "top1_prob_at_6", "entropy_at_6"} <= set(frame.columns)
    row = frame[(frame.iteration == 3) & (frame.layer == 1) & (frame.batch == 1)].iloc[0]
    assert row.relative_step == pytest.approx(float(streamed.steps.relative[3, 1, 1]))
    assert row.change_frobenius == pytest.approx(float(streamed.attention.change_frobenius[3, 1, 1].mean()))
    assert row.top1_at_6 == int(streamed.lens_top1[3, 1, 1, 1]) and row.entropy_at_0 == pytest.approx(float(streamed.lens_entropy[3, 1, 1, 0]))
    fig = streamed.plot("entropy_at_6")
    assert len(fig.data) == L and fig.data[1].y[3] == pytest.approx(float(streamed.lens_entropy[3, 1, :, 1].mean()))
    with pytest.raises(ValueError, match="value must be one of the measured columns"):
        streamed.plot("batch")
    only_lens = stream_analyses(model, tokens, n_loops=5, seed=0, fixed_point=False, attention=False)
    assert only_lens.steps is None and only_lens.attention is None and "step" not in only_lens.to_frame()


def test_streaming_keeps_its_buffers_on_the_model_device(tokens):
    """With the default device set to `meta`, a buffer made without `device=` lands on meta and the
    first hook that writes into it raises."""
    model = tiny_model("huginn")
    mask = torch.ones_like(tokens)
    mask[0, 6:] = 0
    with torch.device("meta"):
        for lens in ("logit", "coda"):
            streamed = stream_analyses(model, tokens, n_loops=3, seed=0, attention_mask=mask, lens=lens)
            assert streamed.steps.norm.device.type == "cpu" and streamed.lens_top1.device.type == "cpu"
            streamed.to_frame()


@pytest.mark.parametrize("T", [4, 64])
def test_hooks_by_filter_hold_one_iterations_hook_points_at_a_time(tokens, T):
    """A filter hook (as the streaming analyses and run_with_hooks use) gets each iteration's hook
    points when the loop reaches it and drops them when the iteration ends, so the hook points alive
    at any moment do not grow with the run's length (a per-iteration leak fails this)."""
    model = tiny_model("huginn")
    alive, fired = [], []

    def watch(x, hook):
        alive.append(len(model.iter))
        fired.append(hook.name)

    model.run_with_hooks(tokens, n_loops=T, seed=0, fwd_hooks=[(lambda n: n.endswith("blocks.0.hook_resid_post"), watch)])
    assert [n for n in fired if n.startswith("iter.")] == [f"iter.{t}.blocks.0.hook_resid_post" for t in range(T)]
    assert max(alive) == 1 and len(model.iter) == 0
    streamed = stream_analyses(model, tokens, n_loops=T, seed=0)
    assert streamed.steps.relative.shape[0] == T and len(model.iter) == 0
    # a second run reaches every iteration again, and a named hook keeps its iteration's hook points
    fired.clear()
    model.add_hook(f"iter.{T - 1}.blocks.1.hook_resid_pre", lambda x, hook: None)
    model.run_with_hooks(tokens, n_loops=T, seed=0, fwd_hooks=[(lambda n: n.endswith("blocks.0.hook_resid_post"), watch)])
    assert [n for n in fired if n.startswith("iter.")] == [f"iter.{t}.blocks.0.hook_resid_post" for t in range(T)]
    assert list(model.iter) == [str(T - 1)]
    model.reset_hooks()
    assert len(model.iter) == 0
