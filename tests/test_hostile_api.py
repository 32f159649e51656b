"""Issue 25, the Python API: hostile tokens, numbers, tensors and names (each test failed before its fix)."""

from __future__ import annotations

import pytest
import torch
from hostile import strings, tiny, tokens, word_tokenizer

import loop_lens as ll
from loop_lens.analysis import attention_stability, logit_lens, step_sizes
from loop_lens.tokenization import encode_batch

PAYLOADS = ['<span style="background-image:url(http://host/x.png)">s</span>', "<b>bold</b>", "<a href='http://h'>l</a>",
            "<img src=http://h/i.png>", "&lt;b&gt;"]


def _hostile_model():
    words = [f"{PAYLOADS[i % len(PAYLOADS)]}{i}" for i in range(64)]
    return tiny(words), words


def _no_markup(fig):
    for text in strings(fig.to_plotly_json()["data"]) + strings(fig.to_plotly_json()["layout"]):
        assert "<" not in text and ">" not in text, text


def test_every_figure_escapes_token_text_for_plotlys_html_subset():  # defect 1
    model, words = _hostile_model()
    gen = model.generate(tokens(), max_new_tokens=3, return_type="result", verbose=False, seed=0, stop_at_eos=False)
    fig = gen.plot()
    _no_markup(fig)
    assert any("&lt;span" in s for s in strings(fig.to_plotly_json()["data"]))  # shown as typed, not dropped
    _, cache = model.run_with_cache(tokens(), seed=0)
    _no_markup(logit_lens(model, cache).plot())


def test_nan_steps_never_count_as_converged():  # defect 6
    model = tiny()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "blocks.0" in n).fill_(float("nan"))
    _, cache = model.run_with_cache(tokens(), n_loops=4, seed=0)
    steps = step_sizes(cache)
    assert bool((steps.convergence_iteration() == -1).all())


@pytest.mark.parametrize("tol", [float("nan"), -1.0, float("inf"), 0.0, "1e-3", True])
def test_tolerances_are_checked(tol):  # defect 7
    model = tiny()
    _, cache = model.run_with_cache(tokens(), n_loops=3, seed=0)
    with pytest.raises(ValueError, match="tol"):
        step_sizes(cache).convergence_iteration(tol)
    with pytest.raises(ValueError, match="tol"):
        attention_stability(model, cache, tokens()).table(tol=tol)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64, "int8", "cuda", 3])
def test_cache_dtype_must_be_floating(dtype):  # defect 8 (and "float16" as a device string)
    with pytest.raises(ValueError, match="cache_dtype"):
        tiny().run_with_cache(tokens(), seed=0, cache_dtype=dtype)


def test_cache_dtype_by_name_is_understood():
    _, cache = tiny().run_with_cache(tokens(), seed=0, cache_dtype="float16")
    assert all(v.dtype == torch.float16 for v in cache.cache_dict.values() if v.is_floating_point())


@pytest.mark.parametrize("adaptive", ["kl", "entropy"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_adaptive_thresholds_must_be_finite(adaptive, value):  # defect 9
    with pytest.raises(ValueError, match="threshold"):
        tiny().generate(tokens(), max_new_tokens=2, adaptive=adaptive, threshold=value, verbose=False)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_seeds_follow_one_rule_everywhere(seed):  # defect 10, unclear seed=2**64
    model = tiny()
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*63\)"):
        model(tokens(), seed=seed)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*63\)"):
        model.generate(tokens(), max_new_tokens=2, seed=seed, verbose=False)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*63\)"):
        model.generate(tokens(), max_new_tokens=2, seed=seed, do_sample=True, verbose=False)


def test_sampling_temperature_must_be_finite():  # unclear error
    with pytest.raises(ValueError, match="temperature"):
        tiny().generate(tokens(), max_new_tokens=2, do_sample=True, temperature=float("nan"), verbose=False)


@pytest.mark.parametrize("name,hint", [("iter.-1.hook_state_pre", "count from 0"), ("iter.01.hook_state_pre", "iter.1.hook_state_pre"),
                                       ("iter.\u0663.hook_state_pre", "iter.3.hook_state_pre"),
                                       ("iter.+1.blocks.0.hook_resid_post", "iter.1.blocks.0.hook_resid_post")])
