"""What the analyses need of a model, as a Protocol (`HookedLoopedTransformer` satisfies it)."""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from loop_lens.config import LoopConfig

Mask = Int[Tensor, "batch pos"]
"""An attention mask: 1 for a real token, 0 for padding."""


@runtime_checkable
class LoopedModel(Protocol):
    """A looped model as the analyses use it: its config, the final norm and unembedding, the rest
    of the network from a state (`finish`), the recurrent block's weights, and its run methods."""

    cfg: LoopConfig
    tokenizer: Any
    blocks: nn.ModuleList
    unembed: nn.Module
    ln_final: nn.Module

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""

    def finish(
        self, state: Float[Tensor, "batch pos d_model"], attention_mask: Optional[Mask] = None
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits from a state leaving an iteration: post-loop norm, coda, final norm, unembedding."""

    def measured_state(self, x: Tensor, kind: str) -> Tensor:
        """An activation of hook kind `kind` as the geometric analyses measure it."""

    def ensure_loops(self, n_loops: int) -> None:
        """Create the hook points of iterations 0..n_loops-1."""

    def run_with_hooks(self, *model_args: Any, fwd_hooks: Any = (), **kwargs: Any) -> Any:
        """TransformerLens's run_with_hooks."""

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> Any:
        """Run and return (output, LoopCache)."""

    def tokenize(self, text: Any) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask for text, right-padded."""
