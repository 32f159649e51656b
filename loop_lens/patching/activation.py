"""Activation patching per iteration, many patched runs batched into each forward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from loop_lens.checks import positive_int, single_loop
from loop_lens.patching.common import Metric, _cache, _scalar, _str_tokens
from loop_lens.patching.result import PatchingResult
from loop_lens.patching.sites import _plan, _split


def _row_patch(site: str, runs: Tensor, index: Tensor, clean: Tensor, n_rows: int) -> Callable:
    """A hook that writes `clean` into the rows of patched run `runs[i]` at position (or head)
    `index[i]`; every run has `n_rows` rows (one per prompt)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        view = out.view(-1, n_rows, *act.shape[1:])  # [runs, prompts, pos, ...]
        if site == "head":  # [runs, prompts, pos, head, d_head]
            view[runs, :, :, index] = clean[:, :, index].permute(2, 0, 1, 3)
        else:  # [runs, prompts, pos, d]
            view[runs, :, index] = clean[:, index].transpose(0, 1)
        return out

    return hook


def _shares_prefix(model: Any, exit: Any, T: int) -> bool:
    """True when the output is the last iteration's, so a run may start at any iteration from the
    state entering it (gated exits read the gates of every iteration)."""
    if exit is None:
        return model.exit_gate is None or model.cfg.default_exit == "last"
    return exit == "last" or (isinstance(exit, int) and not isinstance(exit, bool) and exit == T - 1)


def _split_by(chunk: list[int], key: list[int]) -> list[list[int]]:
    """Split a chunk of site indices where the key (the first iteration) changes."""
    out: list[list[int]] = []
    for i in chunk:
        if out and key[out[-1][-1]] == key[i]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _shift(name: str, t0: int) -> str:
    """`iter.{t}.rest` -> `iter.{t - t0}.rest` (the name in a run that starts at iteration t0)."""
    if t0 == 0:
        return name
    _, t, rest = name.split(".", 2)
    return f"iter.{int(t) - t0}.{rest}"



def activation_patch(
    model: Any,
    clean: Any,
    corrupt: Any,
    metric: Metric,
    site: str = "resid_post",
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    positions: Optional[Sequence[int]] = None,
    batch_size: int = 256,
    exit: Union[None, str, int] = None,
) -> PatchingResult:
    """Activation patching per iteration: for each site, the corrupted run with the clean
    activation put back there, `metric(patched logits)`; many patched runs share each forward.

    Args:
        model: a HookedLoopedTransformer.
        clean, corrupt: token ids [batch, pos] (or [pos], or text) of the same shape; every patched
            run has `batch` rows and `metric` sees all of them.
        metric: logits [batch, pos, d_vocab] -> scalar tensor.
        site: one of `SITES`. Block sites cover the prelude and coda layers too (`.prelude`,
            `.coda`); "head" patches `attn.hook_z` of one head at every position.
        n_loops: iterations (default: the model's).
        seed: the start-state seed of every run (None: 0 for models with a random start state).
        positions: the positions to patch, one at a time (default: all); not for "head".
        batch_size: rows per forward (at least one patched run per forward).
        exit: the model's `exit=` for every run (None: its default).
    """
    single_loop(model, "activation_patch")
    batch_size = positive_int(batch_size, "batch_size")
    plan = _plan(model, clean, corrupt, site, n_loops, seed, positions, exit)
    site, T, clean_tokens, corrupt_tokens, pos, seed, run, sites, shapes, names = plan
    N = corrupt_tokens.shape[0]
    clean_logits, clean_acts = _cache(model, clean_tokens, names, **run)
    share = _shares_prefix(model, exit, T)
    starts = [f"iter.{t}.hook_state_pre" for t in range(T)] if share else []
    corrupt_logits, corrupt_starts = _cache(model, corrupt_tokens, starts, **run)
    with torch.no_grad():
        m_clean = float(_scalar(metric(clean_logits)))
        m_corrupt = float(_scalar(metric(corrupt_logits)))
        per_forward = max(1, batch_size // N)
        out = torch.empty(len(sites), dtype=torch.float32)
        # patched runs that first differ from the corrupted run at iteration t0 start there, from
        # the corrupted run's state entering t0 (every iteration is the same function of the state)
        first = [s.iteration if share and s.phase == "loop" else 0 for s in sites]
        order = sorted(range(len(sites)), key=lambda i: first[i])
        chunks = [order[i : i + per_forward] for i in range(0, len(order), per_forward)]
        chunks = [c for chunk in chunks for c in _split_by(chunk, first)]
        for chunk in chunks:
            t0 = first[chunk[0]]
            by_hook: dict[str, tuple[list[int], list[int]]] = {}
            for r, i in enumerate(chunk):
                runs, index = by_hook.setdefault(sites[i].hook, ([], []))
                runs.append(r)
                index.append(sites[i].index)
            hooks = [
                (_shift(name, t0), _row_patch(site, torch.tensor(r, device=model.device), torch.tensor(i, device=model.device), clean_acts[name], N))
                for name, (r, i) in by_hook.items()
            ]
            tokens = corrupt_tokens.repeat(len(chunk), 1)
            if t0 > 0:
                state = corrupt_starts[f"iter.{t0}.hook_state_pre"].repeat(len(chunk), 1, 1)
                logits = model.run_with_hooks(tokens, n_loops=T - t0, initial_state=state, exit="last", fwd_hooks=hooks)
            else:
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **run)
            logits = logits.view(len(chunk), N, *logits.shape[1:])
            values = torch.stack([_scalar(metric(logits[r])) for r in range(len(chunk))]).float().cpu()
            out[torch.tensor(chunk)] = values
    return PatchingResult(**_split(out, shapes, model), clean_metric=m_clean, corrupt_metric=m_corrupt, site=site,
                          method="activation", positions=None if site == "head" else pos, n_loops=T, seed=seed,
                          str_tokens=_str_tokens(model, clean_tokens))

