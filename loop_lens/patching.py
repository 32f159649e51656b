"""Causal experiments per iteration: activation patching, attribution patching and iteration
interventions on looped models.

Activation patching runs the corrupted input and, for one site at a time, puts back the clean
run's activation there, recording `metric(patched_logits)`. A site is a hook point at one
(iteration, layer) plus a position or a head, so a sweep is `[n_loops, n_block, pos]` patched
runs. They go through few forwards: every patched run is its own group of batch rows, and each
hook replaces only the rows of the runs that patch it, so rows never interact and each row's
logits equal those of a run with that one patch.

Attribution patching approximates the same numbers from three passes (a clean run, a corrupted
run and its backward pass): `metric(corrupt) + (a_clean - a_corrupt) . d metric / d a_corrupt`,
summed over the hidden dimension (and over the head's positions for `"head"`).

Clean and corrupted runs use the same start state: models that draw a random start state (Huginn)
draw it from `seed`, which gives every prompt of the same length the same state.

Also here: iteration interventions (`intervene`: skip, freeze_after, drop_injection; `transplant`;
`intervention_sweep`), answer flips of the lens per iteration (`answer_flips`), and halting: the
exit distribution (`exit_distribution`) and the gate logit's direct attribution (`gate_attribution`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from loop_lens.analysis.lens import get_lens, vocab_labels
from loop_lens.checks import check_n_loops, integer, positive_int, single_loop
from loop_lens.result import Result

Metric = Callable[[Tensor], Tensor]
"""Logits [batch, pos, d_vocab] -> a scalar tensor (differentiable for attribution patching)."""

SITES = ("resid_post", "attn_out", "mlp_out", "head", "state", "injection")
"""The sites a sweep can patch."""

_BLOCK_HOOK = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "head": "attn.hook_z"}
_ITER_HOOK = {"state": "hook_state_post", "injection": "hook_injected"}


# ---------------------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class _Site:
    """One patchable activation: the hook name and what is patched there (a position, or a head
    at every position)."""

    hook: str
    index: int  # position, or head for "head"
    phase: str  # "prelude", "loop" or "coda"
    iteration: int  # -1 outside the loop
    layer: int  # -1 for per-iteration sites


def _sites(model: Any, site: str, T: int, positions: list[int]) -> tuple[list[_Site], dict[str, tuple[int, ...]]]:
    """Every patch of a sweep, in the order of the result's values, and the result's shapes
    (`values`, `prelude`, `coda`)."""
    cfg = model.cfg
    if site in _ITER_HOOK:
        sites = [_Site(f"iter.{t}.{_ITER_HOOK[site]}", p, "loop", t, -1) for t in range(T) for p in positions]
        return sites, {"values": (T, len(positions))}
    width = cfg.n_heads if site == "head" else len(positions)
    idx = list(range(cfg.n_heads)) if site == "head" else positions
    suffix = _BLOCK_HOOK[site]
    sites = [_Site(f"prelude.{l}.{suffix}", i, "prelude", -1, l) for l in range(cfg.n_prelude) for i in idx]
    sites += [_Site(f"iter.{t}.blocks.{l}.{suffix}", i, "loop", t, l) for t in range(T) for l in range(cfg.n_block) for i in idx]
    sites += [_Site(f"coda.{l}.{suffix}", i, "coda", -1, l) for l in range(cfg.n_coda) for i in idx]
    shapes = {"values": (T, cfg.n_block, width)}
    if cfg.n_prelude:
        shapes["prelude"] = (cfg.n_prelude, width)
    if cfg.n_coda:
        shapes["coda"] = (cfg.n_coda, width)
    return sites, shapes


def _split(flat: Tensor, shapes: dict[str, tuple[int, ...]], model: Any) -> dict[str, Tensor]:
    """Flat per-site numbers (in `_sites` order: prelude, loop, coda) -> the result's tensors."""
    n_pre = shapes["prelude"][0] * shapes["prelude"][1] if "prelude" in shapes else 0
    n_loop = 1
    for d in shapes["values"]:
        n_loop *= d
    out = {"values": flat[n_pre : n_pre + n_loop].reshape(shapes["values"])}
    if "prelude" in shapes:
        out["prelude"] = flat[:n_pre].reshape(shapes["prelude"])
    if "coda" in shapes:
        out["coda"] = flat[n_pre + n_loop :].reshape(shapes["coda"])
    return out


