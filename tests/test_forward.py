"""The forward pass keeps its promises: the checkpoint's own default output, batch- and
padding-independent numbers, hook points that cost nothing until used, and arguments checked
before any compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

import loop_lens as ll
from loop_lens.model.hooks import NO_HOOKS


def ouro_reference_default(step_logits: torch.Tensor, gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """`OuroForCausalLM.forward` with no arguments, written from its description: the exit pdf
    accumulated step by step, then per token the first step whose cumulative probability
    reaches the threshold (the last step if none does)."""
    T = gate_logits.shape[0]
    remaining = torch.ones_like(gate_logits[0])
    pdf = []
    for t in range(T):
        lam = torch.sigmoid(gate_logits[t])
        if t < T - 1:
            pdf.append(lam * remaining)
            remaining = remaining * (1.0 - lam)
        else:
            pdf.append(remaining)
    cumulative = torch.cumsum(torch.stack(pdf, dim=-1), dim=-1)  # [batch, pos, T]
    hit = cumulative >= threshold
    exit_step = torch.argmax(hit.float(), dim=-1)
    exit_step[~hit.any(-1)] = T - 1
    out = torch.empty_like(step_logits[0])
    for b in range(out.shape[0]):
        for s in range(out.shape[1]):
            out[b, s] = step_logits[exit_step[b, s], b, s]
    return out


def saturating_ouro(seed: int, **overrides) -> ll.HookedLoopedTransformer:
    """An Ouro-style GQA model whose exit gate saturates on some tokens, so the threshold exit
    at 1.0 leaves before the last step there (in float32, sigmoid reaches 1.0)."""
    model = tiny_model("ouro", seed=seed, **{"n_prelude": 0, "n_coda": 0, "n_heads": 6, "n_key_value_heads": 2, "d_model": 48,
                                             "default_exit": "threshold", **overrides})
    with torch.no_grad():
        model.exit_gate.weight.mul_(40.0)
        model.exit_gate.bias.fill_(2.0)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ouro_default_call_is_the_references_threshold_exit(seed):
    model = saturating_ouro(seed)
    tokens = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, n_loops=4, names_filter=lambda n: n.endswith("hook_exit_logit"))
        steps = torch.stack([model(tokens, n_loops=4, exit=t) for t in range(4)])
        expected = ouro_reference_default(steps, cache.stack("exit_logit"), threshold=1.0)
        default = model(tokens, n_loops=4)
    torch.testing.assert_close(default, expected, atol=0, rtol=0)
    assert torch.equal(model(tokens, n_loops=4, exit="threshold"), default)
    # the configuration really exercises an early exit somewhere, and the last step elsewhere
    early = ~torch.isclose(default, steps[-1]).all(-1)
    assert early.any() and not early.all()


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_and_weighted_exits_with_a_coda(seed):
    """With a coda the rest of the network attends over positions, so each position's exit logits
    come from its exit step's full finish (not one finish of mixed states)."""
    model = saturating_ouro(seed, n_coda=1)
    tokens = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, n_loops=4, names_filter=lambda n: n.endswith("hook_exit_logit"))
        steps = torch.stack([model(tokens, n_loops=4, exit=t) for t in range(4)])
        expected = ouro_reference_default(steps, cache.stack("exit_logit"), threshold=1.0)
        got = model(tokens, n_loops=4, exit="threshold")
        p = model.exit_distribution(cache.stack("exit_logit"))
        weighted = model(tokens, n_loops=4, exit="weighted")
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    early = ~torch.isclose(got, steps[-1]).all(-1)
    assert early.any() and not early.all()
    torch.testing.assert_close(weighted, (steps * p[..., None]).sum(0), atol=1e-5, rtol=1e-5)


