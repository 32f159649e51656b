"""hierarchical_convergence: step sizes of z_H across H cycles and of z_L across L cycles of an
HRM (nested) run, against an independent computation from the cached states and against a model
whose answer is derived by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from hrm_models import VOCAB, HrmTextConfig, HrmTextForCausalLM, random_hrm, saved  # noqa: E402

import loop_lens as ll
from loop_lens import analysis as A
from loop_lens.analysis.hierarchical import HierarchicalConvergence, hierarchical_convergence


def _hrm(tmp_path, seed: int = 0, **fields) -> ll.HookedLoopedTransformer:
    """A random tiny HRM-Text with 3 H cycles of 4 L cycles (unless `fields` say otherwise), loaded by ll.load."""
    return saved(random_hrm(seed, **{"H_cycles": 3, "L_cycles": 4, **fields}), tmp_path)


def _tokens(batch: int = 2, pos: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(1))


def _relative(x: torch.Tensor, prev: torch.Tensor, real: torch.Tensor) -> float:
    """||x - prev||_F / ||x||_F over the real positions of one sequence [pos, d]."""
    x, prev = x[real].double(), prev[real].double()
    return float(torch.linalg.norm(x - prev) / torch.linalg.norm(x))


def test_values_equal_an_independent_computation(tmp_path):
    model = _hrm(tmp_path)
    tokens = _tokens()
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0  # padding at the end of the second sequence
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    H, L = 3, 4
    for m in (None, mask):
        result = hierarchical_convergence(cache, mask=m)
        assert isinstance(result, HierarchicalConvergence)
        assert result.h_relative.shape == (H, 2) and result.l_relative.shape == (H, L, 2)
        assert torch.isnan(result.h_relative[0]).all() and torch.isnan(result.l_relative[0, 0]).all()
        for b in range(2):
            real = torch.ones(tokens.shape[1], dtype=torch.bool) if m is None else m[b].bool()
            z_h = [cache[f"iter.{h}.hook_state_post"][b] for h in range(H)]
            z_l = [cache[f"iter.{h}.low.{l}.hook_state_post"][b] for h in range(H) for l in range(L)]
            for h in range(1, H):
                assert result.h_relative[h, b].item() == pytest.approx(_relative(z_h[h], z_h[h - 1], real), rel=1e-5)
            for i in range(1, H * L):  # the first L cycle of h against the last z_L of h - 1
                h, l = divmod(i, L)
                assert result.l_relative[h, l, b].item() == pytest.approx(_relative(z_l[i], z_l[i - 1], real), rel=1e-5)
        # fixed points on both timescales: each z_L against its own H cycle's last z_L, z_H against the last z_H
        for b in range(2):
            real = torch.ones(tokens.shape[1], dtype=torch.bool) if m is None else m[b].bool()
            for h in range(H):
                end_l = cache[f"iter.{h}.low.{L - 1}.hook_state_post"][b]
                for l in range(L):
                    want = float(torch.linalg.norm((cache[f"iter.{h}.low.{l}.hook_state_post"][b] - end_l)[real].double())
                                 / torch.linalg.norm(end_l[real].double()))
                    assert result.l_to_end[h, l, b].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
                end_h = cache[f"iter.{H - 1}.hook_state_post"][b]
                want = float(torch.linalg.norm((cache[f"iter.{h}.hook_state_post"][b] - end_h)[real].double())
                             / torch.linalg.norm(end_h[real].double()))
                assert result.h_to_end[h, b].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    # a runtime l_cycles: the analysis follows the run, not the checkpoint
    _, other = model.run_with_cache(tokens, n_loops=2, l_cycles=6, names_filter=lambda n: n.endswith("hook_state_post"))
    steps = hierarchical_convergence(other)
    assert steps.l_relative.shape == (2, 6, 2)
    z_l = other.stack("hook_state_post", low=True)[1, 5, 0]
    assert steps.l_relative[1, 5, 0].item() == pytest.approx(_relative(z_l, other.stack("hook_state_post", low=True)[1, 4, 0],
                                                                        torch.ones(7, dtype=torch.bool)), rel=1e-5)
    # padding changes the numbers (the masked positions are left out), so the masked case is not vacuous
    assert not torch.allclose(hierarchical_convergence(cache).l_relative[1:, :, 1],
                              hierarchical_convergence(cache, mask=mask).l_relative[1:, :, 1])


def test_identity_stacks_give_the_steps_derived_by_hand(tmp_path):
    """Zero every attention o_proj and MLP down_proj: each layer returns its input, so each stack
    is its closing parameterless RMSNorm n(v) = v / rms(v): z_L <- n(z_L + z_H), z_H <- n(z_H + z_L).
    Embedding rows all u = (1, ..., 1) (rms 1, embedding_scale 1) and z_L_init w = (1, -1, 1, ...)
    (rms 1, orthogonal to u): every state is unit-rms in span(u, w), at an angle from u, and n(x + y)
    of two such states lies on their bisector. Angles (degrees): z_H = 0, z_L = 90;
    H cycle 0: z_L -> 45, 22.5, 11.25, then z_H -> 5.625;
    H cycle 1: z_L -> 8.4375, 7.03125, 6.328125, then z_H -> 5.9765625.
    Two unit-rms states an angle d apart differ by the chord: relative step 2 sin(d / 2)."""
    hf = HrmTextForCausalLM(HrmTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        head_dim=8, H_cycles=2, L_cycles=3, max_position_embeddings=64, embedding_scale=1.0, rms_norm_eps=1e-12)).eval()
    with torch.no_grad():
        for stack in (hf.model.L_module, hf.model.H_module):
            for layer in stack.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        hf.model.embed_tokens.weight.fill_(1.0)
        hf.model.z_L_init.copy_(torch.tensor([1.0, -1.0]).repeat(16))
    hf.save_pretrained(tmp_path)
    _, cache = ll.load(tmp_path).run_with_cache(_tokens(batch=3, pos=5))
    result = hierarchical_convergence(cache)

    def chord(degrees: float) -> float:
        return 2 * math.sin(math.radians(degrees) / 2)

    nan = float("nan")
    want_l = torch.tensor([[nan, chord(22.5), chord(11.25)], [chord(2.8125), chord(1.40625), chord(0.703125)]])
    want_h = torch.tensor([nan, chord(0.3515625)])
    torch.testing.assert_close(result.l_relative, want_l[..., None].expand(2, 3, 3), atol=2e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(result.h_relative, want_h[:, None].expand(2, 3), atol=2e-6, rtol=0, equal_nan=True)
    # the absolute step is the relative one times ||z||_F = sqrt(pos * d_model) (unit-rms states)
    torch.testing.assert_close(result.l_step, result.l_relative * math.sqrt(5 * 32), atol=1e-5, rtol=0, equal_nan=True)


def test_frame_and_plot(tmp_path):
    model = _hrm(tmp_path, H_cycles=2, L_cycles=3)
    _, cache = model.run_with_cache(_tokens(), names_filter=lambda n: n.endswith("hook_state_post"))
    result = A.hierarchical_convergence(cache)  # exported from loop_lens.analysis
    frame = result.to_frame()
    assert list(frame.columns) == ["timescale", "h", "l", "batch", "relative_step", "step", "to_end"]
    low, high = frame[frame.timescale == "L"], frame[frame.timescale == "H"]
    assert len(low) == 2 * 3 * 2 and len(high) == 2 * 2  # every state; the first has no step
    assert low.relative_step.isna().sum() == 2 and high.relative_step.isna().sum() == 2
    assert high["l"].isna().all() and not low["l"].isna().any()
    assert (low[low.l == 2].to_end == 0).all() and (high[high.h == 1].to_end == 0).all()  # each end is its own end
    row = low[(low.h == 1) & (low.l == 0) & (low.batch == 1)]
    assert row.relative_step.item() == pytest.approx(result.l_relative[1, 0, 1].item())
    fig = result.plot()
    assert [t.name for t in fig.data] == ["z_L (L cycles)", "z_H (H cycles)"]
    assert list(fig.data[0].x) == list(range(6)) and list(fig.data[1].x) == [2, 5]  # H steps at each cycle's end
    assert result.plot(log=False).layout.yaxis.type == "linear"
    assert "HierarchicalConvergence" in result._repr_html_()


def test_bad_input_errors(tmp_path, tokens):
    with pytest.raises(TypeError, match="LoopCache"):
        hierarchical_convergence({"iter.0.hook_state_post": torch.zeros(1, 2, 3)})
    _, flat = tiny_model("pre").run_with_cache(tokens, n_loops=3)
    with pytest.raises(ValueError, match="not from a nested"):
        hierarchical_convergence(flat)
    model = _hrm(tmp_path, H_cycles=2, L_cycles=2)
    toks = _tokens()
    _, only_h = model.run_with_cache(toks, names_filter=lambda n: n.startswith("iter.") and ".low." not in n)
    with pytest.raises(ValueError, match=r"lacks iter\.0\.low\.0\.hook_state_post.*l_cycles=2"):
        hierarchical_convergence(only_h)
    _, only_l = model.run_with_cache(toks, names_filter=lambda n: ".low." in n)
    with pytest.raises(ValueError, match=r"lacks iter\.0\.hook_state_post, iter\.1\.hook_state_post"):
        hierarchical_convergence(only_l)
    _, cache = model.run_with_cache(toks)
    with pytest.raises(ValueError, match="mask has shape"):
        hierarchical_convergence(cache, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="no real token"):
        hierarchical_convergence(cache, mask=torch.zeros_like(toks))
    with pytest.raises(ValueError, match="no batch dimension"):
        hierarchical_convergence(model.run_with_cache(toks[:1], remove_batch_dim=True)[1])