# ---------------------------------------------------------------------------------------- checks
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


def _site(model: Any, site: Any) -> str:
    if site not in SITES:
        raise ValueError(f"site must be one of {list(SITES)}, got {site!r}")
    if site == "injection" and model.cfg.injection == "none":
        raise ValueError("site='injection' needs a model with input injection; this model has injection='none'")
    return site


def _positions(positions: Any, site: str, S: int) -> list[int]:
    """The positions patched one at a time (all of them by default), as non-negative ints."""
    if site == "head":
        if positions is not None:
            raise ValueError("site='head' patches a head at every position; positions must be None")
        return list(range(S))
    if positions is None:
        return list(range(S))
    if isinstance(positions, (str, bytes)) or not isinstance(positions, (Sequence, Tensor)):
        raise ValueError(f"positions must be None or a sequence of position indices, got {positions!r}")
    values = positions.tolist() if isinstance(positions, Tensor) else list(positions)
    if not values:
        raise ValueError("positions is empty; give at least one position (or None for all)")
    out = []
    for p in values:
        p = integer(p, "positions")
        if not -S <= p < S:
            raise ValueError(f"positions holds {p}, out of range for {S} positions (valid: {-S} .. {S - 1})")
        out.append(p % S)
    return out


def _scalar(value: Any) -> Tensor:
    """The metric's value, which must be a one-element tensor."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"metric must return a scalar tensor, got {shape}")
    return value.reshape(())


# ---------------------------------------------------------------------------------------- result
@dataclass(kw_only=True)
class PatchingResult(Result):
    """A patching sweep over one site kind. `values` holds `metric(patched logits)` (attribution
    patching: its first-order estimate) per site; `prelude` / `coda` hold the prelude's and the
    coda's layers for block sites of models that have them."""

    values: Float[Tensor, "*sweep"]
    """[n_loops, n_block, pos] (resid_post, attn_out, mlp_out), [n_loops, n_block, n_heads]
    (head), [n_loops, pos] (state, injection)."""
    prelude: Optional[Float[Tensor, "n_prelude width"]] = None
    coda: Optional[Float[Tensor, "n_coda width"]] = None
    clean_metric: float
    corrupt_metric: float
    site: str
    method: str  # "activation" or "attribution"
    positions: Optional[list[int]] = None  # the positions of the last axis (None for heads)
    n_loops: int
    seed: Optional[int] = None
    is_normalized: bool = False
    str_tokens: Optional[list[str]] = field(default=None, repr=False)  # the clean prompt's tokens

    @property
    def index_name(self) -> str:
        """What the last axis counts: "head" or "position"."""
        return "head" if self.site == "head" else "position"

    def _labels(self) -> list[str]:
        if self.site == "head" or self.positions is None:
            return [f"H{h}" for h in range(self.values.shape[-1])]
        toks = self.str_tokens
        return [f"{p} {toks[p]}" if toks is not None and p < len(toks) else str(p) for p in self.positions]

    def normalized(self) -> PatchingResult:
        """The same sweep as `(m - m_corrupt) / (m_clean - m_corrupt)`: 0 = no effect, 1 = the
        whole clean metric restored."""
        if self.is_normalized:
            return self
        span = self.clean_metric - self.corrupt_metric
        if span == 0:
            raise ValueError("the clean and corrupted metrics are equal, so the normalized effect is undefined")

        def norm(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else (x - self.corrupt_metric) / span

        return PatchingResult(values=norm(self.values), prelude=norm(self.prelude), coda=norm(self.coda), clean_metric=1.0,
                              corrupt_metric=0.0, site=self.site, method=self.method, positions=self.positions,
                              n_loops=self.n_loops, seed=self.seed, is_normalized=True, str_tokens=self.str_tokens)

    def effect(self) -> Float[Tensor, "*sweep"]:
        """`values - corrupt_metric`: what each patch changes (0 everywhere when clean == corrupt)."""
        return self.values - self.corrupt_metric

    def to_frame(self) -> pd.DataFrame:
        """One row per site: phase, iteration (-1 outside the loop), layer (-1 for per-iteration
        sites), position or head, value, effect."""
        rows = []
        index_values = self.positions if self.site != "head" and self.positions is not None else list(range(self.values.shape[-1]))

        def add(phase: str, t: int, layer: int, vec: Tensor) -> None:
            for i, v in zip(index_values, vec.tolist()):
                rows.append((self.site, phase, t, layer, i, v))

        for layer, vec in enumerate(self.prelude if self.prelude is not None else []):
            add("prelude", -1, layer, vec)
        v = self.values.detach().cpu().float()
        for t in range(v.shape[0]):
            if v.ndim == 2:
                add("loop", t, -1, v[t])
            else:
                for layer in range(v.shape[1]):
                    add("loop", t, layer, v[t, layer])
        for layer, vec in enumerate(self.coda if self.coda is not None else []):
            add("coda", -1, layer, vec)
        frame = pd.DataFrame(rows, columns=["site", "phase", "iteration", "layer", self.index_name, "value"])
        frame["effect"] = frame["value"] - self.corrupt_metric
        return frame

    def top(self, k: int = 10) -> pd.DataFrame:
        """The `k` sites with the largest absolute effect, largest first."""
        k = positive_int(k, "k")
        frame = self.to_frame()
        order = frame["effect"].abs().sort_values(ascending=False, kind="stable").index
        return frame.loc[order[:k]].reset_index(drop=True)

    def plot(self, **kwargs: Any):
        """Heatmaps of the effect, iterations on the y axis: one panel per block layer (one panel
        for per-iteration sites), and one for the prelude and coda layers where present."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        eff = self.effect().detach().cpu().float()
        panels = [("iteration", eff)] if eff.ndim == 2 else [(f"layer {l}", eff[:, l]) for l in range(eff.shape[1])]
        outer = []
        if self.prelude is not None:
            outer += [(f"prelude {l}", (row - self.corrupt_metric)) for l, row in enumerate(self.prelude.detach().cpu().float())]
        if self.coda is not None:
            outer += [(f"coda {l}", (row - self.corrupt_metric)) for l, row in enumerate(self.coda.detach().cpu().float())]
        titles = [f"{self.site}: {name}" if eff.ndim == 3 else self.site for name, _ in panels]
        if outer:
            titles.append("prelude / coda")
        fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, shared_yaxes=False)
        bound = float(max(eff.abs().max(), max((r.abs().max() for _, r in outer), default=torch.tensor(0.0)))) or 1.0
        x = list(self._labels())  # escaped by Result.plot
        for c, (_, z) in enumerate(panels, start=1):
            fig.add_trace(go.Heatmap(z=z.numpy(), x=x, y=[f"t{t}" for t in range(z.shape[0])], colorscale="RdBu", zmid=0,
                                     zmin=-bound, zmax=bound, showscale=c == 1), row=1, col=c)
            fig.update_yaxes(title_text="iteration", autorange="reversed", row=1, col=c)
            fig.update_xaxes(title_text=self.index_name, row=1, col=c)
        if outer:
            z = torch.stack([r for _, r in outer]).numpy()
            fig.add_trace(go.Heatmap(z=z, x=x, y=[name for name, _ in outer], colorscale="RdBu", zmid=0, zmin=-bound,
                                     zmax=bound, showscale=False), row=1, col=len(titles))
        what = "normalized effect" if self.is_normalized else "metric(patched) - metric(corrupt)"
        fig.update_layout(title=f"{self.method} patching, {self.site}, T={self.n_loops}: {what}", **kwargs)
        return fig


# ---------------------------------------------------------------------------------------- runs
def _names_for(model: Any, site: str, T: int) -> list[str]:
    names = []
    if site in _ITER_HOOK:
        return [f"iter.{t}.{_ITER_HOOK[site]}" for t in range(T)]
    suffix = _BLOCK_HOOK[site]
    names += [f"prelude.{l}.{suffix}" for l in range(model.cfg.n_prelude)]
    names += [f"iter.{t}.blocks.{l}.{suffix}" for t in range(T) for l in range(model.cfg.n_block)]
    names += [f"coda.{l}.{suffix}" for l in range(model.cfg.n_coda)]
    return names


def _cache(model: Any, tokens: Tensor, names: list[str], **run: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and the activations at `names` (no gradient)."""
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        store[hook.name] = act.detach()

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names], **run)
    return logits, store


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


