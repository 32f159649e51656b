"""Argument checks shared by the model, the analyses, the report and the CLI: one rule and one
message for each kind of number, whoever asks."""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Optional

_ITER_RE = re.compile(r"iter\.(0|[1-9][0-9]*)\.", re.ASCII)


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


SEED_LIMIT = 2**63
"""Seeds lie in [0, 2**63): what `torch.Generator.manual_seed` takes on every device, and the one
rule the model, generation, the report, the sweep and the CLI apply."""


def seed(value: Any, name: str = "seed") -> int:
    """`value` as a seed in [0, 2**63) (see `integer`); ValueError naming `name` otherwise."""
    number = integer(value, name, kind="an integer seed")
    if not 0 <= number < SEED_LIMIT:
        raise ValueError(f"{name} must lie in [0, 2**63), got {number}")
    return number


def finite_number(value: Any, name: str) -> float:
    """A finite real number (not a bool, not NaN or an infinity), as a float; ValueError naming `name`."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    return number


def tolerance(value: Any, name: str = "tol") -> float:
    """A tolerance: a finite number > 0; ValueError naming `name` otherwise (NaN would make every
    comparison false, a negative or infinite one every step count as settled)."""
    number = finite_number(value, name)
    if number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {number}")
    return number


def float_dtype(value: Any, name: str = "cache_dtype") -> Any:
    """A floating-point torch dtype (a name such as "float16" is accepted); ValueError naming
    `name` for integer, bool, complex dtypes or anything else."""
    import torch

    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point torch dtype (torch.float32, torch.bfloat16, "
                         f"torch.float16 ...), got {value!r}")
    if dtype.itemsize < 2:  # fp8: step sizes and patterns would be noise
        raise ValueError(f"{name}={value!r} is an 8-bit float; use torch.float16, torch.bfloat16 or torch.float32")
    return dtype


def real_tensor(value: Any, name: str, device: Any = None) -> None:
    """Refuse a tensor argument that holds no usable real values: complex (the imaginary part
    would be dropped), or on the meta device (no data), or on another device than `device`."""
    import torch

    if not isinstance(value, torch.Tensor):
        return
    if value.is_complex():
        raise ValueError(f"{name} is a complex tensor ({value.dtype}); give real values")
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device: it has a shape but no values")
    if value.layout != torch.strided:
        raise ValueError(f"{name} is a {value.layout} tensor; give a dense tensor (.to_dense())")


def hook_iteration(name: Any) -> Optional[int]:
    """The iteration of a loop hook name written the one way the model writes it
    (`iter.<t>.` with t a plain ASCII decimal, no sign, no leading zero), else None."""
    if not isinstance(name, str):
        return None
    match = _ITER_RE.match(name)
    return int(match[1]) if match else None


def hook_name_problem(name: str) -> Optional[str]:
    """Why a name starting with `iter.` is not a hook name, with the spelling to use; None when
    its iteration is written canonically."""
    if not name.startswith("iter.") or hook_iteration(name) is not None:
        return None
    written, _, rest = name[5:].partition(".")
    hint = ""
    stripped = written.strip()
    if stripped.lstrip("+-").isdigit():
        try:
            t = int(stripped)
        except ValueError:
            t = None
        if t is not None and t >= 0 and rest:
            hint = f"; did you mean 'iter.{t}.{rest}'?"
        elif t is not None and t < 0:
            hint = "; iterations count from 0 (negative indices are not hook names: use iter.{T-1}. for the last)"
    return (f"{name!r} is not a hook name: the iteration must be written as a plain decimal number "
            f"(iter.0., iter.1., ...; got {written!r}){hint}")
