"""Hook-point containers, built from the site table (`sites.py`). They hold no weights, so one
set can exist per iteration.

Their attribute paths are the hook names (`docs/hooks.md`): a `BlockHooks` placed at
`iter["3"].blocks[1]` gives `iter.3.blocks.1.attn.hook_pattern`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from transformer_lens.hook_points import HookPoint

from loop_lens.model import sites

# Every attribute a hooks container can have (each path component of every site, and what
# families register); `NO_HOOKS` answers these and refuses any other name, so a misspelt hook
# name fails loudly instead of doing nothing. Kept up to date by `sites.register`.
HOOK_ATTRIBUTES = sites.ATTRIBUTES


class _NoHooks:
    """Stands in for any hooks container: every known attribute is itself, calling it is identity,
    and `blocks[l]` is itself too. Unknown attribute names raise AttributeError."""

    def __getattr__(self, name: str) -> _NoHooks:
        if name in HOOK_ATTRIBUTES:
            return self
        raise AttributeError(f"no hook point or hooks container named {name!r}; known: {sorted(HOOK_ATTRIBUTES)}")

    def __getitem__(self, index: int) -> _NoHooks:
        return self

    def __call__(self, x):
        return x

    def __bool__(self) -> bool:
        return False


NO_HOOKS = _NoHooks()


def has_hooks(hp) -> bool:
    """True when a hook point has a forward or backward hook attached."""
    return isinstance(hp, HookPoint) and bool(hp._forward_hooks or hp._backward_hooks)


class Hooks(nn.Module):
    """A container of hook points at the given site paths (`"attn.hook_q"` makes a sub-container
    `attn` holding `hook_q`), in the order given, which is the order they fire. A known attribute
    this container lacks (a norm this placement does not have) is `NO_HOOKS`."""

    def __init__(self, paths: Iterable[str] = ()) -> None:
        super().__init__()
        for path in paths:
            self.place(path)

    def place(self, path: str, module: nn.Module | None = None) -> None:
        """Put a hook point (or `module`) at `path`, creating sub-containers on the way."""
        *parents, leaf = path.split(".")
        node: nn.Module = self
        for name in parents:
            if name not in node._modules:
                node._modules[name] = Hooks()  # not add_module: hasattr() answers NO_HOOKS for known names
            node = node._modules[name]
        node._modules[leaf] = HookPoint() if module is None else module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in HOOK_ATTRIBUTES:
                return NO_HOOKS
            raise

    def clear_hook_contexts(self) -> None:
        """Empty every hook point's `ctx` (before the container is reused for another iteration)."""
        for module in self.modules():
            if isinstance(module, HookPoint):
                module.clear_context()


def NormHooks() -> Hooks:  # noqa: N802 (a container kind, named like the classes it replaced)
    """A norm's hook points: `hook_scale` [batch, pos, 1], `hook_normalized` (before the weight)."""
    return Hooks(["hook_scale", "hook_normalized"])


def BlockHooks(cfg: Any) -> Hooks:  # noqa: N802
    """The hook points of one layer at one site (a prelude layer, a coda layer, or a block layer
    at one iteration): the layer sites this config has."""
    return Hooks(s.path for s in sites.sites("layer", cfg))


def pass_hooks(cfg: Any, layers: Iterable[nn.Module] | None = None) -> Hooks:
    """One pass's hook points, in firing order: the pass sites, with `blocks` (one `BlockHooks`
    per block layer, or the given `layers`) where the pass runs its layers."""
    out = Hooks()
    for s in sites.sites("pass", cfg):
        if s.path == "blocks":
            out.place("blocks", nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_block)) if layers is None
                      else nn.ModuleList(layers))
        else:
            out.place(s.path)
    return out


IterationHooks = pass_hooks  # everything hookable in one iteration of the loop: `iter.{t}.*`