class _Plan(NamedTuple):
    """A patching sweep's checked arguments and sites, shared by both methods."""

    site: str
    n_loops: int
    clean: Tensor
    corrupt: Tensor
    positions: list[int]
    seed: Optional[int]
    run: dict
    sites: list[_Site]
    shapes: dict[str, tuple[int, ...]]
    names: list[str]


def _plan(model: Any, clean: Any, corrupt: Any, site: Any, n_loops: Any, seed: Any, positions: Any, exit: Any) -> _Plan:
    """Check a patching sweep's arguments and list its sites and hook names."""
    site = _site(model, site)
    T = check_n_loops(n_loops, model.cfg.default_loops)
    clean_tokens, corrupt_tokens = _pair(model, clean, corrupt)
    pos = _positions(positions, site, corrupt_tokens.shape[1])
    seed = _seed(model, seed)
    sites, shapes = _sites(model, site, T, pos)
    return _Plan(site, T, clean_tokens, corrupt_tokens, pos, seed, dict(n_loops=T, seed=seed, exit=exit), sites, shapes,
                 _names_for(model, site, T))


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


def _str_tokens(model: Any, tokens: Tensor) -> Optional[list[str]]:
    """The first clean prompt's tokens as text, for labels (None without a tokenizer)."""
    if model.tokenizer is None:
        return None
    return list(model.to_str_tokens(tokens[0]))