def test_ouro_loss_uses_the_weighted_exit_like_the_reference_with_labels():
    model = saturating_ouro(0)
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(5))
    weighted = model(tokens, exit="weighted")
    expected = torch.nn.functional.cross_entropy(weighted[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(model(tokens, return_type="loss"), expected)


def test_ouro_early_exit_step_from_the_config_is_the_default_when_in_range():
    model = saturating_ouro(0)
    model.cfg.default_exit = 1
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model(tokens, n_loops=4), model(tokens, n_loops=4, exit=1))
    # out of range for a one-step run: the reference falls back to the threshold exit
    assert torch.equal(model(tokens, n_loops=1), model(tokens, n_loops=1, exit="threshold"))


def test_golden_ouro_detects_its_default_exit_from_the_config(tmp_path):
    from conftest import golden

    assert ll.load(golden("ouro-tiny")).cfg.default_exit == "threshold"


@pytest.mark.parametrize("padding", ["right", "left"])
def test_a_prompt_gets_the_same_numbers_alone_and_in_a_padded_batch_with_a_seed(padding):
    model = tiny_model("huginn")
    prompts = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 3)]
    S = max(len(p) for p in prompts)
    tokens = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    for i, p in enumerate(prompts):
        where = slice(0, len(p)) if padding == "right" else slice(S - len(p), S)
        tokens[i, where], mask[i, where] = p, 1
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask, n_loops=5, seed=7)
        for i, p in enumerate(prompts):
            alone = model(p, n_loops=5, seed=7)[0]
            got = batch[i][mask[i].bool()]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_over_prompts_in_batches_equals_each_prompt_alone_same_seed():
    from loop_lens.analysis.fixed_points import step_sizes

    model = tiny_model("huginn")
    prompts = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 4, 8, 5)]

    def analysis(cache, tokens, mask):
        return step_sizes(cache, mask=mask if not bool(mask.all()) else None)

    batched = ll.analysis.over_prompts(model, prompts, analysis, n_loops=4, batch_size=3, seed=3, progress=False)
    alone = ll.analysis.over_prompts(model, prompts, analysis, n_loops=4, batch_size=1, seed=3, progress=False)
    keys = ["prompt", "iteration", "layer"]
    batched, alone = batched.sort_values(keys).reset_index(drop=True), alone.sort_values(keys).reset_index(drop=True)
    assert len(batched) == len(alone) > 0 and batched[keys].equals(alone[keys])
    np.testing.assert_allclose(batched["relative_step"].to_numpy(), alone["relative_step"].to_numpy(), rtol=1e-4, atol=1e-6)


def test_hook_points_cost_nothing_per_iteration_until_hooked(tokens):
    model = tiny_model("pre")
    before = len(list(model.modules()))
    model(tokens, n_loops=500)
    assert len(list(model.modules())) == before and len(model.iter) == 0
    _, cache = model.run_with_cache(tokens, n_loops=50, names_filter="iter.7.hook_state_post")
    assert list(cache.cache_dict) == ["iter.7.hook_state_post"]
    assert len(model.iter) == 0  # created for the run, dropped after it


def test_a_filter_hook_reaches_every_iteration_of_any_run(tokens):
    model = tiny_model("pre")
    seen = []
    with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_state_post"), lambda x, hook: seen.append(hook.name))]):
        model(tokens, n_loops=3)
        model(tokens, n_loops=6)
    assert seen == [f"iter.{t}.hook_state_post" for t in (0, 1, 2, 0, 1, 2, 3, 4, 5)]
    assert len(model.iter) == 0


@pytest.mark.parametrize("history", [None, 12])
def test_a_hook_on_an_iteration_that_does_not_run_is_an_error_whatever_ran_before(tokens, history):
    model = tiny_model("pre")
    if history:
        model.run_with_cache(tokens, n_loops=history)
    with pytest.raises(ll.HookNameError, match=r"iter\.9\..*n_loops=4"):
        model.run_with_hooks(tokens, n_loops=4, fwd_hooks=[("iter.9.hook_state_post", lambda x, hook: x)])
    with pytest.raises(ll.HookNameError, match="n_loops=4"):
        model.run_with_cache(tokens, n_loops=4, names_filter=["iter.9.hook_state_post"])
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_misspelt_hook_names_raise(tokens):
    model = tiny_model("pre")
    with pytest.raises(AttributeError, match="hook_reisd_post"):
        NO_HOOKS.hook_reisd_post(tokens)
    with pytest.raises(ll.HookNameError, match="hook_reisd_post"):
        model.run_with_hooks(tokens, fwd_hooks=[("iter.0.blocks.0.hook_reisd_post", lambda x, hook: x)])
    with pytest.raises(ll.HookNameError, match="did you mean"):
        model.run_with_cache(tokens, names_filter=["iter.0.blocks.0.hook_resid_psot"])


