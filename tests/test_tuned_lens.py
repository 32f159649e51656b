"""The tuned lens: zero translators are the logit lens; on a model whose right translators are
known in closed form, hand-set translators reproduce the model's output and the fit finds
translators as good; save/load round trip, refusal of other models and of bad files; use through
every lens-taking analysis."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors.torch import load_file, save_file

import loop_lens as ll
from loop_lens.analysis import TunedLens, get_lens, lens_of_states, logit_lens, logit_lens_of_states, stream_analyses
from loop_lens.analysis import tuned_lens as tl
from loop_lens.errors import LoadError, SaveError

T = 4
FIELDS = ("top_ids", "top_probs", "target_prob", "target_rank", "entropy", "kl_to_final")


@pytest.fixture(scope="module")
def huginn():
    """zoo:khop-huginn run for 4 iterations on two padded prompts."""
    torch.manual_seed(0)
    model = ll.load("zoo:khop-huginn")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    _, cache = model.run_with_cache(tokens, n_loops=T, seed=0, attention_mask=mask)
    return model, tokens, mask, cache


def diagonal_model():
    """A model whose right translators are known: blocks that add nothing (zero output
    projections), a diagonal injection s_t = a * s_{t-1} + u from a zero start, no coda. Then
    s_t = c_t * u with c_t = sum_{k <= t} a^k, every layer of iteration t outputs s_t, and the
    output is the logit lens of s_{T-1} = (c_{T-1} / c_t) * s_t: the translator at (t, l) is
    diag(c_{T-1} / c_t), different per iteration."""
    model = tiny_model("pre", injection="diagonal", initial_state="zeros", n_coda=0, n_prelude=1)
    D = model.cfg.d_model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.o_proj.weight.zero_()
            blk.mlp.down_proj.weight.zero_()
        model.injection.A_log.copy_(torch.randn(D, generator=g))
        model.injection.dt_bias.copy_(torch.randn(D, generator=g))
        model.unembed.weight.mul_(5)  # peaked distributions, so a wrong translator costs KL
        dt = F.softplus(model.injection.dt_bias)
        a = torch.exp(-dt * torch.exp(model.injection.A_log))
    c = torch.stack([sum(a**k for k in range(t + 1)) for t in range(T)])
    return model, c[-1] / c  # [T, D]: the right scale per iteration


def prompts(n: int, seed: int, d_vocab: int = 40) -> torch.Tensor:
    return torch.randint(0, d_vocab, (n, 12), generator=torch.Generator().manual_seed(seed))


def per_site_kl(model, cache, lens) -> torch.Tensor:
    return logit_lens(model, cache, lens=lens).kl_to_final.mean((2, 3))  # [T, L]


@pytest.mark.parametrize("share", [False, True])
def test_zero_translators_are_the_logit_lens_everywhere(huginn, share):
    model, tokens, mask, cache = huginn
    lens = TunedLens(model, T, share_iterations=share)
    assert lens.n_sites == (2 if share else 2 * T) and get_lens(model, lens) is lens
    tuned, plain = logit_lens(model, cache, lens=lens, mask=mask, k=3), logit_lens(model, cache, mask=mask, k=3)
    for field in FIELDS:
        torch.testing.assert_close(getattr(tuned, field), getattr(plain, field))
    assert tuned.lens == "tuned"
    # the state leaving an iteration is the last layer's output (Huginn does not norm it per iteration)
    torch.testing.assert_close(lens_of_states(model, cache, lens, mask).logits, logit_lens_of_states(model, cache, mask).logits)
    streamed = stream_analyses(model, tokens, n_loops=T, seed=0, attention_mask=mask, fixed_point=False, attention=False,
                               lens_positions=[1, -1], lens=lens)
    assert streamed.lens == "tuned"
    torch.testing.assert_close(streamed.lens_top1, plain.top_ids[:, :, :, [1, 5], 0])
    torch.testing.assert_close(streamed.lens_top1_prob, plain.top_probs[:, :, :, [1, 5], 0])


def test_a_translator_changes_the_reading_of_its_own_site_only(huginn):
    """Non-zero translators at one site: logit_lens and stream_analyses give the logit lens of the
    translated state there, computed by hand, and the plain logit lens elsewhere."""
    model, tokens, mask, cache = huginn
    D = model.cfg.d_model
    lens = TunedLens(model, T)
    g = torch.Generator().manual_seed(5)
    A, b = 0.3 * torch.randn(D, D, generator=g), torch.randn(D, generator=g)
    lens.weight[lens.site(2, 1)] = A
    lens.bias[lens.site(2, 1)] = b
    x = cache["iter.2.blocks.1.hook_resid_post"]
    by_hand = ll.analysis.LogitLens(model)(x + x @ A + b).float().log_softmax(-1)
    got = logit_lens(model, cache, lens=lens, mask=mask, k=1)
    plain = logit_lens(model, cache, mask=mask, k=1)
    torch.testing.assert_close(got.top_probs[2, 1, ..., 0], by_hand.max(-1).values.exp(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got.top_probs[2, 1], plain.top_probs[2, 1], atol=1e-3)  # the translator matters
    other = torch.ones(T, 2, dtype=torch.bool)
    other[2, 1] = False
    torch.testing.assert_close(got.top_probs[other], plain.top_probs[other])
    streamed = stream_analyses(model, tokens, n_loops=T, seed=0, attention_mask=mask, fixed_point=False, attention=False,
                               lens_positions=[0, 3], lens=lens)
    torch.testing.assert_close(streamed.lens_top1_prob, got.top_probs[:, :, :, [0, 3], 0], atol=1e-5, rtol=1e-5)
    M, b2 = lens.translator(2, 1)
    torch.testing.assert_close(M, torch.eye(D) + A)
    torch.testing.assert_close(b2, b)


def test_the_known_translators_give_the_models_output_exactly():
    """The construction of `diagonal_model` is right: with translators diag(c_{T-1}/c_t) the lens
    at every (iteration, layer) reads the model's own output."""
    model, scale = diagonal_model()
    lens = TunedLens(model, T)
    for t in range(T):
        for layer in range(model.cfg.n_block):
            lens.weight[lens.site(t, layer)] = torch.diag(scale[t]) - torch.eye(model.cfg.d_model)
    _, cache = model.run_with_cache(prompts(8, 1), n_loops=T)
    kl = per_site_kl(model, cache, lens)
    assert float(kl.abs().max()) < 1e-6
    assert float(per_site_kl(model, cache, "logit")[0].min()) > 0.1  # the logit lens is far off early