# ---------------------------------------------------------------------------------------- interventions
INTERVENTIONS = ("skip", "freeze_after", "drop_injection")
"""The per-iteration interventions `intervene` and `intervention_sweep` take."""


@dataclass(kw_only=True)
class Intervened:
    """The output of one intervened run: its logits and `metric(logits)`."""

    logits: Float[Tensor, "batch pos d_vocab"]
    metric: float


def _intervention_hooks(model: Any, kind: str, t: int, T: int) -> list[tuple[str, Callable]]:
    """Forward hooks that make one intervention at iteration t of a T-iteration run."""
    pre: dict[int, Tensor] = {}

    def remember(act: Tensor, hook: Any) -> None:
        pre[int(hook.name.split(".")[1])] = act

    def keep_input(act: Tensor, hook: Any) -> Tensor:
        return pre[int(hook.name.split(".")[1])]

    if kind == "skip":  # iteration t hands on the state it received
        return [(f"iter.{t}.hook_state_pre", remember), (f"iter.{t}.hook_state_post", keep_input)]
    if kind == "freeze_after":  # every iteration after t hands on the state it received
        return [h for u in range(t + 1, T) for h in ((f"iter.{u}.hook_state_pre", remember), (f"iter.{u}.hook_state_post", keep_input))]
    if model.cfg.injection == "none":
        raise ValueError("kind='drop_injection' needs a model with input injection; this model has injection='none'")

    def without_input(act: Tensor, hook: Any) -> Tensor:  # the injection with the input e set to 0
        return model.injection(pre[t], torch.zeros_like(pre[t]))

    return [(f"iter.{t}.hook_state_pre", remember), (f"iter.{t}.hook_injected", without_input)]


def intervene(
    model: Any,
    tokens: Any,
    metric: Metric,
    kind: str,
    iteration: int,
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    exit: Union[None, str, int] = None,
) -> Intervened:
    """One run with one intervention at `iteration`: "skip" (the state passes through that
    iteration unchanged), "freeze_after" (every later iteration passes the state through), or
    "drop_injection" (that iteration's injection sees a zero input, `injection(s, 0)`)."""
    single_loop(model, "intervene")
    if kind not in INTERVENTIONS:
        raise ValueError(f"kind must be one of {list(INTERVENTIONS)}, got {kind!r}")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    t = integer(iteration, "iteration")
    if not 0 <= t < T:
        raise ValueError(f"iteration={t} is out of range for n_loops={T} (valid: 0 .. {T - 1})")
    toks = _tokens(model, tokens, "tokens")
    hooks = _intervention_hooks(model, kind, t, T)
    with torch.no_grad():
        logits = model.run_with_hooks(toks, n_loops=T, seed=_seed(model, seed), exit=exit, fwd_hooks=hooks)
        return Intervened(logits=logits, metric=float(_scalar(metric(logits))))


