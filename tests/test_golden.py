"""Adapters reproduce the outputs the families' own reference code computed (shared/golden).

Tolerances from looped-architectures.md: fp32, max abs difference <= 1e-4 on logits and <= 1e-5
relative (to the tensor's largest magnitude) on hidden states.

Each fixture's tensors are declared below, and every declared tensor is compared: a fixture that
lacks one, or holds one nobody compares, fails instead of being passed over.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import golden
from safetensors.torch import load_file

import loop_lens as ll
from loop_lens.analysis.lens import coda_lens, logit_lens_of_states

RAVEN_LOOPS = (1, 2, 4, 8)
RAVEN_STEPS = {f"{kind}_steps_{T}" for kind in ("logits", "latent_states") for T in RAVEN_LOOPS}
FIXTURES = {  # name: (family, layout, inputs, the reference tensors compared)
    "ouro-tiny": ("ouro", "(0, 3 x 4, 0)", {"input_ids"}, {
        "layer_outputs", "step_hidden_normed", "attention_patterns", "gate_logits", "step_logits",
        "default_logits", "weighted_exit_logits",
    }),
    "huginn-tiny": ("huginn", "(1, 2 x 4, 1)", {"input_ids", "initial_state"}, {
        *RAVEN_STEPS, "core_layer_outputs", "adapter_outputs", "prelude_outputs", "coda_outputs",
        "logit_lens_per_step", "coda_lens_per_step",
    }),
    "retro-llama-tiny": ("retro-llama", "(1, 2 x 4, 1)", {"input_ids", "initial_state"}, {
        *RAVEN_STEPS, "core_layer_outputs", "adapter_outputs",
    }),
}
CHECKS = [(name, key) for name, (_, _, _, keys) in FIXTURES.items() for key in sorted(keys)]


def assert_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Max abs difference <= 1e-4."""
    assert actual.shape == expected.shape
    assert (actual.float() - expected).abs().max().item() <= 1e-4


def assert_hidden(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Max abs difference <= 1e-5 of the expected tensor's largest magnitude."""
    assert actual.shape == expected.shape
    rel = (actual.float() - expected).abs().max() / expected.abs().max()
    assert rel.item() <= 1e-5, rel.item()


@functools.cache
def fixture(name: str) -> tuple[ll.HookedLoopedTransformer, dict[str, torch.Tensor]]:
    """The loaded model and the reference tensors of a golden fixture (loaded once)."""
    path = golden(name)
    return ll.load(path), load_file(str(path / "expected.safetensors"))


def ouro_outputs(model: ll.HookedLoopedTransformer, e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours, under the reference tensors' names: every step's tensors, each exit, the default call."""
    ids, T = e["input_ids"], 4
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, n_loops=T)
        return {
            "layer_outputs": cache.stack("hook_resid_post"),
            "step_hidden_normed": cache.stack("hook_state_post"),
            "attention_patterns": cache.stack("attn.hook_pattern"),
            "gate_logits": cache.stack("hook_exit_logit"),
            "step_logits": torch.stack([model(ids, n_loops=T, exit=t) for t in range(T)]),
            "default_logits": model(ids),  # the checkpoint's own default: threshold exit, config loop count
            "weighted_exit_logits": model(ids, n_loops=T, exit="weighted"),
        }


def raven_outputs(model: ll.HookedLoopedTransformer, e: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours, under the reference tensors' names, from the fixture's explicit initial state."""
    ids, s0 = e["input_ids"], e["initial_state"]
    out = {}
    with torch.no_grad():
        for T in RAVEN_LOOPS:
            logits, cache = model.run_with_cache(ids, n_loops=T, initial_state=s0)
            assert torch.equal(cache["iter.0.hook_state_pre"], s0)
            out[f"logits_steps_{T}"], out[f"latent_states_steps_{T}"] = logits, cache["hook_latent"]
        cfg = model.cfg
        # `cache` now holds the longest run, the one the reference's per-step tensors come from
        out["core_layer_outputs"] = cache.stack("hook_resid_post")
        out["adapter_outputs"] = cache.stack("hook_injected")
        out["prelude_outputs"] = torch.stack([cache[f"prelude.{i}.hook_resid_post"] for i in range(cfg.n_prelude)])
        out["coda_outputs"] = torch.stack([cache[f"coda.{i}.hook_resid_post"] for i in range(cfg.n_coda)])
        out["logit_lens_per_step"] = logit_lens_of_states(model, cache).logits
        out["coda_lens_per_step"] = coda_lens(model, cache).logits
    return out


@functools.cache
def outputs(name: str) -> dict[str, torch.Tensor]:
    """Our tensors for every reference tensor a fixture of this family can hold."""
    model, e = fixture(name)
    return (ouro_outputs if FIXTURES[name][0] == "ouro" else raven_outputs)(model, e)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_holds_exactly_the_declared_tensors(name):
    _, e = fixture(name)
    _, _, inputs, compared = FIXTURES[name]
    assert set(e) == inputs | compared
    shapes = json.loads((golden(name) / "expected.json").read_text())["shapes"]
    assert {k: list(v.shape) for k, v in e.items()} == shapes


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_family_and_layout_are_detected(name):
    model, _ = fixture(name)
    family, layout, _, _ = FIXTURES[name]
    assert (model.cfg.family, model.cfg.layout) == (family, layout)


def test_ouro_switches_are_detected():
    model, _ = fixture("ouro-tiny")
    assert model.cfg.iter_norm and model.cfg.exit_gate and not model.cfg.final_norm


@pytest.mark.parametrize("name, key", CHECKS, ids=[f"{n}-{k}" for n, k in CHECKS])
def test_matches_reference(name, key):
    _, e = fixture(name)
    actual = outputs(name)[key]
    (assert_logits if "logits" in key or "lens" in key else assert_hidden)(actual, e[key])


def test_ouro_threshold_exit_is_the_reference_default():
    model, e = fixture("ouro-tiny")
    with torch.no_grad():
        assert_logits(model(e["input_ids"], n_loops=4, exit="threshold"), e["default_logits"])
