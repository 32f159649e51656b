"""TransformerLens's tokenizer helpers, shared by `HookedLoopedTransformer` and its unrolled view.

Each function is a method of a model with `tokenizer`, `to_tokens(text, prepend_bos=)` and
`device`. Decoding uses the tokenizer's own `decode` (its spacing, merges and byte-level
handling), never a join of per-token strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

PADDING_SIDES = (None, "right")


def check_padding_side(padding_side: Optional[str]) -> None:
    """loop_lens pads batches of text on the right (its positions count from each prompt's start)."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be None or 'right' (loop_lens pads text batches on the right, with an "
                         f"attention mask), got {padding_side!r}")


def decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """One string from token ids, decoded by the tokenizer as a whole (its own spacing)."""
    if tokenizer is None:
        raise ValueError("this model carries no tokenizer")
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def to_string(self: Any, tokens: Union[Tensor, Sequence[int], Sequence[Sequence[int]]]) -> Union[str, list[str]]:
    """TransformerLens's `to_string`: token ids [pos] -> a string, [batch, pos] -> a list of strings."""
    ids = torch.as_tensor(tokens)
    if ids.is_floating_point() or ids.ndim > 2:
        raise ValueError(f"to_string takes integer token ids [pos] or [batch, pos], got shape {tuple(ids.shape)} "
                         f"{ids.dtype}")
    if ids.ndim == 2:
        return [decode(self.tokenizer, row.tolist()) for row in ids]
    return decode(self.tokenizer, ids.reshape(-1).tolist())


def to_single_token(self: Any, string: str) -> int:
    """TransformerLens's `to_single_token`: the id of a string that is exactly one token."""
    if not isinstance(string, str):
        raise TypeError(f"to_single_token takes a string, got {type(string).__name__}")
    ids = self.to_tokens(string, prepend_bos=False)[0]
    if len(ids) != 1:
        raise ValueError(f"{string!r} is {len(ids)} tokens ({ids.tolist()}), not one")
    return int(ids[0])


def get_token_position(
    self: Any,
    single_token: Union[str, int],
    input: Union[str, Tensor],
    mode: str = "first",
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
) -> int:
    """TransformerLens's `get_token_position`: where `single_token` (a string of one token, or an
    id) first (`mode="first"`) or last (`mode="last"`) occurs in `input` (text or tokens [pos] or
    [1, pos]). Raises if it does not occur."""
    if mode not in ("first", "last"):
        raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
    check_padding_side(padding_side)
    if isinstance(input, str):
        tokens = self.to_tokens(input, prepend_bos=True if prepend_bos is None else prepend_bos)
    else:
        tokens = torch.as_tensor(input)
    if tokens.ndim == 2:
        if tokens.shape[0] != 1:
            raise ValueError(f"get_token_position takes one prompt; input has batch size {tokens.shape[0]}")
        tokens = tokens[0]
    token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
    where = (tokens == token).nonzero().flatten()
    if len(where) == 0:
        raise ValueError(f"token {single_token!r} (id {token}) does not occur in the input")
    return int(where[0] if mode == "first" else where[-1])


def names_filter_fn(names_filter: Any) -> Any:
    """TransformerLens's names_filter (None, a name, a list of names or a function) as a function."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, (list, tuple, set, frozenset)):
        listed = set(names_filter)
        return lambda name: name in listed
    if callable(names_filter):
        return names_filter
    raise ValueError(f"names_filter must be None, a name, a list of names or a function, got {type(names_filter).__name__}")


def caching_hook(cache: dict, device: Any, remove_batch_dim: bool, is_backward: bool, pos_slice: Any = None) -> Any:
    """A hook storing its activation (detached, on `device`) in `cache` under the hook's name
    (+ `_grad` for a backward hook), as TransformerLens's caching hooks do."""
    from transformer_lens.utilities import Slice

    slicer = Slice.unwrap(pos_slice) if pos_slice is not None else None

    def save(tensor: Tensor, hook: Any) -> None:
        stored = tensor.detach().to(device)
        if remove_batch_dim and stored.ndim > 0 and stored.shape[0] == 1:
            stored = stored[0]
        if slicer is not None:
            pos_dim = -3 if hook.name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")) else -2
            if stored.dim() >= -pos_dim:
                stored = slicer.apply(stored, dim=pos_dim)
        cache[hook.name + ("_grad" if is_backward else "")] = stored

    return save
