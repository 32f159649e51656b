"""Parcae: the family module and adapter against the golden fixture (made with the official code)
and against an independent reference forward (`parcae_reference.py`) on random configurations
written in the official on-disk layout.

Tolerances from looped-architectures.md: fp32, max abs difference <= 1e-4 on logits, <= 1e-5
relative (to the tensor's largest magnitude) on hidden states. Random configurations have larger
logits than the fixture, so there the logit bound is 1e-4 * max(1, max |logit|).

Everything goes through the public API: `ll.load(dir)`, `model(tokens)`, `model(tokens, n_loops)`,
`model(tokens, sampled_depths=True)`, `run_with_cache`, `run_with_hooks`.
"""

from __future__ import annotations

import json
import random
import warnings

import parcae_configs as pc
import parcae_reference as ref
import pytest
import torch
from conftest import golden
from safetensors.torch import load_file

import loop_lens as ll
from loop_lens.adapters.parcae import init_scalars, read_parcae_config
from loop_lens.errors import LoadError, UnexpectedTensorsWarning
from loop_lens.families.parcae import HookedParcaeTransformer, draw_initial_state, parcae_config, plain_call_schedule

N_DRAWS = 48


def assert_logits(actual: torch.Tensor, expected: torch.Tensor, scaled: bool = False) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = 1e-4 * (max(1.0, expected.abs().max().item()) if scaled else 1.0)
    diff = (actual.float() - expected).abs().max().item()
    assert diff <= bound, (diff, bound)


