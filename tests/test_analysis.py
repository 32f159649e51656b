"""Analyses on cases whose answer is known by construction, plus shape checks on real models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import golden, tiny_model
from transformer_lens import head_detector

import loop_lens as ll
from loop_lens import analysis as A
from loop_lens.analysis import attention as att
from loop_lens.analysis.batching import aggregate, over_prompts
from loop_lens.analysis.fixed_points import classify_tokens, cyclic_similarity, fixed_points, step_sizes
from loop_lens.analysis.stages import depth_profile, logit_lens
from loop_lens.analysis.trajectory import pca_trajectory
from loop_lens.cache import LoopCache


def identity_block_model(**overrides):
    """A pre-norm model whose block adds nothing: attention and MLP outputs are zero."""
    model = tiny_model("pre", injection="none", **overrides)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return model


def fake_cache(model, states: torch.Tensor, kind: str = "hook_resid_post") -> LoopCache:
    """A LoopCache holding hand-written states [T, L, B, S, D] for one hook kind."""
    T, L = states.shape[:2]
    d = {f"iter.{t}.blocks.{l}.{kind}": states[t, l] for t in range(T) for l in range(L)}
    d.update({f"iter.{t}.hook_state_post": states[t, -1] for t in range(T)})
    return LoopCache(d, model, n_loops=T)


# ---------------------------------------------------------------------- fixed points
def test_identity_block_has_zero_step_and_converges_at_once(tokens):
    model = identity_block_model()
    _, cache = model.run_with_cache(tokens, n_loops=6)
    steps = step_sizes(cache)
    assert torch.isnan(steps.norm[0]).all()
    assert torch.all(steps.norm[1:] == 0) and torch.all(steps.per_token[1:] == 0)
    torch.testing.assert_close(steps.cosine[1:], torch.ones_like(steps.cosine[1:]))
    assert torch.all(steps.convergence_iteration(1e-6) == 0)
    fp = fixed_points(cache)
    assert torch.all(fp.distance == 0)
    # block layers with zero updates all sit at the same point: degenerate
    assert fp.degenerate()


def test_step_sizes_and_convergence_on_a_geometric_trajectory():
    model = tiny_model("pre")
    T, base = 8, torch.randn(1, 2, 1, 3, 32)
    scales = torch.tensor([0.5**t for t in range(T)]).view(T, 1, 1, 1, 1)
    states = base + scales * torch.ones_like(base)  # X_t = base + 0.5^t
    steps = step_sizes(fake_cache(model, states))
    expected = torch.tensor([0.5**t for t in range(T - 1)]) * 0.5 * math.sqrt(3 * 32)  # ||0.5^t - 0.5^(t-1)||
    torch.testing.assert_close(steps.norm[1:, 0, 0], expected)
    rel = steps.relative[:, 0, 0]
    tol = float(rel[4])  # steps t >= 5 are below this, step 4 is not
    assert steps.convergence_iteration(tol)[0, 0] == 4
    assert steps.convergence_iteration(1e-12)[0, 0] == -1


def test_fixed_point_layer_cosines_show_distinct_points():
    model = tiny_model("pre")
    x0, x1 = torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, 4, 32)
    x0[..., 0], x1[..., 1] = 1.0, 1.0  # orthogonal fixed points for layers 0 and 1
    states = torch.stack([torch.cat([x0, x1])] * 5)  # [T, L=2, B, S, D]
    fp = fixed_points(fake_cache(model, states))
    torch.testing.assert_close(fp.layer_cosine, torch.eye(2))
    assert not fp.degenerate() and fp.min_layer_cosine == pytest.approx(0.0)


def test_token_classes_fixed_orbit_slider():
    model = tiny_model("pre")
    T, D = 40, 32
    a, b = torch.zeros(D), torch.zeros(D)
    a[0], b[1] = 1.0, 1.0
    fixed = torch.stack([a] * T)
    orbit = torch.stack([a if t % 2 else b for t in range(T)])  # period 2
    angles = torch.linspace(0, math.pi / 2, T)
    slider = torch.stack([torch.cos(th) * a + torch.sin(th) * b for th in angles])  # steady drift a -> b
    states = torch.stack([fixed, orbit, slider], dim=1)  # [T, S=3, D]
    states = states[:, None, None].expand(T, 2, 1, 3, D)
    classes = classify_tokens(fake_cache(model, states), rho=0.9, tau=0.05)
    assert classes.labels[0] == ["fixed_point", "orbit", "slider"]
    assert int(classes.period[0, 1]) == 2
    assert classes.counts().to_dict() == {"fixed_point": 1, "orbit": 1, "slider": 1, "unknown": 0}


def test_cyclic_similarity_is_banded_for_a_two_layer_cycle():
    model = tiny_model("pre")
    a, b = torch.zeros(1, 2, 32), torch.zeros(1, 2, 32)
    a[..., 0], b[..., 1] = 1.0, 1.0
    states = torch.stack([torch.stack([a, b])] * 3)  # layer 0 always a, layer 1 always b
    sim = cyclic_similarity(fake_cache(model, states))
    expected = torch.tensor([[1.0 if i % 2 == j % 2 else 0.0 for j in range(6)] for i in range(6)])
    torch.testing.assert_close(sim.matrix, expected)
    assert sim.labels[:3] == ["t0.l0", "t0.l1", "t1.l0"]


def test_fixed_points_against_a_longer_reference_on_a_geometric_trajectory():
    """X_t = base + 0.5^t; the reference runs to T_ref = 12, so X* = base + 0.5^11 and the
    distance at t is |0.5^t - 0.5^11| * sqrt(S * D)."""
    model = tiny_model("pre")
    base = torch.randn(1, 2, 1, 3, 32)

    def run(T: int) -> LoopCache:
        return fake_cache(model, base + torch.tensor([0.5**t for t in range(T)]).view(T, 1, 1, 1, 1))

    fp = fixed_points(run(6), reference=run(12))
    expected = torch.tensor([abs(0.5**t - 0.5**11) for t in range(6)]) * math.sqrt(3 * 32)
    torch.testing.assert_close(fp.distance[:, 0, 0], expected)
    assert fp.reference_loops == 12
    torch.testing.assert_close(fixed_points(run(6)).distance[-1], torch.zeros(2, 1))  # its own last iteration


def test_attention_cyclic_similarity_leaves_padding_out(tokens):
    """A padded prompt has the same attention similarity as the prompt run alone."""
    model = tiny_model("pre")
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    _, padded = model.run_with_cache(tokens, n_loops=3, attention_mask=mask)
    _, alone = model.run_with_cache(tokens[1:, :4], n_loops=3)
    _, first = model.run_with_cache(tokens[:1], n_loops=3)
    both = cyclic_similarity(padded, of="attention", mask=mask).matrix
    expected = (cyclic_similarity(alone, of="attention").matrix + cyclic_similarity(first, of="attention").matrix) / 2
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)
    assert (cyclic_similarity(padded, of="attention").matrix - both).abs().max() > 1e-3  # the mask matters here


def test_results_take_keyword_arguments_only():
    x = torch.zeros(2, 1, 1)
    with pytest.raises(TypeError):
        A.StepSizes(x, x, x, x, x)
    steps = A.StepSizes(norm=x, relative=x, cosine=x, per_token=x[..., None], per_token_cosine=x[..., None])
    assert len(steps.to_frame()) == 2


# ---------------------------------------------------------------------- devices
def test_every_analysis_makes_its_tensors_on_the_cache_device(tokens):
    """With the default device set to `meta`, a tensor made without `device=` lands on meta and
    any op that meets the (CPU) cache's tensors raises, as a CPU tensor would on a CUDA cache."""
    model = tiny_model("huginn")
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    _, cache = model.run_with_cache(tokens, n_loops=4, seed=0, attention_mask=mask)
    _, reference = model.run_with_cache(tokens, n_loops=6, seed=0, attention_mask=mask)
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta"):
        torch.arange(3) + cache["iter.0.hook_state_post"][0, :3, 0]  # the check bites
    calls = {
        "step_sizes": lambda: step_sizes(cache, mask=mask).convergence_iteration(1e-3),
        "step_sizes frame": lambda: step_sizes(cache, mask=mask).to_frame(),
        "fixed_points": lambda: fixed_points(cache, reference=reference, mask=mask).to_frame(),
        "cyclic resid": lambda: cyclic_similarity(cache, mask=mask).to_frame(),
        "cyclic attention": lambda: cyclic_similarity(cache, of="attention", mask=mask),
        "classify_tokens": lambda: classify_tokens(cache, max_period=3).to_frame(),
        "attention_stability": lambda: att.attention_stability(model, cache, tokens, mask).table(),
        "logit_lens": lambda: logit_lens(model, cache, mask=mask).entry_point(2),
        "logit_lens frame": lambda: logit_lens(model, cache, mask=mask, lens="coda").to_frame(),
        "logit_lens_of_states": lambda: A.logit_lens_of_states(model, cache, mask=mask).to_frame(),
        "coda_lens": lambda: A.coda_lens(model, cache, mask=mask),
        "depth_profile": lambda: depth_profile(cache, baseline_cache=reference, mask=mask).to_frame(),
        "pca_trajectory": lambda: pca_trajectory(cache).to_frame(),
        "over_prompts": lambda: over_prompts(model, [[1, 2, 3], [4, 5]], lambda c, t, m: step_sizes(c, mask=m), n_loops=2, progress=False),
    }
    for name, call in calls.items():
        with torch.device("meta"):
            try:
                call()
            except (RuntimeError, NotImplementedError, TypeError) as error:
                pytest.fail(f"{name} made a tensor off the cache's device: {error}")


