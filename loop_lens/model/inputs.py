"""Tokens and arguments of a looped model's runs (`InputChecks`, mixed into `HookedLoopedTransformer`):
text to tokens and back, and every argument of a run checked once, before any compute, into a
`Run` (`_prepare`). Every error names the argument and how it disagrees.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from loop_lens.checks import check_n_loops, real_tensor
from loop_lens.checks import seed as check_seed
from loop_lens.model import tl_compat
from loop_lens.model.run import Run
from loop_lens.tokenization import decode_each, encode_batch

TokensLike = Union[str, Sequence[str], Int[Tensor, "batch pos"], Int[Tensor, " pos"]]
EXIT_MODES = ("last", "weighted", "threshold")
RETURN_TYPES = ("logits", "loss", "both", None)



class InputChecks:
    """Tokenization and the checks of a run's arguments, mixed into `HookedLoopedTransformer`."""

    def to_tokens(self, text: Union[str, Sequence[str]], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokenize with the attached tokenizer; a list of strings is right-padded."""
        return self.tokenize(text, prepend_bos=prepend_bos)[0]

    def tokenize(
        self, text: Union[str, Sequence[str]], prepend_bos: bool = True
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokens and attention mask (1 = real token) for one string or a list, right-padded."""
        if self.tokenizer is None:
            raise ValueError("this model carries no tokenizer; pass token ids instead of text")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given: an empty list of prompts")
        tokens, mask = encode_batch(self.tokenizer, texts, prepend_bos=prepend_bos, d_vocab=self.cfg.d_vocab)
        return tokens.to(self.device), mask.to(self.device)

    def to_str_tokens(self, text_or_tokens: Union[str, Tensor, Sequence[int]]) -> list[str]:
        """The string of every token (of a text, or of token ids)."""
        if self.tokenizer is None:
            raise ValueError("this model carries no tokenizer")
        if isinstance(text_or_tokens, str):
            ids = self.to_tokens(text_or_tokens)[0].tolist()
        else:
            ids = torch.as_tensor(text_or_tokens).reshape(-1).tolist()
        return decode_each(self.tokenizer, ids)

    def as_tokens(self, input: TokensLike, name: str = "tokens") -> tuple[Tensor, Optional[Tensor]]:
        """Token ids [batch, pos] on the model's device (and the padding mask when text was
        given), checked: integer, 2-d (or 1-d), not empty, inside the vocabulary. Errors name
        the argument as `name`."""
        if isinstance(input, (list, tuple)) and len(input) == 0:
            raise ValueError("empty input: an empty list of prompts")
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            tokens, mask = self.tokenize(input)
            return tokens, mask
        try:
            tokens = torch.as_tensor(input, device=self.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"input must be token ids [batch, pos] or text, got {type(input).__name__}: {err}") from err
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor [batch, pos], got shape {tuple(tokens.shape)} dtype {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"empty input: {name} has shape {tuple(tokens.shape)}; give at least one token per prompt")
        if tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab:
            raise ValueError(f"{name}: token ids must lie in [0, {self.cfg.d_vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.long(), None

    def _prepare(
        self,
        input: TokensLike,
        n_loops: Any,
        attention_mask: Optional[Tensor],
        return_type: Optional[str],
        exit: Union[None, str, int],
        stop_at_layer: Any,
        seed: Any = None,
        generator: Optional[torch.Generator] = None,
        initial_state: Optional[Tensor] = None,
    ) -> Run:
        """Check every argument before any compute and return the run's settings."""
        cfg = self.cfg
        T = check_n_loops(n_loops, cfg.default_loops)
        tokens, text_mask = self.as_tokens(input)
        B, S = tokens.shape
        self._check_start(seed, generator, initial_state, self._state_shape(B, S))
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {list(RETURN_TYPES)}, got {return_type!r}")
        if return_type in ("loss", "both") and S < 2:
            raise ValueError(f"a loss needs at least 2 tokens per prompt (it predicts each next token); got {S}")
        mask = self._check_mask(attention_mask if attention_mask is not None else text_mask, B, S)
        if cfg.positional_embedding_type == "learned" and S > cfg.n_ctx:
            raise ValueError(f"sequence length {S} exceeds n_ctx={cfg.n_ctx} (learned position embeddings)")
        if cfg.positional_embedding_type == "rotary" and S > cfg.n_ctx and not self._warned_long_input:
            self._warned_long_input = True
            warnings.warn(f"input of {S} tokens is longer than n_ctx={cfg.n_ctx}: the model was not trained on "
                          "sequences this long", stacklevel=3)
        depth = self._depth(T)
        if stop_at_layer is not None:
            if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, numbers.Integral):
                raise ValueError(f"stop_at_layer must be an integer, got {stop_at_layer!r}")
            if not -depth <= stop_at_layer <= depth:
                raise ValueError(f"stop_at_layer={stop_at_layer} is outside [-{depth}, {depth}] (the unrolled depth at "
                                 f"{self._run_label(T)})")
            stop_at_layer = int(stop_at_layer) % depth if stop_at_layer < 0 else int(stop_at_layer)
        self._check_hooks_fire(T)
        rope = self._rope(S, tokens.device)
        return Run(tokens, T, self._resolve_exit(exit, T, return_type), mask, self.rotary, rope, stop_at_layer,
                   start=initial_state, seed=seed, generator=generator)

    @staticmethod
    def _check_start(seed: Any, generator: Any, initial_state: Any, shape: tuple[int, int, int]) -> None:
        """The start-state arguments: at most one of seed / generator / initial_state, each valid."""
        given = [n for n, v in (("seed", seed), ("generator", generator), ("initial_state", initial_state)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of seed=, generator= or initial_state=, not {' and '.join(given)}")
        if seed is not None:
            check_seed(seed)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        real_tensor(initial_state, "initial_state")
        if isinstance(initial_state, str):  # "zeros" / "embed", as the CLI's --initial-state
            if initial_state not in ("zeros", "embed"):
                raise ValueError(f"initial_state must be a tensor {shape}, 'zeros' or 'embed', got {initial_state!r}")
        elif initial_state is not None and (not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != shape):
            got = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else type(initial_state).__name__
            raise ValueError(f"initial_state has shape {got}, expected {shape} [batch, pos, state width]")

    def _check_mask(self, mask: Optional[Tensor], B: int, S: int) -> Optional[Tensor]:
        if mask is None:
            return None
        real_tensor(mask, "attention_mask")
        mask = torch.as_tensor(mask, device=self.device)
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the tokens have shape {(B, S)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask marks no real token in prompt(s) {empty}")
        return None if bool(mask.all()) else mask.long()

    def _resolve_exit(self, exit: Union[None, str, int], T: int, return_type: Optional[str]) -> Union[str, int]:
        """The exit a run takes. With `exit=None` it is the checkpoint's own default: for Ouro the
        gate's threshold exit (or `early_exit_step`), and the weighted exit when a loss is asked
        for, as `OuroForCausalLM.forward` does with labels."""
        gated = self.exit_gate is not None
        if exit is None:
            if gated and return_type in ("loss", "both"):
                return "weighted"
            exit = self.cfg.default_exit
            if isinstance(exit, int) and not isinstance(exit, bool) and not 0 <= exit < T:
                exit = "threshold"
        elif isinstance(exit, bool) or not (exit in EXIT_MODES or (isinstance(exit, numbers.Integral) and -T <= exit < T)):
            raise ValueError(f"exit must be one of {EXIT_MODES} or an iteration index in [-{T}, {T}), got {exit!r}")
        if isinstance(exit, numbers.Integral) and exit < 0:
            exit = T + int(exit)
        if exit in ("weighted", "threshold") and not gated:
            raise ValueError(f"exit={exit!r} needs a model with an exit gate (Ouro)")
        if isinstance(exit, numbers.Integral) and exit == T - 1:
            return "last"
        return exit if isinstance(exit, str) else int(exit)

    def _loops_of(self, args: tuple, kwargs: dict) -> int:
        return check_n_loops(kwargs.get("n_loops", args[1] if len(args) > 1 else None), self.cfg.default_loops)

    def _tl_text_input(self, input: Any, attention_mask: Any, prepend_bos: Optional[bool], padding_side: Optional[str]):
        """TransformerLens's `prepend_bos` / `padding_side` for text input (tokens pass unchanged)."""
        from loop_lens.model.tl_compat import check_padding_side

        check_padding_side(padding_side)
        if prepend_bos is not None and not isinstance(prepend_bos, bool):
            raise ValueError(f"prepend_bos must be None, True or False, got {prepend_bos!r}")
        text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
        if prepend_bos is None or not text:
            return input, attention_mask
        tokens, mask = self.tokenize(input, prepend_bos=prepend_bos)
        return tokens, attention_mask if attention_mask is not None else mask

    to_string = tl_compat.to_string

    to_single_token = tl_compat.to_single_token

    get_token_position = tl_compat.get_token_position