def assert_hidden(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rel = ((actual.float() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()
    assert rel <= 1e-5, rel


def run_cached(model, tokens, n_loops=None, **kwargs):
    """Logits and every hook point's activation (a LoopCache) of one run."""
    return model.run_with_cache(tokens, n_loops, **kwargs)


# ---------------------------------------------------------------------------------------------------
# The golden fixture
# ---------------------------------------------------------------------------------------------------

SEED = 777  # torch.manual_seed before each official forward (expected.json: initial_state_draw)


@pytest.fixture(scope="module")
def tiny():
    path = golden("parcae-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnexpectedTensorsWarning)  # every tensor is used or known-unused
        model = ll.load(path)
    description = json.loads((path / "expected.json").read_text())
    return model, load_file(str(path / "expected.safetensors")), description


@pytest.fixture(scope="module")
def tiny_runs(tiny):
    """Cached runs at 1..5 recurrences, each from the official seed."""
    model, exp, _ = tiny
    runs = {}
    for t in range(1, 6):
        torch.manual_seed(SEED)
        runs[t] = run_cached(model, exp["input_ids"], t)
    return runs


COMPARED = set()  # the expected.json tensors compared below; test_every_tensor_compared checks it


def compares(*names):
    COMPARED.update(names)
    return lambda f: f


@compares("input_ids", "initial_state")
def test_fixture_initial_state_draw(tiny, tiny_runs):
    """The like-init draw from the global RNG after manual_seed(777) is the official x_0, and every
    run starts from it (iter.0.hook_state_pre)."""
    model, exp, _ = tiny
    assert exp["input_ids"].dtype == torch.int64
    torch.manual_seed(SEED)
    x0 = draw_initial_state(model.settings, (2, 11, 64), torch.float32, "cpu")
    assert torch.equal(x0, exp["initial_state"])
    for _, cache in tiny_runs.values():
        assert torch.equal(cache["iter.0.hook_state_pre"], exp["initial_state"])


@compares("embeddings", "prelude_layer_outputs", "prelude_output")
def test_fixture_prelude(tiny, tiny_runs):
    _, exp, _ = tiny
    _, cache = tiny_runs[5]
    assert_hidden(cache["hook_embed"], exp["embeddings"])
    for i in range(2):
        assert_hidden(cache[f"prelude.{i}.hook_resid_post"], exp["prelude_layer_outputs"][i])
    assert_hidden(cache["hook_prelude_out"], exp["prelude_output"])


@compares("recurrent_states", "injected_states", "core_layer_outputs")
def test_fixture_every_recurrence(tiny, tiny_runs):
    """States x_0..x_5, injections and every core layer at every recurrence (the 5-step run)."""
    _, exp, _ = tiny
    _, cache = tiny_runs[5]
    for t in range(5):
        assert_hidden(cache[f"iter.{t}.hook_state_pre"], exp["recurrent_states"][t])
        assert_hidden(cache[f"iter.{t}.hook_injected"], exp["injected_states"][t])
        assert_hidden(cache[f"iter.{t}.hook_state_term"] + cache[f"iter.{t}.hook_input_term"], exp["injected_states"][t])
        for j in range(2):
            assert_hidden(cache[f"iter.{t}.blocks.{j}.hook_resid_post"], exp["core_layer_outputs"][t, j])
        assert_hidden(cache[f"iter.{t}.hook_state_post"], exp["recurrent_states"][t + 1])


@compares("projected_states", "coda_layer_outputs", "final_norm_outputs", "logits_by_steps")
def test_fixture_readout_per_count(tiny, tiny_runs):
    """For every count 1..5: C(x_t), the coda layers, ln_f (its hook sits before the weight), logits."""
    model, exp, _ = tiny
    for t, (logits, cache) in tiny_runs.items():
        assert_hidden(cache["hook_latent"], exp["projected_states"][t - 1])
        for i in range(2):
            assert_hidden(cache[f"coda.{i}.hook_resid_post"], exp["coda_layer_outputs"][t - 1, i])
        assert_hidden(cache["ln_final.hook_normalized"] * model.ln_final.weight, exp["final_norm_outputs"][t - 1])
        assert_logits(logits, exp["logits_by_steps"][t - 1])


@compares("logits_default", "logits_steps_1", "logits_steps_5")
def test_fixture_default_and_unhooked(tiny):
    """model(tokens) runs mean_recurrence (4); unhooked runs (SDPA) equal the cached ones."""
    model, exp, _ = tiny
    assert model.settings.mean_recurrence == 4
    for n_loops, key in ((None, "logits_default"), (1, "logits_steps_1"), (5, "logits_steps_5")):
        torch.manual_seed(SEED)
        assert_logits(model(exp["input_ids"], n_loops), exp[key])


@compares("logits_plain_call", "plain_call_depths")
def test_fixture_plain_call(tiny):
    """sampled_depths=True reproduces the official plain call: per-row Poisson depths [2, 3]."""
    model, exp, _ = tiny
    passes, masks, depths = plain_call_schedule(model.settings, 2, 11)
    assert torch.equal(depths, exp["plain_call_depths"])
    assert passes == 3 and len(masks) == 3
    torch.manual_seed(SEED)
    assert torch.equal(model.sampled_depths(exp["input_ids"]), exp["plain_call_depths"])
    assert_logits(model(exp["input_ids"], sampled_depths=True), exp["logits_plain_call"])
    # the rows really ran different depths: each row equals our own run at its depth
    torch.manual_seed(SEED)
    plain = model(exp["input_ids"], sampled_depths=True)
    for row, t in ((0, 2), (1, 3)):
        torch.manual_seed(SEED)
        assert_logits(plain[row], model(exp["input_ids"], t)[row])


def test_every_tensor_compared(tiny):
    """Every tensor expected.json describes is compared above, and nothing else is claimed."""
    _, exp, description = tiny
    assert set(description["tensors"]) == set(exp) == COMPARED


def test_fixture_value_embedding_usage(tiny):
    """The parity rules give the fixture's value-embedding layers (prelude.1, core_block.1, coda.1)."""
    model, _, description = tiny
    names = {"prelude": "transformer.prelude", "core": "transformer.core_block", "coda": "transformer.coda"}
    sites = model.settings.value_embedding_sites()
    for row in description["value_embedding_usage"]:
        site = next(s for s in model.settings.layer_ids() if f"{names[s[0]]}.{s[1]}" == row["block"])
        assert model.settings.layer_ids()[site] == row["layer_id"]
        assert str(model.settings.value_embedding_index()[site]) == row["value_embeds_key"]
        assert (site in sites) == row["value_embedding_applied"]
        assert model.settings.has_gate(site) == row["ve_gate_present"]


def test_fixture_hooks_change_nothing_and_patterns(tiny):
    """A run with every hook point cached (explicit softmax patterns) equals the unhooked SDPA run;
    patterns are causal distributions; the value-embedding hooks fire on value-embedding layers only."""
    model, exp, _ = tiny
    torch.manual_seed(SEED)
    plain = model(exp["input_ids"], 3)
    torch.manual_seed(SEED)
    logits, cache = run_cached(model, exp["input_ids"], 3)
    assert_logits(logits, plain)
    pattern = cache["iter.2.blocks.0.attn.hook_pattern"]
    assert pattern.shape == (2, 4, 11, 11)
    assert torch.allclose(pattern.sum(-1), torch.ones(2, 4, 11))
    assert pattern.triu(1).abs().max() == 0
    assert cache["iter.2.blocks.1.attn.hook_ve_gate"].shape == (2, 11, 4)
    assert "iter.2.blocks.0.attn.hook_ve" not in cache and "prelude.1.attn.hook_ve" in cache
    assert not any(name.startswith("iter.3.") for name in cache)
    assert set(cache.keys()) == set(model.hook_names(3))  # every listed hook point fires, nothing else


def test_hook_edits_propagate(tiny):
    """A hook that edits the injection's input term changes the run as the formula says: zeroing it
    leaves x_1 = core(x_0 * decay)."""
    model, exp, _ = tiny
    seen = {}
    torch.manual_seed(SEED)
    model.run_with_hooks(exp["input_ids"], 1, fwd_hooks=[
        ("iter.0.hook_input_term", lambda act, hook: torch.zeros_like(act)),
        ("iter.0.hook_injected", lambda act, hook: seen.__setitem__("inj", act.clone())),
    ])
    assert_hidden(seen["inj"], exp["initial_state"] * model.injection.decay())


# ---------------------------------------------------------------------------------------------------
# Random configurations against the reference
# ---------------------------------------------------------------------------------------------------


def _draw(i):
    c = pc.random_config(random.Random(i))
    return c, pc.random_state_dict(c, i)


def _runnable(c, sd) -> bool:
    """Whether the reference (like the official code) can run the config at all."""
    try:
        ids = torch.zeros(1, 2, dtype=torch.long)
        ref.forward(c, sd, ids, 1, torch.zeros(1, 2, c["recurrent_embedding_dimension"]))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("i", range(N_DRAWS))
def test_random_config_matches_reference(tmp_path, i):
    """One random configuration, written in the official layout, loaded by the adapter and run by
    the family: x_0 (the state_init rule from a seed), every prelude, core (every pass) and coda
    layer, the injections, C, and the logits at 1 and mean_recurrence recurrences and of the plain
    call (per-row / per-token sampled depths) equal the reference's. Configurations the official
    code cannot run are refused with a LoadError naming why."""
    c, sd = _draw(i)
    folder = pc.write_checkpoint(tmp_path / "ckpt", c, sd)
    if not _runnable(c, sd):
        with pytest.raises(LoadError, match="value embedding"):
            ll.load(folder)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnexpectedTensorsWarning)
        model = ll.load(folder)
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(0, c["vocab_size"], (2, c["block_size"] - 3), generator=g)
    shape = (*ids.shape, c["recurrent_embedding_dimension"])
    for steps in (1, c["mean_recurrence"], None):
        torch.manual_seed(1000 + i)
        x0 = ref.initial_state(c, shape)
        expected = ref.forward(c, sd, ids, steps, x0)
        torch.manual_seed(1000 + i)
        if steps is None and int(model.sampled_depths(ids).max()) == 0:
            # every row sampled depth 0: the official plain call fails (xk unbound), so do we, by name
            with pytest.raises(ValueError, match="sampled 0 recurrences"):
                model(ids, sampled_depths=True)
            continue
        if steps is None:
            logits, cache = run_cached(model, ids, sampled_depths=True)
            if "depths" in expected:
                assert torch.equal(plain_call_schedule(model.settings, *ids.shape)[2], expected["depths"])
        else:
            logits, cache = run_cached(model, ids, steps)
        assert torch.equal(cache["iter.0.hook_state_pre"], x0)
        assert_logits(logits, expected["logits"], scaled=True)
        assert_hidden(cache["hook_embed"], expected["embeddings"])
        for layer, out in enumerate(expected["prelude"]):
            assert_hidden(cache[f"prelude.{layer}.hook_resid_post"], out)
        assert_hidden(cache["hook_prelude_out"], expected["e"])
        for t in range(len(expected["injected"])):
            assert_hidden(cache[f"iter.{t}.hook_injected"], expected["injected"][t])
            for j in range(c["n_layers_in_recurrent_block"]):
                assert_hidden(cache[f"iter.{t}.blocks.{j}.hook_resid_post"], expected["core"][t, j])
            assert_hidden(cache[f"iter.{t}.hook_state_post"], expected["states"][t + 1])
        assert_hidden(cache["hook_latent"], expected["projected"])
        for layer, out in enumerate(expected["coda"]):
            assert_hidden(cache[f"coda.{layer}.hook_resid_post"], out)


def test_random_draws_cover_the_switches():
    """The draws reach every documented switch value (so the parametrised test above covers them),
    and most of them are runnable."""
    seen: dict[str, set] = {}
    runnable = 0
    for i in range(N_DRAWS):
        c, sd = _draw(i)
        if not _runnable(c, sd):
            continue
        runnable += 1
        s = read_parcae_config({**c, "_class_name": "ParcaeConfig"})
        facts = {
            "norm": s.norm, "mlp": s.mlp, "bias": s.bias, "qk_bias": s.qk_bias, "qk_norm": s.qk_norm,
            "clip": s.clip_qkv is not None, "prelude_norm": s.prelude_norm, "gqa": s.n_kv_heads < s.n_heads,
            "state_width": s.d_state != s.d_model, "state_heads": s.n_state_heads != s.n_heads, "tied": s.tie_embeddings,
            "transposed_head": s.untied_head_transposed, "state_init": s.state_init, "injection": s.injection,
            "rope": s.use_rope, "softcap": s.logit_softcap is not None, "emb_scale": s.emb_scale != 1,
            "logit_scale": s.logit_scale != 1, "method": s.iteration_method, "padded": s.d_vocab != s.vocab_size,
            "ve_core": any(st == "core" for st, _ in s.value_embedding_sites()),
        }
        for k, v in facts.items():
            seen.setdefault(k, set()).add(v)
    assert runnable >= N_DRAWS // 2
    assert seen["state_init"] == {"like-init", "zero", "normal", "embed", "unit"}
    assert seen["injection"] == {"diagonal", "linear", "add"}
    assert seen["norm"] == {"RMSNorm", "LayerNorm"} and seen["mlp"] == {"BaseMLP", "GatedMLP"}
    assert seen["method"] == {"per-batch", "per-sequence", "per-token"}
    assert all(seen[k] == {True, False} for k in seen if k not in ("state_init", "injection", "norm", "mlp", "method")), seen


@pytest.mark.parametrize("rule", ["like-init", "zero", "normal", "embed", "unit"])
def test_initial_state_rules(rule):
    """Each state_init rule draws what the official initialize_state draws from the same RNG state,
    with emb_scale applied to like-init (takase-scaled)."""
    c = {**pc.BASE, "state_init": rule, "init_strategy": "takase-scaled"}
    s = read_parcae_config({**c, "_class_name": "ParcaeConfig"})
    assert s.emb_scale == pytest.approx(8.0)
    torch.manual_seed(5)
    expected = ref.initial_state(c, (2, 3, 64))
    torch.manual_seed(5)
    assert torch.equal(draw_initial_state(s, (2, 3, 64), torch.float32, "cpu"), expected)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(draw_initial_state(s, (2, 3, 64), torch.float32, "cpu", g1),
                       draw_initial_state(s, (2, 3, 64), torch.float32, "cpu", g2))


def test_init_scalars_match_reference():
    for strategy in ("scaled-zero", "takase", "takase-scaled", "llama-by-dim-ls", "mitchell", "wang", "bert"):
        c = {**pc.BASE, "init_strategy": strategy}
        L = c["n_layers_in_prelude"] + c["n_layers_in_coda"] + c["n_layers_in_recurrent_block"] * c["mean_recurrence"]
        assert init_scalars(strategy, c["n_embd"], L) == pytest.approx(ref.scalars(c), rel=1e-12)


def test_model_structure():
    """A state of its own width with its own head count: the core layers, C and the hook shapes
    follow it; the config round-trips through cfg.extra (a native save rebuilds the same model)."""
    s = read_parcae_config({**pc.BASE, "_class_name": "ParcaeConfig", "recurrent_embedding_dimension": 32,
                            "num_key_value_heads": 2, "recurrent_num_attention_heads": 2})
    model = HookedParcaeTransformer(parcae_config(s))
    assert model.C.weight.shape == (64, 32) and model.blocks[0].attn.n_heads == 2
    assert model.exit_gate is None and model.rotary is None
    assert HookedParcaeTransformer(ll.LoopConfig.from_json(model.cfg.to_json())).settings == s
    ids = torch.zeros(1, 3, dtype=torch.long)
    _, cache = model.run_with_cache(ids, 2, names_filter=lambda n: "state" in n or "latent" in n or "input_term" in n)
    assert cache["iter.1.hook_state_post"].shape == (1, 3, 32)
    assert cache["iter.1.hook_input_term"].shape == (1, 3, 32)
    assert cache["hook_latent"].shape == (1, 3, 64)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def _tiny_dir(tmp_path, edit_config=None, edit_state=None):
    c = json.loads(json.dumps(pc.BASE))
    sd = pc.random_state_dict(c, 0)
    if edit_config:
        edit_config(c)
    if edit_state:
        edit_state(sd)
    return pc.write_checkpoint(tmp_path / "bad", c, sd)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(qk_norm="yes"), "'qk_norm'.*true or false"),
    (lambda c: c.update(n_embd=0), "'n_embd'.*integer >= 1"),
    (lambda c: c.update(injection_type="gru"), "'injection_type'.*one of"),
    (lambda c: c.update(state_init="ones"), "'state_init'.*one of"),
    (lambda c: c.update(norm_class_name="GroupNorm"), "'norm_class_name'"),
    (lambda c: c.update(nonlin_name="os.system"), "'nonlin_name'"),
    (lambda c: c.update(mup_model_scaling_factor=2), "'mup_model_scaling_factor'"),
    (lambda c: c.update(surprise=1), "unknown ParcaeConfig field"),
    (lambda c: c.update(recurrent_num_attention_heads=8), "'recurrent_num_attention_heads'.*head width"),
    (lambda c: c.update(use_fused_head="hhe"), "'use_fused_head'"),
    (lambda c: c.update(norm_eps=-1), "'norm_eps'"),
    (lambda c: c.update(clip_qkv=float("nan")), "'clip_qkv'"),
    (lambda c: c.update(init_strategy="magic"), "'init_strategy'"),
    (lambda c: c.update(sampling_scheme="x-curriculum-soon"), "'sampling_scheme'"),
    (lambda c: c.update(rope_settings={"use_rope": True, "rope_scaling": 2}), "'rope_settings'"),
])
def test_bad_config_fields_are_named(tmp_path, edit, match):
    with pytest.raises(LoadError, match=match):
        ll.load(_tiny_dir(tmp_path, edit_config=edit))


