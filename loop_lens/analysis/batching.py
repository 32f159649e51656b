"""Running analyses over many prompts: padded batches, a progress bar, aggregation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import pandas as pd
import torch
from tqdm.auto import tqdm

from loop_lens.analysis import _checks
from loop_lens.analysis._types import LoopedModel
from loop_lens.cache import LoopCache

Prompts = Union[Sequence[str], Sequence[Sequence[int]], torch.Tensor]


def prompt_list(prompts: Prompts) -> list:
    """The prompts as a list, refusing an empty list, empty prompts, and text mixed with ids."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, got a single string; wrap it in a list")
    if isinstance(prompts, torch.Tensor) and prompts.ndim != 2:
        raise ValueError(f"prompts given as a tensor must be [n_prompts, pos], got shape {list(prompts.shape)}")
    items = list(prompts)
    if not items:
        raise ValueError("prompts is empty: give at least one prompt")
    kind = lambda item: "text" if isinstance(item, str) else "token ids"  # noqa: E731
    for i, item in enumerate(items):
        if not hasattr(item, "__len__"):
            raise TypeError(f"prompt {i} must be a string or a sequence of token ids, got {type(item).__name__}")
        if kind(item) != kind(items[0]):
            raise TypeError(f"prompt {i} is {kind(item)} but prompt 0 is {kind(items[0])}: give all text or all token ids")
        if len(item) == 0:
            raise ValueError(f"prompt {i} is empty (0 characters or tokens)")
    return items


def encode_prompts(model: LoopedModel, chunk: list, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and attention mask [B, S] on the model's device for a list of prompts, right-padded:
    text through the model's tokenizer, token-id sequences padded with 0. `first` is the index of
    `chunk[0]` among all prompts, for error messages."""
    if isinstance(chunk[0], str):
        return model.tokenize(chunk)
    seqs = [torch.as_tensor(c, device=model.device) for c in chunk]
    for i, seq in enumerate(seqs):
        if seq.ndim != 1 or seq.is_floating_point() or seq.is_complex() or seq.dtype == torch.bool:
            raise ValueError(f"prompt {first + i} must be a sequence of integer token ids, got {seq.dtype} of shape {list(seq.shape)}")
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long, device=model.device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=model.device)
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    return tokens, mask


def iter_batches(
    model: LoopedModel,
    prompts: Prompts,
    n_loops: Optional[int] = None,
    batch_size: int = 8,
    names_filter: Any = None,
    progress: bool = True,
    **run_kwargs: Any,
) -> Iterator[tuple[LoopCache, torch.Tensor, torch.Tensor, int]]:
    """Yield (cache, tokens, attention_mask, offset) per batch of prompts. Text is tokenized with
    the model's tokenizer and right-padded; token lists are padded with 0. The mask is passed to
    the model, so padding never leaks into real positions."""
    items = prompt_list(prompts)
    n_loops = _checks.loop_count(n_loops, model.cfg.default_loops)
    batch_size = _checks.positive_int(batch_size, "batch_size")
    bar = tqdm(range(0, len(items), batch_size), desc="prompts", disable=not progress, unit="batch")
    for start in bar:
        tokens, mask = encode_prompts(model, items[start : start + batch_size], first=start)
        _, cache = model.run_with_cache(tokens, n_loops=n_loops, attention_mask=mask, names_filter=names_filter, **run_kwargs)
        yield cache, tokens, mask, start


def over_prompts(
    model: LoopedModel,
    prompts: Prompts,
    analysis: Callable[[LoopCache, torch.Tensor, torch.Tensor], Any],
    n_loops: Optional[int] = None,
    batch_size: int = 8,
    names_filter: Any = None,
    progress: bool = True,
    **run_kwargs: Any,
) -> pd.DataFrame:
    """Run `analysis(cache, tokens, mask)` (returning a Result or DataFrame) on every batch and
    concatenate the tables, with `batch` renumbered to the prompt index."""
    frames = []
    for cache, tokens, mask, offset in iter_batches(model, prompts, n_loops, batch_size, names_filter, progress, **run_kwargs):
        result = analysis(cache, tokens, mask)
        frame = result if isinstance(result, pd.DataFrame) else result.to_frame()
        if "batch" in frame:
            frame = frame.assign(batch=frame["batch"] + offset)
        frames.append(frame.rename(columns={"batch": "prompt"}))
    return pd.concat(frames, ignore_index=True)


def aggregate(frame: pd.DataFrame, by: Sequence[str], value: str, quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> pd.DataFrame:
    """Mean and quantiles of `value` across prompts, grouped by `by` (e.g. iteration, layer)."""
    grouped = frame.groupby(list(by))[value]
    out = grouped.mean().rename("mean").to_frame()
    for q in quantiles:
        out[f"q{int(q * 100)}"] = grouped.quantile(q)
    out["n"] = grouped.count()
    return out.reset_index()