def test_the_no_hooks_stand_in_knows_every_real_container_attribute():
    from transformer_lens.hook_points import HookPoint

    from loop_lens.model.hooks import HOOK_ATTRIBUTES

    names = set()
    for style in ("pre", "ouro", "huginn", "olmo2", "gpt2"):
        model = tiny_model(style)
        model.ensure_loops(1)
        for module in model.modules():
            if type(module).__module__ == "loop_lens.model.hooks":
                names |= {n for n, m in module.named_children() if isinstance(m, (HookPoint, torch.nn.Module))}
    names.discard("0")
    names.discard("1")
    assert names <= HOOK_ATTRIBUTES, names - HOOK_ATTRIBUTES


def test_filters_that_match_nothing_warn(tokens):
    model = tiny_model("pre")
    with pytest.warns(UserWarning, match="matches no hook point"):
        model.run_with_cache(tokens, names_filter=lambda n: n.endswith("nothing_is_called_this"))


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda x, hook: x[:, :-1], r"iter\.1\.hook_state_post.*shape \(2, 6, 32\).*\(2, 7, 32\)"),
        (lambda x, hook: x.double(), "float64"),
        (lambda x, hook: x.tolist(), "returned a list"),
    ],
)
def test_a_hook_returning_the_wrong_thing_is_named(tokens, bad, message):
    model = tiny_model("pre")
    with pytest.raises(ll.HookError, match=message):
        model.run_with_hooks(tokens, fwd_hooks=[("iter.1.hook_state_post", bad)])


@pytest.mark.parametrize("stop", [-1000, 1.5, True, "2", 1000])
def test_junk_stop_at_layer_is_refused_before_any_compute(tokens, stop):
    model = tiny_model("pre")
    seen = []
    with pytest.raises(ValueError, match="stop_at_layer"):
        model.run_with_hooks(tokens, stop_at_layer=stop, fwd_hooks=[("hook_embed", lambda x, hook: seen.append(1))])
    assert seen == []


def test_stop_at_layer_at_the_full_depth_returns_the_final_residual(tokens):
    model = tiny_model("pre")
    _, cache = model.run_with_cache(tokens, n_loops=3)
    depth = model.cfg.depth(3)
    torch.testing.assert_close(model(tokens, n_loops=3, stop_at_layer=depth), cache["coda.0.hook_resid_post"])
    torch.testing.assert_close(model(tokens, n_loops=3, stop_at_layer=-1), cache["coda.0.hook_resid_pre"])
    huginn = tiny_model("huginn")
    _, hc = huginn.run_with_cache(tokens, n_loops=2, seed=0)
    torch.testing.assert_close(huginn(tokens, n_loops=2, seed=0, stop_at_layer=huginn.cfg.depth(2)), hc["coda.0.hook_resid_post"])
    # Ouro: no coda, the final norm runs inside the last iteration; the full depth stops before it
    ouro = tiny_model("ouro", n_prelude=0, n_coda=0)
    _, oc = ouro.run_with_cache(tokens, n_loops=3)
    full = ouro(tokens, n_loops=3, stop_at_layer=ouro.cfg.depth(3))
    torch.testing.assert_close(full, oc[f"iter.2.blocks.{ouro.cfg.n_block - 1}.hook_resid_post"])
    torch.testing.assert_close(full, oc.accumulated_resid()[-1])


