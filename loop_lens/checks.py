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
    """Refuse a model whose family says `what` (a tool that runs or reads a single-timescale
    loop) is not for it yet: its `single_loop_refusal` names the models and what to use instead."""
    refusal = getattr(model, "single_loop_refusal", None)
    if refusal:
        raise ValueError(f"{what} runs a single-timescale loop and is not available for {refusal}")