def transplant(
    model: Any,
    source: Any,
    target: Any,
    metric: Metric,
    source_iteration: int,
    target_iteration: int,
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    exit: Union[None, str, int] = None,
) -> Intervened:
    """The state leaving iteration `source_iteration` of a run on `source` enters iteration
    `target_iteration` of a run on `target` (the same shape; they may be the same prompt); both
    runs have `n_loops` iterations. Returns the target run's logits and metric."""
    single_loop(model, "transplant")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    src_t, dst_t = integer(source_iteration, "source_iteration"), integer(target_iteration, "target_iteration")
    for name, value in (("source_iteration", src_t), ("target_iteration", dst_t)):
        if not 0 <= value < T:
            raise ValueError(f"{name}={value} is out of range for n_loops={T} (valid: 0 .. {T - 1})")
    src, dst = _tokens(model, source, "source"), _tokens(model, target, "target")
    if src.shape != dst.shape:
        raise ValueError(f"target has shape {tuple(dst.shape)}, but source has {tuple(src.shape)}; a state fits only a run of the same shape")
    seed = _seed(model, seed)
    _, acts = _cache(model, src, [f"iter.{src_t}.hook_state_post"], n_loops=T, seed=seed, exit=exit)
    state = acts[f"iter.{src_t}.hook_state_post"]
    with torch.no_grad():
        logits = model.run_with_hooks(dst, n_loops=T, seed=seed, exit=exit,
                                      fwd_hooks=[(f"iter.{dst_t}.hook_state_pre", lambda act, hook: state)])
        return Intervened(logits=logits, metric=float(_scalar(metric(logits))))


