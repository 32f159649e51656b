"""nnsight on a looped model: read and patch iteration t, compared with loop_lens's own hooks."""

from __future__ import annotations

import warnings

import torch

import loop_lens as ll
from tests.conftest import require

require("nnsight")

T, ITER, LAYER = 4, 2, 1
NAME = f"iter.{ITER}.blocks.{LAYER}.hook_resid_post"


def _setup():
    model = ll.load("zoo:khop-ouro")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no attribute-clash warning
        nm = ll.interop.nnsight(model, n_loops=T)
    return model, tokens, nm


def test_nnsight_reads_iteration_t_as_our_cache_does():
    model, tokens, nm = _setup()
    with nm.trace(tokens, n_loops=T):
        got = nm.loops[str(ITER)].blocks[LAYER].hook_resid_post.output.save()
        logits = nm.output.save()
    _, cache = model.run_with_cache(tokens, n_loops=T, names_filter=[NAME])
    assert torch.equal(got, cache[NAME])
    assert torch.equal(logits, model(tokens, n_loops=T))
    assert str(ITER) in model.iter  # pinned: still there after our run_with_cache reset its hooks


def test_nnsight_patches_iteration_t_as_our_hooks_do():
    model, tokens, nm = _setup()
    with nm.trace(tokens, n_loops=T):
        nm.loops[str(ITER)].blocks[LAYER].hook_resid_post.output[:, 3] = 0
        patched = nm.output.save()

    def zero(act, hook):
        act = act.clone()
        act[:, 3] = 0
        return act

    ours = model.run_with_hooks(tokens, n_loops=T, fwd_hooks=[(NAME, zero)])
    assert torch.equal(patched, ours)
    assert not torch.equal(patched, model(tokens, n_loops=T))