# ---------------------------------------------------------------------- attention metrics
def test_hand_written_patterns_have_known_metrics():
    n = 4
    uniform_rows = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    sink = torch.zeros(n, n)
    sink[:, 0] = 1.0
    diagonal = torch.eye(n)
    # all attention on key 0: concentration 1; sink score 1; zero entropy
    assert att.colsum_concentration(sink).item() == pytest.approx(1.0)
    assert att.sink_score(sink).item() == pytest.approx(1.0)
    assert att.mixing_score(sink).item() == pytest.approx(0.0)
    # every key receives exactly one unit of attention: concentration 0
    assert att.colsum_concentration(diagonal).item() == pytest.approx(0.0, abs=1e-6)
    assert att.sink_score(diagonal).item() == pytest.approx(1 / n)
    # causal uniform rows: column sums c_j = sum_{i>=j} 1/(i+1)
    c = torch.tensor([sum(1 / (i + 1) for i in range(j, n)) for j in range(n)]) / n
    expected = 1 + (c * c.log()).sum() / math.log(n)
    assert att.colsum_concentration(uniform_rows).item() == pytest.approx(expected.item(), rel=1e-5)
    assert att.sink_score(uniform_rows).item() == pytest.approx(c[0].item(), rel=1e-5)
    entropy = sum(math.log(i + 1) for i in range(n)) / n
    assert att.mixing_score(uniform_rows).item() == pytest.approx(entropy, rel=1e-5)
    assert att.js_divergence_rows(sink, sink).item() == pytest.approx(0.0)
    assert att.js_divergence_rows(sink, diagonal).item() == pytest.approx(math.log(2) * (n - 1) / n, rel=1e-5)


