"""Tokenizer glue: a `tokenizers.Tokenizer` or a transformers tokenizer, read offline.

A checkpoint's tokenizer is untrusted data: only `tokenizer.json` is read, by the `tokenizers`
library's JSON parser. `tokenizer_config.json`, its `auto_map` and any `tokenization_*.py` are
never looked at, so nothing from the checkpoint is imported or run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from loop_lens.errors import LoadError


def read_tokenizer(path: str | Path) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json file; LoadError naming the file if it is not one."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust parser raises a bare Exception for every kind of bad file
        raise LoadError(f"{path} is not a valid tokenizer.json: {err}") from err


def load_tokenizer(directory: str | Path) -> Optional[Any]:
    """The tokenizer in a checkpoint directory (`tokenizer.json`), or None. Never downloads."""
    path = Path(directory) / "tokenizer.json"
    return read_tokenizer(path) if path.is_file() else None


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and hasattr(tokenizer, "token_to_id"):
        for name in ("<pad>", "[PAD]", "<|pad|>"):
            pad = tokenizer.token_to_id(name)
            if pad is not None:
                break
    return int(pad) if pad is not None else 0


def _unknown_text(tokenizer: Any, texts: Sequence[str], encodings: Sequence[Any]) -> list[tuple[int, str]]:
    """(prompt index, text) of every piece the tokenizer could only map to its unknown token."""
    model = getattr(tokenizer, "model", None)
    unk = getattr(model, "unk_token", None)
    unk_id = tokenizer.token_to_id(unk) if unk else None
    if unk_id is None:
        return []
    found = []
    for row, (text, enc) in enumerate(zip(texts, encodings)):
        for token_id, (start, end) in zip(enc.ids, enc.offsets):
            piece = text[start:end]
            if token_id == unk_id and piece != unk:
                found.append((row, piece))
    return found


def encode_batch(tokenizer: Any, texts: Sequence[str], prepend_bos: bool = True) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask [batch, pos], right-padded. Text the tokenizer can only map
    to its unknown token raises ValueError naming it (a character-level tokenizer whose unknown
    token is its padding would otherwise turn it silently into padding)."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=prepend_bos)
        unknown = _unknown_text(tokenizer, texts, encodings)
        if unknown:
            pieces = sorted({piece for _, piece in unknown})
            rows = sorted({row for row, _ in unknown})
            raise ValueError(f"prompt(s) {rows[:10]} hold text that is not in the tokenizer's vocabulary: {pieces[:20]!r}")
        ids = [enc.ids for enc in encodings]
    else:  # transformers tokenizer
        ids = [tokenizer(t, add_special_tokens=prepend_bos)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    if width == 0:
        raise ValueError("the text tokenized to nothing")
    tokens = torch.full((len(ids), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return tokens, mask


def decode_each(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One string per token id."""
    if hasattr(tokenizer, "id_to_token"):
        return [tokenizer.decode([i], skip_special_tokens=False) or (tokenizer.id_to_token(i) or "") for i in ids]
    return [tokenizer.decode([i]) for i in ids]
