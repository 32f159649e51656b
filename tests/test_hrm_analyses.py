"""The single-timescale analyses on both stacks of an HRM (nested) run: the NestedLoopCache is the
H stack's view (H cycles as iterations), `cache.low_view()` the L stack's (every L cycle in running
order as an iteration). Expected values are computed here from the cached activations by name and
from the model's weights, never through the analysis being tested."""

from __future__ import annotations

import pytest
import torch
from hrm_models import VOCAB, random_hrm, saved  # noqa: E402

from loop_lens import analysis as A
from loop_lens.families.hrm import LowStackModel

H, L, K = 3, 2, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = saved(random_hrm(H_cycles=H, L_cycles=3, num_hidden_layers=K), tmp_path_factory.mktemp("hrm"))
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    logits, cache = model.run_with_cache(tokens, l_cycles=L)  # a runtime L unlike the checkpoint's 3
    return model, tokens, logits, cache


def _relative(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """||x - prev|| / ||x|| over (pos, d) per batch item, in float64."""
    x, prev = x.double(), prev.double()
    return torch.linalg.norm((x - prev).flatten(1), dim=1) / torch.linalg.norm(x.flatten(1), dim=1)


def _kappa(block) -> torch.Tensor:
    """||W_Q^h W_K^h^T||_2 per head from the layer's projection weights, by SVD in float64."""
    attn = block.attn
    wq = attn.q_proj.weight.double().reshape(attn.n_heads, attn.d_head, -1)
    wk = attn.k_proj.weight.double().reshape(attn.n_kv, attn.d_head, -1).repeat_interleave(attn.n_heads // attn.n_kv, 0)
    return torch.stack([torch.linalg.matrix_norm(q.T @ k, ord=2) for q, k in zip(wq, wk)])


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_view_names_follow_running_order(run):
    model, _, _, cache = run
    low = cache.low_view()
    assert isinstance(low.model, LowStackModel) and low.n_loops == H * L
    for h in range(H):
        for l in range(L):
            i = h * L + l
            assert low[f"iter.{i}.blocks.1.attn.hook_pattern"] is cache[f"iter.{h}.low.{l}.blocks.1.attn.hook_pattern"]
            assert low[f"iter.{i}.hook_state_post"] is cache[f"iter.{h}.low.{l}.hook_state_post"]
    assert not any(".low." in n for n in low.keys()) and "hook_embed" in low.keys()
    assert "iter.0.hook_injected" not in low.keys()  # the H stack's names are left out


@pytest.mark.parametrize("stack", ["H", "L"])
def test_step_sizes_fixed_points_and_attention_per_stack(run, stack):
    model, tokens, _, cache = run
    view = cache if stack == "H" else cache.low_view()
    analysed = model if stack == "H" else view.model
    blocks = model.blocks if stack == "H" else model.low_blocks
    n = H if stack == "H" else H * L

    def act(i: int, layer: int, kind: str) -> torch.Tensor:
        if stack == "H":
            return cache[f"iter.{i}.blocks.{layer}.{kind}"]
        return cache[f"iter.{i // L}.low.{i % L}.blocks.{layer}.{kind}"]

    steps = A.step_sizes(view)
    assert steps.relative.shape == (n, K, 2)
    for i in range(1, n):
        for layer in range(K):
            want = _relative(act(i, layer, "hook_resid_post"), act(i - 1, layer, "hook_resid_post"))
            torch.testing.assert_close(steps.relative[i, layer].double(), want, rtol=1e-5, atol=0)

    fp = A.fixed_points(view)
    last = [act(n - 1, layer, "hook_resid_post").double().flatten(1) for layer in range(K)]  # [B, pos * d]
    want_cos = torch.nn.functional.cosine_similarity(last[0], last[1], dim=1).mean()  # per prompt, then the mean
    assert fp.layer_cosine[0, 1].item() == pytest.approx(want_cos.item(), rel=1e-5)

    stab = A.attention_stability(analysed, view, tokens)
    assert stab.change_frobenius.shape == (n, K, 2, model.cfg.n_heads)
    for layer in range(K):
        torch.testing.assert_close(stab.kappa[layer].double(), _kappa(blocks[layer]), rtol=1e-4, atol=0)
        a, prev = act(n - 1, layer, "attn.hook_pattern").double(), act(n - 2, layer, "attn.hook_pattern").double()
        torch.testing.assert_close(stab.change_frobenius[n - 1, layer].double(), torch.linalg.norm(a - prev, dim=(-2, -1)),
                                   rtol=1e-4, atol=1e-7)
    if stack == "L":  # the two stacks' weights differ, so kappa tells which stack was read
        assert not torch.allclose(stab.kappa, A.attention_stability(model, cache, tokens).kappa[:, :])


@pytest.mark.parametrize("stack", ["H", "L"])
def test_lens_per_traversal(run, stack):
    """The logit lens reads every traversal's layer outputs through the parameterless norm and the
    unembedding (the way the model reads z_H); at the last H layer of the last H cycle it is the
    model's own prediction."""
    model, _, logits, cache = run
    view = cache if stack == "H" else cache.low_view()
    analysed = model if stack == "H" else view.model
    lens = A.logit_lens(analysed, view, k=3)
    n = H if stack == "H" else H * L
    assert lens.top_ids.shape == (n, K, 2, 8, 3)
    W_U, eps = model.unembed.weight.double(), model.cfg.norm_eps
    for i in (0, n - 1):
        for layer in range(K):
            name = f"iter.{i}.blocks.{layer}.hook_resid_post" if stack == "H" else f"iter.{i // L}.low.{i % L}.blocks.{layer}.hook_resid_post"
            want = (_rms(cache[name].double(), eps) @ W_U.T).softmax(-1)
            torch.testing.assert_close(lens.top_probs[i, layer].double(), want.topk(3, dim=-1).values, rtol=1e-4, atol=1e-6)
            assert torch.equal(lens.top_ids[i, layer], want.topk(3, dim=-1).indices)
    if stack == "H":
        assert torch.equal(lens.top_ids[-1, -1, ..., 0], logits.argmax(-1))


def test_stacks_cannot_be_mixed_up(run):
    model, tokens, _, cache = run
    low = cache.low_view()
    with pytest.raises(ValueError, match="config differs"):
        A.attention_stability(model, low, tokens)  # the H stack's weights with the L stack's patterns
    with pytest.raises(ValueError, match="config differs"):
        A.logit_lens(low.model, cache)
    with pytest.raises(TypeError, match="does not run"):
        low.model.run_with_cache(tokens)


def test_report_for_a_nested_model(run, tmp_path):
    """The report reads the H stack and adds the hierarchical picture and the L stack's sections;
    its numbers equal values computed here from a run with the same L cycles."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from loop_lens.cli import main
    from loop_lens.report import build_report

    model, tokens, _, _ = run
    report = build_report(model, tokens, n_loops=2, l_cycles=3, progress=False)
    titles = [t for t, _ in report.sections]
    assert {"Hierarchical convergence: z_L and z_H", "L stack: convergence of each layer across L cycles",
            "L stack: head stability", "H stack: Head stability"} <= set(titles)
    assert report.numbers["l_cycles"] == 3 and len(report.numbers["low_head_stability"]) == K * model.cfg.n_heads
    _, cache = model.run_with_cache(tokens, n_loops=2, l_cycles=3)
    z_l = [cache[f"iter.{h}.low.{l}.hook_state_post"] for h in range(2) for l in range(3)]
    for i in range(1, 6):  # every L step in running order, mean over the batch
        assert report.numbers["hierarchical"]["l_relative"].reshape(-1)[i].item() == pytest.approx(
            _relative(z_l[i], z_l[i - 1]).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="not available for nested"):
        build_report(model, tokens, corrupt="w1 w2", progress=False)
    generated = build_report(model, tokens, n_loops=2, l_cycles=3, generate=2, progress=False)
    assert "Compute per generated token" in [t for t, _ in generated.sections]
    assert generated.numbers["generation"]["iterations"].tolist() == [2, 2]

    # the command line: --l-cycles reaches the run, and a single-loop model refuses it
    folder = tmp_path / "hrm"
    model.tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    model.tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.save(folder)
    model.tokenizer = None
    out, numbers = tmp_path / "r.html", tmp_path / "r.json"
    assert main(["report", str(folder), "--prompts", "w3 w9 w4 w1 w5", "--n-loops", "2", "--l-cycles", "4", "--out", str(out),
                 "--json", str(numbers), "--quiet"]) == 0
    assert json.loads(numbers.read_text())["l_cycles"] == 4 and "Hierarchical convergence" in out.read_text()
    assert main(["report", "zoo:tiny-random", "--prompts", "ab", "--l-cycles", "2", "--out", str(out), "--quiet"]) == 1


def test_views_on_the_unrolled_depth_and_references(run):
    """The L view's TransformerLens helpers norm as its lens does (the stack's closing norm), and a
    fixed-point reference must run the same L cycles."""
    model, tokens, _, cache = run
    low = cache.low_view()
    last = cache[f"iter.{H - 1}.low.{L - 1}.blocks.{K - 1}.hook_resid_post"]
    torch.testing.assert_close(low.accumulated_resid(apply_ln=True)[-1].double(), _rms(last.double(), model.cfg.norm_eps),
                               rtol=1e-5, atol=1e-6)
    _, other = model.run_with_cache(tokens, l_cycles=L + 1)
    with pytest.raises(ValueError, match="run options .*l_cycles"):
        A.fixed_points(cache, reference=other)
    with pytest.raises(ValueError, match="config differs"):
        A.fixed_points(low, reference=other.low_view())
    _, longer = model.run_with_cache(tokens, n_loops=H + 2, l_cycles=L)
    assert A.fixed_points(cache, reference=longer).reference_loops == H + 2