def test_metrics_ignore_padded_positions():
    n = 3
    pattern = torch.tril(torch.ones(5, 5)) / torch.arange(1, 6)[:, None]
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    inner = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    batched = pattern[None, None]  # [B, H, q, k]
    assert att.colsum_concentration(batched, mask).item() == pytest.approx(att.colsum_concentration(inner).item(), rel=1e-5)
    assert att.mixing_score(batched, mask).item() == pytest.approx(att.mixing_score(inner).item(), rel=1e-5)


def test_head_type_scores_recognise_a_previous_token_head():
    S = 6
    prev = torch.zeros(S, S)
    prev[0, 0] = 1
    prev[torch.arange(1, S), torch.arange(S - 1)] = 1
    pattern = torch.stack([prev, torch.eye(S)])[None]  # [B=1, H=2, S, S]
    scores = att.head_type_scores(pattern, torch.arange(S)[None])
    assert scores["previous_token"][0, 0].item() == pytest.approx((S - 1) / S)
    assert scores["diagonal"][0, 1].item() == pytest.approx(1.0)
    assert scores["first_token"][0, 1].item() == pytest.approx(1 / S)


def test_detection_patterns_equal_transformer_lens_head_detector():
    tokens = torch.randint(0, 4, (3, 9), generator=torch.Generator().manual_seed(0))  # many repeats
    patterns = att.detection_patterns(tokens)
    for b in range(3):
        one = tokens[b : b + 1]
        torch.testing.assert_close(patterns["previous_token"][b], head_detector.get_previous_token_head_detection_pattern(one))
        torch.testing.assert_close(patterns["induction"][b], head_detector.get_induction_head_detection_pattern(one))
    assert patterns["induction"].sum() > 0
    assert torch.equal(patterns["diagonal"][0], torch.eye(9)) and torch.equal(patterns["first_token"][0].sum(0), torch.tensor([9.0] + [0.0] * 8))


