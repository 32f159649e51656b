"""The Lens classes against independent computations, and every lens-taking analysis accepting a
lens by name or as an instance."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import loop_lens as ll
from loop_lens.analysis import (
    LENSES,
    CodaLens,
    Lens,
    LogitLens,
    LoopedModel,
    StateLensResult,
    coda_lens,
    get_lens,
    lens_of_states,
    logit_lens,
    logit_lens_of_states,
    stream_analyses,
)

T = 4


def manual_rms_unembed(model, x: Tensor) -> Tensor:
    """`W_U (w * x / sqrt(mean(x^2) + eps))`, written out."""
    xf = x.double()
    normed = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps) * model.ln_final.weight.double()
    return normed @ model.unembed.weight.double().T


@pytest.fixture(scope="module")
def huginn():
    """zoo:khop-huginn (a coda and Huginn's post-loop norm), a run of 4 iterations with padding."""
    model = ll.load("zoo:khop-huginn")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    _, cache = model.run_with_cache(tokens, n_loops=T, seed=0, attention_mask=mask)
    return model, tokens, mask, cache


@pytest.fixture(scope="module")
def ouro():
    """zoo:khop-ouro: the state is normed every iteration (`iter_norm`), no coda."""
    model = ll.load("zoo:khop-ouro")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens, n_loops=T)
    return model, tokens, cache


def test_zoo_models_are_the_styles_these_tests_need(huginn, ouro):
    assert huginn[0].cfg.norm_after_loop and huginn[0].cfg.n_coda > 0 and not huginn[0].cfg.iter_norm
    assert ouro[0].cfg.iter_norm and ouro[0].cfg.n_coda == 0 and not ouro[0].cfg.final_norm


def test_the_model_class_has_everything_the_analyses_use(huginn, ouro):
    assert isinstance(huginn[0], LoopedModel) and isinstance(ouro[0], LoopedModel)
    assert not isinstance(huginn[3], LoopedModel)  # a cache is not a model


