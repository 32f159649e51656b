"""Comparing float results across compute paths and CPUs.

fp32 results differ between kernels (SDPA vs explicit attention), thread counts and CPUs by a few
units in the last place *of the tensor's scale*: logits of magnitude 14 may differ by 2e-5, even
at an element that is itself near 0. So a tolerance must scale with the magnitude of what is
compared: `close` allows `atol * max(1, max|expected|) + rtol * |expected|` per element.
"""

from __future__ import annotations

import torch
from torch import Tensor

RTOL, ATOL = 1e-4, 1e-5


def _bounds(actual: Tensor, expected: Tensor, rtol: float, atol: float) -> tuple[Tensor, Tensor, Tensor]:
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a, e = actual.double(), expected.double()
    finite = e[torch.isfinite(e)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return a, e, atol * scale + rtol * e.abs()


def close(actual: Tensor, expected: Tensor, rtol: float = RTOL, atol: float = ATOL, equal_nan: bool = False) -> bool:
    """Whether `actual` equals `expected` up to a tolerance that scales with `expected`'s magnitude."""
    a, e, tol = _bounds(actual, expected, rtol, atol)
    ok = (a - e).abs() <= tol
    if equal_nan:
        ok = ok | (torch.isnan(a) & torch.isnan(e))
    ok = ok | ((a == e) & torch.isinf(e))
    return bool(ok.all())


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL, atol: float = ATOL, equal_nan: bool = False) -> None:
    """`close`, raising AssertionError with the largest difference and the tolerance there."""
    if not close(actual, expected, rtol, atol, equal_nan):
        a, e, tol = _bounds(actual, expected, rtol, atol)
        excess = torch.nan_to_num((a - e).abs() - tol, nan=float("inf"))
        i = int(excess.flatten().argmax())
        raise AssertionError(f"not close: at flat index {i}, {float(a.flatten()[i])!r} vs {float(e.flatten()[i])!r} "
                             f"(tolerance {float(tol.flatten()[i]):.3g}; rtol={rtol}, atol={atol} x max(1, max|expected|))")
