"""Inkling 2 (issue 23) against transformers' own Inkling2Loop model, on random tiny configurations.

Every configuration is drawn from a seeded generator (layer types, block size, loop range, heads,
experts, windows, clip thresholds and softcaps small enough to be active), and every weight is
randomised, including the zero-initialised depth-mix / message queries and the message gates, so
no mixing is uniform. transformers' model is the reference: logits, each layer's output at every
pass (forward hooks on its layers, which fire once per pass), router choices per pass, padding.
"""

from __future__ import annotations

import math
import random
import types
import warnings

import pytest
import torch

import loop_lens as ll
from loop_lens.errors import HookNameError
from loop_lens.families import inkling2 as ink

transformers = pytest.importorskip("transformers")
from transformers import Inkling2LoopForCausalLM, Inkling2LoopTextConfig  # noqa: E402

torch.set_num_threads(1)
SEEDS = (0, 1, 2)


def random_config(seed: int) -> Inkling2LoopTextConfig:
    """A tiny Inkling 2 text config drawn from `seed`."""
    r = random.Random(seed)
    per = r.choice([1, 2, 3])
    start = per * r.randint(1, 2)
    end = start + per * r.randint(1, 2)
    n_layers = end + r.randint(0, 2)
    heads_kv = r.choice([1, 2])
    swa_kv = r.choice([1, 2])
    cfg = Inkling2LoopTextConfig(
        vocab_size=48, unpadded_vocab_size=40, hidden_size=r.choice([12, 16]), num_hidden_layers=n_layers,
        num_attention_heads=heads_kv * r.choice([1, 2]), num_key_value_heads=heads_kv, head_dim=r.choice([4, 6]),
        swa_num_attention_heads=swa_kv * r.choice([1, 2]), swa_num_key_value_heads=swa_kv, swa_head_dim=r.choice([4, 6]),
        sliding_window_size=r.randint(2, 4), d_rel=r.randint(2, 4), rel_extent=r.randint(3, 6),
        log_scaling_n_floor=r.randint(1, 4), log_scaling_alpha=0.3, moe_intermediate_size=r.choice([6, 8]),
        n_routed_experts=r.randint(4, 6), num_experts_per_tok=r.randint(1, 3), route_scale=r.choice([1.0, 2.5]),
        n_layers_per_attn_res_block=per, loop_layer_index_start=start, loop_layer_index_end=end,
        loop_num_passes=r.randint(2, 3), loop_gate_rank=r.randint(2, 4), conv_kernel_size=r.randint(2, 4),
        layer_types=[r.choice(["hybrid", "hybrid_sliding"]) for _ in range(n_layers)],
        qk_l2_clip_threshold=2.0, rel_l2_clip_threshold=1.0, mlp_gate_softcap=1.5, mlp_up_softcap=2.0,
        final_logit_softcapping=4.0, eos_token_id=None, pad_token_id=None,
    )
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the reference loop over experts (grouped_mm needs 16-byte strides)
    return cfg


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter (and the router correction bias) drawn from `seed`, scaled by fan-in."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("query"):
                p.copy_(noise)  # zero-initialised in transformers: uniform depth mixes otherwise
            elif name.endswith(".scale") or (p.ndim == 1 and name.endswith("weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif "conv1d" in name or name.endswith("static_weight"):
                p.copy_(0.5 * noise)
            elif name.endswith("relative_position_bias.proj"):
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def pair(seed: int) -> tuple[Inkling2LoopForCausalLM, ink.HookedInkling2Transformer]:
    torch.manual_seed(seed)
    ref = Inkling2LoopForCausalLM(random_config(seed)).eval()
    randomise(ref, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor used
        ours = ll.from_hf(ref)
    return ref, ours


def tokens(seed: int, shape: tuple[int, int] = (2, 9)) -> torch.Tensor:
    return torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(seed))


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    scale = float(want.float().abs().max()) + 1e-6
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def ref_logits(ref: Inkling2LoopForCausalLM, x: torch.Tensor, passes: int | None = None, mask=None) -> torch.Tensor:
    default = ref.config.loop_num_passes
    if passes is not None:
        ref.config.loop_num_passes = passes
    try:
        with torch.no_grad():
            return ref(x, attention_mask=mask, use_cache=False).logits
    finally:
        ref.config.loop_num_passes = default


@pytest.mark.parametrize("seed", SEEDS)
def test_logits_default_and_pass_counts(seed: int) -> None:
    ref, ours = pair(seed)
    x = tokens(seed)
    assert ours.cfg.default_loops == ref.config.loop_num_passes
    with torch.no_grad():
        close(ours(x), ref_logits(ref, x), "default pass count")
        for n in range(1, 6):
            close(ours(x, n_loops=n), ref_logits(ref, x, n), f"n_loops={n}")


class Recorder:
    """Forward hooks on transformers' modules, recording each call's output in call order."""

    def __init__(self, modules: dict[str, torch.nn.Module], pick=lambda out: out):
        self.calls: dict[str, list] = {k: [] for k in modules}
        self.handles = [m.register_forward_hook(lambda mod, args, out, k=k: self.calls[k].append(pick(out)))
                        for k, m in modules.items()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("seed", SEEDS)
def test_every_layer_at_every_pass(seed: int) -> None:
    ref, ours = pair(seed)
    c = ref.config
    start, end = c.loop_layer_index_start, c.loop_layer_index_end
    x = tokens(seed + 10)
    passes = 4
    with Recorder({str(i): layer for i, layer in enumerate(ref.model.layers)}) as rec:
        ref_logits(ref, x, passes)
    _, cache = ours.run_with_cache(x, n_loops=passes)
    for i in range(c.num_hidden_layers):
        calls = rec.calls[str(i)]
        if start <= i < end:
            assert len(calls) == passes
            for t, out in enumerate(calls):
                close(cache[f"iter.{t}.blocks.{i - start}.hook_resid_post"], out, f"layer {i} pass {t}")
        else:
            assert len(calls) == 1
            name = f"prelude.{i}" if i < start else f"coda.{i - end}"
            close(cache[f"{name}.hook_resid_post"], calls[0], name)


@pytest.mark.parametrize("seed", SEEDS)
def test_router_choices_per_pass(seed: int) -> None:
    ref, ours = pair(seed)
    c = ref.config
    start, end = c.loop_layer_index_start, c.loop_layer_index_end
    x = tokens(seed + 20, (3, 7))
    routers = {str(i): ref.model.layers[i].mlp.gate for i in range(start, end)}
    with Recorder(routers) as rec:
        ref_logits(ref, x)
    _, cache = ours.run_with_cache(x, names_filter=lambda n: ".mlp.hook_" in n)
    B, S = x.shape
    for i in range(start, end):
        assert len(rec.calls[str(i)]) == c.loop_num_passes
        for t, (logits, weights, idx) in enumerate(rec.calls[str(i)]):
            site = f"iter.{t}.blocks.{i - start}.mlp"
            order = idx.argsort(-1)
            theirs = idx.gather(-1, order).view(B, S, -1)
            assert torch.equal(cache[f"{site}.hook_experts"], theirs), f"layer {i} pass {t}: router choices differ"
            close(cache[f"{site}.hook_expert_weights"], weights.gather(-1, order).view(B, S, -1), f"{site} weights")
            close(cache[f"{site}.hook_router_logits"], logits.view(B, S, -1), f"{site} logits")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(side: str) -> None:
    ref, ours = pair(3)
    x = tokens(33, (3, 8))
    mask = torch.ones_like(x)
    for b, n in enumerate((0, 3, 5)):
        if n:
            if side == "left":
                mask[b, :n] = 0
            else:
                mask[b, -n:] = 0
    want = ref_logits(ref, x, mask=mask)
    got = ours(x, attention_mask=mask)
    real = mask.bool()
    close(got[real], want[real], f"{side}-padded logits at real tokens")


def test_saved_layout_loads_and_matches(tmp_path) -> None:
    """`save_pretrained` writes the release's names (`model.llm.*`, interleaved experts, padded
    unembedding, split message queries): ll.load reads them to the same model."""
    ref, ours = pair(4)
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ll.load(tmp_path)
    assert isinstance(loaded, ink.HookedInkling2Transformer)
    assert ll.adapters.detect_family({"model_type": "inkling2_loop_text"}, {}) == "inkling2"
    x = tokens(44)
    for name, p in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    close(loaded(x), ref_logits(ref, x), "loaded from save_pretrained")


def test_native_save_round_trip(tmp_path) -> None:
    _, ours = pair(5)
    ours.save(tmp_path / "native")
    back = ll.load(tmp_path / "native")
    x = tokens(55)
    assert torch.equal(back(x), ours(x))


@pytest.mark.parametrize("seed", [6, 0])
def test_greedy_generate_matches_transformers(seed: int) -> None:
    """Greedy tokens with our per-pass KV and convolution caches equal our recompute and
    transformers' `generate` (which keeps per-pass caches too), on a left-padded batch; a
    right-padded batch (re-laid out to the left) gives the same tokens."""
    ref, ours = pair(seed)
    x = tokens(66 + seed, (3, 6))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    mask[2, :4] = 0
    kw = dict(max_new_tokens=6, verbose=False, stop_at_eos=False, return_type="tokens")
    with torch.no_grad():
        want = ref.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    cached = ours.generate(x, attention_mask=mask, **kw)
    recomputed = ours.generate(x, attention_mask=mask, use_past_kv_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, 6:], want[:, 6:])
    assert torch.equal(cached[:, :6][mask.bool()], x[mask.bool()])
    right = torch.zeros_like(x)
    right_mask = torch.zeros_like(mask)
    for b in range(3):
        n = int(mask[b].sum())
        right[b, :n], right_mask[b, :n] = x[b, 6 - n:], 1
    assert torch.equal(ours.generate(right, attention_mask=right_mask, **kw)[:, 6:], want[:, 6:])
    with pytest.raises(ValueError, match="use_past_kv_cache=False"):
        ours.generate(x, max_new_tokens=2, verbose=False, adaptive="argmax")
    assert ours.generate(x, max_new_tokens=2, verbose=False, adaptive="argmax", threshold=1, stop_at_eos=False,
                         use_past_kv_cache=False, return_type="tokens").shape == (3, 8)


@pytest.mark.parametrize("seed", SEEDS)
def test_cached_steps_equal_the_forward(seed: int) -> None:
    """Each cached generation step (one new token against the kept keys, values and convolution
    inputs of every prelude, (pass, layer) and coda site) gives the logits the full forward gives
    at that position, at 1..3 passes; the layers see one new position per step."""
    from loop_lens.generation import KVCache, _advance, _Plan

    _, ours = pair(seed)
    x = tokens(seed + 5, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    ones = torch.ones_like(x)
    for n in (1, 2, 3):
        with torch.no_grad():
            full = ours(x, n_loops=n)
        cache, plan = KVCache(), _Plan(n, "last", None, 0.0)
        seen = []
        hook = (f"iter.{n - 1}.blocks.0.hook_resid_pre", lambda a, hook: seen.append(a.shape[1]))
        with torch.no_grad(), ours.hooks(fwd_hooks=[hook]):
            logits, _ = _advance(ours, plan, cache, x[:, :4], positions[:, :4], ones[:, :4], "zeros")
            close(logits, full[:, 3], f"prompt step, n_loops={n}")
            for i in range(4, 9):
                logits, _ = _advance(ours, plan, cache, x[:, i:i + 1], positions[:, i:i + 1], ones[:, i:i + 1], "zeros")
                close(logits, full[:, i], f"cached step at position {i}, n_loops={n}")
        assert seen == [4, 1, 1, 1, 1, 1]
        assert {name for state in cache.states.values() for name in state} == {"k_conv", "v_conv", "attn_conv", "mlp_conv"}
        assert len(cache.states) == ours.cfg.n_prelude + n * ours.cfg.n_block + ours.cfg.n_coda


def test_hook_names_and_refusals() -> None:
    _, ours = pair(0)
    x = tokens(0)
    names = ours.hook_names(2)
    assert not any(n.startswith("iter.0.") and ".gate_q." in n for n in names)
    assert "iter.1.blocks.0.gate_q.hook_gate" in names and "iter.1.blocks.0.hook_messages" in names
    assert set(ours.run_with_cache(x, n_loops=2)[1].keys()) == set(names)
    with pytest.raises(HookNameError, match="pass 0 receives no messages"):
        ours.run_with_hooks(x, fwd_hooks=[("iter.0.blocks.0.hook_messages", lambda a, hook: a)])
    _, cache = ours.run_with_cache(x)
    for call in (cache.decompose_resid, cache.accumulated_resid, cache.unrolled):
        with pytest.raises(ValueError, match="no residual stream"):
            call()
    with pytest.raises(ValueError, match="no start state"):
        ours(x, seed=1)
    # the pattern and the sink share each query's mass
    pat = cache["iter.0.blocks.0.attn.hook_pattern"]
    close(pat.sum(-1) + cache["iter.0.blocks.0.attn.hook_sink_mass"], torch.ones(pat.shape[:-1]), "pattern + sink")


def test_hooks_intervene() -> None:
    """A hook's return value replaces the activation: forcing every token onto the same experts
    changes the logits, and an identity hook does not."""
    _, ours = pair(1)
    x = tokens(1)
    base = ours(x)
    same = ours.run_with_hooks(x, fwd_hooks=[("iter.1.blocks.0.mlp.hook_experts", lambda a, hook: a)])
    assert torch.equal(same, base)
    k = ours.cfg.extra["num_experts_per_tok"]
    forced = ours.run_with_hooks(x, fwd_hooks=[("iter.1.blocks.0.mlp.hook_experts",
                                               lambda a, hook: torch.arange(k).expand_as(a).contiguous())])
    assert not torch.allclose(forced, base)


# ---------------------------------------------------------------------- analyses on cases known by construction
class _Cache(dict):
    """A dict of hook tensors with the LoopCache attributes the analyses read."""

    def __init__(self, entries: dict, n_loops: int, cfg):
        super().__init__(entries)
        self.n_loops, self.cfg = n_loops, cfg


def test_router_stability_known_cases() -> None:
    E = 4
    experts = {0: torch.tensor([[[0, 1], [2, 3]]]), 1: torch.tensor([[[0, 1], [0, 3]]]), 2: torch.tensor([[[2, 3], [0, 1]]])}
    uniform = torch.zeros(1, 2, E)  # sigmoid(0) everywhere: entropy log(E)
    peaked = torch.tensor([[[20.0, -20, -20, -20], [-20, 20, -20, -20]]])  # one expert: entropy ~0
    entries = {}
    for t in range(3):
        entries[f"iter.{t}.blocks.0.mlp.hook_experts"] = experts[t]
        entries[f"iter.{t}.blocks.0.mlp.hook_router_logits"] = uniform if t < 2 else peaked
    result = ink.router_stability(_Cache(entries, 3, types.SimpleNamespace(n_block=1)))
    assert result.overlap[:, 0, 0].tolist() == [[1.0, 1.0], [1.0, 0.5], [0.0, 0.0]]
    assert torch.allclose(result.entropy[:2], torch.full((2, 1, 1, 2), math.log(E)))
    assert float(result.entropy[2].max()) < 1e-6
    assert result.mean_overlap()[:, 0].tolist() == [1.0, 0.75, 0.0]
    frame = result.to_frame()
    assert len(frame) == 3 * 2 and set(frame.columns) >= {"pass", "layer", "pos", "overlap", "entropy"}
    masked = ink.router_stability(_Cache(entries, 3, types.SimpleNamespace(n_block=1)), attention_mask=torch.tensor([[1, 0]]))
    assert masked.mean_overlap()[:, 0].tolist() == [1.0, 1.0, 0.0]
    assert len(masked.to_frame()) == 3
    result.plot()


def test_message_gates_known_cases() -> None:
    D = 3
    entries = {}
    for t in (1, 2):
        for j, name in enumerate(ink.MESSAGE_INPUTS):
            entries[f"iter.{t}.blocks.0.gate_{name}.hook_gate"] = torch.full((1, 2, D), -0.5 * t)  # |.| = 0.5 t
            entries[f"iter.{t}.blocks.0.gate_{name}.hook_forget"] = torch.full((1, 2, D), 0.25 * j)
    result = ink.message_gates(_Cache(entries, 3, types.SimpleNamespace(n_block=1)))
    assert torch.allclose(result.gate[:, 0], torch.tensor([[0.5] * 4, [1.0] * 4]))
    assert torch.allclose(result.keep[:, 0], torch.tensor([[1.0, 0.75, 0.5, 0.25]] * 2))
    assert len(result.to_frame()) == 2 * 4
    result.plot()
    with pytest.raises(ValueError, match="from pass 1 on"):
        ink.message_gates(_Cache(entries, 1, types.SimpleNamespace(n_block=1)))


def test_analyses_on_a_run() -> None:
    _, ours = pair(2)
    x = tokens(2)
    _, cache = ours.run_with_cache(x, n_loops=3)
    stab = ink.router_stability(cache)
    assert stab.overlap.shape == (3, ours.cfg.n_block, *x.shape)
    assert torch.equal(stab.overlap[0], torch.ones_like(stab.overlap[0]))
    E = ours.cfg.extra["n_routed_experts"]
    assert float(stab.entropy.max()) <= math.log(E) + 1e-5 and float(stab.entropy.min()) > 0
    gates = ink.message_gates(cache)
    assert gates.gate.shape == (2, ours.cfg.n_block, 4)
    assert bool(((gates.gate >= 0) & (gates.gate <= 1)).all()) and bool(((gates.keep >= 0) & (gates.keep <= 2)).all())


# ---------------------------------------------------------------------- quantized experts
def _transformers_dequantize(tensors: dict) -> torch.Tensor:
    from transformers.core_model_loading import Inkling2LoopDequantizeExperts

    patterns = ["w", "w_scale", "w_amax", "w_outer_scale_denominator"]
    out = Inkling2LoopDequantizeExperts().convert({p: tensors[p] for p in patterns if p in tensors}, patterns, ["out"])
    return out["out"]  # bf16: transformers falls back to bf16 without a model


def test_nvfp4_dequantization_matches_transformers() -> None:
    from loop_lens.adapters.inkling2 import dequantize_experts

    g = torch.Generator().manual_seed(7)
    E, rows, cols = 3, 4, 32
    codes = torch.randint(0, 256, (E, rows, cols // 2), generator=g, dtype=torch.int64).to(torch.uint8)
    scale = (torch.rand(E, rows, cols // 16, generator=g) * 2 + 0.1).to(torch.float8_e4m3fn)
    amax, den = torch.rand(E, generator=g) + 0.5, torch.tensor(6.0 * 448.0)
    want = _transformers_dequantize({"w": codes, "w_scale": scale, "w_amax": amax, "w_outer_scale_denominator": den})
    got = dequantize_experts(codes, scale, amax, den)
    assert got.shape == (E, rows, cols) and got.dtype == torch.float32
    assert torch.equal(got.to(torch.bfloat16), want)
    # one code by hand: byte 0x71 = high nibble 7 (6.0), low nibble 1 (0.5); the low nibble is the even element
    one = dequantize_experts(torch.full((1, 1, 8), 0x71, dtype=torch.uint8), torch.ones(1, 1, 1).to(torch.float8_e4m3fn),
                             torch.tensor([2.0]), torch.tensor(1.0))
    assert one[0, 0, :2].tolist() == [1.0, 12.0]


def test_mxfp8_dequantization_matches_transformers() -> None:
    from loop_lens.adapters.inkling2 import dequantize_experts

    g = torch.Generator().manual_seed(8)
    E, rows, cols = 2, 3, 64
    values = torch.randn(E, rows, cols, generator=g).to(torch.float8_e4m3fn)
    scale = torch.randint(120, 134, (E, rows, cols // 32), generator=g).to(torch.uint8)
    want = _transformers_dequantize({"w": values, "w_scale": scale})
    got = dequantize_experts(values, scale)
    assert torch.equal(got.to(torch.bfloat16), want)
    assert torch.equal(got[..., :32], values[..., :32].float() * torch.exp2(scale[..., :1].float() - 127))


def test_quantized_release_loads(tmp_path) -> None:
    """A save_pretrained folder whose experts are replaced by their NVFP4 / MXFP8 quantization
    loads to the model with the dequantized experts."""
    from safetensors.torch import load_file, save_file

    from loop_lens.adapters.inkling2 import dequantize_experts

    ref, _ = pair(9)
    ref.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(9)
    expected = {}
    for i, name in enumerate(sorted(k for k in tensors if k.endswith(("w13_weight", "w2_weight")))):
        E, rows, cols = tensors[name].shape
        if i % 2 == 0 and cols % 16 == 0:
            codes = torch.randint(0, 256, (E, rows, cols // 2), generator=g, dtype=torch.int64).to(torch.uint8)
            quant = {name: codes, name + "_scale": torch.ones(E, rows, cols // 16).to(torch.float8_e4m3fn),
                     name + "_amax": torch.rand(E, generator=g) + 0.5, name + "_outer_scale_denominator": torch.tensor(4.0)}
        elif cols % 32 == 0:
            quant = {name: torch.randn(E, rows, cols, generator=g).to(torch.float8_e4m3fn),
                     name + "_scale": torch.full((E, rows, cols // 32), 126, dtype=torch.uint8)}
        else:
            continue
        tensors.update(quant)
        expected[name] = dequantize_experts(*[quant.get(name + s) for s in ("", "_scale", "_amax", "_outer_scale_denominator")])
    assert expected, "no expert tensor could be quantized at these sizes"
    save_file(tensors, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ll.load(tmp_path)
    state = model.state_dict()
    start = ref.config.loop_layer_index_start
    for name, want in expected.items():
        i = int(name.split(".layers.")[1].split(".")[0])
        stack, l = ("prelude_blocks", i) if i < start else ("blocks", i - start) if i < ref.config.loop_layer_index_end \
            else ("coda_blocks", i - ref.config.loop_layer_index_end)
        if name.endswith("w2_weight"):
            assert torch.equal(state[f"{stack}.{l}.mlp.down"], want)
        else:
            E, rows, d = want.shape
            deinterleaved = want.reshape(E, rows // 2, 2, d).transpose(1, 2).reshape(E, rows, d)
            assert torch.equal(state[f"{stack}.{l}.mlp.gate_up"], deinterleaved)


# ---------------------------------------------------------------------- lenses, step sizes, fixed points, the report
@pytest.mark.parametrize("seed", SEEDS)
def test_lens_state_is_the_carry_the_next_layer_reads(seed: int) -> None:
    """The carry rebuilt from the cache at layer l is what layer l + 1 mixes over: its own depth
    weights (hook_attn_depth, computed inside the forward) come out of it again."""
    _, ours = pair(seed)
    _, cache = ours.run_with_cache(tokens(seed), n_loops=3)
    for t in range(3):
        for l in range(ours.cfg.n_block - 1):
            carry = ours.lens_state(cache, f"iter.{t}.blocks.{l}.hook_resid_post")
            w, _ = ink.depth_attend(ours.blocks[l + 1].attn_query, carry.blocks, carry.hidden)
            close(w, cache[f"iter.{t}.blocks.{l + 1}.hook_attn_depth"], f"pass {t} layer {l + 1} depth weights", 1e-5)
        last = ours.lens_state(cache, f"iter.{t}.hook_state_post")
        assert torch.equal(last.hidden, cache[f"iter.{t}.blocks.{ours.cfg.n_block - 1}.hook_resid_post"])
    with pytest.raises(ValueError, match="loop layer's output"):
        ours.lens_state(cache, "prelude.0.hook_resid_post")
    with pytest.raises(TypeError, match="carry"):
        ll.analysis.lens.LogitLens(ours)(cache["iter.0.blocks.0.hook_resid_post"])


@pytest.mark.parametrize("seed", SEEDS)
def test_lenses_end_in_the_models_logits(seed: int) -> None:
    """The coda lens of a pass's last loop layer (and of its carry) is the model's output at that
    many passes, which matches transformers; so is the logit lens where there is no coda."""
    ref, ours = pair(seed)
    x = tokens(seed)
    T, K = 3, ours.cfg.n_block
    _, cache = ours.run_with_cache(x, n_loops=T)
    lenses = ["coda", "logit"] if ours.cfg.n_coda else ["logit"]
    for name in lenses:
        result = ll.analysis.logit_lens(ours, cache, lens=name, k=3)
        states = ll.analysis.lens.lens_of_states(ours, cache, name)
        assert result.top_ids.shape == (T, K, *x.shape, 3)
        for t in range(T):
            want = ref_logits(ref, x, t + 1)
            if name == "coda" or ours.cfg.n_coda == 0:
                close(states.logits[t], want, f"{name} lens of pass {t}'s carry")
                assert torch.equal(result.top_ids[t, -1, ..., 0], want.argmax(-1)), f"{name} lens top-1, pass {t}"
    # positions= reads the same numbers (the carry is sliced field by field)
    part = ll.analysis.logit_lens(ours, cache, lens="logit", positions=[-1, 2])
    full = ll.analysis.logit_lens(ours, cache, lens="logit")
    close(part.top_probs[..., 0, :], full.top_probs[..., -1, :], "positions=[-1]")
    close(part.top_probs[..., 1, :], full.top_probs[..., 2, :], "positions=[2]")


def test_step_sizes_and_fixed_points_per_pass() -> None:
    """Step sizes and fixed points measure each loop layer's output (the partial sum it returns)
    across passes, as computed by hand from the cache."""
    _, ours = pair(1)
    x = tokens(1)
    T = 4
    _, cache = ours.run_with_cache(x, n_loops=T)
    steps = ll.analysis.step_sizes(cache)
    fp = ll.analysis.fixed_points(cache)
    for l in range(ours.cfg.n_block):
        outs = [cache[f"iter.{t}.blocks.{l}.hook_resid_post"].float() for t in range(T)]
        for t in range(1, T):
            d = (outs[t] - outs[t - 1]).flatten(1).norm(dim=-1)  # per prompt, over positions x width
            close(steps.relative[t, l], d / outs[t].flatten(1).norm(dim=-1), f"relative step, pass {t} layer {l}")
            close(steps.per_token[t, l], (outs[t] - outs[t - 1]).norm(dim=-1), f"per-token step, pass {t} layer {l}")
        for t in range(T):
            flat, star = outs[t].flatten(1), outs[-1].flatten(1)
            close(fp.distance[t, l], (flat - star).norm(dim=-1), f"distance to the last pass, pass {t} layer {l}")
    assert bool(steps.relative[0].isnan().all())


def _word_tokenizer(folder, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def test_report_sections_match_the_analyses() -> None:
    """build_report on an Inkling 2 model: its own sections, with the numbers the analyses give on
    an independent run; no seed is passed (the model has no random start), head stability says why
    it is not computed."""
    from loop_lens.report import build_report

    _, ours = pair(0)
    x = tokens(7, (2, 6))
    mask = torch.ones_like(x)
    report = build_report(ours, x, n_loops=3, progress=False)
    titles = [t for t, _ in report.sections]
    for title in ("Router stabilisation across passes", "Message-gate openness per pass", "Attention mass on the sink",
                  "Convergence of each block layer", "Head stability"):
        assert title in titles
    assert "Not computed" in str(dict(report.sections)["Head stability"])
    _, cache = ours.run_with_cache(x, n_loops=3, attention_mask=mask)
    stab = ink.router_stability(cache)
    assert torch.equal(report.numbers["router_stability"]["overlap"], stab.mean_overlap())
    gates = ink.message_gates(cache)
    close(report.numbers["message_gates"]["gate"], gates.gate, "report message gates")
    lens = ll.analysis.logit_lens(ours, cache, lens="coda" if ours.cfg.n_coda else "logit", positions=[-1])
    assert torch.equal(report.numbers["lens_top1"], lens.top_ids[:, :, 0, 0, 0])
    assert "head_stability" not in report.numbers
    one = build_report(ours, x, n_loops=1, progress=False)
    assert "one pass" in str(dict(one.sections)["Message-gate openness per pass"])


def test_report_cli_on_a_saved_checkpoint(tmp_path) -> None:
    """`loop-lens report DIR` on a save_pretrained Inkling 2 folder with a word-level tokenizer."""
    import json

    from loop_lens.cli import main

    ref, ours = pair(2)
    folder = tmp_path / "ckpt"
    ref.save_pretrained(folder)
    _word_tokenizer(folder, ours.cfg.d_vocab)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4 w5 w6\nw7 w8 w9 w10\n")
    code = main(["report", str(folder), "--prompts-file", str(prompts), "--n-loops", "3", "--out",
                 str(tmp_path / "r.html"), "--json", str(tmp_path / "r.json"), "--quiet", "--generate", "2"])
    assert code in (0, None)
    numbers = json.loads((tmp_path / "r.json").read_text())
    assert numbers["meta"]["family"] == "inkling2"
    assert len(numbers["router_stability"]["overlap"]) == 3 and numbers["router_stability"]["overlap"][0] == \
        [1.0] * ours.cfg.n_block
    assert len(numbers["message_gates"]["gate"]) == 2
    page = (tmp_path / "r.html").read_text()
    assert "Router stabilisation across passes" in page and "Message-gate openness per pass" in page
    assert len(numbers["generation"]["tokens"]) == 2


def _fully_quantized(tmp_path, seed: int):
    """A save_pretrained folder of a random Inkling 2 whose every expert tensor is quantized:
    w13 (columns = d_model = 16) as NVFP4, w2 (columns = d_mlp = 32) as MXFP8 in some layers and
    NVFP4 (a per-expert amax, a scalar denominator) in others."""
    from safetensors.torch import load_file, save_file

    cfg = random_config(seed)
    cfg.hidden_size, cfg.moe_intermediate_size = 16, 32
    torch.manual_seed(seed)
    ref = Inkling2LoopForCausalLM(cfg).eval()
    randomise(ref, seed)
    ref.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(100 + seed)
    for i, name in enumerate(sorted(k for k in tensors if k.endswith(("w13_weight", "w2_weight")))):
        E, rows, cols = tensors[name].shape
        if name.endswith("w2_weight") and i % 4 == 1:
            tensors[name] = torch.randn(E, rows, cols, generator=g).to(torch.float8_e4m3fn)
            tensors[name + "_scale"] = torch.randint(118, 128, (E, rows, cols // 32), generator=g).to(torch.uint8)
        else:
            tensors[name] = torch.randint(0, 256, (E, rows, cols // 2), generator=g, dtype=torch.int64).to(torch.uint8)
            tensors[name + "_scale"] = (torch.rand(E, rows, cols // 16, generator=g) + 0.25).to(torch.float8_e4m3fn)
            tensors[name + "_amax"] = torch.rand(E, generator=g) + 0.5
            tensors[name + "_outer_scale_denominator"] = torch.tensor(6.0 * 448.0)
    save_file(tensors, path)
    return tmp_path


@pytest.mark.parametrize("seed", [0, 4])
def test_packed_experts_equal_the_dequantized_model(tmp_path, seed: int) -> None:
    """`ll.load(path, packed_experts=True)` keeps NVFP4 / MXFP8 experts packed and dequantizes one
    expert per call: logits at several pass counts, padded batches, every cached tensor and greedy
    generation are bit-equal to the model whose experts were dequantized at load."""
    folder = _fully_quantized(tmp_path / "q", seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor used in both modes
        dense = ll.load(folder)
        packed = ll.load(folder, packed_experts=True)
    assert isinstance(packed, ink.PackedInkling2Transformer) and not isinstance(dense, ink.PackedInkling2Transformer)
    assert not any(".mlp.gate_up" in n or ".mlp.down" in n for n in packed.state_dict())
    kinds = {type(m.factor).__name__ for m in packed.modules() if isinstance(m, ink.PackedExperts)}
    assert kinds == {"Tensor", "NoneType"}, kinds  # NVFP4 (a factor) and MXFP8 (none) both kept packed
    layer = packed.blocks[0].mlp
    assert layer.gate_up.weight.dtype == torch.uint8 and layer.gate_up.scale.dtype == torch.float8_e4m3fn
    for e in range(layer.gate_up.shape[0]):
        assert torch.equal(layer.gate_up.expert(e), dense.blocks[0].mlp.gate_up[e])
        assert torch.equal(layer.down.expert(e), dense.blocks[0].mlp.down[e])
    x = tokens(seed + 20, (3, 7))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        for n in (1, 2, 3):
            assert torch.equal(packed(x, n_loops=n), dense(x, n_loops=n)), f"n_loops={n}"
        assert torch.equal(packed(x, attention_mask=mask), dense(x, attention_mask=mask))
    _, got = packed.run_with_cache(x, n_loops=2)
    _, want = dense.run_with_cache(x, n_loops=2)
    assert set(got.keys()) == set(want.keys())
    for name in want.keys():
        assert torch.equal(got[name], want[name]), name
    kw = dict(max_new_tokens=4, verbose=False, stop_at_eos=False, return_type="tokens", attention_mask=mask)
    assert torch.equal(packed.generate(x, **kw), dense.generate(x, **kw))
    with pytest.raises(ll.errors.SaveError, match="packed"):
        packed.save(tmp_path / "native")


def test_packed_experts_refusals(tmp_path) -> None:
    ref, ours = pair(4)
    ref.save_pretrained(tmp_path / "dense")
    with pytest.raises(ll.LoadError, match="not quantized"):
        ll.load(tmp_path / "dense", packed_experts=True)
    with pytest.raises(ll.LoadError, match="packed_experts must be True or False"):
        ll.load(tmp_path / "dense", packed_experts="yes")
    with pytest.raises(ll.LoadError, match="not known for family"):
        ll.load(tmp_path / "dense", pack=True)
    ours.save(tmp_path / "native")
    with pytest.raises(ll.LoadError, match="native"):
        ll.load(tmp_path / "native", packed_experts=True)
