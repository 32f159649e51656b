"""Argument checks shared by the analyses. Each error names the argument and how it disagrees,
and every check runs before any computation."""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from torch import Tensor

from loop_lens.cache import LoopCache
from loop_lens.checks import check_n_loops
from loop_lens.checks import integer as integer_value
from loop_lens.checks import positive_int as positive_int
from loop_lens.config import LoopConfig


def loop_count(n_loops: Any, default: int) -> int:
    """`n_loops` as an int >= 1, None meaning `default` (the model's own rule and message)."""
    return check_n_loops(n_loops, default)


def integer(value: Any, name: str, low: int, high: int) -> int:
    """An integral `value` (not a bool) with `low <= value <= high`, as an int."""
    value = integer_value(value, name)
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range: it must lie in [{low}, {high}]")
    return int(value)


def index(value: Any, name: str, size: int, what: str) -> int:
    """An index into `size` items (`what`, e.g. "positions"), negative from the end, as a
    non-negative int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not -size <= value < size:
        raise ValueError(f"{name}={value} is out of range: there are {size} {what} (valid: {-size} .. {size - 1})")
    return int(value) % size


def loop_cache(cache: Any, name: str = "cache") -> LoopCache:
    """`cache` must be a LoopCache with a batch dimension."""
    if not isinstance(cache, LoopCache):
        raise TypeError(f"{name} must be a LoopCache from model.run_with_cache, got {type(cache).__name__}")
    if not cache.has_batch_dim:
        raise ValueError(f"{name} has no batch dimension (remove_batch_dim=True); the analyses need [batch, pos, ...] activations")
    return cache


def not_empty(batch: int, pos: int, name: str = "cache") -> None:
    """Refuse activations of an empty batch or of zero tokens."""
    if batch == 0:
        raise ValueError(f"{name} holds an empty batch (0 sequences)")
    if pos == 0:
        raise ValueError(f"{name} holds 0 tokens per sequence")


def config_diff(ours: LoopConfig, theirs: LoopConfig) -> str:
    """The fields where two configs differ, as "name: a vs b"; empty when they agree."""
    a, b = ours.to_dict(), theirs.to_dict()
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))


def same_model(model: Any, cache: LoopCache, name: str = "model") -> None:
    """`model` must have the config of the model that made `cache`."""
    if isinstance(model, LoopCache):
        raise TypeError(f"{name} is a LoopCache; the analyses take (model, cache) in that order")
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, LoopConfig):
        raise TypeError(f"{name} must be a looped model with a LoopConfig .cfg, got {type(model).__name__}")
    diff = config_diff(cfg, cache.cfg)
    if diff:
        raise ValueError(f"{name} does not match the cache: its config differs from the config of the model that made the cache ({name} vs cache: {diff})")


def reference_cache(reference: Any, cache: LoopCache) -> LoopCache:
    """A reference run must come from the same model on the same input, at least as long as `cache`."""
    ref = loop_cache(reference, "reference")
    if ref.options != cache.options:
        raise ValueError(f"reference ran with run options {ref.options}, the cache with {cache.options}: a "
                         "reference must run the same options (only n_loops may be longer)")
    diff = config_diff(ref.cfg, cache.cfg)
    if diff:
        raise ValueError(f"reference was made by a model whose config differs from the cache's (reference vs cache: {diff})")
    if ref.n_loops < cache.n_loops:
        raise ValueError(f"reference has n_loops={ref.n_loops}, fewer than the cache's n_loops={cache.n_loops}; "
                         "its last iteration stands for the fixed point, so it must run at least as long")
    shared = [k for k in cache.cache_dict if k in ref.cache_dict and k.startswith("iter.0.")]
    for key in shared:  # the first iteration of the same input and start state is the same computation
        ours, theirs = cache.cache_dict[key], ref.cache_dict[key]
        if ours.shape != theirs.shape or not torch.allclose(ours.float(), theirs.float(), rtol=1e-4, atol=1e-5):
            raise ValueError(f"reference is a run on another input or start state: its {key} differs from the cache's "
                             "(it must be a run of the same input, with the same seed or initial_state)")
    return ref


def mask_shape(mask: Any, batch: int, pos: int, name: str = "mask", holder: str = "the cache") -> None:
    """`mask` must be a [batch, pos] tensor (shape only; `mask_for` checks the values too)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor [batch, pos], got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, pos):
        raise ValueError(f"{name} has shape {list(mask.shape)}, but {holder} holds [batch, pos] = [{batch}, {pos}]")


def mask_for(
    mask: Any, batch: int, pos: int, device: torch.device, name: str = "mask", holder: str = "the cache"
) -> Optional[Tensor]:
    """A [batch, pos] mask of 0 (padding) and 1 (real token), with a real token in every row, on
    `device`; None stays None. `holder` names what holds the [batch, pos] activations."""
    if mask is None:
        return None
    mask_shape(mask, batch, pos, name, holder)
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token)")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} rows {empty} have no real token (all padding)")
    return mask.to(device)


def token_ids(
    ids: Any, name: str, batch: int, pos: int, d_vocab: Optional[int], device: torch.device, holder: str = "the cache"
) -> Tensor:
    """Token ids [batch, pos] (a [pos] tensor when batch == 1), non-negative and inside the
    vocabulary when `d_vocab` is given, on `device`."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be an integer tensor [batch, pos], got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.ndim == 1 and batch == 1:
        ids = ids[None]
    if tuple(ids.shape) != (batch, pos):
        raise ValueError(f"{name} has shape {list(ids.shape)}, but {holder} holds [batch, pos] = [{batch}, {pos}]")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (d_vocab is not None and high >= d_vocab):
        vocab = f"the vocabulary [0, {d_vocab})" if d_vocab is not None else "[0, inf)"
        raise ValueError(f"{name} must lie in {vocab}, got ids from {low} to {high}")
    return ids.to(device)