def test_a_refused_hook_name_says_how_to_spell_it_and_leaves_no_state(name, hint):  # defect 11
    model = tiny()
    expected = model(tokens(), seed=0)
    with pytest.raises(ll.HookNameError, match="plain decimal") as err:
        model.add_hook(name, lambda a, hook: a)
    assert hint in str(err.value)
    assert torch.equal(model(tokens(), seed=0), expected)  # no reset_hooks() needed
    with pytest.raises(ll.HookNameError):
        model.run_with_hooks(tokens(), seed=0, fwd_hooks=[(name, lambda a, hook: a)])
    assert torch.equal(model(tokens(), seed=0), expected)


def test_initial_states_and_masks_must_hold_real_values():  # defect 12, meta tensors
    model = tiny()
    shape = (1, 5, model.cfg.d_model)
    with pytest.raises(ValueError, match="initial_state.*complex"):
        model(tokens(), initial_state=torch.zeros(shape, dtype=torch.complex64))
    with pytest.raises(ValueError, match="initial_state.*meta"):
        model(tokens(), initial_state=torch.zeros(shape, device="meta"))
    with pytest.raises(ValueError, match="attention_mask.*meta"):
        model(tokens(), seed=0, attention_mask=torch.ones(1, 5, device="meta"))


def test_a_tokenizers_truncation_is_never_applied():  # defect 18
    model = tiny()
    text = "a b c d e f g h i j"
    whole, _ = model.tokenize(text)
    model.tokenizer.enable_truncation(max_length=2)
    cut, _ = model.tokenize(text)
    assert torch.equal(cut, whole) and whole.shape[1] > 2
    assert model.tokenizer.truncation["max_length"] == 2  # the tokenizer itself is left as it was


def test_a_tokenizers_fixed_padding_never_becomes_real_tokens():  # defect 19
    model = tiny()
    plain = model.tokenize(["a b", "c d e f"])
    model.tokenizer.enable_padding(length=48, pad_id=0)
    padded = model.tokenize(["a b", "c d e f"])
    assert torch.equal(padded[0], plain[0]) and torch.equal(padded[1], plain[1]) and padded[1].shape[1] < 48


def test_token_ids_outside_the_models_vocabulary_are_named():  # unclear error
    model = tiny()
    model.tokenizer = word_tokenizer([f"w{i}" for i in range(100)])
    with pytest.raises(ValueError, match=r"token id\(s\) \[70\].*64 ids"):
        model("w1 w70")


def test_a_tokenizer_panic_is_an_ordinary_error():  # unclear error (pyo3 PanicException is a BaseException)
    PanicException = type("PanicException", (BaseException,), {})

    class Panicking:
        model = None
        truncation = padding = None

        def encode_batch(self, *args, **kwargs):
            raise PanicException("regex backtracked without end")

    with pytest.raises(ValueError, match="tokenizer could not encode.*regex backtracked"):
        encode_batch(Panicking(), ["x"])


def test_an_unk_token_missing_from_the_vocabulary_is_named():  # unclear error
    model = tiny()
    model.tokenizer = word_tokenizer(["a", "b"], unk="[UNK]")
    with pytest.raises(ValueError, match=r"unk_token '\[UNK\]' is not in its vocabulary"):
        model("a zzz")


@pytest.mark.parametrize("bad,match", [(["b f", 3], "prompt 1 is int"), (None, "input")])
def test_prompts_that_are_not_text_or_tokens_are_named(bad, match):  # unclear error
    with pytest.raises(ValueError, match=match):
        tiny()(bad, seed=0)


def test_the_report_names_non_finite_weights_before_computing():  # unclear error (was linalg.svd)
    from loop_lens.report import build_report

    model = tiny()
    with torch.no_grad():
        model.blocks[0].attn.W_Q.fill_(float("inf")) if hasattr(model.blocks[0].attn, "W_Q") else \
            next(p for n, p in model.named_parameters() if "blocks.0" in n).fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN or infinite values in .*blocks.0"):
        build_report(model, "a b c", n_loops=2, progress=False)
