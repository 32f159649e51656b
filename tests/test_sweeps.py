"""The random-init sweep pins the finding of docs/random-init-sweep.md on a small width: Huginn-style
blocks with injection converge when the embedding is large against the renormalised state (Huginn's
embed scale sqrt(d_model)) and the adapter passes the state through (near [I | I] / sqrt 2), and
not otherwise."""

from __future__ import annotations

import math

import pytest

from loop_lens.analysis.sweeps import random_init_sweep

D = 32
SMALL = dict(styles=("huginn",), injections=(True,), seeds=(0, 1), n_loops=48, seq_len=8, batch=1, d_model=D,
             n_heads=2, tol=1e-3, progress=False)


@pytest.fixture(scope="module")
def unscaled():
    """The sweep's defaults: embeddings N(0, 0.02) at scale 1, so |e| / |s| is about 0.02."""
    return random_init_sweep(**SMALL).frame


@pytest.fixture(scope="module")
def huginn_scaled():
    """The same with the embeddings times sqrt(d_model), as Huginn scales them."""
    return random_init_sweep(**SMALL, embed_scale=math.sqrt(D)).frame


def test_unscaled_embedding_leaves_huginn_above_tolerance(unscaled):
    assert unscaled["embed_to_state"].between(0.015, 0.025).all()
    assert not unscaled["converged"].any()
    assert (unscaled["final_rel_step"] > 2e-3).all()  # still about 6e-3 at T = 48


def test_huginn_embedding_scale_converges_below_tolerance(huginn_scaled):
    assert (huginn_scaled["embed_to_state"] > 0.1).all()
    assert huginn_scaled["converged"].all()
    assert (huginn_scaled["convergence_iter"] <= 36).all()  # 26-28 measured
    assert (huginn_scaled["final_rel_step"] < 1e-3).all()


def test_adapter_drawn_like_the_weights_stops_convergence():
    frame = random_init_sweep(**SMALL, embed_scale=math.sqrt(D), adapter_init="normal").frame
    assert not frame["converged"].any()
    assert (frame["final_rel_step"] > 0.1).all()  # 1.0-1.7 measured: the state keeps turning


@pytest.mark.parametrize("option", [dict(init="xavier"), dict(adapter_init="zeros"), dict(start="embed")])
def test_unknown_options_raise(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        random_init_sweep(**SMALL, **option)
