"""Hook-point containers. They hold no weights, so one set can exist per iteration.

Their attribute paths are the hook names (`docs/hooks.md`): a `BlockHooks` placed at
`iter["3"].blocks[1]` gives `iter.3.blocks.1.attn.hook_pattern`.
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from transformer_lens.hook_points import HookPoint

from loop_lens.config import LoopConfig

# Every attribute a hooks container can have (see the classes below); `NO_HOOKS` answers these
# and refuses any other name, so a misspelt hook name fails loudly instead of doing nothing.
HOOK_ATTRIBUTES = frozenset({
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "ln1", "ln2", "ln1_post", "ln2_post", "attn", "mlp",
    "hook_scale", "hook_normalized",
    "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_z",
    "hook_pre", "hook_pre_linear", "hook_post",
    "hook_state_pre", "hook_injected", "blocks", "ln_state", "hook_state_post", "hook_exit_logit",
    "hook_gate", "low",
})


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


class NormHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], before the weight


class AttnHooks(nn.Module):
    def __init__(self, cfg: LoopConfig) -> None:
        super().__init__()
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        if cfg.positional_embedding_type == "rotary":
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query, key]
        self.hook_pattern = HookPoint()  # [batch, head, query, key]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        if cfg.attn_gate:
            self.hook_gate = HookPoint()  # [batch, pos, head, d_head], sigmoid gate multiplying z


class MLPHooks(nn.Module):
    def __init__(self, cfg: LoopConfig) -> None:
        super().__init__()
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]; the gate's input for SwiGLU
        if cfg.mlp_type == "swiglu":
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]


class BlockHooks(nn.Module):
    """The hook points of one layer at one site (a prelude layer, a coda layer, or a block layer
    at one iteration)."""

    def __init__(self, cfg: LoopConfig) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        if cfg.norm_placement != "post":
            self.ln1 = NormHooks()
        self.attn = AttnHooks(cfg)
        if cfg.norm_placement != "pre":
            self.ln1_post = NormHooks()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        if cfg.norm_placement != "post":
            self.ln2 = NormHooks()
        self.mlp = MLPHooks(cfg)
        if cfg.norm_placement != "pre":
            self.ln2_post = NormHooks()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("ln1", "ln2", "ln1_post", "ln2_post"):
                return NO_HOOKS  # this placement has no such norm
            raise


class IterationHooks(nn.Module):
    """Everything hookable in one iteration of the loop: `iter.{t}.*`."""

    def clear_hook_contexts(self) -> None:
        """Empty every hook point's `ctx` (before the container is reused for another iteration)."""
        for module in self.modules():
            if isinstance(module, HookPoint):
                module.clear_context()

    def __init__(self, cfg: LoopConfig) -> None:
        super().__init__()
        self.hook_state_pre = HookPoint()
        if cfg.injection != "none":
            self.hook_injected = HookPoint()
        self.blocks = nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_block))
        if cfg.iter_norm:
            self.ln_state = NormHooks()
        self.hook_state_post = HookPoint()
        if cfg.exit_gate:
            self.hook_exit_logit = HookPoint()  # [batch, pos]


class LowCycleHooks(nn.Module):
    """One low-level cycle inside an iteration of a nested (HRM) loop: `iter.{h}.low.{l}.*`."""

    def __init__(self, cfg: LoopConfig) -> None:
        super().__init__()
        self.hook_state_pre = HookPoint()  # the L stack's input z_L + z_H
        self.blocks = nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_block))
        self.ln_state = NormHooks()  # the L stack's closing (parameterless) norm
        self.hook_state_post = HookPoint()  # the new z_L


class NestedIterationHooks(IterationHooks):
    """One high-level cycle of a nested (HRM) loop, in firing order: `iter.{h}.hook_state_pre`
    (z_H entering), `iter.{h}.low.{l}.*` (each L cycle), `hook_injected` (z_H + z_L), the H
    stack's `blocks.{k}.*`, its closing norm `ln_state.*`, `hook_state_post` (the new z_H)."""

    def __init__(self, cfg: LoopConfig, l_cycles: Optional[int] = None) -> None:
        """Hook points for `l_cycles` L cycles (default `cfg.l_cycles`; runs may use fewer)."""
        nn.Module.__init__(self)
        self.hook_state_pre = HookPoint()
        self.low = nn.ModuleList(LowCycleHooks(cfg) for _ in range(cfg.l_cycles if l_cycles is None else l_cycles))
        self.hook_injected = HookPoint()
        self.blocks = nn.ModuleList(BlockHooks(cfg) for _ in range(cfg.n_block))
        self.ln_state = NormHooks()
        self.hook_state_post = HookPoint()