def test_attention_stability_on_a_model(tokens):
    model = tiny_model("huginn")
    _, cache = model.run_with_cache(tokens, n_loops=12, seed=0)
    result = att.attention_stability(model, cache, tokens)
    T, L, B, H = 12, 2, 2, 4
    assert result.change_frobenius.shape == (T, L, B, H) and torch.isnan(result.change_frobenius[0]).all()
    assert torch.isfinite(result.concentration).all() and (result.concentration >= -1e-6).all() and (result.concentration <= 1 + 1e-6).all()
    table = result.table()
    assert list(table.columns[:4]) == ["layer", "head", "stabilisation_iteration", "head_type"] and len(table) == L * H
    assert result.sink_rate().shape == (T, L)
    assert result.bound_factor().shape == (T, L, B, H)
    assert len(result.to_frame()) == T * L * B * H


def test_identity_block_attention_never_changes(tokens):
    model = identity_block_model()
    _, cache = model.run_with_cache(tokens, n_loops=5)
    result = att.attention_stability(model, cache, tokens)
    assert torch.all(result.change_frobenius[1:] == 0)
    assert torch.all(result.stabilisation_iteration(1e-9) == 0)


# ---------------------------------------------------------------------- lenses and stages
def test_logit_lens_ranks_on_a_model_whose_unembedding_reads_one_direction(tokens):
    """Layer outputs are hand-set to c_{t,l} * e_0 and W_U reads token v as v * e_0: with the
    positive scale, the top token is V-1 everywhere, token V-2 is rank 1, token 0 ranks last."""
    model = tiny_model("pre", n_prelude=0, n_coda=0)
    V, D = model.cfg.d_vocab, model.cfg.d_model
    with torch.no_grad():
        model.unembed.weight.zero_()
        model.unembed.weight[:, 0] = torch.arange(V, dtype=torch.float32)
        model.ln_final.weight.fill_(1.0)
    e0 = torch.zeros(D)
    e0[0] = 1.0
    states = torch.stack([torch.stack([e0.expand(2, 7, D) * (t + 1) for _ in range(2)]) for t in range(3)])
    cache = fake_cache(model, states)
    lens = logit_lens(model, cache, targets=torch.full((2, 7), V - 2))
    assert torch.all(lens.top_ids[..., 0] == V - 1)
    assert torch.all(lens.target_rank == 1)
    assert torch.all(lens.entry_point(k=2) == 0) and torch.all(lens.entry_point(k=1) == -1)
    low = logit_lens(model, cache, targets=torch.zeros(2, 7, dtype=torch.long))
    assert torch.all(low.target_rank == V - 1)
    assert lens.grid().shape == (3, 2)