@dataclass(kw_only=True)
class InterventionSweep(Result):
    """One intervention at each iteration t: `values[t]` = the metric with it, `baseline` = the
    metric of the plain run."""

    values: Float[Tensor, " T"]
    baseline: float
    kind: str
    n_loops: int

    def to_frame(self) -> pd.DataFrame:
        """One row per iteration: the metric, and its change from the plain run."""
        v = self.values.tolist()
        return pd.DataFrame({"kind": self.kind, "iteration": range(len(v)), "value": v,
                             "effect": [x - self.baseline for x in v]})

    def plot(self, **kwargs: Any):
        """The metric against the intervened iteration, the plain run as a dashed line."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(x=list(range(len(self.values))), y=self.values.tolist(), mode="lines+markers", name=self.kind))
        fig.add_hline(y=self.baseline, line_dash="dash", annotation_text="no intervention")
        fig.update_layout(title=f"{self.kind} at iteration t (T={self.n_loops})", xaxis_title="iteration t",
                          yaxis_title="metric", **kwargs)
        return fig


def intervention_sweep(
    model: Any,
    tokens: Any,
    metric: Metric,
    kind: str,
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    exit: Union[None, str, int] = None,
) -> InterventionSweep:
    """`intervene` at every iteration t in turn (one forward each)."""
    single_loop(model, "intervention_sweep")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    toks = _tokens(model, tokens, "tokens")
    with torch.no_grad():
        baseline = float(_scalar(metric(model(toks, n_loops=T, seed=_seed(model, seed), exit=exit))))
    values = torch.tensor([intervene(model, toks, metric, kind, t, n_loops=T, seed=seed, exit=exit).metric for t in range(T)])
    return InterventionSweep(values=values, baseline=baseline, kind=kind, n_loops=T)


# ---------------------------------------------------------------------------------------- answer flips
@dataclass(kw_only=True)
class AnswerFlips(Result):
    """Per prompt and position, how the lens's top-1 token moves over the iterations.

    `last_flip` is the last iteration whose top-1 differs from the previous iteration's (-1: it
    never changes), `flipped_from` / `flipped_to` the tokens of that change (-1 when none), and
    `holds_from` the first iteration from which the final top-1 holds."""

    top1: Int[Tensor, "T B S"]
    last_flip: Int[Tensor, "B S"]
    flipped_from: Int[Tensor, "B S"]
    flipped_to: Int[Tensor, "B S"]
    holds_from: Int[Tensor, "B S"]
    positions: list[int]
    lens: str
    str_tokens: Optional[list[str]] = field(default=None, repr=False)  # index = token id

    def token(self, token_id: int) -> str:
        """The text of a token id (the id itself without a tokenizer; "" for -1)."""
        if token_id < 0:
            return ""
        return self.str_tokens[token_id] if self.str_tokens is not None else str(token_id)

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, position): final answer, last flip, from, to, holds_from."""
        rows = []
        B = self.top1.shape[1]
        for b in range(B):
            for j, p in enumerate(self.positions):
                final = int(self.top1[-1, b, j])
                rows.append((b, p, final, self.token(final), int(self.last_flip[b, j]), self.token(int(self.flipped_from[b, j])),
                             self.token(int(self.flipped_to[b, j])), int(self.holds_from[b, j])))
        return pd.DataFrame(rows, columns=["prompt", "position", "final", "final_token", "last_flip", "flipped_from",
                                           "flipped_to", "holds_from"])

    def plot(self, **kwargs: Any):
        """Histogram of `holds_from`: how many answers are settled by each iteration."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Histogram(x=self.holds_from.flatten().tolist(), xbins=dict(size=1)))
        fig.update_layout(title=f"iteration from which the final answer holds ({self.lens} lens)",
                          xaxis_title="iteration", yaxis_title="count", **kwargs)
        return fig


def answer_flips(
    model: Any,
    tokens: Any,
    n_loops: Optional[int] = None,
    seed: Optional[int] = None,
    lens: str = "coda",
    positions: Optional[Sequence[int]] = None,
) -> AnswerFlips:
    """Answer flips of the lens ("coda" or "logit", or a Lens) of the state leaving each iteration,
    for every prompt of `tokens` [batch, pos] at `positions` (default: the last)."""
    single_loop(model, "answer_flips")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    toks = _tokens(model, tokens, "tokens")
    S = toks.shape[1]
    pos = _positions([-1] if positions is None else positions, "state", S)
    reader = get_lens(model, lens)
    names = [f"iter.{t}.hook_state_post" for t in range(T)]
    _, acts = _cache(model, toks, names, n_loops=T, seed=_seed(model, seed))
    with torch.no_grad():
        top = torch.stack([reader(acts[n], n).argmax(-1)[:, pos] for n in names])  # [T, B, P]
    changed = top[1:] != top[:-1]  # [T-1, B, P]: the change into iteration t + 1
    steps = torch.arange(1, T, device=top.device).view(-1, 1, 1)
    last = torch.where(changed, steps, torch.full_like(steps, -1)).amax(0) if T > 1 else torch.full(top.shape[1:], -1, device=top.device)
    safe = last.clamp_min(1)
    before = top.gather(0, (safe - 1)[None])[0]
    after = top.gather(0, safe[None])[0]
    none = last < 0
    return AnswerFlips(top1=top, last_flip=last, flipped_from=torch.where(none, -1, before), flipped_to=torch.where(none, -1, after),
                       holds_from=last.clamp_min(0), positions=pos, lens=reader.name, str_tokens=vocab_labels(model))


# ---------------------------------------------------------------------------------------- halting
@dataclass(kw_only=True)
class ExitDistribution(Result):
    """Ouro's exit distribution per token: `p[t]` = the probability of exiting at iteration t."""

    p: Float[Tensor, "T B S"]
    expected_step: Float[Tensor, "B S"]  # sum_t t p_t (iterations from 0)
    entropy: Float[Tensor, "B S"]  # nats
    crossing: Int[Tensor, "B S"]  # first t whose cumulative probability reaches `threshold` (T - 1 if none)
    threshold: float

    def to_frame(self) -> pd.DataFrame:
        """One row per (batch, position): expected exit step, entropy, threshold-crossing iteration."""
        B, S = self.expected_step.shape
        return pd.DataFrame({
            "batch": [b for b in range(B) for _ in range(S)], "position": [s for _ in range(B) for s in range(S)],
            "expected_step": self.expected_step.flatten().tolist(), "entropy": self.entropy.flatten().tolist(),
            "crossing": self.crossing.flatten().tolist(),
        })

    def plot(self, batch: int = 0, **kwargs: Any):
        """Heatmap of p over (iteration, position) for one prompt."""
        import plotly.graph_objects as go

        b = integer(batch, "batch")
        if not 0 <= b < self.p.shape[1]:
            raise ValueError(f"batch={b} is out of range for {self.p.shape[1]} prompts")
        fig = go.Figure(go.Heatmap(z=self.p[:, b].cpu().numpy(), colorscale="Blues", zmin=0, zmax=1))
        fig.update_layout(title="exit distribution p_t", xaxis_title="position", yaxis_title="iteration", **kwargs)
        return fig


