"""The zoo: the training script stays honest, and the shipped weights do what their cards say."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import loop_lens as ll
from loop_lens import zoo
from loop_lens.zoo.task import ANSWER_FROM, QUERIES, SEQ_LEN, follow, sample
from loop_lens.zoo.train import RECIPES, evaluate, train

TRAINED = ["khop-huginn", "khop-ouro", "khop-ff"]


def test_task_answers_follow_the_pointers():
    batch = sample(32, range(1, 8), torch.Generator().manual_seed(3))
    assert batch.tokens.shape == (32, SEQ_LEN) and batch.answers.shape == (32, QUERIES)
    for i in range(32):
        words = batch.text(i).split()
        pairs = " ".join(words[:20])
        for q in range(QUERIES):
            _, start, k, eq, answer = words[20 + 5 * q : 25 + 5 * q]
            assert eq == "=" and follow(pairs, start, int(k)) == answer


def test_train_and_heldout_cycles_never_overlap():
    g = torch.Generator().manual_seed(0)
    pairs = lambda b: {" ".join(sorted(b.text(i).split()[:20][j] + b.text(i).split()[:20][j + 1] for j in range(0, 20, 2))) for i in range(len(b.tokens))}  # noqa: E731
    assert not pairs(sample(500, [1], g)) & pairs(sample(500, [1], g, split="heldout"))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_training_script_runs_a_miniature_deterministically(name, tmp_path):
    card = train(name, steps=3, out=tmp_path / "a", quiet=True, eval_n=8)
    again = train(name, steps=3, out=tmp_path / "b", quiet=True, eval_n=8)
    assert card["steps"] == 3 and card["heldout_accuracy"] == again["heldout_accuracy"]
    w1, w2 = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
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
    model = ll.load("zoo:khop-huginn")
    batch = sample(1, [2], torch.Generator().manual_seed(5), split="heldout")
    text = batch.text(0)
    tokens = model.to_tokens(text)
    assert torch.equal(tokens[0], batch.tokens[0])
    pred = model(tokens, seed=0)[0, ANSWER_FROM].argmax(-1)
    assert pred.shape == (QUERIES,)
