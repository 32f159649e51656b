"""The hook-point lifecycle of a looped model (`HookLifecycle`, mixed into `HookedLoopedTransformer`).

Hook points exist for the prelude, the coda and the model-level sites always, and for an
iteration only while something is hooked or cached there (`iter.{t}`). Hooks by name create
their iteration's hook points; hooks by filter function are offered each pass as the loop reaches
it (`_enter_pass` / `_leave_pass`), so a filter holds one iteration's hook points at a time;
removing hooks drops idle iterations. TransformerLens's hook API (`hooks()`, `add_hook`,
`reset_hooks`, caching hooks) works on top of this; `docs/architecture.md` has the picture.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from jaxtyping import Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loop_lens.checks import check_n_loops, hook_iteration, hook_name_problem, integer
from loop_lens.errors import HookError, HookNameError
from loop_lens.model.hooks import NO_HOOKS
from loop_lens.model.names import parse_hook_name

TokensLike = Union[str, Sequence[str], Int[Tensor, "batch pos"], Int[Tensor, " pos"]]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
EXIT_MODES = ("last", "weighted", "threshold")
RETURN_TYPES = ("logits", "loss", "both", None)


SPARE_ITERATION_HOOKS = 64  # released iteration hook containers kept for reuse (a few MB at most)

@dataclass
class _FilterHook:
    """A hook attached by a name filter. Its iteration hook points are created when a run reaches
    them, so a filter reaches every iteration of every run, whatever ran before."""

    names: Callable[[str], bool]
    hook: Callable
    dir: str
    level: Optional[int]
    is_permanent: bool
    prepend: bool
    attached: set[int] = field(default_factory=set)
    reach: dict[int, Any] = field(default_factory=dict)  # per iteration, what a family's _unreached remembers offering

def _checked_hook(user_hook: Callable) -> Callable:
    """Wrap a forward hook so that a return value that cannot replace the activation (another
    shape, dtype, device, or not a tensor) raises HookError naming the hook point."""

    @functools.wraps(user_hook)
    def checked(activation: Tensor, hook: HookPoint) -> Optional[Tensor]:
        out = user_hook(activation, hook=hook)
        if out is None:
            return None
        if not isinstance(out, Tensor):
            raise HookError(
                f"hook {_hook_label(user_hook)} on {hook.name} returned a {type(out).__name__}; return a tensor "
                f"of shape {tuple(activation.shape)} and dtype {activation.dtype}, or None to keep the activation"
            )
        if out.shape != activation.shape or out.dtype != activation.dtype or out.device != activation.device:
            raise HookError(
                f"hook {_hook_label(user_hook)} on {hook.name} returned shape {tuple(out.shape)} {out.dtype} on "
                f"{out.device}, but the activation is {tuple(activation.shape)} {activation.dtype} on "
                f"{activation.device}; a hook must return the same shape, dtype and device (or None)"
            )
        return out

    return checked

def _hook_label(hook: Callable) -> str:
    func = hook.func if isinstance(hook, functools.partial) else hook
    return repr(getattr(func, "__qualname__", type(func).__name__))

def _has_hooks(module: nn.Module) -> bool:
    return any(isinstance(m, HookPoint) and (m._forward_hooks or m._backward_hooks) for m in module.modules())

class _HookDict(dict):
    """`hook_dict`: the hook points that exist now. A missing `iter.*` name raises a KeyError
    naming the calls that create or list iteration hook points."""

    def __missing__(self, key: Any) -> Any:
        if isinstance(key, str) and key.startswith("iter."):
            raise KeyError(f"{key!r}: iteration hook points exist only while something is hooked, cached or pinned "
                           "there. model.hook_names(n_loops) lists every name of a run; model.pin_loops(n_loops) "
                           "creates and keeps them; run_with_cache / run_with_hooks / add_hook create them as needed")
        raise KeyError(key)


class HookLifecycle:
    """Hook points on demand: which exist, when they are made and dropped, and TransformerLens's
    hook API over them. Mixed into `HookedLoopedTransformer` (it reads the model's `cfg`, `iter`,
    `iteration_hooks_cls`, `_options` and `_silent_hooks`)."""

    def loop_hook_names(self, iteration: int = 0) -> list[str]:
        """The hook names of one iteration, whether or not its hook points exist yet."""
        return [f"iter.{iteration}.{s}" for s in self._iter_suffixes]

    def hook_names(self, n_loops: Optional[int] = None, **options: Any) -> list[str]:
        """Every hook name a run with `n_loops` iterations (and the family's run `options`) fires,
        in the order they fire."""
        T = check_n_loops(n_loops, self.cfg.default_loops)
        with self._options(**options):  # without options: the checkpoint's own, whatever an outer call runs
            fixed = [n for n in self.hook_dict if not n.startswith("iter.") and n not in self._silent_hooks]
            before = [n for n in fixed if n.startswith(("hook_embed", "hook_pos_embed", "prelude."))]
            after = [n for n in fixed if n not in before]
            return before + [n for t in range(T) for n in self.loop_hook_names(t)] + after

    def ensure_loops(self, n_loops: int) -> None:
        """Create the hook points of iterations 0..n_loops-1 now (they are otherwise created when
        a hook or cache reaches them, and dropped when nothing is attached any more)."""
        self._materialise(range(check_n_loops(n_loops, self.cfg.default_loops)))

    def _iteration_hooks(self, t: int) -> Any:
        """The hooks container of iteration t: its hook points if they exist, else NO_HOOKS."""
        return self.iter[str(t)] if str(t) in self.iter else NO_HOOKS

    def _materialise(self, iterations: Any) -> None:
        missing = [t for t in iterations if str(t) not in self.iter]
        for t in missing:
            self.iter[str(t)] = self._spare_hooks.pop() if self._spare_hooks else self._new_iteration_hooks()
        if missing:
            self.setup()

    def _new_iteration_hooks(self) -> nn.Module:
        """A fresh hook container for one iteration."""
        return self.iteration_hooks_cls(self.cfg)

    def _release(self) -> None:
        """Drop the hook points of iterations where nothing is attached any more (keeping a few
        containers to reuse, so repeated hooked runs do not rebuild them)."""
        self._drop([k for k, it in self.iter.items() if not _has_hooks(it) and k not in self._pinned_iterations])

    def _drop(self, keys: Sequence[str]) -> None:
        """Drop these iterations' containers (keeping a few to reuse)."""
        for k in keys:
            container = self.iter[k]
            del self.iter[k]
            if len(self._spare_hooks) < SPARE_ITERATION_HOOKS:
                container.clear_hook_contexts()
                self._spare_hooks.append(container)
        if keys:
            self.setup()

    @property
    def _silent_hooks(self) -> frozenset[str]:
        """Hook points that exist but never fire: the final norm's when the model applies that
        norm inside every iteration instead (Ouro: `iter.{t}.ln_state.*`)."""
        return frozenset() if self.cfg.final_norm else frozenset({"ln_final.hook_scale", "ln_final.hook_normalized"})

    def _hook_point(self, name: str) -> HookPoint:
        """The hook point called `name`, creating its iteration's hook points if needed."""
        if name in self._silent_hooks:
            raise HookNameError(f"{name!r} never fires on this model: its final norm runs inside every iteration "
                                f"(hook iter.{{t}}.ln_state.* instead)")
        hp = self.mod_dict.get(name)
        if isinstance(hp, HookPoint):
            return hp
        if hook_name_problem(name):
            raise HookNameError(hook_name_problem(name))
        named = self._iterations_named([name])
        if named:
            self._materialise(named)
            return self.mod_dict[name]
        try:
            parts = parse_hook_name(name)
        except ValueError:
            parts = None
        t = parts.iteration if parts is not None and parts.iteration is not None else 0
        known = [n for n in self.hook_dict if not n.startswith("iter.")] + self.loop_hook_names(t)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise HookNameError(f"no hook point named {name!r} on this model{hint} (model.hook_names(T) lists them all)")

    def _iterations_named(self, names: Sequence[Any]) -> list[int]:
        """The iterations whose hook points these names (of any run length) refer to."""
        found = set()
        for name in names:
            if hook_iteration(name) is not None and name.split(".", 2)[-1] in self._iter_suffixes:
                found.add(hook_iteration(name))
        return sorted(found)

    @contextmanager
    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Any:
        """TransformerLens's `hooks` context; the iterations its hook names reach get their hook
        points in one pass (they are dropped again when the context resets its hooks)."""
        self._materialise(self._iterations_named([name for name, _ in [*fwd_hooks, *bwd_hooks]]))
        with super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts) as model:
            yield model

    def add_hook(
        self,
        name: Union[str, Callable[[str], bool]],
        hook: Callable,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: Optional[int] = None,
        prepend: bool = False,
    ) -> None:
        """TransformerLens's `add_hook`. A name creates its iteration's hook points; a filter
        applies to every iteration of every later run (its hook points are created as runs reach
        them). Forward hooks that return a wrong shape, dtype or type raise HookError."""
        if not callable(hook):
            raise TypeError(f"the hook for {name if isinstance(name, str) else 'a filter'!r} is a {type(hook).__name__}, "
                            "not a function (activation, hook) -> activation or None")
        fn = _checked_hook(hook) if dir == "fwd" else hook
        if isinstance(name, str):
            try:
                hp = self._hook_point(name)
                self.check_and_add_hook(hp, name, fn, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)
            except BaseException:
                self._release()  # a refused name leaves no hook points behind
                raise
            return
        if not callable(name):
            raise TypeError(f"a hook name must be a string or a filter function, got {type(name).__name__}")
        for n, hp in list(self.hook_dict.items()):
            if not n.startswith("iter.") and n not in self._silent_hooks and name(n):
                self.check_and_add_hook(hp, n, fn, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)
        self._filter_hooks.append(_FilterHook(name, fn, dir, level, is_permanent, prepend))

    def _enable_hook(self, name: Union[str, Callable], hook: Callable, dir: str) -> None:
        self.add_hook(name, hook, dir=dir, level=self.context_level)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False, level: Optional[int] = None) -> None:
        """TransformerLens's hook removal; also forgets matching filter hooks and drops the hook
        points of iterations left with no hooks."""
        super().remove_all_hook_fns(direction, including_permanent=including_permanent, level=level)
        self._filter_hooks = [
            f for f in self._filter_hooks
            if not ((direction in ("both", f.dir)) and (including_permanent or not f.is_permanent) and (level is None or f.level == level))
        ]
        self._release()

    def _enter_pass(self, t: int) -> Any:
        """The hook container of pass t as the loop reaches it, after giving every filter hook
        the names of pass t it has not been offered yet (creating their hook points now). A
        container made here for forward filter hooks alone is dropped again when the pass ends
        (`_leave_pass`), so hooks by filter cost memory for one pass at a time, whatever the run's
        length."""
        todo = [(f, names) for f in self._filter_hooks if (names := [n for n in self._unreached(f, t) if f.names(n)])]
        if todo:
            fresh = str(t) not in self.iter
            self._materialise([t])
            for f, names in todo:
                for n in names:
                    self.check_and_add_hook(self.mod_dict[n], n, f.hook, dir=f.dir, is_permanent=f.is_permanent,
                                            level=f.level, prepend=f.prepend)
            if fresh and all(f.dir == "fwd" for f, _ in todo):
                self._passing.add(t)
        return self._iteration_hooks(t)

    def _leave_pass(self, t: int) -> None:
        """Drop pass t's container if `_enter_pass` made it for forward filter hooks alone (and
        nothing was added to it by name since); filters will be offered pass t again next run."""
        if t not in self._passing:
            return
        self._passing.discard(t)
        container = self.iter[str(t)]
        if self._named_hook_at(container):
            return
        for module in container.modules():
            if isinstance(module, HookPoint):
                module.remove_hooks("both", including_permanent=True)
        for f in self._filter_hooks:
            f.attached.discard(t)
            f.reach.pop(t, None)
        self._drop([str(t)])

    def _unreached(self, f: _FilterHook, t: int) -> list[str]:
        """The hook names of iteration t in this run that filter hook `f` has not been offered
        yet (marking them offered)."""
        if t in f.attached:
            return []
        f.attached.add(t)
        return self.loop_hook_names(t)

    def _named_hook_at(self, module: nn.Module) -> Optional[str]:
        """The name of a hook point under `module` holding a hook added by name, or None. Hooks a
        filter function attached are left out: a filter applies to whatever each run reaches."""
        by_filter = {id(f.hook) for f in self._filter_hooks}
        for m in module.modules():
            if isinstance(m, HookPoint) and any(id(h.user_hook) not in by_filter for h in [*m.fwd_hooks, *m.bwd_hooks]):
                return m.name
        return None

    def _run_label(self, n_loops: int) -> str:
        """How a run's length reads in messages."""
        return f"n_loops={n_loops}"

    def _check_hooks_fire(self, n_loops: int) -> None:
        """Refuse hooks added by name on iterations this run does not reach (they would not fire)."""
        for key, it in self.iter.items():
            hooked = self._named_hook_at(it) if int(key) >= n_loops else None
            if hooked:
                raise HookNameError(
                    f"a hook is attached at {hooked}, but this run has {self._run_label(n_loops)} (iterations "
                    f"0..{n_loops - 1}): it would not fire. Run more iterations, or remove it with model.reset_hooks()"
                )

    def _names_in_run(self, names_filter: NamesFilter, n_loops: int) -> set[str]:
        """The hook names a filter selects among those a run of `n_loops` fires; creates their
        iterations' hook points."""
        if isinstance(names_filter, str) or (isinstance(names_filter, Sequence) and not callable(names_filter)):
            listed = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            self._materialise(self._iterations_named(listed))
            for name in listed:
                self._hook_point(name)
                parts = parse_hook_name(name) if name.startswith("iter.") else None
                if parts is not None and parts.iteration >= n_loops:
                    raise HookNameError(f"{name!r} is at iteration {parts.iteration}, but this run has n_loops={n_loops}")
            return set(listed)
        if names_filter is not None and not callable(names_filter):
            raise ValueError(f"names_filter must be None, a name, a list of names or a function, got {type(names_filter).__name__}")
        keep = names_filter or (lambda name: True)
        wanted = {n for n in self.hook_dict if not n.startswith("iter.") and n not in self._silent_hooks and keep(n)}
        hooked = []
        for t in range(n_loops):
            names = [n for n in self.loop_hook_names(t) if keep(n)]
            if names:
                hooked.append(t)
                wanted.update(names)
        self._materialise(hooked)
        return wanted

    _pinned_iterations: frozenset[str] = frozenset()  # iterations kept materialised for nnsight (pin_loops)

    def pin_loops(self, n_loops: Optional[int] = None) -> Any:
        """Create the hook points of iterations 0..n_loops-1 and keep them (they are otherwise
        created when a hook reaches them and dropped when idle), so that tools which walk the
        module tree once, such as nnsight's `NNsight(model)`, find every iteration. Returns the
        model. `pin_loops(0)` unpins."""
        T = integer(n_loops if n_loops is not None else self.cfg.default_loops, "n_loops")
        if T < 0:
            raise ValueError(f"n_loops must be >= 0, got {T}")
        self._materialise(range(T))
        self._pinned_iterations = frozenset(str(t) for t in range(T))
        self._release()
        return self

    def _check_listed_reached(self, names_filter: Any, cache_dict: dict, stop_at_layer: Any, wanted: Any = ()) -> None:
        """A hook name listed in names_filter that a stop_at_layer run never reached raises (as a
        hook added on an iteration the run does not reach does); so does a filter function whose
        every selected name lies past the stop (the cache would be silently empty)."""
        if stop_at_layer is None or names_filter is None:
            return
        if callable(names_filter):
            if wanted and not cache_dict:
                raise HookNameError(f"names_filter selects {len(wanted)} hook points of this run (e.g. {sorted(wanted)[:3]}), "
                                    f"but the run stops at stop_at_layer={stop_at_layer} before any of them fires: the "
                                    "cache would be empty. Use a larger stop_at_layer (or none)")
            return
        listed = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        missing = [n for n in listed if n not in cache_dict]
        if missing:
            raise HookNameError(f"names_filter lists {missing[:5]}, but the run stops at stop_at_layer={stop_at_layer} "
                                "before reaching them: they would not be cached. Cache them in a run with a larger "
                                "stop_at_layer (or none)")

    def setup(self) -> None:
        """TransformerLens's setup; `hook_dict` then names, on a missing iteration hook, the call
        that creates it (iteration hook points exist only while hooked, cached or pinned)."""
        super().setup()
        self.hook_dict = _HookDict(self.hook_dict)

    def add_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Any = None,
                          remove_batch_dim: bool = False, cache: Optional[dict] = None) -> dict:
        """TransformerLens's `add_caching_hooks` (and so `cache_all` / `cache_some`): the hooks
        reach every iteration of every later run, whatever its n_loops (a filter hook)."""
        from loop_lens.model.tl_compat import caching_hook, names_filter_fn

        cache = {} if cache is None else cache
        keep = names_filter_fn(names_filter)
        self.is_caching = True
        self.add_hook(keep, caching_hook(cache, device, remove_batch_dim, False), "fwd")
        if incl_bwd:
            self.add_hook(keep, caching_hook(cache, device, remove_batch_dim, True), "bwd")
        return cache

    def get_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: Any = None,
                          remove_batch_dim: bool = False, cache: Optional[dict] = None, pos_slice: Any = None,
                          n_loops: Optional[int] = None) -> tuple[dict, list, list]:
        """TransformerLens's `get_caching_hooks`, over every hook point of a run of `n_loops`
        iterations (default `cfg.default_loops`) and every one that exists now: (cache,
        fwd_hooks, bwd_hooks) for `model.hooks(...)` / `run_with_hooks`."""
        from loop_lens.model.tl_compat import caching_hook, names_filter_fn

        cache = {} if cache is None else cache
        keep = names_filter_fn(names_filter)
        names = [n for n in self.hook_dict if n not in self._silent_hooks]
        names += [n for n in self.hook_names(n_loops) if n not in self.hook_dict]
        self.is_caching = True
        fwd = caching_hook(cache, device, remove_batch_dim, False, pos_slice)
        bwd = caching_hook(cache, device, remove_batch_dim, True, pos_slice)
        chosen = [n for n in names if keep(n)]
        return cache, [(n, fwd) for n in chosen], [(n, bwd) for n in chosen] if incl_bwd else []
