"""Running analyses over many prompts: padded batches, a progress bar, aggregation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import pandas as pd
import torch
from tqdm.auto import tqdm

from loop_lens.cache import LoopCache

Prompts = Union[Sequence[str], Sequence[Sequence[int]], torch.Tensor]


def iter_batches(
    model,
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
    if isinstance(prompts, torch.Tensor):
        items: list = list(prompts)
    else:
        items = list(prompts)
    if not items:
        raise ValueError("no prompts given")
    bar = tqdm(range(0, len(items), batch_size), desc="prompts", disable=not progress, unit="batch")
    for start in bar:
        chunk = items[start : start + batch_size]
        if isinstance(chunk[0], str):
            tokens, mask = model.tokenize(chunk)
        else:
            seqs = [torch.as_tensor(c, dtype=torch.long) for c in chunk]
            width = max(len(s) for s in seqs)
            tokens = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, s in enumerate(seqs):
                tokens[i, : len(s)], mask[i, : len(s)] = s, 1
        _, cache = model.run_with_cache(tokens, n_loops=n_loops, attention_mask=mask, names_filter=names_filter, **run_kwargs)
        yield cache, tokens, mask, start


def over_prompts(
    model,
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