def exit_distribution(
    model: Any, tokens: Any, n_loops: Optional[int] = None, threshold: Optional[float] = None
) -> ExitDistribution:
    """The exit gate's distribution over iterations per token (models with an exit gate), its
    expected exit step, entropy and the iteration where the cumulative probability reaches
    `threshold` (default: the model's `early_exit_threshold`)."""
    single_loop(model, "exit_distribution")
    if model.exit_gate is None:
        raise ValueError("exit_distribution needs a model with an exit gate (Ouro); this model has none")
    T = check_n_loops(n_loops, model.cfg.default_loops)
    thr = float(model.cfg.early_exit_threshold if threshold is None else threshold)
    if not 0 < thr <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {thr}")
    toks = _tokens(model, tokens, "tokens")
    names = [f"iter.{t}.hook_exit_logit" for t in range(T)]
    _, acts = _cache(model, toks, names, n_loops=T)
    p = model.exit_distribution(torch.stack([acts[n] for n in names]))
    steps = torch.arange(T, device=p.device, dtype=p.dtype).view(-1, 1, 1)
    reached = torch.cumsum(p, dim=0) >= thr
    crossing = torch.where(reached.any(0), reached.float().argmax(0), T - 1)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(0)
    return ExitDistribution(p=p, expected_step=(steps * p).sum(0), entropy=entropy, crossing=crossing, threshold=thr)


