"""What every causal tool here shares: the metric's type, token checks, the start-state seed and
a no-gradient run that keeps activations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from loop_lens.checks import integer

Metric = Callable[[Tensor], Tensor]
"""Logits [batch, pos, d_vocab] -> a scalar tensor (differentiable for attribution patching)."""


def _tokens(model: Any, tokens: Any, name: str) -> Int[Tensor, "batch pos"]:
    """Token ids [batch, pos] from text or a [pos] / [batch, pos] integer tensor."""
    if isinstance(tokens, str):
        if model.tokenizer is None:
            raise ValueError(f"{name} is text, but the model has no tokenizer; pass token ids [batch, pos]")
        tokens = model.to_tokens(tokens)
    if not isinstance(tokens, Tensor):
        raise ValueError(f"{name} must be token ids [batch, pos] (or text), got {type(tokens).__name__}")
    return model.as_tokens(tokens, name)[0]


def _pair(model: Any, clean: Any, corrupt: Any) -> tuple[Tensor, Tensor]:
    """Clean and corrupted token ids, which must have the same shape (patching aligns positions)."""
    c, k = _tokens(model, clean, "clean"), _tokens(model, corrupt, "corrupt")
    if c.shape != k.shape:
        raise ValueError(f"corrupt has shape {tuple(k.shape)}, but clean has {tuple(c.shape)}; patching needs aligned prompts of the same shape")
    return c, k


def _seed(model: Any, seed: Any) -> Optional[int]:
    """The seed every run uses: models with a random start state need one (None -> 0), so clean,
    corrupted and patched runs start from the same state."""
    if seed is not None:
        return integer(seed, "seed")
    cfg = model.cfg
    random_start = cfg.initial_state not in ("embed", "zeros") and cfg.init_std != 0
    return 0 if random_start else None


def _scalar(value: Any) -> Tensor:
    """The metric's value, which must be a one-element tensor."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must return a scalar tensor, got {shape}")
    return value.reshape(())



def _cache(model: Any, tokens: Tensor, names: list[str], **run: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and the activations at `names` (no gradient)."""
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        store[hook.name] = act.detach()

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names], **run)
    return logits, store



def _str_tokens(model: Any, tokens: Tensor) -> Optional[list[str]]:
    """The first clean prompt's tokens as text, for labels (None without a tokenizer)."""
    if model.tokenizer is None:
        return None
    return list(model.to_str_tokens(tokens[0]))