def test_bad_class_name(tmp_path):
    folder = _tiny_dir(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "GPTConfig"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="_class_name"):
        ll.load(folder, family="parcae")


def test_missing_and_misshapen_tensors(tmp_path):
    with pytest.raises(LoadError, match="transformer.adapter.B"):
        ll.load(_tiny_dir(tmp_path / "a", edit_state=lambda sd: sd.pop("transformer.adapter.B")))
    with pytest.raises(LoadError, match="transformer.C.weight.*shape"):
        ll.load(_tiny_dir(tmp_path / "b", edit_state=lambda sd: sd.update({"transformer.C.weight": torch.zeros(3, 3)})))
    with pytest.raises(LoadError, match="freqs_cis.*shape"):
        ll.load(_tiny_dir(tmp_path / "c", edit_state=lambda sd: sd.update({"freqs_cis": sd["freqs_cis"][:, :5]})))
    with pytest.raises(LoadError, match="dtype"):
        ll.load(_tiny_dir(tmp_path / "d", edit_state=lambda sd: sd.update(
            {"transformer.wte.weight": sd["transformer.wte.weight"].long()})))
    with pytest.warns(UnexpectedTensorsWarning, match="stray"):
        ll.load(_tiny_dir(tmp_path / "e", edit_state=lambda sd: sd.update({"stray": torch.zeros(1)})))


