"""Logit lens and coda lens per iteration (Lu et al. 2025 on Huginn; the paper's section 3)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from loop_lens.cache import LoopCache
from loop_lens.model.hooks import NO_HOOKS


def unembed_resid(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """`unembed(final_norm(x))` for any residual-stream tensor: the logit lens."""
    return model.unembed(model.ln_final(resid, NO_HOOKS))


def logit_lens_of_states(model, cache: LoopCache) -> Float[Tensor, "n_loops batch pos d_vocab"]:
    """Logit lens on the state leaving each iteration: `lm_head(ln_f(s_t))`.

    For models whose state is already normed every iteration (Ouro) the norm is not applied a
    second time, so this equals the "exit at step t" logits.
    """
    states = cache.stack("hook_state_post")
    with torch.no_grad():
        if model.cfg.iter_norm:
            return model.unembed(states)
        return unembed_resid(model, states)


def coda_lens(model, cache: LoopCache) -> Float[Tensor, "n_loops batch pos d_vocab"]:
    """Coda lens: each iteration's state run through the rest of the network,
    `lm_head(ln_f(coda(ln_f(s_t))))` for Huginn (no inner ln_f for retrofitted models)."""
    states = cache.stack("hook_state_post")
    with torch.no_grad():
        return torch.stack([model.finish(s) for s in states])
