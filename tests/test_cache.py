"""LoopCache keeps TransformerLens's promises: every public ActivationCache method works on the
loop cache over the unrolled depth (as on `cache.unrolled()`), or raises naming the call to make."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import tiny_model
from transformer_lens import ActivationCache

import loop_lens as ll
from loop_lens import LoopCache

N_LOOPS = 3
PUBLIC = sorted({n for n in dir(ActivationCache) if not n.startswith("_")} | {"__getitem__", "__iter__", "__len__"})
RETURNS_CACHE = sorted(
    n for n in PUBLIC if "ActivationCache" in str(inspect.signature(getattr(ActivationCache, n)).return_annotation)
)
ADDITIVE = "tiny:pre"  # pre-norm, no injection, start state = prelude output: parts sum to the whole


class Run:
    """One cached run and the model it came from."""

    def __init__(self, name: str):
        if name.startswith("zoo:"):
            self.model = ll.load(name)
        else:
            style, _, extra = name.removeprefix("tiny:").partition("/")
            self.model = tiny_model(style, **({"n_coda": 0} if extra == "no-coda" else {}))
        self.tokens = torch.randint(0, self.model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
        self.logits, self.cache = self.model.run_with_cache(self.tokens, n_loops=N_LOOPS, exit="last")
        self.depth = self.model.cfg.depth(N_LOOPS)

    def fresh(self) -> LoopCache:
        """A LoopCache of the same tensors that a mutating call cannot share with another."""
        c = self.cache
        return LoopCache(dict(c.cache_dict), c.model, c.n_loops, has_batch_dim=c.has_batch_dim)

    def native(self, kind: str, depth: int) -> str:
        """The loop-native name of `kind` at an unrolled depth, written out from the layout."""
        p, k = self.model.cfg.n_prelude, self.model.cfg.n_block
        if depth < p:
            return f"prelude.{depth}.{kind}"
        if depth < p + N_LOOPS * k:
            t, layer = divmod(depth - p, k)
            return f"iter.{t}.blocks.{layer}.{kind}"
        return f"coda.{depth - p - N_LOOPS * k}.{kind}"


@functools.cache
def cached_run(name: str) -> Run:
    """Each model is loaded and run once for the whole module (tests copy before mutating)."""
    return Run(name)


@pytest.fixture(params=["zoo:tiny-random", "zoo:khop-huginn", ADDITIVE])
def run(request) -> Run:
    return cached_run(request.param)


def tl_name(cache: ActivationCache, key: str) -> str:
    return cache.unrolled_name(key) if isinstance(cache, LoopCache) else key


def toggled(cache: ActivationCache) -> list[bool]:
    before = torch.is_grad_enabled()
    try:
        cache.toggle_autodiff(False)
        off = torch.is_grad_enabled()
        cache.toggle_autodiff(True)
        return [off, torch.is_grad_enabled()]
    finally:
        torch.set_grad_enabled(before)


# For every public ActivationCache method: a call whose result on a LoopCache must equal its
# result on `cache.unrolled()`, or (where the method cannot make sense for the model) the error
# and the replacement its message must name. Keys are compared after `unrolled_name`.
Call = Callable[[ActivationCache, Run], Any]
SAME: dict[str, Call] = {
    "__getitem__": lambda c, r: [
        c["pattern", 0],
        c["resid_post", -1],
        c["scale", 2, "ln1"],
        c["blocks.3.hook_resid_pre"],
        c["k2"],
        c["hook_embed"],
        c["scale"],
    ],
    "__iter__": lambda c, r: [tl_name(c, k) for k in c],
    "__len__": lambda c, r: len(c),
    "keys": lambda c, r: [tl_name(c, k) for k in c.keys()],
    "values": lambda c, r: list(c.values()),
    "items": lambda c, r: [(tl_name(c, k), v) for k, v in c.items()],
    "accumulated_resid": lambda c, r: [
        c.accumulated_resid(return_labels=True),
        c.accumulated_resid(apply_ln=True),
        c.accumulated_resid(layer=4, incl_mid=True, apply_ln=True, pos_slice=-1, return_labels=True),
        c.accumulated_resid(layer=2, mlp_input=True, apply_ln=True, return_labels=True),
    ],
    "apply_ln_to_stack": lambda c, r: [
        c.apply_ln_to_stack(c.accumulated_resid(layer=4), layer=4),
        c.apply_ln_to_stack(c.accumulated_resid(layer=4), layer=4, mlp_input=True),
        c.apply_ln_to_stack(c.accumulated_resid()),
        c.apply_ln_to_stack(c.accumulated_resid(), recompute_ln=True),
    ],
    "logit_attrs": lambda c, r: [
        c.logit_attrs(c.accumulated_resid(), r.tokens),
        c.logit_attrs(c.accumulated_resid(pos_slice=-1), r.tokens[:, 0], incorrect_tokens=r.tokens[:, 1], pos_slice=-1),
    ],
    "logit_lens": lambda c, r: c.logit_lens(positions=-1),
    "stack_activation": lambda c, r: [
        c.stack_activation("resid_post"),
        c.stack_activation("pattern", layer=4),
        c.stack_activation("scale", sublayer_type="ln2"),
    ],
    "stack_head_results": lambda c, r: [
        c.stack_head_results(return_labels=True),
        c.stack_head_results(layer=5, incl_remainder=True, pos_slice=-1, apply_ln=True),
    ],
    "stack_neuron_results": lambda c, r: [
        c.stack_neuron_results(3, return_labels=True, incl_remainder=True, neuron_slice=[0, 5]),
        c.stack_neuron_results(r.depth, neuron_slice=[1], apply_ln=True, project_output_onto=r.model.W_U[:, 0]),
    ],
    "get_neuron_results": lambda c, r: [
        c.get_neuron_results(r.depth - 1),
        c.get_neuron_results(2, neuron_slice=[3, 4], pos_slice=-1),
    ],
    "compute_head_results": lambda c, r: [
        c.compute_head_results(),
        c["result", 4],
        c.stack_activation("result", sublayer_type="attn"),
    ],
    "ssm_layers": lambda c, r: c.ssm_layers(),
    "apply_slice_to_batch_dim": lambda c, r: [c.apply_slice_to_batch_dim(1), c.apply_slice_to_batch_dim([1, 0])],
    "remove_batch_dim": lambda c, r: c.apply_slice_to_batch_dim(slice(0, 1)).remove_batch_dim(),
    "to": lambda c, r: c.to("meta"),
    "toggle_autodiff": lambda c, r: toggled(c),
}
DECOMPOSITIONS: dict[str, Call] = {
    "decompose_resid": lambda c, r: [
        c.decompose_resid(return_labels=True),
        c.decompose_resid(layer=3, mlp_input=True, mode="attn", apply_ln=True),
    ],
    "get_full_resid_decomposition": lambda c, r: [
        c.get_full_resid_decomposition(return_labels=True),
        c.get_full_resid_decomposition(layer=4, expand_neurons=False, apply_ln=True, pos_slice=-1),
    ],
}
NO_SSM = r"cache\.stack\('hook_state_post'\)"
RAISES: dict[str, tuple[Call, type, str]] = {
    "compute_ssm_state": (lambda c, r: c.compute_ssm_state(), TypeError, NO_SSM),
    "compute_ssm_effective_attention": (lambda c, r: c.compute_ssm_effective_attention(), TypeError, NO_SSM),
}
NOT_ADDITIVE = r"cache\.accumulated_resid\(\)"


def same(a: Any, b: Any) -> bool:
    """Equal values, tensors bit for bit (on the meta device: shape and dtype)."""
    if isinstance(a, ActivationCache) or isinstance(b, ActivationCache):
        da, db = (x.unrolled().cache_dict if isinstance(x, LoopCache) else x.cache_dict for x in (a, b))
        return (
            a.has_batch_dim == b.has_batch_dim and list(da) == list(db) and same(list(da.values()), list(db.values()))
        )
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
            return False
        return a.device.type == "meta" or torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _additive(run: Run) -> bool:
    """Whether the layer outputs of this model sum to its residual stream (written from the config)."""
    c = run.model.cfg
    return (
        c.norm_placement == "pre"
        and c.injection == "none"
        and c.initial_state == "embed"
        and not (c.iter_norm or c.norm_after_loop)
    )


def test_every_public_activation_cache_method_has_an_expectation():
    covered = set(SAME) | set(DECOMPOSITIONS) | set(RAISES)
    assert not set(PUBLIC) - covered, (
        f"new ActivationCache methods: decide how LoopCache handles {sorted(set(PUBLIC) - covered)}"
    )
    # what we expect of methods this TransformerLens version lacks (logit_lens is 4.x only) is moot
    assert covered - set(PUBLIC) <= {"logit_lens"}


@pytest.mark.parametrize("name", PUBLIC)
def test_method_on_loop_cache_is_the_method_on_unrolled(run, name):
    if name in RAISES:
        call, error, replacement = RAISES[name]
    elif name in DECOMPOSITIONS and not _additive(run):
        call, error, replacement = DECOMPOSITIONS[name], ValueError, NOT_ADDITIVE
    else:
        call = SAME.get(name) or DECOMPOSITIONS[name]
        loop, unrolled = run.fresh(), run.fresh().unrolled()
        ours = call(loop, run)
        assert same(ours, call(unrolled, run))
        if name == "ssm_layers":
            assert ours == []  # a looped transformer has no SSM mixer layers
        elif name not in ("__len__", "toggle_autodiff"):  # a method that did nothing would pass vacuously
            assert ours is not None and not (isinstance(ours, list) and not ours)
        return
    for cache in (run.fresh(), run.fresh().unrolled()):
        with pytest.raises(error, match=replacement):
            call(cache, run)


@pytest.mark.parametrize("name", RETURNS_CACHE)
def test_methods_returning_a_cache_return_a_loop_cache(run, name):
    out = SAME[name](run.fresh(), run)
    for cache in out if isinstance(out, list) else [out]:
        assert isinstance(cache, LoopCache) and cache.n_loops == N_LOOPS
        assert cache.stack("resid_post").shape[:2] == (N_LOOPS, run.model.cfg.n_block)
        assert cache["iter.2.blocks.1.hook_resid_post"].shape == cache["resid_post", cache.depth_index(2, 1)].shape


def test_returns_cache_finds_the_cache_returning_methods():
    assert {"apply_slice_to_batch_dim", "remove_batch_dim", "to"} <= set(RETURNS_CACHE)


def test_tuple_and_block_keys_are_the_unrolled_depth(run):
    cache = run.cache
    for k in range(run.depth):
        for kind in ("hook_resid_pre", "attn.hook_pattern", "ln1.hook_scale"):
            expected = cache.cache_dict[run.native(kind, k)]
            assert cache[kind.split("hook_")[1], k, "ln1" if "ln1" in kind else None] is expected
            assert cache[f"blocks.{k}.{kind}"] is expected
            assert cache[kind.split("hook_")[1], k - run.depth, "ln1" if "ln1" in kind else None] is expected
    assert cache["pattern", cache.depth_index(1, 0)] is cache["iter.1.blocks.0.attn.hook_pattern"]
    with pytest.raises(KeyError, match="outside the unrolled depth"):
        cache["resid_post", run.depth]
    with pytest.raises(KeyError, match=r"no such hook point in this run .*n_loops=3"):
        cache["iter.7.blocks.0.hook_resid_post"]


def test_a_filtered_out_activation_names_the_filter():
    model = cached_run(ADDITIVE).model
    _, cache = model.run_with_cache(cached_run(ADDITIVE).tokens, n_loops=N_LOOPS, names_filter=lambda n: "resid" in n)
    assert cache["resid_pre", 2] is cache["iter.0.blocks.1.hook_resid_pre"]
    with pytest.raises(KeyError, match="names_filter"):
        cache["pattern", 2]


def test_loop_native_names_still_work(run):
    cache, cfg = run.cache, run.model.cfg
    assert cache.n_loops == N_LOOPS
    assert cache.stack("resid_post").shape == (N_LOOPS, cfg.n_block, 2, 6, cfg.d_model)
    torch.testing.assert_close(
        cache.stack("resid_post")[2, 1], cache["iter.2.blocks.1.hook_resid_post"], rtol=0, atol=0
    )
    assert cache.stack("state_post").shape == (N_LOOPS, 2, 6, cfg.d_model)
    for k in range(run.depth):
        phase, t, layer = cache.loop_index(k)
        assert run.native("x", k) == (f"iter.{t}.blocks.{layer}.x" if phase == "loop" else f"{phase}.{layer}.x")
        if phase == "loop":
            assert cache.depth_index(t, layer) == k
        assert cache.loop_name(cache.unrolled_name(run.native("hook_resid_post", k))) == run.native(
            "hook_resid_post", k
        )
    assert isinstance(cache.unrolled(), ActivationCache)


def test_accumulated_resid_is_the_final_norm_of_each_cached_residual(run):
    """Written out from loop-native names, independently of the unrolled renaming."""
    names = [run.native("hook_resid_pre", k) for k in range(run.depth)] + [run.native("hook_resid_post", run.depth - 1)]
    raw = torch.stack([run.cache.cache_dict[n] for n in names])
    stack, labels = run.cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == [f"{k}_pre" for k in range(run.depth)] + ["final_post"]
    torch.testing.assert_close(stack, run.model.ln_final(raw))
    torch.testing.assert_close(stack[-1] @ run.model.W_U, run.logits, atol=1e-5, rtol=1e-5)
    if hasattr(ActivationCache, "logit_lens"):  # TransformerLens 4.x only
        lens = run.cache.logit_lens(positions=-1)
        torch.testing.assert_close(lens.values[-1], run.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_ouro_last_iteration_norm_is_the_final_norm():
    run = cached_run("tiny:ouro/no-coda")
    assert not run.model.cfg.final_norm and run.model.cfg.iter_norm
    stack = run.cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(stack[-1] @ run.model.W_U, run.logits, atol=1e-5, rtol=1e-5)
    assert run.cache["scale"] is run.cache[f"iter.{N_LOOPS - 1}.ln_state.hook_scale"]
    normed = run.cache.apply_ln_to_stack(run.cache.accumulated_resid()[-1:])[0]
    torch.testing.assert_close(normed, run.cache[f"iter.{N_LOOPS - 1}.ln_state.hook_normalized"])


@pytest.mark.parametrize("style", ["pre", "gpt2"])
def test_decompositions_sum_to_the_residual_stream(style):
    run = cached_run(f"tiny:{style}")
    cache, model = run.cache, run.model
    final = cache[run.native("hook_resid_post", run.depth - 1)]
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[: 2 if style == "gpt2" else 1] == (["embed", "pos_embed"] if style == "gpt2" else ["embed"])
    assert len(labels) == len(parts) == (2 if style == "gpt2" else 1) + 2 * run.depth
    torch.testing.assert_close(parts.sum(0), final, atol=1e-5, rtol=1e-5)
    for k in (1, 4):
        torch.testing.assert_close(
            cache.decompose_resid(layer=k).sum(0), cache[run.native("hook_resid_pre", k)], atol=1e-5, rtol=1e-5
        )
    full, full_labels = cache.get_full_resid_decomposition(return_labels=True)
    assert full_labels[0] == "L0H0" and full_labels[-1] == "bias"
    torch.testing.assert_close(full.sum(0), final, atol=1e-4, rtol=1e-4)
    # direct logit attribution sums to the logit (plus the final LayerNorm's bias, which TL folds into b_U)
    attrs = cache.logit_attrs(parts, tokens=run.tokens[:, -1:].expand_as(run.tokens))  # [batch, pos], as TL 3.9 and 4 take it
    bias = 0 if model.ln_final.bias is None else model.ln_final.bias @ model.W_U[:, run.tokens[:, -1]]
    torch.testing.assert_close(
        attrs.sum(0)[:, -1] + bias, run.logits[torch.arange(2), -1, run.tokens[:, -1]], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("name", ["zoo:tiny-random", "zoo:khop-huginn"])
def test_decompositions_refuse_models_whose_parts_do_not_sum(name):
    run = cached_run(name)
    cache = run.cache
    final = cache[run.native("hook_resid_post", run.depth - 1)]
    outputs = [cache["attn_out", k] + cache["mlp_out", k] for k in range(run.depth)]
    assert not torch.allclose(cache["embed"] + sum(outputs), final, atol=1e-2)  # the refusal is warranted
    with pytest.raises(ValueError, match=r"injection='linear'.*accumulated_resid"):
        cache.decompose_resid()


def test_head_results_land_in_the_loop_cache_and_sum_to_attn_out():
    run = cached_run(ADDITIVE)
    cache = run.fresh()
    cache.compute_head_results()
    results = cache.stack("attn.hook_result")
    assert results.shape == (N_LOOPS, run.model.cfg.n_block, 2, 6, run.model.cfg.n_heads, run.model.cfg.d_model)
    for k in range(run.depth):
        assert run.native("attn.hook_result", k) in cache.cache_dict
        torch.testing.assert_close(cache["result", k].sum(-2), cache["attn_out", k], atol=1e-5, rtol=1e-5)


def test_batch_slices_keep_iterations(run):
    sliced = run.cache.apply_slice_to_batch_dim(slice(1, 2))
    assert isinstance(sliced, LoopCache) and sliced.has_batch_dim
    torch.testing.assert_close(sliced.stack("resid_post"), run.cache.stack("resid_post")[:, :, 1:2], rtol=0, atol=0)
    single = run.cache.apply_slice_to_batch_dim(0)
    assert isinstance(single, LoopCache) and not single.has_batch_dim
    assert single.accumulated_resid().shape == (run.depth + 1, 6, run.model.cfg.d_model)
    torch.testing.assert_close(single["pattern", 2], run.cache["pattern", 2][0], rtol=0, atol=0)
