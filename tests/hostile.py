"""Shared helpers of the hostile-input tests (issue 25)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import loop_lens as ll


def word_tokenizer(words: list[str], unk: str | None = None) -> Tokenizer:
    """A WordLevel tokenizer over `words` (id = index), split on whitespace."""
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def tiny(tokenizer_words: list[str] | None = None) -> ll.HookedLoopedTransformer:
    """zoo:tiny-random, with a word tokenizer over `tokenizer_words` when given."""
    model = ll.load("zoo:tiny-random")
    if tokenizer_words is not None:
        model.tokenizer = word_tokenizer(tokenizer_words)
    return model


def copy_golden(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for extra in ("expected.json", "expected.safetensors"):
        (dst / extra).unlink(missing_ok=True)
    return dst


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def strings(value, skip: tuple[str, ...] = ("hovertemplate", "texttemplate", "template")) -> list[str]:
    """Every string inside a JSON-like value (not under the keys in `skip`: plotly patterns loop_lens writes)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k not in skip for s in strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings(v)]
    if hasattr(value, "tolist") and getattr(getattr(value, "dtype", None), "kind", "") in "USO":
        return strings(value.tolist())
    return []


def tokens(n: int = 5) -> torch.Tensor:
    return torch.arange(1, n + 1)[None]