def test_bad_forward_arguments(tiny):
    model, exp, _ = tiny
    with pytest.raises(ValueError, match="not both"):
        model(exp["input_ids"], 2, sampled_depths=True)
    with pytest.raises(ValueError, match="sampled_depths must be"):
        model(exp["input_ids"], sampled_depths="yes")
    with pytest.raises(ValueError, match="train_step"):
        model(exp["input_ids"], sampled_depths=True, train_step=-1)
    with pytest.raises(ValueError, match="token ids must lie"):
        model(exp["input_ids"] + 1000, 2)
    with pytest.raises(ValueError, match="freqs_cis"):
        model(torch.zeros(1, 65, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="initial_state"):
        model(exp["input_ids"], 1, initial_state=torch.zeros(2, 11, 3))
    with pytest.raises(ValueError, match="sampled_depths"):
        model.generate(exp["input_ids"], max_new_tokens=1, sampled_depths=True, verbose=False)


# ---------------------------------------------------------------------------------------------------
# The model on the core: detection, stop_at_layer, lenses, analyses, the report, generation, saving
# ---------------------------------------------------------------------------------------------------


def test_detected_by_load(tiny):
    """`_class_name: ParcaeConfig` decides the family, before Huginn's `transformer.core_block` tensors do."""
    model, _, _ = tiny
    config = json.loads((golden("parcae-tiny") / "config.json").read_text())
    assert ll.adapters.detect_family(config, {"transformer.core_block.0.attn.c_q.weight": None}) == "parcae"
    assert isinstance(model, HookedParcaeTransformer) and model.cfg.family == "parcae"
    assert model.cfg.layout == "(2, 2 x 4, 2)" and "parcae" in ll.KNOWN_FAMILIES


def test_stop_at_layer_is_each_layers_input(tiny):
    """stop_at_layer=d returns the input of the layer at unrolled depth d (prelude, every
    recurrence's core layers at the state width, coda), and the full depth the residual before ln_f."""
    model, exp, _ = tiny
    ids = exp["input_ids"]
    _, cache = model.run_with_cache(ids, 3, seed=3, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")))
    schedule = model.schedule(3)
    assert schedule.depth == 2 + 3 * 2 + 2
    for d, traversal in enumerate(schedule):
        got = model(ids, 3, seed=3, stop_at_layer=d)
        assert_hidden(got, cache[f"{traversal.prefix}.hook_resid_pre"])
    assert_hidden(model(ids, 3, seed=3, stop_at_layer=schedule.depth), cache["coda.1.hook_resid_post"])


def test_lenses(tiny):
    """The logit lens of a recurrent state skips the coda: softcap(lm_head(ln_f(C(s))) * logit_scale)
    (written out here); the coda lens of the last state is the model's output (the coda's value
    embedding reads the run's tokens); widths that do not fit are refused by name."""
    model, exp, _ = tiny
    ids = exp["input_ids"]
    logits, cache = model.run_with_cache(ids, 4, seed=1)
    states = ll.analysis.lens_of_states(model, cache, lens="coda").logits
    assert_logits(states[-1], logits)
    s = cache["iter.2.hook_state_post"]
    x = model.C(s).float()
    by_hand = torch.nn.functional.rms_norm(x, (x.shape[-1],), model.ln_final.weight, model.ln_final.eps) @ model.unembed.weight.T
    logit = ll.analysis.lens_of_states(model, cache, lens="logit").logits[2]
    assert_logits(logit, by_hand * model.settings.logit_scale)
    lens = ll.analysis.get_lens(model, "logit")
    with pytest.raises(ValueError, match="logit lens at prelude.0.hook_resid_post reads width 64, got 3"):
        lens(torch.zeros(1, 2, 3), "prelude.0.hook_resid_post")
    with pytest.raises(ValueError, match="tokens"):
        model.finish(s[:, :5])  # not the latest run's length
    # the coda is causal: the first 5 positions alone (their tokens given) read as in the whole sequence
    assert_logits(model.finish(s[:, :5], tokens=ids[:, :5]), model.finish(s, tokens=ids)[:, :5], scaled=True)


def test_analyses_and_streaming(tiny):
    """step_sizes / fixed_points / logit_lens run on the state-width stacks, and the streaming
    versions (hooks reducing as the run goes) give the same numbers."""
    model, exp, _ = tiny
    ids = exp["input_ids"]
    _, cache = model.run_with_cache(ids, 6, seed=2)
    steps = ll.analysis.step_sizes(cache)
    x = cache.stack("hook_resid_post")
    by_hand = (x[1:] - x[:-1]).flatten(-2).norm(dim=-1)  # [T-1, L, B]: Frobenius over (pos, d)
    assert torch.allclose(steps.norm[1:], by_hand, rtol=1e-5, atol=1e-6)
    fp = ll.analysis.fixed_points(cache)
    assert torch.allclose(fp.distance[-1], torch.zeros_like(fp.distance[-1]))
    ll.analysis.logit_lens(model, cache, lens="coda")
    streamed = ll.analysis.stream_analyses(model, ids, n_loops=6, seed=2)
    assert torch.allclose(streamed.steps.norm[1:], steps.norm[1:], rtol=1e-5, atol=1e-6)


def test_report_cli(tmp_path, capsys):
    """`loop-lens report DIR` on a Parcae checkpoint (the fixture with a word tokenizer)."""
    from hostile import copy_golden, word_tokenizer

    from loop_lens.cli import main

    folder = copy_golden(golden("parcae-tiny"), tmp_path / "ckpt")
    word_tokenizer([f"w{i}" for i in range(256)]).save(str(folder / "tokenizer.json"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4 w5\nw9 w8 w7\n")
    code = main(["report", str(folder), "--prompts", str(prompts), "--n-loops", "5", "--out", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0, capsys.readouterr()
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert numbers["meta"]["layout"].startswith("(2, 2 x 4, 2)")
    assert len(numbers["head_stability"]) == 2 * 4  # core layers x core heads
    assert "Head stability" in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("seed", [None, 5])
def test_generation_kv_cache_equals_recompute(tiny, seed):
    """Greedy and sampled generation with the KV cache equal recomputing the sequence each step
    (the random start states drawn once per position); the default count is mean_recurrence."""
    model, exp, _ = tiny
    ids = exp["input_ids"]
    kw = dict(max_new_tokens=6, verbose=False, stop_at_eos=False, return_type="result", seed=seed,
              do_sample=seed is not None)
    if seed is None:
        kw["initial_state"] = "zeros"
    cached = model.generate(ids, **kw)
    fresh = model.generate(ids, use_past_kv_cache=False, **kw)
    assert torch.equal(cached.tokens, fresh.tokens)
    assert cached.n_loops == 4 and bool((cached.iterations == 4).all())
    if seed is None:  # greedy from zeros: each new token is the argmax of a plain forward from zeros
        seq = cached.tokens
        logits = model(seq[:, :-1], initial_state=torch.zeros(*seq[:, :-1].shape, 64))
        assert torch.equal(logits[:, ids.shape[1] - 1:].argmax(-1), seq[:, ids.shape[1]:])
    with pytest.raises(ValueError, match="does not start at the prelude output"):
        model.generate(ids, max_new_tokens=1, verbose=False, stop_at_eos=False, initial_state="embed")


def test_generation_narrow_state(tmp_path):
    """A state narrower than the model (its own heads) with value embeddings in the core: cached
    generation equals recompute, from a random start (seed) and from zeros."""
    c = {**pc.BASE, "n_embd": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "recurrent_embedding_dimension": 32,
         "recurrent_num_attention_heads": 2, "recurrent_intermediation_embedding_dimension": 48}  # head width 16 in both
    sd = pc.random_state_dict(c, 3)
    assert _runnable(c, sd)
    model = ll.load(pc.write_checkpoint(tmp_path / "ckpt", c, sd))
    assert model.settings.d_state == 32 and model.settings.d_model == 64
    ids = torch.randint(0, c["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(0))
    for kw in ({"seed": 9}, {"initial_state": "zeros"}):
        a = model.generate(ids, max_new_tokens=4, n_loops=3, verbose=False, stop_at_eos=False, return_type="tokens", **kw)
        b = model.generate(ids, max_new_tokens=4, n_loops=3, verbose=False, stop_at_eos=False, return_type="tokens",
                           use_past_kv_cache=False, **kw)
        assert torch.equal(a, b)


def test_native_save_round_trip(tiny, tmp_path):
    """model.save writes the native format; ll.load rebuilds the same Parcae model from it."""
    model, exp, _ = tiny
    model.save(tmp_path / "native")
    again = ll.load(tmp_path / "native")
    assert isinstance(again, HookedParcaeTransformer) and again.settings == model.settings
    assert torch.equal(again(exp["input_ids"], 3, seed=4), model(exp["input_ids"], 3, seed=4))


def test_seeded_start_is_batch_independent(tiny):
    """seed=: each prompt draws its own start state over its real tokens (alone = in a padded batch)."""
    model, exp, _ = tiny
    ids = exp["input_ids"]
    alone = model(ids[1:, 3:], 2, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batched = model(ids, 2, seed=11, attention_mask=mask)
    assert_logits(batched[1, 3:], alone[0])