@pytest.mark.parametrize("n", [np.int64(4), np.int32(2), torch.tensor(3)])
def test_any_integral_loop_count_is_accepted(tokens, n):
    model = tiny_model("pre")
    assert torch.equal(model(tokens, n_loops=n), model(tokens, n_loops=int(n)))


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "3", np.float64(2.0)])
def test_a_bad_loop_count_is_refused(tokens, n):
    with pytest.raises(ValueError, match="n_loops"):
        tiny_model("pre")(tokens, n_loops=n)


@pytest.mark.parametrize(
    "tokens_in, message",
    [
        (torch.zeros(0, 5, dtype=torch.long), "empty input"),
        (torch.zeros(2, 0, dtype=torch.long), "empty input"),
        (torch.zeros(2, 3), "integer tensor"),
        (torch.tensor([[1, 40]]), r"\[0, 40\)"),
        ([], "empty|integer"),
    ],
)
def test_bad_token_input_is_named(tokens_in, message):
    with pytest.raises(ValueError, match=message):
        tiny_model("pre")(tokens_in)


def test_bad_masks_and_single_token_losses_are_refused(tokens):
    model = tiny_model("pre")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(tokens, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="only 0"):
        model(tokens, attention_mask=torch.full((2, 7), 2))
    with pytest.raises(ValueError, match=r"no real token in prompt\(s\) \[1\]"):
        model(tokens, attention_mask=torch.tensor([[1] * 7, [0] * 7]))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(tokens[:, :1], return_type="loss")


def test_input_longer_than_the_context_warns_once_on_rotary_models():
    model = tiny_model("pre", n_ctx=8)
    long = torch.randint(0, 40, (1, 12))
    with pytest.warns(UserWarning, match="longer than n_ctx=8"):
        model(long)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(long)


def test_module_apply_works():
    model = tiny_model("huginn")
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert "Rotary" in seen and "Block" in seen


def test_family_zoo_names_a_shipped_model():
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(ll.load("khop-huginn", family="zoo")(tokens, seed=0), ll.load("zoo:khop-huginn")(tokens, seed=0))
    with pytest.raises(ll.LoadError, match="no zoo model 'nope'.*khop-huginn"):
        ll.load("nope", family="zoo")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JUNK = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.integers(-40, 40),
                 st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_loops=JUNK, stop=st.one_of(st.none(), JUNK), exit=st.one_of(st.none(), JUNK, st.sampled_from(["last", "weighted", "threshold", "x"])))
def test_any_argument_value_either_runs_or_is_refused_with_a_value_error(tokens, n_loops, stop, exit):
    model = _MODEL_FOR_PROPERTIES
    try:
        out = model(tokens, n_loops=n_loops, stop_at_layer=stop, exit=exit)
    except ValueError as err:
        assert any(word in str(err) for word in ("n_loops", "stop_at_layer", "exit")), err
        return
    assert isinstance(n_loops, int) and not isinstance(n_loops, bool) and 1 <= n_loops
    assert torch.isfinite(out).all()


_MODEL_FOR_PROPERTIES = tiny_model("pre", n_prelude=0, n_coda=0)


def test_reused_iteration_hook_containers_carry_their_new_names_and_no_old_hooks(tokens):
    model = tiny_model("pre")
    model.run_with_cache(tokens, n_loops=70, names_filter=lambda n: n.endswith("hook_state_post"))
    assert len(model.iter) == 0 and len(model._spare_hooks) == 64
    assert not any(hp.fwd_hooks or hp.ctx for spare in model._spare_hooks for hp in spare.modules() if hasattr(hp, "fwd_hooks"))
    _, cache = model.run_with_cache(tokens, n_loops=12, names_filter=lambda n: n.endswith("hook_state_post"))
    assert sorted(cache.cache_dict, key=lambda n: int(n.split(".")[1])) == [f"iter.{t}.hook_state_post" for t in range(12)]
    _, fresh = tiny_model("pre").run_with_cache(tokens, n_loops=12, names_filter=lambda n: n.endswith("hook_state_post"))
    assert all(torch.equal(cache[k], fresh[k]) for k in fresh.cache_dict)


