"""HookedHrmTransformer: HRM-Text's nested two-timescale recurrence, hooked per cycle.

A slow high-level stack H (`blocks`) and a fast low-level stack L (`low_blocks`), each closed by
a parameterless RMSNorm, run as

```
z_H = embed(tokens) * embed_scale;  z_L = z_l_init
for h in range(n_loops):                       iter.{h}.hook_state_pre (z_H entering)
    for l in range(cfg.l_cycles):
        z_L = norm(L(z_L + z_H))                iter.{h}.low.{l}.hook_state_pre / blocks.{k}.* / ln_state.* / hook_state_post
    z_H = norm(H(z_H + z_L))                    iter.{h}.hook_injected / blocks.{k}.* / ln_state.* / hook_state_post
logits = unembed(z_H)
```

Everything else (argument checks, hooks by name or filter created on demand, caches, exits at an
H cycle, `stop_at_layer` over the unrolled depth) is `HookedLoopedTransformer`'s.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from loop_lens.cache import LoopCache, additivity_breaks
from loop_lens.checks import positive_int
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, HookNameError
from loop_lens.model import sites
from loop_lens.model.components import Block, Norm
from loop_lens.model.hooks import NO_HOOKS, BlockHooks, Hooks
from loop_lens.model.looped import HookedLoopedTransformer
from loop_lens.model.names import _suffix, register_coordinate
from loop_lens.model.run import Run, StopAtLayer
from loop_lens.model.schedule import Schedule, Step


# ---------------------------------------------------------------------- hook sites and names
def LowCycleHooks(cfg: LoopConfig) -> Hooks:  # noqa: N802 (a container kind)
    """One low-level cycle inside an H cycle: `iter.{h}.low.{l}.*` (the L stack's input z_L + z_H,
    its layers, its closing parameterless norm, the new z_L)."""
    return _stack_hooks(cfg, Hooks(["hook_state_pre"]))


def _stack_hooks(cfg: LoopConfig, out: Hooks) -> Hooks:
    """A stack's layers (`blocks.{k}.*`), its closing norm (`ln_state.*`) and the new state
    (`hook_state_post`), after what `out` holds."""
    out.place("blocks", nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_block)))
    for path in ("ln_state.hook_scale", "ln_state.hook_normalized", "hook_state_post"):
        out.place(path)
    return out


def NestedIterationHooks(cfg: LoopConfig, l_cycles: Optional[int] = None) -> Hooks:  # noqa: N802
    """One H cycle, in firing order: `iter.{h}.hook_state_pre` (z_H entering), `iter.{h}.low.{l}.*`
    (each of `l_cycles` L cycles, default `cfg.l_cycles`; runs may use fewer), `hook_injected`
    (z_H + z_L), the H stack's `blocks.{k}.*`, its closing norm `ln_state.*`, `hook_state_post`."""
    out = Hooks(["hook_state_pre"])
    out.place("low", nn.ModuleList(LowCycleHooks(cfg) for _ in range(cfg.l_cycles if l_cycles is None else l_cycles)))
    out.place("hook_injected")
    return _stack_hooks(cfg, out)


def low_hook_name(kind: str, layer: Optional[int], iteration: Optional[int], phase: Optional[str], low_cycle: int) -> str:
    """`iter.{iteration}.low.{low_cycle}.[blocks.{layer}.]<suffix>` (a nested loop's L cycle)."""
    if iteration is None or phase not in (None, "loop"):
        raise ValueError("low_cycle= places a hook in an L cycle: give iteration= (the H cycle) and no phase")
    if isinstance(low_cycle, bool) or not isinstance(low_cycle, int) or low_cycle < 0:
        raise ValueError(f"low_cycle must be an integer >= 0, got {low_cycle!r}")
    suffix = _suffix(kind)
    if suffix in ("hook_state_pre", "hook_state_post") or suffix.startswith("ln_state"):
        if layer is not None:
            raise ValueError(f"{kind!r} is per L cycle: give no layer=")
        return f"iter.{iteration}.low.{low_cycle}.{suffix}"
    if sites.scope_of(suffix) != "layer":
        raise ValueError(f"{kind!r} does not exist inside an L cycle")
    if layer is None:
        raise ValueError(f"{kind!r} inside an L cycle needs layer=")
    return f"iter.{iteration}.low.{low_cycle}.blocks.{layer}.{suffix}"


