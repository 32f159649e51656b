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


def _rust_panic(err: BaseException) -> bool:
    """Whether `err` is pyo3's PanicException (a BaseException: a Rust panic inside `tokenizers`,
    e.g. a pre-tokenizer regex that backtracks without end). It is the library failing on the
    file's content, so it becomes an ordinary error; KeyboardInterrupt and SystemExit never are."""
    return type(err).__name__ == "PanicException"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_tokenizer(path: str | Path) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json file; LoadError naming the file if it is not one.

    Truncation and padding stored in the file are kept (a saved model writes them back), but
    `encode_batch` never applies them (see there)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except BaseException as err:  # the Rust parser raises a bare Exception (or panics) for every kind of bad file
        if not (isinstance(err, Exception) or _rust_panic(err)):
            raise
        raise LoadError(f"{path} is not a valid tokenizer.json: {_first_line(err)}") from None


def load_tokenizer(directory: str | Path) -> Optional[Any]:
    """The tokenizer in a checkpoint directory (`tokenizer.json`), or None. Never downloads."""
    from loop_lens.files import checkpoint_file

    path = Path(directory) / "tokenizer.json"
    return read_tokenizer(checkpoint_file(directory, "tokenizer.json")) if path.is_file() else None


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


def _encode(tokenizer: Any, texts: list[str], prepend_bos: bool) -> list[Any]:
    """`tokenizer.encode_batch` with the tokenizer's own truncation and padding switched off for
    the call (as transformers does when a call asks for neither: a prompt is analysed whole, and
    pads never count as real tokens), its failures (a Rust panic included) as ValueError saying why."""
    truncation = getattr(tokenizer, "truncation", None)
    padding = getattr(tokenizer, "padding", None)
    try:
        if truncation is not None:
            tokenizer.no_truncation()
        if padding is not None:
            tokenizer.no_padding()
        return tokenizer.encode_batch(texts, add_special_tokens=prepend_bos)
    except BaseException as err:
        if not (isinstance(err, Exception) or _rust_panic(err)):
            raise
        unk = getattr(getattr(tokenizer, "model", None), "unk_token", None)
        hint = ""
        if unk is not None and tokenizer.token_to_id(unk) is None:
            hint = (f"; its unk_token {unk!r} is not in its vocabulary, so text outside the vocabulary cannot be "
                    "encoded (fix the tokenizer.json, or give token ids)")
        elif _rust_panic(err):
            hint = "; the tokenizer crashed on this text (a pre-tokenizer pattern it cannot run?)"
        raise ValueError(f"the tokenizer could not encode the prompt(s): {_first_line(err)}{hint}") from None
    finally:
        if truncation is not None:
            tokenizer.enable_truncation(**truncation)
        if padding is not None:
            tokenizer.enable_padding(**padding)


def encode_batch(tokenizer: Any, texts: Sequence[str], prepend_bos: bool = True,
                 d_vocab: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask [batch, pos], right-padded. Text the tokenizer can only map
    to its unknown token raises ValueError naming it (a character-level tokenizer whose unknown
    token is its padding would otherwise turn it silently into padding). A tokenizer that
    truncates raises ValueError rather than dropping text; padding it adds is removed (its mask
    decides). With `d_vocab`, an id the model has no embedding for raises ValueError naming it."""
    texts = list(texts)
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if wrong:
        raise ValueError(f"prompts must be strings; prompt {wrong[0]} is {type(texts[wrong[0]]).__name__} "
                         f"({texts[wrong[0]]!r:.40})")
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        encodings = _encode(tokenizer, texts, prepend_bos)
        unknown = _unknown_text(tokenizer, texts, encodings)
        if unknown:
            pieces = sorted({piece for _, piece in unknown})
            rows = sorted({row for row, _ in unknown})
            raise ValueError(f"prompt(s) {rows[:10]} hold text that is not in the tokenizer's vocabulary: {pieces[:20]!r}")
        ids = [[i for i, real in zip(enc.ids, enc.attention_mask) if real] for enc in encodings]
    else:  # transformers tokenizer
        ids = [tokenizer(t, add_special_tokens=prepend_bos)["input_ids"] for t in texts]
    if d_vocab is not None:
        outside = sorted({i for seq in ids for i in seq if not 0 <= i < d_vocab})
        if outside:
            raise ValueError(f"the tokenizer gives token id(s) {outside[:10]}, but the model's vocabulary has "
                             f"{d_vocab} ids (0..{d_vocab - 1}): the tokenizer does not belong to this model")
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
