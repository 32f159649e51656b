"""Attribution patching: activation patching's gradient estimate, first order (three passes) or
integrated over `steps` points of the clean -> corrupted path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from loop_lens.checks import positive_int, single_loop
from loop_lens.patching.activation import _shares_prefix, _shift
from loop_lens.patching.common import Metric, _cache, _scalar, _str_tokens
from loop_lens.patching.result import PatchingResult
from loop_lens.patching.sites import _Plan, _plan, _split

_NOT_DIFFERENTIABLE = ("metric's value does not depend on the logits through autograd; attribution patching needs a "
                       "differentiable metric")


def attribution_patch(
    model: Any,
    clean: Any,
    corrupt: Any,
    metric: Metric,
    site: str = "resid_post",
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    positions: Optional[Sequence[int]] = None,
    exit: Union[None, str, int] = None,
    steps: int = 1,
) -> PatchingResult:
    """Attribution patching: a gradient estimate of activation patching's `metric(patched)` per
    site. Same arguments, sites and shapes as `activation_patch`; `metric` must be differentiable.

    steps=1 (default): the first-order estimate from three passes,
    `metric(corrupt) + sum_d (a_clean - a_corrupt) * d metric / d a_corrupt` per site (summed over
    the prompts too, and for "head" over the positions).

    steps=k > 1: integrated gradients along the path from the corrupted to the clean input (EAP-IG
    style, interpolating the token embeddings at alpha = 0, 1/k, .., (k-1)/k): each site's value is
    `metric(corrupt) + sum_j (a_{j+1} - a_j) . d metric / d a_j`, a_j the site's activation at the
    j-th point and a_k the clean one (the activations' own path, not the straight line between its
    ends, so a site's values over a whole hook point add up to its patch as k grows). In models with
    input injection, a site in iteration t takes its gradient from runs that enter iteration t with
    the path's injected state and inject the corrupted input afterwards, as a patched run does.
    Costs k forward and backward rows per prompt, plus as many for every iteration but the last
    when the model injects its input (docs/patching.md: agreement and cost on the zoo models)."""
    single_loop(model, "attribution_patch")
    steps = positive_int(steps, "steps")
    plan = _plan(model, clean, corrupt, site, n_loops, seed, positions, exit)
    if steps > 1:
        return _integrated(model, plan, metric, steps)
    site, T, clean_tokens, corrupt_tokens, pos, seed, run, sites, shapes, names = plan
    store: dict[str, dict[str, Tensor]] = {"clean": {}, "corrupt": {}}
    current = ["clean"]

    def leaf_embed(act: Tensor, hook: Any) -> Tensor:
        return act.detach().requires_grad_(True)  # gradients flow even if the weights are frozen

    def keep(act: Tensor, hook: Any) -> None:
        store[current[0]][hook.name] = act

    with model.hooks(fwd_hooks=[("hook_embed", leaf_embed)] + [(n, keep) for n in names]):
        with torch.no_grad():
            m_clean = float(_scalar(metric(model(clean_tokens, **run))))
        current[0] = "corrupt"
        with torch.enable_grad():
            m = _scalar(metric(model(corrupt_tokens, **run)))
            if not m.requires_grad:
                raise ValueError(_NOT_DIFFERENTIABLE)
            grads = torch.autograd.grad(m, [store["corrupt"][n] for n in names], allow_unused=True)
    clean_acts, acts = store["clean"], store["corrupt"]
    m_corrupt = float(m.detach())
    per_hook: dict[str, Tensor] = {}
    with torch.no_grad():
        for n, g in zip(names, grads):
            a = acts[n].detach()
            g = torch.zeros_like(a) if g is None else g
            prod = ((clean_acts[n] - a) * g).float()
            # per position [pos] (sum over prompts and d) or per head [head] (sum over prompts, pos, d_head)
            per_hook[n] = prod.sum(dim=(0, 1, 3)) if site == "head" else prod.sum(dim=(0, 2))
        flat = torch.stack([per_hook[s.hook][s.index] for s in sites]).cpu() + m_corrupt
    return PatchingResult(**_split(flat, shapes, model), clean_metric=m_clean, corrupt_metric=m_corrupt, site=site,
                          method="attribution", positions=None if site == "head" else pos, n_loops=T, seed=seed,
                          str_tokens=_str_tokens(model, clean_tokens))


def _integrated(model: Any, plan: _Plan, metric: Metric, steps: int, restart: bool = True) -> PatchingResult:
    """`attribution_patch` with `steps` > 1 (see there). `restart=False` takes every site's
    gradient from the interpolated runs alone (the plain EAP-IG path; benchmarks compare both)."""
    site, T, clean_tokens, corrupt_tokens, pos, seed, run, sites, shapes, names = plan
    N = corrupt_tokens.shape[0]
    # clean and corrupted runs: the path's ends (activations, embeddings, metrics), no gradient
    clean_logits, clean_acts = _cache(model, clean_tokens, names + ["hook_embed"], **run)
    clean_embed = clean_acts.pop("hook_embed")
    corrupt_logits, corrupt_acts = _cache(model, corrupt_tokens, ["hook_embed"], **run)
    corrupt_embed = corrupt_acts.pop("hook_embed")
    with torch.no_grad():
        m_clean = float(_scalar(metric(clean_logits)))
        m_corrupt = float(_scalar(metric(corrupt_logits)))
    alphas = torch.arange(steps, device=corrupt_embed.device, dtype=corrupt_embed.dtype) / steps
    inject = restart and model.injection is not None and T > 1
    injected = [f"iter.{t}.hook_injected" for t in range(T)] if inject else []
    share = _shares_prefix(model, run["exit"], T)
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        store[hook.name] = act

    def interpolate(act: Tensor, hook: Any) -> Tensor:  # the k points of the path, as k groups of N rows
        x = corrupt_embed + alphas.view(-1, 1, 1, 1) * (clean_embed - corrupt_embed)
        return x.reshape(-1, *act.shape[1:]).detach().requires_grad_(True)

    def summed(logits: Tensor) -> Tensor:  # metric per path point (each sees its N prompts), summed
        groups = logits.view(steps, N, *logits.shape[1:])
        m = torch.stack([_scalar(metric(groups[j])) for j in range(steps)]).sum()
        if not m.requires_grad:
            raise ValueError(_NOT_DIFFERENTIABLE)
        return m

    tokens = corrupt_tokens.repeat(steps, 1)
    with torch.enable_grad():
        with model.hooks(fwd_hooks=[("hook_embed", interpolate)] + [(n, keep) for n in names + injected]):
            m = summed(model(tokens, **run))
        grads = dict(zip(names, torch.autograd.grad(m, [store[n] for n in names], allow_unused=True)))
        path = {n: store[n].detach() for n in names + injected}
        for t in range(T - 1 if inject else 0):
            # iteration t from the path's injected state, the corrupted input injected afterwards
            mine = [n for n in names if n.startswith(f"iter.{t}.")]
            if not mine:
                continue
            start = path[f"iter.{t}.hook_injected"].detach().requires_grad_(True)
            t0 = t if share else 0
            store.clear()
            hooks = [(_shift(f"iter.{t}.hook_injected", t0), lambda act, hook, start=start: start)]
            hooks += [(_shift(n, t0), keep) for n in mine]
            with model.hooks(fwd_hooks=hooks):
                if t0 > 0:  # the state entering t is replaced by the injection's output: any start will do
                    logits = model(tokens, n_loops=T - t0, initial_state=start.detach(), exit="last")
                else:
                    logits = model(tokens, **run)
                m = summed(logits)
            got = torch.autograd.grad(m, [store[_shift(n, t0)] for n in mine], allow_unused=True)
            grads.update(zip(mine, got))
    per_hook: dict[str, Tensor] = {}
    with torch.no_grad():
        for n in names:
            a = path[n].view(steps, N, *path[n].shape[1:])
            g = grads[n]
            g = torch.zeros_like(a) if g is None else g.view_as(a)
            step = torch.cat([a[1:], clean_acts[n][None]]) - a  # a_{j+1} - a_j, a_k = clean
            prod = (step * g).float().sum(0)
            per_hook[n] = prod.sum(dim=(0, 1, 3)) if site == "head" else prod.sum(dim=(0, 2))
        flat = torch.stack([per_hook[s.hook][s.index] for s in sites]).cpu() + m_corrupt
    return PatchingResult(**_split(flat, shapes, model), clean_metric=m_clean, corrupt_metric=m_corrupt, site=site,
                          method="attribution", positions=None if site == "head" else pos, n_loops=T, seed=seed,
                          str_tokens=_str_tokens(model, clean_tokens))