_NESTED_RE = re.compile(r"^iter\.(?P<h>\d+)\.(?:low\.(?P<l>\d+)\.)?(?:blocks\.(?P<k>\d+)\.)?(?P<kind>.*hook_.*)$")


class NestedHookNameParts(NamedTuple):
    h_cycle: int
    low_cycle: Optional[int]
    layer: Optional[int]
    kind: str


def parse_nested_hook_name(name: str) -> NestedHookNameParts:
    """A nested (HRM) loop's hook name -> (H cycle, L cycle or None, layer or None, kind):
    `"iter.1.low.2.blocks.0.attn.hook_gate"` -> `(1, 2, 0, "attn.hook_gate")`,
    `"iter.1.blocks.0.hook_resid_post"` -> `(1, None, 0, "hook_resid_post")`."""
    m = _NESTED_RE.match(name)
    if m is None or m["kind"].startswith(("low.", "blocks.")):  # a malformed cycle or layer index
        raise ValueError(f"not a nested-loop hook name (iter.{{h}}[.low.{{l}}][.blocks.{{k}}].<hook>): {name!r}")
    low = int(m["l"]) if m["l"] is not None else None
    layer = int(m["k"]) if m["k"] is not None else None
    return NestedHookNameParts(int(m["h"]), low, layer, m["kind"])


sites.register([], attributes={"low"})
register_coordinate("low_cycle", low_hook_name)


class NestedLoopCache(LoopCache):
    """The LoopCache of a nested (HRM) run of `n_loops` H cycles of `l_cycles` L cycles.

    Names work as usual (`iter.{h}.low.{l}.blocks.{k}.*`, `iter.{h}.blocks.{k}.*`).
    `stack(kind)` is the H stack [n_loops, n_block, ...], `stack(kind, low=True)` the L stack
    [n_loops, l_cycles, n_block, ...]. The unrolled depth (the model's schedule) lists every
    traversal in the order it runs: in each H cycle the L stack `l_cycles` times, then the H
    stack, so `blocks.{d}.*`, `unrolled()` and TransformerLens's helpers see the run as
    `n_loops * (l_cycles + 1) * n_block` layers, with the norm closing the last H stack as the
    final norm (as the logits are read).
    """

    @property
    def l_cycles(self) -> int:
        """The run's L cycles per H cycle."""
        return self.options["l_cycles"]

    def depth_index(self, iteration: int, layer: int, low_cycle: Optional[int] = None) -> int:
        """Unrolled depth of layer `layer` of the H stack in H cycle `iteration`, or with
        `low_cycle=l` of the L stack in L cycle l of that H cycle."""
        K, L = self.cfg.n_block, self.l_cycles
        if not (0 <= iteration < self.n_loops and 0 <= layer < K) or not (low_cycle is None or 0 <= low_cycle < L):
            raise IndexError(f"(iteration={iteration}, low_cycle={low_cycle}, layer={layer}) outside "
                             f"{self.n_loops} H cycles x {L} L cycles x {K} layers")
        low = "" if low_cycle is None else f"low.{low_cycle}."
        return self.schedule.depth_of(f"iter.{iteration}.{low}blocks.{layer}")

    def stack(self, kind: str, low: bool = False) -> Tensor:
        """One hook kind over the H stack, [n_loops, n_block, ...] ([n_loops, ...] per cycle), or
        with `low=True` over the L stack, [n_loops, l_cycles, n_block, ...] ([n_loops, l_cycles,
        ...] for `hook_state_pre`, `hook_state_post` and `ln_state.*`)."""
        if not low:
            return super().stack(kind)
        suffix = _suffix(kind)
        if sites.scope_of(suffix) == "pass" and not suffix.startswith(("hook_state", "ln_state")):
            raise ValueError(f"{kind!r} has no L-cycle version (cache.stack({kind!r}) reads the H stack)")
        per_cycle = sites.scope_of(suffix) == "pass"
        K, L = self.cfg.n_block, self.l_cycles

        def one(h: int, cycle: int) -> Tensor:
            prefix = f"iter.{h}.low.{cycle}"
            if per_cycle:
                return self[f"{prefix}.{suffix}"]
            return torch.stack([self[f"{prefix}.blocks.{k}.{suffix}"] for k in range(K)])

        return torch.stack([torch.stack([one(h, cycle) for cycle in range(L)]) for h in range(self.n_loops)])

    def low_view(self) -> LoopCache:
        """The L stack's traversals as a single-timescale LoopCache of a `LowStackModel`:
        iteration i is L cycle `i % l_cycles` of H cycle `i // l_cycles` (`iter.{h}.low.{l}.*`
        becomes `iter.{h * l_cycles + l}.*`), so `step_sizes`, `fixed_points`,
        `attention_stability`, `logit_lens` and the rest measure the L stack over every L cycle
        in running order (pass `cache.low_view().model` as their model). Names outside the loop
        (the embedding) are kept, the H stack's left out. The cache itself is the H stack's view."""
        L = self.l_cycles
        renamed: dict[str, Tensor] = {}
        for name, value in self.cache_dict.items():
            if not name.startswith("iter."):
                renamed[name] = value
                continue
            h, cycle, layer, kind = parse_nested_hook_name(name)
            if cycle is not None:
                renamed[f"iter.{h * L + cycle}." + (f"blocks.{layer}." if layer is not None else "") + kind] = value
        return LowStackCache(renamed, LowStackModel(self.model, L), self.n_loops * L, has_batch_dim=self.has_batch_dim)


