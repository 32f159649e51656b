"""Dory (loop_lens/families/dory.py, loop_lens/adapters/dory.py) against transformers' DoryForCausalLM.

Every configuration is drawn by a seeded generator (`random_config`): layer counts, widths, GQA,
attention types per layer, sliding window, RoPE kind and theta per attention type, activation,
biases, tied embeddings, initializer_range, ngpt_alpha_init, the default loop count. Every learned
scale (sqk, s_gate, suv_*, lambda_*, logit_scale) is moved off its init (`perturb`), so each is
read. Checkpoints are written with `save_pretrained` and read back with our adapter.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loop_lens as ll
from loop_lens.adapters.dory import canonical_name, dory_config
from loop_lens.errors import LoadError, UnexpectedTensorsWarning
from loop_lens.families.dory import ACTIVATIONS, ATTENTION_TYPES
from loop_lens.model.hooks import NO_HOOKS, BlockHooks

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DoryForCausalLM"):  # pragma: no cover - older transformers
    pytest.skip("transformers has no DoryForCausalLM (needs >= 5.25)", allow_module_level=True)
from transformers import DoryConfig, DoryForCausalLM  # noqa: E402

torch.set_num_threads(1)
SEEDS = range(8)


def random_config(seed: int, **overrides) -> dict:
    """A tiny Dory config with every switch drawn from `seed`."""
    rng = random.Random(seed)
    H = rng.choice([2, 4])
    n_in, n_rec, n_out = rng.randint(0, 2), rng.randint(1, 3), rng.randint(0, 2)
    n_layers = n_in + n_rec + n_out
    types = [rng.choice(ATTENTION_TYPES) for _ in range(n_layers)]
    if n_layers > 1:  # both kinds in every model with room for them
        types[rng.randrange(n_layers)] = "sliding_attention"
        types[rng.randrange(n_layers)] = "full_attention"
    rope = {}
    for kind in sorted(set(types)):
        params = {"rope_type": rng.choice(["default", "linear", "llama3"]), "rope_theta": rng.choice([50.0, 1e4, 1e6])}
        if params["rope_type"] == "linear":
            params["factor"] = rng.choice([2.0, 4.0])
        if params["rope_type"] == "llama3":
            params.update(factor=rng.choice([2.0, 8.0]), original_max_position_embeddings=16,
                          low_freq_factor=1.0, high_freq_factor=4.0)
        rope[kind] = params
    config = dict(
        vocab_size=rng.choice([37, 61]),
        hidden_size=rng.choice([16, 24, 32]),
        intermediate_size=rng.choice([24, 40]),
        num_hidden_layers=n_layers,
        num_attention_heads=H,
        num_key_value_heads=rng.choice([k for k in (1, 2, 4) if H % k == 0]),
        head_dim=rng.choice([4, 8]),
        n_input_layers=n_in,
        n_recurrent_layers=n_rec,
        n_output_layers=n_out,
        layer_types=types,
        sliding_window=rng.choice([1, 2, 3, 5]),
        rope_parameters=rope,
        hidden_act=rng.choice(sorted(ACTIVATIONS)),
        attention_bias=rng.random() < 0.5,
        mlp_bias=rng.random() < 0.5,
        tie_word_embeddings=rng.random() < 0.3,
        initializer_range=rng.choice([0.0177, 0.02, 0.05]),
        ngpt_alpha_init=rng.choice([0.05, 0.2, 0.5]),
        n_recurrent_loops=rng.randint(1, 4),
        recurrent_kv_cache_mode=rng.choice(["per_loop", "last_loop"]),
        max_position_embeddings=64,
    )
    config.update(overrides)
    return config


@torch.no_grad()
def perturb(model: DoryForCausalLM, seed: int) -> None:
    """Weights of order one, and every learned scale moved off its init (lambdas change sign too:
    transformers uses their absolute value)."""
    g = torch.Generator().manual_seed(1000 + seed)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            unit_rows = "embed" in name or "lm_head" in name  # logits of order one and more
            p.copy_(torch.randn(p.shape, generator=g) / (1.0 if unit_rows else p.shape[1] ** 0.5))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:  # sqk, s_gate, suv_gate, suv_up, lambda_1, lambda_2, logit_scale
            factor = 0.5 + torch.rand(p.shape, generator=g)
            if "lambda" in name:
                factor = factor * torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0)
            p.mul_(factor)


def make_pair(seed: int, tmp_path: Path, eager: bool = False, **overrides):
    """(transformers' model, ours loaded from its save_pretrained folder, the folder)."""
    torch.manual_seed(seed)
    hf = DoryForCausalLM(DoryConfig(**random_config(seed, **overrides))).eval()
    perturb(hf, seed)
    folder = tmp_path / f"dory-{seed}"
    hf.save_pretrained(folder)
    if eager:
        hf.set_attn_implementation("eager")
    return hf, ll.load(folder), folder


def close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """Equal up to `rtol`, relative to each element and to the tensor's magnitude."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max().clamp_min(1e-6)), msg=lambda m: f"{what}: {m}")


def tokens_for(hf: DoryForCausalLM, seed: int, batch: int = 2, pos: int = 11) -> torch.Tensor:
    return torch.randint(0, hf.config.vocab_size, (batch, pos), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf: DoryForCausalLM, ids: torch.Tensor, n_loops: int, **kwargs) -> torch.Tensor:
    saved = hf.config.n_recurrent_loops
    hf.config.n_recurrent_loops = n_loops  # the runtime loop count: DoryModel.forward reads it per call
    try:
        return hf(ids, use_cache=False, **kwargs).logits
    finally:
        hf.config.n_recurrent_loops = saved


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("seed", SEEDS)
def test_logits_default_and_runtime_loops(seed, tmp_path):
    hf, ours, folder = make_pair(seed, tmp_path)
    ids = tokens_for(hf, seed)
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        got = ours(ids)  # the checkpoint's own n_recurrent_loops
    assert want.abs().max() > 1.0  # logits of real size, so the tolerance means something
    close(got, want, 1e-4, "default loops")
    by_loops = {}
    for n in range(1, 9):
        with torch.no_grad():
            by_loops[n] = ours(ids, n_loops=n)
        close(by_loops[n], hf_logits(hf, ids, n), 1e-4, f"n_loops={n}")
    assert not torch.allclose(by_loops[1], by_loops[2])  # the loop count is read
    # transformers' other way of choosing the loop count: from_pretrained(..., n_recurrent_loops=)
    hf3 = DoryForCausalLM.from_pretrained(folder, n_recurrent_loops=3).eval()
    with torch.no_grad():
        close(by_loops[3], hf3(ids, use_cache=False).logits, 1e-4, "from_pretrained n_recurrent_loops=3")


# --------------------------------------------------------------------------- every layer, every loop


def _record(hf: DoryForCausalLM):
    """Forward hooks on transformers' modules; each recurrent layer's fire once per loop."""
    got: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []

    def keep(key, value):
        if value is not None:  # the pattern is None outside eager attention
            got.setdefault(key, []).append(value.detach().clone())

    for i, layer in enumerate(hf.model.layers):
        handles += [
            layer.register_forward_pre_hook(lambda m, a, kw, i=i: keep(("resid_pre", i), a[0] if a else kw["hidden_states"]), with_kwargs=True),
            layer.register_forward_hook(lambda m, a, out, i=i: keep(("resid_post", i), out)),
            layer.self_attn.register_forward_hook(lambda m, a, out, i=i: keep(("pattern", i), out[1])),
            layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, i=i: keep(("attn_out", i), out)),
            layer.pre_feedforward_layernorm.register_forward_pre_hook(lambda m, a, i=i: keep(("resid_mid", i), a[0])),
            layer.post_feedforward_layernorm.register_forward_hook(lambda m, a, out, i=i: keep(("mlp_out", i), out)),
        ]
    return got, handles


OURS = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "pattern": "attn.hook_pattern",
        "attn_out": "hook_attn_out", "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out"}


@pytest.mark.parametrize("seed", SEEDS)
def test_every_layer_at_every_loop(seed, tmp_path):
    hf, ours, _ = make_pair(seed, tmp_path, eager=True)
    cfg = ours.cfg
    n_loops = 3 if seed % 2 else 5
    ids = tokens_for(hf, seed + 100)
    recorded, handles = _record(hf)
    try:
        want_logits = hf_logits(hf, ids, n_loops)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        logits, cache = ours.run_with_cache(ids, n_loops=n_loops)
    close(logits, want_logits, 1e-4, "logits")
    sites = [(f"prelude.{l}", l, 0) for l in range(cfg.n_prelude)]
    sites += [(f"iter.{t}.blocks.{l}", cfg.n_prelude + l, t) for t in range(n_loops) for l in range(cfg.n_block)]
    sites += [(f"coda.{l}", cfg.n_prelude + cfg.n_block + l, 0) for l in range(cfg.n_coda)]
    for prefix, index, call in sites:
        fires = n_loops if prefix.startswith("iter") else 1
        for kind, ours_name in OURS.items():
            assert len(recorded[(kind, index)]) == fires
            close(cache[f"{prefix}.{ours_name}"], recorded[(kind, index)][call], 1e-5, f"{prefix}.{ours_name}")
        # the interpolation hooks are what the two steps add to the unit residual
        close(cache[f"{prefix}.hook_resid_mid"],
              cache[f"{prefix}.ln1.hook_normalized"] + cache[f"{prefix}.hook_attn_lerp"], 1e-6, "attn lerp")
        close(cache[f"{prefix}.hook_resid_post"],
              cache[f"{prefix}.ln2.hook_normalized"] + cache[f"{prefix}.hook_mlp_lerp"], 1e-6, "mlp lerp")
    e = cache[f"prelude.{cfg.n_prelude - 1}.hook_resid_post"] if cfg.n_prelude else cache["hook_embed"]
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    for t in range(n_loops):
        # the loop start: what the first recurrent layer receives, = unit(h) + unit(e)
        close(cache[f"iter.{t}.hook_state_pre"], recorded[("resid_pre", cfg.n_prelude)][t], 1e-5, f"state_pre {t}")
        h = e if t == 0 else cache[f"iter.{t - 1}.hook_state_post"]
        close(cache[f"iter.{t}.hook_state_pre"], unit(h) + unit(e), 1e-5, f"state_pre {t} formula")
        close(cache[f"iter.{t}.hook_state_post"], cache[f"iter.{t}.blocks.{cfg.n_block - 1}.hook_resid_post"], 0, "state_post")


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches(seed, side, tmp_path):
    hf, ours, _ = make_pair(seed, tmp_path)
    ids = tokens_for(hf, seed + 200, batch=3, pos=9)
    lengths = [9, 5, 2]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, 9 - n:] = 1
        else:
            mask[b, :n] = 1
    real = mask.bool()
    n_loops = 1 + seed % 4
    with torch.no_grad():
        got = ours(ids, n_loops=n_loops, attention_mask=mask)
    close(got[real], hf_logits(hf, ids, n_loops, attention_mask=mask)[real], 1e-4, "padded batch")
    # with run_with_cache too: every recurrent layer's output at the real positions
    recorded, handles = _record(hf)
    try:
        hf_logits(hf, ids, n_loops, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        _, cache = ours.run_with_cache(ids, n_loops=n_loops, attention_mask=mask, names_filter=lambda n: n.endswith("hook_resid_post"))
    for t in range(n_loops):
        for layer in range(ours.cfg.n_block):
            want = recorded[("resid_post", ours.cfg.n_prelude + layer)][t]
            close(cache[f"iter.{t}.blocks.{layer}.hook_resid_post"][real], want[real], 1e-5, f"iter {t} layer {layer}")
    # per-row positions (as generate makes them) are tested by the generate tests below


# --------------------------------------------------------------------------- hooks change the computation


def _set_everywhere(name_end: str, value):
    return [(lambda n: n.endswith(name_end), lambda x, hook: torch.full_like(x, value))]


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_interventions_equal_the_reference_with_edited_weights(seed, tmp_path):
    """Zeroing hook_attn_lerp / hook_mlp_lerp everywhere is lambda_1 / lambda_2 = 0; a gate of 0.5
    everywhere is s_gate = 0; hooks on the sphere norms' hook_scale at 1 leave unit inputs alone."""
    hf, ours, _ = make_pair(seed, tmp_path)
    ids = tokens_for(hf, seed + 300)
    n = ours.cfg.default_loops
    cases = [("hook_attn_lerp", 0.0, "lambda_1", 0.0), ("hook_mlp_lerp", 0.0, "lambda_2", 0.0), ("attn.hook_gate", 0.5, "s_gate", 0.0)]
    for hook_end, value, param_end, param_value in cases:
        with torch.no_grad():
            got = ours.run_with_hooks(ids, n_loops=n, fwd_hooks=_set_everywhere(hook_end, value))
        edited = DoryForCausalLM(hf.config).eval()
        edited.load_state_dict(hf.state_dict())
        with torch.no_grad():
            for name, p in edited.named_parameters():
                if name.endswith(param_end):
                    p.fill_(param_value)
        want = hf_logits(edited, ids, n)
        close(got, want, 1e-4, hook_end)
        assert not torch.allclose(want, hf_logits(hf, ids, n))  # the edit matters


def test_no_hooks_and_eager_paths_equal(tmp_path):
    """A layer gives the same output with NO_HOOKS, with an empty container, and on the explicit
    attention path (pattern hooked) instead of SDPA."""
    _, ours, _ = make_pair(4, tmp_path)
    block = ours.blocks[0]
    x = torch.randn(2, 7, ours.cfg.d_model, generator=torch.Generator().manual_seed(0))
    rope = ours._rope(7, x.device)
    with torch.no_grad():
        plain = block(x, NO_HOOKS, None, rope, None)
        hooks = BlockHooks(ours.cfg)
        empty = block(x, hooks, None, rope, None)
        seen = []
        hooks.attn.hook_pattern.add_hook(lambda p, hook: seen.append(p.shape))
        eager = block(x, hooks, None, rope, None)
    assert seen and torch.equal(plain, empty)
    close(eager, plain, 1e-5, "explicit attention vs SDPA")


def test_hook_names(tmp_path):
    """Dory's own sites exist on its layers only, in firing order; a plain model has none."""
    _, ours, _ = make_pair(2, tmp_path)
    names = ours.hook_names(8)
    last = f"iter.7.blocks.{ours.cfg.n_block - 1}"
    for suffix in ("hook_attn_lerp", "hook_mlp_lerp", "attn.hook_gate", "attn.ln_sub.hook_normalized",
                   "mlp.ln_sub.hook_scale", "ln1.hook_scale", "ln2_post.hook_normalized", "attn.hook_rot_q"):
        assert f"{last}.{suffix}" in names
    order = [f"{last}.{s}" for s in ("attn.hook_gate", "attn.ln_sub.hook_scale", "attn.ln_sub.hook_normalized",
                                     "ln1_post.hook_scale", "hook_attn_out", "hook_attn_lerp", "hook_resid_mid",
                                     "mlp.hook_post", "mlp.ln_sub.hook_normalized", "ln2_post.hook_scale",
                                     "hook_mlp_out", "hook_mlp_lerp", "hook_resid_post")]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
    assert {"hook_embed", "iter.0.hook_state_pre", "iter.0.hook_state_post", "ln_final.hook_scale", "hook_latent"} <= set(names)
    assert not any("hook_injected" in n or "exit_logit" in n for n in names)
    assert ll.hook_name("attn_lerp", layer=0, iteration=1) == "iter.1.blocks.0.hook_attn_lerp"
    assert ll.hook_name("mlp_lerp", layer=0, phase="coda") == "coda.0.hook_mlp_lerp"
    with pytest.raises(ValueError):  # a norm nested in attn / mlp gets no short kind (it is named by its path)
        ll.hook_name("scale", layer=0, iteration=0)
    plain = ll.load("zoo:tiny-random").hook_names(2)
    assert not any("lerp" in n or "ln_sub" in n for n in plain)


# --------------------------------------------------------------------------- generation, both KV-cache modes


def cache_safe(seed: int) -> dict:
    """Overrides keeping transformers' own KV cache exact: its DynamicSlidingWindowLayer keeps
    `keys[-window + 1:]`, which for sliding_window=1 is every key (`[0:]`), while its mask assumes
    window - 1 kept; so with a cache it differs from its own forward there. Window 1 is tested
    without a cache (logits, layers, padding); cached comparisons draw windows >= 2."""
    window = random_config(seed)["sliding_window"]
    return {"sliding_window": window if window > 1 else 2 + seed % 3}


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_generate_equals_transformers_in_both_cache_modes(seed, tmp_path):
    """`model.generate` reproduces transformers' generate in `per_loop` and `last_loop` modes
    (left-padded batch, n_loops >= 2 so `last_loop` matters), and `per_loop` equals recomputing
    the whole sequence every step."""
    hf, ours, _ = make_pair(seed, tmp_path, **cache_safe(seed))
    ids = tokens_for(hf, seed + 500, batch=2, pos=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    n_loops, new = 2 + seed % 3, 7
    results = {}
    for mode in ("per_loop", "last_loop"):
        hf.config.recurrent_kv_cache_mode, hf.config.n_recurrent_loops = mode, n_loops
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        got = ours.generate(ids, max_new_tokens=new, n_loops=n_loops, attention_mask=mask, kv_cache_mode=mode,
                            return_type="tokens", stop_at_eos=False, verbose=False)
        # the same tokens (our output writes pad id 0 on the left padding, transformers keeps the input's ids there)
        assert torch.equal(got[:, ids.shape[1]:], want[:, ids.shape[1]:]), mode
        assert torch.equal(got[:, :ids.shape[1]][mask.bool()], ids[mask.bool()])
        results[mode] = got
    recomputed = ours.generate(ids, max_new_tokens=new, n_loops=n_loops, attention_mask=mask, use_past_kv_cache=False,
                               return_type="tokens", stop_at_eos=False, verbose=False)
    assert torch.equal(recomputed, results["per_loop"])
    # the checkpoint's own mode is the default
    hf.config.n_recurrent_loops = n_loops
    default = ours.generate(ids, max_new_tokens=new, n_loops=n_loops, attention_mask=mask, return_type="tokens",
                            stop_at_eos=False, verbose=False)
    assert torch.equal(default, results[ours.dory.kv_cache_mode])


def test_generate_refuses_an_unknown_cache_mode(tmp_path):
    _, ours, _ = make_pair(1, tmp_path)
    with pytest.raises(ValueError, match="kv_cache_mode"):
        ours.generate(torch.tensor([[1, 2]]), max_new_tokens=1, kv_cache_mode="every_loop", stop_at_eos=False, verbose=False)


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_kv_cache_per_loop_equals_recompute_and_last_loop_reads_the_last_loop(seed, tmp_path):
    """Our KV cache after a 5-token prompt, then one token: in `per_loop` mode every (pass, layer)
    has its own keys and the step's logits equal the full forward's (recompute); in `last_loop`
    passes before the last attend to the last pass's keys and write none: the logits equal
    transformers' with that cache mode, and differ from the recompute."""
    from loop_lens.generation import KVCache, _advance, _Plan

    hf, ours, _ = make_pair(seed, tmp_path, **cache_safe(seed))
    prompt = tokens_for(hf, seed + 7, batch=1, pos=5)
    positions, ones = torch.arange(6)[None], torch.ones(1, 6, dtype=torch.long)
    T = 3
    for mode in ("per_loop", "last_loop"):
        # transformers' own generate is the reference for a cached step (its forward called by hand with a
        # cache differs from it when sliding_window=1): the second step's logits read the first token it made
        hf.config.recurrent_kv_cache_mode, hf.config.n_recurrent_loops = mode, T
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
        ids, want = out.sequences[:, :6], out.logits[1].float()
        cache = KVCache()
        with torch.no_grad(), ours._options(kv_cache_mode=mode) as opts:
            plan = _Plan(T, "last", None, 0.0, opts)
            _advance(ours, plan, cache, ids[:, :5], positions[:, :5], ones[:, :5], "embed")
            step, _ = _advance(ours, plan, cache, ids[:, 5:], positions[:, 5:], ones[:, 5:], "embed")
            full = ours(ids, n_loops=T)[:, -1].float()
        close(step, want, 1e-4, mode)
        iter_sites = {s for s in cache.k if s[0] == "iter"}
        if mode == "per_loop":
            assert iter_sites == {("iter", t, l) for t in range(T) for l in range(ours.cfg.n_block)}
            close(step, full, 1e-4, "per_loop = recompute")
        else:
            assert iter_sites == {("iter", T - 1, l) for l in range(ours.cfg.n_block)}  # the earlier passes write nothing
            assert not torch.allclose(step, full, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- the adapter


def _rewrite(folder: Path, out: Path, rename) -> None:
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})


def _two_block(name: str) -> str:
    """save_pretrained's name -> the released layout's (attention and mlp as separate blocks)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        i, rest = int(parts[2]), parts[3:]
        if rest[0] == "self_attn":
            return ".".join(["backbone", "layers", str(2 * i), "mixer", *rest[1:]])
        if rest[0] == "mlp":
            return ".".join(["backbone", "layers", str(2 * i + 1), "mixer", *rest[1:]])
        if rest == ["lambda_1"]:
            return f"backbone.layers.{2 * i}.attn_alpha"
        if rest == ["lambda_2"]:
            return f"backbone.layers.{2 * i + 1}.mlp_alpha"
    return name


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_layouts(seed, tmp_path):
    """The released two-block layout and transformers' module names load to the same model, and
    transformers itself reads the two-block layout the same way."""
    hf, ours, folder = make_pair(seed, tmp_path)
    ids = tokens_for(hf, seed + 400)
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
    names = set(load_file(folder / "model.safetensors"))
    assert any(".g_proj." in n for n in names) and all(n.startswith(("backbone.", "lm_head.")) for n in names)
    two = tmp_path / "two-block"
    _rewrite(folder, two, _two_block)
    assert any(".mixer." in n for n in load_file(two / "model.safetensors"))
    module_names = tmp_path / "module-names"
    _rewrite(folder, module_names, canonical_name)
    assert any(n.startswith("model.embed_tokens") for n in load_file(module_names / "model.safetensors"))
    # a hand-written config: layer_types once per layer, counts not doubled
    single = tmp_path / "single-config"
    _rewrite(folder, single, lambda k: k)
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = config["layer_types"][::2]
    for key in ("num_hidden_layers", "n_input_layers", "n_recurrent_layers", "n_output_layers"):
        config[key] //= 2
    (single / "config.json").write_text(json.dumps(config))
    for path in (two, module_names, single):
        with torch.no_grad():
            close(ll.load(path)(ids), want, 1e-4, path.name)
    with torch.no_grad():
        close(DoryForCausalLM.from_pretrained(two).eval()(ids, use_cache=False).logits, want, 1e-4, "transformers two-block")
    assert ours.cfg.family == "dory" and ours.cfg.n_block == hf.config.n_recurrent_layers
    assert ours.cfg.n_prelude == hf.config.n_input_layers and ours.cfg.n_coda == hf.config.n_output_layers


def _saved_config(seed: int = 0) -> dict:
    return DoryConfig(**random_config(seed)).to_dict()


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda c: c.update(model_type="llama"), "'model_type'"),
        (lambda c: c.update(n_input_layers=c["n_input_layers"] + 1), "'n_input_layers'"),
        (lambda c: c.update(layer_types=["chunked_attention"] * (c["num_hidden_layers"] // 2)), "'layer_types'"),
        (lambda c: c.update(layer_types=c["layer_types"][1:] + ["mlp"]), "'layer_types'"),
        (lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "'rope_parameters'"),
        (lambda c: c.update(rope_parameters={k: {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0} for k in ATTENTION_TYPES}),
         r"'rope_parameters\.\w+_attention': rope_type 'yarn'"),
        (lambda c: c.update(hidden_act="tanh"), "'hidden_act'"),
        (lambda c: c.update(recurrent_kv_cache_mode="every_loop"), "'recurrent_kv_cache_mode'"),
        (lambda c: c.update(sliding_window=0), "'sliding_window'"),
        (lambda c: c.update(hidden_size="abc"), "'hidden_size'"),
        (lambda c: c.update(n_recurrent_loops=0), "'n_recurrent_loops'"),
        (lambda c: c.update(n_recurrent_layers=c["n_recurrent_layers"] + 2), "must equal num_hidden_layers"),
        (lambda c: c.update(initializer_range=-1), "'initializer_range'"),
        (lambda c: c.update(tie_word_embeddings="yes"), "'tie_word_embeddings'"),
    ],
)
def test_bad_config_names_the_field(edit, named):
    config = _saved_config(1)
    dory_config(config)  # the unedited config is fine
    edit(config)
    with pytest.raises(LoadError, match=named):
        dory_config(config)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_bad_tensors_name_the_tensor_and_change_nothing(tmp_path):
    hf, _, folder = make_pair(3, tmp_path)
    tensors = load_file(folder / "model.safetensors")

    def variant(name, edit):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text((folder / "config.json").read_text())
        changed = dict(tensors)
        edit(changed)
        save_file(changed, out / "model.safetensors")
        return out

    scale = next(k for k in tensors if k.endswith("self_attn.sqk"))
    cases = [
        (variant("missing", lambda t: t.pop("lm_head.logit_scale")), "lm_head.logit_scale"),
        (variant("shape", lambda t: t.update({scale: torch.ones(3)})), scale),
        (variant("dtype", lambda t: t.update({scale: t[scale].to(torch.int8)})), scale),
    ]
    for path, named in cases:
        before = _digest(path)
        with pytest.raises(LoadError, match=named.replace(".", r"\.")):
            ll.load(path)
        assert _digest(path) == before
    extra = variant("extra", lambda t: t.update({"backbone.something_else": torch.ones(2)}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ll.load(extra)
    assert any(issubclass(w.category, UnexpectedTensorsWarning) and "something_else" in str(w.message) for w in caught)
    with pytest.raises(LoadError, match="does not exist"):
        ll.load(tmp_path / "nowhere")


# --------------------------------------------------------------------------- stop_at_layer, saving


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_stop_at_layer_is_the_input_of_that_layer(seed, tmp_path):
    """`stop_at_layer=k` returns the residual entering unrolled layer k, as transformers' layer
    receives it (prelude, every pass of the recurrent layers, coda); the full depth returns the
    last layer's output, before the final sphere norm."""
    hf, ours, _ = make_pair(seed, tmp_path)
    ids = tokens_for(hf, seed + 600)
    n_loops = 2 + seed % 2
    recorded, handles = _record(hf)
    try:
        hf_logits(hf, ids, n_loops)
    finally:
        for h in handles:
            h.remove()
    cfg = ours.cfg
    order = [(l, 0) for l in range(cfg.n_prelude)]
    order += [(cfg.n_prelude + l, t) for t in range(n_loops) for l in range(cfg.n_block)]
    order += [(cfg.n_prelude + cfg.n_block + l, 0) for l in range(cfg.n_coda)]
    depth = ours.schedule(n_loops).depth
    assert depth == len(order)
    for k, (index, call) in enumerate(order):
        with torch.no_grad():
            got = ours(ids, n_loops=n_loops, stop_at_layer=k)
        close(got, recorded[("resid_pre", index)][call], 1e-5, f"stop_at_layer={k}")
    with torch.no_grad():
        close(ours(ids, n_loops=n_loops, stop_at_layer=depth), recorded[("resid_post", order[-1][0])][-1], 1e-5, "full depth")
        close(ours(ids, n_loops=n_loops, stop_at_layer=-1), recorded[("resid_pre", order[-1][0])][-1], 1e-5, "-1")


def test_native_save_loads_back(tmp_path):
    """`model.save` writes the native format (Dory's switches in loop_config.json's extra), which
    `ll.load` builds as a Dory model again, with the same logits."""
    hf, ours, _ = make_pair(6, tmp_path)
    ids = tokens_for(hf, 6)
    ours.save(tmp_path / "native")
    again = ll.load(tmp_path / "native")
    assert type(again) is type(ours) and again.dory == ours.dory
    with torch.no_grad():
        assert torch.equal(again(ids, n_loops=3), ours(ids, n_loops=3))


# --------------------------------------------------------------------------- analyses on the sphere


def _unit(x):
    return x / x.float().norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_step_sizes_fixed_points_and_cyclic_similarity_on_the_sphere(seed, tmp_path):
    """The geometric analyses measure Dory's residual on the unit sphere (what every layer and pass
    reads): the step, the fixed-point distance and the cyclic cosine are those of unit(X)
    computed here by hand; streaming gives the cache's numbers."""
    from loop_lens import analysis as A

    hf, ours, _ = make_pair(seed, tmp_path)
    ids = tokens_for(hf, seed + 700, batch=2, pos=7)
    T = 6
    with torch.no_grad():
        _, cache = ours.run_with_cache(ids, n_loops=T)
    X = torch.stack([torch.stack([cache[f"iter.{t}.blocks.{l}.hook_resid_post"] for l in range(ours.cfg.n_block)])
                     for t in range(T)]).float()  # [T, L, B, S, D]
    assert not torch.allclose(X.norm(dim=-1), torch.ones(()))  # the raw residual is not unit: the projection matters
    U = _unit(X)
    steps = A.step_sizes(cache)
    close(steps.norm[1:], (U[1:] - U[:-1]).flatten(-2).norm(dim=-1), 1e-5, "step norm")
    close(steps.per_token[1:], (U[1:] - U[:-1]).norm(dim=-1), 1e-5, "per-token step")
    close(steps.relative[1:], (U[1:] - U[:-1]).flatten(-2).norm(dim=-1) / ids.shape[1] ** 0.5, 1e-5, "relative step")
    fp = A.fixed_points(cache)
    close(fp.distance, (U - U[-1:]).flatten(-2).norm(dim=-1), 1e-5, "fixed-point distance")
    cyc = A.cyclic_similarity(cache)
    flat = U.flatten(3).reshape(T * ours.cfg.n_block, 2, -1)
    flat = flat / flat.norm(dim=-1, keepdim=True)
    close(cyc.matrix, torch.einsum("ibd,jbd->ijb", flat, flat).mean(-1), 1e-5, "cyclic cosine")
    streamed = A.stream_analyses(ours, ids, n_loops=T, attention=False, lens_positions=None)
    close(streamed.steps.norm[1:], steps.norm[1:], 1e-5, "streaming = cache")
    traj = A.pca_trajectory(cache)
    assert traj.coords.shape[:2] == (T, ours.cfg.n_block)
    plain = ll.load("zoo:tiny-random")
    x = torch.randn(2, 3, plain.cfg.d_model)
    assert torch.equal(plain.measured_state(x, "hook_resid_post"), x)  # other families measure states as they are


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_lenses_read_the_per_token_logit_scale(seed, tmp_path):
    """The logit lens of the last layer's output is the model's logits (the final sphere norm and
    lm_head with its per-token logit scale); the coda lens of the last pass's state is too, at
    every loop count; the unembedding matrix W_U includes the scale."""
    from loop_lens import analysis as A

    hf, ours, _ = make_pair(seed, tmp_path)
    ids = tokens_for(hf, seed + 800)
    T = 3
    with torch.no_grad():
        logits, cache = ours.run_with_cache(ids, n_loops=T)
        last = f"coda.{ours.cfg.n_coda - 1}" if ours.cfg.n_coda else f"iter.{T - 1}.blocks.{ours.cfg.n_block - 1}"
        close(A.LogitLens(ours)(cache[f"{last}.hook_resid_post"], f"{last}.hook_resid_post"), logits, 1e-5, "logit lens")
        close(A.CodaLens(ours)(cache[f"iter.{T - 1}.hook_state_post"], f"iter.{T - 1}.hook_state_post"), logits, 1e-5, "coda lens")
        states = A.coda_lens(ours, cache)
        close(states.logits[-1], logits, 1e-5, "coda lens of states")
        for t in range(T - 1):
            close(states.logits[t], hf_logits(hf, ids, t + 1), 1e-4, f"coda lens at t={t} = the model run t+1 loops")
        unit_last = cache["ln_final.hook_normalized"]
        close((unit_last.float() @ ours.W_U.float()), logits, 1e-5, "W_U has the logit scale")
    scale = ours.unembed.token_scale()
    assert not torch.allclose(scale, scale.mean().expand_as(scale))  # perturbed per token


def test_additivity_breaks_name_the_sphere(tmp_path):
    _, ours, _ = make_pair(0, tmp_path)
    with torch.no_grad():
        _, cache = ours.run_with_cache(torch.tensor([[1, 2, 3]]), n_loops=2)
    with pytest.raises(Exception, match="unit sphere"):
        cache.decompose_resid()


def _word_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def test_report_runs_on_a_dory_checkpoint(tmp_path, capsys):
    """`loop-lens report DIR` on a save_pretrained Dory folder (with a tokenizer.json) writes the
    HTML and JSON report over the run's loops."""
    from loop_lens.cli import main

    hf, _, folder = make_pair(5, tmp_path)
    _word_tokenizer(folder, hf.config.vocab_size)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4 w5 w6\nw7 w8 w9 w10\n")
    code = main(["report", str(folder), "--prompts-file", str(prompts), "--n-loops", "4", "--out", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "r.json"), "--quiet", "--generate", "3"])
    assert code in (0, None)
    numbers = json.loads((tmp_path / "r.json").read_text())
    layout = f"({hf.config.n_input_layers}, {hf.config.n_recurrent_layers} x 4, {hf.config.n_output_layers})"
    assert numbers["meta"]["layout"].startswith(layout), numbers["meta"]["layout"]
    assert len(numbers["head_stability"]) == hf.config.n_recurrent_layers * hf.config.num_attention_heads
    assert "Head stability" in (tmp_path / "r.html").read_text()
