"""Adapters reproduce the outputs the families' own reference code computed (shared/golden).

Tolerances from looped-architectures.md: fp32, max abs difference <= 1e-4 on logits and <= 1e-5
relative (to the tensor's largest magnitude) on hidden states.
"""

from __future__ import annotations

import pytest
import torch
from conftest import golden
from safetensors.torch import load_file

import loop_lens as ll


def assert_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual.float() - expected).abs().max().item() <= 1e-4


def assert_hidden(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    rel = (actual.float() - expected).abs().max() / expected.abs().max()
    assert rel.item() <= 1e-5, rel.item()


@pytest.fixture(scope="module")
def ouro():
    path = golden("ouro-tiny")
    return ll.load(path), load_file(str(path / "expected.safetensors"))


def test_ouro_is_detected_with_its_layout(ouro):
    model, _ = ouro
    assert model.cfg.family == "ouro" and model.cfg.layout == "(0, 3 x 4, 0)"
    assert model.cfg.iter_norm and model.cfg.exit_gate and not model.cfg.final_norm


def test_ouro_per_iteration_tensors_match_reference(ouro):
    model, e = ouro
    with torch.no_grad():
        logits, cache = model.run_with_cache(e["input_ids"], n_loops=4)
    assert_hidden(cache.stack("hook_resid_post"), e["layer_outputs"])
    assert_hidden(cache.stack("hook_state_post"), e["step_hidden_normed"])
    assert_hidden(cache.stack("attn.hook_pattern"), e["attention_patterns"])
    assert_logits(cache.stack("hook_exit_logit"), e["gate_logits"])
    assert_logits(logits, e["default_logits"])


def test_ouro_exit_logits_match_reference(ouro):
    model, e = ouro
    ids = e["input_ids"]
    with torch.no_grad():
        steps = torch.stack([model(ids, n_loops=4, exit=t) for t in range(4)])
        assert_logits(steps, e["step_logits"])
        assert_logits(model(ids, n_loops=4, exit="weighted"), e["weighted_exit_logits"])
        assert_logits(model(ids, n_loops=4, exit="threshold"), e["default_logits"])


@pytest.mark.parametrize("name, family", [("huginn-tiny", "huginn"), ("retro-llama-tiny", "retro-llama")])
def test_raven_layout_models_match_reference_for_every_loop_count(name, family):
    path = golden(name)
    e = load_file(str(path / "expected.safetensors"))
    model = ll.load(path)
    assert model.cfg.family == family and model.cfg.layout == "(1, 2 x 4, 1)"
    ids, s0 = e["input_ids"], e["initial_state"]
    with torch.no_grad():
        for T in (1, 2, 4, 8):
            logits, cache = model.run_with_cache(ids, n_loops=T, initial_state=s0)
            assert_logits(logits, e[f"logits_steps_{T}"])
            assert_hidden(cache["hook_latent"], e[f"latent_states_steps_{T}"])
            assert torch.equal(cache["iter.0.hook_state_pre"], s0)
        assert_hidden(cache.stack("hook_resid_post"), e["core_layer_outputs"])
        assert_hidden(cache.stack("hook_injected"), e["adapter_outputs"])
        if "prelude_outputs" in e:
            prelude = torch.stack([cache[f"prelude.{i}.hook_resid_post"] for i in range(model.cfg.n_prelude)])
            coda = torch.stack([cache[f"coda.{i}.hook_resid_post"] for i in range(model.cfg.n_coda)])
            assert_hidden(prelude, e["prelude_outputs"])
            assert_hidden(coda, e["coda_outputs"])


def test_huginn_logit_and_coda_lens_match_reference():
    from loop_lens.analysis.lens import coda_lens, logit_lens_of_states

    path = golden("huginn-tiny")
    e = load_file(str(path / "expected.safetensors"))
    model = ll.load(path)
    with torch.no_grad():
        _, cache = model.run_with_cache(e["input_ids"], n_loops=8, initial_state=e["initial_state"])
        assert_logits(logit_lens_of_states(model, cache), e["logit_lens_per_step"])
        assert_logits(coda_lens(model, cache), e["coda_lens_per_step"])
