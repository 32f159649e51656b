"""Argument checks shared by the model, the analyses, the report and the CLI: one rule and one
message for each kind of number, whoever asks."""

from __future__ import annotations

import operator
from typing import Any


def integer(value: Any, name: str, kind: str = "an integer") -> int:
    """`value` as an int: any integral value (Python, numpy, 0-d integer tensor); never a bool, a
    float or a string. Raises ValueError naming `name`."""
    is_bool = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    try:
        number = None if is_bool else operator.index(value)
    except TypeError:
        number = None
    if number is None:
        raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    return number


def positive_int(value: Any, name: str) -> int:
    """`value` as an int >= 1 (see `integer`)."""
    number = integer(value, name, kind="a positive integer")
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {number}")
    return number


def check_n_loops(n_loops: Any, default: int) -> int:
    """`n_loops` as a positive int, or `default` when it is None."""
    return default if n_loops is None else positive_int(n_loops, "n_loops")


def single_loop(model: Any, what: str) -> None:
    """Refuse a nested (HRM) model where `what` runs or reads a single-timescale loop only
    (ValueError naming `what` and what to use instead)."""
    if getattr(getattr(model, "cfg", None), "l_cycles", 0):
        raise ValueError(f"{what} runs a single-timescale loop and is not available for nested (HRM) models yet: "
                         "run the model with run_with_cache / run_with_hooks and analyse the cache "
                         "(cache.low_view() for the L stack)")