def test_fit_finds_the_known_translators_per_iteration_and_sharing_cannot():
    model, scale = diagonal_model()
    D = model.cfg.d_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lens = TunedLens.fit(model, prompts(128, 0), n_loops=T, steps=1500, lr=1e-2)
    shared = TunedLens.fit(model, prompts(128, 0), n_loops=T, share_iterations=True, steps=500, lr=1e-2)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())  # model untouched
    assert lens.fit_info["loss_last"] < 0.01 * lens.fit_info["loss_first"]
    _, cache = model.run_with_cache(prompts(64, 1), n_loops=T)  # held-out prompts
    logit, tuned, one = per_site_kl(model, cache, "logit"), per_site_kl(model, cache, lens), per_site_kl(model, cache, shared)
    assert bool((tuned[:-1] < 0.02 * logit[:-1]).all()), (tuned, logit)
    assert float(tuned[-1].max()) < 1e-3  # the last iteration needed no translator and keeps none to speak of
    # one translator for every iteration cannot scale each iteration's state differently
    assert float(one[0].min()) > 10 * float(tuned[0].max())
    # on held-out states the fitted map points where the known one does (its length the final norm
    # ignores): far closer than the untranslated state, which the logit lens reads
    for t in range(T - 1):
        x = cache[f"iter.{t}.blocks.0.hook_resid_post"].reshape(-1, D)
        truth = x * scale[t]
        fitted = F.cosine_similarity(lens.translate(x, f"iter.{t}.blocks.0.hook_resid_post"), truth, dim=-1)
        untranslated = F.cosine_similarity(x, truth, dim=-1)
        assert float(fitted.min()) > 0.99 and float((1 - fitted).mean()) < 0.05 * float((1 - untranslated).mean()), t


def test_fit_on_a_zoo_model_beats_the_logit_lens_on_held_out_prompts():
    from loop_lens.zoo import task

    model = ll.load("zoo:khop-ouro")
    g = torch.Generator().manual_seed(0)
    train, held = task.sample(64, [1, 2, 3], g, "train").tokens, task.sample(32, [1, 2, 3], g, "heldout").tokens
    _, cache = model.run_with_cache(held, n_loops=T)
    logit = per_site_kl(model, cache, "logit")
    for share in (False, True):
        lens = TunedLens.fit(model, train, n_loops=T, share_iterations=share, steps=150)
        tuned = per_site_kl(model, cache, lens)
        assert float(tuned.mean()) < 0.7 * float(logit.mean()), (share, tuned, logit)
    # text prompts work too, through the model's tokenizer
    text = [task.Batch(train[:2], None, None).text(i) for i in range(2)]
    assert TunedLens.fit(model, text, n_loops=2, steps=2).fit_info["n_positions"] == 2 * task.SEQ_LEN


def test_save_and_load_round_trip(huginn, tmp_path):
    model, _, mask, cache = huginn
    lens = TunedLens.fit(model, prompts(8, 0, model.cfg.d_vocab), n_loops=T, steps=5, seed=0)
    path = lens.save(tmp_path / "lens.safetensors")
    back = TunedLens.load(path, model)
    assert back.n_loops == T and back.share_iterations is False and back.fit_info == json.loads(json.dumps(lens.fit_info))
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias) and back.weight.abs().sum() > 0
    for field in FIELDS:
        torch.testing.assert_close(getattr(logit_lens(model, cache, lens=back, mask=mask), field),
                                   getattr(logit_lens(model, cache, lens=lens, mask=mask), field))
    shared = TunedLens(model, T, share_iterations=True)
    assert TunedLens.load(shared.save(tmp_path / "shared.safetensors"), model).share_iterations is True
    # the same weights in bf16 are the same model, and the lens reads its bf16 states
    half = ll.load("zoo:khop-huginn", dtype=torch.bfloat16)
    assert TunedLens.load(path, half).weight.dtype == torch.float32


