"""Argument checks shared by the model, the analyses, the report and the CLI (no torch import,
so the CLI can check its arguments before loading anything heavy)."""

from __future__ import annotations

import operator
from typing import Any


def check_n_loops(n_loops: Any, default: int) -> int:
    """`n_loops` as a positive int: any integral value (Python, numpy or 0-d integer torch), or
    `default` when it is None. Zero, negatives, floats, bools and strings raise ValueError."""
    if n_loops is None:
        return default
    is_bool = isinstance(n_loops, bool) or str(getattr(n_loops, "dtype", "")) in ("bool", "torch.bool")
    try:
        value = operator.index(n_loops)
    except TypeError:
        value = None
    if is_bool or value is None:
        raise ValueError(f"n_loops must be a positive integer, got {n_loops!r} ({type(n_loops).__name__})")
    if value < 1:
        raise ValueError(f"n_loops must be a positive integer, got {value}")
    return value
