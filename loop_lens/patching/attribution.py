"""Attribution patching: activation patching's first-order estimate from three passes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from loop_lens.checks import single_loop
from loop_lens.patching.common import Metric, _scalar, _str_tokens
from loop_lens.patching.result import PatchingResult
from loop_lens.patching.sites import _plan, _split


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
) -> PatchingResult:
    """Attribution patching: the first-order estimate of activation patching from three passes,
    `metric(corrupt) + sum_d (a_clean - a_corrupt) * d metric / d a_corrupt` per site (summed over
    the prompts too, and for "head" over the positions). Same arguments, sites and shapes as
    `activation_patch`; `metric` must be differentiable."""
    single_loop(model, "attribution_patch")
    plan = _plan(model, clean, corrupt, site, n_loops, seed, positions, exit)
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
                raise ValueError("metric's value does not depend on the logits through autograd; attribution patching needs a differentiable metric")
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
