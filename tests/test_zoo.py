"""The zoo: the training script stays honest, and the shipped weights do what their cards say."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import loop_lens as ll
from loop_lens import zoo
from loop_lens.families.dory import HookedDoryTransformer
from loop_lens.families.hrm import HookedHrmTransformer, NestedLoopCache
from loop_lens.zoo import docs as zoo_docs
from loop_lens.zoo import make_random
from loop_lens.zoo.task import ANSWER_FROM, QUERIES, SEQ_LEN, answers_after, follow, sample
from loop_lens.zoo.train import KHOP_DORY_FIELDS, RECIPES, Curriculum, Recipe, evaluate, lr_factor, reevaluate, train

TRAINED = ["khop-huginn", "khop-ouro", "khop-ff", "khop-hrm", "khop-dory"]
README_PROMPT = "b f e j i c f a j i h d a e c g d b g h | f 2 ="  # README.md and docs/getting-started.md


@pytest.fixture(autouse=True)
def one_thread():
    """Run torch on one thread, as the zoo's models were trained (`train --threads 1`): tiny models
    gain nothing from a second thread, and on a busy machine two threads waiting on each other are
    several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_task_answers_follow_the_pointers():
    batch = sample(32, range(1, 8), torch.Generator().manual_seed(3))
    assert batch.tokens.shape == (32, SEQ_LEN) and batch.answers.shape == (32, QUERIES)
    for i in range(32):
        words = batch.text(i).split()
        pairs = " ".join(words[:20])
        for q in range(QUERIES):
            _, start, k, eq, answer = words[20 + 5 * q : 25 + 5 * q]
            assert eq == "=" and follow(pairs, start, int(k)) == answer


def test_answers_after_reads_the_pointers_from_the_prompt():
    for k in (1, 3, 6):
        batch = sample(16, [k], torch.Generator().manual_seed(k))
        assert torch.equal(answers_after(batch.tokens, k), batch.answers)
        assert not (answers_after(batch.tokens, k - 1) == batch.answers).any()  # a 10-cycle: k-1 hops never land there
    batch = sample(4, [2], torch.Generator().manual_seed(0))
    assert torch.equal(answers_after(batch.tokens, 0), batch.tokens[:, [a - 2 for a in ANSWER_FROM]])


def test_train_and_heldout_cycles_never_overlap():
    g = torch.Generator().manual_seed(0)
    pairs = lambda b: {" ".join(sorted(b.text(i).split()[:20][j] + b.text(i).split()[:20][j + 1] for j in range(0, 20, 2))) for i in range(len(b.tokens))}  # noqa: E731
    assert not pairs(sample(500, [1], g)) & pairs(sample(500, [1], g, split="heldout"))


def test_curriculum_adds_hops_then_opens_all_loops():
    c = Curriculum([1, 2], loops=[2, 3, 4, 5, 6], threshold=0.9, decay=0.5)
    assert (c.current, c.current_loops) == ([1], [2, 3])
    c.update(10, 0.95)  # running accuracy 0.475: stays
    assert c.level == 1
    c.update(11, 1.0)  # 0.7375
    c.update(12, 1.0)  # 0.86875
    c.update(13, 1.0)  # 0.934: next stage
    assert (c.current, c.current_loops, c.acc) == ([1, 2], [2, 3, 4], 0.0)
    for step in range(14, 20):
        c.update(step, 1.0)
    assert (c.current, c.current_loops, c.log) == ([1, 2], [2, 3, 4, 5, 6], [(13, 2), (17, 3)])  # 0.5, 0.75, 0.875, 0.9375
    fixed = Curriculum([1, 2, 3], loops=[4])  # a fixed loop count is used from the start, with no extra stage
    assert fixed.current_loops == [4] and len(fixed.stages) == 3