def test_a_crash_mid_save_keeps_the_previous_file(huginn, tmp_path, monkeypatch):
    model = huginn[0]
    path = TunedLens(model, T).save(tmp_path / "lens.safetensors")
    old = path.read_bytes()
    lens = TunedLens(model, 2)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SaveError, match="disk full.*previous file there is unchanged"):
        lens.save(path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["lens.safetensors"]
    with pytest.raises(SaveError, match="is a folder"):
        lens.save(tmp_path)
    with pytest.raises(SaveError, match="does not exist"):
        lens.save(tmp_path / "missing" / "lens.safetensors")


def test_a_lens_is_refused_by_another_model(huginn, tmp_path):
    model, _, _, cache = huginn
    path = TunedLens(model, T).save(tmp_path / "lens.safetensors")
    ouro = ll.load("zoo:khop-ouro")
    with pytest.raises(LoadError, match=r"fitted on a model whose config differs.*n_coda: 1 vs 0"):
        TunedLens.load(path, ouro)
    other = ll.load("zoo:khop-huginn")  # the same config, other weights
    with torch.no_grad():
        other.blocks[1].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(LoadError, match=r"other weights than this model's: parameter blocks\.1\.mlp\.up_proj\.weight differs"):
        TunedLens.load(path, other)
    # an instance bound to one model is refused by analyses of the other
    with pytest.raises(ValueError, match="fitted on a model with other weights"):
        logit_lens(other, cache, lens=TunedLens(model, T))
    with pytest.raises(ValueError, match="config differs"):
        get_lens(ouro, TunedLens(model, T))


def test_bad_files_are_refused_naming_the_problem(huginn, tmp_path):
    model = huginn[0]
    with pytest.raises(LoadError, match="no tuned lens file"):
        TunedLens.load(tmp_path / "nothing.safetensors", model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        TunedLens.load(junk, model)
    path = TunedLens(model, T).save(tmp_path / "lens.safetensors")
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cases = {
        "format": ({**meta, "format": "other"}, tensors, "not a loop_lens tuned lens"),
        "json": ({**meta, "tuned_lens": "{"}, tensors, "not valid JSON"),
        "version": ({**meta, "tuned_lens": json.dumps({**json.loads(meta["tuned_lens"]), "version": 9})}, tensors, "version"),
        "n_loops": ({**meta, "tuned_lens": json.dumps({**json.loads(meta["tuned_lens"]), "n_loops": "4"})}, tensors, "'n_loops' must be a int"),
        "shape": (meta, {**tensors, "weight": tensors["weight"][:3]}, r"weight has shape \[3, 64, 64\], expected \[8, 64, 64\]"),
        "nan": (meta, {**tensors, "bias": torch.full_like(tensors["bias"], float("nan"))}, "bias holds NaN"),
        "extra": (meta, {**tensors, "code": torch.zeros(1)}, r"tensors a tuned lens does not have: \['code'\]"),
    }
    for name, (m, t, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(t, str(bad), metadata=m)
        with pytest.raises(LoadError, match=message):
            TunedLens.load(bad, model)


def test_sites_the_lens_has_no_translator_for_are_refused(huginn):
    model, _, _, cache = huginn
    lens = TunedLens(model, 2)
    x = cache["iter.3.blocks.0.hook_resid_post"]
    with pytest.raises(ValueError, match=r"iterations 0\.\.1, not iteration 3.*share_iterations=True"):
        lens(x, "iter.3.blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match=r"iterations 0\.\.1, not iteration 2"):
        logit_lens(model, cache, lens=lens)
    with pytest.raises(ValueError, match="needs the hook name"):
        lens(x)
    with pytest.raises(ValueError, match="not 'hook_latent'"):
        lens(x, "hook_latent")
    shared = TunedLens(model, 2, share_iterations=True)  # reads any iteration
    torch.testing.assert_close(shared(x, "iter.9.blocks.0.hook_resid_post"), ll.analysis.LogitLens(model)(x))
    ouro = ll.load("zoo:khop-ouro")
    with pytest.raises(ValueError, match="norms the state after every iteration"):
        TunedLens(ouro, 2)(x, "iter.1.hook_state_post")
    with pytest.raises(TypeError, match="share_iterations must be True or False"):
        TunedLens(model, 2, share_iterations=1)
    for kwargs, message in [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr must be"), ({"n_loops": 0}, "n_loops")]:
        with pytest.raises(ValueError, match=message):
            TunedLens.fit(model, prompts(2, 0, model.cfg.d_vocab), **kwargs)
    with pytest.raises(ValueError, match="tokens must lie in"):
        TunedLens.fit(model, torch.full((2, 3), 99))
    assert tl.FORMAT == "loop_lens.tuned_lens"
