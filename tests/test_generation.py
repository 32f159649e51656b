"""Generation: the KV cache equals recomputation, padding and batching change nothing, seeds
reproduce, hooks fire per iteration, adaptive compute follows its documented semantics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STYLES, golden, tiny_model

import loop_lens as ll
from loop_lens import cli
from loop_lens.generation import GenerationResult, KVCache, _advance, _Plan
from loop_lens.zoo import task

QUIET = dict(verbose=False, stop_at_eos=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo_models() -> dict:
    """The shipped zoo models, loaded once."""
    return {name: ll.load(f"zoo:{name}") for name in ("khop-huginn", "khop-ouro", "khop-ff", "tiny-random")}


@pytest.fixture(scope="module")
def golden_models() -> dict:
    """The golden fixtures, loaded once."""
    return {name: ll.load(golden(name)) for name in ("huginn-tiny", "ouro-tiny", "retro-llama-tiny")}


def khop_prompts(n: int = 2, seed: int = 0) -> torch.Tensor:
    """k-hop prompts up to (and including) the first question's "="."""
    batch = task.sample(n, [1, 2, 3], torch.Generator().manual_seed(seed), split="heldout")
    return batch.tokens[:, : task.ANSWER_FROM[0] + 1]


def random_prompts(model, n: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    """Seeded random token prompts (no special tokens)."""
    return torch.randint(2, model.cfg.d_vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def deterministic(model) -> dict:
    """A deterministic start state: the model's own unless it is random."""
    random_start = model.cfg.initial_state == "trunc_normal" and model.cfg.init_std > 0
    return dict(initial_state="zeros") if random_start else {}


def forward_start(model, tokens: torch.Tensor) -> dict:
    """The forward's arguments for the same start state as `deterministic`."""
    return dict(initial_state=torch.zeros(*tokens.shape, model.cfg.d_model)) if deterministic(model) else {}


EXIT_VARIANTS = [("pre", {}), ("ouro", {}), ("ouro", dict(default_exit="threshold", early_exit_threshold=0.6)),
                 ("ouro", dict(default_exit="weighted")), ("ouro", dict(default_exit=1)),
                 ("huginn", {}), ("olmo2", {}), ("gpt2", {})]


@pytest.mark.parametrize("style,overrides", EXIT_VARIANTS)
def test_cached_logits_equal_the_forward_at_every_position(style, overrides):
    model = tiny_model(style, **overrides)
    seq = random_prompts(model, n=2, length=10, seed=1)
    T = model.cfg.default_loops
    plan = _Plan(T, model._resolve_exit(None, T, "logits"), None, 0.0)
    start = "zeros" if deterministic(model) else model.cfg.initial_state
    cache, positions, ones = KVCache(), torch.arange(10).expand(2, 10), torch.ones(2, 10, dtype=torch.long)
    with torch.no_grad():
        steps = [_advance(model, plan, cache, seq[:, :4], positions[:, :4], ones[:, :4], start)[0]]
        for i in range(4, 10):
            steps.append(_advance(model, plan, cache, seq[:, i:i + 1], positions[:, i:i + 1], ones[:, i:i + 1], start)[0])
        expected = model(seq, **forward_start(model, seq))[:, 3:]
    assert cache.length == 10
    assert (torch.stack(steps, 1) - expected).abs().max().item() <= 1e-4


def _check_cached_equals_recompute(model, prompts: torch.Tensor, n_new: int = 6, **kw) -> torch.Tensor:
    """Generate with and without the cache; the tokens must be equal."""
    cached = model.generate(prompts, max_new_tokens=n_new, return_type="tokens", **QUIET, **kw)
    recomputed = model.generate(prompts, max_new_tokens=n_new, use_past_kv_cache=False, return_type="tokens", **QUIET, **kw)
    assert torch.equal(cached, recomputed)
    return cached


def _check_against_forward(model, prompts: torch.Tensor, generated: torch.Tensor) -> None:
    """Greedy generation is the argmax of the plain forward on the sequence so far, step by step."""
    seq = prompts
    with torch.no_grad():
        for _ in range(generated.shape[1] - prompts.shape[1]):
            nxt = model(seq, **forward_start(model, seq))[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(seq, generated)


@pytest.mark.parametrize("style", list(STYLES))
def test_greedy_cached_generation_equals_recompute_for_every_block_style(style):
    model = tiny_model(style)
    prompts = random_prompts(model)
    out = _check_cached_equals_recompute(model, prompts, **deterministic(model))
    _check_against_forward(model, prompts, out)


def test_greedy_cached_generation_equals_recompute_on_zoo_and_golden_models(zoo_models, golden_models):
    for name, model in zoo_models.items():
        prompts = khop_prompts() if name.startswith("khop") else random_prompts(model)
        for T in (2, model.cfg.default_loops):
            out = _check_cached_equals_recompute(model, prompts, n_loops=T, **deterministic(model))
            if T == model.cfg.default_loops:
                _check_against_forward(model, prompts, out)
    for name, model in golden_models.items():
        prompts = random_prompts(model, length=5)
        out = _check_cached_equals_recompute(model, prompts, n_loops=3, **deterministic(model))
        with torch.no_grad():
            first = model(prompts, n_loops=3, **forward_start(model, prompts))[:, -1].argmax(-1)
        assert torch.equal(out[:, 5], first), name


def test_zoo_models_answer_khop_questions_when_generating(zoo_models):
    batch = task.sample(16, [1, 2, 3], torch.Generator().manual_seed(3), split="heldout")
    prompts = batch.tokens[:, : task.ANSWER_FROM[0] + 1]
    out = zoo_models["khop-ouro"].generate(prompts, max_new_tokens=1, return_type="tokens", **QUIET)
    assert (out[:, -1] == batch.answers[:, 0]).float().mean() >= 0.9


CRITERIA = [("kl", 1e-2), ("entropy", 1e-2), ("argmax", 2)]


@pytest.mark.parametrize("criterion,threshold", CRITERIA + [("gate", 0.5)])
def test_adaptive_cached_generation_equals_a_recompute_with_the_same_exits(zoo_models, golden_models, criterion, threshold):
    if criterion == "gate":
        models = [zoo_models["khop-ouro"], golden_models["ouro-tiny"], tiny_model("ouro")]
    else:
        models = list(zoo_models.values()) + list(golden_models.values()) + [tiny_model("olmo2")]
    varied = False
    for model in models:
        prompts = khop_prompts() if model.cfg.d_vocab == len(task.VOCAB) else random_prompts(model)
        kw = dict(max_new_tokens=8, adaptive=criterion, threshold=threshold, n_loops=8, return_type="result",
                  **QUIET, **deterministic(model))
        cached, recomputed = model.generate(prompts, **kw), model.generate(prompts, use_past_kv_cache=False, **kw)
        assert torch.equal(cached.tokens, recomputed.tokens)
        assert torch.equal(cached.iterations, recomputed.iterations)
        assert int(cached.iterations.min()) >= 1 and int(cached.iterations.max()) <= 8
        varied |= cached.iterations.unique().numel() > 1
    assert varied, "the exits never differed between tokens: the check would not see a wrong cache"


def test_a_position_that_exited_early_offers_its_last_keys_at_later_iterations():
    model = tiny_model("olmo2")
    prompts = random_prompts(model, n=2, seed=0)
    plan = _Plan(8, "last", "entropy", 1e-2)
    cache = KVCache()
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        _, k_prompt = _advance(model, plan, cache, prompts, positions, torch.ones_like(prompts), "zeros")
        _, k_next = _advance(model, plan, cache, prompts[:, -1:], positions[:, -1:] + 1, torch.ones(2, 1, dtype=torch.long), "zeros")
    assert k_prompt[0] != k_prompt[1] and int(k_prompt.max()) < 8, "the check needs rows exiting early at different iterations"
    for b in range(2):
        k0, k1 = int(k_prompt[b]), int(k_next[b])
        for layer in range(model.cfg.n_block):
            for t in range(8):
                keys = cache.k[("iter", t, layer)][b]
                assert keys.shape[1] == 7
                assert torch.equal(keys[:, :6], cache.k[("iter", min(t, k0 - 1), layer)][b, :, :6])
                assert torch.equal(keys[:, 6:], cache.k[("iter", min(t, k1 - 1), layer)][b, :, 6:])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("style", ["huginn", "gpt2", "ouro"])
@pytest.mark.parametrize("mode", ["greedy", "adaptive", "sample"])
def test_a_prompt_generates_the_same_alone_and_in_a_padded_batch(style, side, mode):
    model = tiny_model(style)
    short, other = random_prompts(model, 1, 4, seed=0)[0], random_prompts(model, 1, 7, seed=1)[0]
    kw = dict(max_new_tokens=6, seed=7, return_type="result", **QUIET)
    kw.update({"greedy": {}, "adaptive": dict(adaptive="entropy", threshold=1e-2, n_loops=6), "sample": dict(do_sample=True)}[mode])
    alone = model.generate(short[None], **kw)
    tokens, mask = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)
    tokens[1], mask[1] = other, 1
    cols = slice(3, 7) if side == "left" else slice(0, 4)
    tokens[0, cols], mask[0, cols] = short, 1
    batched = model.generate(tokens, attention_mask=mask, **kw)
    assert torch.equal(batched.generated[0], alone.generated[0])
    assert torch.equal(batched.iterations[0], alone.iterations[0])
    assert batched.tokens.shape == (2, 7 + 6) and torch.equal(batched.attention_mask[0, :3], torch.zeros(3, dtype=torch.long))


def test_text_batches_are_tokenized_right_padded_and_generate_like_each_text_alone(zoo_models):
    model = zoo_models["khop-huginn"]
    texts = ["a b | a 1 =", "a b c d e f | c 2 ="]
    batched = model.generate(texts, max_new_tokens=3, seed=0, **QUIET)
    assert isinstance(batched, list) and len(batched) == 2
    assert batched == [model.generate(t, max_new_tokens=3, seed=0, **QUIET) for t in texts]
    assert batched[0].startswith("a b | a 1 =")  # decoded with the tokenizer's spacing


def test_sampling_is_reproducible_with_a_seed_and_varies_without(zoo_models):
    model = zoo_models["khop-huginn"]
    prompts = khop_prompts(4)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=2.0, return_type="tokens", **QUIET)
    a, b = model.generate(prompts, seed=1, **kw), model.generate(prompts, seed=1, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(prompts, seed=2, **kw))
    # the start state is the family's own random one; a shorter run is a prefix of a longer one
    shorter = model.generate(prompts, seed=1, **{**kw, "max_new_tokens": 4})
    assert torch.equal(shorter, a[:, : prompts.shape[1] + 4])
    assert torch.equal(_check_cached_equals_recompute(model, prompts, n_new=5, seed=3, do_sample=True),
                       model.generate(prompts, max_new_tokens=5, seed=3, do_sample=True, return_type="tokens", **QUIET))


def test_the_prompts_start_state_is_the_forwards_own_draw_for_the_seed(zoo_models):
    model = zoo_models["khop-huginn"]
    prompts = khop_prompts(3)
    out = model.generate(prompts, max_new_tokens=1, seed=11, return_type="tokens", **QUIET)
    with torch.no_grad():
        logits = model(prompts, seed=11)[:, -1]
    assert torch.equal(out[:, -1], logits.argmax(-1))


def test_top_k_one_and_a_tiny_top_p_are_greedy(zoo_models):
    model = zoo_models["khop-huginn"]
    prompts = khop_prompts(4)
    kw = dict(max_new_tokens=5, seed=0, return_type="tokens", **QUIET)
    greedy = model.generate(prompts, **kw)
    assert torch.equal(model.generate(prompts, do_sample=True, top_k=1, temperature=3.0, **kw), greedy)
    assert torch.equal(model.generate(prompts, do_sample=True, top_p=1e-6, temperature=3.0, **kw), greedy)
    assert torch.equal(model.generate(prompts, do_sample=True, temperature=0, **kw), greedy)


def test_hooks_fire_at_every_step_with_the_iteration_in_their_names():
    model = tiny_model("huginn")
    prompts = random_prompts(model, n=2, length=5)
    seen = []
    hook = lambda x, hook: seen.append((hook.name, tuple(x.shape)))  # noqa: E731
    model.generate(prompts, max_new_tokens=3, n_loops=4, initial_state="zeros",
                   fwd_hooks=[(lambda n: n.endswith("hook_state_post"), hook)], **QUIET)
    assert [n for n, _ in seen] == [f"iter.{t}.hook_state_post" for _ in range(3) for t in range(4)]
    assert [s for _, s in seen[::4]] == [(2, 5, 32), (2, 1, 32), (2, 1, 32)]
    assert not any(len(h) for h in [model.hook_dict[n]._forward_hooks for n in model.hook_dict])
    patterns = []
    with model.hooks(fwd_hooks=[("iter.1.blocks.0.attn.hook_pattern", lambda x, hook: patterns.append(x.shape))]):
        model.generate(prompts, max_new_tokens=2, n_loops=4, initial_state="zeros", **QUIET)
    assert patterns == [torch.Size([2, 4, 5, 5]), torch.Size([2, 4, 1, 6])]


def test_a_hook_that_edits_the_loop_changes_what_is_generated():
    model = tiny_model("olmo2")
    prompts = random_prompts(model)
    plain = model.generate(prompts, max_new_tokens=4, return_type="tokens", **QUIET)
    ablated = model.generate(prompts, max_new_tokens=4, return_type="tokens",
                             fwd_hooks=[("iter.2.hook_state_post", lambda x, hook: torch.zeros_like(x))], **QUIET)
    assert not torch.equal(plain, ablated)


def test_adaptive_runs_fire_only_the_iterations_each_step_ran():
    model = tiny_model("olmo2")
    prompts = random_prompts(model, n=1)
    fired = []
    result = model.generate(prompts, max_new_tokens=5, n_loops=8, adaptive="kl", threshold=1e-2, return_type="result",
                            fwd_hooks=[(lambda n: n.endswith("hook_state_post"), lambda x, hook: fired.append(hook.name))], **QUIET)
    assert len(fired) == int(result.iterations.sum())


def test_generation_stops_at_eos_and_pads_finished_rows(zoo_models):
    model = zoo_models["khop-huginn"]
    prompts = khop_prompts(2, seed=5)
    free = model.generate(prompts, max_new_tokens=6, seed=0, return_type="result", **QUIET)
    eos = int(free.generated[0, 1])
    out = model.generate(prompts, max_new_tokens=6, seed=0, eos_token_id=eos, return_type="result", verbose=False)
    stop0 = (free.generated[0] == eos).nonzero()[0].item()
    assert torch.equal(out.generated[0, : stop0 + 1], free.generated[0, : stop0 + 1])
    assert (out.generated[0, stop0:] == eos).all()
    assert (out.iterations[0, stop0 + 1:] == 0).all() and (out.iterations[0, : stop0 + 1] > 0).all()
    hits = (free.generated == eos).any(1)
    assert out.generated.shape[1] == (6 if not hits.all() else int((free.generated == eos).int().argmax(1).max()) + 1)
    with pytest.warns(UserWarning, match="no end-of-sequence id"):
        unstopped = model.generate(prompts, max_new_tokens=6, seed=0, return_type="tokens", verbose=False)
    assert torch.equal(unstopped, free.tokens)


def test_return_types_and_the_result_object(zoo_models):
    model = zoo_models["khop-huginn"]
    text = "a b | a 1 ="
    assert isinstance(model.generate(text, max_new_tokens=2, seed=0, **QUIET), str)
    tokens = model.generate(text, max_new_tokens=2, seed=0, return_type="tokens", **QUIET)
    assert tokens.shape == (1, len(model.to_tokens(text)[0]) + 2)
    assert model.generate(model.to_tokens(text), max_new_tokens=2, seed=0, return_type="str", **QUIET) == [
        model.generate(text, max_new_tokens=2, seed=0, **QUIET)]
    r = model.generate(khop_prompts(2), max_new_tokens=4, adaptive="kl", threshold=1e-2, seed=0, return_type="result", **QUIET)
    assert isinstance(r, GenerationResult) and r.iterations.shape == (2, 4) and len(r.text) == 2
    frame = r.to_frame()
    assert list(frame.columns) == ["batch", "step", "token", "token_str", "iterations"] and len(frame) == 8
    assert frame["iterations"].tolist() == r.iterations.reshape(-1).tolist()
    assert r.mean_iterations == pytest.approx(r.iterations.float().mean().item())
    fig = r.plot()
    assert sum(len(trace.y) for trace in fig.data) == 8 and "adaptive=kl" in fig.layout.title.text
    prompts = khop_prompts(2)
    assert torch.equal(model.generate(prompts, max_new_tokens=0, return_type="tokens", **QUIET), prompts)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(text, attention_mask=torch.ones(1, 3), **QUIET)


BAD = [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(n_loops=0), "n_loops"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(return_type="logits"), "return_type"),
    (dict(initial_state="random"), "initial_state"),
    (dict(adaptive="cosine"), "adaptive"),
    (dict(adaptive="gate"), "exit gate"),
    (dict(threshold=0.1), "threshold"),
    (dict(adaptive="argmax", threshold=1.5), "threshold"),
    (dict(adaptive="kl", threshold=-1.0), "threshold"),
    (dict(seed="x"), "seed"),
    (dict(eos_token_id=10_000, stop_at_eos=True), "eos_token_id"),
    (dict(attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1]] * 2)), "attention_mask"),
    (dict(return_type="str"), "tokenizer"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_arguments_are_refused_naming_them(kwargs, message):
    model = tiny_model("pre")
    args = {"verbose": False, "stop_at_eos": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(random_prompts(model), **args)


def test_learned_positions_refuse_running_past_the_context():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(random_prompts(model, length=60), max_new_tokens=10, **QUIET)


def test_cli_generate_prints_iterations_per_token(capsys):
    args = ["generate", "zoo:khop-huginn", "--prompt", "a b b c | a 2 =", "--adaptive", "kl", "--threshold", "0.01",
            "--max-new-tokens", "3", "--quiet", "--json"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["iterations"]) == 3 and all(1 <= i <= 6 for i in out["iterations"]) and out["adaptive"] == "kl"
    assert cli.main(args[:-1]) == 0
    assert "mean iterations per token" in capsys.readouterr().out
    assert cli.main(["generate", "zoo:khop-huginn", "--prompt", "a b | a 1 =", "--adaptive", "argmax", "--threshold", "2",
                     "--max-new-tokens", "2", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 2
    assert cli.main(["generate", "zoo:khop-huginn", "--prompt", "a", "--adaptive", "gate", "--quiet"]) == 1
    assert "exit gate" in capsys.readouterr().err
