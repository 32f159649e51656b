"""Attribution patching: activation patching's gradient estimate, first order (three passes) or
integrated over `steps` points of the clean -> corrupted path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from loop_lens.checks import positive_int, single_loop
from loop_lens.patching.common import Metric, _scalar, _str_tokens
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
    rule: Optional[str] = None,
    restart: bool = True,
    batch_size: int = 256,
    path: str = "input",
) -> PatchingResult:
    """Attribution patching: a gradient estimate of activation patching's `metric(patched)` per
    site. Same arguments, sites and shapes as `activation_patch`; `metric` must be differentiable.

    steps=1 (default): the first-order estimate from three passes,
    `metric(corrupt) + sum_d (a_clean - a_corrupt) * d metric / d a_corrupt` per site (summed over
    the prompts too, and for "head" over the positions).

    steps=k > 1 (or any `rule=`): integrated gradients along the path from the corrupted to the
    clean input (EAP-IG style: the token embeddings are interpolated, alpha from 0 to 1 in k
    intervals): each site's value is `metric(corrupt) + sum_j (a_{j+1} - a_j) . g_j`, a_j the
    site's activation at alpha = j / k (a_k the clean one: the activations' own path, not the
    straight line between its ends, so a site's values over a whole hook point add up to its patch
    as k grows) and g_j the gradient of the metric for interval j, by `rule`:
    "midpoint" (default for k > 1: at alpha = (j + 1/2) / k, error ~ 1/k^2), "trapezoid" (the mean
    of both ends') or "left" (at alpha = j / k, error ~ 1/k; steps=1 with "left" is the first-order
    estimate). With `restart` (default) in models with input injection, a site in iteration t
    takes its gradient from rows that enter iteration t with the path's injected state and inject
    the corrupted input afterwards, as a patched run does; restart=False takes it from the path.
    Every path point and restart is a group of rows of one batched forward and backward (more
    when they exceed `batch_size` rows); docs/patching.md: agreement and cost on the zoo models.

    path="hook": integrated gradients per hook point instead (as in Marks et al. 2024's sparse
    feature circuits): rows that run the corrupted input with one hook point's patched positions
    (for "head": every head of it) moved on the straight line to the clean values, everything
    upstream corrupted as in a patched run; `value = m_corrupt + sum_i w_i g_i . (a_clean -
    a_corrupt)` over the rule's points alpha_i (weights w_i; "gauss": Gauss-Legendre, default for
    this path, exact for polynomials of degree 2k - 1). Each site's value converges to the patch
    of that hook point's patched positions together (to the activation patch itself where one
    position is patched); no restarts. Costs k row groups per hook point (plus the clean and
    corrupted ones) in one forward and backward."""
    single_loop(model, "attribution_patch")
    steps = positive_int(steps, "steps")
    if path not in ("input", "hook"):
        raise ValueError(f"path must be 'input' or 'hook', got {path!r}")
    if path == "hook":
        rule = "gauss" if rule is None else rule
        if rule not in RULES + ("gauss",):
            raise ValueError(f"rule must be None or one of {list(RULES) + ['gauss']}, got {rule!r}")
    else:
        rule = _rule(rule, steps)
    batch_size = positive_int(batch_size, "batch_size")
    if not isinstance(restart, bool):
        raise ValueError(f"restart must be True or False, got {restart!r}")
    plan = _plan(model, clean, corrupt, site, n_loops, seed, positions, exit)
    if path == "hook":
        return _hook_path(model, plan, metric, steps, rule, batch_size)
    if steps > 1 or rule != "left":
        return _integrated(model, plan, metric, steps, rule, restart, batch_size)
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


RULES = ("trapezoid", "midpoint", "left")
"""The quadrature rules of `attribution_patch(..., steps=k)`."""


def _rule(rule: Any, steps: int) -> str:
    if rule is None:
        return "left" if steps == 1 else "midpoint"
    if rule == "gauss":
        raise ValueError("rule='gauss' needs path='hook' (a straight path); the input path takes 'midpoint', 'trapezoid' or 'left'")
    if rule not in RULES:
        raise ValueError(f"rule must be None or one of {list(RULES)}, got {rule!r}")
    return rule


def _nodes(rule: str, steps: int) -> tuple[list[float], list[int], dict[int, dict[int, float]]]:
    """The path points a rule runs, as (alphas, ends, weights): `alphas` every point (0 and 1 first),
    `ends[j]` the index in `alphas` of the j-th interval end j / steps, and `weights[i]` for a point
    i whose gradient is taken: {interval j: weight}, so that
    value = m_corrupt + sum_i g_i . sum_j weights[i][j] (a_{j+1} - a_j)."""
    alphas: list[float] = [0.0, 1.0]
    index = {0: 0, steps: 1}
    for j in range(1, steps):
        index[j] = len(alphas)
        alphas.append(j / steps)
    ends = [index[j] for j in range(steps + 1)]
    weights: dict[int, dict[int, float]] = {}
    if rule == "left":  # the gradient at the start of each interval
        for j in range(steps):
            weights[ends[j]] = {j: 1.0}
    elif rule == "trapezoid":  # the mean of the gradients at both ends of each interval
        for j in range(steps):
            for i in (ends[j], ends[j + 1]):
                weights.setdefault(i, {})[j] = 0.5
    else:  # midpoint: the gradient half way along each interval
        for j in range(steps):
            weights[len(alphas)] = {j: 1.0}
            alphas.append((j + 0.5) / steps)
    return alphas, ends, weights


def _integrated(model: Any, plan: _Plan, metric: Metric, steps: int, rule: str = "midpoint", restart: bool = True,
                batch_size: Optional[int] = None) -> PatchingResult:
    """`attribution_patch` with a path integral (see there): every path point, and every restart,
    is a group of N rows of one batched forward and backward (several when the rows exceed
    `batch_size`). `restart=False` takes every site's gradient from the path's own rows (the plain
    EAP-IG path; benchmarks compare both)."""
    site, T, clean_tokens, corrupt_tokens, pos, seed, run, sites, shapes, names = plan
    N = corrupt_tokens.shape[0]
    alphas, ends, weights = _nodes(rule, steps)
    inject = restart and model.injection is not None and T > 1
    # iterations whose sites take their gradient from a restart: iteration t entered with the path's
    # injected state, the corrupted input injected afterwards (as in a patched run)
    restarts = [t for t in range(T - 1) if inject and any(n.startswith(f"iter.{t}.") for n in names)]
    iteration = {n: int(n.split(".")[1]) if n.startswith("iter.") else -1 for n in names}
    # the row groups: ("path", i) for every point, ("restart", t, i) for every restart and every
    # point > 0 whose gradient is taken (at alpha = 0 the restart is the corrupted run itself);
    # a chunk holds the path group of every restart in it, the first one points 0 and 1
    per_forward = max(2, batch_size // N)
    chunks: list[list[tuple]] = [[("path", 0), ("path", 1)]]
    for i in range(len(alphas)):
        for u in ([] if i < 2 else [("path", i)]) + [("restart", t, i) for t in restarts if i in weights and alphas[i] > 0]:
            need = [u] if u[0] == "path" or ("path", i) in chunks[-1] else [("path", i), u]
            if len(chunks[-1]) + len(need) > per_forward:
                chunks.append([("path", i), u] if u[0] == "restart" else [u])
            else:
                chunks[-1] += need
    acts: dict[tuple[str, int], Tensor] = {}  # (hook, point) -> the path's activation, [N, ...]
    grads: dict[tuple[str, int], Tensor] = {}  # (hook, point) -> the gradient the site uses
    ends_embed: dict[str, Tensor] = {}
    m_ends: dict[int, float] = {}
    for chunk in chunks:
        _run_chunk(model, chunk, alphas, weights, restarts, iteration, names, run, metric, clean_tokens, corrupt_tokens,
                   N, acts, grads, ends_embed, m_ends)
    m_corrupt, m_clean = m_ends[0], m_ends[1]
    per_hook: dict[str, Tensor] = {}
    with torch.no_grad():
        for n in names:
            total = None
            for i, w in weights.items():
                g = grads.get((n, i))
                if g is None:
                    continue
                d = sum(c * (acts[(n, ends[j + 1])] - acts[(n, ends[j])]) for j, c in w.items())
                term = (g * d).float()
                total = term if total is None else total + term
            if total is None:
                total = torch.zeros_like(acts[(n, 0)], dtype=torch.float32)
            per_hook[n] = total.sum(dim=(0, 1, 3)) if site == "head" else total.sum(dim=(0, 2))
        flat = torch.stack([per_hook[s.hook][s.index] for s in sites]).cpu() + m_corrupt
    return PatchingResult(**_split(flat, shapes, model), clean_metric=m_clean, corrupt_metric=m_corrupt, site=site,
                          method="attribution", positions=None if site == "head" else pos, n_loops=T, seed=seed,
                          str_tokens=_str_tokens(model, clean_tokens))


def _run_chunk(model: Any, chunk: list[tuple], alphas: list[float], weights: dict, restarts: list[int],
               iteration: dict[str, int], names: list[str], run: dict, metric: Metric, clean_tokens: Tensor,
               corrupt_tokens: Tensor, N: int, acts: dict, grads: dict, ends_embed: dict, m_ends: dict) -> None:
    """One batched forward and backward over a chunk's row groups (N rows each); fills `acts`
    (path groups), `grads` and, from the chunk with points 0 and 1, `ends_embed` and `m_ends`."""
    row = {u: g * N for g, u in enumerate(chunk)}
    tokens = torch.cat([clean_tokens if u == ("path", 1) else corrupt_tokens for u in chunk])
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        store[hook.name] = act

    def interpolate(act: Tensor, hook: Any) -> Tensor:
        if ("path", 0) in row:
            ends_embed["corrupt"] = act[row[("path", 0)] : row[("path", 0)] + N].detach()
            ends_embed["clean"] = act[row[("path", 1)] : row[("path", 1)] + N].detach()
        lo, hi = ends_embed["corrupt"], ends_embed["clean"]
        x = act.detach().clone()
        for u, r in row.items():
            if u[0] == "path" and u[1] > 1:  # points 0 and 1 are the corrupted and clean embeddings as they are
                x[r : r + N] = lo + alphas[u[1]] * (hi - lo)
        return x.requires_grad_(True)  # gradients flow even if the weights are frozen

    def enter(t: int):
        pairs = [(row[u], row[("path", u[2])]) for u in chunk if u[0] == "restart" and u[1] == t]

        def hook(act: Tensor, hook: Any) -> Tensor:
            out = act.clone()
            for r, p in pairs:  # the restart enters iteration t with the path's injected state
                out[r : r + N] = act[p : p + N].detach()
            return out

        return hook

    chunk_restarts = sorted({u[1] for u in chunk if u[0] == "restart"})
    hooks = [("hook_embed", interpolate)] + [(f"iter.{t}.hook_injected", enter(t)) for t in chunk_restarts]
    hooks += [(n, keep) for n in names]
    with torch.enable_grad():
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens, **run)
        groups = logits.view(len(chunk), N, *logits.shape[1:])
        total = None
        for g, u in enumerate(chunk):
            if u[0] == "path" and u[1] in (0, 1):
                m_ends[u[1]] = float(_scalar(metric(groups[g])).detach())
            i = u[-1]
            if i not in weights:
                continue
            m = _scalar(metric(groups[g]))
            if not m.requires_grad:
                raise ValueError(_NOT_DIFFERENTIABLE)
            total = m if total is None else total + m
        got = torch.autograd.grad(total, [store[n] for n in names], allow_unused=True) if total is not None else [None] * len(names)
    for n, g in zip(names, got):
        t = iteration[n]
        for u, r in row.items():
            if u[0] == "path":
                acts.setdefault((n, u[1]), store[n][r : r + N].detach())
            i = u[-1]
            if i not in weights or (n, i) in grads:
                continue
            # an iteration-t site with a restart takes the restart's gradient (the path's at point 0)
            source = ("restart", t, i) if t in restarts and alphas[i] > 0 else ("path", i)
            if u == source:
                grads[(n, i)] = torch.zeros_like(store[n][r : r + N]) if g is None else g[r : r + N].detach()


def _line_nodes(rule: str, steps: int) -> list[tuple[float, float]]:
    """(alpha, weight) points of a rule on the straight path alpha in [0, 1]."""
    if rule == "gauss":
        import numpy as np

        x, w = np.polynomial.legendre.leggauss(steps)
        return [(float((xi + 1) / 2), float(wi / 2)) for xi, wi in zip(x, w)]
    if rule == "midpoint":
        return [((j + 0.5) / steps, 1 / steps) for j in range(steps)]
    if rule == "left":
        return [(j / steps, 1 / steps) for j in range(steps)]
    return [(j / steps, (0.5 if j in (0, steps) else 1.0) / steps) for j in range(steps + 1)]  # trapezoid


def _hook_path(model: Any, plan: _Plan, metric: Metric, steps: int, rule: str, batch_size: int) -> PatchingResult:
    """`attribution_patch(..., path="hook")` (see there): row groups ("clean"), ("corrupt") and
    (hook, point) for every hook point and point of the rule, split over forwards of at most
    `batch_size` rows (each with its own clean and corrupted groups)."""
    site, T, clean_tokens, corrupt_tokens, pos, seed, run, sites, shapes, names = plan
    N = corrupt_tokens.shape[0]
    points = _line_nodes(rule, steps)
    index = torch.tensor(pos, device=corrupt_tokens.device)  # the patched positions (all for "head")
    units = [(n, i) for n in names for i in range(len(points))]
    per_forward = max(1, batch_size // N - 2)
    terms: dict[str, Tensor] = {}
    m_ends: dict[str, float] = {}
    for c in range(0, len(units), per_forward):
        chunk = [("clean",), ("corrupt",)] + units[c : c + per_forward]
        row = {u: g * N for g, u in enumerate(chunk)}
        tokens = torch.cat([clean_tokens if u == ("clean",) else corrupt_tokens for u in chunk])
        store: dict[str, Tensor] = {}
        delta: dict[str, Tensor] = {}

        def leaf_embed(act: Tensor, hook: Any) -> Tensor:
            return act.detach().requires_grad_(True)  # gradients flow even if the weights are frozen

        def move(act: Tensor, hook: Any) -> Tensor:
            lo = act[row[("corrupt",)] : row[("corrupt",)] + N].detach()
            d = act[row[("clean",)] : row[("clean",)] + N].detach() - lo
            d = torch.zeros_like(d).index_copy_(1, index, d.index_select(1, index))  # only the patched positions move
            delta[hook.name] = d
            out = act.clone()
            for u, r in row.items():
                if u[0] == hook.name:  # upstream is corrupted in these rows: act[r] is the corrupted value
                    out[r : r + N] = act[r : r + N] + points[u[1]][0] * d
            store[hook.name] = out
            return out

        mine = sorted({u[0] for u in chunk[2:]}, key=names.index)
        with torch.enable_grad():
            with model.hooks(fwd_hooks=[("hook_embed", leaf_embed)] + [(n, move) for n in mine]):
                logits = model(tokens, **run)
            groups = logits.view(len(chunk), N, *logits.shape[1:])
            m_ends["clean"] = float(_scalar(metric(groups[0])).detach())
            m_ends["corrupt"] = float(_scalar(metric(groups[1])).detach())
            total = None
            for g in range(2, len(chunk)):
                m = _scalar(metric(groups[g]))
                if not m.requires_grad:
                    raise ValueError(_NOT_DIFFERENTIABLE)
                total = m if total is None else total + m
            got = dict(zip(mine, torch.autograd.grad(total, [store[n] for n in mine], allow_unused=True)))
        with torch.no_grad():
            for u in chunk[2:]:
                n, i = u
                g = got[n]
                if g is None:
                    continue
                term = (points[i][1] * g[row[u] : row[u] + N] * delta[n]).float()
                terms[n] = term if n not in terms else terms[n] + term
    with torch.no_grad():
        per_hook: dict[str, Tensor] = {}
        width = model.cfg.n_heads if site == "head" else corrupt_tokens.shape[1]
        for n in names:
            if n not in terms:
                per_hook[n] = torch.zeros(width)
                continue
            per_hook[n] = terms[n].sum(dim=(0, 1, 3)) if site == "head" else terms[n].sum(dim=(0, 2))
        flat = torch.stack([per_hook[s.hook][s.index].cpu() for s in sites]) + m_ends["corrupt"]
    return PatchingResult(**_split(flat, shapes, model), clean_metric=m_ends["clean"], corrupt_metric=m_ends["corrupt"],
                          site=site, method="attribution", positions=None if site == "head" else pos, n_loops=T, seed=seed,
                          str_tokens=_str_tokens(model, clean_tokens))