def test_logit_lens_of_a_huginn_state_is_unembed_of_the_final_norm(huginn):
    model, _, _, cache = huginn
    lens = LogitLens(model)
    for t in range(T):
        state = cache[f"iter.{t}.hook_state_post"]
        expected = manual_rms_unembed(model, state)
        torch.testing.assert_close(lens(state, f"iter.{t}.hook_state_post").double(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lens(state).double(), expected, atol=1e-4, rtol=1e-4)  # no hook: a residual
    resid = cache.stack("hook_resid_post")  # any leading dims
    torch.testing.assert_close(lens(resid).double(), manual_rms_unembed(model, resid), atol=1e-4, rtol=1e-4)


def test_logit_lens_of_the_huginn_latent_does_not_norm_it_twice(huginn):
    model, _, _, cache = huginn
    lens = LogitLens(model)
    last = f"iter.{T - 1}.hook_state_post"
    assert lens.normed("hook_latent") and not lens.normed(last)
    torch.testing.assert_close(lens(cache["hook_latent"], "hook_latent"), lens(cache[last], last), atol=1e-4, rtol=1e-4)


def test_coda_lens_of_each_state_is_the_output_of_a_run_stopped_there(huginn):
    """A run of t + 1 iterations from the same start state ends in s_t, so its logits are the
    coda lens of s_t; the last state gives the model's own output."""
    model, tokens, mask, cache = huginn
    lens = CodaLens(model)
    start = cache["iter.0.hook_state_pre"]
    result = coda_lens(model, cache, mask=mask)
    for t in range(T):
        with torch.no_grad():
            stopped = model(tokens, n_loops=t + 1, initial_state=start, attention_mask=mask, exit="last")
        real = mask.bool()  # padded query positions are not compared
        got = lens(cache[f"iter.{t}.hook_state_post"], f"iter.{t}.hook_state_post", mask)
        torch.testing.assert_close(got[real], stopped[real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result.logits[t][real], stopped[real], atol=1e-4, rtol=1e-4)
    # a stack of states goes through the coda one at a time
    stack = cache.stack("hook_state_post")
    torch.testing.assert_close(lens(stack, None, mask), torch.stack([model.finish(s, mask) for s in stack]))


def test_ouro_state_lens_equals_the_exit_at_each_step_without_a_second_norm(ouro):
    model, tokens, cache = ouro
    states = logit_lens_of_states(model, cache)
    for t in range(T):
        with torch.no_grad():
            exit_t = model(tokens, n_loops=T, exit=t)
        torch.testing.assert_close(states.logits[t], exit_t, atol=1e-4, rtol=1e-4)
        state = cache[f"iter.{t}.hook_state_post"]
        torch.testing.assert_close(states.logits[t], model.unembed(state))
        # norming again would change the answer, so the check above is not vacuous
        assert (manual_rms_unembed(model, state).float() - states.logits[t]).abs().max() > 1e-2
    # without a coda, the coda lens of a state is the same exit logits
    torch.testing.assert_close(coda_lens(model, cache).logits, states.logits)


def test_ouro_block_outputs_are_normed_by_the_logit_lens(ouro):
    """Inside the block the residual is not normed yet: the lens norms it, and the last layer's
    output read that way equals the exit at that iteration."""
    model, tokens, cache = ouro
    result = logit_lens(model, cache, k=1)
    resid = cache.stack("hook_resid_post")
    expected = manual_rms_unembed(model, resid).argmax(-1)
    assert torch.equal(result.top_ids[..., 0], expected)
    with torch.no_grad():
        exit_1 = model(tokens, n_loops=T, exit=1)
    assert torch.equal(result.top_ids[1, -1, ..., 0], exit_1.argmax(-1))


@pytest.mark.parametrize("name", ["logit", "coda"])
def test_a_lens_instance_gives_what_its_name_gives(huginn, name):
    model, tokens, mask, cache = huginn
    by_name = logit_lens(model, cache, lens=name, mask=mask, k=3)
    instance = LENSES[name](model)
    assert instance.name == name and get_lens(model, name).name == name and get_lens(model, instance) is instance
    by_instance = logit_lens(model, cache, lens=instance, mask=mask, k=3)
    for field in ("top_ids", "top_probs", "target_prob", "target_rank", "entropy", "kl_to_final"):
        torch.testing.assert_close(getattr(by_instance, field), getattr(by_name, field))
    assert by_instance.lens == name
    torch.testing.assert_close(lens_of_states(model, cache, instance, mask).logits, lens_of_states(model, cache, name, mask).logits)
    streamed = stream_analyses(model, tokens, n_loops=T, seed=0, attention_mask=mask, fixed_point=False, attention=False,
                               lens_positions=[1, -1], lens=instance)
    assert streamed.lens == name
    torch.testing.assert_close(streamed.lens_top1, by_name.top_ids[:, :, :, [1, 5], 0])
    torch.testing.assert_close(streamed.lens_top1_prob, by_name.top_probs[:, :, :, [1, 5], 0])


class ShiftedLens(Lens):
    """A toy site-dependent lens, as a tuned lens would be: adds `iteration` to every logit of
    the logit lens, and records the hook names it is asked about."""

    name = "shifted"
    pointwise = True

    def __init__(self, model):
        super().__init__(model)
        self.seen: list[str] = []

    def __call__(self, x, hook=None, attention_mask=None):
        self.seen.append(hook)
        return LogitLens(self.model)(x, hook) + ll.parse_hook_name(hook).iteration


def test_a_user_lens_reads_the_site_from_the_hook_name(huginn):
    model, tokens, mask, cache = huginn
    custom = ShiftedLens(model)
    result = logit_lens(model, cache, lens=custom, mask=mask)
    L = model.cfg.n_block
    assert sorted(custom.seen) == sorted(f"iter.{t}.blocks.{layer}.hook_resid_post" for t in range(T) for layer in range(L))
    # a constant shift of every logit changes no probability
    plain = logit_lens(model, cache, mask=mask)
    torch.testing.assert_close(result.top_probs, plain.top_probs, atol=1e-5, rtol=1e-5)
    states = lens_of_states(model, cache, custom)
    torch.testing.assert_close(states.logits[2] - 2, logit_lens_of_states(model, cache).logits[2], atol=1e-4, rtol=1e-4)
    assert states.lens == "shifted"


@pytest.mark.parametrize("call", [
    lambda m, c, tok: logit_lens(m, c, lens="bogus"),
    lambda m, c, tok: lens_of_states(m, c, "bogus"),
    lambda m, c, tok: get_lens(m, "bogus"),
    lambda m, c, tok: stream_analyses(m, tok, n_loops=2, lens="bogus"),
], ids=["logit_lens", "lens_of_states", "get_lens", "stream_analyses"])
def test_an_unknown_lens_name_is_refused_with_the_valid_names(huginn, call):
    model, tokens, _, cache = huginn
    with pytest.raises(ValueError, match=r"lens must be one of \['coda', 'logit'\] or a Lens instance, got 'bogus'"):
        call(model, cache, tokens)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_a_lens_built_for_another_model_is_refused(huginn, ouro):
    model, _, _, cache = huginn
    with pytest.raises(ValueError, match=r"lens LogitLens\(.*\) was built for a model whose config differs.*n_coda: 0 vs 1"):
        logit_lens(model, cache, lens=LogitLens(ouro[0]))


def test_the_coda_lens_of_a_block_layer_needs_a_coda(ouro):
    model, tokens, cache = ouro
    with pytest.raises(ValueError, match="no coda"):
        logit_lens(model, cache, lens="coda")
    with pytest.raises(ValueError, match="no coda"):
        stream_analyses(model, tokens, n_loops=2, lens=CodaLens(model))


def test_state_lens_result_table_and_picture(huginn):
    model, _, mask, cache = huginn
    result = logit_lens_of_states(model, cache, mask=mask)
    assert isinstance(result, StateLensResult) and result.logits.shape == (T, 2, 6, model.cfg.d_vocab)
    frame = result.to_frame()
    assert len(frame) == T * 2 * 6 and list(frame.columns[:3]) == ["iteration", "batch", "position"]
    probs = result.logits.float().softmax(-1)
    row = frame[(frame.iteration == 2) & (frame.batch == 1) & (frame.position == 3)].iloc[0]
    assert row.top1 == int(probs[2, 1, 3].argmax()) and row.top1_token == model.tokenizer.decode([int(row.top1)])
    assert row.top1_prob == pytest.approx(float(probs[2, 1, 3].max()), rel=1e-5)
    assert row.entropy == pytest.approx(float(-(probs[2, 1, 3] * probs[2, 1, 3].log()).sum()), rel=1e-4)
    fig = result.plot(batch=1)
    assert fig.data[0].z.shape == (T, 6) and fig.data[0].z[2][3] == pytest.approx(row.top1_prob, rel=1e-5)


@pytest.mark.parametrize("name", ["logit", "coda"])
def test_logit_lens_at_chosen_positions_equals_the_full_lens_there(huginn, name):
    """`positions=` reads only those positions (all of them for the coda lens, which attends):
    every summary equals the full lens's at those positions, and the result's methods take the
    input's positions."""
    model, _, mask, cache = huginn
    full = logit_lens(model, cache, lens=name, mask=mask, k=3)
    some = logit_lens(model, cache, lens=name, mask=mask, k=3, positions=[4, -1, 0])
    cols = [4, 5, 0]
    for field in ("top_ids", "top_probs", "target_prob", "target_rank", "entropy", "kl_to_final"):
        torch.testing.assert_close(getattr(some, field), getattr(full, field)[:, :, :, cols], atol=1e-5, rtol=1e-5)
    assert torch.equal(some.final_top, full.final_top[:, cols]) and some.positions == cols
    assert some.grid(position=-1).equals(full.grid(position=5)) and some.grid(position=0).equals(full.grid(position=0))
    assert (some.plot(position=4).data[0].z == full.plot(position=4).data[0].z).all()
    assert sorted(set(some.to_frame().position)) == [0, 4, 5]
    with pytest.raises(ValueError, match="position 2 was not read"):
        some.grid(position=2)
    with pytest.raises(ValueError, match="twice"):
        logit_lens(model, cache, positions=[1, -5])
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(model, cache, positions=[6])