@dataclass(kw_only=True)
class GateAttribution(Result):
    """The exit gate's logit at each iteration split over what wrote the state it reads: the state
    entering the iteration (after any injection), each head's and each MLP's output in that
    iteration, and the constant terms; `values.sum(1) + bias == gate` (direct attribution, with
    every norm's scale frozen at its value in the run)."""

    values: Float[Tensor, "T C B S"]
    labels: list[str]  # the C components
    bias: Float[Tensor, "T B S"]  # gate bias plus the norms' and projections' constant terms
    gate: Float[Tensor, "T B S"]  # the gate logit of the run

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, component, batch, position): the component's share of the logit."""
        T, C, B, S = self.values.shape
        v = self.values.detach().cpu().float()
        rows = [(t, self.labels[c], b, s, float(v[t, c, b, s])) for t in range(T) for c in range(C) for b in range(B) for s in range(S)]
        return pd.DataFrame(rows, columns=["iteration", "component", "batch", "position", "gate_logit"])

    def top(self, k: int = 10, position: int = -1) -> pd.DataFrame:
        """The `k` (iteration, component) pairs with the largest mean |share| at `position`."""
        k = positive_int(k, "k")
        S = self.values.shape[-1]
        p = integer(position, "position")
        if not -S <= p < S:
            raise ValueError(f"position={p} is out of range for {S} positions")
        mean = self.values[..., p % S].mean(-1)  # [T, C]
        order = mean.abs().flatten().argsort(descending=True)[:k]
        C = mean.shape[1]
        return pd.DataFrame([(int(i) // C, self.labels[int(i) % C], float(mean.flatten()[i])) for i in order],
                            columns=["iteration", "component", "gate_logit"])

    def plot(self, position: int = -1, **kwargs: Any):
        """Heatmap over (iteration, component) of the mean share at one position."""
        import plotly.graph_objects as go

        S = self.values.shape[-1]
        p = integer(position, "position")
        if not -S <= p < S:
            raise ValueError(f"position={p} is out of range for {S} positions")
        z = self.values[..., p % S].mean(-1).detach().cpu().float().numpy()
        fig = go.Figure(go.Heatmap(z=z, x=self.labels, y=[f"t{t}" for t in range(z.shape[0])], colorscale="RdBu", zmid=0))
        fig.update_layout(title="exit-gate logit by component", xaxis_title="component", yaxis_title="iteration", **kwargs)
        return fig


def _frozen_norm(norm: Any, x: Tensor, scale: Tensor) -> Tensor:
    """The linear part of a norm with its scale frozen: `w * center(x) / scale` (no bias)."""
    xf = x.float()
    if norm.kind == "LN":
        xf = xf - xf.mean(-1, keepdim=True)
    return xf / scale.float() * norm.weight.float()


def gate_attribution(model: Any, tokens: Any, n_loops: Optional[int] = None) -> GateAttribution:
    """Direct attribution of the exit gate's logit at each iteration onto the components that write
    the state it reads ("which heads drive halting"). Models with an exit gate whose layers add
    their outputs to the residual stream (`norm_placement` "pre" or "sandwich", as Ouro)."""
    single_loop(model, "gate_attribution")
    cfg = model.cfg
    if model.exit_gate is None:
        raise ValueError("gate_attribution needs a model with an exit gate (Ouro); this model has none")
    if cfg.norm_placement not in ("pre", "sandwich"):
        raise ValueError(f"gate_attribution needs layers whose outputs add to the residual stream (norm_placement 'pre' or "
                         f"'sandwich'); this model has {cfg.norm_placement!r}")
    T = check_n_loops(n_loops, cfg.default_loops)
    toks = _tokens(model, tokens, "tokens")
    entry = "hook_injected" if cfg.injection != "none" else "hook_state_pre"
    names = []
    for t in range(T):
        names += [f"iter.{t}.{entry}", f"iter.{t}.hook_exit_logit"] + ([f"iter.{t}.ln_state.hook_scale"] if cfg.iter_norm else [])
        for l in range(cfg.n_block):
            names += [f"iter.{t}.blocks.{l}.attn.hook_z", f"iter.{t}.blocks.{l}.hook_mlp_out"]
            if cfg.norm_placement == "sandwich":
                names.append(f"iter.{t}.blocks.{l}.ln1_post.hook_scale")
    _, acts = _cache(model, toks, names, n_loops=T)
    g_w, g_b = model.exit_gate.weight[0].float(), model.exit_gate.bias.float() if model.exit_gate.bias is not None else 0.0
    labels = ["state in"] + [f"L{l}{part}" for l in range(cfg.n_block) for part in [f"H{h}" for h in range(cfg.n_heads)] + [" attn const", " mlp"]]
    values, biases = [], []
    with torch.no_grad():
        for t in range(T):
            if cfg.iter_norm:
                scale = acts[f"iter.{t}.ln_state.hook_scale"]
                read = lambda c, scale=scale: _frozen_norm(model.ln_final, c, scale) @ g_w  # noqa: E731
                const = (model.ln_final.bias.float() @ g_w if model.ln_final.bias is not None else 0.0) + g_b
            else:
                read = lambda c: c.float() @ g_w  # noqa: E731
                const = g_b
            parts = [read(acts[f"iter.{t}.{entry}"])]
            bias = torch.zeros_like(parts[0]) + const
            for l, blk in enumerate(model.blocks):
                z = acts[f"iter.{t}.blocks.{l}.attn.hook_z"]  # [B, S, H, hd]
                per_head = torch.einsum("bshd,hdm->bshm", z.float(), blk.attn.W_O.float())  # [B, S, H, D]
                o_bias = blk.attn.o_proj.bias.float() if blk.attn.o_proj.bias is not None else torch.zeros_like(per_head[0, 0, 0])
                if cfg.norm_placement == "sandwich":
                    post = blk.ln1_post
                    s1 = acts[f"iter.{t}.blocks.{l}.ln1_post.hook_scale"][:, :, None]  # [B, S, 1, 1]
                    heads = _frozen_norm(post, per_head, s1)
                    attn_const = _frozen_norm(post, o_bias.expand_as(per_head[:, :, 0]), s1[:, :, 0])
                    if post.bias is not None:
                        attn_const = attn_const + post.bias.float()
                else:
                    heads, attn_const = per_head, o_bias.expand_as(per_head[:, :, 0])
                parts += [read(heads[:, :, h]) for h in range(cfg.n_heads)]
                parts += [read(attn_const), read(acts[f"iter.{t}.blocks.{l}.hook_mlp_out"])]
            values.append(torch.stack(parts))
            biases.append(bias)
    gate = torch.stack([acts[f"iter.{t}.hook_exit_logit"] for t in range(T)])
    return GateAttribution(values=torch.stack(values), labels=labels, bias=torch.stack(biases), gate=gate)