def test_learning_rate_schedule_warms_up_holds_and_decays():
    recipe = Recipe(cfg=RECIPES["khop-ff"].cfg, train_hops=[1], loops=[1], steps=100, description="", warmup=10, decay=0.2)
    f = [lr_factor(recipe, s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[80] == 1.0
    assert f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_training_script_runs_a_miniature_deterministically(name, tmp_path):
    card = train(name, tmp_path / "a", steps=3, quiet=True, eval_n=8)
    again = train(name, tmp_path / "b", steps=3, quiet=True, eval_n=8)
    assert card["steps"] == 3 and card["heldout_accuracy"] == again["heldout_accuracy"]
    w1, w2 = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert reevaluate(name, tmp_path / "a", quiet=True)["heldout_accuracy"] != {}
    model = ll.load(tmp_path / "a")
    assert model.cfg.layout == RECIPES[name].cfg.layout and model.to_str_tokens("a b | a 1 =")[1:3] == ["a", "b"]


def test_zoo_lists_the_shipped_models_with_cards():
    names = {card["name"] for card in zoo.list()}
    assert set(TRAINED) <= names
    for name in TRAINED:
        card = zoo.card(name)
        for key in ("layout", "command", "seed", "steps", "wall_time_s", "heldout_accuracy"):
            assert key in card, (name, key)
        assert (zoo.zoo_path(name) / "model.safetensors").stat().st_size <= 2 * 2**20


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_weights_reach_the_accuracy_on_their_card(name):
    card = zoo.card(name)
    model = ll.load(f"zoo:{name}")
    T = model.cfg.default_loops
    got = evaluate(model, card["train_hops"], [T], n=card["eval_prompts"], seed=card["eval_seed"])  # the card's own held-out set
    for k in card["train_hops"]:
        assert abs(got[f"k={k},T={T}"] - card["heldout_accuracy"][f"k={k},T={T}"]) <= 0.01, (k, got)


def test_khop_huginn_answers_from_text():
    """Prompts given as text are tokenized back to the task's tokens and answered right: the answer
    at every question is the letter `answers_after` reaches by following the prompt's own pointers."""
    model = ll.load("zoo:khop-huginn")
    batch = sample(64, [2], torch.Generator().manual_seed(5), split="heldout")
    tokens = torch.cat([model.to_tokens(batch.text(i)) for i in range(len(batch.tokens))])
    assert torch.equal(tokens, batch.tokens)
    right = answers_after(tokens, 2)
    assert torch.equal(right, batch.answers)
    pred = model(tokens, seed=0)[:, ANSWER_FROM].argmax(-1)  # [prompt, question]
    assert ((pred == right).float().mean(0) >= 0.95).all(), (pred == right).float().mean(0)


def test_khop_huginn_answers_the_readme_prompt_with_two_loops_and_misses_with_one():
    """The README's example: two hops from f (f -> a -> e) answer `e` with 2 or more loops; with one
    loop the model answers `c`, as the README says."""
    words = README_PROMPT.split()
    start, hops = words[21], int(words[22])
    right = follow(" ".join(words[:20]), start, hops)  # the pointers followed by hand, not by the model
    assert right == "e"
    model = ll.load("zoo:khop-huginn")
    tokens = model.to_tokens(README_PROMPT)
    assert model.to_str_tokens(tokens)[-4:] == ["|", start, str(hops), "="]
    answer = {T: model.to_str_tokens(model(tokens, n_loops=T, seed=0)[0, -1].argmax(-1, keepdim=True))[0] for T in (1, 2, 3, 4, 6, 8, 12)}
    assert {T: a for T, a in answer.items() if T >= 2} == dict.fromkeys((2, 3, 4, 6, 8, 12), right), answer
    assert answer[1] != right and answer[1] == "c", answer


def test_khop_huginn_needs_a_second_loop_for_two_hops_and_stops_after_two():
    """The behaviours docs/zoo.md describes, measured again: 2-hop questions need T >= 2, and on
    3-hop questions (never trained) the model lands on the 2-hop letter."""
    model = ll.load("zoo:khop-huginn")
    two = sample(256, [2], torch.Generator().manual_seed(11), split="heldout")
    acc = {T: (model(two.tokens, n_loops=T, seed=0)[:, ANSWER_FROM[0]].argmax(-1) == two.answers[:, 0]).float().mean().item() for T in (1, 2, 8)}
    assert acc[1] < 0.5 and acc[2] > 0.9 and acc[8] > 0.9, acc
    three = sample(256, [3], torch.Generator().manual_seed(12), split="heldout")
    pred = model(three.tokens, n_loops=8, seed=0)[:, ANSWER_FROM[0]].argmax(-1)
    assert (pred == answers_after(three.tokens, 2)[:, 0]).float().mean() > 0.9


def test_khop_hrm_is_a_nested_hrm_text_model_that_round_trips(tmp_path):
    """zoo:khop-hrm loads as a HookedHrmTransformer with its recipe's HRM-Text config (the
    adapter's constraints: parameterless norms, gated attention, additive z_H + z_L, no final norm),
    a frozen zero z_L start vector, and saves and loads back to the same logits."""
    model = ll.load("zoo:khop-hrm")
    assert type(model) is HookedHrmTransformer and model.cfg == RECIPES["khop-hrm"].cfg
    cfg = model.cfg
    assert (cfg.family, cfg.l_cycles, cfg.n_block, cfg.n_prelude, cfg.n_coda) == ("hrm_text", 2, 1, 0, 0)
    assert cfg.attn_gate and not cfg.norm_weight and not cfg.final_norm and cfg.injection == "additive"
    assert not model.z_l_init.requires_grad and not model.z_l_init.any()
    assert len(model.blocks) == len(model.low_blocks) == 1
    tokens = sample(8, [1, 2], torch.Generator().manual_seed(2), split="heldout").tokens
    model.save(tmp_path / "copy")
    again = ll.load(tmp_path / "copy")
    assert type(again) is HookedHrmTransformer and torch.equal(again(tokens), model(tokens))


def test_khop_hrm_answers_from_text():
    """Prompts given as text are answered right at the default 3 H cycles, for 1 and 2 hops, at
    every question: the right answer is the letter `answers_after` reaches by following the
    prompt's own pointers (chance is about 1/9)."""
    model = ll.load("zoo:khop-hrm")
    assert model.cfg.default_loops == 3
    for k in (1, 2):
        batch = sample(64, [k], torch.Generator().manual_seed(5), split="heldout")
        tokens = torch.cat([model.to_tokens(batch.text(i)) for i in range(len(batch.tokens))])
        assert torch.equal(tokens, batch.tokens)
        right = answers_after(tokens, k)
        assert torch.equal(right, batch.answers)
        pred = model(tokens)[:, ANSWER_FROM].argmax(-1)  # [prompt, question]
        assert ((pred == right).float().mean(0) >= 0.95).all(), (k, (pred == right).float().mean(0))


def test_khop_hrm_needs_three_h_cycles_for_two_hops_with_its_two_l_cycles():
    """2-hop questions: near chance with one H cycle, right with 3 or more; at 3 H cycles the two
    L cycles per H cycle it was trained with answer right, one or three do not; 3-hop questions
    (never trained) land on the 1-hop letter."""
    model = ll.load("zoo:khop-hrm")
    two = sample(256, [2], torch.Generator().manual_seed(11), split="heldout")

    def acc(T, L=None):
        pred = model(two.tokens, n_loops=T, l_cycles=L)[:, ANSWER_FROM[0]].argmax(-1)
        return (pred == answers_after(two.tokens, 2)[:, 0]).float().mean().item()

    by_h = {T: acc(T) for T in (1, 3, 4, 6)}
    assert by_h[1] < 0.3 and min(by_h[3], by_h[4], by_h[6]) > 0.95, by_h
    by_l = {L: acc(3, L) for L in (1, 2, 3)}
    assert by_l[2] > 0.95 and by_l[1] < 0.9 and by_l[3] < 0.9, by_l
    three = sample(256, [3], torch.Generator().manual_seed(12), split="heldout")
    pred = model(three.tokens)[:, ANSWER_FROM[0]].argmax(-1)
    assert (pred == answers_after(three.tokens, 1)[:, 0]).float().mean() > 0.9


def test_khop_hrm_cache_reads_every_cycle_and_the_logits_from_the_last_z_h():
    """run_with_cache on the zoo model: a NestedLoopCache with the L state of every L cycle and the
    H state of every H cycle; the logits are the unembedding of the last H state (no final norm)."""
    model = ll.load("zoo:khop-hrm")
    tokens = sample(4, [2], torch.Generator().manual_seed(3), split="heldout").tokens
    logits, cache = model.run_with_cache(tokens)
    assert isinstance(cache, NestedLoopCache)
    posts = [n for n in cache.keys() if n.endswith("hook_state_post")]
    assert posts == [f"iter.{h}.{part}hook_state_post" for h in range(3) for part in ("low.0.", "low.1.", "")]
    torch.testing.assert_close(model.unembed(cache["iter.2.hook_state_post"]), logits)


def _dory_module_name(ours: str, cfg) -> str:
    """transformers' DoryForCausalLM parameter name of one of our Dory parameters."""
    if ours == "embed.weight":
        return "model.embed_tokens.weight"
    if ours.startswith("unembed."):
        return "lm_head." + ours.split(".", 1)[1]
    stack, layer, rest = ours.split(".", 2)
    first = {"prelude_blocks": 0, "blocks": cfg.n_prelude, "coda_blocks": cfg.n_prelude + cfg.n_block}[stack]
    return f"model.layers.{first + int(layer)}." + rest.replace("attn.", "self_attn.", 1)


def test_khop_dory_runs_in_transformers_dory_to_the_same_logits():
    """zoo:khop-dory is a Dory checkpoint: a HookedDoryTransformer whose config is what
    `DoryConfig(**KHOP_DORY_FIELDS)` maps to, and transformers' own DoryForCausalLM of that config,
    given the zoo weights, computes the same logits at the default 3 loops and at 1, 2 and 6."""
    transformers = pytest.importorskip("transformers", minversion="5.25")
    model = ll.load("zoo:khop-dory")
    assert type(model) is HookedDoryTransformer and model.cfg == RECIPES["khop-dory"].cfg
    assert (model.cfg.n_prelude, model.cfg.n_block, model.cfg.n_coda, model.cfg.default_loops) == (1, 2, 1, 3)
    fields = {k: v for k, v in KHOP_DORY_FIELDS.items() if k not in ("model_type", "_name_or_path")}
    hf = transformers.DoryForCausalLM(transformers.DoryConfig(**fields)).eval()
    state = {_dory_module_name(name, model.cfg): p.detach() for name, p in model.named_parameters()}
    assert set(state) == set(hf.state_dict())
    hf.load_state_dict(state, strict=True)
    for layer in model.blocks:  # the trained scales moved off their init: each is read
        assert not torch.allclose(layer.lambda_1, torch.full_like(layer.lambda_1, 0.02))
        assert not torch.allclose(layer.attn.sqk, torch.full_like(layer.attn.sqk, 0.02))
    tokens = sample(8, [1, 2], torch.Generator().manual_seed(4), split="heldout").tokens
    with torch.no_grad():
        for T in (None, 1, 2, 6):
            hf.config.n_recurrent_loops = T or 3
            want = hf(tokens, use_cache=False).logits
            torch.testing.assert_close(model(tokens, n_loops=T), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


MIN_DORY_ACCURACY = 0.95  # 1 hop at the default 3 loops; the card records 1.000 (2 hops were not learned: 0.14)


def test_khop_dory_answers_from_text():
    """Prompts given as text are answered right at the default 3 loops for 1 hop, at every question
    (chance is about 1/9): the right answer is the letter `answers_after` reaches by following the
    prompt's own pointers. (khop-dory did not learn 2 hops within its 20-minute budget: its card
    says so, and the held-out check above holds it to the card's figures.)"""
    model = ll.load("zoo:khop-dory")
    for k in (1,):
        batch = sample(64, [k], torch.Generator().manual_seed(5), split="heldout")
        tokens = torch.cat([model.to_tokens(batch.text(i)) for i in range(len(batch.tokens))])
        assert torch.equal(tokens, batch.tokens)
        right = answers_after(tokens, k)
        assert torch.equal(right, batch.answers)
        pred = model(tokens)[:, ANSWER_FROM].argmax(-1)  # [prompt, question]
        assert ((pred == right).float().mean(0) >= MIN_DORY_ACCURACY).all(), (k, (pred == right).float().mean(0))


def package_files() -> dict:
    """Every file of the package source tree (bytecode caches aside) with its modification time."""
    return {p: p.stat().st_mtime_ns for p in (ROOT / "loop_lens").rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_zoo_writers_write_where_asked_and_never_into_the_package(tmp_path):
    """`zoo.docs` and `zoo.make_random` need `--out`; run, they reproduce docs/zoo.md and the shipped
    tiny-random model (weights bit for bit, config, card, tokenization), and leave the package's
    own files untouched."""
    for main in (zoo_docs.main, make_random.main):
        with pytest.raises(SystemExit):
            main([])  # no default output path
    before = package_files()
    page = zoo_docs.main(["--out", str(tmp_path / "zoo.md")])
    assert page.read_text() == (ROOT / "docs" / "zoo.md").read_text()
    made, shipped = make_random.main(["--out", str(tmp_path / "tiny-random")]), zoo.zoo_path("tiny-random")
    new, old = load_file(str(made / "model.safetensors")), load_file(str(shipped / "model.safetensors"))
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    assert json.loads((made / "card.json").read_text()) == zoo.card("tiny-random")
    remade, model = ll.load(made), ll.load("zoo:tiny-random")
    assert remade.cfg == model.cfg
    texts = [README_PROMPT, *(sample(1, range(1, 10), torch.Generator().manual_seed(i)).text(0) for i in range(8))]
    assert all(torch.equal(remade.to_tokens(t), model.to_tokens(t)) for t in texts)
    assert package_files() == before