class HookedHrmTransformer(HookedLoopedTransformer):
    """A nested looped transformer (HRM-Text): `n_loops` H cycles of `l_cycles` L cycles.

    Parameters: `embed`, `blocks` (the H stack), `low_blocks` (the L stack), `z_l_init` (the
    L state's start vector), `unembed`. Hook points per H cycle live in `iter.{h}` (a
    `NestedIterationHooks`), only where something is hooked or cached.

    `l_cycles=` on `forward`, `run_with_cache`, `run_with_hooks` and `hook_names` sets the L
    cycles per H cycle of that run (default `cfg.l_cycles`), as `n_loops=` sets the H cycles.
    """

    iteration_hooks_cls = staticmethod(NestedIterationHooks)
    single_loop_refusal = ("nested (HRM) models yet: run the model with run_with_cache / run_with_hooks and analyse "
                           "the cache (cache.low_view() for the L stack)")
    _cache_cls = NestedLoopCache
    run_options = ("l_cycles",)

    def __init__(self, cfg: LoopConfig, tokenizer: Any = None):
        if cfg.l_cycles < 1:
            raise ConfigError(f"l_cycles: a nested (HRM) model needs l_cycles >= 1, got {cfg.l_cycles}")
        if cfg.final_norm or cfg.iter_norm or cfg.norm_after_loop or cfg.exit_gate:
            raise ConfigError("final_norm / iter_norm / norm_after_loop / exit_gate: a nested (HRM) model closes each "
                              "stack with its own parameterless norm and has no exit gate; set them all False")
        self._l_run = cfg.l_cycles  # L cycles of the run being prepared or executed
        self._named_low: dict[int, int] = {}  # H cycle -> L cycles a hook name there asks for
        super().__init__(cfg, tokenizer)
        # one L cycle's hook suffixes, and the H cycle's own after hook_state_pre (from the base's template)
        self._low_suffixes = tuple(s.removeprefix("low.0.") for s in self._iter_suffixes if s.startswith("low.0."))
        self._high_suffixes = tuple(s for s in self._iter_suffixes if not s.startswith("low.") and s != "hook_state_pre")
        self.low_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_block))
        self.stack_norm = Norm(cfg.d_model, "RMS", cfg.norm_eps, weight=False)  # closes both stacks
        self.z_l_init = nn.Parameter(torch.zeros(cfg.d_model), requires_grad=False)
        self.ln_final.weight = None  # never applied (final_norm=False): keep it out of the state dict
        self._token_types: Optional[Tensor] = None  # this run's token_type_ids (PrefixLM), set by forward
        self.setup()

    # ------------------------------------------------------------------ L cycles per run
    @contextmanager
    def _l_cycles(self, l_cycles: Any) -> Iterator[int]:
        """Inside, runs use `l_cycles` L cycles per H cycle (None: the checkpoint's `cfg.l_cycles`,
        never an outer call's: a model called from inside a hook runs its own default)."""
        before = self._l_run
        self._l_run = self.cfg.l_cycles if l_cycles is None else positive_int(l_cycles, "l_cycles")
        try:
            yield self._l_run
        finally:
            self._l_run = before

    @contextmanager
    def _options(self, l_cycles: Any = None) -> Iterator[dict[str, Any]]:
        """HRM's run option: `l_cycles=` (L cycles per H cycle of this run)."""
        with self._l_cycles(l_cycles) as L:
            yield {"l_cycles": L}

    def _ensure_low(self, container: nn.Module, n: int) -> bool:
        """Give an H-cycle hook container at least `n` L-cycle containers; True if it grew."""
        grew = len(container.low) < n
        while len(container.low) < n:
            container.low.append(LowCycleHooks(self.cfg))
        return grew

    def _new_iteration_hooks(self) -> nn.Module:
        return NestedIterationHooks(self.cfg, l_cycles=max(self.cfg.l_cycles, self._l_run))

    def _materialise(self, iterations: Any) -> None:
        """The base's, then every container named gets the L cycles of this run (or of a hook
        name given for it): hook points for L cycles exist only where a run or a name asks."""
        iterations = list(iterations)
        super()._materialise(iterations)
        grew = [self._ensure_low(self.iter[str(t)], max(self._l_run, self._named_low.pop(t, 0))) for t in iterations]
        if any(grew):
            self.setup()

    def _drop(self, keys: Sequence[str]) -> None:
        """The base's, then spare containers shrink back to the checkpoint's L cycles."""
        super()._drop(keys)
        for container in self._spare_hooks:
            del container.low[self.cfg.l_cycles:]

    def loop_hook_names(self, iteration: int = 0) -> list[str]:
        """The hook names of one H cycle of the current run (its L cycles included)."""
        cycles = [f"low.{cycle}.{s}" for cycle in range(self._l_run) for s in self._low_suffixes]
        return [f"iter.{iteration}.{s}" for s in ["hook_state_pre", *cycles, *self._high_suffixes]]

    def _iterations_named(self, names: Sequence[Any]) -> list[int]:
        """The H cycles these names refer to (any run length, any L cycle); remembers the L
        cycles each needs, for `_materialise`."""
        found: set[int] = set()
        self._named_low = {}
        for name in names:
            if not (isinstance(name, str) and name.startswith("iter.")):
                continue
            try:
                h, cycle, layer, kind = parse_nested_hook_name(name)
            except ValueError:
                continue
            template = ".".join([*(["low.0"] if cycle is not None else []), *([f"blocks.{layer}"] if layer is not None else []), kind])
            if template in self._iter_suffixes:
                found.add(h)
                if cycle is not None:
                    self._named_low[h] = max(self._named_low.get(h, 0), cycle + 1)
        return sorted(found)

    def _run_label(self, n_loops: int) -> str:
        return f"n_loops={n_loops}, l_cycles={self._l_run}"

    def _check_hooks_fire(self, n_loops: int) -> None:
        super()._check_hooks_fire(n_loops)
        for key, it in self.iter.items():
            for cycle in range(self._l_run, len(it.low)):
                hooked = self._named_hook_at(it.low[cycle]) if int(key) < n_loops else None
                if hooked:
                    raise HookNameError(
                        f"a hook is attached at {hooked}, but this run has l_cycles={self._l_run} (L cycles "
                        f"0..{self._l_run - 1}): it would not fire. Pass l_cycles=, or remove it with model.reset_hooks()"
                    )

    def _unreached(self, f: Any, t: int) -> list[str]:
        """The base's, plus the L cycles of H cycle t that this run adds beyond those `f` was
        offered before: a filter reaches every L cycle of every run, whatever ran before."""
        have = f.reach.get(t) if t in f.attached else None
        if have is not None and have >= self._l_run:
            return []
        f.attached.add(t)
        f.reach[t] = max(have or 0, self._l_run)
        names = self.loop_hook_names(t)
        if have is None:
            return names
        return [n for n in names if ".low." in n and parse_nested_hook_name(n).low_cycle >= have]

    def _names_in_run(self, names_filter: Any, n_loops: int) -> set[str]:
        wanted = super()._names_in_run(names_filter, n_loops)
        for name in wanted:
            if ".low." in name:
                cycle = parse_nested_hook_name(name).low_cycle
                if cycle >= self._l_run:
                    raise HookNameError(f"{name!r} is in L cycle {cycle}, but this run has l_cycles={self._l_run}")
        return wanted

    def _current_options(self) -> dict[str, Any]:
        return {"l_cycles": self._l_run}

    def _schedule(self, n_loops: int) -> Schedule:
        """Each H cycle traverses the L stack `l_cycles` times, then the H stack; the norm
        closing the last H stack is the final norm."""
        K, L = self.cfg.n_block, self._l_run
        low = [Step(("low", c, k), f"low.{c}.blocks.{k}", "low_blocks", k, "low", (c,)) for c in range(L) for k in range(K)]
        high = [Step((k,), f"blocks.{k}", "blocks", k, "loop", (None,)) for k in range(K)]
        return Schedule(n_loops, (), tuple(low + high), (), final_norm="stack_norm",
                        final_alias=f"iter.{n_loops - 1}.ln_state", options=self._current_options())

    def _additivity_breaks(self, per_head: bool) -> list[str]:
        breaks = [b for b in super()._additivity_breaks(per_head) if not b.startswith("injection=")]
        return ["the nested loop feeds each stack z_L + z_H and normalises each stack's output", *breaks]

    # ------------------------------------------------------------------ the forward pass
    def forward(self, input: Any, n_loops: Optional[int] = None, *, token_type_ids: Optional[Tensor] = None,
                l_cycles: Optional[int] = None, **kwargs: Any) -> Any:
        """`HookedLoopedTransformer.forward`, plus `l_cycles=` (L cycles per H cycle, default
        `cfg.l_cycles`) and HRM-Text's PrefixLM mask: with `token_type_ids` [batch, pos]
        (1 = prefix) and `cfg.extra["prefix_lm"]`, the prefix tokens attend to each other in both
        directions, all others causally (as transformers does, the ids are ignored with a warning
        when the checkpoint has `prefix_lm: false`)."""
        if token_type_ids is not None and not self.cfg.extra.get("prefix_lm", False):
            warnings.warn("token_type_ids given, but this checkpoint has prefix_lm=False: ignoring them", stacklevel=2)
            token_type_ids = None
        self._token_types = token_type_ids
        try:
            with self._l_cycles(l_cycles):
                return super().forward(input, n_loops, **kwargs)
        finally:
            self._token_types = None

    def _prepare(self, input: Any, *args: Any, **kwargs: Any) -> Run:
        """The base checks, then the run's L cycles, and the PrefixLM pattern [batch, pos, pos]
        when token_type_ids were given."""
        run = super()._prepare(input, *args, **kwargs)
        run.options["l_cycles"] = self._l_run
        tt = getattr(self, "_token_types", None)
        if tt is not None:
            B, S = run.tokens.shape
            tt = torch.as_tensor(tt, device=run.tokens.device)
            if tt.ndim == 1 and B == 1:  # [pos], as the tokens may be
                tt = tt[None]
            if tuple(tt.shape) != (B, S) or tt.is_floating_point() or tt.dtype == torch.bool:
                raise ValueError(f"token_type_ids must be an integer tensor of the tokens' shape {(B, S)}, "
                                 f"got shape {tuple(tt.shape)} dtype {tt.dtype}")
            if not bool(((tt == 0) | (tt == 1)).all()):
                raise ValueError("token_type_ids must hold only 0 (causal) and 1 (bidirectional prefix block)")
            prefix = tt == 1
            allowed = torch.ones(S, S, dtype=torch.bool, device=tt.device).tril()[None] | (prefix[:, :, None] & prefix[:, None, :])
            if run.mask is not None:  # padding: no query attends to a pad key, a pad query keeps itself
                allowed = (allowed & run.mask.bool()[:, None, :]) | torch.eye(S, dtype=torch.bool, device=tt.device)[None]
            run.allowed = allowed
        return run

    def _begin(self, e: Tensor, run: Run) -> tuple[Tensor, Tensor]:
        """The carry entering H cycle 0: (z_H, z_L) = (the embedding or the given start, z_L's init)."""
        s = super()._begin(e, run)
        return s, self.z_l_init.to(dtype=s.dtype, device=s.device).expand_as(s)

    def _state(self, carry: tuple[Tensor, Tensor]) -> Tensor:
        return carry[0]

    def _freeze(self, carry: tuple[Tensor, Tensor], before: tuple[Tensor, Tensor], live: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(torch.where(live[..., None], new, old) for new, old in zip(carry, before))

    def _pass(self, run: Run, h: int, carry: tuple[Tensor, Tensor], e: Tensor, it: Any) -> tuple[Tensor, Tensor]:
        """H cycle h: `l_cycles` L cycles, then one H stack pass. Sites: `("iter", h, "low",
        cycle, k)` for the L stack, `("iter", h, k)` for the H stack."""
        s, z_l = carry
        s = it.hook_state_pre(s)
        for cycle in range(run.options["l_cycles"]):
            low = it.low[cycle] if it is NO_HOOKS or cycle < len(it.low) else NO_HOOKS
            x = low.hook_state_pre(z_l + s)
            for k, blk in enumerate(self.low_blocks):
                x = run.layer(("iter", h, "low", cycle, k), blk, low.blocks[k], x)
            z_l = low.hook_state_post(self.stack_norm(x, low.ln_state))
        x = it.hook_injected(s + z_l)
        for k, blk in enumerate(self.blocks):
            x = run.layer(("iter", h, k), blk, it.blocks[k], x)
        if h == run.n_loops - 1 and run.stop_at_layer == run.depth:
            raise StopAtLayer(x)  # the full depth: the residual before the last H stack's closing norm
        return it.hook_state_post(self.stack_norm(x, it.ln_state)), z_l

    # ------------------------------------------------------------------ the report
    report_stack_label = "H stack: "

    def _describe_layout(self, n_loops: int, options: dict[str, Any]) -> str:
        K, L = self.cfg.n_block, options["l_cycles"]
        return (f"Nested (HRM) loop: {n_loops} H cycles, each running the {K}-layer L stack {L} times "
                f"(z_L = norm(L(z_L + z_H))), then the {K}-layer H stack once (z_H = norm(H(z_H + z_L))); "
                f"{n_loops * (L + 1) * K} layers unrolled. The sections below read the H stack (one iteration per H "
                "cycle) unless their title names the L stack (one iteration per L cycle, in running order).")

    def _report_sections(self, report: Any, cache: Any, tokens: Tensor, mask: Optional[Tensor], stabilisation_tol: float,
                         convergence_tol: float) -> dict[str, Any]:
        """A nested (HRM) model's own sections: the hierarchical-convergence picture, and the L
        stack's convergence and head stability over every L cycle in running order. Returns their
        numbers."""
        from loop_lens.analysis.attention import attention_stability
        from loop_lens.analysis.fixed_points import step_sizes
        from loop_lens.analysis.hierarchical import hierarchical_convergence
        from loop_lens.report import _table_html
        from loop_lens.viz import figure_html, parts

        block = parts()
        hc = hierarchical_convergence(cache, mask=mask)
        low = cache.low_view()
        low_steps = step_sizes(low, mask=mask)
        low_table = attention_stability(low.model, low, tokens, mask=mask).table(tol=stabilisation_tol)
        L = cache.l_cycles
        report.sections.append(("Hierarchical convergence: z_L and z_H", figure_html(hc.plot()) + block.note(
            f"Relative step of z_L between consecutive L cycles in running order ({L} per H cycle; the first of each "
            "H cycle is measured against the last z_L of the previous one, so a reset when H moves shows as a jump) "
            "and of z_H between consecutive H cycles.")))
        conv = low_steps.convergence_iteration(convergence_tol)
        conv_text = ", ".join(f"layer {i}: {'never' if c < 0 else c}" for i, c in enumerate(conv.max(dim=1).values.tolist()))
        report.sections.append(("L stack: convergence of each layer across L cycles", figure_html(low_steps.plot()) + block.note(
            f"Iteration i is L cycle i mod {L} of H cycle i div {L}. Convergence iteration (relative step stays "
            f"below {convergence_tol:g}): {conv_text}.")))
        report.sections.append(("L stack: head stability", _table_html(low_table, "ll-low-head-table", sortable=True) + block.note(
            "As the H stack's table, over the L stack's traversals in running order; kappa from the L stack's weights.")))
        return {
            "hierarchical": {"h_relative": hc.h_relative.nanmean(-1), "l_relative": hc.l_relative.nanmean(-1)},
            "low_step_sizes": {"relative": low_steps.relative.mean(-1), "convergence_iteration": conv},
            "low_head_stability": low_table.to_dict(orient="records"),
            "l_cycles": L,
        }

    # ------------------------------------------------------------------ TransformerLens run methods
    def run_with_cache(self, *model_args: Any, l_cycles: Optional[int] = None, **kwargs: Any) -> tuple[Any, NestedLoopCache]:
        """`HookedLoopedTransformer.run_with_cache` (with `l_cycles=`), returning a NestedLoopCache."""
        with self._l_cycles(l_cycles) as L:  # for choosing the names; the forward gets l_cycles itself
            return super().run_with_cache(*model_args, l_cycles=L, **kwargs)

    def run_with_hooks(self, *model_args: Any, l_cycles: Optional[int] = None, **kwargs: Any) -> Any:
        """TransformerLens's `run_with_hooks`, with `l_cycles=` (hooks may name any L cycle the run has)."""
        with self._l_cycles(l_cycles) as L:
            return super().run_with_hooks(*model_args, l_cycles=L, **kwargs)



class LowStackModel:
    """The L stack of a nested (HRM) model seen as a single-timescale looped model, for the
    analyses: its block is the L stack (`blocks` = the model's `low_blocks`), its iterations are
    the L cycles in running order, and a state is read as the model reads z_H (`finish`: the
    unembedding; the logit lens: the parameterless norm, then the unembedding). Its config is the
    model's with `l_cycles=0` and " [L stack]" added to the name, so an analysis given the real
    model with an L-stack cache (or the reverse) refuses instead of mixing the stacks' weights.
    Made by `NestedLoopCache.low_view()`; it reads caches and does not run."""

    def __init__(self, model: HookedHrmTransformer, l_cycles: int):
        self.model = model
        self.l_cycles = l_cycles
        self.cfg = dataclasses.replace(model.cfg, l_cycles=0,
                                       model_name=f"{model.cfg.model_name} [L stack, {l_cycles} L cycles per H cycle]")
        self.tokenizer = model.tokenizer
        self.blocks = model.low_blocks
        self.prelude_blocks, self.coda_blocks = nn.ModuleList(), nn.ModuleList()
        self.unembed, self.ln_final, self.stack_norm = model.unembed, model.ln_final, model.stack_norm

    def schedule(self, n_loops: int) -> Schedule:
        """The L traversals in running order, the norm closing the last one as the final norm."""
        steps = tuple(Step((k,), f"blocks.{k}", "blocks", k) for k in range(self.cfg.n_block))
        return Schedule(n_loops, (), steps, (), final_norm="stack_norm", final_alias=f"iter.{n_loops - 1}.ln_state")

    def _additivity_breaks(self, per_head: bool) -> list[str]:
        return additivity_breaks(self.cfg, per_head)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def W_U(self) -> Tensor:
        return self.model.W_U

    def measured_state(self, x: Tensor, kind: str) -> Tensor:
        """As the model measures its states."""
        return self.model.measured_state(x, kind)

    def finish(self, state: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Logits read from an L-stack state as from z_H: the unembedding of the (normed) state."""
        return self.model.finish(state, attention_mask)

    def hook_names(self, n_loops: Optional[int] = None) -> list[str]:
        """The names of the view: `iter.{i}.*` for L traversal i (running order), as an L cycle's."""
        return [f"iter.{i}.{s}" for i in range(n_loops or 0) for s in self.model._low_suffixes]

    def tokenize(self, text: Any) -> tuple[Tensor, Tensor]:
        return self.model.tokenize(text)

    def to_tokens(self, text: Any, prepend_bos: bool = True) -> Tensor:
        return self.model.to_tokens(text, prepend_bos=prepend_bos)

    def to_str_tokens(self, text_or_tokens: Any) -> list[str]:
        return self.model.to_str_tokens(text_or_tokens)

    def __getattr__(self, name: str) -> Any:
        if name in ("run_with_cache", "run_with_hooks", "hooks", "ensure_loops", "forward", "generate"):
            raise TypeError(f"the L-stack view reads caches and does not run: call {name} on the model itself "
                            "(run_with_cache(..., l_cycles=) and cache.low_view() again)")
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


class LowStackCache(LoopCache):
    """`NestedLoopCache.low_view()`: the L stack's traversals as iterations. On the unrolled depth
    the norm closing the last L traversal is the final norm (the view's schedule), so
    TransformerLens's helpers with `apply_ln=True` read states as the L view's logit lens does."""