def test_ouro_final_norm_hooks_that_never_fire_are_refused_and_not_listed():
    model = tiny_model("ouro", n_prelude=0, n_coda=0)
    tokens = torch.randint(0, 40, (1, 5))
    assert not [n for n in model.hook_names(2) if n.startswith("ln_final.")]
    with pytest.raises(ll.HookNameError, match=r"never fires.*ln_state"):
        model.run_with_hooks(tokens, n_loops=2, fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: x)])
    with pytest.raises(ll.HookNameError, match="never fires"):
        model.run_with_cache(tokens, n_loops=2, names_filter=["ln_final.hook_normalized"])
    _, cache = model.run_with_cache(tokens, n_loops=2)
    assert set(cache.cache_dict) == set(model.hook_names(2))  # every listed name fires, and only those
    huginn = tiny_model("huginn")
    _, cache = huginn.run_with_cache(tokens, n_loops=2, seed=0)
    assert set(cache.cache_dict) == set(huginn.hook_names(2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(seed="x"), "seed must be an integer"),
        (dict(seed=2**70), r"seed must lie in \[0, 2\*\*63\)"),
        (dict(seed=-1), r"seed must lie in"),
        (dict(seed=0, generator=torch.Generator()), "not seed and generator"),
        (dict(seed=0, initial_state=torch.zeros(2, 7, 32)), "not seed and initial_state"),
        (dict(generator=3), "generator must be a torch.Generator"),
        (dict(initial_state=torch.zeros(2, 3, 32)), r"initial_state has shape \(2, 3, 32\), expected \(2, 7, 32\)"),
    ],
)
def test_start_state_arguments_are_checked(tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model("huginn")(tokens, **kwargs)


def test_small_input_mistakes_are_named(tokens):
    model = tiny_model("pre")
    with pytest.raises(ValueError, match="empty input: an empty list"):
        model([])
    with pytest.raises(TypeError, match=r"hook for 'iter.1.blocks.0.hook_resid_post' is a int"):
        model.run_with_hooks(tokens, fwd_hooks=[("iter.1.blocks.0.hook_resid_post", 42)])
    with pytest.raises(ll.HookNameError, match=r"did you mean \['iter\.2\.blocks\.1\.hook_resid_post'"):
        model.run_with_hooks(tokens, fwd_hooks=[("iter.2.blocks.1.hook_reisd_post", lambda x, hook: x)])
    assert torch.equal(model(tokens, n_loops=3, exit=-2), model(tokens, n_loops=3, exit=1))
    assert torch.equal(model(tokens, n_loops=3, exit=-1), model(tokens, n_loops=3))


def test_text_outside_the_vocabulary_is_named_not_turned_into_padding():
    model = ll.load("zoo:khop-huginn")
    with pytest.raises(ValueError, match=r"not in the tokenizer's vocabulary: \['/', '\?'"):
        model.to_tokens("f 2 / 3 ?")
    with pytest.raises(ValueError, match="vocabulary"):
        model("\ufeffb f")


def test_loading_and_looping_mistakes_are_load_errors():
    with pytest.raises(ll.LoadError, match="device 'nope'"):
        ll.load("zoo:khop-huginn", device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ll.LoadError, match="no CUDA device"):
            ll.load("zoo:khop-huginn", device="cuda")
    with pytest.raises(ll.LoadError, match="already looped: load it with ll.load"):
        ll.loop("zoo:khop-ff", block=(2, 4), n_loops=3)
    with pytest.raises(ll.LoadError, match="block=3 must be two integers"):
        ll.loop("zoo:khop-ff", block=3, n_loops=3)


def test_a_reference_run_on_another_input_is_refused():
    from loop_lens.analysis.fixed_points import fixed_points

    model = tiny_model("huginn")
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, n_loops=3, seed=0)
    _, same = model.run_with_cache(tokens, n_loops=6, seed=0)
    _, other = model.run_with_cache(tokens.flip(1), n_loops=6, seed=0)
    fixed_points(cache, reference=same)
    with pytest.raises(ValueError, match="another input or start state"):
        fixed_points(cache, reference=other)
