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

import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from loop_lens.cache import LoopCache
from loop_lens.config import LoopConfig
from loop_lens.errors import ConfigError, SaveError
from loop_lens.model.components import Block, Norm
from loop_lens.model.hooks import NestedIterationHooks
from loop_lens.model.looped import HookedLoopedTransformer, _Run

_NOT_NESTED = ("is not available on a nested (HRM) cache yet: its unrolled depth would misplace the L cycles. "
               "Read activations by name (cache['iter.{h}.low.{l}.blocks.{k}.hook_resid_post']), or use "
               "cache.stack(kind) for the H stack")


class NestedLoopCache(LoopCache):
    """The LoopCache of a nested (HRM) run. Names and `stack` (the H stack, [n_loops, n_block, ...])
    work as usual; the unrolled-depth views refuse, naming what to use instead."""

    def _refuse(self, what: str) -> ValueError:
        return ValueError(f"{what} {_NOT_NESTED}")

    def unrolled(self) -> Any:
        """Refused (ValueError): the unrolled view is not nested-aware yet."""
        raise self._refuse("cache.unrolled()")

    def _run_unrolled(self, name: str, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse(f"cache.{name}()")

    def decompose_resid(self, *args: Any, **kwargs: Any) -> Any:
        """Refused (ValueError): needs the unrolled depth."""
        raise self._refuse("cache.decompose_resid()")

    def get_full_resid_decomposition(self, *args: Any, **kwargs: Any) -> Any:
        """Refused (ValueError): needs the unrolled depth."""
        raise self._refuse("cache.get_full_resid_decomposition()")

    def depth_index(self, iteration: int, layer: int) -> int:
        """Refused (ValueError): the flat depth index ignores the L cycles."""
        raise self._refuse("cache.depth_index()")

    def loop_index(self, depth: int) -> Any:
        """Refused (ValueError): the flat depth index ignores the L cycles."""
        raise self._refuse("cache.loop_index()")

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> NestedLoopCache:
        """TransformerLens's batch slice, still a NestedLoopCache."""
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return NestedLoopCache(sliced.cache_dict, self.model, self.n_loops, has_batch_dim=sliced.has_batch_dim)


class HookedHrmTransformer(HookedLoopedTransformer):
    """A nested looped transformer (HRM-Text): `n_loops` H cycles of `cfg.l_cycles` L cycles.

    Parameters: `embed`, `blocks` (the H stack), `low_blocks` (the L stack), `z_l_init` (the
    L state's start vector), `unembed`. Hook points per H cycle live in `iter.{h}` (a
    `NestedIterationHooks`), only where something is hooked or cached.
    """

    iteration_hooks_cls = NestedIterationHooks

    def __init__(self, cfg: LoopConfig, tokenizer: Any = None):
        if cfg.l_cycles < 1:
            raise ConfigError(f"l_cycles: a nested (HRM) model needs l_cycles >= 1, got {cfg.l_cycles}")
        if cfg.final_norm or cfg.iter_norm or cfg.norm_after_loop or cfg.exit_gate:
            raise ConfigError("final_norm / iter_norm / norm_after_loop / exit_gate: a nested (HRM) model closes each "
                              "stack with its own parameterless norm and has no exit gate; set them all False")
        super().__init__(cfg, tokenizer)
        self.low_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_block))
        self.stack_norm = Norm(cfg.d_model, "RMS", cfg.norm_eps, weight=False)  # closes both stacks
        self.z_l_init = nn.Parameter(torch.zeros(cfg.d_model), requires_grad=False)
        self.ln_final.weight = None  # never applied (final_norm=False): keep it out of the state dict
        self._token_types: Optional[Tensor] = None  # this run's token_type_ids (PrefixLM), set by forward
        self.setup()

    def forward(self, input: Any, n_loops: Optional[int] = None, *, token_type_ids: Optional[Tensor] = None, **kwargs: Any) -> Any:
        """`HookedLoopedTransformer.forward`, plus HRM-Text's PrefixLM mask: with
        `token_type_ids` [batch, pos] (1 = prefix) and `cfg.extra["prefix_lm"]`, the prefix tokens
        attend to each other in both directions, all others causally (as transformers does, the
        ids are ignored with a warning when the checkpoint has `prefix_lm: false`)."""
        if token_type_ids is not None and not self.cfg.extra.get("prefix_lm", False):
            warnings.warn("token_type_ids given, but this checkpoint has prefix_lm=False: ignoring them", stacklevel=2)
            token_type_ids = None
        self._token_types = token_type_ids
        try:
            return super().forward(input, n_loops, **kwargs)
        finally:
            self._token_types = None

    def _prepare(self, input: Any, *args: Any, **kwargs: Any) -> _Run:
        """The base checks, then the PrefixLM pattern [batch, pos, pos] when token_type_ids were given."""
        run = super()._prepare(input, *args, **kwargs)
        tt = getattr(self, "_token_types", None)
        if tt is not None:
            B, S = run.tokens.shape
            tt = torch.as_tensor(tt, device=run.tokens.device)
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

    def _loop(
        self, s: Float[Tensor, "batch pos d_model"], e: Float[Tensor, "batch pos d_model"], run: _Run
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """`n_loops` H cycles, each `cfg.l_cycles` L cycles then one H stack pass. Returns the last
        z_H, and every z_H when the exit needs them (no gate logits)."""
        keep = run.exit != "last"
        states: list[Tensor] = []
        z_l = self.z_l_init.to(dtype=s.dtype, device=s.device).expand_as(s)
        for h in range(run.n_loops):
            it = self._iteration_hooks(h)
            s = it.hook_state_pre(s)
            for lc in range(self.cfg.l_cycles):
                low = it.low[lc]
                x = low.hook_state_pre(z_l + s)
                for k, blk in enumerate(self.low_blocks):
                    x = run.layer(blk, low.blocks[k], x)
                z_l = low.hook_state_post(self.stack_norm(x, low.ln_state))
            x = it.hook_injected(s + z_l)
            for k, blk in enumerate(self.blocks):
                x = run.layer(blk, it.blocks[k], x)
            s = it.hook_state_post(self.stack_norm(x, it.ln_state))
            if keep:
                states.append(s)
        return s, states, []

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> tuple[Any, NestedLoopCache]:
        """`HookedLoopedTransformer.run_with_cache`, returning a NestedLoopCache."""
        out, cache = super().run_with_cache(*model_args, **kwargs)
        return out, NestedLoopCache(cache.cache_dict, self, cache.n_loops, has_batch_dim=cache.has_batch_dim)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Refused (ValueError): loop_lens's KV-cache generation runs a single-timescale loop."""
        raise ValueError("model.generate does not run the nested (HRM) loop yet; call the model on the growing "
                         "token sequence instead")

    def save(self, directory: Union[str, Path], overwrite: bool = False) -> Path:
        """Refused: the native format does not record the nested layout yet (reload the
        transformers checkpoint with `ll.load` instead)."""
        raise SaveError(f"cannot save {directory}: HRM (nested-loop) models have no native format in loop_lens yet; "
                        "keep the transformers checkpoint and load it with ll.load")
