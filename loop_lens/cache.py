"""LoopCache: a TransformerLens ActivationCache that knows about iterations.

`stack(kind)` gathers one hook kind over every (iteration, block layer); `unrolled()` renames
the cache over the unrolled depth so TransformerLens's own cache helpers work unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor
from transformer_lens import ActivationCache

from loop_lens.model.hooks import NO_HOOKS
from loop_lens.model.names import _suffix, parse_hook_name

if TYPE_CHECKING:
    from loop_lens.model.looped import HookedLoopedTransformer


class LoopCache(ActivationCache):
    """Activations of one run, keyed by loop_lens hook names (`iter.{t}.blocks.{l}.*`)."""

    def __init__(
        self,
        cache_dict: dict[str, Tensor],
        model: HookedLoopedTransformer,
        n_loops: int,
        has_batch_dim: bool = True,
    ):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.n_loops = n_loops

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, str):
            if key in self.cache_dict:
                return self.cache_dict[key]
            if key.startswith(("iter.", "prelude.", "coda.")):
                hint = "" if key in self.model.hook_dict else " (no such hook point on this model)"
                raise KeyError(f"{key!r} is not in this cache{hint}; was it excluded by names_filter?")
        return super().__getitem__(key)

    @property
    def cfg(self):
        return self.model.cfg

    def depth_index(self, iteration: int, layer: int) -> int:
        """Unrolled depth of block layer `layer` at iteration `iteration`."""
        if not (0 <= iteration < self.n_loops and 0 <= layer < self.cfg.n_block):
            raise IndexError(f"(iteration={iteration}, layer={layer}) outside {self.n_loops} x {self.cfg.n_block}")
        return self.cfg.n_prelude + iteration * self.cfg.n_block + layer

    def loop_index(self, depth: int) -> tuple[str, Optional[int], int]:
        """Unrolled depth -> (phase, iteration or None, layer within its phase)."""
        p, k = self.cfg.n_prelude, self.cfg.n_block
        total = self.cfg.depth(self.n_loops)
        if not 0 <= depth < total:
            raise IndexError(f"depth {depth} outside the unrolled depth {total}")
        if depth < p:
            return ("prelude", None, depth)
        if depth < p + self.n_loops * k:
            t, layer = divmod(depth - p, k)
            return ("loop", t, layer)
        return ("coda", None, depth - p - self.n_loops * k)

    def stack(self, kind: str) -> Tensor:
        """One hook kind over all iterations and block layers: [n_loops, n_block, ...].

        Per-iteration hooks (`hook_state_post`, `hook_exit_logit`, ...) give [n_loops, ...].
        """
        suffix = _suffix(kind)
        per_iter = suffix.startswith(("hook_state", "hook_injected", "hook_exit", "ln_state"))
        out = []
        for t in range(self.n_loops):
            if per_iter:
                out.append(self[f"iter.{t}.{suffix}"])
            else:
                out.append(torch.stack([self[f"iter.{t}.blocks.{l}.{suffix}"] for l in range(self.cfg.n_block)]))
        return torch.stack(out)

    def unrolled(self) -> ActivationCache:
        """A plain ActivationCache whose `blocks.{k}` run over the unrolled depth (prelude, each
        iteration's block, coda), for TransformerLens's `accumulated_resid`, `decompose_resid`,
        `apply_ln_to_stack`, `logit_attrs`."""
        renamed: dict[str, Tensor] = {}
        for name, value in self.cache_dict.items():
            try:
                phase, it, layer, kind = parse_hook_name(name)
            except ValueError:
                renamed[name] = value
                continue
            if layer is None:
                renamed[name] = value
                continue
            if phase == "prelude":
                depth = layer
            elif phase == "loop":
                depth = self.depth_index(it, layer)
            else:
                depth = self.cfg.n_prelude + self.n_loops * self.cfg.n_block + layer
            renamed[f"blocks.{depth}.{kind}"] = value
        return ActivationCache(renamed, UnrolledView(self.model, self.n_loops), has_batch_dim=self.has_batch_dim)


class UnrolledView:
    """The model as TransformerLens's cache helpers see it: `n_layers` = unrolled depth, with
    `blocks[k]` pointing at the (shared) weights of the layer run at depth k."""

    def __init__(self, model: HookedLoopedTransformer, n_loops: int):
        c = model.cfg
        self.model = model
        self.cfg = SimpleNamespace(
            n_layers=c.depth(n_loops),
            d_model=c.d_model,
            n_heads=c.n_heads,
            d_head=c.d_head,
            d_vocab=c.d_vocab,
            d_mlp=c.d_mlp,
            normalization_type=c.normalization_type,
            attn_only=False,
            final_rms=c.normalization_type == "RMS",
        )
        self.blocks = list(model.prelude_blocks) + list(model.blocks) * n_loops + list(model.coda_blocks)

    def ln_final(self, x: Tensor) -> Tensor:
        return self.model.ln_final(x, NO_HOOKS)

    @property
    def W_U(self) -> Tensor:
        return self.model.W_U

    def tokens_to_residual_directions(self, tokens: Any) -> Tensor:
        """Unembedding directions with the final norm's weight folded in (TL folds it into W_U),
        so `logit_attrs` of a normalised decomposition sums to the logit."""
        tokens = torch.as_tensor(tokens, device=self.model.device)
        folded = self.model.W_U * self.model.ln_final.weight[:, None]
        return folded[:, tokens].movedim(0, -1)

    def to_single_token(self, string: str) -> int:
        ids = self.model.to_tokens(string, prepend_bos=False)[0]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one")
        return int(ids[0])