def test_logit_lens_entry_point_tracks_when_the_answer_arrives():
    model = tiny_model("pre", n_prelude=0, n_coda=0)
    V, D = model.cfg.d_vocab, model.cfg.d_model
    with torch.no_grad():
        model.unembed.weight.zero_()
        model.unembed.weight[:, 0] = torch.arange(V, dtype=torch.float32) - V / 2  # +e0 favours V-1, -e0 favours 0
    e0 = torch.zeros(D)
    e0[0] = 1.0
    signs = [-1, -1, 1, 1]  # flattened over (t, l): the answer V-1 arrives at t=1, l=0 and stays
    states = torch.stack([torch.stack([e0.expand(1, 1, D) * signs[2 * t + l] for l in range(2)]) for t in range(2)])
    lens = logit_lens(model, fake_cache(model, states), targets=torch.full((1, 1), V - 1))
    assert lens.entry_point(k=1)[0, 0].tolist() == [1, 0]


def test_lenses_on_huginn_checkpoint_are_finite_and_shaped():
    model = ll.load(golden("huginn-tiny"))
    tokens = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, n_loops=4, seed=0)
    for kind in ("logit", "coda"):
        lens = logit_lens(model, cache, lens=kind, k=3)
        assert lens.top_ids.shape == (4, 2, 2, 6, 3) and torch.isfinite(lens.entropy).all()
        assert (lens.kl_to_final[-1, -1] >= -1e-5).all()
    coda = logit_lens(model, cache, lens="coda")
    assert torch.allclose(coda.kl_to_final[-1, -1], torch.zeros(2, 6), atol=1e-4)  # the last state IS the output
    profile = depth_profile(cache)
    assert profile.concentration.shape == (4, 2) and torch.isfinite(profile.resid_norm).all()
    traj = pca_trajectory(cache, position=-1)
    assert traj.coords.shape == (4, 2, 3) and float(traj.explained_variance_ratio.sum()) <= 1 + 1e-6
    assert len(traj.to_frame()) == 8


def test_depth_profile_with_feedforward_baseline(tokens):
    looped, ff = tiny_model("pre"), tiny_model("pre", n_prelude=0, n_coda=0, n_block=6, default_loops=1)
    _, c1 = looped.run_with_cache(tokens, n_loops=3)
    _, c2 = ff.run_with_cache(tokens, n_loops=1)
    frame = depth_profile(c1, baseline_cache=c2).to_frame()
    assert set(frame.model) == {"looped", "feedforward"} and (frame.model == "feedforward").sum() == 6


# ---------------------------------------------------------------------- batching over prompts
def test_over_prompts_pads_masks_and_aggregates():
    model = tiny_model("pre")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]

    def analysis(cache, tokens, mask):
        return step_sizes(cache, mask=mask)

    frame = over_prompts(model, prompts, analysis, n_loops=4, batch_size=2, progress=False,
                         names_filter=lambda n: n.endswith("hook_resid_post"))
    assert sorted(frame.prompt.unique()) == [0, 1, 2]
    # prompt 0 alone gives the same numbers as inside its padded batch
    _, alone = model.run_with_cache(torch.tensor([prompts[0]]), n_loops=4)
    ref = step_sizes(alone).to_frame()
    got = frame[frame.prompt == 0].reset_index(drop=True)
    torch.testing.assert_close(torch.tensor(got.step.values), torch.tensor(ref.step.values), atol=1e-4, rtol=1e-4)
    summary = aggregate(frame, ["iteration", "layer"], "relative_step")
    assert {"mean", "q10", "q50", "q90", "n"} <= set(summary.columns) and summary.n.max() == 3


def test_kappa_is_the_spectral_norm_of_wq_wk_transposed():
    from loop_lens.analysis.attention import _kappa

    model = tiny_model("pre")
    for layer, block in enumerate(model.blocks):
        wq = block.attn.W_Q.detach().double()
        wk = block.attn.W_K.detach().double().repeat_interleave(block.attn.n_heads // block.attn.n_kv, dim=0)
        direct = torch.linalg.svdvals(wq @ wk.transpose(1, 2))[:, 0]
        torch.testing.assert_close(_kappa(model)[layer].double(), direct, rtol=1e-5, atol=1e-6)
